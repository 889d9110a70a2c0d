"""The training images the audit found, across every method: ``RUN/findings.csv`` and ``summary.json``'s
``findings``.

Each method's evaluation names every generation's nearest training image and its score
(``evaluation/<method>/per_generation.npz``). A generation *reaches* a band when its score is at that band or
closer (:meth:`~side_extract.metrics.Band.reaches`: a score in a gap between two bands that do not touch reaches
the farther one). A *finding* is a training image (by its id, as each method's distinct count goes) that is the
nearest one of at least one generation that reaches a band. It records the closest band reached, the best
generation (its method and id; on a tie the first method in the run's order), the closest band each method's
generations reached on it, and how many generations did. Per band the count is the benchmarks' (distinct nearest
training images at that band or closer; for one method alone, ``summary.json``'s ``distinct_nearest_cumulative``),
here of every method together: what the audit as a whole found, the list a data owner acts on. ``only`` counts
the images one method found and no other did: what each method added to the rest. The counts are per generation
made: methods that made other numbers of generations are not set to one budget here.

Every method is read in the bands, similarity and training set of the first evaluated one (the config's first
method); an evaluation made otherwise (``side evaluate --out`` into the run) is left out, with why. The run's
synthetic set (SIDE's first step: samples of the target the audit drew before any method generated) is one more
source, ``synthetic``, last, where the run measured it (``RUN/synthetic-evaluation``): its copies are found
training images too, and with it the counts are per model sample the audit drew.
"""
from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np

from .evaluation import INCOMPARABLE, generation_stats, incomparable
from .metrics import Band, closest_first
from .runs import (SYNTHETIC_EVALUATION, atomic_write_text, evaluated_methods, evaluated_synthetic, generated_source,
                   other_target_evaluations, read_json, read_stages, reference_method)

FILE = "findings.csv"
SYNTHETIC = "synthetic"  # the synthetic set, as a source of the findings


@dataclasses.dataclass(frozen=True)
class Finding:
    """One training image the audit found (see the module docstring)."""

    train_index: int  # its row in the loaded training set (the best generation's nearest)
    train_id: int
    band: str  # the closest band a sample reached on it
    similarity: float  # the best score of a sample on it (by the run's similarity; a distance for rms-l2)
    method: str  # the source of the sample with that score (the first in the run's order on a tie): a method, or
    # ``synthetic``, whose generation_id is then the sample's index in RUN/synthetic (Audit.pairs takes both)
    generation_id: int
    by_method: dict[str, str]  # source -> the closest band its samples reached on it (the sources that did)
    generations: int  # samples of every source whose nearest training image it is, at a band or closer


@dataclasses.dataclass(frozen=True)
class Findings:
    """Every method's findings together; ``found`` closest first."""

    similarity: str
    orientation: str
    bands: tuple[Band, ...]  # closest first
    methods: tuple[str, ...]  # the methods read, in the run's order (then ``synthetic``, the synthetic set)
    generations: dict[str, int]  # generations (samples of the synthetic set) read per method
    left_out: dict[str, str]  # method -> why it was not read
    found: tuple[Finding, ...]

    def _rank(self, band: str) -> int:
        names = [b.name for b in self.bands]
        if band not in names:
            raise ValueError(f"band={band!r} must be one of {', '.join(names)}")
        return names.index(band)

    def _within(self, band_of: str, band: str) -> bool:
        return self._rank(band_of) <= self._rank(band)

    def at(self, band: str) -> list[Finding]:
        """The findings at ``band`` or closer, closest first."""
        self._rank(band)
        return [f for f in self.found if self._within(f.band, band)]

    def count(self, band: str, method: str | None = None) -> int:
        """Distinct training images found at ``band`` or closer: by every method together, or by ``method``."""
        if method is None:
            return len(self.at(band))
        self._check(method, band)
        return sum(1 for f in self.found if method in f.by_method and self._within(f.by_method[method], band))

    def _check(self, method: str, band: str) -> None:
        """A mistyped method or band is an error (a count of 0 read as "found nothing")."""
        if method not in self.methods:
            raise ValueError(f"method={method!r} was not read; read: {', '.join(self.methods)}")
        self._rank(band)

    def only(self, method: str, band: str) -> int:
        """Training images at ``band`` or closer that ``method`` found and no other method did."""
        self._check(method, band)
        return sum(1 for f in self.found
                   if [m for m, b in f.by_method.items() if self._within(b, band)] == [method])

    def to_json(self) -> dict[str, Any]:
        """``summary.json``'s ``findings``: the counts per band (closest first), every method's and each one's alone."""
        names = [b.name for b in self.bands]
        return {"methods": list(self.methods), "generations": self.generations,
                "left_out": self.left_out, "bands": names,
                "distinct_nearest_cumulative": {b: self.count(b) for b in names},
                "only": {m: {b: self.only(m, b) for b in names} for m in self.methods}, "file": FILE}

    def to_csv(self) -> str:
        """One row per finding, closest first: the training image, the closest band and best score with its
        method and generation, the generations on it, and one ``band_by_<method>`` column per method ("" where
        that method's generations did not reach it)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["train_index", "train_id", "band", "similarity", "method", "generation_id", "generations",
                    *(f"band_by_{m}" for m in self.methods)])
        for f in self.found:
            w.writerow([f.train_index, f.train_id, f.band, f"{f.similarity:.6g}", f.method, f.generation_id,
                        f.generations, *(f.by_method.get(m, "") for m in self.methods)])
        return buf.getvalue()


def collect(run: str | Path) -> Findings | None:
    """The findings of every evaluation run directory ``run`` holds (None: it holds none)."""
    dirs, metrics = with_synthetic(run, (d := evaluated_methods(run)), {m: read_json(p / "metrics.json", dict)
                                                                         for m, p in d.items()})
    return from_evaluations(dirs, metrics, not_compared(run, metrics))


def not_compared(run: str | Path, metrics: dict[str, dict[str, Any]], of: tuple[str, ...] = INCOMPARABLE
                 ) -> dict[str, str]:
    """The evaluations of run directory ``run`` (method -> its ``metrics.json``) that are not set against its others,
    each with why: those :func:`~side_extract.evaluation.incomparable` with the run's reference (another training
    set, bands, ...; ``of``: which of those count), and those of another target's generations
    (:func:`~side_extract.runs.other_target_evaluations`). The one rule of the summary, the findings, the report and
    :class:`~side_extract.api.Audit`."""
    other = other_target_evaluations(run)
    return incomparable(metrics, of, reference_method(run, metrics)) | {m: why for m, why in other.items()
                                                                        if m in metrics}


def with_synthetic(run: str | Path, dirs: dict[str, Path], metrics: dict[str, dict[str, Any]]
                   ) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """The methods' evaluations (``dirs``, ``metrics``) and, last, the synthetic set's where the run holds a current
    one (:func:`~side_extract.runs.evaluated_synthetic`) and some method's: ``synthetic`` (``synthetic-set`` where
    an evaluation written into the run took that name)."""
    syn = evaluated_synthetic(run) if dirs else None  # (not alone: the findings are of an evaluated run)
    if syn is None:
        return dirs, metrics
    name = SYNTHETIC if SYNTHETIC not in dirs else "synthetic-set"  # (an evaluation named synthetic: side evaluate)
    return {**dirs, name: syn}, {**metrics, name: read_json(syn / "metrics.json", dict)}


def from_evaluations(dirs: dict[str, Path], metrics: dict[str, dict[str, Any]],
                     apart: dict[str, str] | None = None) -> Findings | None:
    """The findings of the evaluations in ``dirs`` (method -> its folder, in the run's order) with their
    ``metrics.json`` contents (None: no evaluation), but for those in ``apart`` (method -> why: a run's
    :func:`not_compared`; None: :func:`~side_extract.evaluation.incomparable` against the largest group that agree)."""
    if not dirs:
        return None
    left_out = (incomparable(metrics) if apart is None else dict(apart)) | {
        m: "its evaluation has no per_generation.npz" for m, d in dirs.items()
        if not (d / "per_generation.npz").is_file()}
    left_out |= measured_twice({m: d for m, d in dirs.items() if m not in left_out}, metrics)
    methods = tuple(m for m in metrics if m not in left_out)
    # (the bands of one compared: the first evaluation's were taken, though it might be one left out)
    first = metrics[methods[0]] if methods else next(iter(metrics.values()))
    orientation = first["orientation"]
    bands = tuple(Band(b, *first["bands"][b]) for b in closest_first(first["bands"], orientation))
    closer = (lambda a, b: a > b) if orientation == "similarity" else (lambda a, b: a < b)
    rows: dict[int, dict[str, Any]] = {}  # by training id, as each method's distinct count goes
    generations = {}
    for m in methods:
        st = generation_stats(dirs[m], bands, orientation,
                              columns=("similarity", "generation_id", "nearest_train_index"))
        sim = st["similarity"].astype(float)
        generations[m] = len(sim)
        rank = np.full(len(sim), len(bands))
        for i in reversed(range(len(bands))):  # the closest band a generation reaches wins
            rank[st[f"reach/{bands[i].name}"]] = i
        for g in np.flatnonzero(rank < len(bands)):
            r = rows.setdefault(int(st["nn"][g]), {"index": int(st["nearest_train_index"][g]), "rank": int(rank[g]),
                                                   "sim": sim[g], "method": m, "gid": int(st["generation_id"][g]),
                                                   "by": {}, "n": 0})
            r["n"] += 1
            r["by"][m] = min(r["by"].get(m, len(bands)), int(rank[g]))
            r["rank"] = min(r["rank"], int(rank[g]))
            if closer(sim[g], r["sim"]):
                r["sim"], r["method"], r["gid"], r["index"] = sim[g], m, int(st["generation_id"][g]), \
                    int(st["nearest_train_index"][g])
    found = [Finding(r["index"], i, bands[r["rank"]].name, float(r["sim"]), r["method"], r["gid"],
                     {m: bands[k].name for m, k in r["by"].items()}, r["n"]) for i, r in rows.items()]
    sign = -1.0 if orientation == "similarity" else 1.0
    found.sort(key=lambda f: (sign * f.similarity, f.train_id))
    return Findings(first["similarity"], orientation, bands, methods, generations, left_out, tuple(found))


def measured_twice(dirs: dict[str, Path], metrics: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The evaluations in ``dirs`` that measure the same generation files as another one, unchanged (``side
    evaluate --out RUN/evaluation/X`` of the run's own extraction): source -> why it is counted once. Counted twice,
    the total was above the samples drawn and every image they found lost "found by no other". The one named after
    the files' folder (the run's own evaluation of ``extraction/side``: ``side``) is kept, else the first. Equal
    images in other files (two methods whose generations happen to coincide) are two sources, as they are."""
    files: dict[tuple[Path, Any], list[str]] = {}
    stages: dict[Path, dict[str, dict[str, Any]]] = {}
    for m, d in dirs.items():
        run = d.parent if d.name == SYNTHETIC_EVALUATION else d.parent.parent
        if run not in stages:
            stages[run] = read_stages(run)
        # where they lie now (the path recorded is where they lay: a copied or moved run's were other files); none
        # recorded: a set made in memory, the run's extraction
        path = generated_source(run, m, d, metrics[m], stages[run]) or run / "extraction" / m
        files.setdefault((path.resolve(), (metrics[m].get("fingerprints") or {}).get("generated")), []).append(m)
    out = {}
    for (path, _), names in files.items():
        kept = next((m for m in names if m == path.name), names[0])
        out |= {m: f"it measures the same generation files as {kept} ({path}), counted once" for m in names
                if m != kept}
    return out


def write_findings(run: str | Path, findings: Findings | None = None) -> Path | None:
    """``RUN/findings.csv`` (None, and no file, where the run holds no evaluation)."""
    findings = collect(run) if findings is None else findings
    if findings is None:
        return None
    path = Path(run) / FILE
    atomic_write_text(path, findings.to_csv())
    return path


__all__ = ["Finding", "Findings", "collect", "from_evaluations", "measured_twice", "with_synthetic", "write_findings",
           "FILE", "SYNTHETIC"]
