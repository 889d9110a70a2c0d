"""What each method samples with: the noise-aware and clean classifiers, side-lora's fine-tuned model, the
teacher labels, each method's guidance built from a run's files, and the extraction stage's fingerprint."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config as cfg
from ..data import ImageSet
from ..distributed import SINGLE
from ..extraction import round_size
from ..finetune import finetune, load_finetuned, lora_settings
from ..finetune import saved_whole as lora_saved_whole
from ..guidance import ClassifierGuidance, DenoisedGuidance
from ..models.classifier import load_classifier, save_classifier
from ..models.classifier import saved_whole as classifier_saved_whole
from ..models.target import (Denoiser)
from ..runs import (MODEL_INPUT, array_fingerprint,
                   atomic_save_npz, fingerprint_of, read_json, stage_fingerprint, whole_safetensors)
from ..memorization import MemorizationGuidance
from ..surrogate import SurrogateLabels, TeacherLabeler
from ..training import classifier_settings, fit_label_classifier
from .context import AuditContext, _damaged, _stage_npz
from .labelling import _surrogate_advice

log = logging.getLogger(__name__)


def classifier_fingerprint(c: cfg.ClassifierConfig, input_fp: str, *, clean: bool) -> str:
    """A classifier stage's fingerprint: its settings as it reads them and its images' and labels' fingerprint."""
    return stage_fingerprint("classifier", classifier_settings(c, clean=clean), input_fp, clean)


def clean_classifier_plan(ctx: AuditContext, train: ImageSet) -> tuple[str, dict[str, str | None]]:
    """The clean classifier's input fingerprint, of the training set's images and labels (a relabelled set trains it
    anew), and the data it reads (:meth:`RunDir.begin`'s ``data``)."""
    return (fingerprint_of(ctx.fingerprint(train), array_fingerprint(train.labels)),
            {"training set": ctx.fingerprint(train)})


def launch_problem(section: str, c: cfg.ClassifierConfig | cfg.LoraConfig, world: int) -> str | None:
    """What to set where a launch of ``world`` processes cannot split ``c``'s batches between them (each process
    takes rows rank::world of every batch): ``section.batch_size`` (or its ``data_parallel``); else None."""
    if world > 1 and getattr(c, "data_parallel", True) and c.batch_size < world:
        return (f"{section}.batch_size={c.batch_size}: a launch of {world} processes splits every batch between them; "
                f"give at least {world}" + (f" (or {section}.data_parallel: false, one process training)"
                                            if hasattr(c, "data_parallel") else ""))
    return None


def classifier_stage(ctx: AuditContext, name: str, x0: torch.Tensor, labels: np.ndarray, input_fp: str,
                     *, clean: bool, input_stage: str | None = None,
                     too_few: str | Callable[[], str], data: dict[str, str | None] | None = None) -> None:
    """Train (or reuse) the classifier ``RUN/<name>/`` on images with labels >= 0 (:func:`method_guidance` turns
    it into a method's guidance). ``input_fp``: the fingerprint of its images and labels, the run stage
    ``input_stage``'s where they come from one (the manifest records it among the stage's inputs); ``data``: what
    it reads that is no run stage (:meth:`RunDir.begin`).

    Its checkpoints live in ``RUN/<name>/work/`` so that a stage started afresh removes them with the rest.
    """
    c = ctx.rc.clean_classifier if clean else ctx.rc.classifier
    denoised = not clean and c.guidance_input == "x0_hat"  # a clean classifier, used through x0_hat(x_t, t)
    fp = ctx.fp[name] = classifier_fingerprint(c, input_fp, clean=clean)
    directory = ctx.run.path / name
    keep = labels >= 0
    classes = np.unique(labels[keep])
    if len(classes) < 2:
        raise ValueError(f"{name}: {len(classes)} labelled class(es) left; a classifier needs at least 2 "
                         f"({too_few() if callable(too_few) else too_few})")
    group = ctx.run.group  # the main process decides, writes and records
    # who trains: every process (data-parallel), or the main one alone while the others wait for it
    trainers = group if c.data_parallel else SINGLE
    inputs = None if input_stage is None else {input_stage: input_fp}

    def to_train() -> bool:
        decision = ctx.run.begin(name, fp, inputs=inputs, data=data)
        if decision == "skip":  # (a weights or config file gone or damaged since: trained again, not a failed load
            return not classifier_saved_whole(directory)  # later)
        saved = _saved_completion(directory, fp) if decision == "resume" else None
        if saved is not None:  # saved, then interrupted before the manifest said so (the save removed work/)
            log.info("stage %s: its classifier was saved whole before the interruption; kept", name)
            ctx.run.complete(name, **saved)
        return saved is None

    def train() -> None:
        if said := launch_problem("clean_classifier" if clean else "classifier", c, trainers.world):
            raise ValueError(f"{name}: {said}")  # (the split's own error named no setting)
        result = fit_label_classifier(x0, labels, c, scheduler=None if clean or denoised else ctx.denoiser.scheduler,
                                      out=directory / "work", device=ctx.device, progress=ctx.progress(name),
                                      name=name, group=trainers, unet=_classifier_unet(ctx.denoiser, c, clean))
        if group.main:
            done = {"classes": len(classes), "accuracy": result.final_accuracy,
                    "balanced_accuracy": result.final_balanced_accuracy, "processes": trainers.world,
                    "rows_per_process": result.rows_per_process}
            save_classifier(result.model, directory, extra={"history": result.history, "config": cfg.to_dict(c),
                                                            "processes": trainers.world,
                                                            "majority_rate": result.majority_rate,
                                                            "heldout_labels": result.heldout_labels,
                                                            "stage": {"fingerprint": fp, "complete": done}})
            ctx.run.complete(name, **done)

    if group.on_main(to_train):
        if trainers is group:
            train()
            group.barrier()
        else:
            group.on_main(train)  # (its error, too, reaches the processes waiting for it)


def _saved_completion(directory: Path, fp: str) -> dict[str, Any] | None:
    """What the manifest records of a finished classifier stage, as the classifier saved in ``directory`` for
    stage fingerprint ``fp`` holds it (``config.json``'s ``stage``); None where no whole classifier of that
    fingerprint is saved there (none, another, one of a release that did not record it, a damaged file)."""
    try:
        stage = read_json(directory / "config.json", dict).get("stage")
    except (OSError, ValueError):
        return None
    if not isinstance(stage, dict) or stage.get("fingerprint") != fp or not isinstance(stage.get("complete"), dict):
        return None
    # (a power loss before the files were on disk can leave the renamed folder with a whole config.json beside a
    # cut weights file)
    return stage["complete"] if whole_safetensors(directory / "model.safetensors") else None


def _classifier_unet(denoiser: Denoiser, c: cfg.ClassifierConfig, clean: bool) -> torch.nn.Module | None:
    """The target's UNet for a classifier built on its features (``backbone: unet``), else None."""
    return denoiser.unet if c.backbone == "unet" and not clean else None


GUIDING_CLASSIFIER = {"side": "classifier", "side-teacher": "classifier-teacher", "cond": "classifier-clean"}
GUIDED_METHODS = frozenset(GUIDING_CLASSIFIER) | {"memguide"}  # the methods that sample with a guidance (below)


def method_guidance(run: str | Path, rc: cfg.RunConfig, method: str, denoiser: Denoiser, *,
                    device: str = "cpu") -> tuple[Denoiser, ClassifierGuidance | MemorizationGuidance | None]:
    """What ``method``'s extraction samples with, built from the run directory's files and its config: the
    denoiser (side-lora: the fine-tuned conditional model of ``RUN/lora``; else the target ``denoiser``) and
    the guidance (``side``, ``side-teacher``, ``cond``: the classifier of ``RUN/<GUIDING_CLASSIFIER[method]>``
    with the run's scale, temperature and time range, and for memorization-aware labels the background class
    of ``RUN/surrogate/labels.npz`` left out; ``memguide``: the target's memorization guidance; ``uncond``, and
    ``side-lora``, whose fine-tuned model is sampled conditionally: None). The pipeline extracts with it once the
    training stages are done; ``Audit.regenerate`` rebuilds a finished run's generations with it."""
    run, ex = Path(run), rc.extract
    if method == "uncond":
        return denoiser, None
    if method == "memguide":
        return denoiser, MemorizationGuidance(denoiser, ex.memguide_scale, ex.memguide_t_hi, ex.memguide_t_m,
                                              ex.seed, ex.memguide_avoid, ex.memguide_avoid_h,
                                              (ex.memguide_avoid_t_lo, ex.memguide_avoid_t_hi))
    if method == "side-lora":
        return load_finetuned(denoiser, run / "lora", guidance_scale=rc.lora.guidance_scale, device=device), None
    if method not in GUIDING_CLASSIFIER:
        raise ValueError(f"method={method!r} must be one of {', '.join(cfg.METHODS)}")
    clean = method == "cond"
    c = rc.clean_classifier if clean else rc.classifier
    directory = run / GUIDING_CLASSIFIER[method]
    if not (directory / "model.safetensors").is_file():
        raise ValueError(f"{str(directory)!r} holds no trained classifier (expected model.safetensors): has the "
                         f"run trained {method}'s classifier?")
    model = load_classifier(directory, device, unet=_classifier_unet(denoiser, c, clean))
    background: tuple[int, ...] = ()
    if method == "side":  # memorization-aware labels: no generation is guided toward the background class
        b = SurrogateLabels.load(run / "surrogate" / "labels.npz").background
        background = () if b is None else (b,)
    scale, temperature = ex.guidance(method)
    args = (model, np.asarray(model.arch.classes, dtype=np.int64), scale, temperature, (ex.t_lo, ex.t_hi),
            denoiser.scheduler.config.num_train_timesteps, background)
    if c.guidance_input == "x0_hat":  # a clean classifier, used through x0_hat(x_t, t) (SIDE's or Cond's)
        return denoiser, DenoisedGuidance(*args, denoiser=denoiser)
    return denoiser, ClassifierGuidance(*args)


def lora_stage(ctx: AuditContext, synthetic: ImageSet, labels: SurrogateLabels) -> None:
    """SIDE's second form: the target fine-tuned on the synthetic set with the surrogate labels (``finetune.py``);
    ``RUN/lora/`` holds the adapters, ``classes.json`` and the resumable work directory (:func:`method_guidance`
    loads it)."""
    c = ctx.rc.lora
    n_classes = len(np.unique(labels.labels[labels.labels >= 0]))
    if n_classes < 2:  # (finetune's own refusal said to lower tau where the size filter had dropped them)
        raise ValueError(f"side-lora: {n_classes} labelled cluster(s) left; it needs at least 2 "
                         f"({_surrogate_advice(ctx, labels)})")
    fp = stage_fingerprint("lora", lora_settings(c), ctx.fp["surrogate"], ctx.fp[MODEL_INPUT])
    ctx.fp["lora"] = fp
    directory = ctx.run.path / "lora"
    group = ctx.run.group  # every process trains (data-parallel); the main one decides, writes and records
    inputs = {"surrogate": ctx.fp["surrogate"], MODEL_INPUT: ctx.fp[MODEL_INPUT]}
    # (a finished stage whose files went or were damaged since is fine-tuned again, not a failed load later)
    if group.on_main(lambda: ctx.run.begin("lora", fp, inputs=inputs) != "skip" or not lora_saved_whole(directory)):
        if said := launch_problem("lora", c, group.world):
            raise ValueError(f"side-lora: {said}")  # (the split's own error named no setting)
        res = finetune(ctx.denoiser, synthetic.to_float(), labels.labels, c, directory,
                       target_fingerprint=ctx.fp[MODEL_INPUT], device=ctx.device, progress=ctx.progress("side-lora"),
                       group=group, background=labels.background)
        if group.main:
            ctx.run.complete("lora", classes=len(res.classes), final_loss=float(np.mean(res.losses[-50:])),
                             resumed_from=res.resumed_from, processes=group.world)
        group.barrier()


def teacher_stage(ctx: AuditContext, clean: ClassifierGuidance, synthetic: ImageSet) -> np.ndarray:
    fp = stage_fingerprint("teacher", ctx.fp["classifier-clean"], ctx.fp["synthetic"],
                           ctx.rc.surrogate.teacher_min_confidence)
    ctx.fp["teacher"] = fp
    path = ctx.run.path / "teacher" / "labels.npz"
    inputs = {k: ctx.fp[k] for k in ("classifier-clean", "synthetic")}
    if ctx.run.begin("teacher", fp, inputs=inputs) != "skip" or _damaged(path, "labels", whole=True):
        t = TeacherLabeler(clean.classifier, clean.classes, ctx.rc.surrogate.teacher_min_confidence).fit(synthetic.to_float())
        atomic_save_npz(path, labels=t.labels_, confidence=t.confidence_)
        ctx.run.complete("teacher", labelled=int((t.labels_ >= 0).sum()))
    return _stage_npz(path, "labels")


def extraction_settings(c: cfg.ExtractConfig, method: str,
                        guidance: ClassifierGuidance | MemorizationGuidance | None) -> dict:
    """What one method's generations depend on, named positively: the sampler, N_G, the seed, the batch size
    (batched convolutions round differently, so guided images can move by a few uint8 levels) and sharding,
    and for a guided method its own scale, temperature and guidance time range (not the other methods'); for
    memorization guidance its scale, time range and reconstruction time; for a method that draws target classes
    under adaptive allocation the allocation, rounds and near-duplicate distance; under dedup-driven stopping its
    threshold, rounds and near-duplicate distance."""
    # (eta stays even under DDPM, which does not read it: `side verify` checks runs made before against this)
    d = {k: getattr(c, k) for k in ("n", "seed", "scheduler", "steps", "eta", "batch_size", "shard_size")}
    if c.precision != "fp32":
        d["precision"] = c.precision
    if isinstance(guidance, MemorizationGuidance):
        d.update(memguide_scale=guidance.scale, memguide_t_hi=guidance.t_hi, memguide_t_m=guidance.t_m)
        if guidance.avoid > 0:
            d.update(memguide_avoid=guidance.avoid, memguide_avoid_h=guidance.avoid_h,
                     memguide_avoid_window=list(guidance.avoid_window), rounds=c.rounds)
            if c.scheduler == "ddpm":  # (DDPM generations made before the push was converted for DDPM's step differ)
                d["memguide_avoid_step"] = "ddpm-posterior-mean"
    elif guidance is not None:
        d.update(guidance_scale=guidance.scale, temperature=guidance.temperature, t_range=list(guidance.t_range))
        if method == "cond" and isinstance(guidance, DenoisedGuidance):  # the same clean classifier either way
            d["guidance_input"] = "x0_hat"  # (SIDE's classifier stage already differs: it trains on clean images)
    if c.allocation != "uniform" and method in cfg.TARGETED:
        d.update(allocation=c.allocation, rounds=c.rounds, dedup_threshold=c.dedup_threshold)
    if c.stop_unseen > 0:  # dedup-driven stopping, any method
        d.update(stop_unseen=c.stop_unseen, rounds=c.rounds, dedup_threshold=c.dedup_threshold)
    if cfg.method_in_rounds(method, c) and c.shard_size < round_size(c):  # a round in several shards (earlier: in one)
        d["round_shards"] = -(-round_size(c) // c.shard_size)
    return d


def extraction_upstream(method: str) -> str:
    """The stage whose fingerprint a method's extraction depends on besides the target's: its classifier, the
    fine-tuned model (``lora``), or ``model`` (the target alone: UnCond, memguide)."""
    return {**GUIDING_CLASSIFIER, "side-lora": "lora"}.get(method, MODEL_INPUT)


def extraction_inputs(method: str, fp: dict[str, str]) -> dict[str, str]:
    """The run stages a method's extraction is made from, for the manifest (``fp``: the stages' fingerprints): its
    guidance's stage (:func:`extraction_upstream`) and, for the methods that target surrogate clusters, the
    surrogate labels whose cluster ids its generations carry (a re-clustering leaves them stale even where the
    classifier was retrained on the new clusters since)."""
    stages = [extraction_upstream(method), *(["surrogate"] if method in ("side", "side-lora") else [])]
    return {k: fp[k] for k in stages if k != MODEL_INPUT and k in fp}


def extraction_fingerprint(rc: cfg.RunConfig, method: str, guidance: ClassifierGuidance | MemorizationGuidance | None,
                           model_fp: str, upstream_fp: str | None, n: int | None = None) -> str:
    """The fingerprint of ``extraction/<method>`` at N_G ``n`` (default ``rc.extract.n``): its settings
    (:func:`extraction_settings`), the target's and its upstream stage's fingerprints."""
    settings = extraction_settings(rc.extract, method, guidance)
    if method == "side-lora":
        settings["cfg_scale"] = rc.lora.guidance_scale
    return stage_fingerprint("extraction", {**settings, "n": rc.extract.n if n is None else n}, model_fp, method,
                             upstream_fp)
