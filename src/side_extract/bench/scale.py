"""Scale benchmark (``side bench scale``): what each stage costs at real model sizes, and a cost model.

Measured here (CPU, ``threads`` torch threads), each model in a fresh subprocess so that its peak resident
memory is its own:

1. **models**: the architecture of diffusers' CIFAR-10 DDPM (``google/ddpm-cifar10-32``: ``UNet2DModel`` with
   block_out_channels (128, 256, 256, 256), attention at 16x16, 2 layers per block: 35.7M parameters) and a
   64x64 one (the same widths with one more level, (128, 128, 256, 256, 256), attention at 16x16), random
   weights (cost does not depend on them). Per batch size: seconds per image of one denoiser call (fp32 and
   bf16 autocast, with bf16's parity against fp32), of one guided step (denoiser + the noise-aware
   classifier's forward and backward, the library's default classifier, K = 100), of one classifier training
   step (the four timed side by side, in alternating order, median over repeats; the ratios guided / call and
   bf16 / fp32 come from the same repeats), the peak resident memory, and the FLOPs per image
   (``torch.utils.flop_counter``);
2. **search**: :func:`side_extract.evaluation.evaluate` (exact pixel RMS-L2 nearest neighbours + metrics) of
   N_G generations against 50,000 and 200,000 random 32x32x3 training images: seconds and peak memory (flat
   in N_G: the search streams reference chunks and keeps a running top-k);
3. **processes**: ``side sample`` of the demo target at 1 and 2 processes (``torchrun``): wall time and
   whether the images are identical.

The cost model (``cost_model``) multiplies the measured seconds per image by the counts of an audit and, for
GPUs, divides the FLOPs by an *assumed* sustained throughput (``gpu_tflops``, default 30 TFLOP/s: a few
percent of a current GPU's bf16 peak, as small-resolution UNets sustain far less than peak; not measured
here, there is no GPU: ``scripts/gpu-check`` measures this architecture's throughput on one).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import machine_description, write_results

log = logging.getLogger(__name__)
SCHEMA = "side-extract/bench-scale/1"

ARCHITECTURES: dict[str, dict[str, Any]] = {
    # google/ddpm-cifar10-32's unet/config.json (Ho et al.'s CIFAR-10 model, 35.7M parameters)
    "cifar10-32": dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1),
    # a 64x64 target: one more level, attention where the feature maps are 16x16
    "unet-64": dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(128, 128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                    norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1),
}


@dataclasses.dataclass(frozen=True)
class ScaleBenchConfig:
    """Sizes of the scale benchmark (defaults: the full run; :func:`quick_scale_config` for a smoke run)."""

    models: tuple[str, ...] = ("cifar10-32", "unet-64")
    batch_sizes: tuple[int, ...] = (1, 16)
    repeats: int = 3
    classifier_classes: int = 100
    search_train: tuple[int, ...] = (50_000, 200_000)
    search_generated: tuple[int, ...] = (100, 1600)
    search_side: int = 32
    processes_n: int = 96
    gpu_tflops: float = 30.0
    threads: int = 1
    quick: bool = False

    def __post_init__(self) -> None:
        bad = [m for m in self.models if m not in ARCHITECTURES]
        if bad:
            raise ValueError(f"models={list(self.models)}: each must be one of {', '.join(ARCHITECTURES)}")
        for name in ("repeats", "classifier_classes", "search_side", "processes_n", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        for name in ("batch_sizes", "search_train", "search_generated"):
            if not getattr(self, name) or any(v <= 0 for v in getattr(self, name)):
                raise ValueError(f"{name}={list(getattr(self, name))} must be positive integers (at least one)")
        if not (math.isfinite(self.gpu_tflops) and self.gpu_tflops > 0):
            raise ValueError(f"gpu_tflops={self.gpu_tflops} must be finite and > 0 (an assumed sustained TFLOP/s)")


def quick_scale_config() -> ScaleBenchConfig:
    """``--quick``: the CIFAR-10 architecture at batch 2 only, a 5,000-image search, 32 images per process run."""
    return ScaleBenchConfig(models=("cifar10-32",), batch_sizes=(2,), repeats=1, search_train=(5_000,),
                            search_generated=(50, 100), processes_n=32, quick=True)


def build_architecture(name: str) -> Any:
    """A randomly initialised ``UNet2DModel`` of one of :data:`ARCHITECTURES` (seeded)."""
    from diffusers import UNet2DModel

    if name not in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} must be one of {', '.join(ARCHITECTURES)}")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNet2DModel(**ARCHITECTURES[name]).eval()


def flops_per_image(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` counted by ``torch.utils.flop_counter`` (matrix products, convolutions and attention).
    Attention runs in its math form while counting: the counter sees no FLOPs in the fused CPU kernel (the
    attention's QK^T and AV products, 2.8 % of cifar10-32's, were left out)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return float(counter.get_total_flops())


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def model_child(name: str, batch: int, repeats: int, classes: int, threads: int) -> None:
    """(Run in a fresh process.) Time one architecture at one batch size; print one JSON line."""
    from diffusers import DDPMScheduler

    from ..guidance import ClassifierGuidance
    from .compute import interleaved, median_ratio
    from ..models.classifier import NoiseAwareResNet
    from ..models.target import UNetDenoiser
    from ..sampling import guided_step, inference_scheduler

    torch.set_num_threads(threads)
    unet = build_architecture(name)
    side = unet.config.sample_size
    denoiser = UNetDenoiser(unet, DDPMScheduler(num_train_timesteps=1000, clip_sample=True))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((batch, 3, side, side), generator=gen)
    t = torch.tensor(600)
    arch = classifier_arch(side, classes)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clf = NoiseAwareResNet(arch)
    y = torch.randint(0, classes, (batch,), generator=gen)
    guide = ClassifierGuidance(clf, np.arange(classes), 3.0, 1.0, (0.0, 1.0), 1000)
    sched = inference_scheduler(denoiser.scheduler, "ddim", 50)
    ts = sched.timesteps[20]
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]

    with torch.no_grad():
        eps32 = denoiser(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eps16 = denoiser(x, t).float()

    def call(_r: int) -> None:
        with torch.no_grad():
            denoiser(x, t)

    def call16(_r: int) -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            denoiser(x, t)

    def guided(_r: int) -> None:
        with torch.no_grad():
            eps = denoiser(x, ts)
        g = guide(x, ts, y)
        with torch.no_grad():
            guided_step(sched, x, ts, eps, gens, g=g)

    train_model = NoiseAwareResNet(arch).train()
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4)
    tt = torch.randint(0, 1000, (batch,), generator=gen)

    def train_step(_r: int) -> None:
        loss = torch.nn.functional.cross_entropy(train_model(x, tt), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fns = {"call": call, "call16": call16, "guided": guided, "train": train_step}
    interleaved(fns, 1)  # warm-up (allocator, kernels)
    raw = interleaved(fns, repeats)  # side by side, alternating
    times = {k: statistics.median(v) for k, v in raw.items()}
    row = {"model": name, "batch": batch, "side": side, "parameters": sum(p.numel() for p in unet.parameters()),
           "classifier_parameters": sum(p.numel() for p in clf.parameters()),
           "denoiser_s_per_image": times["call"] / batch, "denoiser_bf16_s_per_image": times["call16"] / batch,
           "bf16_max_abs_diff": float((eps16 - eps32).abs().max()),
           "bf16_rel_mean_diff": float((eps16 - eps32).abs().mean() / eps32.abs().mean()),
           "guided_step_s_per_image": times["guided"] / batch, "classifier_train_s_per_image": times["train"] / batch,
           # medians of the per-repeat ratios (the two sides of each from the same repeat; a ratio of the medians
           # lost the pairing: 1.00 for a guided step that adds the classifier's forward and backward)
           "guided_over_call": median_ratio(raw["guided"], raw["call"]),
           "bf16_over_fp32": median_ratio(raw["call16"], raw["call"]),
           "peak_rss_mb": round(_peak_mb(), 1)}
    print(json.dumps({**row, **model_flops(denoiser, clf, x[:1])}))


def classifier_arch(side: int, classes: int) -> Any:
    """The default noise-aware classifier's architecture for ``side`` x ``side`` x 3 images and ``classes``."""
    from .. import config as cfg
    from ..models.classifier import ClassifierArch

    c = cfg.ClassifierConfig()
    return ClassifierArch(num_classes=classes, in_channels=3, image_size=side, depth=c.depth, width=c.width,
                          time_mode=c.time_mode, time_embed_dim=c.time_embed_dim, time_blocks=c.time_blocks,
                          classes=tuple(range(classes)))


def model_flops(denoiser: Callable[..., Any], classifier: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """FLOPs of one denoiser call and one classifier forward on the one image ``x`` (1, C, H, W)."""
    t = torch.tensor(600)
    with torch.no_grad():
        return {"denoiser_flops_per_image": flops_per_image(lambda: denoiser(x, t)),
                "classifier_flops_per_image": flops_per_image(lambda: classifier(x, t.reshape(1)))}


_MODEL_CHILD = "import sys; from side_extract.bench.scale import model_child as f; a=sys.argv[1:]; " \
               "f(a[0], *map(int, a[1:]))"


def bench_models(c: ScaleBenchConfig) -> list[dict[str, Any]]:
    rows = []
    for name in c.models:
        for b in c.batch_sizes:
            proc = subprocess.run([sys.executable, "-c", _MODEL_CHILD, name, str(b), str(c.repeats),
                                   str(c.classifier_classes), str(c.threads)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"scale child for {name} at batch {b} failed:\n{proc.stderr[-2000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def bench_search(c: ScaleBenchConfig) -> list[dict[str, Any]]:
    """Seconds and peak memory of ``evaluate`` (exact pixel search) in fresh processes."""
    from .compute import evaluate_rss

    rows = []
    for n_train in c.search_train:
        for n_gen in c.search_generated:
            rows.append(evaluate_rss(n_gen, n_train, c.threads, side=c.search_side, channels=3))
    return rows


def bench_processes(c: ScaleBenchConfig) -> dict[str, Any]:
    """``side sample --model demo`` at 1 and 2 processes (torchrun): wall time and identical images."""
    from ..data import load_shards
    from ..distributed import torchrun_command

    try:
        torchrun_command(2)
    except ValueError as e:
        return {"skipped": str(e)}
    env = dict(os.environ, OMP_NUM_THREADS=str(c.threads))
    out: dict[str, Any] = {"n": c.processes_n}
    with tempfile.TemporaryDirectory(prefix="side-bench-scale-") as tmp:
        for nproc in (1, 2):
            args = ["--no-progress", "--threads", str(c.threads), "sample", "--model", "demo", "--n",
                    str(c.processes_n), "--out", f"{tmp}/p{nproc}"]
            base = [sys.executable, "-m", "side_extract.cli.main"] if nproc == 1 else torchrun_command(nproc)
            t0 = time.perf_counter()
            proc = subprocess.run([*base, *args], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"side sample with {nproc} process(es) failed:\n{proc.stderr[-2000:]}")
            out[f"wall_s_{nproc}"] = round(time.perf_counter() - t0, 2)
        a = load_shards(Path(tmp) / "p1" / "synthetic").images
        b = load_shards(Path(tmp) / "p2" / "synthetic").images
        out["identical"] = bool(a.shape == b.shape and np.array_equal(a, b))
    out["speedup"] = round(out["wall_s_1"] / out["wall_s_2"], 2)
    return out


def throughput(name: str, device: str, batches: tuple[int, ...] = (64, 256), steps: int = 2,
               backoff_batch: int | None = None) -> dict[str, Any]:
    """Sustained throughput of one architecture on ``device`` (``scripts/gpu-check`` runs it on CUDA): per
    precision (IEEE fp32, tf32 on CUDA, bf16) and batch, denoiser calls per second, images per second of
    ``steps``-step sampling and the TFLOP/s they sustain (the figure ``--gpu-tflops`` assumes), the peak device
    memory, bf16's (and on CUDA tf32's) parity against fp32; with ``backoff_batch``, one sampling call at that
    batch size, halved on out-of-memory (``sampling.BatchSize``), and the sizes that ran out."""
    from diffusers import DDPMScheduler

    from ..config import PRECISIONS
    from ..models.target import UNetDenoiser
    from ..sampling import BatchSize, float32_matmul, sample

    cuda = torch.device(device).type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    unet = build_architecture(name).to(device)
    denoiser = UNetDenoiser(unet, DDPMScheduler(num_train_timesteps=1000, clip_sample=True))
    side = unet.config.sample_size
    t = torch.tensor(600, device=device)
    with torch.no_grad():
        flops = flops_per_image(lambda: unet(torch.zeros((1, 3, side, side), device=device), t))
    out: dict[str, Any] = {"model": name, "device": str(device), "flops_per_call": flops, "rows": []}
    # tf32 only on CUDA: on a CPU it is fp32 (the flags it sets apply to CUDA alone)
    for precision in PRECISIONS if cuda else ("fp32", "bf16"):
        for b in batches:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            x = torch.randn((b, 3, side, side), generator=torch.Generator().manual_seed(0)).to(device)
            with torch.no_grad(), float32_matmul(precision), torch.autocast(torch.device(device).type,
                                                                             dtype=torch.bfloat16,
                                                                             enabled=precision == "bf16"):
                denoiser(x, t)
                sync()
                t0 = time.perf_counter()
                for _ in range(3):
                    denoiser(x, t)
                sync()
                per_call = (time.perf_counter() - t0) / 3
            t0 = time.perf_counter()
            sample(denoiser, b, seed=0, steps=steps, batch_size=b, precision=precision, device=device)
            sync()
            sampled = time.perf_counter() - t0
            out["rows"].append({"precision": precision, "batch": b, "calls_images_per_s": b / per_call,
                                "sampling_images_per_s": b / sampled, "steps": steps,
                                "tflops": b * flops / per_call / 1e12,
                                "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None})
    x = torch.randn((8, 3, side, side), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        with float32_matmul("fp32"):
            e32 = denoiser(x, t).float()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            e16 = denoiser(x, t).float()
        out["bf16_rel_mean_diff"] = float((e16 - e32).abs().mean() / e32.abs().mean())
        if cuda:
            with float32_matmul("tf32"):
                e_tf32 = denoiser(x, t).float()
            out["tf32_rel_mean_diff"] = float((e_tf32 - e32).abs().mean() / e32.abs().mean())
    if backoff_batch:
        size = BatchSize(backoff_batch)
        t0 = time.perf_counter()
        sample(denoiser, backoff_batch, seed=0, steps=steps, batch_size=size, precision="bf16", device=device)
        sync()
        out["backoff"] = {"asked": backoff_batch, "ran_out_at": size.backoffs, "ran_with": size.size,
                          "seconds": time.perf_counter() - t0}
    return out


# --------------------------------------------------------------------------------------------------
# the cost model

@dataclasses.dataclass(frozen=True)
class Audit:
    """The counts of one audit (the paper's CIFAR-10 setting by default)."""

    n_synthetic: int = 10_000
    n_generated: int = 10_000
    guided_methods: int = 2  # SIDE and Cond
    unguided_methods: int = 1  # UnCond
    steps: int = 50  # DDIM
    classifier_steps: int = 2_000
    classifier_batch: int = 128
    classifiers: int = 2  # SIDE's noise-aware one and Cond's clean one
    n_train: int = 50_000


def cost_model(models: list[dict[str, Any]], search: list[dict[str, Any]], audit: Audit, gpu_tflops: float,
               gpus: tuple[int, ...] = (1, 8)) -> list[dict[str, Any]]:
    """Seconds per stage of ``audit`` for each measured architecture: here (the largest measured batch's
    seconds per image times the counts) and on ``gpus`` GPUs (FLOPs / the assumed ``gpu_tflops``, divided by
    the number of GPUs: every stage is split between processes). The search's here-time scales the measured
    seconds per (generation x training image) pair; its FLOPs are 2 D per pair."""
    out = []
    for name in dict.fromkeys(r["model"] for r in models):
        rows = [r for r in models if r["model"] == name]
        r = max(rows, key=lambda r: r["batch"])
        unet_calls = {"synthetic set": audit.n_synthetic * audit.steps,
                      "extraction (guided)": audit.n_generated * audit.guided_methods * audit.steps,
                      "extraction (unguided)": audit.n_generated * audit.unguided_methods * audit.steps}
        cpu = {"synthetic set": unet_calls["synthetic set"] * r["denoiser_s_per_image"],
               "extraction (guided)": unet_calls["extraction (guided)"] * r["guided_step_s_per_image"],
               "extraction (unguided)": unet_calls["extraction (unguided)"] * r["denoiser_s_per_image"],
               "classifier training": audit.classifiers * audit.classifier_steps * audit.classifier_batch
               * r["classifier_train_s_per_image"]}
        fl = {k: v * r["denoiser_flops_per_image"] for k, v in unet_calls.items()}
        # a guided step: the classifier's forward and its gradient with respect to the input only (2x the forward;
        # no weight gradients, which training's 3x counts)
        fl["extraction (guided)"] += unet_calls["extraction (guided)"] * 2 * r["classifier_flops_per_image"]
        fl["classifier training"] = (audit.classifiers * audit.classifier_steps * audit.classifier_batch * 3
                                     * r["classifier_flops_per_image"])
        d = 3 * r["side"] ** 2
        pairs = audit.n_generated * (audit.guided_methods + audit.unguided_methods) * audit.n_train
        per_pair, measured = _search_seconds_per_pair(search, d, audit.n_train)
        cpu["search"] = None if per_pair is None else pairs * per_pair  # not measured at this image size: None
        fl["search"] = pairs * 2 * d
        for stage, flops in fl.items():
            row = {"model": name, "stage": stage, "cpu_s": cpu[stage], "flops": flops,
                   **({"rate_from": measured} if stage == "search" and measured else {})}
            for g in gpus:
                row[f"gpu{g}_s"] = fl[stage] / (gpu_tflops * 1e12) / g
            out.append(row)
    return out


def _search_seconds_per_pair(search: list[dict[str, Any]], d: int, n_train: int
                             ) -> tuple[float | None, dict[str, int] | None]:
    """Seconds per (generation x training image) pair of the search at ``d`` dimensions, from the largest N_G
    measured against the training-set size nearest the audit's ``n_train`` (the largest of all, 200,000 images,
    had set the rate of a 50,000-image audit: 10 % low), and that row's sizes (the audit's N_G is extrapolated
    from them); (None, None) where nothing was measured at ``d``."""
    rows = [r for r in search if r.get("dims") == d]
    if not rows:
        return None, None
    nearest = min(abs(r["n_train"] - n_train) for r in rows)
    r = max((r for r in rows if abs(r["n_train"] - n_train) == nearest), key=lambda r: r["n_generated"])
    return r["seconds"] / (r["n_generated"] * r["n_train"]), {"n_generated": r["n_generated"], "n_train": r["n_train"]}


def run_scale_bench(c: ScaleBenchConfig, *, command: str | None = None, audit: Audit = Audit(),
                    parts: tuple[str, ...] = (), progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the parts (all by default: models, search, processes); returns the results dict (``scale.json``)."""
    say = progress or (lambda _name: None)
    known = {"models": bench_models, "search": bench_search, "processes": bench_processes}
    bad = [p for p in parts if p not in known]
    if bad:
        raise ValueError(f"parts={list(parts)}: each must be one of {', '.join(known)}")
    t_start = time.perf_counter()
    data: dict[str, Any] = {"schema": SCHEMA, "quick": c.quick, "command": command,
                            "machine": machine_description(c.threads),  # (its children's: this process's were said)
                            "config": dataclasses.asdict(c), "audit": dataclasses.asdict(audit),
                            "only": [p for p in known if p in parts and set(parts) != set(known)]}
    seconds = {}
    for name, fn in known.items():
        if parts and name not in parts:
            continue
        say(name)
        t0 = time.perf_counter()
        data[name] = fn(c)
        seconds[name] = round(time.perf_counter() - t0, 1)
    if "models" in data:
        data["cost"] = cost_model(data["models"], data.get("search", []), audit, c.gpu_tflops)
    data["part_seconds"] = seconds
    data["seconds"] = round(time.perf_counter() - t_start, 1)
    return data


def write_scale_results(data: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``scale.json`` + ``scale.md`` in ``out``: ``scale-quick.*`` for a ``--quick`` run, ``scale[-quick]-<parts>.*``
    for some of the parts (``--only``: a partial rerun overwrote the whole results, and with them the cost model)."""
    from .tables import render_scale_markdown

    stem = "scale" + ("-quick" if data.get("quick") else "") + "".join(f"-{p}" for p in data.get("only") or [])
    return write_results(out, stem, data, render_scale_markdown)


__all__ = ["ARCHITECTURES", "Audit", "ScaleBenchConfig", "build_architecture", "cost_model", "flops_per_image",
           "quick_scale_config", "run_scale_bench", "throughput", "write_scale_results"]
