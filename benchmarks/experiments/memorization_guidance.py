"""Label-free *memorization guidance* (the library's ``memguide`` method, ``memorization.MemorizationGuidance``)
on a fair-benchmark replicate, with its time range and reconstruction time free and optionally combined with SIDE.

The memorization score of ``memorization.py`` (the target's denoising error of an image at t_m; lower = likelier a
copy of a training image, the loss / "t-error" membership signal) is differentiable. At every DDIM step with
t <= T_HI * T the guidance steers the sample toward a denoised estimate the target reproduces well:

    x0_hat = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t)
    s(x_t) = mean_pixels (x0_hat(x_m, t_m) - x0_hat)^2,   x_m = sqrt(abar_m) x0_hat + sqrt(1 - abar_m) z
    g = lambda * grad_{x_t} -log s(x_t)

(z: the generation's own probe noise at that step; the gradient runs through both denoiser calls), applied in
guided-diffusion's DDIM order by ``sampling.guided_step`` like any classifier guidance; no synthetic set, no labels,
no training data. The generations use the extraction's sampler and noise stream of the replicate (the same initial
noise as its UnCond run; lambda 0 reproduces it). ``side bench fair --methods memguide,...`` runs the method on the
fair protocol at its configured T_HI and T_M; this script explores those two and the combination with SIDE.

History: the results in ``benchmarks/results/experiments/memorization-guidance-16px-*.md`` were made by the prototype
of this script at commit 10ddc56, whose probe noise was drawn per batch position (seeded by t) rather than per
generation; the library's guidance draws it per generation so that a generation does not depend on its batch.

    python benchmarks/experiments/memorization_guidance.py CACHE/runs/<target>/rep-<r> N LAMBDAS [T_HI] [T_M] [SEEDS] [SIDE_LAMBDA]

LAMBDAS comma-separated (0 = plain sampling); T_HI and T_M: fractions of T (default: the library's
``extract.memguide_t_hi`` and ``memguide_t_m``, 0.2 and 0.1); SEEDS:
comma-separated extraction seeds (default: the replicate's), each a replicate of its own (for this method nothing
else is downstream of the target: no synthetic set, no classifier). Prints one table row per seed and lambda:
distinct training images at the mid band or closer (copies = generations there) after the first 100, 300 and N
generations; with several lambdas including 0, each lambda's mean distinct count over the seeds against plain
sampling's (lambda 0), with the fair benchmark's distinct-count interval (``bench.intervals.count_ratios``).
SIDE_LAMBDA: also guide by the replicate's SIDE classifier (``rep-<r>/classifier``, toward a uniformly drawn kept
cluster per generation, as ``side extract`` draws them) at that scale, the two guidance terms added; lambda 0 is then
SIDE alone (only meaningful with the replicate's own seed: its classifier belongs to it).
"""
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from replicate import Replicate, ratio_text
from side_extract.bench.intervals import count_ratios
from side_extract.data import to_uint8
from side_extract.extraction import draw_targets
from side_extract.guidance import ClassifierGuidance
from side_extract.memorization import MemorizationGuidance
from side_extract.pipeline import method_guidance
from side_extract.sampling import EXTRACTION_STREAM, BatchSize, ddim_settings, sample

torch.set_num_threads(1)
rep, n, lams = Path(sys.argv[1]), int(sys.argv[2]), [float(v) for v in sys.argv[3].split(",")]
replicate = Replicate.load(rep)
t_hi = float(sys.argv[4]) if len(sys.argv) > 4 else replicate.config.extract.memguide_t_hi
t_m_frac = float(sys.argv[5]) if len(sys.argv) > 5 else replicate.config.extract.memguide_t_m
rc, den, train = replicate.config, replicate.denoiser, replicate.train
seeds = [int(v) for v in sys.argv[6].split(",")] if len(sys.argv) > 6 else [rc.extract.seed]
side_lambda = float(sys.argv[7]) if len(sys.argv) > 7 else None


class WithSide:
    """Memorization guidance plus SIDE's classifier guidance toward each generation's drawn cluster
    (``targets[index]``); label-free to the sampler, which gives it the generation indices."""

    uses_ids = True

    def __init__(self, mem: MemorizationGuidance, side: ClassifierGuidance | None, targets: np.ndarray) -> None:
        self.mem, self.side, self.targets = mem, side, torch.as_tensor(targets)
        self.scale = mem.scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: None = None, *, ids: torch.Tensor) -> torch.Tensor | None:
        g = self.mem(x, t, ids=ids)
        if self.side is None:
            return g
        g_side = self.side(x, t, self.targets[ids])
        return g_side if g is None else (g if g_side is None else g + g_side)


ex = rc.extract
print(f"Target `{rc.model}`, {len(train)} training images; config of `{rep.name}` (DDIM {ex.steps} steps, eta {ex.eta:g}, "
      f"clipped eps), extraction seeds {seeds}; guidance at t <= {t_hi:g} T, t_m = {t_m_frac:g} T.\n")
side = None
if side_lambda is not None:
    side = dataclasses.replace(method_guidance(rep, rc, "side", den)[1], scale=side_lambda)  # the run's, at side_lambda
    print(f"With the replicate's SIDE classifier ({len(side.target_outputs)} clusters) at lambda {side_lambda:g}.\n")
print(f"| seed | lambda | n = 100 | n = 300 | n = {n:,} | seconds |")
print("|---|---|---|---|---|---|")
stats: dict[float, list[dict[str, np.ndarray]]] = {lam: [] for lam in lams}
for seed in seeds:
    for lam in lams:
        t0 = time.time()
        targets = np.zeros(n, dtype=np.int64) if side is None else \
            side.target_outputs[draw_targets(seed, np.arange(n), len(side.target_outputs))]
        guidance = WithSide(MemorizationGuidance(den, lam, t_hi, t_m_frac, seed), side, targets)
        x = sample(den, n, seed=seed, start=0, scheduler=ex.scheduler, steps=ex.steps,
                   **ddim_settings(ex.scheduler, ex.eta, True), batch_size=BatchSize(250), guidance=guidance,
                   stream=EXTRACTION_STREAM)
        near, hit = replicate.copies(to_uint8(x))
        stats[lam].append({"nn": near.astype(np.int64), "reach/mid": hit})
        cells = [f"{len(set(near[:m][hit[:m]].tolist()))} ({int(hit[:m].sum())} copies)" for m in (100, 300, n)]
        print(f"| {seed} | {lam:g} | " + " | ".join(cells) + f" | {time.time() - t0:.0f} |", flush=True)
if 0.0 in stats and len(lams) > 1:
    ratios = count_ratios({f"{lam:g}": stats[lam] for lam in lams if lam != 0}, stats[0.0], n_boot=1000)
    print(f"\nDistinct training images at the mid band or closer in {n:,} generations, mean over {len(seeds)} seeds, "
          "against plain sampling (lambda 0) on the same seeds (95 % interval: iNEXT's assemblage bootstrap standard "
          "error around the observed ratio):\n")
    for lam, r in ratios.items():
        copies = np.mean([s["reach/mid"].mean() for s in stats[float(lam)]]) / np.mean([s["reach/mid"].mean() for s in stats[0.0]])
        print(f"- lambda {lam}: {r['side']:.1f} against {r['uncond']:.1f}: **{ratio_text(r)}**; "
              f"copies {copies:.2f}x")
