"""``side``: audit diffusion models for memorized training data."""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a machine shared with other work, spinning threads of two
# processes steal each other's cores (a 30x slowdown was measured). Read by torch's OpenMP runtime when torch
# is first imported, which a command does when it
# starts its work (the CLI's modules import torch only there).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from . import bench, calibrate, demo, evaluate, report, run, sample, theory, train_target, verify  # noqa: E402
from .common import setup_logging  # noqa: E402

MAX_THREADS = 1024  # torch CPU threads a process may be given (a typo-sized value crashed the BLAS)
MAX_PROCESSES = 256  # processes a --processes launch may start on this machine


class _Side(TyperGroup):
    """The root command, which keeps the arguments it was given (``ctx.meta["side.argv"]``): ``side --processes N``
    launches that same command line. Read from ``sys.argv`` it was the outer program's where the app was called
    with arguments of its own (``app([...])``, a test's runner, a wrapper script)."""

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        ctx.meta.setdefault("side.argv", list(args))
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_Side,
    name="side",
    help="Audit diffusion models for memorized training data (SIDE: surrogate conditional data extraction).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"side-extract {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show rich progress bars."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what each stage does."),
    threads: int = typer.Option(0, "--threads", help="Torch CPU threads. 0: the cores free right now (all of them "
                                "on an idle machine, fewer when other processes keep some busy: oversubscribed "
                                "threads run many times slower), shared by the processes of a --processes launch."),
    processes: int = typer.Option(1, "--processes", help="Run the command as a launch of this many processes on "
                                  "this machine (torchrun; each writes its own shards). Sampling gives a one-process "
                                  "run's files; classifiers and targets trained data-parallel end within float "
                                  "rounding of one process's weights, and guided generations can then differ (README "
                                  "\"Several processes, several GPUs\")."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="Print the installed side-extract version and exit."),
) -> None:
    if not 1 <= processes <= MAX_PROCESSES:
        raise typer.BadParameter(f"--processes={processes} must be between 1 and {MAX_PROCESSES}")
    if not 0 <= threads <= MAX_THREADS:  # (50,000 ended in OpenBLAS's pthread_create failure and a segfault)
        raise typer.BadParameter(f"--threads={threads} must be between 0 and {MAX_THREADS}")
    # torch's threads are set, and a launch of several processes started, when a command starts its work
    # (common.cli_errors), not here: this callback runs before a subcommand's --help or its arguments are parsed,
    # so a usage error is said once, by this process, and returns without importing torch.
    ctx.obj = {"progress": progress, "threads": threads, "threads_auto": threads == 0, "processes": processes}
    setup_logging(verbose)


app.command("train-target")(train_target.train_target_cmd)
app.command("sample")(sample.sample_cmd)
app.command("cluster")(run.cluster_cmd)
app.command("train-classifier")(run.train_classifier_cmd)
app.command("extract")(run.extract_cmd)
app.command("run")(run.run_cmd)
app.command("demo")(demo.demo_cmd)
app.command("evaluate")(evaluate.evaluate_cmd)
app.command("calibrate")(calibrate.calibrate_cmd)
app.command("report")(report.report_cmd)
app.command("verify")(verify.verify_cmd)
app.add_typer(theory.theory_app, name="theory")
app.add_typer(bench.bench_app, name="bench")

if __name__ == "__main__":  # pragma: no cover
    app()
