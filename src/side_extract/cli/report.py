"""``side report RUN``: the audit report of a run directory -> RUN/report/report.html + report.json."""
from __future__ import annotations

from pathlib import Path

import typer

from .common import cli_errors, say, path_value


@cli_errors
def report_cmd(
    ctx: typer.Context,
    run: Path = typer.Argument(..., help="Run directory (holds config.yaml; written by `side run` / `side demo`).",
                               parser=path_value),
    top: int = typer.Option(8, "--top", help="Closest generations shown per method, beside their training images."),
    image_size: int = typer.Option(64, "--image-size", help="Upscale smaller images to this many pixels "
                                                            "(nearest-neighbour; at most 1024)."),
) -> None:
    """One self-contained HTML report (inline images, no network) and the JSON behind it."""
    from ..report import write_report

    path = write_report(run, top=top, image_size=image_size)
    say(f"wrote {path} and {path.with_name('report.json')}")
