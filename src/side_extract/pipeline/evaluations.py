"""The evaluations: the bands' calibration, the training set's features, sample quality, side-lora's copy
guard, and every method's (and the synthetic set's) measurement against the training set."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as cfg
from ..data import ImageSet, absolute_spec, load_shards
from ..evaluation import Evaluation, calibrate, copy_rows, evaluate, held_out_set, neighbor_index
from ..metrics import Similarity
from ..features import EXTRACTORS, extract_features
from ..quality import image_features, quality_from_features
from ..neighbors import NearestNeighborIndex, pixel_rows
from ..runs import (MODEL_INPUT, SYNTHETIC_EVALUATION, array_fingerprint,
                   atomic_save_npz, atomic_write_json, file_fingerprint, read_json, read_npz, stage_fingerprint)
from .context import AuditContext, _bands_damaged, _damaged, _stage_npz, extractor_fingerprints

log = logging.getLogger(__name__)


def copy_guard(generated: ImageSet, synthetic: ImageSet, d_train: np.ndarray, index: NearestNeighborIndex) -> dict:
    """side-lora's guard against copying its own training data: the share of generations whose nearest
    synthetic image (pixel RMS) is closer than their nearest training image. On a target that memorizes, the
    synthetic images are themselves near-copies, so the share is high for every method: compare side-lora's
    with UnCond's (plain samples of the same model), computed the same way. ``d_train``: each generation's pixel RMS
    distance to its nearest training image (the evaluation's ``pixel_distance``); ``index``: an unfitted
    ``"rms-l2"`` index, searching as the evaluation's config says (:func:`~side_extract.evaluation.neighbor_index`)."""
    index.fit(pixel_rows(synthetic.images))
    d_syn = index.kneighbors(pixel_rows(generated.images), 1).scores[:, 0]
    return {"nearer_synthetic_fraction": float((d_syn < d_train).mean()), "n_synthetic": len(synthetic),
            "median_distance_to_synthetic": float(np.median(d_syn)),
            "median_distance_to_train": float(np.median(d_train))}


# what the calibration (the null of best scores and the bands from it) does not read: the metrics' own settings
QUALITY_KEYS = ("quality", "quality_max_reference", "quality_k", "quality_kid_subsets", "quality_kid_subset_size")
CALIBRATION_IGNORES = ("resize", "carlini_alpha", "carlini_n", "carlini_centering", "gu_threshold", "ng_repeats",
                       "detect_threshold", "detect_min_size", "detect_grid", "detect_mode", "extraction_threshold",
                       "seed", *QUALITY_KEYS)


def calibration_settings(c: cfg.EvaluateConfig) -> cfg.EvaluateConfig:
    """``c`` with the keys the calibration does not read at their defaults, for its stage's fingerprint: changing
    Carlini's, Gu's, detection's or sample quality's settings re-evaluates the methods without calibrating again."""
    unread = [] if cfg.batches_features(c.similarity) else ["feature_batch_size"]  # (no network: pixels)
    return cfg.at_defaults(c, (*CALIBRATION_IGNORES, "heldout", *unread))  # (the held-out images are keyed, not
    # their path)


def real_heldout(rc: cfg.RunConfig) -> ImageSet | None:
    """A run's held-out real images (its bands' null and its sample-quality reference): :func:`held_out_set` of its
    training set, ``evaluate.heldout`` and ``train_resize``."""
    return held_out_set(rc.train, rc.evaluate.heldout, rc.train_resize)


def calibration_plan(ctx: AuditContext, train: ImageSet) -> tuple[str, dict[str, Any], ImageSet | None]:
    """The calibration stage's fingerprint, :meth:`RunDir.begin`'s keywords (the ``data`` it reads, the ``legacy``
    fingerprint of session 46's rule) and its held-out images (None: the training set against itself)."""
    c = ctx.rc.evaluate
    heldout = _heldout_set(ctx)
    null = ctx.fingerprint(heldout) if heldout is not None else "null: the training set"
    # keyed by the null's images (none: the training set against itself), not by where they came from: the same
    # training pixels given as digits:N and as an .npz are other nulls
    def keyed_by(settings: cfg.EvaluateConfig) -> str:
        return stage_fingerprint("calibration", settings, ctx.fingerprint(train),
                                 ctx.fp[MODEL_INPUT] if c.similarity == "cosine:unet" else None, null,
                                 *extractor_fingerprints(Similarity(c.similarity).extractor))
    fp, legacy = keyed_by(calibration_settings(c)), keyed_by(cfg.at_defaults(c, (*CALIBRATION_IGNORES, "heldout")))
    return fp, {"data": {"training set": ctx.fingerprint(train), "held-out images": null},
                "legacy": None if legacy == fp else legacy}, heldout


def calibration_stage(ctx: AuditContext, train: ImageSet) -> Path | None:
    """Bands from the null (held-out digits or train vs rest of train), once per run: evaluation/bands.json.

    Only where :func:`~side_extract.config.calibrates_bands`.
    """
    c = ctx.rc.evaluate
    if not cfg.calibrates_bands(c):
        return None
    fp, kw, heldout = calibration_plan(ctx, train)
    path = ctx.run.path / "evaluation" / "bands.json"
    if ctx.run.begin("calibration", fp, **kw) != "skip" or _bands_damaged(path, c.similarity):
        if heldout is None:
            log.warning("evaluate.heldout is not set (train=%r): the similarity bands are calibrated on the training "
                        "images against each other, not on held-out images against the training set; give "
                        "evaluate.heldout (side_extract.audit(heldout=...); images from the training distribution the "
                        "model did not see) for the bands the paper calibrates", ctx.rc.train)
        cal = calibrate(train, heldout, c, train_features=train_features_stage(ctx, train),
                        feature_model=ctx.denoiser, device=ctx.device)
        cal.write(ctx.run.path / "evaluation")
        ctx.run.complete("calibration", null_source=cal.null_source)
    return path


def train_features_stage(ctx: AuditContext, train: ImageSet) -> np.ndarray | None:
    """The training set's features for a cosine similarity, extracted once per run into
    ``RUN/train-features/features.npz`` (keyed by the extractor, the training set and, for ``unet``, the
    model) and reused by the calibration and every method's evaluation. None for pixel RMS-L2."""
    c = ctx.rc.evaluate
    sim = Similarity(c.similarity)
    if sim.metric != "cosine":
        return None
    needs_model = EXTRACTORS[sim.extractor.split(":", 1)[0]].needs_model
    batch = c.feature_batch_size  # (a network's batches round apart: the calibration and evaluations are keyed by
    # it, which then mixed these features of the old size with theirs of the new one; at the default, as before)
    keyed = [batch] if cfg.batches_features(c.similarity) and batch != cfg.EvaluateConfig().feature_batch_size else []
    parts = [sim.extractor, ctx.fingerprint(train), ctx.fp[MODEL_INPUT] if needs_model else None,
             *extractor_fingerprints(sim.extractor)]
    fp = stage_fingerprint("train-features", *parts, *keyed)
    legacy = stage_fingerprint("train-features", *parts) if keyed else None  # (session 46's, made at this size)
    path = ctx.run.path / "train-features" / "features.npz"
    if ctx.run.begin("train-features", fp, legacy=legacy) != "skip" or _damaged(path, "features"):
        feats = extract_features(sim.extractor, train, model=ctx.denoiser, reference=train, device=ctx.device,
                                 batch_size=c.feature_batch_size)
        atomic_save_npz(path, features=feats)
        ctx.run.complete("train-features", n=len(train), dim=int(feats.shape[1]))
    return _stage_npz(path, "features")


def quality_reference(ctx: AuditContext, train: ImageSet) -> ImageSet | None:
    """Held-out real images to measure sample quality against: ``evaluate.heldout``, else the digits outside a
    ``digits:N`` training set (resized like it), less exact copies of ``train``'s images (which the bands' null
    leaves out too: quality against them would mix in memorization), at most ``quality_max_reference`` of them
    (seeded); else None."""
    c = ctx.rc.evaluate
    ref = _heldout_set(ctx)
    if ref is None:
        return None
    if ref.shape == train.shape and (copies := copy_rows(ref, train)).any():
        ref = ref.subset(np.flatnonzero(~copies))
    if len(ref) > c.quality_max_reference:
        keep = np.sort(np.random.default_rng([c.seed, 0x9A11]).choice(len(ref), c.quality_max_reference, replace=False))
        ref = ref.subset(keep)
    return ref


def quality_of(ctx: AuditContext, generated: ImageSet, reference: ImageSet | None) -> dict:
    """``{feature space: Quality json}`` of one method's generations, or ``{"skipped": why}``."""
    c = ctx.rc.evaluate
    if not c.quality:
        return {}
    if reference is None:
        return {"skipped": "no held-out real images (set evaluate.heldout): sample quality against the training "
                           "set would mix quality with memorization"}
    if min(len(generated), len(reference)) < 3:  # a small N_G, or a method that dedup-driven stopping ended early
        return {"skipped": f"sample quality needs at least 3 images per set, got {len(generated)} generations and "
                           f"{len(reference)} reference images"}
    out = {}
    for name in c.quality:
        key = ("quality-reference", name, ctx.fingerprint(reference))
        if key not in ctx.cache:
            ctx.cache[key] = image_features(name, reference, device=ctx.device, batch_size=c.feature_batch_size,
                                            reference=reference)
        gen = image_features(name, generated, device=ctx.device, batch_size=c.feature_batch_size, reference=reference)
        q = quality_from_features(gen, ctx.cache[key], name, k=min(c.quality_k, len(gen) - 1, len(reference) - 1),
                                  n_subsets=c.quality_kid_subsets, subset_size=c.quality_kid_subset_size,
                                  random_state=c.seed)
        # the reference it was measured against, by its pixels (a run whose evaluate.heldout changed between
        # calls kept the earlier methods' quality against the earlier images: the report set them side by side)
        out[name] = {**q.to_json(), "reference": {"fingerprint": ctx.fingerprint(reference),
                                                 "source": absolute_spec(reference.name) or None}}
    return out


def evaluate_method(ctx: AuditContext, method: str, generated: ImageSet, train: ImageSet, c: cfg.EvaluateConfig,
                    reference: ImageSet | None, train_features: np.ndarray | None) -> None:
    """Compute one method's evaluation into ``RUN/evaluation/<method>/`` (``metrics.json`` written last, with
    the sample quality and the copy guard); ``train_features`` from :func:`train_features_stage`."""
    def more(ev: Evaluation) -> dict[str, Any]:
        out: dict[str, Any] = {"quality": quality_of(ctx, generated, reference)}
        if _synthetic_fingerprint(ctx):  # every method: side-lora's reference
            out["copy_guard"] = copy_guard(generated, load_shards(ctx.run.path / "synthetic"),
                                           np.asarray(ev.table.pixel_distance, dtype=float),
                                           neighbor_index("rms-l2", c, ctx.device))
        return out

    measure_into(ctx, method, generated, train, c, train_features, ctx.run.path / "evaluation" / method, more)


def measured(out: Path) -> bool:
    """Whether :func:`measure_into` left its files in ``out``, readable (a skipped stage whose files were deleted or
    damaged since is redone: a reader needs both; a file cut short blocked every later run, --force included)."""
    try:
        read_json(out / "metrics.json", dict)
    except (OSError, ValueError):
        return False
    if read_npz(out / "per_generation.npz", "similarity", "nearest_train_id") is None:
        log.warning("%s does not read (cut short or damaged since): measured again", out / "per_generation.npz")
        return False
    return True


def measure_into(ctx: AuditContext, name: str, generated: ImageSet, train: ImageSet, c: cfg.EvaluateConfig,
                 train_features: np.ndarray | None, out: Path,
                 more: Callable[[Evaluation], dict[str, Any]] | None = None) -> None:
    """``generated`` measured against the training set into ``out`` (``per_generation.*``, then ``metrics.json``,
    written last and once, with what ``more`` adds to it), reported as stage ``evaluate <name>``."""
    report = ctx.progress(f"evaluate {name}")
    # the nearest-neighbour pass counts the generations; it stops one short, and what follows (``more``: quality
    # metrics, the copy guard) ends the stage (--no-progress said "done in 0 s" at the search's end, before them)
    search = None if report is None else (lambda done, total: report(min(done, total - 1), total))
    ev = evaluate(generated, train, c, method=name, train_features=train_features,
                  feature_model=ctx.denoiser, device=ctx.device, progress=search)
    out.mkdir(parents=True, exist_ok=True)
    ev.table.write(out)
    metrics = ev.to_json() | ({} if more is None else more(ev))
    atomic_write_json(out / "metrics.json", metrics)  # once, whole: a reader never sees it without quality
    if report is not None:
        report(len(generated), len(generated))


def _synthetic_fingerprint(ctx: AuditContext) -> str | None:
    """The run's synthetic set, which every evaluation's copy guard is measured against (None: the run has none)."""
    return ctx.fp.get("synthetic") if (ctx.run.path / "synthetic").is_dir() else None


def _recorded(metrics_json: Path) -> dict[str, Any]:
    """The evaluate settings a finished evaluation recorded in its ``metrics.json`` (``{}``: none, or damaged)."""
    try:
        old = metrics_json.is_file() and read_json(metrics_json, dict).get("config")
    except ValueError:  # a damaged file: the refusal says the rest
        old = None
    return old if isinstance(old, dict) else {}


def evaluation_stages(ctx: AuditContext, extractions: dict[str, ImageSet], train: ImageSet,
                      bands_file: Path | None) -> dict[str, dict]:
    """Every method's evaluation (stage ``evaluation/<method>``); returns each one's metrics.

    Under a launch of several processes the methods to (re)do are split between them (the i-th on process
    i mod N): each process writes its methods' folders, the main one decides what to do and records it."""
    c = ctx.rc.evaluate
    if bands_file is not None:
        c = dataclasses.replace(c, bands_file=str(bands_file))
    reference = quality_reference(ctx, train) if c.quality else None
    cal_entry = None if bands_file is None else ctx.run.stage_entry("calibration")
    cal = None if cal_entry is None else cal_entry["fingerprint"]
    cal_legacy = None if cal_entry is None else cal_entry.get("rekeyed_from", cal)
    scores = [*extractor_fingerprints(Similarity(c.similarity).extractor),  # what the files the config names hold
              *([] if ctx.rc.evaluate.bands_file is None else [file_fingerprint(ctx.rc.evaluate.bands_file)])]
    files = [*scores, *(f for name in c.quality for f in extractor_fingerprints(name))]
    # keyed by the config as given (calibrated bands by the calibration's fingerprint, not by the path of the run
    # directory they lie in, which another spelling of the run would change) and by the synthetic set, which
    # every method's copy guard is measured against; and, for a method that dedup-driven stopping ended early, by
    # how many generations it made (a rerun that remade a lost shard may stop elsewhere under the same fingerprint)
    made = {m: [] if len(s) == ctx.rc.extract.n else [f"made {len(s)}"] for m, s in extractions.items()}
    # the held-out images are keyed by the calibration's fingerprint, not their path; evaluate.resize is side
    # evaluate's (a run reads its own images); settings that nothing reads (detection's without its threshold,
    # sample quality's without a quality metric) key nothing
    unread = cfg.unread_keys(ctx.rc.evaluate)
    # a bands file by its contents (``files``), not its path: a run records it absolute, and two spellings of one
    # file were two settings
    keyed = cfg.at_defaults(ctx.rc.evaluate, ["heldout", "resize", "bands_file", *unread])
    synthetic = _synthetic_fingerprint(ctx)
    # the training images' ids name them in the results (an npz's index): keyed where they are not their rows' order
    # (an index changed alone left the old ids standing), and left out where they are, so runs made before stand
    ids = [] if np.array_equal(train.ids, np.arange(len(train))) else [array_fingerprint(train.ids)]

    def fingerprint(m: str, synthetic: str | None, keyed: cfg.EvaluateConfig = keyed, cal: str | None = cal) -> str:
        return stage_fingerprint("evaluation", keyed, ctx.fp[f"extraction/{m}"], ctx.fingerprint(train), cal,
                                 None if reference is None else ctx.fingerprint(reference), synthetic, *files,
                                 *made[m], *ids)

    fps = {m: fingerprint(m, synthetic) for m in extractions}
    paths = {m: ctx.run.path / "evaluation" / m / "metrics.json" for m in extractions}

    def earlier_rules(m: str) -> list[str]:
        """The fingerprints earlier releases gave these evaluations, so they stand: they keyed a bands file's path
        as the run's config spelled it then (metrics.json's), sessions 47-49 the settings unread then (not the
        quantiles of bands not calibrated), session 46 every setting (and a calibration keyed so)."""
        ev = ctx.rc.evaluate  # (a run that calibrates records its own bands file there: not a setting)
        then = ev if ev.bands_file is None else dataclasses.replace(ev, bands_file=_recorded(paths[m]).get(
            "bands_file", ev.bands_file))
        unread_then = [k for k in unread if k != "calibration_quantiles"]
        return [fingerprint(m, synthetic, cfg.at_defaults(then, ["heldout", "resize", *unread_then])),
                fingerprint(m, synthetic, cfg.at_defaults(then, ["heldout", "resize"]), cal_legacy)]

    legacy = {m: [f for f in earlier_rules(m) if f != fps[m]] for m in extractions}
    group = ctx.run.group
    inputs = {m: {f"extraction/{m}": ctx.fp[f"extraction/{m}"]} for m in extractions}
    # (a bands file changed under its path was refused naming nothing)
    data = {"training set": ctx.fingerprint(train), "synthetic set": synthetic,
            **({"bands file": file_fingerprint(ctx.rc.evaluate.bands_file)} if ctx.rc.evaluate.bands_file else {})}

    def guarded(m: str) -> bool:  # made before the run held a synthetic set, and otherwise as now: measured again
        # at no loss with the copy guard it now has (side added to a run of uncond), not refused
        entry = ctx.run.stage_entry(f"evaluation/{m}") or {}
        return synthetic is not None and entry.get("fingerprint") == fingerprint(m, None)

    def changed(m: str) -> list[str]:  # the settings the finished evaluation was made with, against these
        old = _recorded(paths[m])
        if not old:
            return []
        new = cfg.to_dict(c)
        ignored = {*unread, *(["bands_file"] if bands_file is not None else [])}  # (the run's calibrated bands:
        # keyed by the calibration, wherever the run lies)
        old, new = ({k: v for k, v in d.items() if k not in ignored} for d in (old, new))
        return cfg.differences(old, new)

    resumed: list[str] = []  # measured whole before an interruption (metrics.json is written last, in a folder
    # cleared when the stage began under this fingerprint): kept, not measured again (every method was)

    def plan() -> list[str]:  # (every refusal said before any evaluation is cleared)
        kw = {m: {"data": data, "derived": guarded(m), "legacy": legacy[m]} for m in extractions}
        ctx.run.refuse_before({f"evaluation/{m}": (fps[m], inputs[m], lambda m=m: changed(m), kw[m])
                               for m in extractions})
        todo = []
        for m in extractions:
            decision = ctx.run.begin(f"evaluation/{m}", fps[m], inputs=inputs[m], **kw[m])
            if decision == "resume" and measured(paths[m].parent):
                resumed.append(m)
            elif decision != "skip" or not measured(paths[m].parent):
                todo.append(m)
        return todo

    todo = group.on_main(plan)
    if todo:  # the main process extracts them once, the others read its file
        train_features = group.main_first(lambda: train_features_stage(ctx, train))
        group.together(lambda: [evaluate_method(ctx, m, extractions[m], train, c, reference, train_features)
                                for i, m in enumerate(todo) if group.owns(i)])

    def finish() -> None:
        for i, m in enumerate(todo):
            ctx.run.complete(f"evaluation/{m}", evaluated_by=i % group.world)
        for m in resumed:
            ctx.run.complete(f"evaluation/{m}", kept_after_interruption=True)
        if synthetic:
            synthetic_evaluation_stage(ctx, train, c, keyed, [cal, *scores, *ids])

    group.on_main(finish)  # (an error there reaches every process)
    group.barrier()
    return {m: read_json(paths[m], dict) for m in extractions}


def synthetic_evaluation_stage(ctx: AuditContext, train: ImageSet, c: cfg.EvaluateConfig, keyed: cfg.EvaluateConfig,
                               parts: list[Any]) -> None:
    """The run's synthetic set (SIDE's first step: samples of the target the audit drew anyway) measured against the
    training set like a method's generations, in the same bands (``c``), into ``RUN/synthetic-evaluation/``
    (``metrics.json`` and ``per_generation.*``; no sample quality): what it found counts in the audit's findings
    (:mod:`side_extract.findings`). ``keyed``: the config as the evaluations' fingerprints take it; ``parts``: the
    calibration's fingerprint and the files the similarity reads."""
    name = SYNTHETIC_EVALUATION
    out = ctx.run.path / name
    unread = cfg.at_defaults(keyed, QUALITY_KEYS)
    fp = stage_fingerprint("evaluation", unread, ctx.fp["synthetic"], ctx.fingerprint(train), *parts)
    # derived from the synthetic set alone: made again without --force where settings changed (what it measured
    # stays in the synthetic set), so a rerun that may replace nothing else is not refused here, after the others
    if ctx.run.begin(name, fp, inputs={"synthetic": ctx.fp["synthetic"]}, derived=True) == "skip" and measured(out):
        return
    synthetic = load_shards(ctx.run.path / "synthetic")
    measure_into(ctx, "synthetic", synthetic, train, c, train_features_stage(ctx, train), out)
    ctx.run.complete(name, n=len(synthetic))


def _heldout_set(ctx: AuditContext) -> ImageSet | None:
    """:func:`real_heldout`, read once per call."""
    if "heldout" not in ctx.sets:
        ctx.sets["heldout"] = real_heldout(ctx.rc)
    return ctx.sets["heldout"]
