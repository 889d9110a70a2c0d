"""Everything a run can be refused for, checked before its first stage (``preflight``)."""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as cfg
from ..data import ImageSet, check_levels, folder_sizes, labelled_classes, load_image_set
from ..detection import check_grid
from ..distributed import ProcessGroup
from ..evaluation import copies_of, digits_complement, duplicate_counts
from ..metrics import Similarity, parse_bands, read_bands_file
from ..features import EXTRACTORS, extractor_problem
from ..finetune import lora_problems
from ..models.classifier import DEPTHS
from ..models.target import (RESIZE_HOW, Denoiser, UNetDenoiser, check_fits)
from ..neighbors import faiss_available
from ..sampling import check_sampler
from ..memorization import candidate_count
from ..runs import read_model_entry, settings_changed
from .context import Until, absolute_config, absolute_paths, absolute_spec
from .methods import GUIDED_METHODS, launch_problem

log = logging.getLogger(__name__)
MEMGUIDE_TUNED_STEPS = 50  # the DDIM steps extract.memguide_scale's default and grid were chosen at


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
    elif 2 * rc.surrogate.min_size > n_clustered:  # (found after the synthetic set, its features and clustering)
        used = ", ".join(sorted(cfg.CLUSTERING_METHODS & set(methods)))
        problems.append(f"surrogate.min_size={rc.surrogate.min_size}: the {n_clustered} synthetic images clustered "
                        f"hold at most one cluster that large, and {used} need 2 kept clusters (lower it to at most "
                        f"{n_clustered // 2}, or raise sample.n)")
    return problems


def launch_problems(rc: cfg.RunConfig, methods: Iterable[str], world: int) -> dict[str, str]:
    """The training sections of ``methods`` whose batch a launch of ``world`` processes cannot split (each process
    takes rows rank::world of every batch), each with what to set (:func:`launch_problem`): such a training failed
    after the synthetic set, its features and the clustering, naming no setting."""
    out = {}
    for section, by in cfg.TRAINING_SECTIONS.items():
        if by.keys() & set(methods) and (said := launch_problem(section, getattr(rc, section), world)):
            out[section] = said
    return out


# the settings (top-level keys of a run config; "model": the target's weights too) each training section's stages
# are made from: one changed since the run was made trains them again
TRAINING_INPUTS = {
    "classifier": frozenset({"model", "train", "train_resize", "sample", "features", "surrogate", "classifier",
                             "clean_classifier"}),  # (side-teacher's teacher is the clean classifier)
    "clean_classifier": frozenset({"train", "train_resize", "clean_classifier"}),
    "lora": frozenset({"model", "sample", "features", "surrogate", "lora"}),
}


def trained_sections(stages: dict[str, dict[str, Any]], methods: Iterable[str], changed: Iterable[str] = ()
                     ) -> set[str]:
    """The training sections whose every stage that ``methods`` train the run's manifest ``stages`` holds complete,
    made from none of the settings ``changed`` since (:func:`changed_settings`; a grown run trains nothing again, a
    resampled one does)."""
    done = {name for name, e in stages.items() if e.get("status") == "complete"}
    changed, out = set(changed), set()
    for section, by in cfg.TRAINING_SECTIONS.items():
        needed = {stage for m, stage in by.items() if m in set(methods)}
        if not needed or (needed <= done and not changed & TRAINING_INPUTS[section]):
            out.add(section)
    return out


def changed_settings(run: Path, rc: cfg.RunConfig, model_fingerprint: str) -> set[str]:
    """The top-level settings of ``rc`` (``sample``, ``model``, ...) that differ from those run directory ``run`` was
    last made with, ``model`` too where its target's weights do (every key where its config cannot be read)."""
    changed = settings_changed(run, absolute_paths(rc), absolute_config)
    if any(line.startswith("none known") for line in changed):
        return set().union(*TRAINING_INPUTS.values())
    out = {line.split(" ", 1)[0].split(".", 1)[0] for line in changed}
    if read_model_entry(run).get("fingerprint") not in (None, model_fingerprint):
        out.add("model")
    return out


def gradient_methods(rc: cfg.RunConfig, methods: Iterable[str]) -> list[str]:
    """The methods of ``methods`` whose guidance differentiates through the target, each with why: memguide (its
    memorization term), and a classifier guided through x0_hat(x_t, t) (side and side-teacher with
    classifier.guidance_input x0_hat, cond with clean_classifier.guidance_input x0_hat)."""
    methods = set(methods)
    out = ["memguide"] if "memguide" in methods and rc.extract.memguide_scale > 0 else []
    if rc.classifier.guidance_input == "x0_hat" and (through := sorted({"side", "side-teacher"} & methods)):
        out.append(f"{' and '.join(through)} (classifier.guidance_input x0_hat)")
    if "cond" in methods and rc.clean_classifier.guidance_input == "x0_hat":
        out.append("cond (clean_classifier.guidance_input x0_hat)")
    return out


def preflight(rc: cfg.RunConfig, denoiser: Denoiser, until: Until = "evaluation", *,
              warn_inert: bool | Collection[str] = True, trained: Collection[str] | None = None) -> dict[str, ImageSet]:
    """Check the resolved config against the model, the data and the methods before any stage runs; one
    ``ValueError`` lists every problem found (not only the first). ``warn_inert``: warn of the settings that change
    nothing in this run (:func:`~side_extract.config.inert_settings`; False: not; a collection of them: all but
    those, which the caller has said already). ``trained``: the training sections the run holds trained
    (:func:`trained_sections`); a batch a launch cannot split is refused in the others and warned of in these (a
    finished training reads none, unless its settings changed); None: warned of everywhere.
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
                        + (f"must be resized to that ({H})" if H == W else f"must be given at {H}x{W} (height x "
                           "width): train_resize makes square images; leave it out"))
    elif rc.train_resize is None and len(sizes := folder_sizes(rc.train)) == 1 and (
            size := next(iter(sizes))) != tuple(sorted((H, W))):  # (a folder of photos of another size was decoded
        # whole, 90 GB of 30,000 1024^2 images, before the size message)
        problems.append(f"training images ({rc.train}) are {size[1]}x{size[0]} (their headers), but the model makes "
                        f"{H}x{W} images; " + (f"resize them to {H} ({RESIZE_HOW})" if H == W else
                                                f"give them at {H}x{W} (height x width): resizing makes square images"))
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
    said = set() if isinstance(warn_inert, bool) else set(warn_inert)
    if warn_inert is not False and (inert := [s for s in cfg.inert_settings(rc) if s not in said]):
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
    if not getattr(denoiser, "differentiable", True) and until in ("extraction", "evaluation") and (
            through := gradient_methods(rc, methods)):
        why = (f"its backward failed: {err}" if (err := getattr(denoiser, "gradient_error", None)) else
               "it runs under torch.no_grad, detaches its output, or goes through numpy")  # (a review's find: an
        # in-place op on x was told to drop a torch.no_grad it did not have)
        problems.append(f"model: the callable eps(x, t) returns no gradient with respect to x ({why}), and "
                        f"{'; '.join(through)} differentiate through the model: their guidance would be 0 or wrong "
                        "without a word; let the gradient through, or leave those methods out")
    group = ProcessGroup.from_env()
    if ("memguide" in methods and until in ("extraction", "evaluation") and rc.extract.memguide_scale > 0
            and rc.extract.steps < MEMGUIDE_TUNED_STEPS and group.main):  # (said once a launch)
        log.warning("extract.memguide_scale=%g with extract.steps=%d: memguide's lambdas were chosen at %d DDIM steps "
                    "(the default, 100, most often); fewer take the guided range t <= %g T in fewer, larger steps, and "
                    "lambda 100 left none of the demo's memguide generations in its high band at 10 or 20 steps: "
                    "compare a few lower values on your target at these steps", rc.extract.memguide_scale,
                    rc.extract.steps, MEMGUIDE_TUNED_STEPS, rc.extract.memguide_t_hi)
    trains = until != "surrogate"  # (side cluster trains nothing: it was refused a batch it would not split)
    for section, said in (launch_problems(rc, methods, group.world) if trains else {}).items():
        if trained is None or section in trained:  # (more generations of a finished run read no batch: warned of
            if group.main:  # only, once a launch)
                log.warning("%s (a training with it would fail once it starts)", said)
        else:  # (warned of, the launch sampled, embedded and clustered, then failed at the training)
            problems.append(said)
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
        elif str(rc.train).startswith("digits:"):  # the digits outside the subset (1,797 8x8 images: cheap to read
            # here; "checked when calibrating" refused digits:1700's 97 after every extraction)
            if cfg.calibrates_bands(ev) and train is not None:  # (a training set not read: its resize refused)
                try:
                    h = digits_complement(str(rc.train), rc.train_resize)
                    copies = copies_of(h, train) if h.shape == train.shape else 0
                    n_null = len(h) - copies
                except ValueError as e:
                    problems.append(f"the bands are calibrated on the digits outside train={rc.train!r}: {e}")
        elif train is not None:  # train vs the rest of train: an image with a duplicate there scores a copy
            counts = duplicate_counts(train)
            copies = int(counts[counts > 1].sum())
            n_null = len(train) - copies
        q = min(ev.calibration_quantiles)
        if cfg.calibrates_bands(ev) and n_null is not None and n_null * q < 0.1:
            source = (f"the held-out images evaluate.heldout={ev.heldout!r}" if ev.heldout is not None
                      else f"the digits outside train={rc.train!r}" if str(rc.train).startswith("digits:")
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
