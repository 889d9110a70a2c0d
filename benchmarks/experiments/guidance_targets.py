"""Guidance targets at 300 images: does pulling toward the *union* of the likely-memorized clusters (away from the
background label only), or guiding only at high noise, spread the hits over more training images?

For one fair-protocol replicate's memorization-aware form (`rep-<r>/forms/<FORM>`, its synthetic set, labels and
classifier as the benchmark left them), N_G generations (default 1,000; DDIM eta 1, 50 steps, clipped eps, the
extraction's noise stream) per specification, scored against the training set as the protocol does (distinct nearest
training images / hits at the high band and at the mid band or closer). Specifications, space-separated:

- ``uncond``: plain sampling;
- ``drawn,LAMBDA,T[,TLO]``: the library's guidance toward one uniformly drawn non-background cluster per generation,
  guidance on for t >= TLO * T only (default 0: always);
- ``union,LAMBDA,T``: guidance by grad log sum_{k != background} p(k | x_t, t): toward any candidate cluster.

    python benchmarks/experiments/guidance_targets.py CACHE/runs/<target>/rep-<r> FORM 'SPEC ...' [THREADS] [N_G]
"""
import sys, time
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
from side_extract import config as cfg
from side_extract.data import load_image_set, to_uint8
from side_extract.metrics import read_bands_file
from side_extract.models.target import load_target
from side_extract.models.classifier import load_classifier
from side_extract.guidance import ClassifierGuidance
from side_extract.sampling import sample, EXTRACTION_STREAM
from side_extract.extraction import draw_targets
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
rep = Path(sys.argv[1]); N = int(sys.argv[5]) if len(sys.argv) > 5 else 1000
form = rep / "forms" / sys.argv[2]
rc = cfg.from_dict(cfg.RunConfig, cfg.load_yaml(form / "config.yaml"))
den = load_target(rc.model)
train = load_image_set(rc.train, rc.train_resize)
bands = dict((b.name, b) for b in read_bands_file(rc.evaluate.bands_file, "rms-l2"))
tr = train.images.reshape(len(train), -1).astype(np.float64) / 255
def stats(images):
    x = images.reshape(len(images), -1).astype(np.float64) / 255
    d = np.sqrt(np.maximum((x * x).sum(1)[:, None] + (tr * tr).sum(1)[None] - 2 * x @ tr.T, 0) / x.shape[1])
    nearest, best = d.argmin(1), d.min(1)
    out = []
    for b in ("high", "mid"):
        hit = bands[b].reaches(best, "distance")
        out.append(f"{b} {len(set(nearest[hit].tolist()))}/{hit.sum()}")
    return "  ".join(out)
lab = np.load(form / "surrogate" / "labels.npz")
bg = int(lab["background"]) if "background" in lab.files else -1
clf = load_classifier(form / "classifier", "cpu")
classes = np.asarray(clf.arch.classes)
T = den.scheduler.config.num_train_timesteps
tgt_idx = np.flatnonzero(classes != bg)
print("classes", len(classes), "bg", bg, "targets", len(tgt_idx), flush=True)
class Union:
    def __init__(self, lam, temp): self.lam, self.temp = lam, temp
    def guides_at(self, t): return self.lam > 0
    def __call__(self, x, t, y):
        x_in = x.detach().requires_grad_(True)
        tt = t.expand(len(x)) if t.ndim == 0 else t
        logp = F.log_softmax(clf(x_in, tt) / self.temp, -1)
        sel = torch.logsumexp(logp[:, torch.from_numpy(tgt_idx)], -1)
        (g,) = torch.autograd.grad(sel.sum(), x_in)
        return self.lam * g
def gen(guid, targets):
    t0 = time.time()
    x = sample(den, N, seed=rc.extract.seed, steps=50, eta=1.0, batch_size=100, guidance=guid, labels=targets,
               clip_eps=True, stream=EXTRACTION_STREAM)
    return to_uint8(x), time.time() - t0
if "uncond" in sys.argv[3].split():
    im, dt = gen(None, None); print(f"uncond {stats(im)}  ({dt:.0f}s)", flush=True)
for spec in sys.argv[3].split():
    if spec == "uncond": continue
    parts = spec.split(","); mode, lam, temp = parts[0], float(parts[1]), float(parts[2])
    tlo = float(parts[3]) if len(parts) > 3 else 0.0
    if mode == "union":
        im, dt = gen(Union(lam, temp), np.zeros(N, dtype=np.int64))
    else:
        guid = ClassifierGuidance(clf, classes, lam, temp, (tlo, 1.0), T, () if bg < 0 else (bg,))
        targets = guid.target_outputs[draw_targets(rc.extract.seed, np.arange(N), len(guid.target_outputs))]
        im, dt = gen(guid, targets)
    print(f"{mode} lam={lam} T={temp} tlo={tlo}: {stats(im)}  ({dt:.0f}s)", flush=True)
