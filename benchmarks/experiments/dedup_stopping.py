"""Experiment (label-free, beyond the paper): *dedup-driven stopping* (``extract.stop_unseen``), measured.

A method generates in rounds and stops after the first round at which the Good-Turing estimate of the chance that
its next generation is a new image (its own generations grouped into near-duplicates, no training data) falls below
a threshold. The question is what an audit gives up for the budget it saves: for each threshold, where each method
stopped, how many distinct training images (mid band or closer) it had reached by then, and how many the same
method reaches with the whole budget (``benchmarks/results/experiments/dedup-stopping-*.md``).

    python benchmarks/experiments/dedup_stopping.py MODEL TRAIN N ROUNDS THRESHOLDS METHODS SEEDS OUT [DEDUP]

MODEL: a diffusers directory or an embedded target (``demo``, ``demo-1000``); TRAIN its training set (``digits:100``);
N the budget N_G; ROUNDS rounds of N / ROUNDS generations (one shard each, batches of 50, so that a stopped run's
generations are the unstopped run's first ones bit for bit, which the script checks); THRESHOLDS, METHODS (label-free
ones: ``uncond``, ``memguide``) and SEEDS comma-separated; OUT a folder for the run directories; DEDUP the
near-duplicate distance (``extract.dedup_threshold``, pixel RMS; default the library's 0.05). Every other setting is
the library's default (DDIM eta 1, memguide lambda 100), so this measures the policy as an audit would use it.
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from side_extract import config as cfg
from side_extract.bench.intervals import distinct_count, per_generation_stats
from side_extract.metrics import read_bands_file
from side_extract.pipeline import run_audit
from side_extract.runs import read_json

torch.set_num_threads(1)
model, train, n, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
thresholds = [float(v) for v in sys.argv[5].split(",")]
methods = sys.argv[6].split(",")
seeds = [int(v) for v in sys.argv[7].split(",")]
out = Path(sys.argv[8])
dedup = float(sys.argv[9]) if len(sys.argv) > 9 else cfg.ExtractConfig.dedup_threshold
if n % rounds or (n // rounds) % 50:
    raise SystemExit(f"N={n} must be ROUNDS={rounds} rounds of a multiple of 50 generations")


def config(method: str, seed: int, stop: float) -> cfg.RunConfig:
    ex = cfg.ExtractConfig(methods=(method,), n=n, seed=seed, rounds=rounds, shard_size=n // rounds, batch_size=50,
                           stop_unseen=stop, dedup_threshold=dedup)
    return cfg.RunConfig(model=model, train=train, extract=ex)


def distinct_curve(run: Path, method: str) -> np.ndarray:
    """Distinct training images at the mid band or closer in the first k generations, k = 1 .. made."""
    metrics = read_json(run / "evaluation" / method / "metrics.json")
    bands = list(read_bands_file(run / "evaluation" / "bands.json", metrics["similarity"]))
    stats = per_generation_stats(run, method, bands, metrics["orientation"])
    reach = stats["reach/mid"]
    return np.array([distinct_count({"nn": stats["nn"][:k], "reach/mid": reach[:k]}) for k in
                     range(1, len(reach) + 1)])


rows = []
t_start = time.time()
for method in methods:
    for seed in seeds:
        full_run = out / f"{method}-s{seed}-full"
        t0 = time.time()
        full = run_audit(full_run, config(method, seed, 0.0))
        full_s = time.time() - t0
        curve = distinct_curve(full_run, method)
        for stop in thresholds:
            run = out / f"{method}-s{seed}-stop{stop:g}"
            t0 = time.time()
            res = run_audit(run, config(method, seed, stop))
            secs = time.time() - t0
            made = len(res.extractions[method])
            assert np.array_equal(res.extractions[method].images, full.extractions[method].images[:made]), \
                "a stopped run's generations are the whole run's first ones"
            entry = read_json(run / "manifest.json")["stages"][f"extraction/{method}"]
            got = distinct_curve(run, method)[-1]
            assert got == curve[made - 1], (got, curve[made - 1])
            rows.append((method, seed, stop, made, entry.get("unseen_mass"), got, curve[-1], secs, full_s))
            print(rows[-1], flush=True)

lines = [f"# Dedup-driven stopping on `{model}` ({train}), N_G {n} in {rounds} rounds, near-duplicates below {dedup:g}",
         "",
         "Command: `python benchmarks/experiments/dedup_stopping.py " + " ".join(sys.argv[1:]) + "` "
         f"({time.time() - t_start:.0f} s, one thread; library defaults otherwise: DDIM 50 steps, eta 1, memguide "
         "lambda 100). Distinct: training images reached at the mid band or closer (bands calibrated on held-out "
         "digits). A stopped run's generations are the whole run's first ones, bit for bit (checked), so 'whole "
         "budget' is the same run continued to N_G.", "",
         "| method | seed | stop_unseen | generations made | unseen mass at the stop | distinct when stopped | "
         "distinct with the whole budget | budget spent | distinct kept |", "|---|---|---|---|---|---|---|---|---|"]
for method, seed, stop, made, u, got, whole, _, _ in rows:
    lines.append(f"| {method} | {seed} | {stop:g} | {made} | {'-' if u is None else f'{u:.3f}'} | {got} | {whole} | "
                 f"{made / n:.0%} | {got / whole:.0%} |" if whole else f"| {method} | {seed} | {stop:g} | {made} | - | "
                 f"{got} | 0 | {made / n:.0%} | - |")
lines.append("")
for method in methods:
    for stop in thresholds:
        sel = [r for r in rows if r[0] == method and r[2] == stop]
        lines.append(f"- {method}, stop_unseen {stop:g}: mean budget spent {np.mean([r[3] for r in sel]) / n:.0%}, "
                     f"distinct kept {sum(r[5] for r in sel)} of {sum(r[6] for r in sel)} over seeds {seeds}.")
path = out / f"dedup-stopping-{Path(model).name}{'' if len(sys.argv) <= 9 else f'-dedup{dedup:g}'}.md"
path.write_text("\n".join(lines) + "\n")
print(path)
