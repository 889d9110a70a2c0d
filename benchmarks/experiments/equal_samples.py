"""SIDE against plain sampling at equal *model samples*: the fair benchmark compares methods at equal N_G (the paper's
and the extraction issue's comparison: distinct training images per generation an auditor checks); SIDE also draws a
synthetic set of N_S samples from the target first. This extends each held-out replicate's UnCond run (the fair
benchmark's own generations 0..N_G-1, read from the cache) with the next generations of the same noise stream
(``extraction.extract``, indices N_G..N_G+extra-1) and counts distinct nearest training images at the mid band or
closer, as the fair tables do, at N_G and at N_G + extra (extra = N_S: equal model samples).

(`side bench fair` now reports the UnCond half of this itself, step 5 of its protocol; this script also counts what
a form's synthetic set reached, from a finished benchmark's cache.)

    python benchmarks/experiments/equal_samples.py CACHE/runs/<target> REPS EXTRA [FORM]

REPS: comma-separated held-out replicates (e.g. 11,12,13). FORM (e.g. mem-k25): also count, for that SIDE form's
held-out run in the cache (``rep-<r>/forms/FORM``: its synthetic set and its generations at the setting the benchmark
chose), the distinct images of its generations, of its synthetic set, and of both together: what the whole audit
showed for its N_S + N_G model samples.
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from replicate import Replicate
from side_extract.data import load_shards
from side_extract.extraction import extract

torch.set_num_threads(1)
root, reps, extra = Path(sys.argv[1]), [int(r) for r in sys.argv[2].split(",")], int(sys.argv[3])
form = sys.argv[4] if len(sys.argv) > 4 else None
rows = []
for r in reps:
    rep = root / f"rep-{r}"
    replicate = Replicate.load(rep)
    rc, den = replicate.config, replicate.denoiser
    cached = load_shards(rep / "extraction" / "uncond")
    n = len(cached)
    k = min(8, n)  # the cache is this stream: regenerate a few and compare
    check = extract(den, rc.extract, None, 0, k)["images"]
    diff = np.abs(check.astype(int) - cached.images[:k].astype(int)).max()
    if diff > 2:
        raise SystemExit(f"rep {r}: regenerated images differ from the cached UnCond run by {diff} uint8 levels")
    t0 = time.time()
    more = extract(den, rc.extract, None, n, n + extra)["images"]
    images = np.concatenate([cached.images, more])
    nearest, hit = replicate.copies(images)
    counts = [len(set(nearest[:m][hit[:m]].tolist())) for m in (n, n + extra)]
    if form:
        found = []
        for part in ("extraction/side", "synthetic"):
            near_f, hit_f = replicate.copies(load_shards(rep / "forms" / form / part).images)
            found.append(set(near_f[hit_f].tolist()))
        counts += [len(found[0]), len(found[1]), len(found[0] | found[1])]
    rows.append(counts)
    print(f"rep {r}: UnCond (eta {rc.extract.eta}) N_G {n}: {counts[0]} distinct; {n + extra}: {counts[1]} distinct "
          f"(extra {extra} generations in {time.time() - t0:.0f} s; first {k} regenerated within {diff} levels)"
          + (f"; {form}: generations {counts[2]}, synthetic set {counts[3]}, both {counts[4]}" if form else ""),
          flush=True)
a = np.array(rows, dtype=float)


def of(num: int, den: int) -> str:
    """The ratio of two columns' means; a dash where the second's is 0 (a run that reached nothing)."""
    return f"{a[:, num].mean() / a[:, den].mean():.2f}" if a[:, den].mean() > 0 else "—"


def cell(col: int) -> str:
    return f"{a[:, col].mean():.1f} [{a[:, col].min():.0f}-{a[:, col].max():.0f}]"


print(f"\nmean over replicates {reps} [min-max]: UnCond at N_G {n}: {cell(0)}; at {n + extra}: {cell(1)}")
if form:
    print(f"{form}: its {n} generations {cell(2)}; its synthetic set {cell(3)}; both {cell(4)}")
    print(f"ratios of means: generations / UnCond at {n}: {of(2, 0)}; generations / UnCond at {n + extra}: {of(2, 1)}; "
          f"generations and synthetic set / UnCond at {n + extra} (equal model samples): {of(4, 1)}")
