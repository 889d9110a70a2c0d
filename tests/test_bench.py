"""Benchmarks: the SIDE / best-baseline ratios on hand-made metrics, and extraction.json's schema on a tiny run."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from side_extract import config as cfg
from side_extract.bench.compute import ComputeBenchConfig, interleaved, median_ratio
from side_extract.bench.extraction import (ExtractionBenchConfig, ratios_to_best_baseline, run_extraction_bench,
                                           write_extraction_results)
from side_extract.bench.tables import _ratio_cell, render_extraction_markdown


def metrics(ams_high: float, ums_high: float, p95: float, carlini: float, gu: float) -> dict:
    """The parts of a metrics.json the ratios read (rms-l2: p95 is a distance)."""
    return {"orientation": "distance", "ams": {"high": ams_high, "low": 0.5}, "ums": {"high": ums_high, "low": 0.0},
            "ams_cumulative": {"high": ams_high, "low": 0.5}, "ums_cumulative": {"high": ums_high, "low": 0.0},
            "p95": p95, "carlini": {"extracted_fraction": carlini}, "gu": {"memorized_fraction": gu}}


def test_ratio_to_best_baseline_by_hand():
    methods = {"side": metrics(0.30, 0.10, 0.05, 0.20, 0.0), "side-teacher": metrics(0.10, 0.02, 0.20, 0.0, 0.1),
               "cond": metrics(0.10, 0.05, 0.10, 0.05, 0.0), "uncond": metrics(0.15, 0.01, 0.25, 0.10, 0.0)}
    r = ratios_to_best_baseline(methods)
    assert set(r) == {"side", "side-teacher"}
    s = r["side"]
    # the best baseline differs per metric: UnCond for AMS (0.15), Cond for UMS (0.05) and p95 (0.10)
    assert s["ams/high"] == {"side": 0.30, "best_baseline": 0.15, "best_baseline_method": "uncond", "ratio": 2.0,
                             "better": "higher", "side_better": True, "tied_baselines": []}
    assert s["ums/high"]["best_baseline_method"] == "cond" and s["ums/high"]["ratio"] == pytest.approx(2.0)
    assert s["p95"]["best_baseline_method"] == "cond" and s["p95"]["better"] == "lower"
    assert s["p95"]["ratio"] == pytest.approx(0.5) and s["p95"]["side_better"]  # closer = better for a distance
    assert s["carlini"]["ratio"] == pytest.approx(2.0) and s["carlini"]["best_baseline_method"] == "uncond"
    # a zero baseline gives no ratio, but keeps both values; equal values are not a win
    assert s["gu"]["ratio"] is None and s["gu"]["side"] == 0.0 and not s["gu"]["side_better"]
    assert s["gu"]["best_baseline_method"] == "cond" and s["gu"]["tied_baselines"] == ["uncond"]  # both at 0: a tie
    # (the report said "vs cond" where Cond and UnCond tied: now "vs cond = uncond")
    assert s["ums/low"]["ratio"] is None and not s["ums/low"]["side_better"]
    t = r["side-teacher"]
    assert t["ams/high"]["ratio"] == pytest.approx(10 / 15) and not t["ams/high"]["side_better"]
    assert t["p95"]["ratio"] == pytest.approx(2.0) and not t["p95"]["side_better"]
    assert t["gu"]["ratio"] is None and t["gu"]["side"] == 0.1  # SIDE found some, the baselines none
    # only the methods present count; no baseline -> no ratios
    assert set(ratios_to_best_baseline({"side": methods["side"], "cond": methods["cond"]})["side"]["ams/high"]) >= {"ratio"}
    assert ratios_to_best_baseline({"side": methods["side"]}) == {}


def test_a_zero_best_baseline_reads_as_none_found_only_where_more_is_more():
    # p95 as a distance: a best baseline at 0 came closer than SIDE, which the cell said was "∞" (none found)
    r = ratios_to_best_baseline({"side": metrics(0.3, 0.1, 0.02, 0.2, 0.1), "cond": metrics(0.1, 0.0, 0.0, 0.1, 0.0)})
    s = r["side"]
    assert s["p95"]["ratio"] is None and not s["p95"]["side_better"] and _ratio_cell(s["p95"]) == "∞ (baseline 0)"
    assert s["gu"]["ratio"] is None and _ratio_cell(s["gu"]) == "∞ ✓"  # SIDE found some, the baselines none
    assert _ratio_cell({**s["gu"], "side": 0.0}) == "0/0"


def test_interleaved_timing_and_median_ratio():
    order = []
    times = interleaved({"a": lambda r: order.append(("a", r)), "b": lambda r: order.append(("b", r))}, 3)
    assert order == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert len(times["a"]) == len(times["b"]) == 3
    assert median_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0


TINY_CLF = cfg.ClassifierConfig(depth=10, width=8, steps=4, batch_size=16, eval_every=2)


def tiny_bench() -> ExtractionBenchConfig:
    """Two scales of a tiny (4, 8) UNet trained 3 steps; N_G 6; one lambda and one K / tau sweep value."""
    run = cfg.RunConfig(
        sample=cfg.SampleConfig(n=24, steps=2, shard_size=16),
        surrogate=cfg.SurrogateConfig(n_clusters=3, tau=-1.0, n_init=1),
        classifier=TINY_CLF, clean_classifier=TINY_CLF,
        extract=cfg.ExtractConfig(methods=("side", "side-teacher", "cond", "uncond"), n=6, steps=2, scale=1.0, seed=3,
                                  eta=0.0),  # the benchmarks pin the paper's deterministic DDIM
        evaluate=cfg.EvaluateConfig(carlini_n=5, quality=("pixels",), quality_max_reference=200),
    )
    target = cfg.TrainTargetConfig(block_out_channels=(4, 8), norm_num_groups=4, steps=3, batch_size=8,
                                   checkpoint_every=3)
    return ExtractionBenchConfig(scales=(20, 30), size=8, target=target, run=run, lambdas=(0.0, 1.0),
                                 n_clusters=(2, 3), taus=(-1.0,), sweep_scale=20, sweep_n_generated=4, quick=True)


def test_extraction_json_schema_on_a_tiny_run(tmp_path, one_thread):
    bc = tiny_bench()
    data = run_extraction_bench(bc, tmp_path / "cache", command="side bench extraction --quick")
    json_path, md_path = write_extraction_results(data, tmp_path / "out")
    assert json_path.name == "extraction-quick.json"
    d = json.loads(json_path.read_text())
    assert d["command"] == "side bench extraction --quick" and d["seed"] == 3
    assert {"platform", "cpu_count", "torch"} <= set(d["machine"])
    assert [s["n_train"] for s in d["scales"]] == [20, 30]
    for s in d["scales"]:
        assert s["n_generated"] == 6
        assert set(s["methods"]) == {"side", "side-teacher", "cond", "uncond"}
        for m, met in s["methods"].items():
            assert met["schema"] == "side-extract/metrics/1" and met["method"] == m
            assert met["n_generated"] == 6 and met["n_train"] == s["n_train"]
            assert met["bands_source"].startswith("file:")  # bands calibrated once per training set
        assert set(s["ratios"]) == {"side", "side-teacher"} and "p95" in s["ratios"]["side"]
        assert s["target"]["trained_now"] and s["target"]["epochs"] == pytest.approx(3 * 8 / s["n_train"], abs=0.1)
    # the two scales have their own bands (held-out null of each training set)
    assert d["scales"][0]["bands"] != d["scales"][1]["bands"]
    sw = d["scales"][0]["sweeps"]
    assert [p["value"] for p in sw["scale"]["points"]] == [0.0, 1.0]  # 1.0 is the main setting, from the parent
    assert set(sw["scale"]["points"][0]["methods"]) == {"side", "cond"} and "uncond" in sw["scale"]
    lam0 = sw["scale"]["points"][0]["methods"]
    assert lam0["side"]["ams"] == lam0["cond"]["ams"] == sw["scale"]["uncond"]["ams"]  # lambda 0: no guidance
    assert [p["value"] for p in sw["n_clusters"]["points"]] == [2, 3]
    assert [p["value"] for p in sw["tau"]["points"]] == [-1.0]
    assert "sweeps" not in d["scales"][1]
    md = md_path.read_text()
    assert "SIDE / best baseline" in md and "lambda sweep" in md and "K sweep" in md
    assert render_extraction_markdown(d) == md
    # another seed (a held-out replicate) reuses the cached targets but redraws everything downstream of
    # them: its own synthetic set, clustering and classifiers, nothing shared with the first replicate
    # (side-teacher left out: on this 3-step target the teacher may label every sample with one class)
    held_out = dataclasses.replace(bc.run, extract=dataclasses.replace(bc.run.extract, seed=4,
                                                                       methods=("side", "cond", "uncond")))
    again = run_extraction_bench(dataclasses.replace(bc, run=held_out, lambdas=(2.00000025,), n_clusters=(), taus=()),
                                 tmp_path / "cache")
    assert again["seed"] == 4 and not any(s["target"]["trained_now"] for s in again["scales"])
    # a value named alike to 6 digits (its folder: scale=2) is its sweep's own point (read back from the folder's
    # name it was 2.0, no value asked for: dropped)
    assert [p["value"] for p in again["scales"][0]["sweeps"]["scale"]["points"]] == [1.0, 2.00000025]
    run4, run3 = Path(again["scales"][0]["run"]), Path(d["scales"][0]["run"])
    stages = json.loads((run4 / "manifest.json").read_text())["stages"]
    assert run4.name == "rep-4" and run3.name == "rep-3"
    assert not any(v.get("shared_from") for v in stages.values())
    assert set(again["scales"][0]["stage_seconds"]) >= {"synthetic", "classifier", "extraction/side", "evaluation/side"}
    from side_extract.data import load_shards

    assert not np.array_equal(load_shards(run4 / "synthetic").images, load_shards(run3 / "synthetic").images)


def test_compute_parts_named_in_only_are_checked_before_the_work():
    from side_extract.bench.compute import ComputeBenchConfig, quick_compute_config

    quick = quick_compute_config()
    # --quick turns the demo off: --only demo with --quick was refused as "not one of sampling, ..." (no reason)
    with pytest.raises(ValueError, match="names 'demo', but that part is off \\(--quick and --no-demo"):
        dataclasses.replace(quick, only=("demo",))
    with pytest.raises(ValueError, match="names 'busy_demo', but that part is off"):
        ComputeBenchConfig(only=("busy_demo",))
    with pytest.raises(ValueError, match="only=\\['sampler'\\]: each must be one of sampling, guidance"):
        ComputeBenchConfig(only=("sampler",))  # found before the model loads, not after
    assert dataclasses.replace(quick, only=("neighbors",)).only == ("neighbors",)
    from typer.testing import CliRunner

    from side_extract.cli.main import app

    r = CliRunner().invoke(app, ["bench", "compute", "--quick", "--only", "demo", "--out", "/nonexistent/x"])
    assert r.exit_code != 0 and "--quick and --no-demo turn it off" in r.output


def test_a_scale_past_the_largest_balanced_digits_subset_is_refused_up_front():
    """Scales 1749..1796 passed the check (below 1797) and failed on loading digits:N, after the smaller scales had
    trained their targets and made their audits."""
    with pytest.raises(ValueError, match="scales: 1749 must be between 2 and 1748"):
        dataclasses.replace(tiny_bench(), scales=(20, 1749))
    assert dataclasses.replace(tiny_bench(), scales=(20, 1748)).scales == (20, 1748)


def test_the_bands_cache_follows_the_similarity_file_it_names(tmp_path):
    """`ensure_bands` named its cache folder by the similarity string: another TorchScript network saved under the
    same path was served the first one's bands, and every benchmark run (keyed by the file's bytes) was redone and
    scored against them."""
    import torch

    from side_extract.bench.extraction import ensure_bands
    from side_extract.data import load_digits_set
    from side_extract.evaluation import calibrate, digits_complement
    from side_extract.runs import fingerprint_of

    script = tmp_path / "embed.pt"

    def save(seed):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
        torch.jit.script(net).save(str(script))

    from side_extract.data import ImageSet
    train, heldout = load_digits_set(40), ImageSet(digits_complement("digits:40").images[:300])
    c = cfg.EvaluateConfig(similarity=f"cosine:torchscript:{script}", calibration_quantiles=(0.01, 0.1, 0.3))
    save(0)
    first = ensure_bands(train, heldout, c, tmp_path / "cache", "t")
    assert ensure_bands(train, heldout, c, tmp_path / "cache", "t") == first  # the same file: the same bands
    save(1)
    second = ensure_bands(train, heldout, c, tmp_path / "cache", "t")
    assert second != first
    calibrate(train, heldout, c).write(tmp_path / "fresh")
    fresh = json.loads((tmp_path / "fresh" / "bands.json").read_text())
    assert json.loads(second.read_text())["bands"] == fresh["bands"]
    pixel = cfg.EvaluateConfig(calibration_quantiles=(0.01, 0.1, 0.3))  # pixel bands keep their folder name
    assert ensure_bands(train, heldout, pixel, tmp_path / "cache", "t").parent.name == "t-" + fingerprint_of(
        {"similarity": pixel.similarity, "quantiles": [0.01, 0.1, 0.3], "resize": None}, train.fingerprint(),
        heldout.fingerprint(), None)[:12]


def test_the_evaluate_memory_figure_is_the_calls_own_peak():
    """The child read getrusage's lifetime high-water mark, which memory used before the call (the data, the
    warm-up) could set and hide the call behind: the committed rows read 842.7 MB before and at the peak at N_G
    1,000 and 100,000 alike. A gigabyte held and freed before the child's work no longer shows as its peak."""
    import subprocess
    import sys

    code = ("import resource, numpy as np; a = np.ones(2**30 // 8); del a; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); "
            "from side_extract.bench.compute import evaluate_rss_child; evaluate_rss_child(500, 2000)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    held, row = proc.stdout.strip().splitlines()[0], json.loads(proc.stdout.strip().splitlines()[-1])
    assert float(held) > 1000 and row["peak_is"] == "the call's", (held, row)  # (CALL_PEAK, as the tables read it)
    assert row["rss_before_mb"] <= row["peak_rss_mb"] < float(held), (held, row)


def test_the_flop_count_includes_attention():
    """On the CPU the counter saw no FLOPs in the fused attention kernel: QK^T and AV (2.8 % of cifar10-32's
    FLOPs) were left out of every FLOP figure and projected GPU time."""
    import torch
    import torch.nn.functional as F

    from side_extract.bench.scale import flops_per_image
    b, h, n, d = 1, 2, 16, 8
    q = torch.randn(b, h, n, d)
    assert flops_per_image(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * (2 * b * h * n * n * d)


@pytest.mark.parametrize("args,said", [
    (["fair", "--memguide-scales", "1,2"], "--memguide-scales is memguide's grid, and no entry is memguide"),
    (["fair", "--lora-scales", "1,2"], "--lora-scales is side-lora's grid, and no entry is side-lora"),
    (["extraction", "--quick", "--no-sweeps", "--sweep-n-generated", "7"],
     "--sweep-n-generated set the sweeps, which --no-sweeps leaves out"),
    (["compute", "--quick", "--only", "neighbors,neighbors"], "--only 'neighbors,neighbors' names neighbors more than"),
    (["scale", "--quick", "--only", "search,search"], "--only 'search,search' names search more than once"),
])
def test_bench_options_nothing_reads_are_refused_before_any_work(tmp_path, args, said):
    """Each was accepted (a review's find): a grid of a method no entry is, with the targets trained for it; sweep
    options under --no-sweeps, recorded in the command as if used; a part of --only named twice, run once and named
    twice in the results' file names."""
    from typer.testing import CliRunner

    from side_extract.cli.main import app

    r = CliRunner().invoke(app, ["--no-progress", "bench", *args, "--out", str(tmp_path / "o"),
                                 *(["--cache", str(tmp_path / "c")] if args[0] in ("fair", "extraction") else [])])
    assert r.exit_code == 2 and said in " ".join(r.output.split()), r.output
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def test_sweep_values_the_sweeps_would_refuse_are_refused_with_the_config():
    """A repeated lambda or K, or two taus alike to 6 digits, passed ExtractionBenchConfig and were refused by the
    sweeps only after every scale up to the sweep scale had trained its target and run its audit."""
    from side_extract.bench.extraction import ExtractionBenchConfig

    for kw, said in (({"lambdas": (2.0, 2.0)}, "must not repeat"), ({"n_clusters": (25, 25)}, "must not repeat"),
                     ({"taus": (0.3, 0.3000001)}, "both named tau=0.3")):
        with pytest.raises(ValueError, match=f"the sweeps .*{said}"):
            ExtractionBenchConfig(**kw)
    ExtractionBenchConfig(taus=(0.3, 0.31))
    # the lambda sweep checked with its own methods (it was checked with SIDE's: lambda_methods none of which reads
    # extract.scale passed, and run_sweeps refused it after the audits; a review's find)
    for methods in (("memguide",), ("side-lora", "uncond")):
        with pytest.raises(ValueError, match=r"the sweeps .*no method in extract.methods .* reads extract.scale"):
            ExtractionBenchConfig(lambda_methods=methods)
    ExtractionBenchConfig(lambda_methods=("uncond",))  # (no lambda sweep runs)


def test_results_are_written_before_their_table_is_drawn(tmp_path):
    """Every benchmark drew its Markdown table before writing its JSON: a table that could not be drawn lost the
    hours of measurements, and an earlier run's table stayed beside them."""
    from side_extract.bench import write_results

    (tmp_path / "fair.md").write_text("an earlier run's table")

    def broken(data):
        raise KeyError("ratio")

    with pytest.raises(KeyError):
        write_results(tmp_path, "fair", {"schema": "x", "rows": [1]}, broken)
    assert json.loads((tmp_path / "fair.json").read_text()) == {"schema": "x", "rows": [1]}
    assert not (tmp_path / "fair.md").exists()
    assert [p.name for p in write_results(tmp_path, "fair", {"a": 1}, lambda d: f"a = {d['a']}")] == ["fair.json",
                                                                                                     "fair.md"]
    assert (tmp_path / "fair.md").read_text() == "a = 1"


def test_the_busy_demo_is_measured_in_pairs_whose_order_alternates(monkeypatch):
    """One idle run, then one busy run, was the whole busy-demo figure (1.40 on a machine whose idle run was slower
    than its busy one in several stages): pairs now, idle first then busy first, the slowdown the median of the
    pairs' ratios; the table says how it was measured. (The demo runs are stand-ins here: the order and the
    arithmetic are what is tested.)"""
    import side_extract.bench.compute as compute
    from side_extract.bench.tables import render_compute_markdown

    from side_extract.bench import machine_description

    machine = machine_description()  # (before Popen is replaced below: it asks git for the code's commit)
    assert machine["code"] is None or len(machine["code"]["commit"]) == 40
    running, calls, walls = [], [], iter([100.0, 150.0, 130.0, 110.0, 90.0, 180.0])

    class Competitor:
        def __init__(self, *a, **k):
            running.append(self)

        def kill(self):
            running.remove(self)

        def wait(self):
            return 0

    def demo(c, threads=None):
        calls.append("busy" if running else "idle")
        return {"command": "side --no-progress --threads 0 demo --out <tmp>/demo", "wall_s": next(walls)}

    monkeypatch.setattr(compute, "bench_demo", demo)
    monkeypatch.setattr(compute.subprocess, "Popen", Competitor)
    monkeypatch.setattr(compute.time, "sleep", lambda s: None)
    out = compute.bench_busy_demo(ComputeBenchConfig(busy=True, busy_pairs=3))
    assert calls == ["idle", "busy", "busy", "idle", "idle", "busy"]
    assert [p["slowdown"] for p in out["pairs"]] == [1.5, round(130 / 110, 3), 2.0]
    assert out["slowdown"] == 1.5 and out["idle"]["wall_s"] == 100.0 and out["busy"]["wall_s"] == 150.0
    data = {"schema": "x", "command": "c", "machine": machine, "model": {"spec": "demo", "sample_shape": [1, 8, 8],
            "parameters": 1}, "seconds": 1.0, "part_seconds": {"busy_demo": 1.0}, "busy_demo": out}
    assert "median of 3 idle/busy pairs, the order alternating" in render_compute_markdown(data)
    with pytest.raises(ValueError, match="busy_pairs=0 must be a positive integer"):
        ComputeBenchConfig(busy_pairs=0)


def test_the_guidance_benchmark_times_a_classifier_of_the_audits_architecture(one_thread):
    """bench_guidance built ClassifierArch with its own default time input (time_blocks 'first': 340,788 weights),
    not the audit's ('every': 435,732 at the demo's depth 10 and width 16), and said it was the demo's size; its
    guided step ran 1.11x faster than the demo's."""
    import dataclasses

    from side_extract import config as cfg
    from side_extract.bench.compute import bench_guidance, quick_compute_config
    from side_extract.models.classifier import ClassifierArch, NoiseAwareResNet
    from side_extract.models.target import load_target

    c = dataclasses.replace(quick_compute_config(), steps=2, repeats=1, batch_size=4)
    own = cfg.ClassifierConfig()
    arch = ClassifierArch(num_classes=c.classifier_classes, in_channels=1, image_size=8, depth=c.classifier_depth,
                          width=c.classifier_width, time_mode=own.time_mode, time_embed_dim=own.time_embed_dim,
                          time_blocks=own.time_blocks)
    n = sum(p.numel() for p in NoiseAwareResNet(arch).parameters())
    assert f"({n} parameters" in bench_guidance(c, load_target(c.model))["what"]


def test_a_cached_target_another_process_is_training_is_waited_for(tmp_path):
    """A bench split over processes, started together on one cache: the second failed at once with the target's
    RunLocked while the first trained the target they share (the replicates' run directories were waited for, the
    target not; a review's find). It waits, and takes the target the first trained."""
    import subprocess
    import sys
    import time

    from side_extract.bench.extraction import ensure_target

    c = cfg.TrainTargetConfig(block_out_channels=(4, 8), norm_num_groups=4, steps=150, batch_size=8,
                              checkpoint_every=150)
    code = ("import torch; torch.set_num_threads(1)\n"
            "from pathlib import Path\n"
            "from side_extract import config as cfg\n"
            "from side_extract.bench.extraction import ensure_target\n"
            f"c = cfg.TrainTargetConfig(**{cfg.to_dict(c)!r})\n"
            f"print(ensure_target(c, 20, 8, Path({str(tmp_path)!r}))['trained_now'])\n")
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        t0 = time.time()
        while not any((tmp_path / "targets").glob("digits*/.lock")):  # (the first is training)
            assert first.poll() is None and time.time() - t0 < 60, "the first process did not start training"
            time.sleep(0.05)
        second = ensure_target(c, 20, 8, tmp_path)
    finally:
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 0 and out.strip() == "True", out
    assert second["trained_now"] is False and (Path(second["path"]) / "model_index.json").is_file()
