"""The experiment scripts that read one replicate's run still run against the library: ``side_avoidance.py`` failed
for three sessions after label-free guidance began taking generation indices (commit 3d059c0), and nobody knew until
it was run. Each runs here on a tiny run, as a user runs it (a tiny target reaches no training image, so the scripts'
lines for a run that reached nothing are exercised too); ``side_avoidance.py`` also checks its SIDE-alone row
against the run's own extraction. The scripts that read a whole fair-bench cache (several replicates and forms) are
not run here."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from side_extract import config as cfg
from side_extract.pipeline import run_audit

from test_pipeline import tiny_rc

EXPERIMENTS = Path(__file__).resolve().parents[1] / "benchmarks" / "experiments"


@pytest.fixture(scope="module")
def replicate_run(tiny_model_dir, tmp_path_factory):
    """A run with a trained SIDE classifier whose config names its bands file, as a fair bench replicate's does."""
    run = tmp_path_factory.mktemp("experiments") / "rep-1"
    rc = tiny_rc(tiny_model_dir, methods=("side",))
    run_audit(run, rc)
    rc = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate,
                                                              bands_file=str(run / "evaluation" / "bands.json")))
    (run / "config.yaml").write_text(cfg.dump_yaml(rc))
    return run, rc.extract.n


@pytest.mark.parametrize("script, args, rows", [
    ("side_avoidance.py", ["N", "2", "0,0.05,0.2,0.6 1,0.05,0.2,0.6"],
     "- eta, h, window (1.0, 0.05, 0.2, 0.6): 0 against 0"),
    ("side_memguide.py", ["N", "2", "0,60,0 0.3,60,1"],
     "- SIDE lambda, memguide lambda, eta (0.3, 60.0, 1.0): 0 against"),
    ("avoidance.py", ["N", "2", "0,0,0.05,0.2,0.6 30,1,0.05,0.2,0.6"], "- 30,1,0.05,0.2,0.6: 0.0 against 0.0"),
    ("memorization_guidance.py", ["N", "0,30"], "- lambda 30: 0.0 against 0.0"),
    ("restart.py", ["N", "0.1:1", "1", "30"], "- 0.1:1: 0.0 against 0.0"),
    ("reach.py", ["N"], "Reached in 6: 0 (f1 0, f2 0)"),
    ("extrapolation_check.py", [], "| side | mid | 0.0 | 0.0 | 0.0 | 0 |"),
])
def test_a_replicate_script_runs_on_a_tiny_run(replicate_run, tmp_path, script, args, rows):
    run, n = replicate_run
    path = os.pathsep.join([str(EXPERIMENTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    args = [str(n) if a == "N" else a for a in args]  # (N: the run's N_G)
    r = subprocess.run([sys.executable, str(EXPERIMENTS / script), str(run), *args], capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert rows in r.stdout, r.stdout
    # nothing reached: no ratio, said as a dash
    assert script in ("reach.py", "extrapolation_check.py") or "x [—, —]" in r.stdout, r.stdout


def test_validation_picks_md_is_what_its_script_makes_of_the_committed_files():
    """``experiments/validation-picks.md`` says it covers every committed fair.json; it had stopped at 54 rows while
    the files grew to 100 (nothing regenerated it). Like docs/config.md, it now must equal its script's output:
    ``python benchmarks/experiments/validation_picks.py benchmarks/results > .../validation-picks.md``."""
    root = EXPERIMENTS.parents[1]
    r = subprocess.run([sys.executable, str(EXPERIMENTS / "validation_picks.py"), "benchmarks/results"],
                       capture_output=True, text=True, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    committed = (root / "benchmarks" / "results" / "experiments" / "validation-picks.md").read_text()
    assert r.stdout == committed, "validation-picks.md is stale: regenerate it with the command in its docstring"


def test_the_paired_from_files_table_is_what_its_command_makes_of_the_committed_files():
    """``experiments/avoidance-paired-from-files.md`` holds the output of the command its header gives; the script
    changed what its target column shows (the model's fingerprint) and the file kept the old column."""
    root = EXPERIMENTS.parents[1]
    committed = (root / "benchmarks" / "results" / "experiments" / "avoidance-paired-from-files.md").read_text()
    command = committed.split("Command: `python ", 1)[1].split("`", 1)[0].split()
    r = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=root,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() and r.stdout in committed, r.stdout
