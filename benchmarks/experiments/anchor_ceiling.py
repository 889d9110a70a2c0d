"""How far can a SIDE form get when memorization guidance does the rest? A second upper bound for the extraction goal.

``informed_ceiling.py`` bounds a method that steers by what its synthetic set revealed and spends its other
generations like plain sampling. Memorization guidance (``memguide``) now makes about twice plain sampling's copies,
so the question is whether SIDE's targeting adds anything on top of it. This script grants a form **perfect
targeting**: A generations, one per chosen synthetic sample ("anchor"), each landing exactly on the anchor's nearest
training image when the anchor is a copy of one (mid band or closer); its other N_G - A generations are the first
N_G - A of memorization guidance (or of plain sampling) on the replicate's extraction noise. It counts the distinct
training images of the union. Anchors are chosen two ways:

1. **label-free**: the A synthetic samples with the lowest memorization score (``memorization.denoising_error`` at
   the run's ``surrogate.memorization_t``, ``memorization_draws`` draws), what a form can know without training data;
2. **oracle**: every synthetic sample that *is* a copy, one anchor per training image reached (needs the training
   set, which no audit method has): A = s, the images the synthetic set reached.

The synthetic set is N_S samples of the extraction's sampler (guided-diffusion's DDIM at the run's eta, clipped eps)
on the replicate's synthetic seed and stream: the synthetic set that makes the most copies
(``informed-ceiling-16px-*.md``). Real forms target clusters through a classifier, not single images, and do far
worse than perfect targeting; so a ceiling below the goal rules out every SIDE form built on this synthetic set and
memorization guidance.

    python benchmarks/experiments/anchor_ceiling.py CACHE/runs/<target> REPS [N_S] [LAMBDA] [ANCHORS]

REPS: comma-separated replicates of a `side bench fair` cache (their config is read; the script draws its own
samples). LAMBDA: memorization guidance's scale (default 30, what `side bench fair` chose at 300 images), at the run's
``extract.memguide_t_hi`` / ``_t_m``. ANCHORS: comma-separated A (default 50,100,200,300,400).
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from replicate import Replicate
from side_extract.data import to_uint8
from side_extract.memorization import MemorizationGuidance, denoising_error
from side_extract.sampling import EXTRACTION_STREAM, SYNTHETIC_STREAM, ddim_settings, sample

torch.set_num_threads(1)
cache, reps = Path(sys.argv[1]), [int(v) for v in sys.argv[2].split(",")]
n_s = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
lam = float(sys.argv[4]) if len(sys.argv) > 4 else 30.0
anchors = [int(v) for v in sys.argv[5].split(",")] if len(sys.argv) > 5 else [50, 100, 200, 300, 400]


def reached(near: np.ndarray, hit: np.ndarray) -> set[int]:
    return set(near[hit].tolist())


rows: dict[str, list[int]] = {}
for r in reps:
    t0 = time.time()
    rep = Replicate.load(cache / f"rep-{r}")
    rc, den = rep.config, rep.denoiser
    ex, mem = rc.extract, rc.surrogate
    n = ex.n
    common = dict(steps=ex.steps, scheduler=ex.scheduler, batch_size=ex.batch_size,
                  **ddim_settings(ex.scheduler, ex.eta, True))
    syn = sample(den, n_s, seed=rc.sample.seed, stream=SYNTHETIC_STREAM, **common)
    score = denoising_error(den, syn, mem.memorization_t, mem.memorization_draws, rc.sample.seed)
    gen = {"uncond": sample(den, n, seed=ex.seed, stream=EXTRACTION_STREAM, **common),
           "memguide": sample(den, n, seed=ex.seed, stream=EXTRACTION_STREAM,
                              guidance=MemorizationGuidance(den, lam, ex.memguide_t_hi, ex.memguide_t_m, ex.seed),
                              **common)}
    s_near, s_hit = rep.copies(to_uint8(syn))
    found = {k: rep.copies(to_uint8(x)) for k, x in gen.items()}

    def rest(kind: str, m: int) -> set[int]:
        near, hit = found[kind]
        return reached(near[:m], hit[:m])

    oracle = reached(s_near, s_hit)
    order = np.argsort(score, kind="stable")
    cells = {"uncond": len(rest("uncond", n)), f"memguide (lambda {lam:g})": len(rest("memguide", n))}
    for kind in ("memguide", "uncond"):
        for a in anchors:
            pick = order[:a]
            cells[f"{a} label-free anchors + {kind}"] = len(reached(s_near[pick], s_hit[pick]) | rest(kind, n - a))
        cells[f"oracle anchors (A = s) + {kind}"] = len(oracle | rest(kind, n - len(oracle)))
    print(f"replicate {r}: {len(rep.train)} training images, N_S {n_s}, N_G {n}; the synthetic set reached s = "
          f"{len(oracle)} images with {int(s_hit.sum())} copies; {time.time() - t0:.0f} s", flush=True)
    for k, v in cells.items():
        rows.setdefault(k, []).append(v)

base = np.mean(rows["uncond"])
print("\n| generator (N_G generations) | distinct training images, mid or closer: "
      + ", ".join(f"rep {r}" for r in reps) + " | mean | x UnCond |")
print("|---|---|---|---|")
for k, v in rows.items():
    print(f"| {k} | {', '.join(map(str, v))} | {np.mean(v):.1f} | "
          + (f"{np.mean(v) / base:.2f}x |" if base > 0 else "— (plain sampling reached nothing) |"))
