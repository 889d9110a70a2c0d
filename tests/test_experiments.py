"""The experiment scripts that read one replicate's run still run against the library: ``side_avoidance.py`` failed
for three sessions after label-free guidance began taking generation indices (commit 3d059c0), and nobody knew until
it was run. Each runs here on a tiny run, as a user runs it (in this process, as ``python SCRIPT ARGS`` runs it:
:func:`run_script`; a tiny target reaches no training image, so the scripts' lines for a run that reached nothing are
exercised too); ``side_avoidance.py`` also checks its SIDE-alone row
against the run's own extraction. The scripts that read a whole fair-bench cache (several replicates and forms) run
on a tiny fair bench's cache; five crashed there (``paired_runs.py``, ``equal_samples.py``, ``paired_from_files.py``,
``informed_ceiling.py``) or printed nan ratios (``portfolio.py``, ``anchor_ceiling.py``) on replicates that reached
nothing. Not run here: ``guidance_shapes.py`` and ``repulsion.py`` (they need K = 25 and K = 100 clusterings of a
synthetic set of hundreds), ``theory_figures.py`` (a minute of training) and ``dedup_stopping.py`` (83 s: marked
slow)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from side_extract import config as cfg
from side_extract.pipeline import run_audit

from test_bench import tiny_bench
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
    args = [str(n) if a == "N" else a for a in args]  # (N: the run's N_G)
    r = run_script(script, str(run), *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert rows in r.stdout, r.stdout
    # nothing reached: no ratio, said as a dash
    assert script in ("reach.py", "extrapolation_check.py") or "x [—, —]" in r.stdout, r.stdout


def test_validation_picks_md_is_what_its_script_makes_of_the_committed_files():
    """``experiments/validation-picks.md`` says it covers every committed fair.json; it had stopped at 54 rows while
    the files grew to 100 (nothing regenerated it). Like docs/config.md, it now must equal its script's output:
    ``python benchmarks/experiments/validation_picks.py benchmarks/results > .../validation-picks.md``."""
    root = EXPERIMENTS.parents[1]
    r = run_script("validation_picks.py", "benchmarks/results", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    committed = (root / "benchmarks" / "results" / "experiments" / "validation-picks.md").read_text()
    assert r.stdout == committed, "validation-picks.md is stale: regenerate it with the command in its docstring"


def test_the_paired_from_files_table_is_what_its_command_makes_of_the_committed_files():
    """``experiments/avoidance-paired-from-files.md`` holds the output of the command its header gives; the script
    changed what its target column shows (the model's fingerprint) and the file kept the old column."""
    root = EXPERIMENTS.parents[1]
    committed = (root / "benchmarks" / "results" / "experiments" / "avoidance-paired-from-files.md").read_text()
    command = committed.split("Command: `python ", 1)[1].split("`", 1)[0].split()
    assert Path(command[0]).parent == Path("benchmarks/experiments"), command
    r = run_script(Path(command[0]).name, *command[1:], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() and r.stdout in committed, r.stdout


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python benchmarks/experiments/<script> ARGS`` from folder ``cwd`` on one thread, as a user runs it, in this
    process: the script as ``__main__`` with that argv, folder and sys.path; its exit status and its output as a
    process's (``sys.exit("why")``: status 1, why on stderr). A process of its own spent ~10 s importing torch,
    diffusers and peft again for each script: about a minute and a half of the suite."""
    out, err = io.StringIO(), io.StringIO()
    argv, path, here, threads = sys.argv, sys.path[:], os.getcwd(), torch.get_num_threads()
    code: int = 0
    try:
        sys.argv, sys.path[:0] = [str(EXPERIMENTS / script), *args], [str(EXPERIMENTS)]
        os.chdir(cwd)
        torch.set_num_threads(1)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(EXPERIMENTS / script), run_name="__main__")
            except SystemExit as e:  # (as the interpreter reads it: None 0, a number itself, else 1 and said)
                code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
                if not isinstance(e.code, int | None):
                    print(e.code, file=sys.stderr)
    finally:
        sys.argv, sys.path[:] = argv, path
        os.chdir(here)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([sys.executable, str(EXPERIMENTS / script), *args], code, out.getvalue(),
                                       err.getvalue())


@pytest.fixture(scope="module")
def fair_cache(tmp_path_factory):
    """A tiny fair bench (20 training images, N_G 6, N_S 24, held-out replicates 2 and 3) with the forms the cache
    scripts read: a clipped-eps SIDE form, a memorization-aware one and memguide with avoidance. Its target reaches
    no training image, so the scripts' lines for runs that reached nothing are what is checked."""

    from side_extract.bench.protocol import FairBenchConfig, run_fair_bench, write_fair_results

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bc = tiny_bench()
        bc = type(bc)(**{**bc.__dict__, "scales": (20,)})
        fc = FairBenchConfig(
            bench=bc, methods=("side", "cond", "uncond", "memguide"), scales_grid=(0.0, 1.0), temperatures=(1.0,),
            validation_replicates=(1,), heldout_replicates=(2, 3), validation_n=4, n_bootstrap=10,
            memguide_scales=(10.0, 30.0),
            forms={"clip-every-k25": {"method": "side", "sample.clip_eps": True, "surrogate.n_clusters": 2},
                   "mem-k25": {"method": "side", "sample.clip_eps": True, "classifier.time_blocks": "every",
                               "surrogate.memorized_fraction": 0.5},
                   "memguide-avoid": {"method": "memguide", "extract.memguide_avoid": 1}})
        root = tmp_path_factory.mktemp("fair-cache")
        data = run_fair_bench(fc, root / "cache", command="side bench fair (test)")
        fair_json, _ = write_fair_results(data, root / "out")
    finally:
        torch.set_num_threads(threads)
    (target,) = (root / "cache" / "runs").iterdir()
    return target, fair_json


@pytest.mark.parametrize("script, args, rows", [
    ("paired_runs.py", ["2,3", "memguide-avoid:memguide", "memguide"],
     ["memguide-avoid:memguide: 0.0, memguide: 0.0 distinct", "memguide-avoid:memguide / memguide: —x [—, —]"]),
    ("portfolio.py", ["2,3", "ref=uncond", "mem-k25:side+memguide"],
     ["plain sampling, 30 generations: 0.0", "mem-k25:side+memguide (12 generations): 0.0 together",
      "/ plain sampling —x [—, —]; / uncond —x [—, —]"]),
    ("uncond_curve.py", ["2,3", "1,2,3"], ["| synthetic set (DDIMPipeline, unclipped eps) | 72 | 0 | 0 | 0 | 0.0 |",
                                           "| UnCond extraction (clipped eps) | 12 | 0 | 0 | 0 | 0.0 |"]),
    ("equal_samples.py", ["2,3", "24", "mem-k25"],
     ["first 6 regenerated within 0 levels", "UnCond at N_G 6: 0.0 [0-0]; at 30: 0.0 [0-0]",
      "generations and synthetic set / UnCond at 30 (equal model samples): —"]),
    ("classifier_recall.py", [], ["| clip-every-k25 | 3 |", "| mem-k25 | 3 |"]),
    ("memorization_auc.py", ["mem-k25"], ["| 0.2 | nan | 0.000 | 0.000 |"]),
    ("anchor_ceiling.py", ["2,3", "24", "10", "4,8"],
     ["the synthetic set reached s = 0 images with 0 copies",
      "| 8 label-free anchors + memguide | 0, 0 | 0.0 | — (plain sampling reached nothing) |"]),
    ("guidance_targets.py", ["mem-k25", "uncond drawn,1,1 union,1,1", "1", "6"],
     ["uncond high 0/0  mid 0/0", "union lam=1.0 T=1.0 tlo=0.0: high 0/0  mid 0/0"]),
])
def test_a_cache_script_runs_on_a_tiny_fair_bench(fair_cache, tmp_path, script, args, rows):
    target, _ = fair_cache
    where = target / "rep-2" if script in ("memorization_auc.py", "guidance_targets.py") else target
    r = run_script(script, str(where), *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in rows:
        assert row in r.stdout, r.stdout
    assert "nan" not in r.stdout.replace("| nan |", ""), r.stdout  # (no ROC AUC without a copy among the samples)
    if script == "classifier_recall.py":  # memguide's form holds the replicate's classifier, shared, not one it uses
        assert "memguide-avoid" not in r.stdout, r.stdout


def test_informed_ceiling_says_what_it_cannot_bound(fair_cache, tmp_path):
    """It divided by zero on replicates where plain sampling reached nothing, and took a stream shorter than N_G."""
    target, _ = fair_cache
    r = run_script("informed_ceiling.py", str(target), "2,3", "30", "6", cwd=tmp_path)
    assert r.returncode == 1 and "rep 2: plain sampling reached no training image at the mid band or closer in 30 " \
        "generations: there is nothing to bound" in r.stderr, r.stderr[-3000:]
    r = run_script("informed_ceiling.py", str(target), "2,3", "30", cwd=tmp_path)
    assert r.returncode == 1 and "N_MAX=30 is shorter than N_G=1000" in r.stderr, r.stderr[-3000:]


def test_paired_from_files_on_runs_that_reached_nothing(fair_cache, tmp_path):
    _, fair_json = fair_cache
    r = run_script("paired_from_files.py", f"{fair_json}:side", f"{fair_json}:mem-k25", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[-1].endswith("| 2-3 | same ({}) | 0.0 / 0.0 of 6 | — |".format(
        r.stdout.split("same (")[1][:12])), r.stdout


def test_feature_clusters_runs_on_the_demo_target(tmp_path):
    r = run_script("feature_clusters.py", "demo", "60", "5", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    head = ("| seed | near-exact copies (nearest RMS < 0.05) | distinct nearest images | `pixels` | `pixels-pca` "
            "| `unet` |")
    assert head in r.stdout and "\n| 0 | " in r.stdout and "| mean [min-max] | |" in r.stdout, r.stdout


@pytest.mark.slow
def test_dedup_stopping_runs_on_the_demo_target(tmp_path):
    r = run_script("dedup_stopping.py", "demo", "digits:100", "100", "2", "0.5", "uncond", "0", str(tmp_path / "out"),
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "dedup-stopping-demo.md").is_file(), r.stdout


def test_the_flops_recount_is_what_its_script_makes_of_the_committed_scale_file():
    """``experiments/scale-flops-recount.md`` holds the FLOPs and GPU projections the README quotes beside
    ``scale.md``'s (counted before attention was): it must equal its script's output on the committed file."""
    root = EXPERIMENTS.parents[1]
    r = run_script("flops_recount.py", "benchmarks/results/scale.json", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    committed = (root / "benchmarks" / "results" / "experiments" / "scale-flops-recount.md").read_text()
    assert r.stdout == committed, "scale-flops-recount.md is stale: regenerate it with the command in its docstring"
