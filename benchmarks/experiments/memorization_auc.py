"""Does the target's denoising error flag the synthetic samples that copy a training image? (memorization-aware labels)

For one fair-protocol replicate's synthetic set (the clipped-eps K = 25 form's, `rep-<r>/forms/clip-every-k25`), every
sample is scored by `side_extract.memorization.denoising_error` at several noise levels t (a fraction of T; 4 noise
draws, the library's default), and the score is compared with the truth the audit cannot see: whether the sample's
nearest training image lies at the mid band or closer (pixel RMS distance, the protocol's bands). Prints the ROC AUC
of "low error -> copy" per t and the hit rate among the lowest-error quarter (what `surrogate.memorized_fraction:
0.25` clusters) against the whole set.

    python benchmarks/experiments/memorization_auc.py CACHE/runs/<target>/rep-<r> [FORM]
"""
import sys
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from side_extract import config as cfg
from side_extract.data import load_image_set, load_shards
from side_extract.memorization import denoising_error, memorization_candidates
from side_extract.metrics import read_bands_file
from side_extract.models.target import load_target
from side_extract.neighbors import NearestNeighborIndex, pixel_rows

torch.set_num_threads(1)
rep = Path(sys.argv[1])
form = rep / "forms" / (sys.argv[2] if len(sys.argv) > 2 else "clip-every-k25")
rc = cfg.from_dict(cfg.RunConfig, cfg.load_yaml(form / "config.yaml"))
den = load_target(rc.model)
train = load_image_set(rc.train, rc.train_resize)
mid = {b.name: b for b in read_bands_file(rc.evaluate.bands_file, "rms-l2")}["mid"]
syn = load_shards(form / "synthetic")
nn = NearestNeighborIndex("rms-l2").fit(pixel_rows(train.images)).kneighbors(pixel_rows(syn.images), 1)
hit = mid.reaches(nn.scores[:, 0], "distance")
x0 = syn.to_float()

print(f"Target `{rc.model}`, {len(train)} training images; synthetic set of `{form}` ({len(syn)} samples, "
      f"{int(hit.sum())} at the mid band or closer of a training image, {hit.mean():.3f}); denoising error over 4 "
      f"noise draws, seed {rc.sample.seed}.\n")
print("| t / T | ROC AUC (low error -> copy) | hit rate of the lowest-error quarter | of all |")
print("|---|---|---|---|")
for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7):
    s = denoising_error(den, x0, t, 4, rc.sample.seed)
    q = memorization_candidates(s, 0.25)
    print(f"| {t} | {roc_auc_score(hit, -s):.3f} | {hit[q].mean():.3f} | {hit.mean():.3f} |", flush=True)
