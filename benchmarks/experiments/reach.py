"""How many training images can a target be made to produce at all? A ceiling for the extraction-power goal.

Plain sampling (the extraction sampler: guided-diffusion's DDIM, clipped eps, eta 1, the extraction's noise
stream) draws N_max generations from a fair-protocol target; each generation's nearest training image (pixel
RMS distance, the protocol's mid band or closer counts as a hit) is recorded. The script prints:

- the distinct training images reached after n = 1,000, 2,000, 5,000, ... generations (the UnCond curve);
- Chao1's lower-bound estimate of how many training images plain sampling reaches with unlimited generations,
  S_obs + f1^2 / (2 f2) (f1, f2: images hit exactly once, twice);
- what a method that spread N_G generations *uniformly* over the S reachable images would reach,
  S (1 - exp(-N_G / S)) (the best any flattening of plain sampling's distribution can do without finding images
  plain sampling never produces), next to UnCond at N_G and the goal's 1.5x.

If that flattening bound is below 1.5x UnCond, a SIDE form can meet the goal only by producing training images
that plain sampling practically never does, not by redistributing its generations over the ones it does.

    python benchmarks/experiments/reach.py CACHE/runs/<target>/rep-<r> N_MAX [N_G] [SEED]
"""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from replicate import Replicate
from side_extract.extraction import extract
from side_extract.sampling import BatchSize

torch.set_num_threads(1)
rep, n_max = Path(sys.argv[1]), int(sys.argv[2])
n_g = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
replicate = Replicate.load(rep)
rc, den, train = replicate.config, replicate.denoiser, replicate.train
uncond = dataclasses.replace(rc.extract, seed=seed, eta=1.0)  # the extraction's sampler and noise stream

nearest, hit = [], []
chunk = 1000
for lo in range(0, n_max, chunk):
    x = extract(den, uncond, None, lo, min(lo + chunk, n_max), batch_size=BatchSize(250))["images"]
    near, copy = replicate.copies(x)
    nearest.append(near)
    hit.append(copy)
    print(f"  {lo + len(x):,} generations", file=sys.stderr, flush=True)
nearest, hit = np.concatenate(nearest), np.concatenate(hit)

print(f"Target `{rc.model}`, {len(train)} training images; UnCond (DDIM eta 1, clipped eps), seed {seed}, "
      f"{n_max:,} generations; hits: nearest training image at the mid band or closer.\n")
print("| generations | distinct training images reached | hits |")
print("|---|---|---|")
for n in sorted({n for n in (1000, 2000, 5000, 10000, 20000, 50000) if n < n_max} | {n_max}):
    print(f"| {n:,} | {len(set(nearest[:n][hit[:n]].tolist()))} | {int(hit[:n].sum())} |")
counts = np.bincount(nearest[hit], minlength=len(train))
s_obs, f1, f2 = int((counts > 0).sum()), int((counts == 1).sum()), int((counts == 2).sum())
chao1 = s_obs + (f1 * f1 / (2 * f2) if f2 else f1 * (f1 - 1) / 2)
u_g = len(set(nearest[:n_g][hit[:n_g]].tolist()))
print(f"\nReached in {n_max:,}: {s_obs} (f1 {f1}, f2 {f2}); Chao1 estimate of the reachable set: {chao1:.0f}.")
for name, s in (("reached set", s_obs), ("Chao1 estimate", chao1)) if s_obs else ():  # (nothing reached: no set)
    print(f"Uniform over the {name} ({s:.0f} images), N_G {n_g:,}: {s * (1 - np.exp(-n_g / s)):.0f} distinct images; "
          f"UnCond at N_G {n_g:,}: {u_g}; the goal (1.5x): {1.5 * u_g:.0f}.")
