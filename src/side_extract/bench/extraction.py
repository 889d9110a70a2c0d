"""Extraction benchmark: SIDE vs the baselines across training-set scales (``side bench extraction``).

For each training-set size ``n`` in ``scales``:

1. the class-balanced digits subset ``digits:n`` (the first n/10 of each class), resized to ``size``, is
   written once to ``CACHE/data/digits<n>-<size>px.npz``; the bundled digits outside it are its held-out set;
2. a target is trained with one fixed ``TrainTargetConfig`` (the same step budget at every scale, so the
   smallest set is memorized strongly and the largest weakly) into ``CACHE/targets/<name>-<fingerprint>``,
   or reused from there when a target of the same config fingerprint was trained before (resumable);
3. rms-l2 bands are calibrated once per training set on the held-out null (held-out digits vs the
   training set, :func:`side_extract.evaluation.calibrate`) and every run on that set reads them;
4. the audit chain (:func:`side_extract.pipeline.run_audit`) runs SIDE with cluster labels (``side``), SIDE
   with teacher labels (``side-teacher``), Cond and UnCond at equal N_G and equal seeds into
   ``CACHE/runs/<target>/rep-<seed>``; each method's ``metrics.json`` goes into the results unchanged;
5. on one scale (``sweep_scale``, default the middle one): a lambda sweep of the guided methods and a K and
   tau sweep of SIDE's cluster labels, as :class:`~side_extract.config.SweepConfig` sub-runs that share the
   main run's unchanged stages (:func:`side_extract.sweeps.run_with_sweeps`) at ``sweep_n_generated``.

The results hold, per scale, ``{n_train, n_generated, methods: {method: metrics.json}}`` and the ratio of
each SIDE variant to the best baseline per metric (:func:`ratios_to_best_baseline`). ``run.extract.seed`` is
the replicate (:func:`replicate_config`: it seeds the synthetic set, the clustering, the classifiers and the
extraction): choose settings on one replicate (validation) and report them on another (held-out); ``side
bench fair`` does both with several replicates, the same tuning grid for every method and intervals.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any

from .. import config as cfg
from ..data import ImageSet, largest_balanced, load_digits_set, load_image_set
from ..evaluation import calibrate, digits_complement
from ..models.target import load_target, model_fingerprint, train_target
from ..metrics import Similarity
from ..pipeline import ProgressFactory, extractor_fingerprints, no_progress, run_audit
from ..runs import RunDir, atomic_save_npz, atomic_write_json, fingerprint_of, read_json, run_lock
from ..summary import metric_values, ratios_to_best_baseline
from ..sweeps import SWEEPABLE, run_with_sweeps, share_stages, sweep_configs
from . import machine_description, write_results
from .tables import render_extraction_markdown

log = logging.getLogger(__name__)

SCHEMA = "side-extract/bench-extraction/1"
N_DIGITS = 1797


def full_run_template() -> cfg.RunConfig:
    """The audit settings of the full benchmark: the paper's SIDE settings, spelled out (so that a change of
    the library's defaults does not change what this benchmark measures), N_G = 2,000 and all methods."""
    return cfg.from_dict(cfg.RunConfig, {
        "sample": {"n": 2000, "steps": 50, "clip_eps": False},
        "features": {"extractor": "pixels-pca"},
        "surrogate": {"n_clusters": 100, "tau": 0.5, "select_k": []},
        "classifier": {"depth": 10, "width": 16, "steps": 1200, "lr": 1e-3, "time_blocks": "first"},
        "clean_classifier": {"depth": 10, "width": 16, "steps": 400, "lr": 1e-3},
        "extract": {"methods": ["side", "side-teacher", "cond", "uncond"], "n": 2000, "seed": 1, "scale": 10.0,
                    "cond_scale": None, "cond_temperature": 1.0, "temperature": 1.0, "t_lo": 0.0, "t_hi": 1.0, "scheduler": "ddim", "eta": 0.0, "steps": 50},
        "evaluate": {"similarity": "rms-l2", "quality": ["pixels"]},  # quality in pixel space only: cheap
    })


def full_target_template() -> cfg.TrainTargetConfig:
    """The full benchmark's target: a (32, 64, 64) UNet, 3,000 steps of batch 64 at every scale.

    At 16x16 this memorizes digits:100 (about half of 64 DDIM samples are copies after 3,000 steps,
    docs/environment figures) and is 1,920 epochs of 100 images, 640 of 300 and 192 of 1,000.
    """
    return cfg.TrainTargetConfig(block_out_channels=(32, 64, 64), layers_per_block=1, steps=3000, batch_size=64,
                                 lr=1e-3, checkpoint_every=1000, seed=0)


@functools.cache
def _most_digits() -> int:
    """The largest class-balanced subset of the digits a scale can ask for."""
    return largest_balanced(load_digits_set().labels)


@dataclasses.dataclass(frozen=True)
class ExtractionBenchConfig:
    """Everything the extraction benchmark runs.

    ``run`` is the audit template: its ``model`` and ``train`` are replaced per scale, and ``run.sweep`` is
    ignored (the sweeps are the fields below). ``target``'s ``data`` and ``resize`` are replaced per scale.
    N_G is ``run.extract.n``; the replicate is ``run.extract.seed``.
    """

    scales: tuple[int, ...] = (100, 300, 1000)
    size: int = 16
    target: cfg.TrainTargetConfig = dataclasses.field(default_factory=full_target_template)
    run: cfg.RunConfig = dataclasses.field(default_factory=full_run_template)
    lambdas: tuple[float, ...] = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
    lambda_methods: tuple[str, ...] = ("side", "cond", "uncond")
    n_clusters: tuple[int, ...] = (25, 50, 100, 200)
    taus: tuple[float, ...] = (0.3, 0.5, 0.7)
    sweep_scale: int | None = None
    sweep_n_generated: int = 500
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.scales or len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales={list(self.scales)} must be distinct training-set sizes (at least one)")
        most = _most_digits()  # (1749..1796 passed, and failed after the smaller scales had done all their work)
        for n in self.scales:
            if not 2 <= n <= most:
                raise ValueError(f"scales: {n} must be between 2 and {most} (a class-balanced subset of the "
                                 f"{N_DIGITS} digits; the rest is the held-out set the bands are calibrated on)")
        if self.size < 8:
            raise ValueError(f"size={self.size} must be >= 8 (the digits are 8x8)")
        if self.sweep_scale is not None and self.sweep_scale not in self.scales:
            raise ValueError(f"sweep_scale={self.sweep_scale} must be one of scales={list(self.scales)}")
        if self.sweep_n_generated <= 0:
            raise ValueError(f"sweep_n_generated={self.sweep_n_generated} must be a positive integer")
        bad = [m for m in self.lambda_methods if m not in cfg.METHODS]
        if bad:
            raise ValueError(f"lambda_methods={list(self.lambda_methods)}: each must be one of {', '.join(cfg.METHODS)}")
        for k in self.n_clusters:
            if not 2 <= k <= self.run.sample.n:
                raise ValueError(f"n_clusters sweep value {k} must be between 2 and run.sample.n={self.run.sample.n}")
        for t in self.taus:
            if not -1.0 <= t <= 1.0:
                raise ValueError(f"taus sweep value {t} must be a cosine similarity in [-1, 1]")
        for lam in self.lambdas:
            if lam < 0:
                raise ValueError(f"lambdas sweep value {lam} must be >= 0")
        # the sweeps' sub-runs as run_sweeps makes them, checked now: a repeated value, two alike to 6 digits, or K
        # swept under surrogate.select_k was refused after every scale up to the sweep scale had run its audit
        # each with the methods run_sweeps gives it: lambda_methods for the lambda sweep (checked with SIDE's, a
        # lambda_methods no method of which reads extract.scale was refused after the audits too), side for K and tau
        side = "side" in self.run.extract.methods  # (the K and tau sweeps run only then)
        checks = []
        if self.lambdas and any(m != "uncond" for m in self.lambda_methods):
            checks.append((tuple(self.lambda_methods), {"scale": self.lambdas}))
        if side:
            checks.append((("side",), {"n_clusters": self.n_clusters, "tau": self.taus}))
        try:
            for methods, swept in checks:
                sweep_configs(dataclasses.replace(self.run, extract=dataclasses.replace(self.run.extract,
                                                                                        methods=methods),
                                                  sweep=cfg.SweepConfig(**swept)))
        except ValueError as e:
            raise ValueError(f"the sweeps (lambdas={list(self.lambdas)}, n_clusters={list(self.n_clusters)}, "
                             f"taus={list(self.taus)}): {e}") from None
        ev = self.run.evaluate
        if ev.bands is not None or ev.bands_file is not None:  # (accepted, then replaced in every run without a word)
            given = f"bands={ev.bands!r}" if ev.bands is not None else f"bands_file={ev.bands_file!r}"
            raise ValueError(f"run.evaluate.{given}: the benchmark calibrates its bands on each training set's held-out "
                             "digits (run.evaluate.calibration_quantiles) and would not read it; leave it out")

    @property
    def chosen_sweep_scale(self) -> int:
        """The scale the sweeps run on: ``sweep_scale``, else the middle of the sorted scales."""
        return self.sweep_scale if self.sweep_scale is not None else sorted(self.scales)[len(self.scales) // 2]


def quick_config() -> ExtractionBenchConfig:
    """``--quick``: 30 and 60 digits at 8x8, a (16, 32) UNet for 400 steps, N_G = 64; a few minutes on 2 cores."""
    clf = {"depth": 10, "width": 16, "steps": 150, "batch_size": 64, "lr": 1e-3, "eval_every": 50, "time_blocks": "first"}
    run = cfg.from_dict(cfg.RunConfig, {
        "sample": {"n": 256, "steps": 20, "clip_eps": False},
        "features": {"extractor": "pixels-pca"},
        "surrogate": {"n_clusters": 16, "tau": 0.5, "select_k": []},
        "classifier": clf,
        "clean_classifier": {k: v for k, v in dict(clf, steps=100).items() if k != "time_blocks"},  # no time input
        "extract": {"methods": ["side", "side-teacher", "cond", "uncond"], "n": 64, "seed": 1, "scale": 10.0,
                    "cond_scale": None, "cond_temperature": 1.0, "temperature": 1.0, "eta": 0.0, "steps": 20},
        "evaluate": {"similarity": "rms-l2", "quality": ["pixels"]},  # quality in pixel space only: cheap
    })
    target = cfg.TrainTargetConfig(block_out_channels=(16, 32), norm_num_groups=16, steps=400, batch_size=64,
                                   checkpoint_every=400)
    return ExtractionBenchConfig(scales=(30, 60), size=8, target=target, run=run, n_clusters=(8, 16, 32),
                                 taus=(0.3, 0.5, 0.7), sweep_n_generated=64, quick=True)


# --------------------------------------------------------------------------------------------------
# per-scale inputs: training set, target, bands


def _tag(n: int, size: int) -> str:
    return f"digits{n}-{size}px"


def training_set(n: int, size: int, cache: Path) -> tuple[ImageSet, Path, ImageSet]:
    """``digits:n`` at ``size`` px (written to ``cache/data/<tag>.npz`` once) and its held-out complement."""
    train = load_image_set(f"digits:{n}", resize_to=None if size == 8 else size)
    path = cache / "data" / f"{_tag(n, size)}.npz"
    if not path.exists():
        atomic_save_npz(path, images=train.images, labels=train.labels, index=train.ids)
    rest = digits_complement(f"digits:{n}", None if size == 8 else size)
    return load_image_set(path), path, rest


def ensure_target(c: cfg.TrainTargetConfig, n: int, size: int, cache: Path, *, device: str = "cpu",
                  progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Train the target of ``c`` for ``digits:n`` at ``size`` px, or reuse the cached one of the same fingerprint."""
    c = dataclasses.replace(c, data=f"digits:{n}", resize=None if size == 8 else size)
    fp = fingerprint_of(cfg.keyed_settings(c))  # (keys added later, at their earlier value, leave it as it was)
    path = cache / "targets" / f"{_tag(n, size)}-{fp[:12]}"
    info_path = cache / "targets" / f"{path.name}.json"

    def finished() -> bool:
        return (path / "training_log.json").exists() and (path / "model_index.json").exists() and info_path.exists()

    trained_now = False
    if not finished():
        # one process trains it, and another that needs it meanwhile (a bench split over processes, started
        # together) waits for it and takes it (it failed at once with the target's RunLocked)
        with run_lock(cache / "targets" / ".training" / path.name, wait=True):
            if not finished():
                trained_now = True
                images = load_image_set(c.data, c.resize)
                t0 = time.time()
                result = train_target(c, images, path, device=device, progress=progress(f"train target n={n}"))
                atomic_write_json(info_path, {"config": cfg.to_dict(c), "fingerprint": fp,
                                              "final_loss": result.final_loss,
                                              "train_seconds": round(time.time() - t0, 1),
                                              "resumed_from": result.resumed_from})
    info = read_json(info_path)
    # the trained model itself (the fingerprint of every run's manifest): training the same config on another
    # machine or thread count can round differently, so two result files share a target only where these agree
    trained = read_json(path / "training_log.json", dict)  # (targets trained before it was recorded lack the keys)
    return {"path": str(path), "fingerprint": fp, "model_sha256": model_fingerprint(path), "config": cfg.to_dict(c),
            "final_loss": info["final_loss"], "train_seconds": info["train_seconds"], "trained_now": trained_now,
            "epochs": round(c.steps * c.batch_size / n, 1),
            "trained_with": {k: trained[k] for k in ("torch_threads", "device", "platform", "resumed_from", "versions")
                             if k in trained}}


def ensure_bands(train: ImageSet, heldout: ImageSet, c: cfg.EvaluateConfig, cache: Path, tag: str, *,
                 model: str | None = None, device: str = "cpu") -> Path:
    """Bands from the held-out null, calibrated once per training set and feature space:
    ``cache/bands/<tag>-<fp>/bands.json``. A similarity's TorchScript file counts by its bytes and ``cosine:unet``'s
    target by its weights (both were counted by their paths: another network saved under the same path was
    served the old one's bands, which every run then scored against)."""
    keep = {"similarity": c.similarity, "quantiles": list(c.calibration_quantiles), "resize": c.resize}
    unet = model_fingerprint(model) if c.similarity == "cosine:unet" and model else None
    files = extractor_fingerprints(Similarity(c.similarity).extractor)
    fp = fingerprint_of(keep, train.fingerprint(), heldout.fingerprint(), unet, *files)  # (pixel bands: the same name)
    directory = cache / "bands" / f"{tag}-{fp[:12]}"
    if not (directory / "bands.json").exists():
        feature_model = load_target(model, device) if c.similarity == "cosine:unet" and model else None
        calibrate(train, heldout, c, feature_model=feature_model, device=device).write(directory)
    return directory / "bands.json"


# --------------------------------------------------------------------------------------------------
# ratios


def compact(metrics: dict[str, Any]) -> dict[str, Any]:
    """A metrics.json without its bulky parts (N_G law curves, config, versions), for sweep tables."""
    return {k: v for k, v in metrics.items() if k not in ("ng_law", "config", "versions", "fingerprints", "null")}


# --------------------------------------------------------------------------------------------------
# the benchmark


@dataclasses.dataclass(frozen=True)
class ScaleInputs:
    """What every run on one training-set size reads: its training set, trained target and bands."""

    n_train: int
    train_path: Path
    target: dict[str, Any]
    bands: Path

    def run_config(self, template: cfg.RunConfig) -> cfg.RunConfig:
        """``template`` pointed at this scale's target, training set and bands (its sweeps dropped)."""
        ev = dataclasses.replace(template.evaluate, bands_file=str(self.bands), bands=None)
        return dataclasses.replace(template, model=self.target["path"], train=str(self.train_path), evaluate=ev,
                                   sweep=cfg.SweepConfig())

    def replicate_run(self, cache: Path, r: int) -> Path:
        """``cache/runs/<target>/rep-<r>``: the run directory of replicate ``r`` (see :func:`replicate_config`),
        which shares nothing with other replicates but the target, the training set and the bands."""
        return cache / "runs" / Path(self.target["path"]).name / f"rep-{r}"


def check_entry_name(name: object, what: str) -> None:
    """A variant's or form's name is a folder of the benchmark (``rep-r/forms/<name>``): one plain name, so that
    ``..`` or ``../rep-3`` cannot run it in its replicate's own folder or another replicate's."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"{what} name {name!r} must be non-empty, without '/', not starting with '.'")


def check_replicate(r: object, name: str) -> None:
    """A replicate number is every downstream seed (:func:`replicate_config`): an integer in [0, 2**32), checked
    before a benchmark trains anything (2**32 was refused by the seeds' own check after the target was trained and
    the validation replicate run)."""
    cfg.check_int(r, name)
    if r >= 2**32:
        raise ValueError(f"{name}={r} must be an integer in [0, 2**32) (it seeds every stage of its replicate)")


# what a benchmark measures every entry with alike, so no variant or form may change it: the target, the training
# set, N_G, the extraction seed, the methods run, dedup-driven stopping (it changes a method's budget), the
# measurement and sweeps (bench variants' FIXED, bench fair's forms)
MEASURED_ALIKE = ("model", "train", "train_resize", "extract.n", "extract.seed", "extract.methods",
                  "extract.stop_unseen", "evaluate", "sweep")
# the extraction settings that change unguided samples too (precision: bf16 moved 40 of 256 pixels of UnCond's
# samples, and a variant at bf16 was scored against baselines made at fp32)
SAMPLER_KEYS = ("scheduler", "steps", "eta", "precision")


def replicate_config(rc: cfg.RunConfig, r: int) -> cfg.RunConfig:
    """Replicate ``r`` of ``rc``: every seed downstream of the target set to ``r`` (the synthetic set, the K-means
    fit, both classifiers, side-lora's fine-tuning, the extraction noise and targets), so that a setting tuned on one replicate is tested
    on a new clustering and new classifiers, not only on new extraction noise."""
    check_replicate(r, "replicate")
    return dataclasses.replace(
        rc,
        sample=dataclasses.replace(rc.sample, seed=r),
        surrogate=dataclasses.replace(rc.surrogate, random_state=r),
        classifier=dataclasses.replace(rc.classifier, seed=r),
        clean_classifier=dataclasses.replace(rc.clean_classifier, seed=r),
        lora=dataclasses.replace(rc.lora, seed=r),
        extract=dataclasses.replace(rc.extract, seed=r),
    )


def scale_inputs(bc: ExtractionBenchConfig, n: int, cache: Path, *, device: str = "cpu",
                 progress: ProgressFactory = no_progress) -> ScaleInputs:
    """The training set, target (trained or from the cache) and bands (calibrated once) of ``digits:n``."""
    train, train_path, heldout = training_set(n, bc.size, cache)
    target = ensure_target(bc.target, n, bc.size, cache, device=device, progress=progress)
    bands = ensure_bands(train, heldout, bc.run.evaluate, cache, _tag(n, bc.size), model=target["path"], device=device)
    return ScaleInputs(n, train_path, target, bands)


def _stage_seconds(run: Path) -> dict[str, float]:
    return {k: v.get("seconds") for k, v in RunDir(run).manifest()["stages"].items() if not v.get("shared_from")}


def run_sweeps(bc: ExtractionBenchConfig, main_run: Path, rc: cfg.RunConfig, *, device: str = "cpu",
               progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Lambda sweep of ``lambda_methods`` and K / tau sweeps of ``side`` at ``sweep_n_generated``.

    Each sweep has a parent run (``main_run/bench-lambda``, ``main_run/bench-surrogate``) that first shares
    every complete stage of the main run (synthetic set, labels, classifiers, teacher) and then runs its
    own sub-runs; a swept value equal to the parent's own is read from the parent, not recomputed.
    """
    n_g = bc.sweep_n_generated
    out: dict[str, Any] = {"n_generated": n_g}
    t0 = time.time()
    lam_methods = tuple(m for m in bc.lambda_methods if m in cfg.METHODS)
    if bc.lambdas and any(m != "uncond" for m in lam_methods):
        parent = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, n=n_g, methods=lam_methods),
                                     sweep=cfg.SweepConfig(scale=tuple(v for v in bc.lambdas if v != rc.extract.scale)))
        out["scale"] = _sweep(main_run / "bench-lambda", main_run, parent, "scale", rc.extract.scale, bc.lambdas,
                              device=device, progress=progress)
    if "side" in rc.extract.methods and (bc.n_clusters or bc.taus):
        surrogate_sweep = cfg.SweepConfig(n_clusters=tuple(v for v in bc.n_clusters if v != rc.surrogate.n_clusters),
                                          tau=tuple(v for v in bc.taus if v != rc.surrogate.tau))
        parent = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, n=n_g, methods=("side",)),
                                     sweep=surrogate_sweep)
        both = _sweep(main_run / "bench-surrogate", main_run, parent, None, None, (), device=device, progress=progress)
        for name, own, values in (("n_clusters", rc.surrogate.n_clusters, bc.n_clusters),
                                  ("tau", rc.surrogate.tau, bc.taus)):
            if values:
                pts = {p["value"]: p for p in both["points"] if p["name"] == name}
                pts[own] = dict(both["parent"], name=name, value=own)
                out[name] = {"run": both["run"], "points": [pts[v] for v in sorted(pts)]}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _sweep(path: Path, main_run: Path, rc: cfg.RunConfig, name: str | None, own: Any, values: tuple, *,
           device: str, progress: ProgressFactory) -> dict[str, Any]:
    share_stages(RunDir(main_run), RunDir(path))
    parent, subs = run_with_sweeps(path, rc, device=device, progress=progress)
    guided = {m: compact(v) for m, v in parent.metrics.items() if m != "uncond"}
    points = []
    configs = dict(sweep_configs(rc))  # (read back from the folder's name, 2.00000025 was 2.0: its point dropped)
    for sub_name, res in subs.items():
        key = sub_name.split("=", 1)[0]
        value = getattr(getattr(configs[sub_name], SWEEPABLE[key]), key)  # the value the sub-run was made with
        points.append({"name": key, "value": value, "run": str(res.run),
                       "methods": {m: compact(v) for m, v in res.metrics.items()}})
    result: dict[str, Any] = {"run": str(path), "parent": {"run": str(path), "methods": guided}}
    if "uncond" in parent.metrics:
        result["uncond"] = compact(parent.metrics["uncond"])
    if name is None:
        result["points"] = points
        return result
    by_value = {p["value"]: p for p in points}
    by_value[own] = dict(result["parent"], name=name, value=own)
    result["points"] = [by_value[v] for v in sorted(set(values) | {own}) if v in by_value]
    return result


def refuse_stopping(ex: cfg.ExtractConfig, bench: str) -> None:
    """This benchmark compares methods at equal N_G and records N_G as each one's budget: dedup-driven stopping
    (which ends methods at different budgets) belongs to ``side bench fair --stop-unseen``."""
    if ex.stop_unseen > 0:
        raise ValueError(f"{bench}: extract.stop_unseen={ex.stop_unseen} is not supported here (it compares methods at "
                         "equal N_G); use side bench fair --stop-unseen")


def run_extraction_bench(bc: ExtractionBenchConfig, cache: str | Path, *, device: str = "cpu",
                         progress: ProgressFactory = no_progress, command: str | None = None) -> dict[str, Any]:
    """Run the benchmark (reusing what ``cache`` holds) and return the results dict (see the module docstring)."""
    refuse_stopping(bc.run.extract, "side bench extraction")
    cache = Path(cache)
    t_start = time.time()
    data: dict[str, Any] = {"schema": SCHEMA, "quick": bc.quick, "command": command, "machine": machine_description(),
                            "seed": bc.run.extract.seed, "size": bc.size, "config": cfg.to_dict(bc), "scales": []}
    sweep_at = bc.chosen_sweep_scale
    for n in sorted(bc.scales):
        log.info("scale n_train=%d", n)
        t0 = time.time()
        inputs = scale_inputs(bc, n, cache, device=device, progress=progress)
        rc = replicate_config(inputs.run_config(bc.run), bc.run.extract.seed)
        run_path = inputs.replicate_run(cache, bc.run.extract.seed)
        t_audit = time.time()
        result = run_audit(run_path, rc, device=device, progress=progress)
        entry: dict[str, Any] = {
            "n_train": n, "n_generated": rc.extract.n, "methods": result.metrics,
            "ratios": ratios_to_best_baseline(result.metrics), "target": inputs.target,
            "bands": read_json(inputs.bands)["bands"],
            "run": str(run_path), "audit_seconds": round(time.time() - t_audit, 1),
            "stage_seconds": _stage_seconds(run_path),
        }
        if n == sweep_at:
            entry["sweeps"] = run_sweeps(bc, run_path, rc, device=device, progress=progress)
        entry["seconds"] = round(time.time() - t0, 1)
        data["scales"].append(entry)
    data["seconds"] = round(time.time() - t_start, 1)
    return data


def write_extraction_results(data: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``extraction.json`` + ``extraction.md`` (``extraction-quick.*`` for a ``--quick`` run) in ``out``."""
    return write_results(out, "extraction-quick" if data.get("quick") else "extraction", data, render_extraction_markdown)


__all__ = ["ExtractionBenchConfig", "quick_config", "full_run_template", "full_target_template",
           "run_extraction_bench", "write_extraction_results", "ratios_to_best_baseline", "metric_values",
           "ScaleInputs", "scale_inputs", "replicate_config", "render_extraction_markdown", "training_set", "ensure_target", "ensure_bands", "run_sweeps", "compact"]
