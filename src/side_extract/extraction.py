"""Extraction (SIDE step 4) and its baselines: N_G generations per method with equal seeds.

Generation ``i`` of every method starts from the same noise (its generator is seeded by (extract seed, i) in
the extraction's own noise stream, ``sampling.EXTRACTION_STREAM``, apart from the synthetic set's even at
equal seeds), so methods differ only by their guidance. Each generation of a method that draws target classes (the
classifier-guided ones and side-lora's conditional model) gets its class uniformly from (seed, i) alone (or, under
adaptive allocation, from the earlier rounds, ``allocation.py``), stored beside the image (``labels`` in each shard:
the class's label value; -1 for ``uncond`` and the label-free ``memguide``, whose guidance receives each
generation's index instead, ``guidance.Guidance``). Every method samples with guided-diffusion's DDIM (eps recomputed
from the clipped x0 in every step) and, when guided, applies the guidance in guided-diffusion's order
(:func:`side_extract.sampling.guided_step`). Adaptive allocation, memguide's avoidance and dedup-driven stopping
(``extract.stop_unseen``, any method) generate in rounds, each seeing the earlier rounds' generations: each round
is cut into shards of ``shard_size`` (written in parallel by a launch's processes), and a round begins when the
earlier ones are whole; under dedup-driven stopping the stage ends after the first round whose generations so far
have an unseen mass below ``stop_unseen`` (``allocation.stop_after``), with fewer than N_G generations.
"""
from __future__ import annotations

import logging
import numbers
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as cfg
from .allocation import adaptive_targets, stop_after
from .data import ImageSet, load_shards, to_uint8
from .guidance import ClassifierGuidance
from .memorization import MemorizationGuidance
from .models.target import Denoiser
from .runs import MODEL_INPUT, Progress, RunDir, grows_from, npz_arrays, read_npz, shard_ranges, shard_stage
from .sampling import EXTRACTION_STREAM, BatchSize, SamplingDiverged, ddim_settings, sample_batches

log = logging.getLogger(__name__)


def draw_targets(seed: int, indices: np.ndarray, n_classes: int) -> np.ndarray:
    """Output index of the target class of each generation, uniform, from (seed, index) alone."""
    ind = np.asarray(indices)
    cfg.check_int(seed, "seed")
    if ind.size and (not np.issubdtype(ind.dtype, np.integer) or ind.min() < 0):
        raise ValueError(f"indices must be generation numbers (integers >= 0), got {ind.dtype} from {ind.min()}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 1:  # (2.5 drew
        # from {0, 1}; True was taken as 1)
        raise ValueError(f"n_classes={n_classes!r} must be an integer >= 1 (0: no classes to guide toward; every "
                         "surrogate cluster was dropped?)")
    return np.array([np.random.default_rng([seed, int(i), 0x5EED]).integers(n_classes) for i in indices], dtype=np.int64)


def round_size(c: cfg.ExtractConfig) -> int:
    """Generations per round of the adaptive allocation and of memguide's avoidance (the last round may be
    smaller)."""
    return -(-c.n // c.rounds)


def round_start(c: cfg.ExtractConfig, i: int) -> int:
    """The first generation of the round that generation ``i`` belongs to."""
    return i - i % round_size(c)


def in_rounds(c: cfg.ExtractConfig, guidance: ClassifierGuidance | MemorizationGuidance | None,
              denoiser: Denoiser | None) -> bool:
    """:func:`~side_extract.config.rounds_rule` of a method from its built guidance and its denoiser (side-lora's is
    conditional: pass the one it samples, or None where it is known not to be side-lora's)."""
    targeted = isinstance(guidance, ClassifierGuidance) or getattr(denoiser, "conditional", False)
    return cfg.rounds_rule(c, targeted=targeted,
                           avoiding=isinstance(guidance, MemorizationGuidance) and guidance.avoid > 0)


def earlier_rounds(generations: ImageSet, begin: int) -> ImageSet:
    """The generations ``0 .. begin - 1`` of a method's ``generations`` (its shards, read back): the rounds before
    the one starting at ``begin``. Later ones, whole or in the making, are left out."""
    keep = generations.ids < begin
    return ImageSet(generations.images[keep], generations.labels[keep], generations.ids[keep])


def stored_batches(stage: Path) -> np.ndarray | None:
    """The first generation of each generation's denoiser batch, as an extraction stage's shards recorded it
    (``batch``), in order of generation index; -1 for the generations of shards made before it was recorded
    (a run grown from an older one); None when no shard recorded it."""
    ids, starts = [], []
    for shard in sorted(stage.glob("shard-*.npz")):
        z = npz_arrays(shard, "index", optional=("batch",))  # (not its images; a damaged shard named, where numpy's
        ids.append(z["index"])  # words named no file and suggested unpickling it)
        starts.append(z.get("batch", np.full(len(z["index"]), -1, dtype=np.int64)))
    if not ids or all((s < 0).all() for s in starts):
        return None
    order = np.argsort(np.concatenate(ids), kind="stable")
    return np.concatenate(starts)[order].astype(np.int64)


def batch_of(c: cfg.ExtractConfig, guidance: ClassifierGuidance | MemorizationGuidance | None, i: int,
             starts: np.ndarray | None = None, *, denoiser: Denoiser | None) -> tuple[int, int]:
    """The generations ``lo .. hi - 1`` that the extraction stage made in one denoiser call with generation ``i``.
    Batched convolutions round differently, so a guided generation is reproduced bit for bit only within its
    batch. ``starts``: the batches the stage recorded (:func:`stored_batches`), which hold even where it halved
    its batch on out-of-memory; where they are missing (-1, or None), the shard (``runs.shard_ranges``) cut
    into batches of ``batch_size`` from the shard's start."""
    if not 0 <= i < c.n:
        raise ValueError(f"generation {i} is not one of the run's {c.n} (0 .. {c.n - 1})")
    if starts is not None and (len(starts) > c.n or (len(starts) < c.n and not c.stop_unseen > 0)):
        raise ValueError(f"the stage recorded the batches of {len(starts)} generations, not the run's {c.n}")
    if starts is not None and i >= len(starts):
        raise ValueError(f"generation {i} was not made: the stage stopped after {len(starts)} generations "
                         f"(extract.stop_unseen={c.stop_unseen})")
    if starts is not None and starts[i] >= 0:
        lo = int(starts[i])
        same = np.flatnonzero(starts == lo)
        return lo, int(same[-1]) + 1
    layout = shard_ranges(c.n, c.shard_size, round_size(c) if in_rounds(c, guidance, denoiser) else None)
    for lo, hi in (r for rnd in layout for r in rnd):
        if lo <= i < hi:
            b0 = lo + (i - lo) // c.batch_size * c.batch_size
            return b0, min(hi, b0 + c.batch_size)
    raise AssertionError("unreachable: the shards cover 0 .. n - 1")


def target_slots(guided: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each label's position in ``guided`` (the labels that may be guided toward, in output order), by an explicit
    map: the labels need not be sorted (``searchsorted`` assumed they were and gave the budget of the class that
    repeats itself to another), and a label outside them is an error, not a neighbour's slot."""
    slot = {int(v): k for k, v in enumerate(guided)}
    unknown = sorted({int(v) for v in labels} - set(slot))
    if unknown:
        raise ValueError(f"earlier rounds hold labels {unknown[:5]} that are not among the classes guided toward "
                         f"{list(slot)}")
    return np.array([slot[int(v)] for v in labels], dtype=np.int64)


def extract(
    denoiser: Denoiser,
    c: cfg.ExtractConfig,
    guidance: ClassifierGuidance | MemorizationGuidance | None,
    start: int,
    stop: int,
    *,
    previous: ImageSet | None = None,
    batch_size: int | BatchSize | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Generations ``start .. stop - 1``: ``images`` (uint8), ``index``, ``labels`` (target label or -1) and
    ``batch`` (the first generation of each one's denoiser batch: ``batch_size``'s cut, halved on out-of-memory).

    In rounds (:func:`in_rounds`) ``start .. stop`` lies within one round and ``previous`` holds the earlier
    rounds' generations with their target labels (``allocation.adaptive_targets`` draws the whole round's
    targets, of which these are a slice), so the images do not depend on how a round is cut into calls. Outside
    rounds ``stop`` may pass ``c.n``: generation i is the same for every N_G.

    The guidance's settings (``scale``, ``temperature``, ``t_lo``/``t_hi``: ``c``'s, and the ``cond_*`` and
    ``teacher_*`` ones, make the guidance object in a run, :func:`~side_extract.pipeline.method_guidance`) come
    from ``guidance`` itself; ``c``'s copies of them are not read here.
    """
    cfg.check_section(c, cfg.ExtractConfig, "c")
    cfg.check_int(start, "start")  # (start=-2 was numpy's "expected non-negative integer")
    cfg.check_int(stop, "stop")
    if not start < stop:
        raise ValueError(f"start={start!r}, stop={stop!r}: generations start .. stop - 1 need start < stop")
    idx = np.arange(start, stop, dtype=np.int64)
    begin = round_start(c, start)
    if in_rounds(c, guidance, denoiser):
        if stop > c.n:  # (uniform allocation may go past n: generation i is the same whatever n is)
            raise ValueError(f"stop={stop} is past extract.n={c.n}: in rounds (allocation 'adaptive') the "
                             f"generations are 0 .. {c.n - 1}")
        if stop > begin + round_size(c):
            raise ValueError(f"generations {start}..{stop - 1} span two rounds of {round_size(c)}")
        if begin > 0 and (previous is None or not np.array_equal(previous.ids, np.arange(begin))):
            raise ValueError(f"generations {start}..{stop - 1} need the {begin} of the earlier rounds")
    if getattr(denoiser, "conditional", False):  # side-lora: the fine-tuned model, toward a cluster of its own
        steer = denoiser  # (its target outputs leave out the background class of memorization-aware labels)
    elif isinstance(guidance, ClassifierGuidance):  # classifier outputs that may be guided toward (not background)
        steer = guidance
    else:  # UnCond, and memguide (label-free: the sampler gives it the generation indices)
        steer = None
        if isinstance(guidance, MemorizationGuidance) and guidance.avoid > 0 and begin > 0:
            guidance = guidance.remembering(previous.to_float())  # avoidance: away from the earlier rounds' images
    if steer is None:
        targets = None
        labels = np.full(len(idx), -1, dtype=np.int64)
    else:
        outputs = steer.target_outputs
        if c.allocation == "adaptive" and begin > 0:
            prev_targets = target_slots(steer.classes[outputs], previous.labels)
            whole = adaptive_targets(c.seed, begin // round_size(c), min(c.n, begin + round_size(c)) - begin,
                                     len(outputs), previous.images, prev_targets, c.dedup_threshold)
            targets = outputs[whole[start - begin:stop - begin]]
        else:
            targets = outputs[draw_targets(c.seed, idx, len(outputs))]
        labels = steer.classes[targets]
    size = batch_size if isinstance(batch_size, BatchSize) else BatchSize(batch_size or c.batch_size)
    batches = list(sample_batches(
        denoiser, stop - start, seed=c.seed, start=start, scheduler=c.scheduler, steps=c.steps,
        **ddim_settings(c.scheduler, c.eta, True), batch_size=size, guidance=guidance, labels=targets,
        precision=c.precision, device=device, progress=progress, stream=EXTRACTION_STREAM))
    x = torch.cat([images for _, images in batches])
    batch = np.concatenate([np.full(len(images), first, dtype=np.int64) for first, images in batches])
    return {"images": to_uint8(x), "index": idx, "labels": labels, "batch": batch}


def _growth(c: cfg.ExtractConfig, guidance: ClassifierGuidance | MemorizationGuidance | None, denoiser: Denoiser,
            fingerprint_at: Callable[[int], str] | None) -> dict[str, Any]:
    """How an extraction's shard stage is cut and may grow (:func:`~side_extract.runs.shard_stage`'s
    ``fingerprint_at`` and ``round_size``): a method in rounds never grows (its rounds depend on N_G)."""
    rounds = in_rounds(c, guidance, denoiser)
    return {"fingerprint_at": None if rounds else fingerprint_at, "round_size": round_size(c) if rounds else None}


def _inputs(model_fingerprint: str | None, upstream: dict[str, str] | None) -> dict[str, str]:
    """An extraction's inputs as its manifest entry records them: the target and the stage its guidance comes from."""
    return ({} if model_fingerprint is None else {MODEL_INPUT: model_fingerprint}) | (upstream or {})


def planned_extraction(run: RunDir, method: str, denoiser: Denoiser, c: cfg.ExtractConfig,
                       guidance: ClassifierGuidance | MemorizationGuidance | None, fingerprint: str, *,
                       model_fingerprint: str | None = None, upstream: dict[str, str] | None = None,
                       fingerprint_at: Callable[[int], str] | None = None, run_config: cfg.RunConfig | None = None
                       ) -> dict[str, tuple[str, dict[str, str], Callable[[], list[str]]]]:
    """What :func:`extraction_stage` with these arguments would begin (stage -> fingerprint, inputs and a function
    giving the settings changed since the stage's own config.yaml, where ``run_config`` is given; for
    :meth:`~side_extract.runs.RunDir.refuse_before`); empty where it grows a finished stage (never refused)."""
    stage = f"extraction/{method}"
    growth = _growth(c, guidance, denoiser, fingerprint_at)
    if grows_from(run.stage_entry(stage), fingerprint, c.n, **growth) is not None:
        return {}

    def changed() -> list[str]:
        made = run.path / stage / "config.yaml"
        try:
            old = cfg.load_yaml(made) if run_config is not None and made.is_file() else None
        except ValueError:  # a damaged file: the refusal says the rest
            old = None
        return [] if old is None else [
            d for d in cfg.differences(old, cfg.to_dict(run_config), ("model", "extract."))
            if not d.startswith("extract.methods ")]  # (which methods run does not change this one's)

    return {stage: (fingerprint, _inputs(model_fingerprint, upstream), changed)}


def extraction_stage(
    run: RunDir,
    method: str,
    denoiser: Denoiser,
    c: cfg.ExtractConfig,
    guidance: ClassifierGuidance | MemorizationGuidance | None,
    fingerprint: str,
    *,
    model_fingerprint: str | None = None,
    upstream: dict[str, str] | None = None,
    fingerprint_at: Callable[[int], str] | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> ImageSet:
    """Write ``run/extraction/<method>/shard-*.npz`` (skip / resume as the manifest says); the manifest records
    the target's ``model_fingerprint`` and ``upstream`` (the run stage its guidance comes from -> its fingerprint)
    among the stage's inputs. ``fingerprint_at(m)``: the stage's fingerprint
    at N_G = m, with which a finished extraction of fewer generations grows to ``c.n`` (its whole shards kept:
    generation i depends on (seed, i) alone); a method in rounds never grows (its rounds depend on N_G).

    A method whose sampling diverges leaves no shard it made (:func:`_discard_attempt`), and the error names it.
    """

    stage = f"extraction/{method}"
    growth = _growth(c, guidance, denoiser, fingerprint_at)
    rounds = growth["round_size"] is not None
    size = BatchSize(c.batch_size)  # halved on out-of-memory, for the rest of the stage

    def make(lo: int, hi: int, shard_progress: Progress | None) -> dict[str, np.ndarray]:
        begin = round_start(c, lo)
        previous = earlier_rounds(load_shards(run.path / stage), begin) if rounds and begin > 0 else None
        return extract(denoiser, c, guidance, lo, hi, previous=previous, batch_size=size, device=device,
                       progress=shard_progress)

    def stop(end: int) -> dict[str, float] | None:  # dedup-driven stopping, after the round ending at ``end``
        # the rounds up to ``end`` only: on a resumed stage later rounds' shards may already be on disk, and in a
        # launch of several processes another process may be writing the next round
        made = earlier_rounds(load_shards(run.path / stage), end)
        if len(made) != end:
            raise RuntimeError(f"{stage}: {len(made)} of the {end} generations before round end {end} are on disk")
        stops, u = stop_after(made.images, c.dedup_threshold, c.stop_unseen)
        log.info("%s: %d generations, unseen mass %.3f%s", method, end, u, " (stopping)" if stops else "")
        return {"unseen_mass": round(u, 6), "stop_unseen": c.stop_unseen} if stops else None

    inputs = _inputs(model_fingerprint, upstream)
    try:
        return shard_stage(run, stage, fingerprint, c.n, c.shard_size, make, progress=progress, inputs=inputs or None,
                           **growth, stop=stop if c.stop_unseen > 0 else None, method=method,
                           scale=None if guidance is None else guidance.scale, device=str(device))
    except SamplingDiverged as e:
        _discard_attempt(run, stage)
        raise SamplingDiverged(f"method {method}: {e}") from None


def _discard_attempt(run: RunDir, stage: str) -> None:
    """The shards a diverged attempt at ``stage`` left: the stage's folder, or, where it was growing a finished
    stage, the shards past that stage's N (``finished_n``): the finished generations stay, and a rerun at their N
    uses them. (The whole folder went: a growth from 6 to 12 generations that diverged took the finished 6 with it,
    the manifest still saying 6 were finished.)"""
    finished = (run.stage_entry(stage) or {}).get("finished_n")
    if not (isinstance(finished, int) and finished > 0):
        shutil.rmtree(run.path / stage, ignore_errors=True)
        return
    for shard in (run.path / stage).glob("shard-*.npz"):
        index = (read_npz(shard, "index") or {}).get("index")
        if index is None or len(index) == 0 or index.max() >= finished:
            shard.unlink(missing_ok=True)
