"""Experiment (label-free, beyond the paper): *restarts* at low noise after plain sampling or memorization guidance.

A generation that lands near a memorized training image but outside the copy band is re-noised to a low level t_r and
denoised again with the target (SDEdit / restart sampling, Xu et al. 2023, "Restart Sampling for Improving Generative
Processes"); R such restarts in a row. Low noise keeps the coarse structure, so the generation keeps its nearest
training image, while the target's denoiser pulls it into that image's basin if the target memorized it: the question
is how many near misses become copies (result: few; ``benchmarks/results/experiments/restart-16px-n300.md``).

    python benchmarks/experiments/restart.py CACHE/runs/<target>/rep-<r> N SPECS [SEEDS] [MEMGUIDE_LAMBDA]

SPECS: space-separated ``t_r:R`` (t_r a fraction of T, R restarts; each restart runs the sampler's own timesteps
at or below t_r, DDIM with the replicate's eta and clipped eps). SEEDS: comma-separated extraction seeds (default
the replicate's). MEMGUIDE_LAMBDA: start from memorization guidance at that lambda (its default range) instead of
plain sampling, and guide the restarts too. Restart noise: generation i's own generator seeded by (seed, i, restart)
in its own stream. Prints per seed the distinct training images at the mid band or closer (copies) after 100, 300 and
N generations, then each spec's mean against the start (the fair benchmark's distinct-count interval).
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from replicate import Replicate, ratio_text
from side_extract.bench.intervals import count_ratios
from side_extract.data import to_uint8
from side_extract.memorization import MemorizationGuidance
from side_extract.sampling import (EXTRACTION_STREAM, ddim_settings, denoise_batch, inference_scheduler, sample,
                                   sample_generators)

RESTART_STREAM = 4
torch.set_num_threads(1)
rep_path, n = Path(sys.argv[1]), int(sys.argv[2])
specs = [(float(a), int(b)) for a, b in (s.split(":") for s in sys.argv[3].split())]
replicate = Replicate.load(rep_path)
rc, den = replicate.config, replicate.denoiser
ex = rc.extract
seeds = [int(v) for v in sys.argv[4].split(",")] if len(sys.argv) > 4 else [ex.seed]
mg_lambda = float(sys.argv[5]) if len(sys.argv) > 5 else None
T = den.scheduler.config.num_train_timesteps


def restart(x: torch.Tensor, seed: int, t_r: float, rounds: int, guidance, batch: int = 250) -> torch.Tensor:
    sched = inference_scheduler(den.scheduler, ex.scheduler, ex.steps)
    sched.timesteps = sched.timesteps[sched.timesteps <= t_r * T]
    t0 = int(sched.timesteps[0])
    out = x.clone()
    for r in range(rounds):
        for b0 in range(0, len(x), batch):
            idx = np.arange(b0, min(b0 + batch, len(x)))
            gens = sample_generators(seed * 1000 + r, idx, stream=RESTART_STREAM)
            z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
            xt = sched.add_noise(out[idx], z, torch.full((len(idx),), t0, dtype=torch.long))
            out[idx] = denoise_batch(den, sched, xt, gens, eta=ex.eta, guidance=guidance, ids=torch.as_tensor(idx),
                                     clip_eps=True).clamp(-1, 1)
    return out


print(f"Target `{rc.model}`, {len(replicate.train)} training images; config of `{rep_path.name}` (DDIM {ex.steps} "
      f"steps, eta {ex.eta:g}, clipped eps); seeds {seeds}; start: "
      + ("plain sampling" if mg_lambda is None else f"memorization guidance lambda {mg_lambda:g}") + "\n")
print(f"| seed | restarts t_r:R | n = 100 | n = 300 | n = {n:,} | seconds |")
print("|---|---|---|---|---|---|")
stats: dict[str, list[dict[str, np.ndarray]]] = {}
for seed in seeds:
    t0 = time.time()
    guidance = None if mg_lambda is None else MemorizationGuidance(den, mg_lambda, ex.memguide_t_hi, ex.memguide_t_m, seed)
    x = sample(den, n, seed=seed, scheduler=ex.scheduler, steps=ex.steps, batch_size=250,
               **ddim_settings(ex.scheduler, ex.eta, True), guidance=guidance, stream=EXTRACTION_STREAM)
    for name, (t_r, rounds) in [("start", (0.0, 0)), *((f"{a:g}:{b}", (a, b)) for a, b in specs)]:
        xs = x if rounds == 0 else restart(x, seed, t_r, rounds, guidance)
        near, hit = replicate.copies(to_uint8(xs))
        stats.setdefault(name, []).append({"nn": near.astype(np.int64), "reach/mid": hit})
        cells = [f"{len(set(near[:m][hit[:m]].tolist()))} ({int(hit[:m].sum())} copies)" for m in (100, 300, n)]
        print(f"| {seed} | {name} | " + " | ".join(cells) + f" | {time.time() - t0:.0f} |", flush=True)
        t0 = time.time()
ratios = count_ratios({k: v for k, v in stats.items() if k != "start"}, stats["start"], n_boot=1000)
print(f"\nDistinct training images at the mid band or closer in {n:,} generations, mean over {len(seeds)} seeds, "
      "against the start (95 % interval: iNEXT's assemblage bootstrap standard error around the observed ratio):\n")
for name, r in ratios.items():
    copies = np.mean([s["reach/mid"].mean() for s in stats[name]]) / np.mean([s["reach/mid"].mean() for s in stats["start"]])
    print(f"- {name}: {r['side']:.1f} against {r['uncond']:.1f}: **{ratio_text(r)}**; copies {copies:.2f}x")
