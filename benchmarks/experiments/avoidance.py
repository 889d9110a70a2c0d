"""Experiment (issue "Extraction power", item 4, on top of memorization guidance): label-free *avoidance*.

Memorization guidance (``memguide``) doubles plain sampling's copies at 300 images but piles them up: about 3 copies
per training image reached against plain sampling's 2 (``fair16/memguide-n300``). Spread evenly over the images plain
sampling can reach, the same copies would clear the goal's 1.5x (``informed-ceiling-16px-n300.md``). This script asks
whether the method can spread them without knowing the training set: it generates N_G in R rounds, and in each round
pushes every generation's denoised estimate away from the outputs of the earlier rounds (its own memory; no synthetic
set, no labels, no training data), in the window t_lo T <= t <= t_hi T of the trajectory:

    Delta_i = eta * sum_j k_ij (x0_i - m_j),   k_ij = exp(-d_ij^2 / (2 h^2)),

x0_i the clipped denoised estimate of generation i, m_j an earlier output, d the pixel RMS distance in [0, 1]
units; applied as the guidance that moves x0 by Delta in guided-diffusion's DDIM order
(g = Delta sqrt(abar_t) / (1 - abar_t); ``sampling.guided_step``), added to memorization guidance's own term.
The script first had its own copy of this term; it now runs the library's (``MemorizationGuidance`` with ``avoid``,
``avoid_h``, ``avoid_window`` and ``remembering``), which gives the same generations (checked on seed 1, N 100).
With MEMORY = "copies" only the earlier outputs whose memorization score (``memorization.denoising_error``, the
library's t = 0.2 T, 4 draws; label-free) is below the median of all earlier outputs are avoided. eta = 0 is
memorization guidance itself (lambda > 0) or plain sampling (lambda = 0), the same generations as the library's
``memguide`` / ``uncond`` with that seed: the rounds only change what is pushed away from.

Avoidance is a guidance term, so it can be given to plain sampling too: the grid takes lambda = 0 rows.

    python benchmarks/experiments/avoidance.py CACHE/runs/<target>/rep-<r> N ROUNDS "lam,eta,h,t_lo,t_hi[,memory] ..." [SEEDS]

Each grid entry: memguide lambda, avoidance eta, kernel width h, window fractions t_lo and t_hi of T, and optionally
"all" (default) or "copies". SEEDS: comma-separated extraction seeds (default: the replicate's own). Prints one row per
seed and setting (distinct training images at the mid band or closer, and copies), then, when a "0,0,..." row (plain
sampling) is in the grid, each setting's mean distinct count against it with the fair benchmark's interval.
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from replicate import Replicate, ratio_text
from side_extract.bench.intervals import count_ratios
from side_extract.data import to_uint8
from side_extract.memorization import MemorizationGuidance, denoising_error
from side_extract.sampling import EXTRACTION_STREAM, BatchSize, ddim_settings, sample

torch.set_num_threads(1)
rep_path, n, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
grid = [s.split(",") for s in sys.argv[4].split()]
replicate = Replicate.load(rep_path)
rc, den = replicate.config, replicate.denoiser
seeds = [int(v) for v in sys.argv[5].split(",")] if len(sys.argv) > 5 else [rc.extract.seed]
ex = rc.extract
if n % rounds:
    raise SystemExit(f"N={n} must be a multiple of ROUNDS={rounds}")

print(f"Target `{rc.model}`, {len(replicate.train)} training images; config of `{rep_path.name}` (DDIM {ex.steps} "
      f"steps, eta {ex.eta:g}, clipped eps), N_G {n} in {rounds} rounds; memguide t <= {ex.memguide_t_hi:g} T, "
      f"t_m = {ex.memguide_t_m:g} T.\n")
print("| seed | lambda | eta | h | window | memory | distinct mid or closer (copies) | seconds |")
print("|---|---|---|---|---|---|---|---|")
stats: dict[str, list[dict[str, np.ndarray]]] = {}
for seed in seeds:
    for entry in grid:
        lam, eta, h, t_lo, t_hi = map(float, entry[:5])
        memory_kind = entry[5] if len(entry) > 5 else "all"
        t0 = time.time()
        avoid = (eta, h, (t_lo, t_hi)) if eta > 0 else (0.0,)  # eta 0: the rest of the entry is unused
        guidance = MemorizationGuidance(den, lam, ex.memguide_t_hi, ex.memguide_t_m, seed, *avoid)
        per = n // rounds
        outs, scores = [], []
        for r in range(rounds):
            x = sample(den, per, seed=seed, start=r * per, scheduler=ex.scheduler, steps=ex.steps,
                       **ddim_settings(ex.scheduler, ex.eta, True), batch_size=BatchSize(250), guidance=guidance,
                       stream=EXTRACTION_STREAM)
            outs.append(x)
            if eta > 0 and r < rounds - 1:
                if memory_kind == "copies":
                    scores.append(denoising_error(den, x, seed=seed))
                    allx, s = torch.cat(outs), np.concatenate(scores)
                    guidance = guidance.remembering(allx[torch.as_tensor(s <= np.median(s))])
                else:
                    guidance = guidance.remembering(torch.cat(outs))
        near, hit = replicate.copies(to_uint8(torch.cat(outs)))
        key = ",".join(entry)
        stats.setdefault(key, []).append({"nn": near.astype(np.int64), "reach/mid": hit})
        print(f"| {seed} | {lam:g} | {eta:g} | {h:g} | {t_lo:g}-{t_hi:g} | {memory_kind} | "
              f"{len(set(near[hit].tolist()))} ({int(hit.sum())}) | {time.time() - t0:.0f} |", flush=True)
base = next((k for k in stats if [float(v) for v in k.split(",")[:2]] == [0.0, 0.0]), None)
if base is not None and len(stats) > 1:
    ratios = count_ratios({k: v for k, v in stats.items() if k != base}, stats[base], n_boot=1000)
    print(f"\nDistinct training images at the mid band or closer in {n:,} generations, mean over {len(seeds)} seeds, "
          "against plain sampling on the same seeds (95 % interval: iNEXT's assemblage bootstrap standard error "
          "around the observed ratio):\n")
    for k, r in ratios.items():
        print(f"- {k}: {r['side']:.1f} against {r['uncond']:.1f}: **{ratio_text(r)}**")
