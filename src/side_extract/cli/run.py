"""``side run``, ``side cluster``, ``side train-classifier``, ``side extract``: the audit's stages over a run directory.

``side run CONFIG`` runs CONFIG (every key it leaves out at its default). The stage commands read the run's own
``config.yaml`` (when the run exists), then ``--config``, then the flags typed. Each runs the chain up to its
stage; finished stages with unchanged inputs are skipped.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .. import config as cfg
from ..distributed import ProcessGroup
from .common import (build_config, cli_errors, console, say, holding_run, no_model_note, path_value, progress_enabled,
                     progress_lines, say_note, say_stale_report, stage_config, typed_flags)

if TYPE_CHECKING:
    from ..pipeline import Until

E = cfg.ExtractConfig()
NOT_EVALUATED = "not evaluated: the run has no training set (set train, e.g. train: digits:100, in its config file)"


def _say_changes(run: Path, rc: cfg.RunConfig) -> None:
    """Name the settings that differ from the config the run directory was last run with."""
    from ..pipeline import absolute_config, absolute_paths
    from ..runs import settings_changed

    if not ProcessGroup.from_env().main:  # (said once per launch, not once per process)
        return
    if changed := settings_changed(run, absolute_paths(rc), absolute_config):  # (paths as the run records them)
        # one line (the console's soft wrap: it was cut inside a value at 80 columns); a value is no markup
        console.print(f"settings changed since the last run into {run}: {'; '.join(changed)}", markup=False)


@contextlib.contextmanager
def stage_progress(ctx: typer.Context) -> Iterator[Any]:
    """A progress factory: one rich bar per stage (a line now and then when progress bars are off); nothing on the
    other processes of a launch (the main one reports)."""
    if not ProcessGroup.from_env().main:
        yield lambda name: None
        return
    if not progress_enabled(ctx):
        yield progress_lines
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        def factory(name: str):
            task = bar.add_task(name, total=None)
            return lambda done, total: bar.update(task, completed=done, total=total)

        yield factory


def print_summary(metrics: dict[str, dict]) -> None:
    """One row per metric, one column per method (fits a terminal whatever the number of bands)."""
    if not metrics:
        return
    from rich.table import Table

    first = next(iter(metrics.values()))
    n_g = {r["n_generated"] for r in metrics.values()}
    # (one N_G in the title, the first method's, where dedup-driven stopping had ended some methods early)
    table = Table(title=f"memorization ({first['similarity']}, "
                        + (f"N_G = {first['n_generated']}, " if len(n_g) == 1 else "") + f"{first['n_train']} training "
                        "images)")
    table.add_column("metric")
    for m in metrics:
        table.add_column(m, justify="right")
    rows: list[tuple[str, list[str]]] = []
    if len(n_g) > 1:
        rows.append(("N_G (generations)", [str(r["n_generated"]) for r in metrics.values()]))
    for b in reversed(list(first["bands"])):
        rows.append((f"AMS {b} %", [f"{100 * r['ams'][b]:.2f}" for r in metrics.values()]))
        rows.append((f"UMS {b} %", [f"{100 * r['ums'][b]:.2f}" for r in metrics.values()]))
    q = "p95" if first.get("orientation", "similarity") == "similarity" else "p5 distance"
    rows.append((q, [f"{r['p95']:.4f}" for r in metrics.values()]))
    rows.append(("Carlini extracted %", [f"{100 * r['carlini']['extracted_fraction']:.2f}" for r in metrics.values()]))
    rows.append(("Gu memorized %", [f"{100 * r['gu']['memorized_fraction']:.2f}" for r in metrics.values()]))
    spaces = list(dict.fromkeys(k for r in metrics.values() for k in (r.get("quality") or {}) if k != "skipped"))
    for space in spaces:
        q = [(r.get("quality") or {}).get(space) for r in metrics.values()]
        rows.append((f"Frechet ({space})", [f"{v['frechet']:.3f}" if v else "-" for v in q]))
        rows.append((f"KID x1000 ({space})", [f"{1000 * v['kid']:.2f}±{1000 * v['kid_se']:.2f}" if v else "-" for v in q]))
        rows.append((f"precision / recall ({space})", [f"{v['precision']:.2f} / {v['recall']:.2f}" if v else "-" for v in q]))
    for name, cells in rows:
        table.add_row(name, *cells)
    console.print(table)


def print_findings(run: Path) -> None:
    """The verdict, and what every method evaluated in ``run`` found together (``summary.json``, ``findings.csv``)."""
    from ..summary import audit_summary, verdict_band

    s = audit_summary(run)
    if not s["methods"]:
        return
    say(s["verdict"])
    f = s["findings"]
    if f and len(f["methods"]) > 1:
        band = verdict_band(f["bands"])
        made = f["generations"]
        alone = ", ".join(f"{m} {f['only'][m][band]}" for m in f["methods"])
        each = ", ".join(f"{m} {n}" for m, n in made.items())
        say(f"every method{' and the synthetic set' if f['synthetic_set'] else ''} together: "
            f"{f['distinct_nearest_cumulative'][band]} distinct nearest training images at the '{band}' band "
            f"or closer in {sum(made.values())} model samples ({each}; counted as the benchmarks count per "
            f"method, not as the verdict's UMS, every training image within the band of some generation); "
            f"found by no other: {alone}; each one, closest first: {Path(run) / f['file']}")


WAIT_HELP = "If another process is writing the run directory, wait for it instead of failing."
FORCE_HELP = ("Replace finished results (generations, classifiers, ...) made with other settings; without it "
              "that is an error that names them. A --force run cut short is finished by a rerun with the same settings without it.")


def _run(ctx: typer.Context, out: Path, rc: cfg.RunConfig, device: str, until: Until, *, wait: bool = False,
         replace: bool = True) -> dict[str, dict]:
    from ..pipeline import run_audit
    from ..sweeps import run_with_sweeps

    with stage_progress(ctx) as factory:
        if until == "evaluation":
            main, subs = run_with_sweeps(out, rc, device=device, progress=factory, wait=wait, replace=replace)
            for name, sub in subs.items() if ProcessGroup.from_env().main else ():  # (once per launch)
                say(f"sweep {name}: {sub.run}")
        else:
            main = run_audit(out, rc, device=device, until=until, progress=factory, wait=wait, replace=replace)
    return main.metrics


@cli_errors
def run_cmd(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Run YAML (see configs/digits.yaml); any key may be left out.",
                                  parser=path_value),
    out: Path = typer.Option(Path("runs/run"), "--out", help="Run directory.", parser=path_value),
    device: str = typer.Option("cpu", help="Torch device."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write the HTML report at the end."),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Run the whole audit: sample, cluster, train classifiers, extract (SIDE and baselines), evaluate, sweeps.
    A stage whose settings or inputs changed since the last run into OUT is redone."""
    given = cfg.load_yaml(config)  # read once (a pipe, CONFIG <(...), reads once: it was read twice)
    rc = build_config(cfg.RunConfig, None, given)  # CONFIG says the whole run: a key left out is its default
    if "model" not in given and ProcessGroup.from_env().main:  # (CONFIG is the whole run: the run
        # directory's config.yaml does not name it for this run, unlike a stage command's --config)
        say_note(no_model_note(f"{config} names no model", "model: DIR names a diffusers DDPMPipeline directory"))
    with holding_run(out, wait):  # (to the report's end: a writer queued with --wait changed the run while this
        # one wrote its report and read its findings, and they mixed both runs' results; an interruption review's)
        _say_changes(out, rc)  # (what the run holds once it is this command's: a writer waited for changes it)
        metrics = _run(ctx, out, rc, device, "evaluation", wait=wait)
        if not ProcessGroup.from_env().main:
            return  # in a launch of several processes the main one sums up and writes the report, once
        print_summary(metrics)
        if rc.train is None:  # (evaluation and report were skipped without a word, exit 0)
            console.print(NOT_EVALUATED, highlight=False, soft_wrap=True)
        else:  # (without a training set the findings printed were an earlier one's, as if of this run)
            print_findings(out)
        if report:  # (the report of a run without a training set shows its stages and says it measured nothing)
            from ..report import write_report

            say(f"report: {write_report(out)}")
        else:
            say_stale_report(out)
    say(f"run directory: {out}")


@cli_errors
def cluster_cmd(
    ctx: typer.Context,
    run: Path = typer.Option(..., "--run", help="Run directory (created if missing).", parser=path_value),
    config: Path | None = typer.Option(None, "--config", help="Run YAML overriding the run's config.yaml.",
                                       parser=path_value),
    extractor: str = typer.Option(cfg.FeaturesConfig.extractor,
                                  help="Feature extractor: pixels, pixels-pca, unet, efficientnet-lite0 or "
                                  "torchscript:PATH (docs/config.md, features)."),
    n_clusters: int = typer.Option(cfg.SurrogateConfig.n_clusters, help="K of K-means."),
    tau: float = typer.Option(cfg.SurrogateConfig.tau, help="Minimum cohesion of a kept cluster."),
    dropped: str = typer.Option(cfg.SurrogateConfig.dropped, help="drop or relabel samples of dropped clusters."),
    device: str = typer.Option("cpu"),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Sample the synthetic set if needed, embed it, and cluster it into surrogate labels.
    Flags left out keep the run's config.yaml values (the defaults shown are a new run's)."""
    names = {"extractor": "features.extractor", "n_clusters": "surrogate.n_clusters", "tau": "surrogate.tau",
             "dropped": "surrogate.dropped"}
    flags = typed_flags(ctx, names)
    with holding_run(run, wait):
        note, rc = stage_config(run, config, flags)
        _run(ctx, run, rc, device, "surrogate", wait=wait)
    if not ProcessGroup.from_env().main:
        return  # in a launch of several processes the main one says it, once
    say(f"surrogate labels: {run / 'surrogate'}")
    say_stale_report(run)
    say_note(note)


def check_run_exists(run: Path, config: Path | None, command: str, existed: bool | None = None) -> None:
    """Refuse a --run that does not exist where no --config starts one: a typo in --run started a whole new audit of
    the default target (side extract), or said the training set was missing (side train-classifier). ``existed``:
    whether it existed when the command began (``--wait`` makes and locks a run not made yet, so a typo with it was
    a new audit)."""
    if config is None and not (run.exists() if existed is None else existed):
        raise ValueError(f"--run {str(run)!r} does not exist: side {command} continues a run (side run, side sample "
                         "or side cluster makes one); to start one there, give its --config (model, training set)")


@cli_errors
def train_classifier_cmd(
    ctx: typer.Context,
    run: Path = typer.Option(..., "--run", help="Run directory.", parser=path_value),
    config: Path | None = typer.Option(None, "--config", parser=path_value),
    steps: int = typer.Option(cfg.ClassifierConfig.steps, help="Training steps of the noise-aware classifier."),
    lr: float = typer.Option(cfg.ClassifierConfig.lr, help="Learning rate of the noise-aware classifier."),
    depth: int = typer.Option(cfg.ClassifierConfig.depth, help="ResNet depth of the noise-aware classifier: 10, 18 "
                              "or 34."),
    width: int = typer.Option(cfg.ClassifierConfig.width, help="Channels of the noise-aware classifier's first "
                              "stage."),
    device: str = typer.Option("cpu"),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Train the classifiers the configured methods need (noise-aware for SIDE, clean for Cond / teacher).
    Flags left out keep the run's config.yaml values (the defaults shown are a new run's)."""
    names = {k: f"classifier.{k}" for k in ("steps", "lr", "depth", "width")}
    flags = typed_flags(ctx, names)
    existed = run.exists()
    with holding_run(run, wait):
        note = _train_classifiers(ctx, run, config, flags, device, wait, existed)
    if not ProcessGroup.from_env().main:
        return  # in a launch of several processes the main one says it, once
    say(f"classifiers in {run}")
    say_stale_report(run)
    say_note(note)


def _train_classifiers(ctx: typer.Context, run: Path, config: Path | None, flags: dict[str, Any], device: str,
                       wait: bool, existed: bool) -> str | None:
    note, rc = stage_config(run, config, flags)
    check_run_exists(run, config, "train-classifier", existed)  # (after the flags' own checks, as extract's)
    if not {"side", "side-teacher", "cond", "side-lora"} & set(rc.extract.methods):  # (it trained nothing, said
        # "classifiers in RUN" and recorded the classifier settings)
        raise ValueError(f"side train-classifier trains the classifiers of side, side-teacher and cond and side-lora's "
                         f"fine-tune; extract.methods ({', '.join(rc.extract.methods)}) needs none of them: add one "
                         "(--config), or go on with side extract")
    if (typed := list((flags.get("classifier") or {}))) and not {"side", "side-teacher"} & set(rc.extract.methods):
        # (cond's clean classifier trained with the config's settings, and the typed ones were recorded as if used)
        raise ValueError(f"--{', --'.join(typed)} set the noise-aware classifier, which only side and side-teacher "
                         f"use; extract.methods ({', '.join(rc.extract.methods)}) train none (cond's clean classifier "
                         "takes clean_classifier.* from --config)")
    _run(ctx, run, rc, device, "classifier", wait=wait)
    return note


@cli_errors
def extract_cmd(
    ctx: typer.Context,
    run: Path = typer.Option(..., "--run", help="Run directory.", parser=path_value),
    method: list[str] = typer.Option(list(E.methods), "--method", help="side, side-teacher, side-lora, cond, uncond or memguide "
                                   "(label-free memorization guidance) (repeat)."),
    n: int = typer.Option(E.n, help="N_G: generations per method."),
    seed: int = typer.Option(E.seed, help="Generation i of every method starts from the noise of (seed, i)."),
    scale: float = typer.Option(E.scale, help="Classifier-guidance scale lambda of side, and of "
                                "side-teacher unless extract.teacher_scale is set (Cond's is extract.cond_scale, side-lora's CFG scale "
                                "lora.guidance_scale)."),
    temperature: float = typer.Option(E.temperature, help="Softmax temperature of the SIDE classifiers (the paper: "
                                      "1; Cond's is extract.cond_temperature)."),
    memguide_scale: float = typer.Option(E.memguide_scale, "--memguide-scale", help="memguide's lambda (its "
                                         "time range and reconstruction time: extract.memguide_t_hi / _t_m)."),
    steps: int = typer.Option(E.steps, help="Sampler steps."),
    scheduler: str = typer.Option(E.scheduler, help="ddim or ddpm."),
    config: Path | None = typer.Option(None, "--config", parser=path_value),
    device: str = typer.Option("cpu"),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Also measure against the training set."),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Generate N_G images per method into RUN/extraction/<method>/ (and evaluate them).
    Flags left out keep the run's config.yaml values (the defaults shown are a new run's)."""
    names = {"method": "extract.methods", "n": "extract.n", "seed": "extract.seed", "scale": "extract.scale",
             "temperature": "extract.temperature", "steps": "extract.steps", "scheduler": "extract.scheduler",
             "memguide_scale": "extract.memguide_scale"}
    flags = typed_flags(ctx, names)
    from ..pipeline import run_audit

    existed = run.exists()
    with holding_run(run, wait):
        note, rc = stage_config(run, config, flags)
        check_run_exists(run, config, "extract", existed)
        with stage_progress(ctx) as factory:
            res = run_audit(run, rc, device=device, until="evaluation" if evaluate else "extraction",
                            progress=factory, wait=wait, replace=force)
        if not ProcessGroup.from_env().main:
            return  # in a launch of several processes the main one sums up, once
        print_summary(res.metrics)
        if res.metrics:
            print_findings(run)  # (read under the lock, as side run's)
    say(f"extractions in {run / 'extraction'}")
    if evaluate and rc.train is None:  # evaluation needs the training set: said, not skipped without a word
        console.print(NOT_EVALUATED, highlight=False, soft_wrap=True)
    say_stale_report(run)
    say_note(note)
