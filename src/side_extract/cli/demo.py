"""``side demo``: the main job on the embedded default target."""
from __future__ import annotations

from pathlib import Path

import typer

from .common import cli_errors


@cli_errors
def demo_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory to write."),
) -> None:
    """Run the audit on the embedded demo target (digits:100) and print where the results are."""
    raise NotImplementedError
