"""Experiment (issue "Extraction power"): does a different *shape* of guidance spread SIDE's hits over more
distinct training images?

Not library features: none of them beat the plain form by more than the replicate noise (see
benchmarks/results/experiments/guidance-shapes-8px-n300.md), so they stay in this script. It reads one
fair-protocol replicate after `side bench fair --form clip-every-k25=... --form clip-every=...` has run there
(REP = CACHE/runs/<target>/rep-<r>, a *validation* replicate: nothing here is a held-out result): the clipped-eps
synthetic set, its K = 25 and K = 100 clusterings and their every-block classifiers. Each variant makes N_G
generations with the replicate's extraction seeds and targets (`extraction.draw_targets`) and prints the distinct
nearest training images at the mid band or closer (and the hits) among the first 100, 300 and N_G generations:

- `uncond`, `side` (K 25, lambda 3, T 1), each at DDIM eta 0 and eta 1 (the sampler's stochasticity);
- `t_lo`: SIDE's guidance only for t >= 0.3 T (choose the cluster, then let the model finish unguided);
- `capped`: guidance switched off for a sample once p(y | x_t) >= 0.5 (stop pushing once it is in its cluster);
- `coarse-fine`: K 25 guidance for t >= T/2, then the K 100 classifier toward a uniformly drawn fine cluster,
  whose coarse parent is the K 25 cluster holding most of its members;
- `kernel-K`: the exact noise-aware classifier of the synthetic set's empirical distribution (no training):
  log p(y | x_t) = logsumexp_{i in y} -|x_t - sqrt(abar_t) s_i|^2 / (2 (1 - abar_t)) - logsumexp_i (...), the
  synthetic images s_i clustered by K-means into K clusters, guidance for t >= 0.3 T (it diverges below).

    python benchmarks/experiments/guidance_shapes.py CACHE/runs/<target>/rep-1 [N_G]
"""
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

from side_extract import config as cfg
from side_extract.data import load_image_set, load_shards, to_uint8
from side_extract.extraction import draw_targets
from side_extract.guidance import ClassifierGuidance, log_prob_grad
from side_extract.metrics import read_bands_file
from side_extract.models.classifier import load_classifier
from side_extract.models.target import load_target
from side_extract.sampling import sample

torch.set_num_threads(1)
rep = Path(sys.argv[1])
N = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
forms = rep / "forms"
rc = cfg.from_dict(cfg.RunConfig, cfg.load_yaml(forms / "clip-every-k25" / "config.yaml"))
seed = rc.extract.seed
den = load_target(rc.model)
T = den.scheduler.config.num_train_timesteps
abar = den.scheduler.alphas_cumprod.double()
train = load_image_set(rc.train, rc.train_resize)
mid = dict((b.name, b) for b in read_bands_file(rc.evaluate.bands_file, "rms-l2"))["mid"]
tr = train.images.reshape(len(train), -1).astype(np.float64) / 255
coarse = load_classifier(forms / "clip-every-k25" / "classifier")
fine = load_classifier(forms / "clip-every" / "classifier")
ccls, fcls = np.asarray(coarse.arch.classes), np.asarray(fine.arch.classes)


def distinct(images: np.ndarray) -> str:
    x = images.reshape(len(images), -1).astype(np.float64) / 255
    d = np.sqrt(np.maximum((x * x).sum(1)[:, None] + (tr * tr).sum(1)[None] - 2 * x @ tr.T, 0) / x.shape[1])
    nearest, best = d.argmin(1), d.min(1)
    hit = mid.reaches(best, "distance")
    return " ".join(f"{n}: {len(set(nearest[:n][hit[:n]].tolist()))} ({hit[:n].sum()} hits)"
                    for n in sorted({100, 300, N}) if n <= N)


def run(name: str, guidance, targets, eta: float = 0.0) -> None:
    x = sample(den, N, seed=seed, scheduler="ddim", steps=rc.extract.steps, eta=eta, batch_size=100,
               guidance=guidance, labels=None if guidance is None else targets, clip_eps=True)
    print(f"{name:<22} {distinct(to_uint8(x))}", flush=True)


class Capped(ClassifierGuidance):
    def __call__(self, x, t, y):
        if not self.guides_at(t):
            return None
        with torch.no_grad():
            p = torch.softmax(self.classifier(x, t.expand(len(x))).float() / self.temperature, -1)
        keep = (p[torch.arange(len(x)), y] < 0.5).to(x.dtype).view(-1, 1, 1, 1)
        return self.scale * log_prob_grad(self.classifier, x, t, y, self.temperature) * keep


class CoarseFine:
    def __init__(self, parent: np.ndarray, switch: float) -> None:
        self.parent, self.switch = torch.as_tensor(parent), switch
        self.c = ClassifierGuidance(coarse, ccls, 3.0, 1.0, (switch, 1.0), T)
        self.f = ClassifierGuidance(fine, fcls, 3.0, 1.0, (0.0, switch), T)

    def __call__(self, x, t, y):
        return self.c(x, t, self.parent[y]) if float(t) >= self.switch * T else self.f(x, t, y)


class Kernel(torch.nn.Module):
    """Exact p(y | x_t) of the synthetic set's empirical distribution, K-means clusters as classes."""

    def __init__(self, synthetic: np.ndarray, k: int) -> None:
        super().__init__()
        self.s = torch.as_tensor(synthetic.reshape(len(synthetic), -1), dtype=torch.float64) / 127.5 - 1
        self.labels = torch.as_tensor(KMeans(k, n_init=4, random_state=seed).fit(self.s.numpy()).labels_)
        self.k = k

    def forward(self, x, t):
        a = abar[int(t[0])]
        xf = x.reshape(len(x), -1).double()
        d2 = (xf * xf).sum(1, keepdim=True) + a * (self.s * self.s).sum(1)[None] - 2 * a.sqrt() * xf @ self.s.T
        ll = -d2 / (2 * (1 - a))
        m = ll.max(1, keepdim=True).values
        sums = torch.zeros(len(x), self.k, dtype=torch.float64).index_add_(1, self.labels, torch.exp(ll - m))
        return (torch.log(sums.clamp_min(1e-300)) + m).float()


idx = np.arange(N)
tc = draw_targets(seed, idx, len(ccls))
side = ClassifierGuidance(coarse, ccls, 3.0, 1.0, (0.0, 1.0), T)
run("uncond", None, None)
run("uncond eta 1", None, None, eta=1.0)
run("side", side, tc)
run("side eta 1", side, tc, eta=1.0)
run("t_lo 0.3", ClassifierGuidance(coarse, ccls, 3.0, 1.0, (0.3, 1.0), T), tc)
run("capped 0.5", Capped(coarse, ccls, 3.0, 1.0, (0.0, 1.0), T), tc)
lab_c = np.load(forms / "clip-every-k25" / "surrogate" / "labels.npz")["labels"]
lab_f = np.load(forms / "clip-every" / "surrogate" / "labels.npz")["labels"]
parent = np.full(len(fcls), -1)
for j, f in enumerate(fcls):
    members = lab_c[(lab_f == f) & np.isin(lab_c, ccls)]
    if len(members):
        vals, counts = np.unique(members, return_counts=True)
        parent[j] = np.searchsorted(ccls, vals[counts.argmax()])
usable = np.flatnonzero(parent >= 0)
run("coarse-fine", CoarseFine(parent, 0.5), usable[draw_targets(seed, idx, len(usable))])
synthetic = load_shards(forms / "clip-every-k25" / "synthetic").images
for k in (150, 300):
    run(f"kernel-{k}", ClassifierGuidance(Kernel(synthetic, k), np.arange(k), 3.0, 1.0, (0.3, 1.0), T),
        draw_targets(seed, idx, k))
