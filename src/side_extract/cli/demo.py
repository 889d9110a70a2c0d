"""``side demo``: the main job (the SIDE audit) on the embedded default target."""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import typer

from .. import config as cfg
from ..distributed import ProcessGroup
from .common import cli_errors, holding_run, say, path_value
from .run import _say_changes, print_findings, print_summary, stage_progress


DEFAULT_TARGET = "demo-1000"


def demo_config(model: str = DEFAULT_TARGET, train: str | None = None, heldout: str | None = None) -> cfg.RunConfig:
    """The demo's run config: an embedded target's own (``assets/<name>_run.yaml``: its training set and sizes);
    any other model directory gets the default target's settings with its own training set ``train``, which it
    must name, and its held-out images ``heldout`` if given (an embedded target's are fixed: the digits it did not
    train on). A training set without labels of two classes or more leaves Cond out (it trains a classifier on
    them)."""
    from ..data import labelled_classes, load_image_set
    from ..models.target import EMBEDDED_TARGETS

    embedded = model in EMBEDDED_TARGETS
    for flag, given in (("--train", train), ("--heldout", heldout)):
        if embedded and given is not None:
            raise ValueError(f"{flag} {given!r}: the embedded target {model!r} has its own training and held-out "
                             f"images; {flag} is for a model directory (--model DIR)")
    if not embedded and train is None:
        raise ValueError(f"--model {model!r} is not an embedded target ({', '.join(EMBEDDED_TARGETS)}), so the demo "
                         "needs its training images: --train (a folder of PNG/JPEG files, an .npz with 'images' and "
                         "optional 'labels', or digits:N)")
    name = model if embedded else DEFAULT_TARGET
    text = (resources.files("side_extract") / "assets" / f"{name}_run.yaml").read_text(encoding="utf-8")
    data = cfg.yaml_value(text)
    data["model"] = model
    if not embedded:
        data["train"] = train
        if heldout is not None:
            data["evaluate"]["heldout"] = heldout
        if labelled_classes(load_image_set(train).labels) < 2:  # Cond's classifier needs two classes
            data["extract"]["methods"] = [m for m in data["extract"]["methods"] if m != "cond"]
    return cfg.from_dict(cfg.RunConfig, data)


@cli_errors
def demo_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory to write.", parser=path_value),
    model: str = typer.Option(DEFAULT_TARGET, help="Target model: an embedded one (demo-1000: digits:1000, where "
                              "plain sampling reaches few training images; demo: digits:100, memorized throughout), "
                              "or a diffusers directory (run with demo-1000's settings; give --train)."),
    train: str = typer.Option(None, "--train", help="The training images of a --model directory: a folder of "
                              "PNG/JPEG files, an .npz with 'images' (and 'labels' for Cond), or digits:N. Without "
                              "labels the demo leaves Cond out."),
    heldout: str = typer.Option(None, "--heldout", help="Images of a --model directory's training distribution that "
                                "it did not train on (100 at least, 1,000 better): the similarity bands are calibrated "
                                "on them. Without them, on the training images against each other (for --train "
                                "digits:N, the digits outside the subset)."),
    device: str = typer.Option("cpu", help="Torch device."),
    wait: bool = typer.Option(False, "--wait", help="If another process is writing OUT, wait for it instead of failing."),
) -> None:
    """SIDE audit of an embedded target (default demo-1000, trained on digits:1000): SIDE, memorization guidance
    (label-free), UnCond and Cond, metrics, the memorization divergence of the unconditional vs the guided model,
    and the HTML report. --model demo runs SIDE, Cond and UnCond; --model DIR (with --train) runs demo-1000's
    settings on a model directory, without Cond where its training images have no labels of two classes."""
    from ..models.target import EMBEDDED_TARGETS
    from ..pipeline import run_audit
    from ..report import write_report
    from ..theory.measure import measure_run

    t0 = time.time()
    if model in EMBEDDED_TARGETS and (ctx.obj or {}).get("threads_auto") and device == "cpu":
        # The embedded 8x8 targets are too small for intra-op threads: the demo took 265 s by its clock on 2
        # threads and 213 s on 1 on an idle 2-core machine (benchmarks/results/demo.md, session 24). An explicit
        # --threads N still wins.
        import torch

        torch.set_num_threads(1)
    rc = demo_config(model, train, heldout)
    if "cond" not in rc.extract.methods and ProcessGroup.from_env().main:  # (once per launch)
        say(f"{train} has no labels of two classes or more: the demo runs without Cond (Cond's classifier "
            "learns the training set's labels)")
    with holding_run(out, wait):  # (to the report's end, as side run: a demo queued with --wait took the run between
        # the audit and the theory's measure, and one of the two failed, told to use the --wait it was given)
        _say_changes(out, rc)  # (a run in OUT was replaced without a word, as side run says it; once per launch)
        with stage_progress(ctx) as factory:
            result = run_audit(out, rc, device=device, progress=factory, wait=wait)
        group = ProcessGroup.from_env()
        if not group.main:
            return  # in a launch of several processes the main one measures, sums up and reports, once
        print_summary(result.metrics)
        print_findings(out)
        theory, _ = measure_run(out, device=group.device(device))
        for claim, verdict in theory.ordering.items():
            say(f"theory: {verdict}: {claim}")
        report = write_report(out)
    say(f"done in {time.time() - t0:.0f} s")
    say(f"run directory: {out}")
    say(f"report:        {report}")
