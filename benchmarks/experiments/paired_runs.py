"""Two entries of `side bench fair` runs on the same held-out replicates, set against each other with the fair
tables' distinct-count interval (``bench.intervals.count_ratios``: iNEXT's assemblage bootstrap standard error
around the observed ratio). The fair tables set each form against the best *baseline*; this compares two forms (for
example memguide with and without avoidance) that ran in separate fair runs on the same target and cache.

    python benchmarks/experiments/paired_runs.py CACHE/runs/<target> 11,12,13,14,15,16 A B

A and B: ``method`` (the replicate's own run, e.g. ``memguide``) or ``form:method`` (the run of a form,
``rep-<r>/forms/<form>``, e.g. ``memguide-avoid:memguide``). Prints A's and B's mean distinct training images at the
mid band or closer and A / B with its interval.
"""
import sys
from pathlib import Path

from replicate import ratio_text
from side_extract import config as cfg
from side_extract.bench.intervals import count_ratios, per_generation_stats
from side_extract.metrics import read_bands_file
from side_extract.runs import read_json

target, reps, a, b = Path(sys.argv[1]), [int(r) for r in sys.argv[2].split(",")], sys.argv[3], sys.argv[4]


def stats(entry: str) -> list:
    form, _, method = entry.rpartition(":")
    out = []
    for r in reps:
        run = target / f"rep-{r}" / ("forms/" + form if form else "")
        met = read_json(run / "evaluation" / method / "metrics.json")
        rc = cfg.from_dict(cfg.RunConfig, cfg.load_yaml(run / "config.yaml"))  # the fair protocol's fixed bands
        bands = list(read_bands_file(rc.evaluate.bands_file, met["similarity"]))
        out.append(per_generation_stats(run, method, bands, met["orientation"]))
    return out


r = count_ratios({a: stats(a)}, stats(b), n_boot=1000)[a]
print(f"{a}: {r['side']:.1f}, {b}: {r['uncond']:.1f} distinct training images at the mid band or closer (mean over "
      f"replicates {reps}); {a} / {b}: {ratio_text(r)}")
