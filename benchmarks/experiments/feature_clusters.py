"""Which feature space clusters synthetic samples by the training image they copy? (``features.extractor``)

SIDE's surrogate labels are K-means clusters of the synthetic set in a feature space; a cluster is useful when
its members copy the same training image. For an embedded target this draws ``N`` unguided synthetic samples
(the library's sampler and defaults, seeds ``SEEDS``), finds each one's nearest training image (pixel RMS), and
clusters the samples in every built-in feature space with the library's ``ClusterLabeler`` (cosine K-means, K
clusters, no cohesion filter). Prints the adjusted Rand index between the clusters and the nearest-training-image
ids (1 = the clusters are exactly "which image it copies", 0 = chance), per seed and feature space, the share of
samples within 0.05 pixel RMS of their nearest training image (near-exact copies) and how many distinct training
images are nearest to some sample.

    python benchmarks/experiments/feature_clusters.py TARGET N K SEEDS

TARGET: an embedded target (``demo``: 100 images, most samples copies; ``demo-1000``: 1,000 images, few), its
training set ``digits:100`` / ``digits:1000``.
"""
import sys
import time

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from side_extract.data import ImageSet, load_image_set
from side_extract.features import EXTRACTORS, extract_features
from side_extract.models.target import load_target
from side_extract.neighbors import NearestNeighborIndex, pixel_rows
from side_extract.sampling import sample
from side_extract.surrogate import ClusterLabeler

TRAIN = {"demo": "digits:100", "demo-1000": "digits:1000"}
if len(sys.argv) != 5 or sys.argv[1] not in TRAIN:
    raise SystemExit(__doc__)
COPY = 0.05  # pixel RMS in [0, 1]

torch.set_num_threads(1)
target, n, k, seeds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [int(s) for s in sys.argv[4].split(",")]
den = load_target(target)
train = load_image_set(TRAIN[target])
spaces = [name for name, e in EXTRACTORS.items() if name != "torchscript"]
print(f"Target `{target}` ({len(train)} training images); {n} unguided samples per seed (DDIM 50 steps, eps from the "
      f"clipped x0, the library's sampler), K = {k}; adjusted Rand index of the clusters against each sample's "
      f"nearest training image.\n")
print("| seed | near-exact copies (nearest RMS < 0.05) | distinct nearest images | " + " | ".join(f"`{s}`" for s in spaces) + " |")
print("|---|---|---|" + "---|" * len(spaces))
scores: dict[str, list[float]] = {s: [] for s in spaces}
t0 = time.time()
for seed in seeds:
    x = sample(den, n, seed=seed, clip_eps=True)
    u8 = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    syn = ImageSet(u8, np.arange(n))
    nn = NearestNeighborIndex("rms-l2").fit(pixel_rows(train.images)).kneighbors(pixel_rows(u8), 1)
    nearest, dist = nn.indices[:, 0], nn.scores[:, 0]
    row = []
    for s in spaces:
        f = extract_features(s, syn, model=den)
        lab = ClusterLabeler(n_clusters=k, tau=-1.0, min_size=1, random_state=seed).fit(f).cluster_
        scores[s].append(adjusted_rand_score(nearest, lab))
        row.append(f"{scores[s][-1]:.2f}")
    print(f"| {seed} | {np.mean(dist < COPY):.2f} | {len(np.unique(nearest))} | " + " | ".join(row) + " |")
print("| mean [min-max] | | | " + " | ".join(f"{np.mean(v):.2f} [{min(v):.2f}-{max(v):.2f}]" for v in scores.values())
      + " |")
print(f"\n{time.time() - t0:.0f} s on one thread.")
