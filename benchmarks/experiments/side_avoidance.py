"""Experiment (issue "Extraction power", item 4): does the label-free *avoidance* that spreads memorization guidance's
copies (``extract.memguide_avoid``; README "Avoidance") also help a SIDE form?

SIDE guides each generation toward a surrogate cluster drawn uniformly (the paper). Here its N_G generations come in
ROUNDS rounds, and in the window t_lo T <= t <= t_hi T every generation's denoised estimate is also pushed away from
the earlier rounds' outputs, the library's term (``MemorizationGuidance.repulsion`` with scale 0: no memorization
guidance, the avoidance only): Delta_i = eta sum_j exp(-d_ij^2 / (2 h^2)) (x0_i - m_j), added to SIDE's classifier
guidance. The earlier repulsion experiment (``repulsion.py``, 8x8) pushed within a round with a wider kernel and lost;
this is the narrow kernel (h 0.05) that helped memorization guidance at 300 images.

    python benchmarks/experiments/side_avoidance.py RUN N ROUNDS "eta,h,t_lo,t_hi ..."

RUN: a run directory with a trained SIDE classifier (``side extract --run RUN --config CFG``), its config giving the
target, training set, bands, SIDE's lambda and temperature, and the extraction seed. Each grid entry: avoidance eta,
kernel width h, window fractions of T. eta 0 is SIDE itself, the same generations as the run's ``extraction/side``
when N is its N_G (checked). Prints distinct training images at the mid band or closer (and copies) per setting, and
each setting against eta 0 with the fair benchmark's distinct-count interval (one seed: a direction, not a result).
"""
import sys
import time

import numpy as np
import torch

from replicate import Replicate, ratio_text, rounds_arguments
from side_extract.bench.intervals import count_ratios
from side_extract.data import load_shards, to_uint8
from side_extract.extraction import draw_targets
from side_extract.memorization import MemorizationGuidance
from side_extract.pipeline import method_guidance
from side_extract.runs import shard_ranges
from side_extract.sampling import EXTRACTION_STREAM, BatchSize, ddim_settings, sample

torch.set_num_threads(1)
run, n, rounds, grid = rounds_arguments(sys.argv)
rep = Replicate.load(run)
rc, den, ex = rep.config, rep.denoiser, rep.config.extract
side = method_guidance(run, rc, "side", den)[1]  # the run's classifier with its settings, as its extraction used it
targets = side.target_outputs[draw_targets(ex.seed, np.arange(n), len(side.target_outputs))]
by_index = torch.as_tensor(targets)  # (the combined guidance gets indices, not labels)


class WithAvoidance:
    """SIDE's guidance plus the avoidance term. The avoidance is label-free (it takes the generation indices), so the
    sampler passes ids, not labels, and each generation's target cluster is looked up from its index."""

    uses_ids = True

    def __init__(self, avoid: MemorizationGuidance):
        self.avoid, self.scale = avoid, side.scale

    def __call__(self, x, t, y=None, *, ids):
        # (the push is None outside its window and before round 2)
        g, push = side(x, t, by_index[ids.cpu()]), self.avoid(x, t, ids=ids)
        return g if push is None else (push if g is None else g + push)


print(f"Run `{run}`: target `{rc.model}`, {len(rep.train)} training images, SIDE lambda {ex.scale:g}, T "
      f"{ex.temperature:g}, {len(side.target_outputs)} clusters, seed {ex.seed}; N_G {n} in {rounds} rounds.\n")
print("| eta | h | window | distinct mid or closer (copies) | seconds |")
print("|---|---|---|---|---|")
stats = {}
per = n // rounds
for eta, h, t_lo, t_hi in grid:
    t0 = time.time()
    guidance = side if eta == 0 else WithAvoidance(MemorizationGuidance(den, 0.0, ex.memguide_t_hi, ex.memguide_t_m,
                                                                        ex.seed, eta, h, (t_lo, t_hi)))
    outs = []
    # SIDE alone in the pipeline's shards (batches made alike, so its images are the run's); with avoidance in rounds
    ranges = [r[0] for r in shard_ranges(n, per, per)] if eta > 0 else shard_ranges(n, ex.shard_size)[0]
    for lo, hi in ranges:
        outs.append(sample(den, hi - lo, seed=ex.seed, start=lo, scheduler=ex.scheduler, steps=ex.steps,
                           **ddim_settings(ex.scheduler, ex.eta, True), batch_size=BatchSize(ex.batch_size),
                           guidance=guidance, labels=targets[lo:hi] if eta == 0 else None, stream=EXTRACTION_STREAM))
        if eta > 0:
            guidance = WithAvoidance(guidance.avoid.remembering(torch.cat(outs)))
    images = to_uint8(torch.cat(outs))
    if eta == 0 and n == ex.n:  # SIDE alone: the pipeline's own generations
        assert np.array_equal(images, load_shards(run / "extraction" / "side").images), "not the run's SIDE"
    near, hit = rep.copies(images)
    stats[(eta, h, t_lo, t_hi)] = [{"nn": near.astype(np.int64), "reach/mid": hit}]
    print(f"| {eta:g} | {h:g} | {t_lo:g}-{t_hi:g} | {len(set(near[hit].tolist()))} ({int(hit.sum())}) | "
          f"{time.time() - t0:.0f} |", flush=True)
base = next((k for k in stats if k[0] == 0), None)
if base is not None and len(stats) > 1:
    print("\nAgainst SIDE alone on the same seed (iNEXT's assemblage bootstrap standard error around the ratio):\n")
    for k, r in count_ratios({str(k): v for k, v in stats.items() if k != base}, stats[base], n_boot=1000).items():
        print(f"- eta, h, window {k}: {r['side']:.0f} against {r['uncond']:.0f}: {ratio_text(r)}")
