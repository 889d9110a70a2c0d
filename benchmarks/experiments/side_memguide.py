"""Experiment (issue "Extraction power"): SIDE's classifier guidance combined with label-free memorization guidance and
its avoidance. Does the surrogate-cluster pull add anything to memguide with avoidance, the closest method to the goal
at 300 images (README "Avoidance")?

Each generation i is guided toward its uniformly drawn surrogate cluster (the run's classifier, its temperature and
time range, SIDE_LAMBDA in place of the run's lambda) and, in its last steps, by memorization guidance (MEM_LAMBDA,
the library's ``MemorizationGuidance`` with the run's t_hi and t_m, probe noise keyed by generation index); with
ETA > 0 the N_G generations come in ROUNDS rounds and each round's denoised estimates are pushed away from the earlier
rounds' outputs (the library's avoidance, h 0.05, window 0.2-0.6 T). SIDE_LAMBDA 0 is memguide (with avoidance),
MEM_LAMBDA 0 and ETA 0 is SIDE at SIDE_LAMBDA.

    python benchmarks/experiments/side_memguide.py RUN N ROUNDS "side_lambda,mem_lambda,eta ..."

RUN: a run directory with a trained SIDE classifier (``side extract --run RUN --config CFG``). Prints distinct training
images at the mid band or closer (and copies) per setting, and each setting against the first with the fair
benchmark's distinct-count interval (one seed: a direction, not a result).
"""
import dataclasses
import sys
import time

import numpy as np
import torch

from replicate import Replicate, ratio_text, rounds_arguments
from side_extract.bench.intervals import count_ratios
from side_extract.data import to_uint8
from side_extract.extraction import draw_targets
from side_extract.memorization import MemorizationGuidance
from side_extract.pipeline import method_guidance
from side_extract.runs import shard_ranges
from side_extract.sampling import EXTRACTION_STREAM, BatchSize, ddim_settings, sample

torch.set_num_threads(1)
run, n, rounds, grid = rounds_arguments(sys.argv)
rep = Replicate.load(run)
rc, den, ex = rep.config, rep.denoiser, rep.config.extract
side = method_guidance(run, rc, "side", den)[1]  # the run's classifier with its settings
targets = torch.as_tensor(side.target_outputs[draw_targets(ex.seed, np.arange(n), len(side.target_outputs))])


class Combined:
    """SIDE's pull toward generation i's cluster plus memorization guidance and avoidance; label-free to the
    sampler, which gives it the batch's generation indices (memorization guidance keys its probe noise by them),
    from which the clusters are looked up."""

    uses_ids = True

    def __init__(self, side_g, mem: MemorizationGuidance):
        self.side, self.mem, self.scale = side_g, mem, max(side_g.scale, mem.scale, mem.avoid)

    def __call__(self, x, t, y=None, *, ids):
        g, m = self.side(x, t, targets[ids]), self.mem(x, t, ids=ids)
        return m if g is None else (g if m is None else g + m)

    def remembering(self, images):
        return Combined(self.side, self.mem.remembering(images))


print(f"Run `{run}`: target `{rc.model}`, {len(rep.train)} training images, SIDE temperature {ex.temperature:g}, "
      f"{len(side.target_outputs)} clusters, seed {ex.seed}; memorization guidance at t <= {ex.memguide_t_hi:g} T, "
      f"t_m {ex.memguide_t_m:g} T; N_G {n}, with avoidance in {rounds} rounds.\n")
print("| SIDE lambda | memguide lambda | avoidance eta | distinct mid or closer (copies) | seconds |")
print("|---|---|---|---|---|")
stats = {}
per = n // rounds
for side_lambda, mem_lambda, eta in grid:
    t0 = time.time()
    guidance = Combined(dataclasses.replace(side, scale=side_lambda),
                        MemorizationGuidance(den, mem_lambda, ex.memguide_t_hi, ex.memguide_t_m, ex.seed, eta))
    outs = []
    for lo, hi in ([r[0] for r in shard_ranges(n, per, per)] if eta > 0 else [(0, n)]):
        outs.append(sample(den, hi - lo, seed=ex.seed, start=lo, scheduler=ex.scheduler, steps=ex.steps,
                           **ddim_settings(ex.scheduler, ex.eta, True), batch_size=BatchSize(ex.batch_size),
                           guidance=guidance, stream=EXTRACTION_STREAM))
        if eta > 0:
            guidance = guidance.remembering(torch.cat(outs))
    near, hit = rep.copies(to_uint8(torch.cat(outs)))
    stats[(side_lambda, mem_lambda, eta)] = [{"nn": near.astype(np.int64), "reach/mid": hit}]
    print(f"| {side_lambda:g} | {mem_lambda:g} | {eta:g} | {len(np.unique(near[hit]))} ({int(hit.sum())}) | "
          f"{time.time() - t0:.0f} |", flush=True)
first = next(iter(stats))
if len(stats) > 1:
    print(f"\nAgainst the first setting {first} on the same seed (iNEXT's assemblage bootstrap standard error around "
          "the ratio):\n")
    for k, r in count_ratios({str(k): v for k, v in stats.items() if k != first}, stats[first], n_boot=1000).items():
        print(f"- SIDE lambda, memguide lambda, eta {k}: {r['side']:.0f} against {r['uncond']:.0f}: {ratio_text(r)}")
