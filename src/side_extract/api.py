"""The public Python API: ``side_extract.audit(model, train, out=...)`` and the typed results it returns.

``model`` may be a diffusers pipeline directory (or an embedded target: ``"demo-1000"``, ``"demo"``), a ``UNet2DModel`` with its scheduler, a
``DDPMPipeline`` / ``DDIMPipeline`` object, or any callable ``eps(x_t, t)`` with its scheduler and sample shape.
``train`` may be an image-set spec (``"digits:100"``, a folder, an ``.npz``), an :class:`~side_extract.data.ImageSet`
or a uint8 array (N, H, W) / (N, H, W, C). Everything is written to the run directory ``out``, exactly as
``side run`` writes it; :class:`Audit` reads it back as typed objects.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import inspect
import io
import json
import logging
import numbers
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from . import config as cfg
from .data import ImageSet, check_levels, integer_labels, load_image_set, load_shards
from .data import fingerprint as image_fingerprint
from .distributed import ProcessGroup, check_device
from .models.forms import (ModelLike, as_recorded, as_target, identity_fingerprint, module_fingerprint,
                           probe_fingerprint, run_target)
from .pipeline import ProgressFactory, absolute_config, absolute_spec, no_progress
from .findings import SYNTHETIC, Findings, collect, not_compared
from .evaluation import measured_generations
from .summary import audit_summary
from .runs import (atomic_save_npz, atomic_write_text, check_run_directory, check_run_path, evaluated_methods,
                   evaluated_synthetic, fingerprint_of, missing_folders, npz_arrays, read_json, read_model,
                   read_run_config, read_stages, remove_empty_folders, run_lock, check_unlocked, settings_changed,
                   stale_stages)
from .sweeps import current_sweeps, run_with_sweeps

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# data from memory (models: models/forms.py)


def as_image_set(images: str | Path | ImageSet | np.ndarray, labels: np.ndarray | None = None,
                 name: str = "train") -> ImageSet | str:
    """An image-set spec is returned as it is; an array or :class:`ImageSet` as an ImageSet (uint8 NHWC).
    ``name``: the argument the images came in, for the errors."""
    if isinstance(images, (str, Path)):
        if not str(images).strip():  # ('' was the current folder: its images audited as the training set)
            raise ValueError(f"{name}={str(images)!r} is empty: give an image-set spec (digits:N, a folder, an "
                             ".npz) or an array")
        if labels is not None:
            raise ValueError(f"labels=... go with an array or an unlabelled ImageSet; the spec {str(images)!r} "
                             "carries its own labels")
        # a Path names a path (str(Path("./digits")) is "digits": scikit-learn's digits were audited instead)
        return str(images.absolute()) if isinstance(images, Path) else images
    if isinstance(images, ImageSet):
        check_levels(images.images, name)
        if images.labels is not None:
            _labels(images.labels, len(images), f"{name}: the ImageSet's labels")
        ids = np.asarray(images.ids)
        if not np.issubdtype(ids.dtype, np.integer) or len(np.unique(ids)) != len(ids):  # (every pair's train_id
            # was the same when they repeated)
            raise ValueError(f"{name}: the ImageSet's ids must be distinct integers (they name each image in pairs and "
                             f"findings), got {ids.dtype} with {len(ids) - len(np.unique(ids))} repeated")
        if labels is None:
            return images
        if images.labels is not None:
            raise ValueError("labels=...: this ImageSet has labels already; pass one or the other")
        return dataclasses.replace(images, labels=_labels(labels, len(images)))
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim not in (3, 4):
        raise ValueError(f"{name}: an array must be uint8 (N, H, W) or (N, H, W, C), got {a.dtype} {a.shape}")
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[1] > 4:  # (taken as H greyscale images of W x 3 pixels)
        raise ValueError(f"{name}: an array of shape {a.shape} looks like one colour image (H, W, C); give a batch "
                         f"(N, H, W, C), e.g. {name}[None], or (N, H, W) greyscale images")
    if a.size == 0:
        raise ValueError(f"{name}: the array holds no images (shape {a.shape})")
    if a.ndim == 4 and a.shape[-1] not in (1, 3):  # (ImageSet's own message named neither the argument nor the layout)
        hint = (f"; it looks channels-first (N, C, H, W): pass {name}.transpose(0, 2, 3, 1)"
                if a.shape[1] in (1, 3) else "")
        raise ValueError(f"{name}: an array of images must be (N, H, W, C) with C 1 (grey) or 3 (RGB), got shape "
                         f"{a.shape}{hint}")
    check_levels(a, name)
    return ImageSet(a[..., None] if a.ndim == 3 else a, None if labels is None else _labels(labels, len(a)))


def _labels(labels: Any, n: int, what: str = "labels") -> np.ndarray:
    """``labels`` as int64, one per image (``n``); integers only (a float label was truncated without a word), -1
    for an unlabelled image and classes from 0 (every negative label was taken for unlabelled without a word)."""
    lab = integer_labels(labels, what)
    if lab.shape != (n,):
        raise ValueError(f"{what} has shape {lab.shape}, expected ({n},)")
    if lab.size and lab.min() < -1:
        raise ValueError(f"{what} hold {int(lab.min())}: classes are 0, 1, ... and -1 marks an unlabelled image")
    return lab.astype(np.int64)


def _run_config(config: cfg.RunConfig | dict | str | Path | None) -> cfg.RunConfig:
    if config is None:
        return cfg.RunConfig()
    if isinstance(config, cfg.RunConfig):
        return config
    if isinstance(config, dict):
        if bad := [k for k in config if not isinstance(k, str)]:
            raise ValueError(f"config: keys must be strings (e.g. 'extract.n' or 'extract'), got {bad!r}")
        return cfg.from_dict(cfg.RunConfig, cfg.dotted_to_nested(config) if any("." in k for k in config) else config)
    if not isinstance(config, (str, Path)):  # (a list was os.fspath's TypeError)
        raise ValueError(f"config must be a RunConfig, a dict of settings or the path of a run YAML, got "
                         f"{type(config).__name__}")
    return cfg.from_dict(cfg.RunConfig, cfg.load_yaml(config))


# --------------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass(frozen=True)
class BandResult:
    """One similarity band of one method, per generation made (N_G, unless dedup-driven stopping ended it early):
    AMS, the share of generations in the band; UMS, the distinct training images in the band divided by N_G (the
    paper's eq. 8: not a share of the training set, and above 1 when generations lie near several training images
    each). ``*_cumulative``: at the band or closer."""

    band: str
    lo: float
    hi: float
    ams: float
    ums: float
    ams_cumulative: float
    ums_cumulative: float


@dataclasses.dataclass(frozen=True)
class MethodResult:
    """Every metric of one method's generations (``metrics.json``, typed)."""

    method: str
    n_generated: int
    n_train: int
    similarity: str
    orientation: str
    bands: dict[str, BandResult]
    p95: float  # 95th percentile of the best similarity, or 5th percentile of the best distance
    carlini_extracted: float  # share with Carlini's ratio below 1
    gu_memorized: float  # share with Gu's d1 / d2 below the threshold
    raw: dict[str, Any] = dataclasses.field(repr=False, compare=False, default_factory=dict)  # metrics.json
    # why it cannot be set against the run's other methods (None: it can): its evaluation used another training
    # set, bands or similarity (an earlier call into the run measured it; the summary lists it as not compared)
    not_compared: str | None = None

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> "MethodResult":
        bands = {name: BandResult(name, float(lo), float(hi), float(m["ams"][name]), float(m["ums"][name]),
                                  float(m["ams_cumulative"][name]), float(m["ums_cumulative"][name]))
                 for name, (lo, hi) in m["bands"].items()}
        return cls(m["method"], int(m["n_generated"]), int(m["n_train"]), m["similarity"], m["orientation"], bands,
                   float(m["p95"]), float(m["carlini"]["extracted_fraction"]), float(m["gu"]["memorized_fraction"]), m)


@dataclasses.dataclass(frozen=True)
class ExtractedPair:
    """A generation beside its nearest training image. Images: (H, W, C) uint8. ``train_index``: the training
    image's row in the run's training set (``load_image_set(config.train).images[train_index]``); ``train_id``: its
    id there (``ImageSet.ids``: an index file's ids, a digits subset's digit numbers; the row where it has none).
    ``target_label``: the label the generation was guided toward (a surrogate cluster, a class; None: unguided)."""

    method: str
    generation_id: int
    train_id: int
    train_index: int
    similarity: float
    band: str
    generation: np.ndarray = dataclasses.field(repr=False, compare=False)
    nearest: np.ndarray = dataclasses.field(repr=False, compare=False)
    target_label: int | None = None

    def __eq__(self, other: object) -> bool:  # (the generated one compared arrays with ==: a ValueError)
        if not isinstance(other, ExtractedPair):
            return NotImplemented
        same = all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self) if f.compare)
        return same and np.array_equal(self.generation, other.generation) and np.array_equal(self.nearest,
                                                                                               other.nearest)

    def __hash__(self) -> int:  # (by the fields other than the images, which equal pairs share)
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.compare))


@dataclasses.dataclass(frozen=True)
class Verification:
    """One generation made again (:meth:`Audit.verify`) against the stored one: how many pixel values differ
    and by how many uint8 levels at most."""

    method: str
    generation_id: int
    pixels_differ: int
    largest_difference: int

    @property
    def equal(self) -> bool:
        return self.pixels_differ == 0


TABLE_COLUMNS = ("method", "band", "lo", "hi", "ams", "ums", "ams_cumulative", "ums_cumulative", "p95",
                 "carlini_extracted", "gu_memorized", "n_generated", "n_train", "not_compared")


@dataclasses.dataclass(frozen=True)
class Audit:
    """The results of a run directory as typed objects (what :func:`audit` returns; or ``Audit.load(run)``)."""

    run: Path
    config: cfg.RunConfig = dataclasses.field(repr=False)  # (its repr ran to thousands of characters)
    methods: dict[str, MethodResult]

    @classmethod
    def load(cls, run: str | Path) -> "Audit":
        """The results run directory ``run`` holds (its path made absolute: the object stays valid after a
        ``chdir``). Every current evaluation is listed, as the report and ``summary.json`` list them (one left
        unfinished, or made from an extraction replaced since, is left out with a warning); one that cannot be set
        against the others (an earlier call's, on another training set or bands) says why in ``not_compared``."""
        run = check_run_directory(run).resolve()
        rc = cfg.from_dict(cfg.RunConfig, read_run_config(run))
        metrics = {m: read_json(d / "metrics.json", dict) for m, d in evaluated_methods(run).items()}
        apart = not_compared(run, metrics)
        methods = {m: dataclasses.replace(MethodResult.from_json(v), not_compared=apart.get(m))
                   for m, v in metrics.items()}
        return cls(run, rc, methods)

    @property
    def sweeps(self) -> dict[str, "Audit"]:
        """The run's sweep sub-runs (the config's ``sweep:``), by name (``scale=3``, ``tau=0.5``), each read as an
        :class:`Audit` (``RUN/sweeps/<name>``); a sub-run left from an earlier config (a value no longer swept, or
        made under other settings of this run) is not among them (``sweeps.current_sweeps``)."""
        return {name: Audit.load(p) for name, p in current_sweeps(self.run, self.config).items()}

    @property
    def summary(self) -> dict[str, Any]:
        """The run's ``summary.json``, what ``side run`` prints and the report's first screen shows: per method the
        distinct training images per band (``distinct``, ``distinct_cumulative``: training images with a
        generation in the band, UMS x N_G; ``distinct_nearest_cumulative``: the distinct nearest training images of
        the generations at the band or closer, the benchmarks' count), the estimate at twice N_G
        (``estimated_2x``), cost and stopping; each SIDE form's and memguide's ratio to the best baseline per metric
        (``ratios_to_best_baseline``); and the ``verdict`` sentence. Computed from the evaluations the run holds
        now, as the report does (the file is written when a run's evaluations are done, and a later stage command
        can leave it behind)."""
        return audit_summary(self.run)

    def findings(self) -> Findings | None:
        """The training images every method's generations and the synthetic set (``synthetic``, where the run
        measured it) reached together, closest first (``RUN/findings.csv``): per image the closest band, the best
        sample's source and id, the closest band each source reached on it and the samples on it;
        ``count(band)`` / ``count(band, source)`` / ``only(source, band)`` give the distinct images at a band or
        closer found by all, by one, or by one and no other (None: no method evaluated)."""
        return collect(self.run)

    def table(self) -> list[dict[str, Any]]:
        """One row per method and band (``TABLE_COLUMNS``)."""
        rows = []
        for r in self.methods.values():
            for b in r.bands.values():
                rows.append({"method": r.method, "band": b.band, "lo": b.lo, "hi": b.hi, "ams": b.ams, "ums": b.ums,
                             "ams_cumulative": b.ams_cumulative, "ums_cumulative": b.ums_cumulative, "p95": r.p95,
                             "carlini_extracted": r.carlini_extracted, "gu_memorized": r.gu_memorized,
                             "n_generated": r.n_generated, "n_train": r.n_train, "not_compared": r.not_compared or ""})
        return rows

    def to_csv(self, path: str | Path | None = None) -> str:
        """The table as CSV text; also written to ``path`` when given."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=TABLE_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(self.table())
        if path is not None:
            cfg.check_path(path, "path")
            if Path(path).is_dir():  # (the error named the temporary file it was written through)
                raise ValueError(f"path={str(path)!r} is a folder: give the CSV file's path (e.g. "
                                 f"{str(Path(path) / 'audit.csv')!r})")
            atomic_write_text(path, buf.getvalue())
        return buf.getvalue()

    def to_pandas(self) -> Any:
        """The table as a ``pandas.DataFrame`` (pandas is optional: ``pip install pandas``)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Audit.to_pandas() needs pandas (pip install pandas); Audit.table() and "
                              "Audit.to_csv() need nothing") from None
        return pd.DataFrame(self.table(), columns=list(TABLE_COLUMNS))

    def pairs(self, method: str, *, band: str | None = None, top: int | None = None) -> list[ExtractedPair]:
        """``method``'s generations beside their nearest training images, closest first (in ``band`` only,
        when given: that band alone, where :meth:`findings`' ``at``/``count``/``only`` take the band or closer; the
        ``top`` closest, when given). ``"synthetic"``: the synthetic set's samples, where the run
        measured it (a source of :meth:`findings`)."""
        if top is not None and (isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 1):
            raise ValueError(f"top={top!r} must be a positive integer (or None: every pair)")
        name = method  # (as the pairs and findings name it)
        synthetic = evaluated_synthetic(self.run) if method not in self.methods else None
        if method == "synthetic-set" and SYNTHETIC in self.methods:  # (the findings' name for the run's own
            synthetic = evaluated_synthetic(self.run)  # synthetic set beside an evaluation named synthetic)
            method = SYNTHETIC if synthetic is not None else method
        if method not in self.methods and (method != SYNTHETIC or synthetic is None):
            results = [*self.methods, *([f"{SYNTHETIC} (the synthetic set)"] if synthetic else [])]
            raise ValueError(f"method={method!r} has no results in {self.run}; results: "
                             + (", ".join(results) or ("none (no method was evaluated: the run has no training set)"
                                                       if self.config.train is None else
                                                       "none (no method's evaluation has finished)")))
        if synthetic is not None:
            result = MethodResult.from_json(read_json(synthetic / "metrics.json", dict))
            evaluated, made = synthetic, self.run / "synthetic"
        else:
            result = self.methods[method]
            evaluated, made = self.run / "evaluation" / method, self.run / "extraction" / method
            now = read_json(evaluated / "metrics.json", dict) if (evaluated / "metrics.json").is_file() else None
            # compared as text (NaN equals itself there): its orientation, bands and training set were this object's,
            # the files a later call's (the farthest generations listed first, other training images beside them)
            if json.dumps(now, sort_keys=True) != json.dumps(result.raw, sort_keys=True):
                raise ValueError(f"{method}'s evaluation in {self.run} was made again (or removed) since this Audit "
                                 "was read: read the run again with Audit.load(run)")
        z = npz_arrays(evaluated / "per_generation.npz", "generation_id", "nearest_train_index", "nearest_train_id",
                       "similarity", "band", optional=("target_label",))  # (a damaged one: zipfile's bare error)
        gid, tidx, tid = z["generation_id"], z["nearest_train_index"], z["nearest_train_id"]
        sim, bands = z["similarity"].astype(float), z["band"].astype(str)
        target = z.get("target_label", np.full(len(gid), -1))
        order = np.argsort(-sim if result.orientation == "similarity" else sim, kind="stable")
        if band is not None:
            if band not in result.bands:
                raise ValueError(f"band={band!r} must be one of {', '.join(result.bands)}")
            order = order[bands[order] == band]
        order = order[:int(top)] if top is not None else order
        gen = measured_generations(method, result.raw, made)
        row_of = {int(i): r for r, i in enumerate(gen.ids)}
        train = load_image_set(self.config.train, self.config.train_resize)
        measured = (result.raw.get("fingerprints") or {}).get("train")
        if measured is not None and train.fingerprint() != measured:  # (its rows would index other images)
            raise ValueError(f"{method}'s evaluation was measured against another training set than the run's "
                             f"train now ({self.config.train!r}: changed since, or a later call into the run named "
                             f"another): its nearest training images cannot be shown; measure it again "
                             f"(audit(..., methods=[{method!r}]))")
        return [ExtractedPair(name, int(gid[i]), int(tid[i]), int(tidx[i]), float(sim[i]), str(bands[i]),
                              gen.images[row_of[int(gid[i])]], train.images[int(tidx[i])],
                              None if target[i] < 0 else int(target[i])) for i in order]

    def regenerate(self, method: str, indices: Sequence[int], *, model: ModelLike | None = None,
                   scheduler: SchedulerMixin | None = None, sample_shape: Sequence[int] | None = None,
                   device: str = "cpu", model_id: str | None = None) -> np.ndarray:
        """``method``'s generations ``indices`` made again from the run's files, uint8 in the layout of the stored
        ones: the target, the method's classifier (fine-tuned model, memorization guidance) and settings, and
        for a method in rounds the run's earlier rounds. Each generation is made in the denoiser batch the run
        made it in (as its shards recorded it, even after the batch was halved on a GPU out-of-memory error), so
        on the same hardware and thread count they equal ``RUN/extraction/<method>`` bit for bit: a way to show a
        reported extraction comes from the model and not from the audit's files.

        ``model``: the target, as ``audit`` takes it (with the ``model_id`` the audit was given, if any); needed
        when the run's was a model in memory, else the run config's. Its fingerprint must match the one the run's
        manifest recorded. The settings are the ones the
        stage was made with (``RUN/extraction/<method>/config.yaml``; the run's ``config.yaml`` for runs made
        before it was kept), checked against the stage's fingerprint.
        """
        from .extraction import batch_of, earlier_rounds, extract, in_rounds, round_start, stored_batches
        from .pipeline import extraction_fingerprint, extraction_upstream, method_guidance
        from .sampling import BatchSize

        check_device(device)

        stage = self.run / "extraction" / method
        rc = (cfg.from_dict(cfg.RunConfig, read_run_config(self.run, stage / "config.yaml"))
              if (stage / "config.yaml").is_file() else self.config)
        ex = rc.extract
        if method not in ex.methods:
            raise ValueError(f"method={method!r} is not one of this run's methods ({', '.join(ex.methods)})" + (
                "; its extraction, made before each stage kept its config, cannot be rebuilt from the run's "
                "config.yaml" if stage.is_dir() else ""))
        idx = _integer_indices(indices)
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= ex.n:
            raise ValueError(f"indices={idx.tolist()[:8]} must be a non-empty list of generations in 0 .. {ex.n - 1}")
        stages = read_stages(self.run)
        entry = stages.get(f"extraction/{method}")
        if entry is None or entry.get("status") != "complete":
            raise ValueError(f"{str(stage)!r}: the run has not finished {method}'s extraction (manifest.json)")
        if remade := stale_stages(stages).get(f"extraction/{method}"):  # (the target: run_target checks it)
            # (the guidance is read from the run's files now: surrogate labels clustered again beside the old
            # classifier guided toward other classes, which the extraction's own fingerprint does not see)
            raise ValueError(f"{method}'s extraction was made from earlier results of {', '.join(remade)}, made "
                             "again since: its generations cannot be made again from the run's files (complete the "
                             "run again, audit() or side run, to bring the extraction up to date)")
        target = run_target(str(rc.model), entry.get("inputs", {}).get("model"), model, scheduler=scheduler,
                            sample_shape=sample_shape, device=device, model_id=model_id,
                            pass_as="model= (side verify: --model DIR, the model saved with save_pretrained)")
        denoiser, guidance = method_guidance(self.run, rc, method, target.denoiser, device=device)
        up = extraction_upstream(method)
        made_by = extraction_fingerprint(rc, method, guidance, target.fingerprint,
                                         target.fingerprint if up == "model" else stages.get(up, {}).get("fingerprint"))
        if entry.get("fingerprint") != made_by:
            raise ValueError(f"the run's config does not describe {method}'s extraction as the run made "
                             f"it (its settings or upstream stages changed since: the fingerprint differs from "
                             f"manifest.json's), so its generations cannot be made again from it")
        stored = load_shards(stage) if in_rounds(ex, guidance, denoiser) else None  # the earlier rounds, read once
        starts = stored_batches(stage)
        made: dict[int, np.ndarray] = {}
        for i in idx.tolist():
            if i in made:
                continue
            lo, hi = batch_of(ex, guidance, i, starts, denoiser=denoiser)
            begin = round_start(ex, lo)
            previous = earlier_rounds(stored, begin) if stored is not None and begin > 0 else None
            batch = extract(denoiser, ex, guidance, lo, hi, previous=previous, batch_size=BatchSize(hi - lo),
                            device=device)["images"]
            made.update({j: batch[j - lo] for j in range(lo, hi)})
        return np.stack([made[i] for i in idx.tolist()])

    def verify_conditions(self, method: str, device: str = "cpu") -> list[str]:
        """Where making ``method``'s generations again here differs from how the run made them (the device, torch
        threads, torch or diffusers version its manifest recorded): each a reason :meth:`verify` may find pixels
        that differ by rounding although nothing was altered. Empty when every recorded condition matches."""
        from .runs import versions

        check_device(device)
        entry = read_stages(self.run).get(f"extraction/{method}")
        if entry is None:  # (a misspelled method: "every recorded condition matches")
            raise ValueError(f"method={method!r}: the run holds no extraction of it (manifest.json)")
        out = []
        made = entry.get("device")
        if made is not None and str(made).split(":", 1)[0] != torch.device(device).type:  # (the manifest's value
            # read as text: a damaged one, "bogus" or 5, ended side verify in torch's RuntimeError)
            out.append(f"made on {made}, made again on {device}")
        threads = entry.get("torch_threads")
        if threads is not None and threads != torch.get_num_threads():
            out.append(f"made with {threads} torch threads, made again with {torch.get_num_threads()}")
        now = versions()
        for dist, v in (entry.get("versions") or {}).items():
            if dist in ("torch", "diffusers") and now.get(dist) != v:
                out.append(f"made with {dist} {v}, made again with {now.get(dist)}")
        return out

    def verify(self, method: str, indices: Sequence[int] | None = None, *, top: int = 8,
               model: ModelLike | None = None, scheduler: SchedulerMixin | None = None,
               sample_shape: Sequence[int] | None = None, device: str = "cpu",
               model_id: str | None = None) -> list[Verification]:
        """:meth:`regenerate` ``method``'s generations ``indices`` (default: its ``top`` closest to the training
        set) and compare them with the stored ones, one :class:`Verification` each; all ``equal`` on the
        hardware and thread count the run was made with."""
        check_device(device)
        if indices is None:
            if isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 1:
                raise ValueError(f"top={top!r} must be a positive integer (the closest generations to verify)")
            indices = [p.generation_id for p in self.pairs(method, top=top)]
        ids = _integer_indices(indices).tolist()  # (1.7 was verified as generation 1, "3" as 3; 5 a TypeError)
        again = self.regenerate(method, ids, model=model, scheduler=scheduler, sample_shape=sample_shape,
                                device=device, model_id=model_id)
        stored = load_shards(self.run / "extraction" / method)
        row = {int(i): r for r, i in enumerate(stored.ids)}
        out = []
        for i, image in zip(ids, again):
            diff = np.abs(image.astype(np.int16) - stored.images[row[i]].astype(np.int16))
            out.append(Verification(method, i, int((diff > 0).sum()), int(diff.max())))
        return out

    def report(self) -> Path:
        """Write the HTML report (``RUN/report/report.html``) and return its path."""
        from .report import write_report

        return write_report(self.run)


def _checked_progress(factory: Callable[[str], Any]) -> Callable[[str], Any]:
    """``factory`` with each stage's callback checked as it is made: one that is not a callback(done, total) (or None)
    failed inside the stage with a TypeError that named no argument."""
    def made(name: str) -> Any:
        callback = factory(name)
        if callback is not None and (not callable(callback) or not _takes_arguments(callback, 2)):
            raise ValueError(f"progress= returned {callback!r} for stage {name!r}: the factory must return a "
                             "callback(done, total) or None")
        return callback

    return made


def _takes_arguments(f: Callable[..., Any], n: int) -> bool:
    """Whether ``f`` can be called with ``n`` positional arguments (True where its signature cannot be read)."""
    try:
        inspect.signature(f).bind(*range(n))
    except TypeError:
        return False
    except ValueError:  # (a builtin without a signature)
        return True
    return True


def moved_inputs(recorded: dict[str, Any], inputs: Path, saved: Iterable[str]) -> dict[str, Any]:
    """A run's recorded config (as a dict) with its in-memory sets' files (``train``, ``evaluate.heldout``:
    ``<run>/inputs/<name>-<fingerprint>.npz``) named where the run is now, ``inputs``, where this call saved the same
    file there (``saved``): a run moved since was told "settings changed" for its own inputs, the same images under
    the same fingerprint name (an API review's find)."""
    d = dict(recorded)
    for section, key in ((None, "train"), ("evaluate", "heldout")):
        holder = d if section is None else d.get(section)
        if not isinstance(holder, dict) or not isinstance(holder.get(key), str):
            continue
        here = str(inputs / Path(holder[key]).name)
        if Path(holder[key]).parent.name == "inputs" and here in set(saved) and holder[key] != here:
            if section is not None:
                holder = d[section] = dict(holder)
            holder[key] = here
    return d


def audit(
    model: ModelLike,
    train: str | Path | ImageSet | np.ndarray,
    *,
    out: str | Path,
    config: cfg.RunConfig | dict | str | Path | None = None,
    scheduler: SchedulerMixin | None = None,
    sample_shape: Sequence[int] | None = None,
    labels: np.ndarray | None = None,
    heldout: str | Path | ImageSet | np.ndarray | None = None,
    methods: Sequence[str] | None = None,
    device: str = "cpu",
    progress: ProgressFactory = no_progress,
    wait: bool = False,
    model_id: str | None = None,
) -> Audit:
    """Run the SIDE audit of ``model`` against ``train`` into run directory ``out``; returns its results.

    Parameters
    ----------
    model : a diffusers directory or an embedded target (``"demo-1000"``, ``"demo"``); a ``UNet2DModel`` (with ``scheduler``); a ``DDPMPipeline`` or
        ``DDIMPipeline``; or a callable ``eps(x, t)`` (with ``scheduler`` and ``sample_shape``)
    train : the training set: a spec (``"digits:100"``, folder, ``.npz``), an ``ImageSet``, or a uint8 array
        (N, H, W) / (N, H, W, C) with optional ``labels`` (N,) (Cond and SIDE-teacher need labels); an
        in-memory set is saved as ``out/inputs/train-<12 hex digits of its pixels', labels' (and ids', where they are
        not 0..N-1) fingerprint>.npz``
    heldout : images from the training distribution that the model did not train on (``evaluate.heldout``), in the
        same forms as ``train``; the similarity bands are calibrated on them against the training set, and sample
        quality is measured against them (given with ``evaluate.heldout`` in ``config`` too, the call is refused).
        Without them (and without ``evaluate.heldout`` in ``config``) a training
        set other than digits is calibrated against itself, and the run warns. An in-memory set is saved as
        ``out/inputs/heldout-<its fingerprint>.npz``, named like ``train``. A call refused before its run starts
        removes the input files it wrote (an earlier call's, which the run was made from, are never replaced)
    config : a ``RunConfig``, a dict (nested, or dotted keys such as ``{"extract.n": 200}``), or a YAML path;
        its ``model`` and ``train`` are replaced by the arguments
    methods : overrides ``config.extract.methods`` (``side``, ``side-teacher``, ``side-lora``, ``cond``, ``uncond``,
        ``memguide``)
    model_id : a callable only: a name for its weights (e.g. their checkpoint's sha256) that keys the run's stages
        instead of the callable's outputs on probe inputs, which another device or thread count can move by a
        rounding step (:func:`as_target`); pass it again to ``Audit.regenerate``/``verify``
    device : torch device of every stage (``"cpu"``, ``"cuda"``, ``"cuda:1"``); a model object given here is moved
        to it and put in eval mode, in place
    progress : a factory ``name -> callback(done, total)``, called once per stage (``name``: the stage); the
        default reports nothing
    wait : if another process is writing ``out``, wait for it instead of failing at once

    A call into an existing run directory continues it: finished stages whose settings are unchanged are kept,
    the others made again, and the settings that changed since its last call are named in a warning (logger
    ``side_extract.api``). Evaluations an earlier call made and this one did not redo stay in the run; the
    returned :class:`Audit` marks those that cannot be compared with the rest (``MethodResult.not_compared``).
    """
    check_device(device)
    check_run_path(out, "out")  # a folder that is no run, or no path at all: refused before the model and data are
    # read, and before its inputs/ is written
    if not callable(progress) or not _takes_arguments(progress, 1):  # (a callback(done, total) given as the factory
        # failed with a TypeError once the first stage had begun, leaving it marked failed)
        raise ValueError(f"progress={progress!r} must be a factory name -> callback(done, total) (or left out): it is "
                         "called with each stage's name and returns that stage's callback (or None)")
    progress = _checked_progress(progress)
    rc = _run_config(config)
    if heldout is not None and rc.evaluate.heldout is not None:  # (the argument replaced it without a word)
        raise ValueError(f"heldout= and the config's evaluate.heldout={rc.evaluate.heldout!r} both name held-out "
                         "images: give one of them")
    if isinstance(methods, str):  # one method, not its letters
        methods = (methods,)
    elif methods is not None and not isinstance(methods, Iterable):  # ("'int' object is not iterable")
        raise ValueError(f"methods={methods!r} must be a method name or a list of them (e.g. ['side', 'uncond'])")
    ex = rc.extract if methods is None else dataclasses.replace(rc.extract, methods=tuple(methods))
    group = ProcessGroup.from_env()  # under torchrun / accelerate launch the main process writes and locks
    if group.main and not wait:  # another writer: said at once, before the model is loaded or moved to the device
        check_unlocked(out)
    target = as_target(model, scheduler=scheduler, sample_shape=sample_shape, device=device, model_id=model_id)
    # (a pipeline from a directory the run was made from: that directory; a model the run knows by an earlier
    # release's fingerprint: that one)
    target = as_recorded(target, model, read_model(out) if Path(out).is_dir() else None, device,
                         own_scheduler=scheduler is None)
    data = as_image_set(train, labels)
    held = None if heldout is None else as_image_set(heldout, name="heldout")
    fresh = not Path(out).exists()
    made = missing_folders(out)  # the folders this call makes (the lock makes every parent of out)
    new_inputs = not (Path(out) / "inputs").exists()  # a folder this call makes, which a refusal removes again
    written: list[Path] = []  # the input files this call wrote
    saved_as: dict[str, str] = {}  # an in-memory set's saved path -> the argument it came in

    def saved(name: str, images: ImageSet) -> str:
        """An in-memory set saved in the run, named by its pixels and labels, so that another call's set never
        replaces one a run was made from; its absolute path (the run is read again from other directories)."""
        ids = None if np.array_equal(images.ids, np.arange(len(images))) else image_fingerprint(images.ids)
        key = fingerprint_of(images.fingerprint(), None if images.labels is None else image_fingerprint(images.labels),
                             *([ids] if ids else []))
        path = Path(out).resolve() / "inputs" / f"{name}-{key[:12]}.npz"
        saved_as[str(path)] = name
        if group.main and not path.exists():
            written.append(path)
        extra = {} if images.labels is None else {"labels": images.labels}
        if not np.array_equal(images.ids, np.arange(len(images))):
            extra["index"] = images.ids  # the caller's ids, which findings and pairs report (the loader reads them)
        group.on_main(lambda: atomic_save_npz(path, images=images.images, **extra))
        return str(path)

    def undo() -> None:
        """What a failed call wrote, removed while it still holds the lock (after it, a writer that waited for the
        lock could begin in the folder and lose its files to the removal)."""
        if fresh and Path(out).is_dir() and not (Path(out) / "manifest.json").exists():
            shutil.rmtree(out, ignore_errors=True)  # refused before any stage began: leave nothing behind
            remove_empty_folders(made[1:])  # and the parents it made (each only where left empty)
        elif new_inputs and not (Path(out) / "manifest.json").exists():
            shutil.rmtree(Path(out) / "inputs", ignore_errors=True)  # in a folder the caller made: what it wrote
        elif written:  # an existing run: keep only the inputs its config names
            named = cfg.load_yaml(Path(out) / "config.yaml") if (Path(out) / "config.yaml").is_file() else {}
            keep = {str(named.get("train")), str((named.get("evaluate") or {}).get("heldout"))}
            for path in written:
                if str(path) not in keep:
                    path.unlink(missing_ok=True)

    try:
        with run_lock(out, wait=wait) if group.main else contextlib.nullcontext():
            try:
                data = saved("train", data) if isinstance(data, ImageSet) else data
                held = saved("heldout", held) if isinstance(held, ImageSet) else held
                ev = rc.evaluate if held is None else dataclasses.replace(rc.evaluate, heldout=held)
                rc = dataclasses.replace(rc, model=absolute_spec(target.description, model=True), train=absolute_spec(data),
                                         extract=ex, evaluate=dataclasses.replace(ev, heldout=absolute_spec(ev.heldout)))
                if group.main and (changed := settings_changed(out, rc, lambda old: moved_inputs(
                        absolute_config(old), Path(out).resolve() / "inputs", saved_as))):
                    log.warning("settings changed since the last run into %s: %s", out, "; ".join(changed))
                run_with_sweeps(out, rc, device=device, progress=progress, target=target, wait=wait)  # (a sweep
                # sub-run another writer held was refused at once, after the main run was made again)
            except BaseException:
                if group.main:  # (refused before the lock, e.g. another writer holds it: nothing is this call's)
                    undo()
                raise
    except BaseException as e:
        if isinstance(e, ValueError) and any(p in str(e) for p in saved_as):  # name what the caller passed, not
            text = str(e)  # the file it was saved to (which the user never named)
            for path, name in saved_as.items():
                text = text.replace(repr(path), path).replace(path, f"{name}= (the images passed in memory, saved as "
                                                                     f"{Path(path).name})")
            raise ValueError(text) from None
        raise
    return Audit.load(out)


def _integer_indices(indices: Any) -> np.ndarray:
    """Generation numbers as int64, refused unless integers."""
    idx = np.asarray(indices).reshape(-1)
    if idx.dtype == object and len(idx) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                for v in idx):  # (said as "must be integers ..., got object")
        raise ValueError(f"indices={idx.tolist()[:8]} lie past every generation number (beyond 64-bit integers)")
    if len(idx) and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices={idx.tolist()[:8]} must be integers (generation numbers), got {idx.dtype}")
    return idx.astype(np.int64)


__all__ = ["audit", "Audit", "MethodResult", "BandResult", "ExtractedPair", "Verification", "as_target", "run_target",
           "as_image_set", "module_fingerprint", "probe_fingerprint", "identity_fingerprint", "TABLE_COLUMNS"]
