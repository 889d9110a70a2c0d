"""The audit as a chain of stages over a run directory (``side run`` and ``side demo``).

synthetic -> features -> surrogate -> classifier            -> extraction/side         -> evaluation/<m>
   |                     (clusters)   (noise-aware)
   +-> memorization (only with surrogate.memorized_fraction < 1: which samples are clustered)
train set -> classifier-clean -> teacher labels -> classifier-teacher -> extraction/side-teacher
             (time-independent)  ----------------------------------> extraction/cond
target ---------------------------------------------------------------> extraction/uncond

Each stage's fingerprint hashes its config and the fingerprints of the stages it reads, so a changed
setting reruns exactly the stages downstream of it. Stages read their inputs back from the run directory's
files, never from another stage's memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from . import config as cfg
from .data import ImageSet, check_levels, is_digits_spec, labelled_classes, load_image_set, load_shards
from .detection import check_grid
from .distributed import SINGLE, ProcessGroup
from .evaluation import (Evaluation, calibrate, copies_of, duplicate_counts, evaluate, held_out_set,
                         neighbor_index)
from .metrics import Similarity, parse_bands, read_bands_file
from .extraction import extraction_stage, planned_extraction, round_size
from .features import EXTRACTORS, extract_features, extractor_problem
from .finetune import finetune, load_finetuned, lora_problems, lora_settings
from .finetune import saved_whole as lora_saved_whole
from .guidance import ClassifierGuidance, DenoisedGuidance
from .quality import image_features, quality_from_features
from .models.classifier import DEPTHS, load_classifier, save_classifier
from .models.classifier import saved_whole as classifier_saved_whole
from .models.target import (EMBEDDED_TARGETS, Denoiser, Target, UNetDenoiser, check_fits, load_target,
                            model_fingerprint)
from .neighbors import NearestNeighborIndex, faiss_available, pixel_rows
from .runs import (MODEL_INPUT, SYNTHETIC_EVALUATION, RunDir, StageWouldBeReplaced, array_fingerprint,
                   atomic_save_npz, atomic_write_json, atomic_write_text, check_run_path, check_unlocked,
                   file_fingerprint, fingerprint_of, npz_arrays, read_json, read_npz, run_lock, settings_fingerprint,
                   shards_hold, stage_fingerprint, whole_safetensors)
from .sampling import check_sampler, sample_stage
from .summary import write_summary
from .memorization import MemorizationGuidance, candidate_count, denoising_error, memorization_candidates
from .surrogate import ClusterLabeler, SurrogateLabels, TeacherLabeler, filter_advice, label_candidates
from .training import fit_label_classifier

log = logging.getLogger(__name__)
ProgressFactory = Callable[[str], Callable[[int, int], None] | None]


def no_progress(_name: str) -> None:
    """A :data:`ProgressFactory` that shows nothing."""
    return None


@dataclasses.dataclass
class AuditContext:
    """What the stages of one run share: where, with what, and the fingerprints computed so far."""

    run: RunDir
    rc: cfg.RunConfig
    denoiser: Denoiser
    device: str = "cpu"
    progress: ProgressFactory = no_progress
    fp: dict[str, str] = dataclasses.field(default_factory=dict)
    cache: dict[tuple, np.ndarray] = dataclasses.field(default_factory=dict)  # in-process only (quality features)
    sets: dict[str, ImageSet | None] = dataclasses.field(default_factory=dict)  # the training, held-out set: read once
    fingerprints: dict[int, tuple[ImageSet, str]] = dataclasses.field(default_factory=dict)  # by id, with the set

    def fingerprint(self, images: ImageSet) -> str:
        """``images.fingerprint()``, hashed once per call of the pipeline (every stage and method keys by it)."""
        hit = self.fingerprints.get(id(images))
        if hit is None or hit[0] is not images:  # (the set is held with it: its id is not reused meanwhile)
            hit = self.fingerprints[id(images)] = (images, images.fingerprint())
        return hit[1]


# --------------------------------------------------------------------------------------------------
# stages


def script_fingerprints(extractor: str | None) -> list[str]:
    """[the file's fingerprint] for a ``torchscript:PATH`` extractor (its settings name only the path), else []."""
    if extractor is None or not extractor.startswith("torchscript:"):
        return []
    return [file_fingerprint(extractor.split(":", 1)[1])]


def _damaged(path: Path, key: str) -> bool:
    """A finished stage's npz output gone or damaged since (a disk fault, a hand edit): the stage is made again."""
    if read_npz(path, key) is not None:
        return False
    if path.exists():
        log.warning("%s is damaged (it does not read as the stage wrote it): its stage is made again", path)
    return True


def _bands_damaged(path: Path, similarity: str) -> bool:
    """The calibration's bands.json gone, or it or the null.npz beside it damaged since: the stage is made again
    (it only checked that bands.json was there, so a damaged one failed every later run, --force included, until
    deleted by hand, and a damaged null.npz every report)."""
    if not path.exists():
        return True
    null = path.parent / "null.npz"
    try:
        read_bands_file(path, similarity)
    except ValueError:
        damaged: Path | None = path
    else:
        damaged = null if null.exists() and read_npz(null) is None else None
    if damaged is not None:
        log.warning("%s is damaged (it does not read as the stage wrote it): its stage is made again", damaged)
    return damaged is not None


def _stage_npz(path: Path, key: str) -> np.ndarray:
    got = read_npz(path, key)
    if got is None:  # (just written whole: only a disk failing now gets here)
        raise ValueError(f"{str(path)!r} does not read back as it was written (the disk?)")
    return got[key]


def features_stage(ctx: AuditContext, synthetic: ImageSet) -> np.ndarray:
    c = ctx.rc.features
    fp = stage_fingerprint("features", cfg.at_defaults(c, cfg.unread_keys(c)), ctx.fp["synthetic"],
                           *script_fingerprints(c.extractor))
    ctx.fp["features"] = fp
    path = ctx.run.path / "features" / "features.npz"
    inputs = {"synthetic": ctx.fp["synthetic"]}
    scripts = script_fingerprints(c.extractor)  # (a file changed under its path was refused naming nothing)
    data = {"extractor file": scripts[0]} if scripts else None
    if ctx.run.begin("features", fp, inputs=inputs, data=data) != "skip" or _damaged(path, "features"):
        feats = extract_features(c.extractor, synthetic, model=ctx.denoiser, device=ctx.device, batch_size=c.batch_size)
        atomic_save_npz(path, features=feats, index=synthetic.ids)
        ctx.run.complete("features", extractor=c.extractor, dim=int(feats.shape[1]))
    return _stage_npz(path, "features")


def memorization_stage(ctx: AuditContext, synthetic: ImageSet) -> np.ndarray | None:
    """Memorization scores of the synthetic set (``memorization.py``), only for memorization-aware labels
    (``surrogate.memorized_fraction`` < 1): (n,) denoising error, lower = more likely memorized; else None."""
    c = ctx.rc.surrogate
    if c.memorized_fraction >= 1.0:
        return None
    settings = {"t": c.memorization_t, "draws": c.memorization_draws, "seed": ctx.rc.sample.seed}
    fp = stage_fingerprint("memorization", settings, ctx.fp["synthetic"], ctx.fp[MODEL_INPUT])
    ctx.fp["memorization"] = fp
    path = ctx.run.path / "memorization" / "scores.npz"
    inputs = {"synthetic": ctx.fp["synthetic"], MODEL_INPUT: ctx.fp[MODEL_INPUT]}
    if ctx.run.begin("memorization", fp, inputs=inputs) != "skip" or _damaged(path, "scores"):
        scores = denoising_error(ctx.denoiser, synthetic.to_float(), c.memorization_t, c.memorization_draws,
                                 ctx.rc.sample.seed, device=ctx.device)
        atomic_save_npz(path, scores=scores, index=synthetic.ids)
        ctx.run.complete("memorization", t=c.memorization_t, draws=c.memorization_draws)
    return _stage_npz(path, "scores")


def surrogate_settings(c: cfg.SurrogateConfig, *, legacy: bool = False) -> dict:
    """What the surrogate labels depend on: every clustering setting it reads (not K under ``select_k``, which picks
    K; ``legacy``: as session 48's rule keyed it, with K), and the memorization-aware ones only when that option is
    on (``memorized_fraction`` < 1), so the paper's labels keep the fingerprint they had before the option existed
    and no cached run is redone."""
    unread = [] if legacy else list(cfg.unread_keys(c))
    d = cfg.to_dict(cfg.at_defaults(c, ["teacher_min_confidence", *unread]))  # (the teacher's stage reads it)
    if c.memorized_fraction >= 1.0:
        for k in ("memorized_fraction", "memorization_t", "memorization_draws"):
            d.pop(k)
    return d


def surrogate_stage(ctx: AuditContext, features: np.ndarray, scores: np.ndarray | None = None) -> SurrogateLabels:
    """Cluster labels of the synthetic set (with memorization ``scores``: of its likely-memorized fraction, the
    rest one background label); writes ``labels.npz`` (``labels`` per sample, ``candidates``: the rows that were
    clustered, ``cluster``: their raw K-means ids, ``background``: the background label or -1; centroids,
    cohesion) and ``clusters.json``."""
    c = ctx.rc.surrogate
    if (scores is None) != (c.memorized_fraction >= 1.0):
        raise ValueError(f"memorization scores are {'missing' if scores is None else 'given'} but "
                         f"surrogate.memorized_fraction={c.memorized_fraction} "
                         f"{'asks for them' if scores is None else 'is 1 (the paper labels every sample)'}")
    inputs = {k: ctx.fp[k] for k in ("features", *(["memorization"] if scores is not None else []))}
    fp = stage_fingerprint("surrogate", surrogate_settings(c), *inputs.values())
    entry = ctx.run.stage_entry("surrogate") or {}
    if c.select_k and entry.get("fingerprint") not in (None, fp):  # made under the earlier rule (K keyed under
        # select_k): it keeps its key, and every stage made from it stands, whatever K says now. The K it was keyed
        # with: recorded once found, else the run's config.yaml before this call's
        before = ((ctx.run.config_before or {}).get("surrogate") or {}).get("n_clusters")
        for k in dict.fromkeys((entry.get("keyed_n_clusters"), before, c.n_clusters)):
            if isinstance(k, int) and k >= 2 and entry["fingerprint"] == stage_fingerprint(
                    "surrogate", surrogate_settings(dataclasses.replace(c, n_clusters=k), legacy=True),
                    *inputs.values()):
                fp = entry["fingerprint"]
                if entry.get("keyed_n_clusters") != k and ctx.run.group.main:
                    ctx.run.annotate("surrogate", keyed_n_clusters=k)
                break
    ctx.fp["surrogate"] = fp
    path = ctx.run.path / "surrogate" / "labels.npz"
    if ctx.run.begin("surrogate", fp, inputs=inputs) != "skip" or _damaged(path, "labels") or not (
            ctx.run.path / "surrogate" / "clusters.json").is_file():
        lab = ClusterLabeler(n_clusters=c.n_clusters, tau=c.tau, min_size=c.min_size, dropped=c.dropped,
                             n_init=c.n_init, random_state=c.random_state, select_k=c.select_k)
        candidates = (np.arange(len(features)) if scores is None
                      else memorization_candidates(scores, c.memorized_fraction))
        out = label_candidates(lab, features, candidates)
        background = -1 if out.background is None else out.background
        atomic_save_npz(path, labels=out.labels, cluster=lab.cluster_, kept=lab.kept_, cohesion=lab.cohesion_,
                        sizes=lab.sizes_, centroids=lab.centroids_.astype(np.float32), candidates=candidates,
                        background=np.int64(background))
        clusters = lab.clusters()
        labelled = int(np.isin(out.labels, out.targets).sum())
        atomic_write_json(ctx.run.path / "surrogate" / "clusters.json",
                          {"tau": c.tau, "kept": int(lab.kept_.sum()), "n_clusters": lab.n_clusters_,
                           "k_scores": {str(k): v for k, v in lab.k_scores_.items()},
                           "labelled": labelled, "candidates": len(candidates), "background": out.background,
                           "clusters": clusters})
        ctx.run.complete("surrogate", kept=int(lab.kept_.sum()), labelled=labelled, n_clusters=lab.n_clusters_,
                         candidates=len(candidates))
    return SurrogateLabels.load(path)


def _surrogate_advice(ctx: AuditContext, labels: SurrogateLabels) -> str:
    """Which surrogate filter left the classifier too few classes, from the clusters the surrogate stage kept."""
    c = ctx.rc.surrogate
    z = npz_arrays(ctx.run.path / "surrogate" / "labels.npz", "sizes", "cohesion")
    keep = 2 - (labels.background is not None)  # (the background label is a class of its own)
    return "too few clusters pass " + filter_advice(z["sizes"], z["cohesion"], c.tau, c.min_size, keep=keep)


def _train_set(ctx: AuditContext) -> ImageSet:
    if ctx.rc.train is None:
        raise ValueError("this stage needs the training set: set 'train' in the run config (e.g. train: digits:100)")
    if "train" not in ctx.sets:  # (read once per call)
        s = load_image_set(ctx.rc.train, ctx.rc.train_resize)
        check_fits(s.shape, ctx.denoiser.sample_shape, f"training images ({ctx.rc.train})")
        ctx.sets["train"] = s
    return ctx.sets["train"]


def _heldout_set(ctx: AuditContext) -> ImageSet | None:
    """:func:`real_heldout`, read once per call."""
    if "heldout" not in ctx.sets:
        ctx.sets["heldout"] = real_heldout(ctx.rc)
    return ctx.sets["heldout"]


def classifier_fingerprint(c: cfg.ClassifierConfig, input_fp: str, *, clean: bool) -> str:
    """A classifier stage's fingerprint: its settings as it reads them and its images' and labels' fingerprint."""
    return stage_fingerprint("classifier", classifier_settings(c, clean=clean), input_fp, clean)


def clean_classifier_plan(ctx: AuditContext, train: ImageSet) -> tuple[str, dict[str, str | None]]:
    """The clean classifier's input fingerprint, of the training set's images and labels (a relabelled set trains it
    anew), and the data it reads (:meth:`RunDir.begin`'s ``data``)."""
    return (fingerprint_of(ctx.fingerprint(train), array_fingerprint(train.labels)),
            {"training set": ctx.fingerprint(train)})


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


def classifier_settings(c: cfg.ClassifierConfig, *, clean: bool) -> dict[str, Any]:
    """What training classifier ``c`` reads, for its stage's fingerprint: not the keys it does not read at all
    (:func:`~side_extract.config.unread_keys`), and for a ``clean`` one (Cond's, the teacher's) not the input it
    guides through either (x_t or x0_hat: it trains the same; the extraction's fingerprint names it), nor
    ``balance`` at 0 (:data:`~side_extract.config.LATER_KEYS`: runs made before it keep their classifiers), nor
    ``data_parallel`` (:data:`~side_extract.config.UNKEYED`: who trains, the same classifier up to float rounding)."""
    unread = [*cfg.unread_keys(c, clean=clean), *(["guidance_input"] if clean else [])]
    return cfg.keyed_settings(cfg.at_defaults(c, unread))


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
        res = finetune(ctx.denoiser, synthetic.to_float(), labels.labels, c, directory,
                       target_fingerprint=ctx.fp[MODEL_INPUT], device=ctx.device, progress=ctx.progress("side-lora"),
                       group=group, background=labels.background)
        if group.main:
            ctx.run.complete("lora", classes=len(res.classes), final_loss=float(np.mean(res.losses[-50:])),
                             resumed_from=res.resumed_from, processes=group.world)
        group.barrier()


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


def teacher_stage(ctx: AuditContext, clean: ClassifierGuidance, synthetic: ImageSet) -> np.ndarray:
    fp = stage_fingerprint("teacher", ctx.fp["classifier-clean"], ctx.fp["synthetic"],
                           ctx.rc.surrogate.teacher_min_confidence)
    ctx.fp["teacher"] = fp
    path = ctx.run.path / "teacher" / "labels.npz"
    inputs = {k: ctx.fp[k] for k in ("classifier-clean", "synthetic")}
    if ctx.run.begin("teacher", fp, inputs=inputs) != "skip" or _damaged(path, "labels"):
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


# --------------------------------------------------------------------------------------------------
# the chain


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
                                 *script_fingerprints(Similarity(c.similarity).extractor))
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
             *script_fingerprints(sim.extractor)]
    fp = stage_fingerprint("train-features", *parts, *keyed)
    legacy = stage_fingerprint("train-features", *parts) if keyed else None  # (session 46's, made at this size)
    path = ctx.run.path / "train-features" / "features.npz"
    if ctx.run.begin("train-features", fp, legacy=legacy) != "skip" or _damaged(path, "features"):
        feats = extract_features(sim.extractor, train, model=ctx.denoiser, reference=train, device=ctx.device,
                                 batch_size=c.feature_batch_size)
        atomic_save_npz(path, features=feats)
        ctx.run.complete("train-features", n=len(train), dim=int(feats.shape[1]))
    return _stage_npz(path, "features")


def quality_reference(ctx: AuditContext) -> ImageSet | None:
    """Held-out real images to measure sample quality against: ``evaluate.heldout``, else the digits outside a
    ``digits:N`` training set (resized like it), at most ``quality_max_reference`` of them (seeded); else None."""
    c = ctx.rc.evaluate
    ref = _heldout_set(ctx)
    if ref is None:
        return None
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
        out[name] = q.to_json()
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
    reference = quality_reference(ctx) if c.quality else None
    cal_entry = None if bands_file is None else ctx.run.stage_entry("calibration")
    cal = None if cal_entry is None else cal_entry["fingerprint"]
    cal_legacy = None if cal_entry is None else cal_entry.get("rekeyed_from", cal)
    scores = [*script_fingerprints(Similarity(c.similarity).extractor),  # what the files the config names hold
              *([] if ctx.rc.evaluate.bands_file is None else [file_fingerprint(ctx.rc.evaluate.bands_file)])]
    files = [*scores, *(f for name in c.quality for f in script_fingerprints(name))]
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


@dataclasses.dataclass(frozen=True)
class AuditResult:
    run: Path
    extractions: dict[str, ImageSet]
    metrics: dict[str, dict]


Until = Literal["surrogate", "classifier", "extraction", "evaluation"]
UNTIL = ("surrogate", "classifier", "extraction", "evaluation")


def cluster_problems(rc: cfg.RunConfig, methods: Iterable[str]) -> list[str]:
    """What in ``rc`` leaves the surrogate clustering of ``methods`` impossible, from the config alone: more
    clusters than synthetic images clustered, or a min_size above them (the benches check it before training a
    target; a run, before its first stage)."""
    if not cfg.CLUSTERING_METHODS & set(methods):  # (side-teacher's labels are the teacher's: it clusters nothing)
        return []
    problems = []
    ks = rc.surrogate.select_k or (rc.surrogate.n_clusters,)
    n_clustered = candidate_count(rc.sample.n, rc.surrogate.memorized_fraction)
    if max(ks) > n_clustered:
        what = ("the number of synthetic images sample.n" if n_clustered == rc.sample.n else
                f"the memorization candidates (surrogate.memorized_fraction={rc.surrogate.memorized_fraction} "
                f"of sample.n={rc.sample.n})")
        problems.append(f"surrogate K={max(ks)} must be <= {what}={n_clustered}")
    elif rc.surrogate.select_k and max(ks) >= n_clustered:  # the silhouette needs a cluster of two
        problems.append(f"surrogate.select_k value {max(ks)} must be < the {n_clustered} synthetic images clustered "
                        "(the silhouette that picks K needs a cluster of two)")
    if rc.surrogate.min_size > n_clustered:
        problems.append(f"surrogate.min_size={rc.surrogate.min_size} is more than the {n_clustered} synthetic "
                        "images clustered: every cluster would be dropped (lower it, or raise sample.n)")
    return problems


def preflight(rc: cfg.RunConfig, denoiser: Denoiser, until: Until = "evaluation", *,
              warn_inert: bool = True) -> dict[str, ImageSet]:
    """Check the resolved config against the model, the data and the methods before any stage runs; one
    ``ValueError`` lists every problem found (not only the first). ``warn_inert``: warn of the settings that change
    nothing in this run (:func:`~side_extract.config.inert_settings`; off where the caller has said so already).
    Returns the image sets it read (``train``, ``heldout``: :attr:`AuditContext.sets`, read as the run records their
    paths), so the stages do not read them again (a set's warnings were said twice, once here and once by its
    stage, and a file changed in between was checked here and read changed there)."""
    problems: list[str] = []
    methods = set(rc.extract.methods)
    C, H, W = denoiser.sample_shape
    needs_train = bool({"cond", "side-teacher"} & methods) and until != "surrogate"  # (clustering does not)
    guided = bool(GUIDED_METHODS & methods)
    for name, c, g in (("sample", rc.sample, False), ("extract", rc.extract, guided)):
        try:  # (checked by the sampler too, but only once its stage has begun: after the stages before it)
            check_sampler(denoiser.scheduler, c.scheduler, c.steps, name, guided=g)
        except ValueError as e:
            problems.append(str(e))
    if until == "surrogate" and not cfg.CLUSTERING_METHODS & methods:
        problems.append(f"clustering (until=surrogate, side cluster) makes the surrogate labels of side and side-lora; "
                        f"extract.methods ({', '.join(rc.extract.methods)}) has neither: add side, or "
                        + ("train the classifiers the methods need (side train-classifier)" if {"cond", "side-teacher"}
                           & methods else "go on with side extract (the methods need no clustering or classifier)"))
    train, loaded = None, {}
    if rc.train is None:
        if needs_train:
            problems.append(f"methods {', '.join(sorted({'cond', 'side-teacher'} & methods))} need the training set: "
                            "set 'train' (e.g. train: digits:100) in a --config file, or leave them out of "
                            "extract.methods (the default methods include cond)")
    elif rc.train_resize is not None and (rc.train_resize, rc.train_resize) != (H, W):  # (before the resize: one
        # of 100000 ran out of memory, with advice about the batch size)
        problems.append(f"train_resize={rc.train_resize}: the model makes {H}x{W} images, and the training images "
                        f"must be resized to that ({H})")
    else:
        try:
            train = load_image_set(absolute_spec(rc.train), rc.train_resize)
        except ValueError as e:
            problems.append(f"train={rc.train!r}: {e}")
    if train is not None:
        loaded["train"] = train
        try:
            check_fits(train.shape, denoiser.sample_shape, f"training images ({rc.train})")
        except ValueError as e:
            problems.append(str(e))
        try:
            check_levels(train.images, f"train={rc.train!r}")
        except ValueError as e:
            problems.append(str(e))
        if needs_train and train.labels is None:
            problems.append(f"methods {', '.join(sorted({'cond', 'side-teacher'} & methods))} need a labelled training "
                            f"set; {rc.train!r} has no labels (give an .npz with 'labels', or digits; a folder of "
                            "images has none; from Python, audit(..., labels=...)), or leave them out of "
                            "extract.methods (the default methods include cond; side, memguide and uncond need no "
                            "labels)")
        elif needs_train and (n_classes := labelled_classes(train.labels)) < 2:
            problems.append(f"methods cond and side-teacher train a classifier on the training set's labels; "
                            f"{rc.train!r} has {n_classes} labelled class(es), it needs at least 2")
    if rc.classifier.backbone == "unet" and {"side", "side-teacher"} & methods and not isinstance(denoiser, UNetDenoiser):
        problems.append("classifier.backbone=unet reads the target's diffusers UNet2DModel features; this target is "
                        "a callable (use backbone: resnet)")
    for name, c in (("classifier", rc.classifier), ("clean_classifier", rc.clean_classifier)):
        if c.backbone == "resnet" and c.depth not in DEPTHS:
            problems.append(f"{name}.depth={c.depth} must be one of {sorted(DEPTHS)} (the ResNet's depth)")
    if warn_inert and (inert := cfg.inert_settings(rc)):
        log.warning("settings that change nothing in this run: %s", "; ".join(inert))
    if rc.clean_classifier.backbone != "resnet":
        problems.append(f"clean_classifier.backbone={rc.clean_classifier.backbone!r}: the clean (time-independent) "
                        "classifier must use backbone: resnet")
    if "side-lora" in methods:
        if not isinstance(denoiser, UNetDenoiser):
            problems.append("method side-lora fine-tunes a diffusers UNet2DModel target; this target is a callable")
        else:
            problems.extend(lora_problems(denoiser.unet, rc.lora))
        if rc.lora.rank != "full" and importlib.util.find_spec("peft") is None:
            problems.append("method side-lora with LoRA adapters needs peft (pip install peft), or lora.rank: full")
    problems.extend(cluster_problems(rc, methods))
    unet = denoiser.unet if isinstance(denoiser, UNetDenoiser) else None
    if cfg.CLUSTERING_METHODS & methods and (bad := extractor_problem(rc.features.extractor, unet)):
        problems.append(f"features.extractor: {bad}")
    if methods - {"uncond", "side-lora", "memguide"}:  # the methods that train a classifier
        if C not in (1, 3) or not 8 <= H <= 256 or H != W:
            problems.append(f"the classifiers need square 8-256 px images with 1 or 3 channels; the model makes "
                            f"{H}x{W} with {C} channel(s)")
    if not 0.0 <= rc.surrogate.teacher_min_confidence < 1.0:
        problems.append(f"surrogate.teacher_min_confidence={rc.surrogate.teacher_min_confidence} must be in [0, 1)")
    ev = rc.evaluate
    if until == "evaluation" and rc.train is not None:
        if train is not None and len(train) < 2:  # (said by the evaluation, after every extraction)
            problems.append(f"train={rc.train!r} holds {len(train)} image: the evaluation needs at least 2 (Gu's "
                            "ratio uses the second nearest)")
        if ev.detect_threshold is not None and ev.detect_grid is not None:
            try:  # (a run reads the model's own images: evaluate.resize is for side evaluate's sets)
                check_grid(ev.detect_grid, H, W, "evaluate.detect_grid")
            except ValueError as e:
                problems.append(str(e))
        extractor = Similarity(ev.similarity).extractor
        checks = (  # what the evaluations read, checked before the stages upstream of them run (or are replaced)
            None if ev.bands is None else lambda: parse_bands(ev.bands),
            None if ev.bands_file is None else lambda: read_bands_file(ev.bands_file, ev.similarity))
        for check in filter(None, checks):
            try:
                check()
            except ValueError as e:
                problems.append(f"evaluate: {e}")
        if ev.backend == "faiss" and not faiss_available():  # (said by the calibration, after every extraction)
            problems.append("evaluate.backend='faiss': faiss is not importable here; install faiss-cpu or use "
                            "backend 'torch' (or 'auto', which takes faiss where it is installed)")
        if extractor is not None and (bad := extractor_problem(extractor, unet)):
            problems.append(f"evaluate: {bad}")
        valid = ", ".join("torchscript:PATH" if k == "torchscript" else k for k in EXTRACTORS if k != "unet")
        for name in ev.quality:  # (the list said pixels twice, and offered unet, refused just below)
            if name != "pixels" and name.split(":", 1)[0] not in EXTRACTORS:
                problems.append(f"evaluate.quality: {name!r} is not a feature space; valid: {valid}")
            elif name != "pixels" and name != "unet" and (bad := extractor_problem(name, unet)):
                problems.append(f"evaluate.quality: {bad}")  # a missing torchscript file, an argument to none
            elif name == "unet":
                problems.append("evaluate.quality: 'unet' features depend on the audited model; use pixels, "
                                "efficientnet-lite0 or torchscript:PATH")
        # the null leaves out exact copies of a training image (the calibration drops them), so they are not
        # counted here (a null of 80 of 100 held-out images was refused after every extraction had run)
        n_null, copies = None, 0
        if ev.heldout is not None and "heldout" not in cfg.unread_keys(ev):  # (one named as read by nothing was
            # loaded, and refused where missing)
            try:
                h = loaded["heldout"] = load_image_set(absolute_spec(ev.heldout), rc.train_resize)
                n_null = len(h)
                check_levels(h.images, "its images")
                if train is not None and h.shape != train.shape:
                    problems.append(f"evaluate.heldout={ev.heldout!r} images are {h.shape} (C, H, W), the training "
                                    f"set's {train.shape}")
                elif train is not None and (copies := copies_of(h, train)) == len(h):
                    problems.append(f"evaluate.heldout={ev.heldout!r}: every one of its {len(h)} images is a training "
                                    "image (an exact copy); held-out images must be ones the model never saw")
                n_null -= copies
            except ValueError as e:
                problems.append(f"evaluate.heldout={ev.heldout!r}: {e}")
        elif str(rc.train).startswith("digits:"):
            n_null = None  # the digits outside the subset: checked when calibrating
        elif train is not None:  # train vs the rest of train: an image with a duplicate there scores a copy
            counts = duplicate_counts(train)
            copies = int(counts[counts > 1].sum())
            n_null = len(train) - copies
        q = min(ev.calibration_quantiles)
        if cfg.calibrates_bands(ev) and n_null is not None and n_null * q < 0.1:
            source = (f"the held-out images evaluate.heldout={ev.heldout!r}" if ev.heldout is not None
                      else "the training set against itself")
            if copies:
                source += f", less {copies} exact copies of training images, which the null leaves out"
            problems.append(f"the bands would be calibrated on a null of {n_null} images ({source}), too few for its "
                            f"{q:g} quantile (it needs at least {int(np.ceil(0.1 / q))}, and {int(np.ceil(1 / q))} for "
                            "an edge set by more than the closest few): give "
                            + ("more " if ev.heldout is not None else "") + "held-out images "
                            "(evaluate.heldout), coarser quantiles (evaluate.calibration_quantiles) or fixed bands "
                            "(evaluate.bands, e.g. 'high=0:0.1,mid=0.1:0.15,low=0.15:0.2'); side demo takes "
                            "held-out images as --heldout, and the other two through side run's config")
    if problems:
        raise ValueError("the run cannot start:\n  - " + "\n  - ".join(problems))
    return loaded


def load_run_target(rc: cfg.RunConfig, device: str = "cpu") -> Target:
    """The model ``rc.model`` names, loaded on ``device`` (this process's own in a launch of several)."""
    device = ProcessGroup.from_env().device(device)
    return Target(load_target(rc.model, device), model_fingerprint(rc.model), str(rc.model))


def run_audit(path: str | Path, rc: cfg.RunConfig, *, device: str = "cpu", until: Until = "evaluation",
              progress: ProgressFactory = no_progress, wait: bool = False, replace: bool = True,
              target: Target | None = None, warn_inert: bool = True) -> AuditResult:
    """Run every stage the config's methods need, up to and including ``until``, into run directory ``path``.

    ``evaluation`` (with ``rc.train`` set) measures each method's generations against the training set into
    ``evaluation/<method>/metrics.json``. Before anything is written, the model is loaded and the whole config
    is checked against it and the data (:func:`preflight`). The run directory is locked for the whole call
    (:func:`~side_extract.runs.run_lock`; ``wait`` blocks on another writer instead of failing). With
    ``replace=False``, a finished stage whose settings changed is an error instead of being redone. After an
    error, stages left ``running`` are marked ``failed`` in the manifest.

    ``target``: an in-memory model (:class:`~side_extract.models.target.Target`, see ``side_extract.api``)
    instead of loading ``rc.model`` from disk; ``rc.model`` then only describes it. ``warn_inert=False``: do not
    warn of settings that change nothing (a sweep's sub-run whose main run has named the same ones).
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
    loaded = preflight(rc, target.denoiser, until, warn_inert=warn_inert and group.main)
    group.agree({"config": fingerprint_of(rc), "model": target.fingerprint, "until": until, "run": str(path),
                 "replace": replace}, "settings (config or model), stage or run directory")  # (the values, not
    # the files they name: each machine of a launch may read its own copy)
    with run_lock(path, wait=wait) if group.main else contextlib.nullcontext():  # a launch is one writer
        run = RunDir(path, replace=replace, group=group)
        config = run.path / "config.yaml"
        before = config.read_text() if group.main and config.is_file() else None
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


def absolute_spec(spec: Any, *, model: bool = False) -> Any:
    """A spec that names a file or folder here, made absolute: a run's config is read again from other working
    directories (``side verify``, ``side report``, :meth:`~side_extract.api.Audit.load` after a ``chdir``), where a
    relative path named nothing. Other specs (``digits:N``, an embedded target, a hub id, an in-memory model's
    description, None) as they are."""
    if not isinstance(spec, (str, Path)) or is_digits_spec(spec):
        return spec
    if model and str(spec) in EMBEDDED_TARGETS:
        return spec
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


RECORDED_PATHS = (("model",), ("train",), ("evaluate", "heldout"), ("evaluate", "bands_file"))  # recorded absolute


def absolute_config(d: dict[str, Any]) -> dict[str, Any]:
    """A run config as a dict (a config.yaml's, :func:`config.to_dict`'s) with the paths of :data:`RECORDED_PATHS`
    made absolute (:func:`absolute_spec`), as a run records them (a run made before this release recorded them as
    typed: a rerun from the same folder was told its model had changed)."""
    d = dict(d)
    for *section, key in RECORDED_PATHS:
        holder = d
        for name in section:  # (a copy of each section on the way: the caller's dict is left as it is)
            if not isinstance(holder.get(name), dict):
                break
            holder[name] = holder = dict(holder[name])
        else:
            if key in holder:
                holder[key] = absolute_spec(holder[key], model=key == "model")
    return d


def absolute_paths(rc: cfg.RunConfig) -> cfg.RunConfig:
    """``rc`` with the paths of :data:`RECORDED_PATHS` made absolute, as a run records them."""
    return cfg.from_dict(cfg.RunConfig, absolute_config(cfg.to_dict(rc)))


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
