"""Re-state committed ``side bench fair`` results under session 40's interval rule, from the files alone.

Until session 40 a fair-bench interval was ``ratio * exp(+-q se)`` with ``se`` the larger of the resampling's and the
replicates' standard errors and ``q`` Student's t (R - 1 df) only where the replicates' was the larger, else 1.96: a
resampling error just above the replicates' shrank the interval below the replicates' own t interval (by more than
half at three replicates), and marked ratios ↑/↓ that the replicates alone did not bound away from 1. Now the
half-width is the wider of the two, t times the replicates' and 1.96 times the resampling's
(``bench.intervals.spread_interval``).

Every interval of such a file can be made again exactly without its runs: where the old quantile was t the new
half-width is the same (1.96 times the smaller error is below t times the larger); where it was 1.96 the old
half-width *is* 1.96 times the resampling's error. So the new half-width is the wider of the old one and t times
the replicates' standard error, computed from the per-replicate values the file records. Files written before the
replicates' spread was taken in (another ``interval_method``) are left as they are.

    python benchmarks/reinterval.py benchmarks/results        # rewrites fair.json and fair.md, prints each change
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from side_extract.bench.intervals import INTERVAL_METHOD, spread_interval
from side_extract.bench.protocol import render_fair_markdown
from side_extract.runs import atomic_write_json, atomic_write_text, read_json

OLD_METHOD = ("log ratio of replicate means, t with R - 1 df; SE the larger of the replicates' (paired delta method) "
              "and the resampling's (shares: generations; distinct counts: iNEXT assemblage)")


def restate(row: dict[str, Any]) -> tuple[list[float], bool] | None:
    """The row's interval and mark under the new rule, or None where it has no replicates' values or no finite
    interval around a positive ratio."""
    ratio, (lo, hi) = row.get("ratio"), row["ci95"]
    num, den = row.get("per_replicate"), row.get("baseline_per_replicate")
    if not num or not den or ratio is None or lo is None or hi is None or not 0 < lo <= ratio <= hi:
        return None
    lo, hi = spread_interval(ratio, math.log(hi / ratio), num, den)  # the old half-width is the resampling's
    return [lo, hi], hi > lo and (lo > 1 or hi < 1)


def rows(x: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every interval row (a dict holding ``ci95``) of a fair.json, with where it lies."""
    if isinstance(x, dict):
        if "ci95" in x:
            return [(path, x)]
        return [r for k, v in x.items() for r in rows(v, f"{path}/{k}")]
    if isinstance(x, list):
        return [r for i, v in enumerate(x) for r in rows(v, f"{path}[{i}]")]
    return []


def main(root: Path) -> None:
    for path in sorted(root.rglob("fair.json")):
        data = read_json(path, dict)
        scales = [s for s in data.get("scales", []) if s.get("heldout", {}).get("interval_method") == OLD_METHOD]
        if not scales:
            continue
        widened = marks = 0
        for s in scales:
            for where, row in rows(s["heldout"]):
                new = restate(row)
                if new is None:
                    continue
                (lo, hi), excludes = new
                if hi - lo > (row["ci95"][1] - row["ci95"][0]) * (1 + 1e-12):
                    widened += 1
                    if excludes != row["excludes_1"]:
                        marks += 1
                        print(f"{path}: {where}: {row['ratio']:.3f} [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] -> "
                              f"[{lo:.3f}, {hi:.3f}], no longer marked")
                row["ci95"], row["excludes_1"] = [lo, hi], excludes
            s["heldout"]["interval_method"] = INTERVAL_METHOD
        atomic_write_json(path, data)
        atomic_write_text(path.with_suffix(".md"), render_fair_markdown(data))
        print(f"{path}: {widened} intervals widened, {marks} marks dropped")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
