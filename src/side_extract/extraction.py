"""Extraction (SIDE step 4) and its baselines: N_G generations per method with equal seeds.

Generation ``i`` of every method starts from the same noise (its generator is seeded by (extract seed, i)),
so methods differ only by their guidance. Each guided generation's target class is drawn uniformly among
the classifier's classes from (seed, i) alone and stored beside the image (``labels`` in each shard: the
class's label value; -1 for ``uncond``). Every method samples with guided-diffusion's DDIM (eps recomputed
from the clipped x0 in every step) and, when guided, applies the guidance in guided-diffusion's order
(:func:`side_extract.sampling.guided_step`).
"""
from __future__ import annotations

import logging
import shutil

import numpy as np

from . import config as cfg
from .data import ImageSet, to_uint8
from .guidance import ClassifierGuidance
from .models.target import Denoiser
from .runs import Progress, RunDir, shard_stage
from .sampling import SamplingDiverged, sample

log = logging.getLogger(__name__)


def draw_targets(seed: int, indices: np.ndarray, n_classes: int) -> np.ndarray:
    """Output index of the target class of each generation, uniform, from (seed, index) alone."""
    if n_classes < 1:
        raise ValueError("no classes to guide toward (every surrogate cluster was dropped?)")
    return np.array([np.random.default_rng([seed, int(i), 0x5EED]).integers(n_classes) for i in indices], dtype=np.int64)


def extract(
    denoiser: Denoiser,
    c: cfg.ExtractConfig,
    guidance: ClassifierGuidance | None,
    start: int,
    stop: int,
    *,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Generations ``start .. stop - 1``: ``images`` (uint8), ``index`` and ``labels`` (target label or -1)."""
    idx = np.arange(start, stop, dtype=np.int64)
    if guidance is None:
        targets = None
        labels = np.full(len(idx), -1, dtype=np.int64)
    else:
        targets = draw_targets(c.seed, idx, guidance.n_classes)
        labels = guidance.classes[targets]
    x = sample(denoiser, stop - start, seed=c.seed, start=start, scheduler=c.scheduler, steps=c.steps, eta=c.eta,
               batch_size=c.batch_size, guidance=guidance, labels=targets, clip_eps=True, device=device,
               progress=progress)
    return {"images": to_uint8(x), "index": idx, "labels": labels}


def extraction_stage(
    run: RunDir,
    method: str,
    denoiser: Denoiser,
    c: cfg.ExtractConfig,
    guidance: ClassifierGuidance | None,
    fingerprint: str,
    *,
    device: str = "cpu",
    progress: Progress | None = None,
) -> ImageSet:
    """Write ``run/extraction/<method>/shard-*.npz`` (skip / resume as the manifest says).

    A method whose sampling diverges leaves no shard: its stage directory is removed and the error names it.
    """

    def make(lo: int, hi: int, shard_progress: Progress | None) -> dict[str, np.ndarray]:
        return extract(denoiser, c, guidance, lo, hi, device=device, progress=shard_progress)

    stage = f"extraction/{method}"
    try:
        return shard_stage(run, stage, fingerprint, c.n, c.shard_size, make, progress=progress,
                           method=method, scale=None if guidance is None else guidance.scale)
    except SamplingDiverged as e:
        shutil.rmtree(run.path / stage, ignore_errors=True)
        raise SamplingDiverged(f"method {method}: {e}") from None
