"""Guidance signals compared (``side bench signals``): held-out accuracy per timestep quartile of each way to
get p(y | x_t, t) for the surrogate labels, trained on the same synthetic set, labels and split.

Signals (``classifier`` settings of the run template, overridden per signal):

- ``paper``: the noise-aware ResNet with the paper's single time module after the stem;
- ``every-block``: the same with t conditioning every residual block (guided-diffusion's classifier);
- ``x0-hat``: a clean (time-independent) classifier applied to the target's denoised estimate
  x0_hat(x_t, t) (``guidance.DenoisedGuidance``);
- ``unet-features``: the target's own frozen UNet features at the same t with a trained head
  (``classifier.backbone: unet``; its parameter count is the head's).

The synthetic set and cluster labels come from replicate ``replicate`` of the fair protocol's run of that
training set (``CACHE/runs/<target>/rep-<r>``, made if missing); a class-stratified ``heldout_fraction`` of
the labelled samples is held out and every signal is scored on it, quartile by quartile (t uniform inside it).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config as cfg
from ..data import load_shards
from ..models.target import load_target
from ..surrogate import SurrogateLabels
from ..pipeline import ProgressFactory, cluster_problems, no_progress, run_audit
from ..training import accuracy, balanced_accuracy, fit_label_classifier, heldout_split, predictions_by_quartile
from . import machine_description, write_results
from .extraction import ExtractionBenchConfig, check_replicate, replicate_config, scale_inputs
from .tables import _preamble

SIGNALS = ("paper", "every-block", "x0-hat", "unet-features")
SCHEMA = "side-extract/bench-signals/1"


def run_signals_bench(bc: ExtractionBenchConfig, n_train: int, cache: str | Path, *, replicate: int = 1,
                      signals: tuple[str, ...] = SIGNALS, heldout_fraction: float = 0.2, device: str = "cpu",
                      progress: ProgressFactory = no_progress, command: str | None = None) -> dict[str, Any]:
    bad = [s for s in signals if s not in SIGNALS]
    if bad or not signals or len(set(signals)) != len(signals):  # (a repeat trained its classifier twice, one result
        # overwritten)
        raise ValueError(f"signals={list(signals)}: each must be one of {', '.join(SIGNALS)}, named once")
    check_replicate(replicate, "replicate")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in (0, 1)")
    if problems := cluster_problems(bc.run, ("side",)):  # (found after the target was trained)
        raise ValueError("; ".join(problems))
    cache = Path(cache)
    t0 = time.time()
    inputs = scale_inputs(bc, n_train, cache, device=device, progress=progress)
    rc = replicate_config(inputs.run_config(bc.run), replicate)
    rc = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, methods=("side",)))
    run = inputs.replicate_run(cache, replicate)
    run_audit(run, rc, device=device, until="surrogate", progress=progress)
    synthetic = load_shards(run / "synthetic")
    labels = SurrogateLabels.load(run / "surrogate" / "labels.npz").labels
    keep = labels >= 0
    x0 = synthetic.to_float()[torch.from_numpy(keep)]
    classes = np.unique(labels[keep])
    y = np.searchsorted(classes, labels[keep])
    tr, ev = heldout_split(y, heldout_fraction, rc.classifier.seed)
    if len(ev) == 0:  # (every classifier was trained, scored on nothing, and the table failed on a None chance)
        sizes = np.bincount(y)
        raise ValueError(f"no held-out images: the {len(classes)} kept clusters hold {sizes.min()}-{sizes.max()} "
                         f"labelled samples each, and a held-out share of {heldout_fraction:g} takes none from a "
                         f"cluster of fewer than {math.ceil(1 / heldout_fraction)}; give more synthetic samples "
                         "(sample.n) or fewer clusters (surrogate.n_clusters)")
    denoiser = load_target(inputs.target["path"], device)
    sched = denoiser.scheduler
    c = dataclasses.replace(rc.classifier, eval_fraction=0.0)
    x_tr, y_tr = x0[tr], y[tr]
    x_ev, y_ev = x0[ev].to(device), torch.as_tensor(y[ev]).to(device)
    results = {}
    for s in signals:
        ts = time.time()
        cs = dataclasses.replace(c, time_blocks="every" if s == "every-block" else "first",
                                 backbone="unet" if s == "unet-features" else "resnet")
        res = fit_label_classifier(x_tr, y_tr, cs, scheduler=None if s == "x0-hat" else sched, device=device,
                                   progress=progress(f"signal {s}"),
                                   unet=denoiser.unet if s == "unet-features" else None)
        predicted = predictions_by_quartile(res.model, x_ev, sched, seed=rc.classifier.seed,
                                            denoiser=denoiser if s == "x0-hat" else None)
        acc = {k: accuracy(p, y_ev) for k, p in predicted.items()}
        results[s] = {"accuracy": acc, "balanced_accuracy": {k: balanced_accuracy(p, y_ev) for k, p in predicted.items()},
                      "train_seconds": round(time.time() - ts, 1),
                      "parameters": sum(p.numel() for p in res.model.parameters())}
    return {"schema": SCHEMA, "command": command, "machine": machine_description(), "size": bc.size,
            "n_train": n_train, "replicate": replicate, "classes": len(classes), "n_labelled": int(keep.sum()),
            "n_heldout": len(ev), "chance": float(np.bincount(y[ev]).max() / len(ev)),
            "heldout_labels": len(np.unique(y[ev])),
            "classifier": cfg.to_dict(c), "signals": results, "seconds": round(time.time() - t0, 1)}


def render_signals_markdown(data: dict[str, Any]) -> str:
    lines = [*_preamble("Guidance signals: held-out accuracy per timestep quartile", data),
             f"{data['n_train']} training images at {data['size']}x{data['size']}, replicate {data['replicate']}: "
             f"{data['n_labelled']} labelled synthetic samples in {data['classes']} clusters, {data['n_heldout']} held "
             f"out (majority class: {data['chance']:.2f}). Quartile q covers t in [q T/4, (q+1) T/4).", "",
             "| signal | t in [0, 250) | [250, 500) | [500, 750) | [750, 1000) | parameters | training s |",
             "|---|---|---|---|---|---|---|"]
    for s, r in data["signals"].items():
        a = r["accuracy"]
        lines.append(f"| {s} | " + " | ".join(f"{a[f'q{q}']:.3f}" for q in range(4))
                     + f" | {r['parameters']:,} | {r['train_seconds']:.0f} |")
    if all("balanced_accuracy" in r for r in data["signals"].values()):  # (files written before it was recorded)
        lines += ["", f"Mean recall per label (each label's share of its held-out images classified as it, averaged "
                      f"over the {data['heldout_labels']} labels held out; chance {1 / data['heldout_labels']:.3f}):", "",
                  "| signal | t in [0, 250) | [250, 500) | [500, 750) | [750, 1000) |", "|---|---|---|---|---|"]
        for s, r in data["signals"].items():
            b = r["balanced_accuracy"]
            lines.append(f"| {s} | " + " | ".join(f"{b[f'q{q}']:.3f}" for q in range(4)) + " |")
    return "\n".join(lines) + "\n"


def write_signals_results(data: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    return write_results(out, f"signals-{data['size']}px-n{data['n_train']}", data, render_signals_markdown)


__all__ = ["SIGNALS", "run_signals_bench", "render_signals_markdown", "write_signals_results"]
