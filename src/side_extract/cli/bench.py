"""``side bench``: the extraction benchmark across training-set scales, and the compute benchmark."""
from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path

import typer
from rich.markup import escape

from .common import cli_errors, console, say, path_value, was_typed
from .run import print_summary, stage_progress

bench_app = typer.Typer(
    help="Benchmarks: extraction power across training-set scales, and compute figures (how: docs/benchmarks.md; "
    "results: docs/results.md).",
    no_args_is_help=True,
)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _out_folder(out: Path) -> Path:
    """``--out`` and ``--cache`` checked when the command line is read (a benchmark writes its results at the end,
    hours later; a cache that is a file failed after the header, naming no option): a folder, or one that can be
    made and written here (a file on its way was found after the whole benchmark)."""
    from ..runs import check_writable

    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{str(out)!r} exists and is not a folder")
    try:
        check_writable(out)
    except ValueError as e:
        raise typer.BadParameter(str(e).removeprefix("--out ")) from None
    return out


def _parts(only: str) -> tuple[str, ...]:
    """``--only``'s parts, each named once (a repeat ran once and named the results files after it twice)."""
    parts = tuple(x.strip() for x in only.split(",") if x.strip())
    if twice := sorted({p for p in parts if parts.count(p) > 1}):
        raise ValueError(f"--only {only!r} names {', '.join(twice)} more than once")
    return parts


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name}={text!r} must be comma-separated integers") from None


@bench_app.command("extraction")
@cli_errors
def extraction_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(Path("benchmarks/results"), "--out", callback=_out_folder,
                               help="Folder for extraction.json and extraction.md.", parser=path_value),
    cache: Path = typer.Option(Path("runs/bench-cache"), "--cache", callback=_out_folder,
                               help="Trained targets (keyed by their config fingerprint), bands and run directories.",
                               parser=path_value),
    scales: str | None = typer.Option(None, "--scales", help="Training-set sizes, comma-separated "
                                      "(default: 100,300,1000; --quick: 30,60)."),
    size: int | None = typer.Option(None, "--size", help="Image size in px (default: 16; --quick: 8)."),
    n_generated: int | None = typer.Option(None, "--n-generated", min=1,
                                           help="N_G per method (default: 2000; --quick: 64)."),
    train_steps: int | None = typer.Option(None, "--train-steps", min=1,
                                           help="The one training budget of every target (default: 3000; --quick: 400)."),
    seed: int | None = typer.Option(None, "--seed", help="Extraction seed: tune on one (validation), report on "
                                    "another (held-out) (default: 1)."),
    sweep_scale: int | None = typer.Option(None, "--sweep-scale", help="Scale of the lambda, K and tau sweeps "
                                           "(default: the middle scale)."),
    sweep_n_generated: int | None = typer.Option(None, "--sweep-n-generated", min=1, help="N_G per sweep point "
                                                 "(default: 500; --quick: 64)."),
    no_sweeps: bool = typer.Option(False, "--no-sweeps", help="Skip the lambda, K and tau sweeps."),
    quick: bool = typer.Option(False, "--quick", help="A tiny configuration (30 and 60 digits at 8x8, N_G 64) that "
                               "finishes in about 1.5 minutes on a 2-core CPU; writes extraction-quick.*."),
    device: str = typer.Option("cpu", help="Torch device."),
) -> None:
    """Train (or reuse) one target per digits subset; SIDE, SIDE-teacher, Cond, UnCond on each; sweeps; results."""
    from ..bench.extraction import (ExtractionBenchConfig, quick_config, run_extraction_bench,
                                    write_extraction_results)

    bc = quick_config() if quick else ExtractionBenchConfig()
    ex = bc.run.extract
    changes: dict = {}
    if scales is not None:
        changes["scales"] = _ints(scales, "--scales")
    if size is not None:
        changes["size"] = size
    if train_steps is not None:
        changes["target"] = dataclasses.replace(bc.target, steps=train_steps)
    ex = dataclasses.replace(ex, n=n_generated if n_generated is not None else ex.n,
                             seed=seed if seed is not None else ex.seed)
    changes["run"] = dataclasses.replace(bc.run, extract=ex)
    if sweep_scale is not None:
        changes["sweep_scale"] = sweep_scale
    if sweep_n_generated is not None:
        changes["sweep_n_generated"] = sweep_n_generated
    if no_sweeps and (unread := [f for f in ("--sweep-scale", "--sweep-n-generated")
                                 if was_typed(ctx, f)]):  # (accepted, and recorded)
        raise ValueError(f"{' and '.join(unread)} set the sweeps, which --no-sweeps leaves out: they would not be "
                         "read; leave them out")
    if no_sweeps:
        changes.update(lambdas=(), n_clusters=(), taus=())
    bc = dataclasses.replace(bc, **changes)
    # every option spelled out, so the command reproduces the run whatever the defaults become
    argv = ["side", "--threads", str(_threads()), "bench", "extraction", "--out", str(out), "--cache", str(cache),
            "--scales", ",".join(map(str, bc.scales)), "--size", str(bc.size), "--n-generated", str(bc.run.extract.n),
            "--train-steps", str(bc.target.steps), "--seed", str(bc.run.extract.seed)]
    argv += (["--sweep-n-generated", str(bc.sweep_n_generated), "--sweep-scale", str(bc.chosen_sweep_scale)]
             if not no_sweeps else ["--no-sweeps"])
    argv += ["--quick"] if quick else []
    argv += ["--device", device] if device != "cpu" else []
    command = shlex.join(argv)
    say(f"extraction benchmark: scales {list(bc.scales)} at {bc.size}x{bc.size}, N_G {bc.run.extract.n}, "
        f"{bc.target.steps} training steps, seed {bc.run.extract.seed}; cache {cache}")
    with stage_progress(ctx) as factory:
        data = run_extraction_bench(bc, cache, device=device, progress=factory, command=command)
    for s in data["scales"]:
        say(f"n_train = {s['n_train']} ({s['target']['epochs']} epochs):")
        print_summary(s["methods"])
    json_path, md_path = write_extraction_results(data, out)
    say(f"wrote {json_path} and {md_path} ({data['seconds']:.0f} s)")


@bench_app.command("variants")
@cli_errors
def variants_cmd(
    ctx: typer.Context,
    variants: Path = typer.Option(Path("benchmarks/variants.yaml"), "--variants",
                                  help="YAML with 'base' (the paper's settings) and 'variants' (name -> dotted overrides).",
                                  parser=path_value),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", callback=_out_folder,
                               help="Folder for variants.json and variants.md.", parser=path_value),
    cache: Path = typer.Option(Path("runs/bench-cache"), "--cache", callback=_out_folder,
                               help="The extraction benchmark's cache (targets, "
                               "bands, runs); variants run as sub-runs of its runs.", parser=path_value),
    scales: str = typer.Option("300,1000", "--scales", help="Training-set sizes, comma-separated."),
    size: int | None = typer.Option(None, "--size", help="Image size in px (default: 16, as in the extraction benchmark)."),
    n_generated: int | None = typer.Option(None, "--n-generated", min=1,
                                           help="N_G per variant and baseline (default: 2000)."),
    train_steps: int | None = typer.Option(None, "--train-steps", min=1,
                                           help="Training budget of the targets (default: 3000)."),
    validation_seed: int = typer.Option(1, "--validation-seed", help="Extraction seed the variants are chosen on."),
    heldout_seed: int = typer.Option(2, "--heldout-seed", help="Extraction seed the choice is reported on."),
    no_heldout: bool = typer.Option(False, "--no-heldout", help="Validation seed only (e.g. to carry a choice made "
                                    "elsewhere to new targets: list only that variant)."),
    methods: str = typer.Option("side", "--methods", help="SIDE methods to vary: side, side-teacher (comma-separated)."),
    heldout: str = typer.Option("chosen", "--heldout", help="Run on the held-out seed: 'chosen' (base and the "
                                "chosen variant) or 'all'."),
    device: str = typer.Option("cpu", help="Torch device."),
) -> None:
    """Score SIDE variants on a validation replicate; report the best on a held-out one (superseded by `side bench
    fair --form`, which tunes every method and form alike over several replicates: docs/benchmarks.md)."""
    from ..bench.variants import VariantsBenchConfig, load_variants_file, run_variants_bench, write_variants_results

    from ..bench.extraction import ExtractionBenchConfig

    typed = {p for p in ("heldout_seed", "heldout") if was_typed(ctx, p)}
    given = [f"--heldout-seed {heldout_seed}"] * ("heldout_seed" in typed) + [f"--heldout {heldout}"] * (
        "heldout" in typed and heldout != "chosen")  # (the default, which earlier results' commands name)
    if no_heldout and given:  # (dropped without a word, a held-out seed equal to the validation one too)
        raise ValueError(f"--no-heldout runs no held-out seed, so {', '.join(given)} would not be read: give one or "
                         "the other")
    bc = ExtractionBenchConfig()
    base, named = load_variants_file(variants)
    changes: dict = {"scales": _ints(scales, "--scales"), "lambdas": (), "n_clusters": (), "taus": ()}
    if size is not None:
        changes["size"] = size
    if train_steps is not None:
        changes["target"] = dataclasses.replace(bc.target, steps=train_steps)
    if n_generated is not None:
        changes["run"] = dataclasses.replace(bc.run, extract=dataclasses.replace(bc.run.extract, n=n_generated))
    bc = dataclasses.replace(bc, **changes)
    vc = VariantsBenchConfig(bench=bc, base=base, variants=named, methods=tuple(m.strip() for m in methods.split(",")),
                             validation_seed=validation_seed, heldout_seed=None if no_heldout else heldout_seed,
                             heldout=heldout)
    argv = ["side", "--threads", str(_threads()), "bench", "variants", "--variants", str(variants), "--out", str(out),
            "--cache", str(cache), "--scales", ",".join(map(str, bc.scales)), "--size", str(bc.size),
            "--n-generated", str(bc.run.extract.n), "--train-steps", str(bc.target.steps),
            "--validation-seed", str(validation_seed), "--methods", ",".join(vc.methods)]
    argv += ["--no-heldout"] if no_heldout else ["--heldout-seed", str(heldout_seed), "--heldout", heldout]
    argv += ["--device", device] if device != "cpu" else []
    say(f"variants: {len(vc.names)} ({', '.join(vc.names)}) on scales {list(bc.scales)} at {bc.size}x{bc.size}, "
        f"N_G {bc.run.extract.n}; choose on seed {validation_seed}"
        + ("" if no_heldout else f", report on seed {heldout_seed}"))
    with stage_progress(ctx) as factory:
        data = run_variants_bench(vc, cache, device=device, progress=factory, command=shlex.join(argv))
    json_path, md_path = write_variants_results(data, out)
    console.print(md_path.read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)
    say(f"chosen: {data['chosen']}; wrote {json_path} and {md_path} ({data['seconds']:.0f} s)")


@bench_app.command("fair")
@cli_errors
def fair_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(Path("benchmarks/results/fair"), "--out", callback=_out_folder,
                               help="Folder for fair.json and fair.md.", parser=path_value),
    cache: Path = typer.Option(Path("runs/bench-cache"), "--cache", callback=_out_folder,
                               help="Targets, bands and one run per replicate.", parser=path_value),
    scales: str = typer.Option("100,300,1000", "--scales", help="Training-set sizes, comma-separated."),
    size: int = typer.Option(16, "--size", min=1, help="Image size in px."),
    n_generated: int = typer.Option(2000, "--n-generated", min=1, help="N_G per method and held-out replicate."),
    n_synthetic: int = typer.Option(2000, "--n-synthetic", min=1,
                                    help="Synthetic samples per replicate (SIDE step 1)."),
    train_steps: int = typer.Option(3000, "--train-steps", min=1, help="The one training budget of every target."),
    methods: str = typer.Option("side,side-teacher,cond,uncond", "--methods", help="Methods, comma-separated."),
    lambdas: str = typer.Option("1,3,10", "--lambdas", help="Lambda grid, the same for every guided method."),
    temperatures: str = typer.Option("1,2", "--temperatures", help="Temperature grid, the same for every guided method."),
    validation: str = typer.Option("1,2", "--validation", help="Validation replicates (settings are chosen here)."),
    heldout: str = typer.Option("11,12,13", "--heldout", help="Held-out replicates (results are reported here)."),
    validation_n: int | None = typer.Option(None, "--validation-n", help="N_G per method and setting on validation "
                                               "replicates (default: --n-generated, the budget that is reported)."),
    select_metric: str = typer.Option("ums_cumulative/mid", "--select-metric", help="What tuning maximizes."),
    n_bootstrap: int = typer.Option(1000, "--n-bootstrap", min=10,
                                     help="Bootstrap draws for the ratio intervals (at least 10)."),
    form: list[str] = typer.Option([], "--form", help="A SIDE form (or a memguide form) to compare too, tuned on the "
                                   "same-size grid: NAME=METHOD[,dotted.key=value...], e.g. "
                                   "side-x0=side,classifier.guidance_input=x0_hat or "
                                   "memguide-avoid=memguide,extract.memguide_avoid=1 (repeat). A form of cond or "
                                   "uncond is a baseline form: one more baseline to pick the best from (e.g. "
                                   "cond-late=cond,extract.t_hi=0.5, to give Cond as many settings as several SIDE "
                                   "forms have)."),
    lora_scales: str = typer.Option("1,1.5,2,3,4,6", "--lora-scales", help="side-lora's grid of CFG scales w "
                                    "(as many values as the lambda x temperature grid)."),
    memguide_scales: str = typer.Option("10,20,30,60,100,200", "--memguide-scales", help="memguide's grid of "
                                        "lambdas (as many values as the lambda x temperature grid)."),
    eta: float = typer.Option(0.0, "--eta", help="DDIM eta of every method's generations (0: deterministic DDIM, "
                              "the paper's; 1: as stochastic as DDPM). The same for all methods, UnCond included."),
    stop_unseen: float = typer.Option(0.0, "--stop-unseen", help="Dedup-driven stopping for every method, UnCond "
                                      "included (extract.stop_unseen; 0: off): a method stops after the first round "
                                      "whose generations' unseen mass is below this."),
    equal_samples: bool = typer.Option(True, "--equal-samples/--no-equal-samples", help="Also run UnCond at N_G + "
                                       "N_S on every held-out replicate and set each SIDE form against it (plain "
                                       "sampling given the synthetic set's samples too)."),
    tuning_from: list[Path] = typer.Option([], "--tuning-from", parser=path_value, help="An earlier fair.json of "
                                           "this same "
                                           "configuration (--heldout, --n-bootstrap and --equal-samples/"
                                           "--no-equal-samples may differ): take its chosen "
                                           "settings instead of re-running the validation grid, and report on the "
                                           "held-out replicates again. Repeat it to join the tuning of fair benches "
                                           "that each ran some of the entries (--methods, --form), e.g. one split "
                                           "over processes: every tuned entry must come from one of them."),
    device: str = typer.Option("cpu", help="Torch device."),
) -> None:
    """The fair protocol: replicates that redraw everything downstream of the target, the same tuning grid for
    every guided method on validation replicates, results with intervals on held-out replicates."""
    from ..bench.extraction import ExtractionBenchConfig
    from ..bench.protocol import FairBenchConfig, reused_tuning, run_fair_bench, write_fair_results

    def floats(text: str, name: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{name}={text!r} must be comma-separated numbers") from None
        if not all(math.isfinite(v) for v in values):  # (said with the option's name, not the config's)
            raise ValueError(f"{name}={text!r} must be finite numbers")
        return values

    bc = ExtractionBenchConfig()
    run = dataclasses.replace(bc.run, sample=dataclasses.replace(bc.run.sample, n=n_synthetic),
                              extract=dataclasses.replace(bc.run.extract, n=n_generated, eta=eta,
                                                          stop_unseen=stop_unseen))
    bc = dataclasses.replace(bc, scales=_ints(scales, "--scales"), size=size, run=run, lambdas=(), n_clusters=(),
                             taus=(), target=dataclasses.replace(bc.target, steps=train_steps))
    import yaml

    from .. import config as cfg

    forms: dict = {}
    for spec in form:
        name, _, rest = spec.partition("=")
        parts = [x for x in rest.split(",") if x]
        if not name or not parts:
            raise ValueError(f"--form {spec!r} must look like NAME=METHOD[,key=value...]")
        entry: dict = {"method": parts[0]}
        for kv in parts[1:]:
            k, eq, v = kv.partition("=")
            if not eq:
                raise ValueError(f"--form {spec!r}: {kv!r} must be dotted.key=value")
            try:
                entry[k] = cfg.yaml_value(v)
            except yaml.YAMLError as e:
                raise ValueError(f"--form {spec!r}: {kv!r}: the value is not YAML ({e.__class__.__name__}); a list "
                                 "cannot be given here (values are split at commas)") from None
        if name in forms:
            raise ValueError(f"--form {name!r} is given twice; each form needs its own name")
        forms[name] = entry
    for flag, text in (("--lambdas", lambdas), ("--temperatures", temperatures), ("--validation", validation),
                       ("--heldout", heldout)):  # (an empty one was said by the config's name: "scales_grid=[]")
        if not text.strip(" ,"):
            raise ValueError(f"{flag}={text!r} names no value: give at least one (comma-separated)")
    fc = FairBenchConfig(bench=bc, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                         forms=forms, lora_scales=floats(lora_scales, "--lora-scales"),
                         memguide_scales=floats(memguide_scales, "--memguide-scales"),
                         scales_grid=floats(lambdas, "--lambdas"), temperatures=floats(temperatures, "--temperatures"),
                         validation_replicates=_ints(validation, "--validation"),
                         heldout_replicates=_ints(heldout, "--heldout"), validation_n=validation_n,
                         select_metric=select_metric, n_bootstrap=n_bootstrap, equal_samples=equal_samples)
    for flag, method in (("--lora-scales", "side-lora"), ("--memguide-scales", "memguide")):  # (accepted, and the
        # targets trained, for a grid no entry reads)
        if was_typed(ctx, flag) and not fc.uses(method):
            raise ValueError(f"{flag} is {method}'s grid, and no entry is {method} (--methods, --form): it would "
                             f"not be read; leave it out, or add {method}")
    argv = ["side", "--threads", str(_threads()), "bench", "fair", "--out", str(out), "--cache", str(cache),
            "--scales", scales, "--size", str(size), "--n-generated", str(n_generated), "--n-synthetic",
            str(n_synthetic), "--train-steps", str(train_steps), "--methods", methods, "--lambdas", lambdas,
            "--temperatures", temperatures, "--validation", validation, "--heldout", heldout,
            "--validation-n", str(fc.validation_n), "--select-metric", select_metric, "--n-bootstrap", str(n_bootstrap)]
    argv += ["--lora-scales", lora_scales] if fc.uses("side-lora") else []
    argv += ["--memguide-scales", memguide_scales] if fc.uses("memguide") else []
    for spec in form:
        argv += ["--form", spec]
    # (as given: :g kept 6 digits, and the recorded command ran another eta)
    argv += ["--eta", repr(float(eta))] if eta != 0 else []
    argv += ["--stop-unseen", repr(float(stop_unseen))] if stop_unseen != 0 else []
    argv += [] if equal_samples else ["--no-equal-samples"]
    for path in tuning_from:
        argv += ["--tuning-from", str(path)]
    argv += ["--device", device] if device != "cpu" else []
    tuning = None
    if tuning_from:
        from ..runs import read_json

        for path in tuning_from:
            if not path.is_file():
                raise ValueError(f"--tuning-from {path}: no such file (expected an earlier fair.json)")
        tuning = reused_tuning(fc, *((read_json(path), str(path)) for path in tuning_from))
    say(f"fair benchmark: scales {list(bc.scales)} at {size}x{size}; grid {list(fc.scales_grid)} x "
        f"{list(fc.temperatures)}; validation {list(fc.validation_replicates)}, held-out "
        f"{list(fc.heldout_replicates)}")
    with stage_progress(ctx) as factory:
        data = run_fair_bench(fc, cache, device=device, progress=factory, command=shlex.join(argv), tuning=tuning)
    json_path, md_path = write_fair_results(data, out)
    console.print(md_path.read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)
    say(f"wrote {json_path} and {md_path} ({data['seconds']:.0f} s)")


@bench_app.command("signals")
@cli_errors
def signals_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(Path("benchmarks/results"), "--out", callback=_out_folder,
                               help="Folder for signals-<size>px-n<N>.{json,md}.", parser=path_value),
    cache: Path = typer.Option(Path("runs/bench-cache"), "--cache", callback=_out_folder,
                               help="Targets, bands and replicate runs.", parser=path_value),
    n_train: int = typer.Option(300, "--n-train", min=1, help="Training-set size (digits:N)."),
    size: int = typer.Option(16, "--size", min=1, help="Image size in px."),
    replicate: int = typer.Option(1, "--replicate", help="Replicate whose synthetic set and clusters are used."),
    n_synthetic: int = typer.Option(2000, "--n-synthetic", min=1, help="Synthetic samples (SIDE step 1)."),
    steps: int = typer.Option(1200, "--steps", min=1, help="Training steps of every classifier."),
    signals: str = typer.Option("paper,every-block,x0-hat", "--signals", help="Signals, comma-separated."),
    device: str = typer.Option("cpu", help="Torch device."),
) -> None:
    """Held-out accuracy per timestep quartile of each guidance signal, on the same synthetic set and labels."""
    from ..bench.extraction import ExtractionBenchConfig
    from ..bench.signals import run_signals_bench, write_signals_results

    bc = ExtractionBenchConfig()
    run = dataclasses.replace(bc.run, sample=dataclasses.replace(bc.run.sample, n=n_synthetic),
                              classifier=dataclasses.replace(bc.run.classifier, steps=steps))
    bc = dataclasses.replace(bc, scales=(n_train,), size=size, run=run, lambdas=(), n_clusters=(), taus=())
    argv = ["side", "--threads", str(_threads()), "bench", "signals", "--out", str(out), "--cache", str(cache),
            "--n-train", str(n_train), "--size", str(size), "--replicate", str(replicate), "--n-synthetic",
            str(n_synthetic), "--steps", str(steps), "--signals", signals]
    argv += ["--device", device] if device != "cpu" else []  # (the recorded command reran on the CPU)
    with stage_progress(ctx) as factory:
        data = run_signals_bench(bc, n_train, cache, replicate=replicate,
                                 signals=tuple(x.strip() for x in signals.split(",") if x.strip()), device=device,
                                 progress=factory, command=shlex.join(argv))
    json_path, md_path = write_signals_results(data, out)
    console.print(md_path.read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)
    say(f"wrote {json_path} and {md_path} ({data['seconds']:.0f} s)")


@bench_app.command("compute")
@cli_errors
def compute_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(Path("benchmarks/results"), "--out", callback=_out_folder,
                               help="Folder for compute.json and compute.md.", parser=path_value),
    threads: int = typer.Option(1, "--bench-threads", min=1, help="Torch and faiss threads for the timed parts."),
    no_demo: bool = typer.Option(False, "--no-demo", help="Skip the `side demo` wall-time part."),
    busy: bool = typer.Option(False, "--busy", help="Also time `side demo` idle and beside a CPU-bound competitor "
                              "(the slowdown on a busy machine: two pairs, the order alternating; about four demo "
                              "runs)."),
    only: str = typer.Option("", "--only", help="Run only these parts, comma-separated (sampling, guidance, "
                             "neighbors, evaluate_rss, demo, busy_demo); writes compute-<parts>.*"),
    quick: bool = typer.Option(False, "--quick", help="Small sizes, no demo (seconds); writes compute-quick.*."),
) -> None:
    """Ratios measured side by side: sampler vs DDIMPipeline, guided vs floor, kNN vs faiss; RSS; demo time."""
    from ..bench.compute import ComputeBenchConfig, quick_compute_config, run_compute_bench, write_compute_results

    c = quick_compute_config() if quick else ComputeBenchConfig()
    parts = _parts(only)
    c = dataclasses.replace(c, threads=threads, demo=c.demo and not no_demo, busy=busy or "busy_demo" in parts,
                            only=parts)
    argv = ["side", "bench", "compute", "--out", str(out), "--bench-threads", str(threads)]
    argv += ["--no-demo"] if no_demo else []
    argv += ["--busy"] if busy else []
    argv += ["--only", only] if parts else []
    argv += ["--quick"] if quick else []
    data = run_compute_bench(c, command=shlex.join(argv),
                             progress=lambda name: console.print(f"[dim]{escape(name)} ...[/]"))
    json_path, md_path = write_compute_results(data, out)
    console.print(md_path.read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)
    say(f"wrote {json_path} and {md_path} ({data['seconds']:.0f} s)")


@bench_app.command("scale")
@cli_errors
def scale_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(Path("benchmarks/results"), "--out", callback=_out_folder,
                               help="Folder for scale.json and scale.md.", parser=path_value),
    threads: int = typer.Option(1, "--bench-threads", min=1, help="Torch threads for the timed parts."),
    only: str = typer.Option("", "--only", help="Run only these parts, comma-separated (models, search, "
                                                    "processes); writes scale-<parts>.*."),
    gpu_tflops: float = typer.Option(30.0, "--gpu-tflops", help="Assumed sustained TFLOP/s of one GPU for the "
                                     "projection (not measured here; scripts/gpu-check measures it on a GPU)."),
    quick: bool = typer.Option(False, "--quick", help="CIFAR-10 size at one small batch, a small search; writes "
                               "scale-quick.*."),
) -> None:
    """Real model sizes (CIFAR-10 DDPM, 64x64), the search at 50k/200k training images, 1 vs 2 processes, and
    the cost model of an audit (here, and projected to 1 and 8 GPUs)."""
    from ..bench.scale import ScaleBenchConfig, quick_scale_config, run_scale_bench, write_scale_results

    c = quick_scale_config() if quick else ScaleBenchConfig()
    c = dataclasses.replace(c, threads=threads, gpu_tflops=gpu_tflops)
    parts = _parts(only)
    argv = ["side", "bench", "scale", "--out", str(out), "--bench-threads", str(threads),
            "--gpu-tflops", repr(float(gpu_tflops))]
    argv += ["--only", only] if parts else []
    argv += ["--quick"] if quick else []
    data = run_scale_bench(c, command=shlex.join(argv), parts=parts,
                           progress=lambda name: console.print(f"[dim]{escape(name)} ...[/]"))
    json_path, md_path = write_scale_results(data, out)
    console.print(md_path.read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)
    say(f"wrote {json_path} and {md_path} ({data['seconds']:.0f} s)")
