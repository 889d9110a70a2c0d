"""The experiment scripts that generate in rounds from a trained SIDE classifier still run against the library:
``side_avoidance.py`` failed for three sessions after label-free guidance began taking generation indices (commit
3d059c0), and nobody knew until it was run. Each runs here on a tiny run, as a user would, with its SIDE-alone row
checked against the run's own extraction where the script does so."""
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


@pytest.mark.parametrize("script, grid", [("side_avoidance.py", "0,0.05,0.2,0.6 1,0.05,0.2,0.6"),
                                          ("side_memguide.py", "0,60,0 0.3,60,1")])
def test_a_round_script_runs_on_a_tiny_run(tiny_model_dir, tmp_path, script, grid):
    run = tmp_path / "run"
    rc = tiny_rc(tiny_model_dir, methods=("side",))
    run_audit(run, rc)
    # the scripts read the mid band from evaluate.bands_file, as a fair bench replicate's config names it
    rc = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate,
                                                              bands_file=str(run / "evaluation" / "bands.json")))
    (run / "config.yaml").write_text(cfg.dump_yaml(rc))
    path = os.pathsep.join([str(EXPERIMENTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    r = subprocess.run([sys.executable, str(EXPERIMENTS / script), str(run), str(rc.extract.n), "2", grid],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(grid.split()), r.stdout
