"""``side verify RUN``: make a finished run's generations again from the target and the run's files, and check
they equal the stored ones (``Audit.verify``)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .common import cli_errors, console, say, flags_set, path_value, was_typed


@cli_errors
def verify_cmd(
    ctx: typer.Context,
    run: Path = typer.Argument(..., help="Run directory (written by `side run` / `side extract` / `side demo`).",
                               parser=path_value),
    method: str = typer.Option("side", "--method", help="The method whose generations are made again."),
    generations: str = typer.Option("", "--generations", help="Comma-separated generation indices. Default: the "
                                    "method's --top closest generations to the training set."),
    top: int = typer.Option(8, "--top", help="How many of the closest generations, without --generations."),
    model: str = typer.Option("", "--model", help="The target, when the run's config does not name a model on disk "
                              "(its fingerprint must match the run's)."),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Each generation is made from the config its extraction was made with, in the denoiser batch its shard
    recorded: on the same hardware (and torch threads, see the run's manifest.json) it equals the stored image bit
    for bit. Exit status 1 when one differs."""
    from ..api import Audit

    ids = None
    if was_typed(ctx, "generations") and not generations.strip(" ,"):  # (it fell back to --top 8 without a word)
        raise ValueError(f"--generations={generations!r} names no generation: give comma-separated numbers, or leave "
                         "it out for the --top closest")
    if generations:
        try:
            ids = [int(v) for v in generations.split(",")]
        except ValueError:
            raise ValueError(f"--generations={generations!r} must be comma-separated integers") from None
        if any(i < 0 for i in ids):  # (said as indices=[-1] before)
            raise ValueError(f"--generations={generations!r} must be generation numbers >= 0")
        if len(set(ids)) < len(ids):  # ("all 2 generations" of one made twice)
            raise ValueError(f"--generations={generations!r} names a generation twice")
        if was_typed(ctx, "top"):  # (dropped without a word)
            raise ValueError(f"--top {top} picks the closest generations, and --generations names them: give one")
    audit = Audit.load(run)
    made = sorted(p.name for p in (run / "extraction").iterdir() if p.is_dir()) if (run / "extraction").is_dir() else []
    if method not in made:
        raise ValueError(f"--method={method!r}: the run holds no extraction of it (it holds: "
                         f"{', '.join(made) or 'none'})")
    if ids is None and method not in audit.methods:
        raise ValueError(f"{method} has no evaluation in {run} to pick the closest generations from: give --generations")
    for note in audit.verify_conditions(method, device):
        console.print(f"[yellow]note: {escape(note)}: images may differ by rounding without any file altered[/]")
    flags_set(ctx, {"generations": "indices"})  # (the API's name: "indices=[99] must be ...")
    checks = audit.verify(method, ids, top=top, model=model or None, device=device)
    table = Table("generation", "pixels that differ", "largest difference (uint8 levels)", title=f"{method}, {run}")
    for c in checks:
        table.add_row(str(c.generation_id), str(c.pixels_differ), str(c.largest_difference))
    console.print(table)
    bad = sum(not c.equal for c in checks)
    if bad:
        console.print(f"[bold red]{bad} of {len(checks)} generations differ from the stored ones[/]")
        raise typer.Exit(1)
    say(f"all {len(checks)} generations equal the stored ones bit for bit")
