"""What a SIDE form adds to another method when an audit splits its generations between them: the distinct
training images (nearest, at the mid band or closer, the fair tables' count) of two methods' held-out generations
together (``side_extract.findings``, the run's ``findings.csv``), set against plain sampling given both halves of
the budget (the fair benchmark's ``uncond-samples`` run: N_G + N_S plain generations on the same replicate).

    python benchmarks/experiments/portfolio.py CACHE/runs/<target> REPS [ref=ENTRY] A+B [A+B ...]

An entry names one run or several joined by +. Each: ``method`` (the replicate's own run, e.g. ``uncond``) or ``form:method`` (a form's run, e.g.
``mem-k25:side``), at the setting the benchmark chose; REPS the held-out replicates. Prints per entry the mean over
replicates, the ratio to plain sampling's N_G + N_S generations with a 95 % interval from resampling the
replicates (their spread), and how many images each part found that no other part did; with ``ref=ENTRY``, also
the ratio to that entry on the same replicates (paired: the same resampled replicates for both).
"""
import sys
from pathlib import Path

import numpy as np

from side_extract.findings import from_evaluations
from side_extract.runs import read_json

target, reps, entries = Path(sys.argv[1]), [int(r) for r in sys.argv[2].split(",")], sys.argv[3:]
ref = entries.pop(0)[4:] if entries and entries[0].startswith("ref=") else None


def folder(r: int, entry: str) -> Path:
    form, _, method = entry.rpartition(":")
    return target / f"rep-{r}" / ("forms/" + form if form else "") / "evaluation" / method


def found(r: int, parts: list[str]):
    dirs = {p: folder(r, p) for p in parts}
    return from_evaluations(dirs, {p: read_json(d / "metrics.json", dict) for p, d in dirs.items()})


base = np.array([found(r, ["uncond-samples:uncond"]).count("mid") for r in reps], dtype=float)
n_base = found(reps[0], ["uncond-samples:uncond"]).generations["uncond-samples:uncond"]
print(f"plain sampling, {n_base} generations: {base.mean():.1f} distinct training images at mid or closer "
      f"(replicates {reps})")
rng = np.random.default_rng(0)
boot = rng.integers(0, len(reps), size=(10000, len(reps)))


def ratio(num: np.ndarray, den: np.ndarray) -> str:
    """num's mean over den's with a 95 % interval from resampling the replicates (the same resamples for both);
    a dash where den's mean is 0 (a run that reached nothing leaves the ratio undefined)."""
    if den.mean() == 0:
        return "—x [—, —]"
    means = den[boot].mean(1)
    lo, hi = np.percentile(num[boot].mean(1)[means > 0] / means[means > 0], [2.5, 97.5])
    return f"{num.mean() / den.mean():.2f}x [{lo:.2f}, {hi:.2f}]"


for entry in entries:
    parts = entry.split("+")
    fs = [found(r, parts) for r in reps]
    both = np.array([f.count("mid") for f in fs], dtype=float)
    n = sum(fs[0].generations.values())
    each = "; ".join(f"{p} {np.mean([f.count('mid', p) for f in fs]):.1f}, {np.mean([f.only(p, 'mid') for f in fs]):.1f}"
                     " of them alone" for p in parts) if len(parts) > 1 else ""
    against = ""
    if ref is not None:
        other = np.array([found(r, ref.split("+")).count("mid") for r in reps], dtype=float)
        against = f"; / {ref} {ratio(both, other)}"
    print(f"{entry} ({n} generations): {both.mean():.1f}{f' together ({each})' if each else ''}; / plain sampling "
          f"{ratio(both, base)}{against}")
