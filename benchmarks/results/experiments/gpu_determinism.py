"""GPU check of models.target.reproducible_gradients as sampling uses it. Run it on a CUDA machine from the
repository root:
    python benchmarks/results/experiments/gpu_determinism.py runs/det cuda 256
It writes runs/det/det.json; benchmarks/results/gpu-determinism.json holds the one H200 run.
Reproducibility of guidance gradients through the target on CUDA: three runs whose guidance backpropagates
through the target's UNet (memguide; SIDE with the UNet-feature classifier; SIDE through the denoised estimate),
each made with it. Every generation is made again twice with it (against the stored ones and each other) and
twice with sampling's name for it replaced by a no-op (the code before, against each other)."""
import contextlib, dataclasses, json, sys, time
from pathlib import Path
import numpy as np
import torch
import side_extract.sampling as S
from side_extract.api import Audit
from side_extract.cli.demo import demo_config
from side_extract.pipeline import run_audit

out, device, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
R = dataclasses.replace
base = demo_config("demo")
runs = {
    "memguide": R(base, extract=R(base.extract, n=n, methods=("memguide",))),
    "side-unet": R(base, extract=R(base.extract, n=n, methods=("side",)),
                   classifier=R(base.classifier, backbone="unet")),
    "side-x0hat": R(base, extract=R(base.extract, n=n, methods=("side",)),
                    classifier=R(base.classifier, guidance_input="x0_hat")),
}
fixed = S.reproducible_gradients
report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__, "n": n}
for name, rc in runs.items():
    t0 = time.time()
    run_audit(out / name, rc, device=device)
    method = rc.extract.methods[0]
    a = Audit.load(out / name)
    ids = list(range(n))
    stored = None
    r = {"chain_s": round(time.time() - t0, 1)}
    for label, ctx in (("fixed", fixed), ("before", lambda d: contextlib.nullcontext())):
        S.reproducible_gradients = ctx
        made = []
        for k in range(2):
            t = time.time()
            made.append(a.regenerate(method, ids, device=device).astype(int))
            r[f"{label}_remake{k}_s"] = round(time.time() - t, 2)
        d = np.abs(made[0] - made[1])
        r[f"{label}_remakes_pixels_differing"] = int((d > 0).sum())
        r[f"{label}_remakes_generations_differing"] = int((d.reshape(n, -1) > 0).any(1).sum())
        r[f"{label}_remakes_max_uint8"] = int(d.max())
        if label == "fixed":
            v = a.verify(method, ids, device=device)
            r["fixed_vs_stored_pixels_differing"] = int(sum(c.pixels_differ for c in v))
            r["fixed_vs_stored_generations_differing"] = int(sum(c.pixels_differ > 0 for c in v))
    S.reproducible_gradients = fixed
    report[name] = r
    print(name, json.dumps(r), flush=True)
out.mkdir(parents=True, exist_ok=True)
(out / "det.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
