"""The chain of scripts/gpu-check (demo config, N_G 256, SIDE / Cond / UnCond) on the CPU, for gpu-check.md:
    python benchmarks/results/experiments/gpu_check_cpu_chain.py runs/cpu-chain
Output: gpu_check_cpu_chain.json beside this file (2 threads, 2026-12-04)."""
import dataclasses, json, sys, time
from side_extract.cli.demo import demo_config
from side_extract.pipeline import run_audit
rc = demo_config("demo")
rc = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, n=256))
t0 = time.time()
res = run_audit(sys.argv[1], rc, device="cpu")
print(json.dumps({"seconds": round(time.time() - t0, 1), "metrics": {m: {"ams": v["ams"], "ums": v["ums"]} for m, v in res.metrics.items()}}, indent=1))
