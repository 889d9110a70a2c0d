"""What the experiment scripts share: a `side bench fair` replicate's run config, target, training set, and the copy
test every fair table counts with (nearest training image by the evaluation's exact RMS-L2 search; a copy when it
is at the calibrated mid band or closer). The scripts read cached runs outside the pipeline; this keeps them on one
definition of a copy.

    from replicate import Replicate   # the scripts run as `python benchmarks/experiments/<script>.py`
    rep = Replicate.load(CACHE / "runs" / target / "rep-11")
    nearest, copy = rep.copies(images)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from side_extract import config as cfg
from side_extract.data import ImageSet, load_image_set
from side_extract.metrics import Band, read_bands_file
from side_extract.models.target import Denoiser, load_target
from side_extract.neighbors import NearestNeighborIndex, pixel_rows


@dataclasses.dataclass(frozen=True)
class Replicate:
    path: Path
    config: cfg.RunConfig
    denoiser: Denoiser
    train: ImageSet
    mid: Band
    index: NearestNeighborIndex

    @classmethod
    def load(cls, path: Path) -> Replicate:
        rc = cfg.from_dict(cfg.RunConfig, cfg.load_yaml(path / "config.yaml"))
        train = load_image_set(rc.train, rc.train_resize)
        mid = {b.name: b for b in read_bands_file(rc.evaluate.bands_file, "rms-l2")}["mid"]
        return cls(path, rc, load_target(rc.model), train, mid,
                   NearestNeighborIndex("rms-l2").fit(pixel_rows(train.images)))  # the evaluation's exact search

    def copies(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each image's nearest training image and whether it is at the mid band or closer (uint8 images)."""
        nn = self.index.kneighbors(pixel_rows(images), 1)
        return nn.indices[:, 0], self.mid.reaches(nn.scores[:, 0], "distance")


def ratio_text(r: dict) -> str:
    """``0.90x [0.78, 1.04]`` of a ``count_ratios`` row; a dash for what a run that reached no training image leaves
    undefined (the ratio against such a base, the upper bound of its own interval)."""
    lo, hi = r["ci95"]
    return "{}x [{}, {}]".format(*("—" if v is None else f"{v:.2f}" for v in (r["ratio"], lo, hi)))


def rounds_arguments(argv: list[str]) -> tuple[Path, int, int, list[tuple[float, ...]]]:
    """``RUN N ROUNDS "a,b,... a,b,..."`` of the scripts that generate in rounds: the run, N_G, the rounds (N must be a
    multiple of them) and the grid of comma-separated settings."""
    run, n, rounds = Path(argv[1]), int(argv[2]), int(argv[3])
    if n % rounds:
        raise SystemExit(f"N={n} must be a multiple of ROUNDS={rounds}")
    return run, n, rounds, [tuple(map(float, s.split(","))) for s in argv[4].split()]
