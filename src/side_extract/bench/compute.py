"""Compute benchmark (``side bench compute``): each figure a ratio measured side by side in one run.

1. **sampling**: our unguided loop (:func:`side_extract.sampling.sample`) vs diffusers' ``DDIMPipeline`` on
   the same model, steps, batch and per-sample noise (so the images must agree), repeats interleaved
   (ABAB, then BABA...), median of the per-repeat ratios;
2. **guidance**: guided extraction per image vs its floor = unguided sampling (same clipping) plus the
   classifier's forward and backward w.r.t. the input at every step, each timed separately in the same
   repeat; the classifier is a noise-aware ResNet of the demo's size (untrained: timing only);
3. **neighbors**: :class:`~side_extract.neighbors.NearestNeighborIndex` exact top-1 (rms-l2, both backends)
   vs a bare faiss ``IndexFlatL2`` on the same uint8 arrays (conversion to float32 included);
4. **evaluate_rss**: peak resident set size of :func:`side_extract.evaluation.evaluate` at several N_G
   against random 8x8 training images, each in a fresh subprocess (the call's own peak: the high-water mark reset
   before it and read after, ``/proc/self/status`` VmHWM; ``resource.getrusage`` maxrss where that is not
   available), and its growth over what was resident before the call;
5. **demo**: ``side demo`` wall time in a subprocess (interpreter start and imports included).

Torch and faiss run with ``threads`` threads (1 by default: the figures are per core, and oversubscribed
threads on a shared machine distort them).
"""
from __future__ import annotations

import dataclasses
import json
import os
import logging
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

from ..runs import read_json
from . import CALL_PEAK, machine_description, write_results
from .tables import render_compute_markdown

log = logging.getLogger(__name__)
SCHEMA = "side-extract/bench-compute/1"
PARTS = ("sampling", "guidance", "neighbors", "evaluate_rss", "demo", "busy_demo")


@dataclasses.dataclass(frozen=True)
class ComputeBenchConfig:
    """Sizes of the compute benchmark (defaults: the full run; :func:`quick_compute_config` for a smoke run)."""

    model: str = "demo"
    steps: int = 50
    batch_size: int = 64
    repeats: int = 5
    guidance_scale: float = 10.0
    classifier_classes: int = 100
    classifier_depth: int = 10
    classifier_width: int = 16
    nn_queries: int = 10_000
    nn_refs: int = 50_000
    nn_dims: tuple[int, ...] = (64, 256)
    nn_repeats: int = 3
    rss_sizes: tuple[int, ...] = (1_000, 10_000, 100_000)
    rss_n_train: int = 50_000
    demo: bool = True
    busy: bool = False
    busy_pairs: int = 2
    only: tuple[str, ...] = ()
    threads: int = 1
    quick: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "repeats", "classifier_classes", "nn_queries", "nn_refs", "nn_repeats",
                     "rss_n_train", "threads", "busy_pairs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.classifier_classes < 2:
            raise ValueError(f"classifier_classes={self.classifier_classes} must be >= 2")
        if any(n <= 0 for n in self.rss_sizes) or any(d <= 0 for d in self.nn_dims):
            raise ValueError(f"rss_sizes={self.rss_sizes} and nn_dims={self.nn_dims} must be positive")
        bad = [n for n in self.only if n not in PARTS]
        if bad:
            raise ValueError(f"only={list(self.only)}: each must be one of {', '.join(PARTS)}")
        for name, on, why in (("demo", self.demo, "--quick and --no-demo turn it off"),
                              ("busy_demo", self.busy, "--busy turns it on")):
            if name in self.only and not on:
                raise ValueError(f"only={list(self.only)} names {name!r}, but that part is off ({why})")


def quick_compute_config() -> ComputeBenchConfig:
    """``--quick``: 10 steps, 2 repeats, 2k x 10k neighbours, N_G 1k and 5k vs 5k, no demo; well under a minute."""
    return ComputeBenchConfig(steps=10, repeats=2, nn_queries=2_000, nn_refs=10_000, nn_dims=(64,), nn_repeats=2,
                              rss_sizes=(1_000, 5_000), rss_n_train=5_000, demo=False, quick=True)


# --------------------------------------------------------------------------------------------------
# timing


def interleaved(fns: dict[str, Callable[[int], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each function per repeat, the order alternating (forward on even repeats, reversed on odd)."""
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name](r)
            out[name].append(time.perf_counter() - t0)
    return out


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over repeats of the per-repeat ratio num / den (pairs measured in the same repeat)."""
    return float(statistics.median(a / b for a, b in zip(num, den)))


def _summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": round(statistics.median(times), 4), "all_s": [round(t, 4) for t in times]}


# --------------------------------------------------------------------------------------------------
# 1. sampling vs DDIMPipeline


def bench_sampling(c: ComputeBenchConfig, denoiser: Any) -> dict[str, Any]:
    """Our unguided DDIM loop vs ``DDIMPipeline`` (same UNet, scheduler config, steps, batch, per-sample noise)."""
    from diffusers import DDIMPipeline

    from ..sampling import sample, sample_generators

    pipe = DDIMPipeline(unet=denoiser.unet, scheduler=denoiser.scheduler)
    pipe.set_progress_bar_config(disable=True)
    n = c.batch_size

    def ours(r: int) -> torch.Tensor:
        return sample(denoiser, n, seed=r, steps=c.steps, batch_size=n)

    def theirs(r: int) -> torch.Tensor:
        return pipe(batch_size=n, generator=sample_generators(r, np.arange(n)), eta=0.0,
                    num_inference_steps=c.steps, output_type="pt").images

    diff = float((ours(0) / 2 + 0.5 - theirs(0)).abs().max())  # warm-up, and the images must agree
    times = interleaved({"ours": ours, "diffusers": theirs}, c.repeats)
    return {"what": f"unguided DDIM, {n} images x {c.steps} steps, batch {n}", "ours": _summary(times["ours"]),
            "diffusers_ddim_pipeline": _summary(times["diffusers"]),
            "ratio": round(median_ratio(times["ours"], times["diffusers"]), 3),
            "ratio_is": "ours / DDIMPipeline, median of per-repeat ratios", "max_abs_pixel_diff": diff}


# --------------------------------------------------------------------------------------------------
# 2. guided extraction vs its floor


def bench_guidance(c: ComputeBenchConfig, denoiser: Any) -> dict[str, Any]:
    """Guided sampling per image vs unguided sampling + classifier forward/backward at every step."""
    from ..guidance import ClassifierGuidance, log_prob_grad
    from ..models.classifier import ClassifierArch, NoiseAwareResNet
    from ..sampling import inference_scheduler, sample

    C, H, _ = denoiser.sample_shape
    T = denoiser.scheduler.config.num_train_timesteps
    from .. import config as cfg

    own = cfg.ClassifierConfig()  # the time input as the audit's classifiers have it (ClassifierArch's own default,
    # time_blocks "first", is 22 % fewer weights than the demo's "every": its guided step ran 1.11x faster)
    arch = ClassifierArch(num_classes=c.classifier_classes, in_channels=C, image_size=H, depth=c.classifier_depth,
                          width=c.classifier_width, time_mode=own.time_mode, time_embed_dim=own.time_embed_dim,
                          time_blocks=own.time_blocks)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clf = NoiseAwareResNet(arch).eval()
    n = c.batch_size
    labels = np.arange(n) % c.classifier_classes
    guide = ClassifierGuidance(clf, np.arange(c.classifier_classes), c.guidance_scale, num_train_timesteps=T)
    timesteps = inference_scheduler(denoiser.scheduler, "ddim", c.steps).timesteps
    x = torch.randn((n, C, H, H), generator=torch.Generator().manual_seed(0))
    y = torch.from_numpy(labels)

    def guided(r: int) -> None:
        sample(denoiser, n, seed=r, steps=c.steps, batch_size=n, guidance=guide, labels=labels, clip_eps=True)

    def unguided(r: int) -> None:
        sample(denoiser, n, seed=r, steps=c.steps, batch_size=n, clip_eps=True)

    def classifier(_r: int) -> None:
        for t in timesteps:
            log_prob_grad(clf, x, t, y)

    for f in (guided, unguided, classifier):
        f(0)  # warm-up
    times = interleaved({"guided": guided, "unguided": unguided, "classifier": classifier}, c.repeats)
    floor = [a + b for a, b in zip(times["unguided"], times["classifier"])]
    per_image = {k: round(statistics.median(v) / n * 1000, 3) for k, v in times.items()}
    per_image["floor"] = round(statistics.median(floor) / n * 1000, 3)
    n_params = sum(p.numel() for p in clf.parameters())
    return {"what": f"{n} images x {c.steps} DDIM steps, lambda {c.guidance_scale}, classifier depth {c.classifier_depth} "
                    f"width {c.classifier_width} ({n_params} parameters, {c.classifier_classes} classes)",
            "guided": _summary(times["guided"]), "unguided": _summary(times["unguided"]),
            "classifier_fwd_bwd": _summary(times["classifier"]), "floor": _summary(floor),
            "per_image_ms": per_image, "ratio": round(median_ratio(times["guided"], floor), 3),
            "ratio_is": "guided / (unguided + classifier forward and backward), median of per-repeat ratios",
            "guided_over_unguided": round(median_ratio(times["guided"], times["unguided"]), 3)}


# --------------------------------------------------------------------------------------------------
# 3. nearest neighbours vs bare faiss


def bench_neighbors(c: ComputeBenchConfig) -> list[dict[str, Any]]:
    """Exact top-1 rms-l2 of ``nn_queries`` random uint8 rows among ``nn_refs``, per dimension in ``nn_dims``."""
    import faiss

    from ..neighbors import NearestNeighborIndex

    faiss.omp_set_num_threads(c.threads)
    rows = []
    for d in c.nn_dims:
        rng = np.random.default_rng(d)
        R = rng.integers(0, 256, (c.nn_refs, d), dtype=np.uint8)
        Q = rng.integers(0, 256, (c.nn_queries, d), dtype=np.uint8)
        results: dict[str, Any] = {}

        def ours(backend: str) -> Callable[[int], None]:
            def fn(_r: int) -> None:
                results[backend] = NearestNeighborIndex("rms-l2", backend=backend).fit(R).kneighbors(Q, 1)
            return fn

        def bare(_r: int) -> None:
            index = faiss.IndexFlatL2(d)
            index.add(R.astype(np.float32))
            results["bare"] = index.search(Q.astype(np.float32), 1)

        fns = {"faiss_backend": ours("faiss"), "torch_backend": ours("torch"), "bare_faiss": bare}
        interleaved(fns, 1)  # warm-up (the first repeat's first function ran cold)
        times = interleaved(fns, c.nn_repeats)
        dist, idx = results["bare"]
        bare_rms = np.sqrt(np.maximum(dist[:, 0].astype(np.float64), 0) / (255.0**2 * d))
        agree = {b: {"same_index": float((results[b].indices[:, 0] == idx[:, 0]).mean()),
                     "max_abs_distance_diff": float(np.abs(results[b].scores[:, 0] - bare_rms).max())}
                 for b in ("faiss", "torch")}
        rows.append({"what": f"exact top-1 rms-l2, {c.nn_queries} queries x {c.nn_refs} references, D = {d}, uint8",
                     "dim": d, "faiss_backend": _summary(times["faiss_backend"]),
                     "torch_backend": _summary(times["torch_backend"]), "bare_faiss_indexflatl2": _summary(times["bare_faiss"]),
                     "ratio_faiss_backend": round(median_ratio(times["faiss_backend"], times["bare_faiss"]), 3),
                     "ratio_torch_backend": round(median_ratio(times["torch_backend"], times["bare_faiss"]), 3),
                     "ratio_is": "ours / bare IndexFlatL2 (float32 conversion included), median of per-repeat ratios",
                     "agreement_with_bare": agree})
    return rows


# --------------------------------------------------------------------------------------------------
# 4. peak RSS of evaluate, one fresh process per N_G

_RSS_CHILD = "import sys; from side_extract.bench.compute import evaluate_rss_child as f; f(*map(int, sys.argv[1:]))"


def evaluate_rss_child(n_generated: int, n_train: int, threads: int = 1, side: int = 8, channels: int = 1) -> None:
    """(Run in a fresh process.) Evaluate random ``side`` x ``side`` x ``channels`` generations (1 % planted
    copies) against random training images; print one JSON line."""
    import resource

    from .. import config as cfg
    from ..data import ImageSet
    from ..evaluation import evaluate

    torch.set_num_threads(threads)

    def status_mb(key: str) -> float | None:  # /proc/self/status's VmRSS (in use) or VmHWM (peak), kB
        try:
            status = Path("/proc/self/status").read_text(encoding="utf-8", errors="replace").splitlines()
            line = next(x for x in status if x.startswith(key + ":"))
        except (OSError, StopIteration):
            return None
        return int(line.split()[1]) / 1024

    def reset_peak() -> bool:  # Linux: VmHWM starts again from what is in use now
        try:
            Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
        except OSError:
            return False
        return status_mb("VmHWM") is not None

    rng = np.random.default_rng(0)
    train = ImageSet(rng.integers(0, 256, (n_train, side, side, channels), dtype=np.uint8))
    gen = rng.integers(0, 256, (n_generated, side, side, channels), dtype=np.uint8)
    planted = rng.choice(n_generated, max(1, n_generated // 100), replace=False)
    gen[planted] = train.images[rng.integers(0, n_train, len(planted))]
    c = cfg.EvaluateConfig(bands="low=0.30:0.32,mid=0.2:0.30,high=0:0.2")
    evaluate(ImageSet(gen[:10]), ImageSet(train.images[:100]), c)  # import and warm the libraries first
    # the call's own peak: the lifetime high-water mark (getrusage) was set before it, by the data and the warm-up,
    # and hid it (every committed row read 842.7 MB before and at the peak, at N_G 1,000 and 100,000 alike)
    own = reset_peak()
    before = status_mb("VmRSS") if own else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    r = evaluate(ImageSet(gen), train, c)
    seconds = time.perf_counter() - t0
    peak = status_mb("VmHWM") if own else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n_generated": n_generated, "n_train": n_train, "dims": side * side * channels,
                      "seconds": round(seconds, 2), "rss_before_mb": round(before, 1),
                      "peak_rss_mb": round(peak, 1), "peak_is": CALL_PEAK if own else "the process's lifetime",
                      "train_set_mb": round(train.images.nbytes / 2**20, 1),
                      "ams_high": r.ams["high"], "planted_fraction": len(planted) / n_generated}))


def evaluate_rss(n_generated: int, n_train: int, threads: int = 1, side: int = 8, channels: int = 1) -> dict[str, Any]:
    """:func:`evaluate_rss_child` in a fresh process; its JSON row."""
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, *map(str, (n_generated, n_train, threads, side, channels))],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluate RSS child for N_G={n_generated}, {n_train} training images failed:\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_evaluate_rss(c: ComputeBenchConfig) -> list[dict[str, Any]]:
    return [evaluate_rss(n, c.rss_n_train, c.threads) for n in c.rss_sizes]


# --------------------------------------------------------------------------------------------------
# 5. side demo


def bench_demo(c: ComputeBenchConfig, threads: int | None = None) -> dict[str, Any]:
    """``side --no-progress --threads T demo`` in a subprocess, into a fresh temporary run directory."""
    with tempfile.TemporaryDirectory(prefix="side-bench-demo-") as tmp:
        out = Path(tmp) / "demo"
        args = ["--no-progress", "--threads", str(c.threads if threads is None else threads), "demo", "--out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "side_extract.cli.main", *args], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"side demo failed:\n{proc.stderr[-2000:]}")
        stages = {k: v.get("seconds") for k, v in read_json(out / "manifest.json")["stages"].items()}
        metrics = {m.parent.name: read_json(m) for m in sorted((out / "evaluation").glob("*/metrics.json"))}
    return {"command": "side " + " ".join(a if a != str(out) else "<tmp>/demo" for a in args),
            "wall_s": round(wall, 1), "stage_seconds": stages,
            "ams_high": {m: v["ams"].get("high") for m, v in metrics.items()}}


# --------------------------------------------------------------------------------------------------
# 6. side demo on a busy machine

COMPETITOR = """
import torch
x = torch.randn(1500, 1500)
while True:
    x = torch.tanh(x @ x / 1500.0)
"""


def bench_busy_demo(c: ComputeBenchConfig) -> dict[str, Any]:
    """``side demo`` with its default thread choice (``--threads 0``: the cores free now) on an idle machine and
    beside a CPU-bound competitor (a torch matmul loop on torch's default threads, as another user's job would run),
    in ``busy_pairs`` pairs whose order alternates (idle first, then busy first: drift in the machine's load
    favours neither); the slowdown is the median of the pairs' busy / idle wall times (goal: at most 2.5). One
    pair, idle first, was all it measured before: one draw of a noisy machine's load."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}  # as a user's job

    def busy() -> dict[str, Any]:
        comp = subprocess.Popen([sys.executable, "-c", COMPETITOR], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        try:
            time.sleep(3)  # let it spin up
            return bench_demo(c, threads=0)
        finally:
            comp.kill()
            comp.wait()

    def idle() -> dict[str, Any]:
        return bench_demo(c, threads=0)

    pairs = []
    for i in range(c.busy_pairs):
        first, second = (idle, busy) if i % 2 == 0 else (busy, idle)
        a, b = first(), second()
        calm, loaded = (a, b) if i % 2 == 0 else (b, a)
        pairs.append({"first": "idle" if i % 2 == 0 else "busy", "idle": calm, "busy": loaded,
                      "slowdown": round(loaded["wall_s"] / calm["wall_s"], 3)})
    return {"idle": {**pairs[0]["idle"], "wall_s": round(statistics.median(p["idle"]["wall_s"] for p in pairs), 1)},
            "busy": {**pairs[0]["busy"], "wall_s": round(statistics.median(p["busy"]["wall_s"] for p in pairs), 1)},
            "pairs": pairs, "slowdown": round(statistics.median(p["slowdown"] for p in pairs), 2),
            "slowdown_is": "median of the pairs' busy / idle wall times, the order alternating (idle and busy walls: "
                           "medians)", "competitor": "python -c '<torch matmul loop, default threads>'"}


# --------------------------------------------------------------------------------------------------


def run_compute_bench(c: ComputeBenchConfig, *, command: str | None = None,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every part; returns the results dict (``compute.json``). ``progress(name)`` is told each part."""
    from ..models.target import load_target, model_fingerprint

    say = progress or (lambda _name: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(c.threads)
    try:
        t_start = time.perf_counter()
        data: dict[str, Any] = {"schema": SCHEMA, "quick": c.quick, "command": command, "machine": machine_description(),
                                "config": dataclasses.asdict(c)}
        denoiser = load_target(c.model)
        data["model"] = {"spec": c.model, "fingerprint": model_fingerprint(c.model),
                         "sample_shape": list(denoiser.sample_shape),
                         "parameters": sum(p.numel() for p in denoiser.unet.parameters())}
        parts: list[tuple[str, Callable[[], Any]]] = [
            ("sampling", lambda: bench_sampling(c, denoiser)), ("guidance", lambda: bench_guidance(c, denoiser)),
            ("neighbors", lambda: bench_neighbors(c)), ("evaluate_rss", lambda: bench_evaluate_rss(c))]
        if c.demo:
            parts.append(("demo", lambda: bench_demo(c)))
        if c.busy:
            parts.append(("busy_demo", lambda: bench_busy_demo(c)))
        if c.only:  # (names checked by the config)
            parts = [(n, fn) for n, fn in parts if n in c.only]
        seconds = {}
        for name, fn in parts:
            say(name)
            t0 = time.perf_counter()
            data[name] = fn()
            seconds[name] = round(time.perf_counter() - t0, 1)
        data["part_seconds"] = seconds
        data["seconds"] = round(time.perf_counter() - t_start, 1)
    finally:
        torch.set_num_threads(previous)
    return data


def write_compute_results(data: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``compute.json`` + ``compute.md`` in ``out``: ``compute-quick.*`` for a ``--quick`` run,
    ``compute[-quick]-<parts>.*`` for some of the parts (a quick partial run overwrote the quick run's whole file)."""
    only = (data.get("config") or {}).get("only") or []
    stem = "compute" + ("-quick" if data.get("quick") else "") + "".join(f"-{p}" for p in only)
    return write_results(out, stem, data, render_compute_markdown)


__all__ = ["ComputeBenchConfig", "quick_compute_config", "run_compute_bench", "write_compute_results",
           "render_compute_markdown", "interleaved", "median_ratio", "bench_sampling", "bench_guidance",
           "bench_neighbors", "bench_evaluate_rss", "bench_demo", "bench_busy_demo", "evaluate_rss", "evaluate_rss_child"]
