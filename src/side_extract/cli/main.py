"""``side``: audit diffusion models for memorized training data."""
from __future__ import annotations

import typer

from . import demo, sample, train_target
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
) -> None:
    ctx.obj = {"progress": progress}
    setup_logging(verbose)


app.command("train-target")(train_target.train_target_cmd)
app.command("sample")(sample.sample_cmd)
app.command("demo")(demo.demo_cmd)

if __name__ == "__main__":  # pragma: no cover
    app()
