"""What the stages of one run share (:class:`AuditContext`), the types of the chain, and the small
readers every stage uses (a stage's npz, the training and held-out sets read once per call)."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .. import config as cfg
from ..data import ImageSet, load_image_set
from ..data import absolute_spec as absolute_image_spec
from ..features import extractor_revision
from ..metrics import Similarity, read_bands_file
from ..models.target import (EMBEDDED_TARGETS, Denoiser, check_fits)
from ..runs import (RunDir, file_fingerprint, read_npz)

log = logging.getLogger(__name__)


ProgressFactory = Callable[[str], Callable[[int, int], None] | None]


def no_progress(_name: str) -> None:
    """A :data:`ProgressFactory` that shows nothing."""
    return None


@dataclasses.dataclass
class AuditContext:
    """What the stages of one run share: where, with what, and the fingerprints computed so far."""

    run: RunDir
    rc: cfg.RunConfig
    denoiser: Denoiser
    device: str = "cpu"
    progress: ProgressFactory = no_progress
    fp: dict[str, str] = dataclasses.field(default_factory=dict)
    cache: dict[tuple, np.ndarray] = dataclasses.field(default_factory=dict)  # in-process only (quality features)
    sets: dict[str, ImageSet | None] = dataclasses.field(default_factory=dict)  # the training, held-out set: read once
    fingerprints: dict[int, tuple[ImageSet, str]] = dataclasses.field(default_factory=dict)  # by id, with the set

    def fingerprint(self, images: ImageSet) -> str:
        """``images.fingerprint()``, hashed once per call of the pipeline (every stage and method keys by it)."""
        hit = self.fingerprints.get(id(images))
        if hit is None or hit[0] is not images:  # (the set is held with it: its id is not reused meanwhile)
            hit = self.fingerprints[id(images)] = (images, images.fingerprint())
        return hit[1]


def script_fingerprints(extractor: str | None) -> list[str]:
    """[the file's fingerprint] for a ``torchscript:PATH`` extractor (its settings name only the path), else []."""
    if extractor is None or not extractor.startswith("torchscript:"):
        return []
    return [file_fingerprint(extractor.split(":", 1)[1])]


def extractor_fingerprints(extractor: str | None) -> list[str]:
    """What keys a stage that runs ``extractor`` beside its name: :func:`script_fingerprints`, and the extractor's
    revision where its code has changed what it computes (``features.Entry.revision`` above 1; at 1, nothing, so the
    runs made before stand)."""
    revision = extractor_revision(extractor)
    return [*script_fingerprints(extractor),
            *([f"{extractor.partition(':')[0]} revision {revision}"] if extractor and revision > 1 else [])]


def config_extractor_fingerprints(rc: cfg.RunConfig) -> list[str]:
    """:func:`extractor_fingerprints` of every extractor ``rc`` names (clustering, similarity, sample quality)."""
    names = [rc.features.extractor, Similarity(rc.evaluate.similarity).extractor, *rc.evaluate.quality]
    return [f for name in names for f in extractor_fingerprints(name)]


def _damaged(path: Path, key: str, *, whole: bool = False) -> bool:
    """A finished stage's npz output gone or damaged since (a disk fault, a hand edit): the stage is made again.
    ``key``: the array it must hold; ``whole``: every array it holds is read (a small file whose other arrays the
    stages after it read: a damaged one passed, and failed every later rerun)."""
    arrays = read_npz(path) if whole else read_npz(path, key)
    if arrays is not None and key in arrays:
        return False
    if path.exists():
        log.warning("%s is damaged (it does not read as the stage wrote it): its stage is made again", path)
    return True


def _bands_damaged(path: Path, similarity: str) -> bool:
    """The calibration's bands.json gone, or it or the null.npz beside it damaged since: the stage is made again
    (it only checked that bands.json was there, so a damaged one failed every later run, --force included, until
    deleted by hand, and a damaged null.npz every report)."""
    if not path.exists():
        return True
    null = path.parent / "null.npz"
    try:
        read_bands_file(path, similarity)
    except ValueError:
        damaged: Path | None = path
    else:
        damaged = null if null.exists() and read_npz(null) is None else None
    if damaged is not None:
        log.warning("%s is damaged (it does not read as the stage wrote it): its stage is made again", damaged)
    return damaged is not None


def _stage_npz(path: Path, key: str) -> np.ndarray:
    got = read_npz(path, key)
    if got is None:  # (just written whole: only a disk failing now gets here)
        raise ValueError(f"{str(path)!r} does not read back as it was written (the disk?)")
    return got[key]


def _train_set(ctx: AuditContext) -> ImageSet:
    if ctx.rc.train is None:
        raise ValueError("this stage needs the training set: set 'train' in the run config (e.g. train: digits:100)")
    if "train" not in ctx.sets:  # (read once per call)
        s = load_image_set(ctx.rc.train, ctx.rc.train_resize)
        check_fits(s.shape, ctx.denoiser.sample_shape, f"training images ({ctx.rc.train})")
        ctx.sets["train"] = s
    return ctx.sets["train"]


@dataclasses.dataclass(frozen=True)
class AuditResult:
    run: Path
    extractions: dict[str, ImageSet]
    metrics: dict[str, dict]


Until = Literal["surrogate", "classifier", "extraction", "evaluation"]
UNTIL = ("surrogate", "classifier", "extraction", "evaluation")


def absolute_spec(spec: Any, *, model: bool = False) -> Any:
    """A spec that names a file or folder here, made absolute: a run's config is read again from other working
    directories (``side verify``, ``side report``, :meth:`~side_extract.api.Audit.load` after a ``chdir``), where a
    relative path named nothing. Other specs (``digits:N``, an embedded target, a hub id, an in-memory model's
    description, None) as they are."""
    if model and isinstance(spec, (str, Path)) and str(spec) in EMBEDDED_TARGETS:
        return spec
    return absolute_image_spec(spec)


RECORDED_PATHS = (("model",), ("train",), ("evaluate", "heldout"), ("evaluate", "bands_file"))  # recorded absolute


def absolute_config(d: dict[str, Any]) -> dict[str, Any]:
    """A run config as a dict (a config.yaml's, :func:`config.to_dict`'s) with the paths of :data:`RECORDED_PATHS`
    made absolute (:func:`absolute_spec`), as a run records them (a run made before this release recorded them as
    typed: a rerun from the same folder was told its model had changed)."""
    d = dict(d)
    for *section, key in RECORDED_PATHS:
        holder = d
        for name in section:  # (a copy of each section on the way: the caller's dict is left as it is)
            if not isinstance(holder.get(name), dict):
                break
            holder[name] = holder = dict(holder[name])
        else:
            if key in holder:
                holder[key] = absolute_spec(holder[key], model=key == "model")
    return d


def absolute_paths(rc: cfg.RunConfig) -> cfg.RunConfig:
    """``rc`` with the paths of :data:`RECORDED_PATHS` made absolute, as a run records them."""
    return cfg.from_dict(cfg.RunConfig, absolute_config(cfg.to_dict(rc)))
