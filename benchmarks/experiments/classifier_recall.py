"""What the SIDE forms' noise-aware classifiers learnt, per replicate of a fair bench cache: held-out accuracy, the
mean recall per label (each label's share of its held-out images classified as it, averaged over the labels present;
answering one label always scores 1 / labels) and the most common label's share (with memorization-aware labels, the
background's: what always answering it scores), per timestep quartile (q0: least noise). Read from each form's
``classifier/config.json`` (its training history), so it costs nothing to run.

    python benchmarks/experiments/classifier_recall.py CACHE/runs/<target> [OUT.md]
"""
import sys
from pathlib import Path

import numpy as np

from side_extract import config as cfg
from side_extract.runs import read_json
from side_extract.training import heldout_split

QUARTILES = ("q0", "q1", "q2", "q3")


def heldout_labels(form: Path, saved: dict) -> int:
    """The labels among the classifier's held-out images: saved by training since it was recorded, else the split
    made again from the run's labels and classifier settings (``training.heldout_split``, as training made it)."""
    if saved.get("heldout_labels"):
        return int(saved["heldout_labels"])
    labels = np.load(form / "surrogate" / "labels.npz")["labels"]
    c = cfg.load_yaml(form / "config.yaml")["classifier"]
    y = labels[labels >= 0]
    _, held = heldout_split(y, c["eval_fraction"] if len(y) >= 20 else 0.0, c["seed"])
    return len(np.unique(y[held]))


def main(runs: Path, out: Path | None) -> None:
    lines = [f"# What the SIDE forms' classifiers learnt: `{runs}`", "",
             f"`python benchmarks/experiments/classifier_recall.py {runs}`. Accuracy and mean recall per label on the "
             "classifier's held-out synthetic samples, per timestep quartile (q0: t in [0, 250), least noise); "
             "\"most common\": the most common held-out label's share (the background's, with memorization-aware "
             "labels).", "",
             "| replicate | form | labels held out | most common | accuracy q0 / q1 / q2 / q3 | mean recall per label q0 / q1 / "
             "q2 / q3 | chance recall |", "|---|---|---|---|---|---|---|"]
    per_form: dict[str, list[list[float]]] = {}
    reps = sorted((p for p in runs.glob("rep-*") if (p / "forms").is_dir()), key=lambda p: int(p.name[4:]))
    for rep in reps:
        for form in sorted((rep / "forms").iterdir()):
            saved = form / "classifier" / "config.json"
            methods = cfg.load_yaml(form / "config.yaml")["extract"]["methods"]
            if not saved.is_file() or not {"side", "side-teacher"} & set(methods):
                continue  # a form of a method no noise-aware classifier guides holds the replicate's, shared
            s = read_json(saved, dict)
            last = s["history"][-1]
            acc, rec = last.get("accuracy", {}), last.get("balanced_accuracy")
            if not acc or rec is None:
                continue  # no held-out images, or trained before the recall was recorded
            k = heldout_labels(form, s)
            per_form.setdefault(form.name, []).append([rec[q] for q in QUARTILES])
            lines.append(f"| {rep.name[4:]} | {form.name} | {k} | {s.get('majority_rate', float('nan')):.3f} | "
                         + " / ".join(f"{acc[q]:.3f}" for q in QUARTILES) + " | "
                         + " / ".join(f"{rec[q]:.3f}" for q in QUARTILES) + f" | {1 / k:.3f} |")
    lines += ["", "Mean recall per label, mean over the replicates above:", "",
              "| form | replicates | q0 | q1 | q2 | q3 |", "|---|---|---|---|---|---|"]
    for name, rows in per_form.items():
        m = np.mean(rows, axis=0)
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(f"{v:.3f}" for v in m) + " |")
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
