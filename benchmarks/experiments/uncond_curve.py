"""How many distinct training images plain sampling reaches as N_G grows, and how often the synthetic set's
sampler (diffusers' DDIMPipeline, unclipped eps) copies, against the extraction sampler (guided-diffusion's
DDIM, eps from the clipped x0); from the fair protocol's cached replicates.

    python benchmarks/experiments/uncond_curve.py CACHE/runs/<target> 11,12,13 1,2,11,12,13
"""
import sys
from pathlib import Path

import numpy as np

from side_extract import config as cfg
from side_extract.data import ImageSet, load_image_set, load_shards
from side_extract.evaluation import evaluate
from side_extract.runs import read_json

root, unc_reps, syn_reps = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(",")
rc = cfg.from_dict(cfg.RunConfig, cfg.load_yaml(root / f"rep-{unc_reps[0]}" / "config.yaml"))
train = load_image_set(rc.train, rc.train_resize)
bands = read_json(root / f"rep-{unc_reps[0]}" / "evaluation" / "uncond" / "metrics.json")["bands"]
c = cfg.EvaluateConfig(bands=",".join(f"{k}={lo}:{hi}" for k, (lo, hi) in bands.items()), quality=())
sets = {"synthetic set (DDIMPipeline, unclipped eps)": np.concatenate(
            [load_shards(root / f"rep-{r}" / "synthetic").images for r in syn_reps]),
        "UnCond extraction (clipped eps)": np.concatenate(
            [load_shards(root / f"rep-{r}" / "extraction" / "uncond").images for r in unc_reps])}
print("| sampler | N | distinct high | distinct mid or closer | distinct low or closer | AMS mid or closer % |")
print("|---|---|---|---|---|---|")
for name, a in sets.items():
    for n in sorted({1000, 2000, 3000, len(a)}):
        if n <= len(a):
            j = evaluate(ImageSet(a[:n]), train, c).to_json()
            u = j["ums_cumulative"]
            print(f"| {name} | {n:,} | {round(u['high'] * n)} | {round(u['mid'] * n)} | {round(u['low'] * n)} | "
                  f"{100 * j['ams_cumulative']['mid']:.1f} |", flush=True)
