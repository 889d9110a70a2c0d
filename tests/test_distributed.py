"""Two processes (torchrun, gloo on the CPU) write the same run as one process, bit for bit: the synthetic set
and every method's generations (given the same trained models); the training stages are data-parallel (each
process trains on half of every batch), which changes weights within float rounding, so the guided methods are
compared on a copy of the one-process run's models. The top-k merge over shards is in test_properties; how a
launch starts, fails and says its errors, in test_distributed_launch (two files: each runs whole on one worker of
``make test``, and this one alone had been the suite's last several minutes)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from side_extract import config as cfg
from side_extract.data import load_shards
from side_extract.distributed import torchrun_command
from side_extract.models.target import build_unet
from side_extract.runs import read_json

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")


def _run(args, nproc, env_extra=None):
    """``side ARGS`` on ``nproc`` processes (torchrun's launch, as ``side --processes N`` makes it). One process (the
    reference a launch must equal) runs in this one, as ``side`` does: a process of its own spent ~10 s importing
    torch and diffusers again. ``side --processes N`` is its own process (it starts torchrun)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if nproc == 1 and "--processes" not in args:
        from typer.testing import CliRunner

        from side_extract.cli.main import app

        threads = torch.get_num_threads()
        try:
            r = CliRunner().invoke(app, list(args), env={"OMP_NUM_THREADS": "1", **(env_extra or {})})
        finally:
            torch.set_num_threads(threads)
        assert r.exit_code == 0, r.output[-4000:] + "".join(traceback.format_exception(r.exception))
        return subprocess.CompletedProcess(args, 0, r.stdout, r.stderr)
    if nproc == 1:
        cmd = [sys.executable, "-m", "side_extract.cli.main", *args]
    else:
        cmd = [*torchrun_command(nproc), *args]  # what `side --processes N` runs
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


METHODS = ("side", "cond", "uncond", "side-lora", "memguide")  # every extraction method the runs compare


def _config(tmp_path, tiny_model_dir):
    config = {"model": str(tiny_model_dir), "train": "digits:30",
              "sample": {"n": 24, "steps": 2, "shard_size": 5, "batch_size": 4},
              "surrogate": {"n_clusters": 3, "tau": -1.0, "n_init": 1},
              "classifier": {"depth": 10, "width": 8, "steps": 4, "batch_size": 16, "eval_every": 2},
              "clean_classifier": {"depth": 10, "width": 8, "steps": 4, "batch_size": 16, "eval_every": 2},
              "lora": {"rank": 2, "steps": 3, "batch_size": 8, "checkpoint_every": 2},
              "extract": {"methods": list(METHODS), "n": 14, "steps": 2, "scale": 1.0, "shard_size": 3,
                          "batch_size": 4},
              "evaluate": {"carlini_n": 5, "quality": ["pixels"], "quality_max_reference": 100}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return ["--threads", "1", "--no-progress", "run", str(tmp_path / "run.yaml"), "--no-report"]


def _same_shards(a_dir, b_dir):
    a, b = load_shards(a_dir), load_shards(b_dir)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.ids, b.ids)
    if a.labels is not None:
        np.testing.assert_array_equal(a.labels, b.labels)


def test_two_processes_equal_one(tiny_model_dir, tmp_path):
    common = _config(tmp_path, tiny_model_dir)
    _run([*common, "--out", str(tmp_path / "one")], 1)
    proc = _run([*common[:-1], "--out", str(tmp_path / "two")], 2)  # with the report: written once, by the main
    assert (proc.stdout + proc.stderr).count("report: ") == 1 and (tmp_path / "two" / "report" / "report.html").is_file()
    # torch's notes that are no fault of the run are not said once per process: the reducer's on the size-1 axes
    # of peft's 1x1 LoRA convolutions' gradients, and the deprecation of the all_reduce the global BatchNorm uses
    assert "Grad strides" not in proc.stderr and "is deprecated" not in proc.stderr, proc.stderr[-3000:]
    for stage in ("synthetic", "extraction/uncond", "extraction/memguide"):  # (memguide: its probe noise by index)
        _same_shards(tmp_path / "one" / stage, tmp_path / "two" / stage)
    stages = read_json(tmp_path / "two" / "manifest.json")["stages"]
    assert stages["synthetic"]["processes"] == 2 and all(v["status"] == "complete" for v in stages.values())
    for name in ("classifier", "classifier-clean"):  # trained data-parallel: each process half of every batch
        assert stages[name]["processes"] == 2 and stages[name]["rows_per_process"] == 8
        # BatchNorm normalises with the global batch's statistics on the CPU too (it used each process's own rows:
        # weights 0.04 apart after these 4 steps, where float rounding leaves them within 1e-5)
        a = load_file(str(tmp_path / "one" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "two" / name / "model.safetensors"))
        apart = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        assert apart < 1e-4, (name, apart)
    assert stages["lora"]["processes"] == 2
    # the evaluations are split between the processes (the i-th method to evaluate on process i mod 2)
    assert {stages[f"evaluation/{m}"]["evaluated_by"] for m in ("side", "cond", "uncond", "side-lora")} == {0, 1}

    # the guided methods with the same models: a copy of the one-process run without its generations
    shutil.copytree(tmp_path / "one", tmp_path / "three")
    manifest = read_json(tmp_path / "three" / "manifest.json")
    for stage in [k for k in manifest["stages"] if k.split("/")[0] in ("extraction", "evaluation", "calibration")]:
        del manifest["stages"][stage]
    (tmp_path / "three" / "manifest.json").write_text(json.dumps(manifest))
    for d in ("extraction", "evaluation", "calibration"):
        shutil.rmtree(tmp_path / "three" / d, ignore_errors=True)
    _run([*common, "--out", str(tmp_path / "three")], 2)
    for m in METHODS:
        _same_shards(tmp_path / "one" / "extraction" / m, tmp_path / "three" / "extraction" / m)
    for m in METHODS:  # evaluated by either process: the same numbers
        m1 = read_json(tmp_path / "one" / "evaluation" / m / "metrics.json")
        m3 = read_json(tmp_path / "three" / "evaluation" / m / "metrics.json")
        assert m1["ams"] == m3["ams"] and m1["ums"] == m3["ums"] and m1["carlini"] == m3["carlini"], m

    # a killed process's shards are missing: the rerun (2 processes) writes exactly those
    for k in (1, 2):  # one of each process
        (tmp_path / "two" / "synthetic" / f"shard-{k:05d}.npz").unlink()
    _run(["--processes", "2", *common, "--out", str(tmp_path / "two")], 1)  # the same launch, by side itself
    np.testing.assert_array_equal(load_shards(tmp_path / "two" / "synthetic").images,
                                  load_shards(tmp_path / "one" / "synthetic").images)
    entry = read_json(tmp_path / "two" / "manifest.json")["stages"]["synthetic"]
    assert entry["processes"] == 2 and entry["shards_written_now"] == 2  # each process wrote one missing shard (the
    # manifest counted the main process's only)
    # side extract on a finished run: the table and the findings said once, by the main process (not once each)
    proc = _run(["--threads", "1", "--no-progress", "extract", "--run", str(tmp_path / "two")], 2)
    said = proc.stdout + proc.stderr
    assert said.count("memorization (") == 1 and said.count("together:") == 1 and said.count("extractions in") == 1, \
        said[-3000:]


def test_rounds_are_written_in_parallel_and_equal_one_process(tiny_model_dir, tmp_path):
    """The stages made in rounds (adaptive allocation of SIDE's and side-lora's targets, memguide's avoidance): two
    processes write each round's shards in parallel (the main process two of the four) and wait for the round before
    the next; the images and targets equal one process's, given the same classifier and fine-tune."""
    config = {"model": str(tiny_model_dir), "train": "digits:30",
              "sample": {"n": 24, "steps": 2, "shard_size": 12, "batch_size": 4},
              "surrogate": {"n_clusters": 3, "tau": -1.0, "n_init": 1},
              "classifier": {"depth": 10, "width": 8, "steps": 4, "batch_size": 16, "eval_every": 2},
              "lora": {"rank": 4, "steps": 4, "batch_size": 8, "checkpoint_every": 2, "lr": 0.01},
              "extract": {"methods": ["side", "memguide", "side-lora"], "n": 12, "steps": 3, "scale": 1.0, "shard_size": 3,
                          "batch_size": 3, "rounds": 2, "allocation": "adaptive", "memguide_avoid": 1.0,
                          "memguide_avoid_h": 0.3, "memguide_avoid_t_lo": 0.0, "memguide_avoid_t_hi": 1.0,
                          "memguide_t_hi": 0.5}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    args = ["--threads", "1", "--no-progress", "extract", "--config", str(tmp_path / "run.yaml"), "--no-evaluate"]
    _run([*args, "--run", str(tmp_path / "one")], 1)
    shutil.copytree(tmp_path / "one", tmp_path / "two")  # the same classifier; the extractions made again
    manifest = read_json(tmp_path / "two" / "manifest.json")
    for m in ("side", "memguide", "side-lora"):
        del manifest["stages"][f"extraction/{m}"]
    (tmp_path / "two" / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(tmp_path / "two" / "extraction")
    _run([*args, "--run", str(tmp_path / "two")], 2)
    stages = read_json(tmp_path / "two" / "manifest.json")["stages"]
    for m in ("side", "memguide", "side-lora"):
        _same_shards(tmp_path / "one" / "extraction" / m, tmp_path / "two" / "extraction" / m)
        assert len(list((tmp_path / "two" / "extraction" / m).glob("shard-*.npz"))) == 4  # 2 rounds of 2 shards
        assert stages[f"extraction/{m}"]["processes"] == 2 and stages[f"extraction/{m}"]["shards_written_now"] == 4
    side = load_shards(tmp_path / "two" / "extraction" / "side")
    assert (side.labels >= 0).all()
    # side-lora's second round is the adaptive allocation's draw, not the uniform one (which it took before)
    from side_extract import config as cfg
    from side_extract.extraction import draw_targets
    from side_extract.models.target import load_target
    from side_extract.pipeline import method_guidance

    rc = cfg.from_dict(cfg.RunConfig, cfg.load_yaml(tmp_path / "two" / "config.yaml"))
    den, _ = method_guidance(tmp_path / "two", rc, "side-lora", load_target(tiny_model_dir))
    uniform = den.classes[den.target_outputs[draw_targets(rc.extract.seed, np.arange(12), len(den.target_outputs))]]
    lora = load_shards(tmp_path / "two" / "extraction" / "side-lora").labels
    assert np.array_equal(lora[:6], uniform[:6]) and not np.array_equal(lora[6:], uniform[6:])


def test_dedup_driven_stopping_stops_both_processes_where_one_stops(tiny_model_dir, tmp_path):
    """UnCond under dedup-driven stopping (every generation one image: U = 1/5 after round 1 of 4, 1/9 after round
    2) in two processes: each decides from the round's shards, both stop after 8 of 12, and the shards equal one
    process's."""
    config = {"model": str(tiny_model_dir),
              "extract": {"methods": ["uncond"], "n": 12, "steps": 2, "shard_size": 2, "batch_size": 2, "rounds": 3,
                          "dedup_threshold": 0.99, "stop_unseen": 0.15}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    args = ["--threads", "1", "--no-progress", "extract", "--config", str(tmp_path / "run.yaml"), "--no-evaluate"]
    _run([*args, "--run", str(tmp_path / "one")], 1)
    _run([*args, "--run", str(tmp_path / "two")], 2)
    _same_shards(tmp_path / "one" / "extraction" / "uncond", tmp_path / "two" / "extraction" / "uncond")
    entry = read_json(tmp_path / "two" / "manifest.json")["stages"]["extraction/uncond"]
    assert entry["stopped"]["at"] == 8 and entry["processes"] == 2 and entry["shards_written_now"] == 4  # (both
    # processes' shards: the main one's alone were counted)
    assert len(list((tmp_path / "two" / "extraction" / "uncond").glob("shard-*.npz"))) == 4


def test_classifiers_trained_by_the_main_process_alone_equal_one_process(tiny_model_dir, tmp_path):
    """``classifier.data_parallel: false``: under a launch the main process trains the classifiers alone while the
    other waits (data-parallel on one CPU took the demo 2.6x as long): the classifiers are the one-process run's bit
    for bit, and so are the guided methods' generations; who trains is no part of the stage's fingerprint."""
    common = _config(tmp_path, tiny_model_dir)
    config = yaml.safe_load((tmp_path / "run.yaml").read_text())
    config["extract"]["methods"] = ["side", "cond"]
    for name in ("classifier", "clean_classifier"):
        config[name]["data_parallel"] = False
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    _run([*common, "--out", str(tmp_path / "one")], 1)
    _run([*common, "--out", str(tmp_path / "two")], 2)
    stages = read_json(tmp_path / "two" / "manifest.json")["stages"]
    for name in ("classifier", "classifier-clean"):
        assert stages[name]["processes"] == 1 and stages[name]["rows_per_process"] == 16, stages[name]
        a = load_file(str(tmp_path / "one" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "two" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for m in ("side", "cond"):
        _same_shards(tmp_path / "one" / "extraction" / m, tmp_path / "two" / "extraction" / m)
    from side_extract.pipeline import classifier_settings

    c = cfg.from_dict(cfg.ClassifierConfig, config["classifier"])
    assert classifier_settings(c, clean=False) == classifier_settings(dataclasses.replace(c, data_parallel=True),
                                                                      clean=False)


def test_data_parallel_target_training_equals_one_process(tmp_path):
    """``side train-target`` under torchrun: each process trains on half of every batch and the gradients are
    averaged, so two processes end at one process's weights (within float rounding; the UNet has no BatchNorm)
    and both processes hold the same weights (checked by the trainer)."""
    args = ["--threads", "1", "--no-progress", "train-target", "--data", "digits:40", "--resize", "8",
            "--block-out-channels", "8,16", "--norm-num-groups", "4", "--steps", "6", "--batch-size", "8", "--checkpoint-every", "3"]
    _run([*args, "--out", str(tmp_path / "one")], 1)
    _run([*args, "--out", str(tmp_path / "two")], 2)
    a = load_file(str(tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "unet" / "diffusion_pytorch_model.safetensors"))
    c = cfg.from_dict(cfg.TrainTargetConfig, yaml.safe_load((tmp_path / "one" / "train_config.yaml").read_text()))
    with torch.random.fork_rng():
        torch.manual_seed(c.seed)
        init = build_unet(c, (1, 8, 8)).state_dict()
    assert a.keys() == b.keys()
    moved = sum(float((a[k] - init[k]).pow(2).sum()) for k in a) ** 0.5
    apart = sum(float((b[k] - a[k]).pow(2).sum()) for k in a) ** 0.5
    # Adam's six steps moved the weights by `moved`; the two runs differ by float rounding only (a gradient of
    # one half of the batch, or of the two halves unaveraged, gives a different direction: a ratio near 1)
    assert moved > 0.1 and apart < 1e-3 * moved, (moved, apart)
    la, lb = read_json(tmp_path / "one" / "training_log.json"), read_json(tmp_path / "two" / "training_log.json")
    np.testing.assert_allclose(lb["loss_every_step"], la["loss_every_step"], rtol=1e-4)
    assert (la["processes"], la["rows_per_process"]) == (1, 8)
    assert (lb["processes"], lb["rows_per_process"]) == (2, 4)


def test_processes_flag_passes_every_argument_through_torchrun(tiny_model_dir, tmp_path):
    """`side --processes 2 sample --n 7`: torchrun's own parser must not read `--n` as an abbreviation of its
    options (it did: "ambiguous option: --n"); the images equal one process's. The progress ends at 7 of 7 (the
    main process counted its own shards, 0 and 2: it ended at 6 of 7, never done) and the summary is said once."""
    args = ["--threads", "1", "--no-progress", "sample", "--model", str(tiny_model_dir), "--n", "7", "--steps", "2",
            "--shard-size", "2"]
    _run([*args, "--out", str(tmp_path / "one")], 1)
    two = _run(["--processes", "2", *args, "--out", str(tmp_path / "two")], 1)
    _same_shards(tmp_path / "one" / "synthetic", tmp_path / "two" / "synthetic")
    said = two.stdout + two.stderr
    assert "sample: 7 of 7 done in" in said and said.count("7 images in") == 1, said
