"""Count the FLOPs of a committed ``side bench scale`` result's architectures again with the current counter, and
its cost model's GPU projections with them, without timing anything again (its CPU columns are measured times,
kept as they are).

``scale.json`` was written before ``140648e``: the counter saw no FLOPs in the fused CPU attention kernel, and
the cost model charged a guided step's classifier 3x its forward (it is 2x: the gradient with respect to the
input only). Timing it again needs bf16 convolutions, which ran for minutes per model on a CPU without bf16
instructions; the FLOPs need one forward per architecture.

    python benchmarks/experiments/flops_recount.py benchmarks/results/scale.json \
        > benchmarks/results/experiments/scale-flops-recount.md
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from side_extract.bench.scale import Audit, build_architecture, classifier_arch, cost_model, model_flops
from side_extract.models.classifier import NoiseAwareResNet
from side_extract.runs import read_json


def recount(scale_json: Path) -> str:
    data = read_json(scale_json, dict)
    classes = data["config"]["classifier_classes"]
    counts = {}
    for name in dict.fromkeys(r["model"] for r in data["models"]):
        unet = build_architecture(name)
        side = unet.config.sample_size
        counts[name] = model_flops(lambda x, t: unet(x, t).sample, NoiseAwareResNet(classifier_arch(side, classes)),
                                   torch.zeros(1, 3, side, side))
    models = [{**r, **counts[r["model"]]} for r in data["models"]]
    new = cost_model(models, data.get("search", []), Audit(), data["config"]["gpu_tflops"])
    lines = [f"# FLOPs of `{scale_json}` counted again", "",
             f"Command: `python benchmarks/experiments/flops_recount.py {scale_json}`. Its architectures' FLOPs per "
             "call with the current counter (attention included), and the cost model's GPU projections with them "
             f"(a guided step's classifier at 2x its forward), at its assumed {data['config']['gpu_tflops']:g} "
             "TFLOP/s; the CPU columns are its measured times, unchanged.", "",
             "| model | denoiser GFLOP / call: file, now | classifier GFLOP: file, now | projected total, 1 GPU: file, "
             "now (min) | 8 GPUs: file, now (min) |", "|---|---|---|---|---|"]
    for name, now in counts.items():
        was = next(r for r in data["models"] if r["model"] == name)
        total = {k: [sum(r[f"gpu{g}_s"] for r in rows if r["model"] == name) / 60 for g in (1, 8)]
                 for k, rows in (("file", data["cost"]), ("now", new))}
        lines.append(f"| {name} | {was['denoiser_flops_per_image'] / 1e9:.2f}, "
                     f"{now['denoiser_flops_per_image'] / 1e9:.2f} | {was['classifier_flops_per_image'] / 1e9:.3f}, "
                     f"{now['classifier_flops_per_image'] / 1e9:.3f} | {total['file'][0]:.1f}, {total['now'][0]:.1f} "
                     f"({total['now'][0] / total['file'][0] - 1:+.1%}) | {total['file'][1]:.2f}, "
                     f"{total['now'][1]:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.stdout.write(recount(Path(sys.argv[1])))
