"""Two entries of committed ``side bench fair`` results on the same target and held-out replicates, set against each
other from their ``fair.json`` files alone (no benchmark cache needed): the ratio of replicate means of the distinct
nearest training images at the mid band or closer, with the replicate-spread half of the fair tables' interval
(``bench.intervals.replicate_se``: paired by replicate, t at R - 1 df). The fair tables' interval is the wider of
that and a resampling of each replicate's generations, which needs the runs' per-generation files
(``paired_runs.py``); this one alone can only be narrower or equal.

    python benchmarks/experiments/paired_from_files.py A_FAIR_JSON:ENTRY B_FAIR_JSON:ENTRY [...more pairs] > OUT.md

Each pair is A then B; prints a Markdown table row per pair: A / B.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

from side_extract.bench.intervals import replicate_se

METRIC = "distinct_nn/mid"


def per_replicate(spec: str) -> tuple[str, list[int], int, list[float] | None]:
    path, _, entry = spec.rpartition(":")
    scale = json.loads(Path(path).read_text())["scales"]
    if len(scale) != 1:
        raise SystemExit(f"{path}: holds {len(scale)} scales; expected one")
    scale = scale[0]
    reps = list(scale["heldout"]["replicates"])
    ratios = scale["heldout"]["ratios"]
    for name, r in ratios.items():  # an entry's own values, or the baseline's where it is the baseline
        m = r[METRIC]
        key = "per_replicate" if name == entry else "baseline_per_replicate" if m["best_baseline_method"] == entry else ""
        if key:  # files written before the interval took in the replicates' spread did not record their values
            return scale["target"], reps, int(scale["heldout"]["n_generated"]), m.get(key)
    n = int(scale["heldout"]["n_generated"])  # else the budget curve's counts at N_G (files of this release on)
    last = [p for p in scale["heldout"].get("budget_curve", []) if p["n_generated"] == n]
    counts = last[0]["distinct_mid"].get(entry, {}).get("per_replicate") if last else None
    if counts is None:
        raise SystemExit(f"{path}: no per-replicate {METRIC} for {entry!r}")
    return scale["target"], reps, n, [c / n for c in counts]


def row(a: str, b: str) -> str:
    ta, ra, na, va = per_replicate(a)
    tb, rb, nb, vb = per_replicate(b)
    if ra != rb or na != nb:
        raise SystemExit(f"{a} and {b}: replicates {ra} and {rb} or N_G {na} and {nb} differ")
    # the trained model's own fingerprint where both files recorded it (the same config can train to other weights)
    key = "model_sha256" if all(isinstance(t, dict) and "model_sha256" in t for t in (ta, tb)) else "fingerprint"
    fa, fb = (t.get(key) if isinstance(t, dict) else t for t in (ta, tb))
    same_target = f"same ({fa[:12]})" if fa == fb else f"differ ({fa[:12]} / {fb[:12]})"
    head = f"| `{a}` | `{b}` | {ra[0]}-{ra[-1]} | {same_target} |"
    if va is None or vb is None:
        return head + " - | per-replicate values not recorded in the file |"
    num, den = float(np.mean(va)), float(np.mean(vb))
    counts = f" {na * num:.1f} / {na * den:.1f} of {na:,} |"
    se, df = replicate_se(va, vb)
    if df is None:  # one replicate, or a mean of 0 (a run that reached nothing): no ratio or no spread to bound it
        return head + counts + (f" {num / den:.2f} [—, —] |" if den > 0 else " — |")
    q = float(student_t.ppf(0.975, df))
    ratio = num / den
    lo, hi = ratio * math.exp(-q * se), ratio * math.exp(q * se)
    mark = " ↑" if lo > 1 else " ↓" if hi < 1 else ""
    return head + counts + f" {ratio:.2f} [{lo:.2f}, {hi:.2f}]{mark} |"


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or len(args) % 2:
        raise SystemExit(__doc__)
    print("| A | B | held-out replicates | target | distinct images, means (of N_G) | A / B, replicates' spread (t, 95 %) |")
    print("|---|---|---|---|---|---|")
    for i in range(0, len(args), 2):
        print(row(args[i], args[i + 1]))
