"""Experiment (issue "Extraction power", item 4): repulsion between generations toward the same cluster.

Not a library feature: it lost (see benchmarks/results/experiments/repulsion-8px-n300.md), so it stays a
script. On one fair-protocol replicate (the 8x8, 300-image target of `side bench fair`, replicate 11), it
first runs the best SIDE form of the K sweep (clipped-eps synthetic set, K = 25, classifier with time in
every block, lambda 3, T 1; `run_audit` into OUT/side), then generates N_G = 1,000 in 4 rounds of 250 with
that guidance plus a repulsion term: each sample's denoised estimate x0_hat is pushed away from the earlier
rounds' outputs toward the same cluster and from its batch-mates with the same target,
Delta_i = eta * sum_j k_ij (x0_i - m_j), k_ij = exp(-d_ij^2 / (2 h^2)) with d the pixel RMS distance in
[0, 1], applied as the eps shift that moves x0 by Delta (g = Delta sqrt(abar) / (1 - abar)); eta = 0 is
the plain SIDE form. It prints the distinct training images at each band or closer (x N_G), AMS and Carlini.

    python benchmarks/experiments/repulsion.py CACHE/runs/<target>/rep-11 OUT "0,0.05 0.02,0.05 0.1,0.05 0.1,0.1 1,0.1"
"""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from side_extract import config as cfg
from side_extract.data import ImageSet, load_image_set, load_shards, to_uint8
from side_extract.evaluation import evaluate
from side_extract.extraction import draw_targets
from side_extract.guidance import ClassifierGuidance
from side_extract.models.classifier import load_classifier
from side_extract.models.target import load_target
from side_extract.pipeline import run_audit
from side_extract.runs import read_json
from side_extract.sampling import sample

torch.set_num_threads(1)
rep, out, grid = Path(sys.argv[1]), Path(sys.argv[2]), [tuple(map(float, s.split(","))) for s in sys.argv[3].split()]
N, ROUNDS = 1000, 4
rc = cfg.from_dict(cfg.RunConfig, cfg.load_yaml(rep / "config.yaml"))
rc = dataclasses.replace(
    rc, sample=dataclasses.replace(rc.sample, clip_eps=True),
    surrogate=dataclasses.replace(rc.surrogate, n_clusters=25),
    classifier=dataclasses.replace(rc.classifier, time_blocks="every"),
    extract=dataclasses.replace(rc.extract, methods=("side", "uncond"), n=N, scale=3.0, temperature=1.0),
    evaluate=dataclasses.replace(rc.evaluate, quality=()))
res = run_audit(out / "side", rc)
bands = read_json(out / "side" / "evaluation" / "side" / "metrics.json")["bands"]
band_spec = ",".join(f"{k}={lo}:{hi}" for k, (lo, hi) in bands.items())
d = load_target(rc.model)
clf = load_classifier(out / "side" / "classifier")
base = ClassifierGuidance(clf, np.asarray(clf.arch.classes), 3.0, 1.0, (0.0, 1.0), d.scheduler.config.num_train_timesteps)
abar = d.scheduler.alphas_cumprod
train = load_image_set(rc.train, rc.train_resize)


class Repel:
    def __init__(self, eta: float, h: float) -> None:
        self.eta, self.h, self.memory = eta, h, {}

    def __call__(self, x, t, y):
        g = base(x, t, y)
        if self.eta == 0:
            return g
        ab = abar[int(t)].to(x.dtype)
        with torch.no_grad():
            x0 = ((x - (1 - ab).sqrt() * d(x, t)) / ab.sqrt()).clamp(-1, 1)
            delta = torch.zeros_like(x0)
            for i in range(len(x)):
                lab = int(y[i])
                same = (y == y[i]).nonzero().flatten()
                pts = ([self.memory[lab]] if lab in self.memory else []) + ([x0[same[same != i]]] if len(same) > 1 else [])
                if pts:
                    diff = x0[i:i + 1] - torch.cat(pts)
                    dist = diff.pow(2).flatten(1).mean(1).sqrt() / 2
                    k = torch.exp(-dist.pow(2) / (2 * self.h ** 2))
                    delta[i] = self.eta * (k[:, None, None, None] * diff).sum(0)
            push = delta * ab.sqrt() / (1 - ab)
        return push if g is None else g + push


def show(name, images):
    j = evaluate(ImageSet(images), train, cfg.EvaluateConfig(bands=band_spec, quality=())).to_json()
    print(f"| {name} | " + " | ".join(str(round(j["ums_cumulative"][b] * N)) for b in ("high", "mid", "low"))
          + f" | {100 * j['ams_cumulative']['mid']:.1f} | {100 * j['carlini']['extracted_fraction']:.1f} |", flush=True)


print("| generator | distinct high | distinct mid or closer | distinct low or closer | AMS mid or closer % | Carlini % |")
print("|---|---|---|---|---|---|")
show("uncond (same replicate)", load_shards(out / "side" / "extraction" / "uncond").images)
for eta, h in grid:
    rep_g = Repel(eta, h)
    outs = []
    for r in range(ROUNDS):
        idx = np.arange(r * N // ROUNDS, (r + 1) * N // ROUNDS)
        targets = draw_targets(rc.extract.seed, idx, base.n_classes)
        x = sample(d, len(idx), seed=rc.extract.seed, start=int(idx[0]), steps=rc.extract.steps, batch_size=64,
                   guidance=rep_g, labels=targets, clip_eps=True)
        outs.append(x)
        for lab in np.unique(targets):
            sel = torch.from_numpy(targets == lab)
            rep_g.memory[int(lab)] = torch.cat([rep_g.memory.get(int(lab), x[:0]), x[sel]])
    show(f"SIDE K=25 every + repulsion eta={eta:g}, h={h:g}", to_uint8(torch.cat(outs)))
