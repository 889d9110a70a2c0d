"""The chain of stages over a run directory (:func:`run_audit`), and the paths it records."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any


from .. import config as cfg
from ..data import ImageSet
from ..distributed import ProcessGroup
from ..extraction import extraction_stage, planned_extraction
from ..models.target import (EMBEDDED_TARGETS, Denoiser, Target, load_target,
                            model_fingerprint)
from ..runs import (MODEL_INPUT, RunDir, StageWouldBeReplaced, atomic_write_json, atomic_write_text, check_run_path, check_unlocked,
                   fingerprint_of, read_stages, run_lock, settings_fingerprint,
                   shards_hold)
from ..sampling import sample_stage
from ..summary import write_summary
from .context import (UNTIL, AuditContext, AuditResult, ProgressFactory, Until, _train_set, absolute_paths,
                      no_progress)
from .evaluations import calibration_plan, calibration_stage, evaluation_stages
from .labelling import _surrogate_advice, features_stage, memorization_stage, surrogate_stage
from .methods import (classifier_fingerprint, classifier_stage, clean_classifier_plan, extraction_fingerprint,
                      extraction_inputs, extraction_upstream, lora_stage, method_guidance, teacher_stage)
from .preflight import changed_settings, preflight, trained_sections

log = logging.getLogger(__name__)


def load_run_target(rc: cfg.RunConfig, device: str = "cpu") -> Target:
    """The model ``rc.model`` names, loaded on ``device`` (this process's own in a launch of several)."""
    device = ProcessGroup.from_env().device(device)
    return Target(load_target(rc.model, device), model_fingerprint(rc.model), str(rc.model))


def run_audit(path: str | Path, rc: cfg.RunConfig, *, device: str = "cpu", until: Until = "evaluation",
              progress: ProgressFactory = no_progress, wait: bool = False, replace: bool = True,
              target: Target | None = None, warn_inert: bool | Collection[str] = True) -> AuditResult:
    """Run every stage the config's methods need, up to and including ``until``, into run directory ``path``.

    ``evaluation`` (with ``rc.train`` set) measures each method's generations against the training set into
    ``evaluation/<method>/metrics.json``. Before anything is written, the model is loaded and the whole config
    is checked against it and the data (:func:`preflight`). The run directory is locked for the whole call
    (:func:`~side_extract.runs.run_lock`; ``wait`` blocks on another writer instead of failing). With
    ``replace=False``, a finished stage whose settings changed is an error instead of being redone. After an
    error, stages left ``running`` are marked ``failed`` in the manifest.

    ``target``: an in-memory model (:class:`~side_extract.models.target.Target`, see ``side_extract.api``)
    instead of loading ``rc.model`` from disk; ``rc.model`` then only describes it. ``warn_inert``: warn of settings
    that change nothing (False: not; the texts already said, :func:`~side_extract.config.inert_settings`': all but
    those, as a sweep's sub-run warns what its main run has not).
    """
    if until not in UNTIL:
        raise ValueError(f"until={until!r} must be one of {', '.join(UNTIL)}")
    group = ProcessGroup.from_env()  # one process, or one of a torchrun / accelerate launch (distributed.py)
    device = group.device(device)
    check_run_path(path)
    if group.main and not wait:
        check_unlocked(path)  # another writer: said at once, not after the model has loaded
    if target is None:
        target = load_run_target(rc, device)
    trained = None if group.world == 1 else trained_sections(  # (a launch's unsplittable batches: preflight)
        read_stages(path), rc.extract.methods, changed_settings(Path(path), rc, target.fingerprint))
    loaded = group.main_first(lambda: preflight(rc, target.denoiser, until, warn_inert=warn_inert if group.main
                                                else False, trained=trained))  # (a refusal said by the main process
    # alone: every process of a launch printed it, 3 times under --processes 3; the others leave without words)
    group.agree({"config": fingerprint_of(rc), "model": target.fingerprint, "until": until, "run": str(path),
                 "replace": replace}, "settings (config or model), stage or run directory")  # (the values, not
    # the files they name: each machine of a launch may read its own copy)
    with run_lock(path, wait=wait) if group.main else contextlib.nullcontext():  # a launch is one writer
        run = RunDir(path, replace=replace, group=group)
        config = run.path / "config.yaml"
        before = config.read_text(encoding="utf-8") if group.main and config.is_file() else None
        model_before = run.model_entry() if group.main else None
        # files by their contents; the paths as the run records them (absolute): a rerun from the run's own
        # config.yaml (side extract --run) is the same settings as the relative ones typed before
        settings = (settings_fingerprint(absolute_paths(rc), target.fingerprint, names=EMBEDDED_TARGETS),
                    UNTIL.index(until))
        if group.main and replace:
            run.mark_replacing(*settings)  # kept should this call not finish: a rerun then finishes its work
        elif group.main and run.resumes_replacing(*settings):
            run.replace = True
            log.warning("%s: an interrupted run with these settings was replacing finished results; this one "
                        "finishes it (as --force would)", run.path)
        try:
            result = _chain(run, rc, target, device, until, progress, loaded)
            if group.main:
                run.done_replacing(*settings)
            if group.main:
                warn_out_of_date(run)
            return result
        except BaseException as e:
            if group.main:
                run.fail_running(e)
                remade = [s for s in run.replaced if s != MODEL_INPUT] + run.grown  # (a stage grown: the config
                # that stands is this call's)
                if isinstance(e, StageWouldBeReplaced) and before is not None and not remade:
                    atomic_write_text(config, before)  # nothing finished was replaced: its settings still stand
                    run.restore_model(model_before)  # (and its target)
            raise


def warn_out_of_date(run: RunDir) -> None:
    """Say which finished stages a writer left describing another run (:meth:`RunDir.out_of_date`): made from
    results it made again, or from the target the run named before."""
    for stage, later in run.out_of_date().items():
        what = ("the run's target is another model now, but %s were made from the earlier one" if stage == MODEL_INPUT
                else f"{stage} was made again here, but %s were made from its earlier results")
        log.warning(what + " and now describe another run: complete it again (side run CONFIG --out RUN, or side "
                    "extract --run RUN --force) before reading them", ", ".join(later))


def write_extraction_summary(run: RunDir, made: dict[str, int]) -> None:
    """``RUN/extraction/summary.json``: N_G and fingerprint of every extraction the run holds finished, those of this
    call (``made``: method -> generations made) and those an earlier call made (a call of some methods, as
    ``side extract --method uncond``, wrote only its own before)."""
    out = {}
    for name, e in run.manifest()["stages"].items():
        if name.startswith("extraction/") and e.get("status") == "complete":
            m = name.split("/", 1)[1]
            out[m] = {"n": made.get(m, (e.get("stopped") or {}).get("at", e.get("n"))), "fingerprint": e["fingerprint"]}
    atomic_write_json(run.path / "extraction" / "summary.json", out)


def refuse_data_stages(ctx: AuditContext, upto: int) -> None:
    """Refuse, before any stage runs, the stages of this call that read only the data and the config (the clean
    classifier, the calibration), where :meth:`RunDir.begin` would refuse them: they came after the synthetic set,
    the SIDE classifier and every extraction, which a refused call had made or grown for nothing."""
    rc = ctx.rc
    clean = upto >= 1 and bool({"cond", "side-teacher"} & set(rc.extract.methods))
    calibrates = upto == 3 and rc.train is not None and cfg.calibrates_bands(rc.evaluate)
    if not (clean or calibrates):
        return
    train = _train_set(ctx)
    planned: dict[str, tuple[Any, ...]] = {}
    if clean:
        input_fp, data = clean_classifier_plan(ctx, train)
        planned["classifier-clean"] = (classifier_fingerprint(rc.clean_classifier, input_fp, clean=True), None, tuple,
                                       {"data": data})
    if calibrates:
        fp, kw, _ = calibration_plan(ctx, train)
        planned["calibration"] = (fp, None, tuple, kw)
    ctx.run.refuse_before(planned)


def _chain(run: RunDir, rc: cfg.RunConfig, target: Target, device: str, until: Until,
           progress: ProgressFactory, sets: dict[str, ImageSet]) -> AuditResult:
    upto = UNTIL.index(until)
    rc = absolute_paths(rc)  # (after the processes of a launch agreed on the values as given: their folders may differ)
    run.write_config(rc)
    run.set_model(target.fingerprint, str(rc.model), getattr(target.denoiser, "prediction", "epsilon"))
    denoiser = target.denoiser
    ctx = AuditContext(run, rc, denoiser, device, progress, {MODEL_INPUT: target.fingerprint}, sets=dict(sets))
    run.group.on_main(lambda: refuse_data_stages(ctx, upto))
    methods = rc.extract.methods
    synthetic = None
    if {"side", "side-teacher", "side-lora"} & set(methods):
        synthetic = sample_stage(run, denoiser, rc.sample, model_fingerprint=ctx.fp[MODEL_INPUT], device=device,
                                 progress=progress("synthetic"))
        ctx.fp["synthetic"] = run.stage_entry("synthetic")["fingerprint"]
    elif (held := run.stage_entry("synthetic")) and held.get("status") == "complete":
        # a run of methods that need none (side extract --method uncond) still holds the synthetic set an earlier
        # call drew: every evaluation's copy guard and the run's findings measure it, keyed as before (without it
        # an unchanged run's evaluations looked changed: refused, or redone with no copy guard under --force);
        # not one another target drew, nor one whose shards are gone (the guard measured what was left, keyed as
        # the whole set)
        if (held.get("inputs") or {}).get(MODEL_INPUT) not in (None, ctx.fp[MODEL_INPUT]):
            log.warning("synthetic/ was drawn from another target than the run's now: no copy guard measures it "
                        "(side sample, or a run of side, draws it again)")
        elif not shards_hold(run.path / "synthetic", held.get("n")):
            log.warning("synthetic/ is marked complete but its shards are missing or damaged: no copy guard "
                        "measures it (side sample, or a run of side, makes them again)")
        else:
            ctx.fp["synthetic"] = held["fingerprint"]
    if cfg.CLUSTERING_METHODS & set(methods):
        once = run.group.main_first
        scores = once(lambda: memorization_stage(ctx, synthetic))
        labels = once(lambda: surrogate_stage(ctx, once(lambda: features_stage(ctx, synthetic)), scores))
    if upto == 0:  # the surrogate labels and what they are made from, for whichever method asked for them
        return AuditResult(run.path, {}, {})
    if cfg.CLUSTERING_METHODS & set(methods):
        if "side" in methods:  # the training stages run on every process (data-parallel)
            classifier_stage(ctx, "classifier", synthetic.to_float(), labels.labels, ctx.fp["surrogate"], clean=False,
                             input_stage="surrogate", too_few=lambda: _surrogate_advice(ctx, labels))
        if "side-lora" in methods:
            lora_stage(ctx, synthetic, labels)
    if {"cond", "side-teacher"} & set(methods):
        once = run.group.main_first
        train = _train_set(ctx)
        input_fp, data = clean_classifier_plan(ctx, train)
        classifier_stage(ctx, "classifier-clean", train.to_float(), train.labels, input_fp, clean=True,
                         too_few="the training set needs labels of at least 2 classes", data=data)
        if "side-teacher" in methods:
            clean = method_guidance(run.path, rc, "cond", denoiser, device=device)[1]
            t_labels = once(lambda: teacher_stage(ctx, clean, synthetic))
            classifier_stage(ctx, "classifier-teacher", synthetic.to_float(), t_labels, ctx.fp["teacher"], clean=False,
                             input_stage="teacher", too_few="the teacher labelled the synthetic set with too few "
                             "classes: lower surrogate.teacher_min_confidence, or sample more synthetic images")
    if upto <= 1:
        return AuditResult(run.path, {}, {})
    def plan(m: str) -> tuple[Denoiser, Any, str, dict[str, Any]]:
        """``m``'s sampler, guidance, fingerprint and stage arguments (its guidance loaded from the run's files)."""
        sampler, g = method_guidance(run.path, rc, m, denoiser, device=device)
        upstream = ctx.fp.get(extraction_upstream(m))

        def fingerprint_at(n: int, g=g) -> str:
            return extraction_fingerprint(rc, m, g, ctx.fp[MODEL_INPUT], upstream, n)

        fp = ctx.fp[f"extraction/{m}"] = fingerprint_at(rc.extract.n)
        return sampler, g, fp, {"model_fingerprint": ctx.fp[MODEL_INPUT], "upstream": extraction_inputs(m, ctx.fp),
                                "fingerprint_at": fingerprint_at}

    def planned(m: str) -> dict[str, Any]:  # (the guidance is let go at once: one method's is held at a time)
        sampler, g, fp, kw = plan(m)
        return planned_extraction(run, m, sampler, rc.extract, g, fp, **kw, run_config=rc)

    # every method's refusal said before any extraction is made or grown
    run.group.on_main(lambda: run.refuse_before({k: v for m in methods for k, v in planned(m).items()}))
    extractions = {}
    for m in methods:
        sampler, g, fp, kw = plan(m)
        extractions[m] = extraction_stage(run, m, sampler, rc.extract, g, fp, **kw, device=device,
                                          progress=progress(f"extract {m}"))
        run.write_config(rc, f"extraction/{m}")  # what Audit.regenerate rebuilds it from
        del sampler, g
    if run.group.main:
        write_extraction_summary(run, {m: len(s) for m, s in extractions.items()})
    metrics: dict[str, dict] = {}
    if upto == 3 and rc.train is not None:
        once = run.group.main_first
        train = _train_set(ctx)
        bands_file = once(lambda: calibration_stage(ctx, train))
        metrics = evaluation_stages(ctx, extractions, train, bands_file)
    if run.group.main and (metrics or (run.path / "summary.json").exists()):
        write_summary(run.path)  # (also after new generations without their evaluation: the summary of evaluations
        # the run no longer holds, and findings.csv, would otherwise stay as if they still described it)
    return AuditResult(run.path, extractions, metrics)
