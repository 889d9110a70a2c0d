"""``side``: audit diffusion models for memorized training data."""
from __future__ import annotations

import typer

from . import bench, calibrate, demo, evaluate, report, run, sample, theory, train_target
from .common import setup_logging

app = typer.Typer(
    name="side",
    help="Audit diffusion models for memorized training data (SIDE: surrogate conditional data extraction).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show rich progress bars."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what each stage does."),
    threads: int = typer.Option(0, "--threads", help="Torch CPU threads (0: torch's default). Use 1 when other "
                                                    "processes share the cores: oversubscribed threads run far slower."),
) -> None:
    ctx.obj = {"progress": progress}
    setup_logging(verbose)
    if threads < 0:
        raise typer.BadParameter(f"--threads={threads} must be >= 0")
    if threads:
        import torch

        torch.set_num_threads(threads)


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
app.add_typer(theory.theory_app, name="theory")
app.add_typer(bench.bench_app, name="bench")

if __name__ == "__main__":  # pragma: no cover
    app()
