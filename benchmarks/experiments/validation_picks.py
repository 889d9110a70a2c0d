"""The headline entry of every committed `side bench fair` result, chosen on the validation replicates
(``bench.protocol.chosen_on_validation``: the entry whose chosen setting scored highest there), beside the entry
with the highest held-out mean, which the README picked by until this release. Reads only the fair.json files.

    python benchmarks/experiments/validation_picks.py benchmarks/results > benchmarks/results/experiments/validation-picks.md

Prints a Markdown table: per file and training-set size, the best SIDE form (and the best label-free entry) chosen
on validation with its validation score and held-out ratio of distinct training images (mid band or closer) to the
best baseline, and the held-out pick with its ratio where it is another entry.
"""
import json
import sys
from pathlib import Path

from side_extract.bench.protocol import chosen_on_validation

root = Path(sys.argv[1])


def cell(r: dict) -> str:
    lo, hi = r["ci95"]
    return "-" if r["ratio"] is None else (f"{r['ratio']:.2f}" + ("" if lo is None or hi is None else
                                                                  f" [{lo:.2f}, {hi:.2f}]"))


rows, differ = [], 0
for f in sorted(root.glob("**/fair.json")):
    d = json.loads(f.read_text())
    for s in d["scales"]:
        for kind, p in chosen_on_validation(d["config"], s).items():
            other = p["heldout_highest"]
            same = other == p["entry"]
            differ += not same
            rows.append(f"| `{f.parent.relative_to(root)}` | {s['n_train']} | {kind.replace('_', '-')} | "
                        f"{p['entry']} ({100 * p['validation']:.2f} %" + (f"; tied: {', '.join(p['tied'])}"
                                                                          if p["tied"] else "")
                        + f") | {cell(p['distinct_nn/mid'])} vs {p['distinct_nn/mid']['best_baseline_method']} | "
                        + ("same" if same else f"**{other}**, {cell(s['heldout']['ratios'][other]['distinct_nn/mid'])}")
                        + " |")
print("# Headline entries chosen on validation, against the held-out pick\n")
print(f"Command: `python benchmarks/experiments/validation_picks.py {root}`. Every committed fair.json under `{root}`; "
      "ratios of distinct training images at the mid band or closer (distinct_nn/mid) to the best baseline, with each "
      "file's own interval (older files: the within-replicate one; their `fair.md` caption says which). The "
      f"validation pick and the held-out pick differ in {differ} of {len(rows)} rows.\n")
print("| file | training images | kind | chosen on validation (its score) | its held-out ratio | highest held-out "
      "mean, where another |")
print("|---|---|---|---|---|---|")
print("\n".join(rows))
