"""Two processes (torchrun, gloo on the CPU) write the same run as one process, bit for bit: the synthetic set
and every method's generations; the top-k merge over shards is in test_properties."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from side_extract.data import load_shards
from side_extract.runs import read_json

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")


def _run(args, nproc, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if nproc == 1:
        cmd = [sys.executable, "-m", "side_extract.cli.main", *args]
    else:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "side_extract.cli.main", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_two_processes_equal_one(tiny_model_dir, tmp_path):
    config = {"model": str(tiny_model_dir), "train": "digits:30",
              "sample": {"n": 24, "steps": 2, "shard_size": 5, "batch_size": 4},
              "surrogate": {"n_clusters": 3, "tau": -1.0, "n_init": 1},
              "classifier": {"depth": 10, "width": 8, "steps": 4, "batch_size": 16, "eval_every": 2},
              "clean_classifier": {"depth": 10, "width": 8, "steps": 4, "batch_size": 16, "eval_every": 2},
              "extract": {"methods": ["side", "cond", "uncond"], "n": 14, "steps": 2, "scale": 1.0,
                          "shard_size": 3, "batch_size": 4},
              "evaluate": {"carlini_n": 5, "quality": ["pixels"], "quality_max_reference": 100}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    common = ["--threads", "1", "--no-progress", "run", str(tmp_path / "run.yaml"), "--no-report"]
    _run([*common, "--out", str(tmp_path / "one")], 1)
    _run([*common, "--out", str(tmp_path / "two")], 2)
    for stage in ("synthetic", "extraction/side", "extraction/cond", "extraction/uncond"):
        a, b = load_shards(tmp_path / "one" / stage), load_shards(tmp_path / "two" / stage)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.ids, b.ids)
        if a.labels is not None:
            np.testing.assert_array_equal(a.labels, b.labels)
    m1 = read_json(tmp_path / "one" / "evaluation" / "side" / "metrics.json")
    m2 = read_json(tmp_path / "two" / "evaluation" / "side" / "metrics.json")
    assert m1["ams"] == m2["ams"] and m1["ums"] == m2["ums"]
    stages = read_json(tmp_path / "two" / "manifest.json")["stages"]
    assert stages["synthetic"]["processes"] == 2 and all(v["status"] == "complete" for v in stages.values())
    # a killed process's shards are missing: the rerun (2 processes) writes exactly those
    for k in (1, 2):  # one of each process
        (tmp_path / "two" / "synthetic" / f"shard-{k:05d}.npz").unlink()
    _run(["--processes", "2", *common, "--out", str(tmp_path / "two")], 1)  # the same launch, by side itself
    np.testing.assert_array_equal(load_shards(tmp_path / "two" / "synthetic").images,
                                  load_shards(tmp_path / "one" / "synthetic").images)
    entry = read_json(tmp_path / "two" / "manifest.json")["stages"]["synthetic"]
    assert entry["processes"] == 2 and entry["shards_written_now"] == 1  # each process wrote one missing shard
