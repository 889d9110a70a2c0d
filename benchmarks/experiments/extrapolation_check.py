"""Does the summary's estimate at twice the budget hold? From each method's first half of generations (random
halves, 20 draws), estimate the distinct nearest training images the whole run reached at each band or closer,
two ways: Chao et al.'s extrapolation (``metrics.extrapolated_unique``, what ``summary.json``'s ``estimated_2x``
and the report's N_G-law figure use) and the paper's plug-in sum_j 1 - (1 - p_j)^N (what the report showed as a
"projection" before); set both against the count the whole run reached.

    python benchmarks/experiments/extrapolation_check.py RUN [OUT.md]
"""
import sys
from pathlib import Path

import numpy as np

from side_extract.metrics import closest_first, extrapolated_unique
from side_extract.runs import evaluated_methods, read_json


def main(run: Path, out: Path | None) -> None:
    lines = [f"# Extrapolating from half the generations: `{run}`", "",
             f"`python benchmarks/experiments/extrapolation_check.py {run}`; 20 random halves per method, means.", "",
             "| method | band or closer | half: observed | whole: Chao et al. from the half | whole: plug-in from "
             "the half | whole: observed |", "|---|---|---|---|---|---|"]
    for method, folder in evaluated_methods(run).items():
        metrics = read_json(folder / "metrics.json", dict)
        bands = closest_first(metrics["bands"], metrics["orientation"])
        z = np.load(folder / "per_generation.npz")
        nn, band = z["nearest_train_index"], z["band"].astype(str)
        n_train, n = int(metrics["n_train"]), len(nn)
        for k in range(len(bands)):
            ok = np.isin(band, bands[:k + 1])  # at bands[k] or closer
            rng = np.random.default_rng(0)
            seen, est, plug = [], [], []
            for _ in range(20):
                half = rng.permutation(n)[: n // 2]
                c = np.bincount(nn[half][ok[half]], minlength=n_train)
                seen.append((c > 0).sum())
                est.append(extrapolated_unique(c, n // 2, 2 * (n // 2)))
                plug.append(float((1 - (1 - c / (n // 2)) ** (2 * (n // 2))).sum()))
            lines.append(f"| {method} | {bands[k]} | {np.mean(seen):.1f} | "
                         f"{np.mean(est):.1f} | {np.mean(plug):.1f} | {len(np.unique(nn[ok]))} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.write_text(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
