"""How far can a method get that knows only what its synthetic set shows? An upper bound for the extraction goal.

SIDE learns about the target from N_S synthetic samples and then spends N_G generations. This script bounds what
*any* method that steers by what the synthetic set revealed can reach, by granting it two powers no real form has:

1. **Perfect targeting** of every training image the synthetic set reached (its nearest training image at the
   mid band or closer): one generation each, always a hit. That is s generations for s images.
2. **Perfect avoidance**: its other B = N_G - s generations never land on those s images again; they are drawn from
   plain sampling's distribution with those hits taken out (what is left: generations that are no copy at all, and
   copies of images the synthetic set did not reach).

Plain sampling with the extraction's sampler (guided-diffusion's DDIM, eta 1, clipped eps) estimates that
distribution: a stream of N_S + N_MAX generations on a noise stream of its own (seed SEED + replicate, not the
replicate's extraction seed). Let h be the share of copies of unseen images among the stream's generations that are
not copies of a seen image. B generations then hold B * h such copies; a form that also made copies r times likelier
(memorization-aware labels aim at that) would hold B * min(1, r h). The bound takes that many copies of unseen images
in stream order and counts their distinct training images d_r:

    ceiling(r) = s + d_r,   set against UnCond at N_G (the mean over the stream's disjoint windows of N_G).

Two synthetic sets are tried: the replicate's own (``rep-<r>/synthetic``, drawn by the run's synthetic sampler) and
the stream's first N_S generations (the extraction's sampler, which makes more copies); the N_MAX generations after
them are the stream both are measured on.

Beside it, a bound without the synthetic set: N_G generations at plain sampling's copy rate (hits H = N_G times the
stream's share of copies), spread *evenly* over the S training images the stream reached (and over Chao1's estimate
of the reachable set), reach at most S (1 - exp(-H / S)) images; and the copy rate (H / N_G) that even spreading would
need for the goal's 1.5x UnCond, -S ln(1 - 1.5 UnCond / S) / N_G.

If ceiling(1) is below 1.5x UnCond, no form that only redistributes plain sampling's generations over what its
synthetic set shows meets the goal; it must also raise the rate of copies of images the synthetic set missed by the r
at which the ceiling crosses 1.5x.

    python benchmarks/experiments/informed_ceiling.py CACHE/runs/<target> REPS N_MAX [N_G] [SEED] [N_S_PLAIN] [FORM]

REPS: comma-separated replicates of a finished `side bench fair` cache (their config and synthetic set are read).
N_S_PLAIN: the size of the plain-sampling synthetic set (default: the replicate's N_S), to see how the bound grows
with a larger synthetic set. FORM: read a form's sub-run (``rep-<r>/forms/<FORM>``: its config, synthetic set and
sampler) instead of the replicate's own.
"""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from replicate import Replicate
from side_extract.data import load_shards
from side_extract.extraction import extract
from side_extract.sampling import BatchSize

torch.set_num_threads(1)
root, reps, n_max = Path(sys.argv[1]), [int(r) for r in sys.argv[2].split(",")], int(sys.argv[3])
n_g = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 5000
n_s_plain = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] else None
form = sys.argv[7] if len(sys.argv) > 7 else None
if n_max < n_g:
    raise SystemExit(f"N_MAX={n_max} is shorter than N_G={n_g}: UnCond at N_G is measured on the stream's windows "
                     "of N_G")
multipliers = (1.0, 1.1, 1.5, 2.0, 3.0)


def ceilings(seen: set[int], nearest: np.ndarray, hit: np.ndarray) -> tuple[np.ndarray, float, dict[float, int | None]]:
    """The stream's copies of seen images (mask), h, and ceiling(r) for every multiplier r."""
    on_seen = hit & np.isin(nearest, sorted(seen))
    unseen_hits = nearest[hit & ~on_seen]
    h = len(unseen_hits) / int((~on_seen).sum())
    budget = n_g - len(seen)
    out = {}
    for m in multipliers:
        if budget <= 0:  # more seen images than generations: the oracle copies N_G of them
            out[m] = n_g
            continue
        k = round(budget * min(1.0, m * h))
        out[m] = len(seen) + len(set(unseen_hits[:k].tolist())) if k <= len(unseen_hits) else None
    return on_seen, h, out


rows, spreads = [], []
for r in reps:
    replicate = Replicate.load(root / f"rep-{r}" / "forms" / form if form else root / f"rep-{r}")
    rc, den, train = replicate.config, replicate.denoiser, replicate.train
    own = load_shards(replicate.path / "synthetic").images
    n_s = n_s_plain or len(own)
    sampler = dataclasses.replace(rc.extract, seed=seed + r, eta=1.0)
    nearest, hit = [], []
    for lo in range(0, n_s + n_max, 1000):
        x = extract(den, sampler, None, lo, min(lo + 1000, n_s + n_max), batch_size=BatchSize(250))["images"]
        a, b = replicate.copies(x)
        nearest.append(a)
        hit.append(b)
        print(f"  rep {r}: {lo + len(x):,} generations", file=sys.stderr, flush=True)
    nearest, hit = np.concatenate(nearest), np.concatenate(hit)
    s_sets = {"the replicate's": replicate.copies(own), "plain sampling's": (nearest[:n_s], hit[:n_s])}
    nearest, hit = nearest[n_s:], hit[n_s:]
    windows = [len(set(nearest[lo:lo + n_g][hit[lo:lo + n_g]].tolist())) for lo in range(0, n_max - n_g + 1, n_g)]
    uncond = float(np.mean(windows))
    if uncond == 0:  # every bound below is a multiple of it
        raise SystemExit(f"rep {r}: plain sampling reached no training image at the mid band or closer in {n_max:,} "
                         "generations: there is nothing to bound (a target that memorizes nothing, or bands too "
                         "narrow)")
    for name, (s_near, s_hit) in s_sets.items():
        seen = set(s_near[s_hit].tolist())
        on_seen, h, ceil = ceilings(seen, nearest, hit)
        rows.append({"rep": r, "set": name, "n_s": n_s, "copies": int(s_hit.sum()), "seen": len(seen), "uncond": uncond,
                     "windows": windows, "on_seen": on_seen.sum() / max(1, hit.sum()), "h": h, "ceilings": ceil})
    counts = np.bincount(nearest[hit], minlength=len(train))
    s_obs, f1, f2 = int((counts > 0).sum()), int((counts == 1).sum()), int((counts == 2).sum())
    chao1 = s_obs + (f1 * f1 / (2 * f2) if f2 else f1 * (f1 - 1) / 2)
    rate, goal = float(hit.mean()), 1.5 * uncond
    spreads.append({"rep": r, "rate": rate, "uncond": uncond,
                    "cells": [(S, S * (1 - np.exp(-rate * n_g / S)), -S * np.log(1 - goal / S) / n_g if goal < S else None)
                              for S in (s_obs, chao1)]})

print(f"Target `{rc.model}`, {len(train)} training images, N_G {n_g:,}, N_S {n_s:,} (the replicate's: {len(own):,}); streams of {n_max:,} "
      f"plain-sampling generations after the N_S (DDIM eta 1, clipped eps, seed {seed} + replicate); a copy: nearest "
      "training image at the mid band or closer.\n")
print("| replicate | synthetic set | its copies | images it reached, s | UnCond at N_G (windows) | share of the stream's "
      "copies on those s | h | " + " | ".join(f"ceiling r = {m:g}" for m in multipliers) + " |")
print("|---|---|---|---|---|---|---|" + "---|" * len(multipliers))
for w in rows:
    cells = [f"{c} ({c / w['uncond']:.2f}x)" if c is not None else "stream too short" for c in w["ceilings"].values()]
    print(f"| {w['rep']} | {w['set']} | {w['copies']} | {w['seen']} | {w['uncond']:.1f} "
          f"({', '.join(map(str, w['windows']))}) | {w['on_seen']:.2f} | {w['h']:.3f} | " + " | ".join(cells) + " |")
mean_u = np.mean([w["uncond"] for w in spreads])
print(f"\nMean UnCond at N_G {n_g:,}: {mean_u:.1f}; the goal (1.5x): {1.5 * mean_u:.0f}. Mean ceiling over replicates:\n")
for name in ("the replicate's", "plain sampling's"):
    sub = [w for w in rows if w["set"] == name]
    parts = []
    for m in multipliers:
        vals = [w["ceilings"][m] for w in sub]
        if None not in vals:
            parts.append(f"r = {m:g}: {np.mean(vals):.1f} ({np.mean(vals) / mean_u:.2f}x)")
    print(f"- {name} synthetic set: " + "; ".join(parts))

print("\nWithout the synthetic set: plain sampling's copies spread evenly over S images (S: the training images the "
      "stream reached, or Chao1's estimate of the reachable set):\n")
print("| replicate | copy rate | S reached | even spread at that rate | rate needed for 1.5x | S Chao1 | even spread "
      "| rate needed |")
print("|---|---|---|---|---|---|---|---|")
for w in spreads:
    cells = []
    for S, reach_, need in w["cells"]:
        cells += [f"{S:.0f}", f"{reach_:.0f} ({reach_ / w['uncond']:.2f}x)",
                  f"{need:.3f} ({need / w['rate']:.2f}x)" if need is not None else "beyond S"]
    print(f"| {w['rep']} | {w['rate']:.3f} | " + " | ".join(cells) + " |")
