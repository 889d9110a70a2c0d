"""Extraction (SIDE step 4) and its baselines: N_G generations per method with equal seeds.

Generation ``i`` of every method starts from the same noise (its generator is seeded by (extract seed, i)),
so methods differ only by their guidance. Each guided generation's target label is drawn uniformly among
the classifier's classes from (seed, i) alone and stored beside the image (``labels`` in each shard;
-1 for ``uncond``).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import torch

from . import config as cfg
from .data import ImageSet, to_uint8
from .guidance import ClassifierGuidance
from .models.target import Denoiser
from .runs import RunDir
from .sampling import sample, shard_stage

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GuidanceSpec:
    """A classifier to guide with, the label value of each of its outputs, the scale and the temperature."""

    classifier: torch.nn.Module
    classes: np.ndarray
    scale: float
    temperature: float = 1.0


def draw_targets(seed: int, indices: np.ndarray, n_classes: int) -> np.ndarray:
    """Output index of the target class of each generation, uniform, from (seed, index) alone."""
    if n_classes < 1:
        raise ValueError("no classes to guide toward (every surrogate cluster was dropped?)")
    return np.array([np.random.default_rng([seed, int(i), 0x5EED]).integers(n_classes) for i in indices], dtype=np.int64)


def extract(
    denoiser: Denoiser,
    c: cfg.ExtractConfig,
    guidance: GuidanceSpec | None,
    start: int,
    stop: int,
    *,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Generations ``start .. stop - 1``: ``images`` (uint8), ``index`` and ``labels`` (target label or -1)."""
    idx = np.arange(start, stop, dtype=np.int64)
    if guidance is None:
        labels = np.full(len(idx), -1, dtype=np.int64)
        guide = None
    else:
        # the guidance object indexes targets by global index; give it a dense array over [0, stop)
        out_idx = np.zeros(stop, dtype=np.int64)
        out_idx[idx] = draw_targets(c.seed, idx, len(guidance.classes))
        labels = np.asarray(guidance.classes, dtype=np.int64)[out_idx[idx]]
        g = ClassifierGuidance(guidance.classifier, guidance.scale, out_idx,
                               denoiser.scheduler.config.num_train_timesteps, temperature=guidance.temperature,
                               t_range=(c.t_lo, c.t_hi))
        guide = g.for_indices
    x = sample(denoiser, stop - start, seed=c.seed, start=start, scheduler=c.scheduler, steps=c.steps, eta=c.eta,
               batch_size=c.batch_size, guidance=guide, clip_model_output=c.clip_model_output, device=device,
               progress=progress)
    return {"images": to_uint8(x), "index": idx, "labels": labels}


def extraction_stage(
    run: RunDir,
    method: str,
    denoiser: Denoiser,
    c: cfg.ExtractConfig,
    guidance: GuidanceSpec | None,
    fingerprint: str,
    *,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> ImageSet:
    """Write ``run/extraction/<method>/shard-*.npz`` (skip / resume as the manifest says)."""

    def make(lo: int, hi: int, shard_progress: Callable[[int, int], None] | None) -> dict[str, np.ndarray]:
        return extract(denoiser, c, guidance, lo, hi, device=device, progress=shard_progress)

    return shard_stage(run, f"extraction/{method}", fingerprint, c.n, c.shard_size, make, progress=progress,
                       method=method, scale=None if guidance is None else guidance.scale)
