"""``side evaluate``: memorization metrics of generations against the training set -> DIR/metrics.json."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
from pathlib import Path
from typing import Any

import typer

from .. import config as cfg
from .common import build_config, cli_errors, say, path_value, progress_bar, typed_flags, without_replaced_bands

D = cfg.EvaluateConfig()
OPTIONS = [k for k in cfg.to_dict(D)]


def file_settings(config: Path | None) -> dict[str, Any]:
    """The evaluation settings a ``--config`` file states: an EvaluateConfig mapping, or a run YAML's ``evaluate:``
    section."""
    base: dict[str, Any] = cfg.load_yaml(config) if config is not None else {}
    run_keys = {f.name for f in dataclasses.fields(cfg.RunConfig)} - set(OPTIONS)
    if isinstance(base.get("evaluate"), dict):
        return dict(base["evaluate"])
    if base and set(base) <= run_keys | {"evaluate"}:  # a run YAML that leaves evaluate: at its defaults
        return {}
    return base


def evaluate_config(ctx: typer.Context, config: Path | None) -> cfg.EvaluateConfig:
    """File then typed flags (:func:`file_settings`)."""
    base = file_settings(config)
    overrides = typed_flags(ctx, {k: k for k in OPTIONS if k in ctx.params})
    # the ways to give bands are alternatives: a typed one replaces the file's others, as any flag replaces the
    # file's value (--bands beside the file's bands_file was refused as "give one of them, not both")
    base = without_replaced_bands(base, overrides)
    merged = cfg.merge(base, overrides)
    if "heldout" not in overrides and merged.get("heldout") is not None and (
            merged.get("bands") is not None or merged.get("bands_file") is not None
            or merged.get("similarity", cfg.EvaluateConfig.similarity) != "rms-l2"):
        # a file's held-out set (a run YAML's: its sample quality's reference too) where side evaluate would not read
        # it, the bands given or the similarity a cosine: left out (it refused --bands as "--heldout ... would not be
        # read", naming a flag nobody typed, and the file had to be edited; a review's find)
        base = {k: v for k, v in base.items() if k != "heldout"}
    if "calibration_quantiles" in overrides:
        overrides["calibration_quantiles"] = parse_floats(overrides["calibration_quantiles"], "calibration_quantiles")
    return build_config(cfg.EvaluateConfig, None, cfg.merge(base, overrides))


def parse_floats(value: Any, name: str) -> list[float]:
    try:
        return [float(v) for v in str(value).split(",")]
    except ValueError:
        raise ValueError(f"{name}={value!r} must be comma-separated numbers") from None


def check_similarity_inputs(model: str | None, similarity: str) -> None:
    """Refuse, before any image set loads, a ``--similarity`` whose extractor is unknown or lacks its file, a
    ``cosine:unet`` without ``--model``, and a ``--model`` that the similarity would not read (only ``cosine:unet``
    embeds with the target: it was loaded, or failed to load, and then ignored)."""
    from ..features import check_extractor
    from ..metrics import Similarity

    extractor = Similarity(similarity).extractor
    if extractor is not None:  # (a typo was found after both sets loaded)
        check_extractor(extractor)
    if model is None and extractor == "unet":
        raise ValueError("--similarity cosine:unet embeds with the target model: give it with --model (a diffusers "
                         "directory or 'demo')")
    if model is not None and similarity != "cosine:unet":
        raise ValueError(f"--model {model!r} is read by --similarity cosine:unet only (here {similarity!r}): it would "
                         "not be read; leave it out")


def load_feature_model(model: str | None, device: str, images: Any = None) -> Any:
    """The target denoiser for extractors that need one (``cosine:unet``); None without ``--model``. ``images``
    (an ImageSet): refused where the model takes images of another shape (a torch error deep in the work)."""
    if model is None:
        return None
    from ..models.target import check_fits, load_target

    denoiser = load_target(model, device)
    if images is not None:
        check_fits(images.shape, denoiser.sample_shape,
                   f"training images ({images.name or 'given'}) for --model {model}", resize="--resize")
    return denoiser


def default_method(generated: str) -> str:
    """A run's ``extraction/<method>`` directory names its method; anything else has none."""
    p = Path(generated)
    return p.name if p.parent.name == "extraction" else ""


FILES_CSV = "id_files.csv"  # set, id, file: the files behind the ids of folder sets
FILES_CSV_HEADER = "set,id,file"


def write_files_csv(out: Path, specs: dict[str, str]) -> None:
    """``out/id_files.csv``: for each set of ``specs`` (name -> spec) that is a folder of images, its ids and the file
    each names (per_generation.csv gave ids alone, positions in name order: 4 read as 4.png named 12.png of
    0.png..12.png); an earlier one removed where no set is a folder (it named another evaluation's files)."""
    from ..data import folder_files
    from ..runs import atomic_write_text

    rows = [(name, i, f) for name, spec in specs.items() for i, f in enumerate(folder_files(spec) or [])]
    dest = Path(out) / FILES_CSV
    if not rows:
        if dest.is_file() and _written_here(dest):  # (only one this command wrote: a file of that name is the user's)
            dest.unlink()
        return
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(FILES_CSV_HEADER.split(","))
    w.writerows(rows)
    atomic_write_text(dest, buf.getvalue())


def _written_here(path: Path) -> bool:
    """Whether ``path`` reads as a file :func:`write_files_csv` wrote (its header)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip() == FILES_CSV_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def check_files_csv(out: Path) -> None:
    """Refuse an ``out`` holding a :data:`FILES_CSV` this command did not write (the user's own was replaced)."""
    dest = Path(out) / FILES_CSV
    if dest.exists() and not _written_here(dest):
        raise ValueError(f"--out {str(out)!r} holds {FILES_CSV}, not one side evaluate wrote (it writes the files "
                         "behind a folder's ids there): write elsewhere, or move it")


def run_written_into(out: Path, files: tuple[str, ...], inputs: dict[str, str | None] | None = None) -> Path | None:
    """The run directory ``out`` lies in, if any (the command writes there as one of its writers, under its lock),
    checked before the sets load: ``out`` may not be the folder of one of the run's own stages (its manifest vouches
    for what the run made there), and no other process may be writing the run; nor may ``out`` be a file (it was
    found after the work), nor a folder of shards read as one of ``inputs`` (option -> spec: its .npz files written
    among the shards, the folder was refused as generations from then on)."""
    from ..runs import check_run_path, check_unlocked, check_writable, enclosing_run, stage_holding

    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory (expected a folder to write into)")
    for option, spec in (inputs or {}).items():
        if (spec and Path(spec).is_dir() and Path(out).exists() and Path(spec).resolve() == Path(out).resolve()
                and any(Path(spec).glob("shard-*.npz"))):
            raise ValueError(f"--out {str(out)!r} is the folder of shards given as {option}: {', '.join(files)} "
                             "written among them would leave it unreadable as a set of images; write elsewhere")
    check_writable(out, files=files)  # (``files``: what the command writes in it)
    lexical = Path(os.path.abspath(out))
    for p in (lexical, *lexical.parents):  # a run's folder linked elsewhere (RUN/evaluation -> someone's folder):
        # the path resolves out of the run, so no run was found, and the evaluation was written where the link pointed
        if p.is_symlink() and (outer := enclosing_run(p.parent)) is not None:
            check_run_path(outer, "run")
    run = enclosing_run(out)
    if run is not None:
        if (stage := stage_holding(run, out)) is not None:
            other = run / "evaluation" / (Path(out).name + "-own")
            raise ValueError(f"--out {str(out)!r} is the folder of the run's own stage {stage!r} (its manifest vouches "
                             f"for what the run made there): write to a new name, e.g. --out {other}, or rerun the "
                             "stage with `side extract` / `side run`")
        check_unlocked(run)  # another writer: said at once
        check_run_path(run, "run")  # (its evaluation/ linked elsewhere: the evaluation was written there)
    return run


def generated_stage(generated: str) -> tuple[Path, str, str] | None:
    """(run, stage, fingerprint) of the finished ``extraction/<method>`` of a run that ``generated`` is the folder of
    (None: images elsewhere)."""
    from ..runs import enclosing_run, read_stages, stage_holding

    run = enclosing_run(generated) if Path(generated).is_dir() else None
    stage = stage_holding(run, generated) if run is not None else None
    if stage is None or not stage.startswith("extraction/") or (run / stage).resolve() != Path(generated).resolve():
        return None
    e = read_stages(run).get(stage) or {}
    if e.get("status") != "complete":  # (its shards on disk were measured as a whole set without a word, and the
        # run then counted that evaluation as a method's for good, even once the stage was made again: no stage
        # was recorded; an interruption review's find)
        raise ValueError(unfinished_stage(run, stage, e))
    return (run, stage, e["fingerprint"]) if e.get("fingerprint") else None


def unfinished_stage(run: Path, stage: str, entry: dict[str, Any]) -> str:
    """Why ``--generated RUN/<stage>`` is refused where the stage is not complete: what it holds and the way on."""
    from ..runs import run_locked, stage_now

    now = stage_now(entry.get("status"), run_locked(run))
    planned = entry.get("n_planned", entry.get("n"))
    return (f"--generated {str(run / stage)!r} is the stage {stage} of run {str(run)!r}, which is "
            f"{entry.get('status', 'not recorded')}: {now}, so its folder holds part of the "
            f"{planned if isinstance(planned, int) else 'planned'} generations, and an evaluation of them would "
            f"count as the method's. Finish it first (side extract --run {run} --method {stage.split('/', 1)[1]}, "
            "or side run with the run's config, resumes it at its last whole shard); to measure the part made, "
            "copy the folder out of the run and give that")


def run_evaluate_section(run: Path) -> dict[str, Any]:
    """The ``evaluate:`` section of run directory ``run``'s config.yaml as written (empty where it has none)."""
    return (cfg.load_yaml(run / "config.yaml").get("evaluate") or {}) if (run / "config.yaml").is_file() else {}


def run_bands(run: Path, c: cfg.EvaluateConfig) -> cfg.EvaluateConfig:
    """``c`` with the bands of run directory ``run`` (so an evaluation written into it is compared with its methods';
    in other bands it is left out): the bands or bands file its config names, else the ones it calibrated
    (``RUN/evaluation/bands.json``) where made for ``c``'s similarity. Said on the console."""
    from ..metrics import other_revision
    from ..runs import read_json

    ev = run_evaluate_section(run)
    own = run / "evaluation" / "bands.json"
    if (theirs := ev.get("similarity", D.similarity)) != c.similarity:
        say(f"bands: not the run's (the run measures {theirs!r}, this evaluation {c.similarity!r}): it "
            "is left out of the run's comparison")  # (it said "calibrated here" where the
            # paper's fixed bands were taken)
        return c
    if ev.get("bands"):
        c, said = dataclasses.replace(c, bands=str(ev["bands"])), f"its config's ({ev['bands']})"
    elif ev.get("bands_file"):
        if not Path(str(ev["bands_file"])).is_absolute():  # (a run made before this release recorded it as typed:
            # read from this folder, it named nothing, or another file's bands, and the evaluation was left out of
            # the comparison without a word)
            raise ValueError(f"run {str(run)!r} names its bands file as typed where it was made "
                             f"({ev['bands_file']!r}), which from here may name another file: give it with "
                             "--bands-file")
        c, said = dataclasses.replace(c, bands_file=str(ev["bands_file"])), f"its config's ({ev['bands_file']})"
    elif own.is_file() and (made := read_json(own, dict)).get("similarity") == c.similarity:
        if (stale := other_revision(made, c.similarity)) is not None:  # (taken without a word)
            say(f"bands: not the run's ({own}): they were {stale}; make the run again (side run) to calibrate them "
                "anew")
            return c
        c, said = dataclasses.replace(c, bands_file=str(own)), f"calibrated ({own})"
    else:
        return c
    say(f"bands: the run's, {said}; --bands or --bands-file to choose others")
    return c


def run_metric_settings(run: Path, c: cfg.EvaluateConfig, typed: set[str]) -> cfg.EvaluateConfig:
    """``c`` with run directory ``run``'s settings of Carlini's and Gu's ratios (``METRIC_SETTINGS``) where left at
    their defaults and not given (``typed``: the flags typed and the keys a ``--config`` file states, at the default
    or not): an evaluation written into the run under other settings is left out of its comparison and findings
    (it was, without a word, for a run of carlini_n 5 evaluated at the default 8). Where one differs still, that
    is said."""
    from ..evaluation import METRIC_SETTINGS

    ev = run_evaluate_section(run)
    theirs = {k: ev[k] for k in METRIC_SETTINGS if k in ev}
    taken = {k: v for k, v in theirs.items() if k not in typed and getattr(c, k) == getattr(D, k)}
    if taken:
        c = cfg.from_dict(cfg.EvaluateConfig, {**cfg.to_dict(c), **taken})
    if other := [f"{k} {getattr(c, k)!r} (the run's {v!r})" for k, v in theirs.items() if getattr(c, k) != v]:
        say(f"metric settings: not the run's ({', '.join(other)}): this evaluation is left out of the "
            "run's comparison and findings")
    return c


@cli_errors
def evaluate_cmd(
    ctx: typer.Context,
    generated: str = typer.Option(..., "--generated",
                                  help="Generations: a run's extraction/<method> dir, shards, folder, .npz."),
    train: str = typer.Option(..., "--train", help="Training set: digits[:N], a folder of images, an .npz."),
    out: Path = typer.Option(..., "--out", help="Directory to write metrics.json and per_generation.{csv,npz} to.",
                             parser=path_value),
    method: str | None = typer.Option(None, help="Method name in the results (default: the extraction dir's name)."),
    similarity: str = typer.Option(D.similarity, help="rms-l2 (pixels) or cosine:<extractor>."),
    bands: str | None = typer.Option(D.bands, help="name=lo:hi,... (default: --bands-file; else the paper's for "
                                                  "cosine; else calibrated on --heldout, for digits:N the digits "
                                                  "outside it; else on train vs rest of train)."),
    bands_file: str | None = typer.Option(D.bands_file, help="bands.json written by `side calibrate`."),
    heldout: str | None = typer.Option(D.heldout, "--heldout", help="Held-out images (never trained on) to calibrate "
                                       "the bands on, when no bands are given (rms-l2 only: a cosine similarity "
                                       "takes the paper's bands; default: for --train digits:N the "
                                       "digits outside it, as `side calibrate` and a run take; else the training "
                                       "set's own null)."),
    resize: int | None = typer.Option(D.resize, help="Resize both sets to this square size."),
    carlini_alpha: float = typer.Option(D.carlini_alpha),
    carlini_n: int = typer.Option(D.carlini_n, help="Neighbours averaged in Carlini's ratio."),
    carlini_centering: str = typer.Option(D.carlini_centering, help="generation or reference: whose neighbours."),
    gu_threshold: float = typer.Option(D.gu_threshold, help="Memorized if d1 / d2 < this."),
    calibration_quantiles: str = typer.Option(",".join(map(str, D.calibration_quantiles)),
                                              help="Null tail shares of the high, mid, low band edges."),
    ng_repeats: int = typer.Option(D.ng_repeats, help="Random orders for the observed N_G curve."),
    detect_threshold: float | None = typer.Option(D.detect_threshold, help="Also run label-free detection: tiled "
                                                                           "max-L2 link threshold."),
    detect_min_size: int = typer.Option(D.detect_min_size),
    detect_grid: int | None = typer.Option(D.detect_grid, help="Tiles per side (default: by image size)."),
    detect_mode: str = typer.Option(D.detect_mode, help="cliques or components."),
    extraction_threshold: float = typer.Option(D.extraction_threshold, help="Detection: verified if the group's "
                                                                            "medoid is this close to a training image."),
    backend: str = typer.Option(D.backend, help="auto, faiss or torch."),
    query_chunk: int = typer.Option(D.query_chunk),
    ref_chunk: int = typer.Option(D.ref_chunk),
    feature_batch_size: int = typer.Option(D.feature_batch_size),
    seed: int = typer.Option(D.seed, help="Seed of the random orders of the N_G curve."),
    device: str = typer.Option("cpu"),
    model: str | None = typer.Option(None, "--model", help="Target model (a diffusers directory or 'demo') for "
                                                           "extractors that need it: cosine:unet."),
    config: Path | None = typer.Option(None, "--config", help="YAML with these options as keys (or a run YAML's "
                                                              "evaluate: section).", parser=path_value),
) -> None:
    """AMS / UMS per band, 95th percentile, Carlini's and Gu's ratios, the N_G law: DIR/metrics.json."""
    c = evaluate_config(ctx, config)
    check_similarity_inputs(model, c.similarity)
    from ..data import load_image_set
    from ..evaluation import evaluate, held_out_set, heldout_unread
    from ..metrics import bands_json, closest_first, parse_bands
    from ..runs import run_lock

    if c.bands is not None:
        parse_bands(c.bands)  # a typo fails before the sets load
    if c.heldout is not None and (c.bands is not None or c.bands_file is not None):
        raise ValueError(f"--heldout {c.heldout!r} calibrates the bands, and --bands or --bands-file gives them: "
                         "it would not be read; leave one out")
    if c.heldout is not None and c.bands is None and c.bands_file is None and c.similarity != "rms-l2":
        raise ValueError(heldout_unread(c.similarity, repr(c.heldout)))
    from ..evaluation import Evaluation

    run = run_written_into(out, (*Evaluation.FILES, FILES_CSV),
                           {"--generated": generated, "--train": train, "--heldout": c.heldout})
    check_files_csv(out)
    before_run = c
    if run is not None and c.bands is None and c.bands_file is None:
        before = c
        c = run_bands(run, c)
        if c.heldout is not None and c != before and "heldout" not in typed_flags(ctx, {"heldout": "heldout"}):
            c = dataclasses.replace(c, heldout=None)  # (a --config file's, which evaluate reads only to calibrate:
            # refused as "--heldout ... would not be read", a flag nobody typed; a review's find)
        if c.heldout is not None and c != before:
            raise ValueError(f"--heldout {c.heldout!r}: --out lies in run {str(run)!r}, whose bands this evaluation "
                             "takes (to be compared with its methods'), so it would not be read; leave it out, give "
                             "--bands/--bands-file, or write elsewhere")
    typed = "calibration_quantiles" in typed_flags(ctx, {"calibration_quantiles": "calibration_quantiles"})
    if typed and not (c.bands is None and c.bands_file is None and c.similarity == "rms-l2"):  # (dropped, and
        # recorded as used; a --config file's, a run's own config.yaml among them, taken as they are)
        given = "the run's bands" if run is not None and c != before_run else "--bands or --bands-file" if (
            c.bands is not None or c.bands_file is not None) else f"{c.similarity} without bands (the paper's bands)"
        raise ValueError(f"--calibration-quantiles {','.join(map(str, c.calibration_quantiles))}: no bands are "
                         f"calibrated here ({given}), so they would not be read; leave them out")
    if run is not None:
        from ..evaluation import METRIC_SETTINGS

        given = set(typed_flags(ctx, {k: k for k in METRIC_SETTINGS})) | set(file_settings(config))  # (a file's
        # carlini_n: 8, the default, was replaced by the run's without a word)
        c = run_metric_settings(run, c, given)
    detection = typed_flags(ctx, {k: k for k in ("detect_min_size", "detect_grid", "detect_mode",
                                                 "extraction_threshold")})
    if c.detect_threshold is None and (unread := list(detection)):  # (dropped without a word, and recorded in
        # metrics.json as if used)
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in unread)} set the label-free detection, "
                         "which runs only with --detect-threshold: give it, or leave them out")
    from ..pipeline import absolute_spec

    stage = generated_stage(generated)  # (read before the images: one read after them named a stage made again
    # meanwhile as the one measured)
    gen = load_image_set(absolute_spec(generated), c.resize)  # (its name is the source metrics.json records, which
    # Audit.pairs reads the images from: a relative one named nothing from another folder)
    tr = load_image_set(train, c.resize)
    # for digits:N the digits outside it are the held-out images, as in a run and `side calibrate` (evaluate takes
    # them only where it calibrates bands)
    rest = (held_out_set(train, None, c.resize) if c.heldout is None and c.similarity == "rms-l2" and c.bands is None
            and c.bands_file is None else None)  # (cosine without bands takes the paper's)
    feature_model = load_feature_model(model, device, tr)
    with progress_bar(ctx, "evaluate") as cb:
        result = evaluate(gen, tr, c, method=default_method(generated) if method is None else method,
                          feature_model=feature_model, device=device, progress=cb, heldout=rest)
    if stage is not None:  # a run's own extraction: which one it measured, so that the run leaves this evaluation
        # out once it makes that extraction again (it was counted beside the new one), and whether it is the run's
        # it is written into (told by the recorded paths, a run moved since was told otherwise)
        here = run is not None and stage[0].resolve() == run.resolve()
        result = dataclasses.replace(result, sources={**result.sources, "generated_stage": stage[1],
                                                      "generated_stage_fingerprint": stage[2],
                                                      "generated_stage_here": here})
    if rest is not None and result.bands_source == f"heldout:{rest.name}":
        say(f"bands calibrated on the held-out set: the {len(rest)} digits not in {train}")
    with run_lock(run) if run is not None else contextlib.nullcontext():
        path = result.write(out)
        write_files_csv(out, {"train": train, "generated": generated})
        if run is not None and Path(out).resolve().parent == (run / "evaluation").resolve():
            from ..summary import write_summary  # an evaluation of the run: its summary and findings include it

            write_summary(run)
    top = closest_first(bands_json(result.bands), result.orientation)[0]  # (the last listed: the farthest where
    # bands were written closest first, as the README's example)
    say(f"{result.n_generated} generations vs {result.n_train} training images ({result.similarity}, "
        f"bands: {result.bands_source}); AMS {top} {result.ams[top]:.2%}, UMS {top} {result.ums[top]:.2%}, "
        f"Carlini extracted {result.carlini.extracted_fraction:.2%}, Gu {result.gu.memorized_fraction:.2%}")
    say(f"wrote {path}")
