"""Peak memory of `evaluate` as the number of generations grows (not a test).

Evaluates N_G random 8x8 grayscale generations (1 % of them planted copies of training images) against
50,000 random training images with pixel RMS-L2, Carlini n = 50 and Gu, and prints the peak resident set
size of a fresh process per N_G. Peak RSS should stay nearly flat: the scan streams blocks of
query_chunk x ref_chunk scores; what grows with N_G is only the per-generation output (the n = 50 nearest
distances and indices, 800 bytes per generation, and the table).

    python benchmarks/bench_evaluate_memory.py                      # 1k, 10k, 100k vs 50k
    python benchmarks/bench_evaluate_memory.py --sizes 1000 --n-train 5000
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(n_generated: int, n_train: int, backend: str) -> dict:
    import numpy as np

    from side_extract import config as cfg
    from side_extract.data import ImageSet
    from side_extract.evaluation import evaluate

    rng = np.random.default_rng(0)
    train = ImageSet(rng.integers(0, 256, (n_train, 8, 8, 1), dtype=np.uint8))
    gen = rng.integers(0, 256, (n_generated, 8, 8, 1), dtype=np.uint8)
    planted = rng.choice(n_generated, max(1, n_generated // 100), replace=False)
    gen[planted] = train.images[rng.integers(0, n_train, len(planted))]
    c = cfg.EvaluateConfig(bands="low=0.30:0.32,mid=0.2:0.30,high=0:0.2", backend=backend)
    evaluate(ImageSet(gen[:10]), ImageSet(train.images[:100]), c)  # load the libraries before the baseline
    baseline = peak_rss_mb()
    t0 = time.time()
    r = evaluate(ImageSet(gen), train, c)
    return {"n_generated": n_generated, "n_train": n_train, "seconds": round(time.time() - t0, 1),
            "rss_before_mb": round(baseline, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "ams_high": r.ams["high"], "ums_low": r.ums["low"], "carlini": r.carlini.extracted_fraction}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated N_G values")
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(one(a.one, a.n_train, a.backend)))
        return
    print(f"{'N_G':>8} {'N_train':>8} {'seconds':>8} {'RSS before MB':>14} {'peak RSS MB':>12}  AMS high  UMS low")
    for n in (int(v) for v in a.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--n-train", str(a.n_train),
                              "--backend", a.backend], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['n_generated']:>8} {r['n_train']:>8} {r['seconds']:>8} {r['rss_before_mb']:>14} "
              f"{r['peak_rss_mb']:>12}  {r['ams_high']:.4f}    {r['ums_low']:.4f}", flush=True)


if __name__ == "__main__":
    main()
