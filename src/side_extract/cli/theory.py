"""``side theory``: the paper's theory, executable (``check``: checks A-E; ``measure``: M of a run's target)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from .common import cli_errors, say, path_value, progress_bar

theory_app = typer.Typer(
    help="Memorization divergence and numerical checks of the paper's theory (docs/theory.md).",
    no_args_is_help=True,
)
out = Console(emoji=False, highlight=False, soft_wrap=True)


def _verdict_style(v: bool | None) -> str:
    return {True: "[bold green]PASS[/]", False: "[bold red]FAIL[/]", None: "[dim]trend[/]"}[v]


@theory_app.command("check")
@cli_errors
def check_cmd(
    ctx: typer.Context,
    only: str = typer.Option("", "--only", help="Comma-separated subset of A,B,C,D,E (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed; each check derives its own generator from it."),
) -> None:
    """Run checks A-E; print each prediction, estimate [95% interval] and PASS/FAIL; exit 1 if any fails."""
    from ..theory.checks import parse_only, run_checks

    names = parse_only(only)
    failed = []
    for name in names:
        (res,) = run_checks(name, seed)
        out.print(f"[bold]{res.name}. {escape(res.title)}[/]  ({res.seconds:.1f} s)")
        out.print(f"   claim: {escape(res.claim)}")
        for row in res.rows:
            rel = row.relation or "->"
            tol = f" (tol {row.tolerance:g})" if row.tolerance and row.relation else ""
            out.print(f"   {_verdict_style(row.passed)} {escape(row.label)}\n"
                      f"        prediction {rel} {row.prediction}; estimate {row.estimate}{tol}")
        out.print(f"   => {'[bold green]PASS[/]' if res.passed else '[bold red]FAIL[/]'}\n")
        if not res.passed:
            failed.append(res.name)
    if failed:
        out.print(f"[bold red]{len(failed)} check(s) failed: {', '.join(failed)}[/]")
        raise typer.Exit(1)
    out.print(f"[bold green]all {len(names)} check(s) passed[/]")


@theory_app.command("measure")
@cli_errors
def measure_cmd(
    ctx: typer.Context,
    run: Path = typer.Argument(..., help="Run directory with config.yaml (model, train) and classifier/.",
                               parser=path_value),
    n_points: int | None = typer.Option(None, "--n-points", min=2, help="Training points (Monte Carlo samples); "
                                        "interval ~ 1/sqrt. Default: 32, or every point of a smaller training set."),
    probes: int = typer.Option(1, "--probes", min=1,
                               help="Hutchinson probes per ODE evaluation (a backward pass each)."),
    steps: int = typer.Option(32, "--steps", min=1, help="ODE grid intervals (2 model calls each); bias ~ 1/steps^2."),
    eps: float = typer.Option(0.1, "--eps", help="Smoothing scale of q_eps, in [-1, 1] pixel units."),
    bandwidth: float | None = typer.Option(None, "--bandwidth", help="Empirical optimum's kernel width (default eps)."),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", help="lambda (1 = Bayes class-conditional)."),
    t_min: int | None = typer.Option(None, "--t-min", help="First ODE timestep (sigma_min = sigma at t_min); "
                                     "default: the one whose sigma is nearest --eps."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device"),
    model: str = typer.Option("", "--model", help="The target's directory, when the run's config does not name it "
                              "on disk (a model directory moved since the run; its fingerprint must match the run's). "
                              "A model audited in memory is given from Python: measure_run(RUN, model=...)."),
) -> None:
    """M of the unconditional, the guided (class-conditional) model and the empirical optimum.

    Writes RUN/theory/measure.json.
    """
    from ..theory.measure import measure_run

    with progress_bar(ctx, "theory measure") as cb:
        res, dest = measure_run(run, eps=eps, bandwidth=bandwidth, guidance_scale=guidance_scale, n_points=n_points,
                                n_steps=steps, n_probes=probes, t_min=t_min, batch_size=batch_size, seed=seed,
                                device=device, progress=cb, model=model or None)
    _print_measure(res)
    say(f"written: {dest}")


def _print_measure(res) -> None:
    out.print(f"[bold]memorization divergence[/] (nats, d={res.dim}, eps={res.eps:g}, kernel width "
              f"{res.bandwidth:g}, {res.n_points} points, {len(res.timesteps) - 1} ODE steps from t={res.timesteps[0]} "
              f"(sigma {res.sigma_min:.3g}), "
              f"{res.n_probes} probes, lambda={res.guidance_scale:g}, {len(res.class_sizes)} classes, seed {res.seed})")
    rows = [
        ("sum_c w_c M(D_c; p)          unconditional", res.m_uncond),
        ("sum_c w_c M(D_c; p_c)        guided", res.m_guided),
        ("sum_c w_c M(D_c; KDE_D)      empirical optimum", res.m_opt_uncond),
        ("sum_c w_c M(D_c; KDE_c)      empirical optimum, per class", res.m_opt_cond),
        ("M(D; p)                      unconditional, whole set", res.m_uncond_full),
        ("M(D; KDE_D)                  empirical optimum, whole set", res.m_opt_full),
        ("gain: guided - unconditional", res.gain_model),
        ("gain: optimum per class - optimum", res.gain_opt),
    ]
    for label, est in rows:
        out.print(f"   {escape(label):<60} {est}")
    for claim, v in res.ordering.items():
        style = {"holds": "green", "violated": "red"}.get(v, "yellow")
        out.print(f"   [{style}]{v}[/]: {escape(claim)}")
