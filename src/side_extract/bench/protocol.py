"""The fair benchmark protocol (``side bench fair``): replicates, an equal tuning budget, intervals.

A **replicate** ``r`` redraws everything downstream of the target: the synthetic set (``sample.seed``), the
K-means fit (``surrogate.random_state``), both classifiers (``classifier.seed``, ``clean_classifier.seed``),
side-lora's fine-tune (``lora.seed``) and the extraction noise and targets (``extract.seed``), all set to ``r``
(the extraction draws from its own noise stream, ``sampling.EXTRACTION_STREAM``, so it does not repeat the
synthetic set's noise). Each replicate of each scale is its own run directory, ``CACHE/runs/<target>/rep-<r>``;
the target, the training set and the bands are shared (they are what is audited, not what is drawn). A run
directory another process holds (a bench split over processes, each running other entries) is waited for.

For each training-set size in ``scales``:

1. **Tuning, on validation replicates.** Every guided method (SIDE, SIDE-teacher, Cond) gets the same grid
   of (lambda, temperature) settings (side-lora as many CFG scales w, memorization guidance as many lambdas)
   at ``validation_n`` generations (by default the reported N_G: a guided method's lead over plain sampling
   is largest at small budgets, so settings tuned at fewer generations than are reported favour forceful
   guidance that saturates by N_G); UnCond has no setting on this sampler. Each method's chosen setting
   maximizes ``select_metric`` averaged over the validation replicates (ties: the smaller lambda, then the
   smaller temperature). Each validation run's metrics are kept in ``CACHE/validation-runs`` under the key of
   what they depend on (:func:`validation_key`), so running the bench again, or with one more form, makes only
   the runs it has not made before.
2. **Report, on held-out replicates** (none of them seen in step 1): every method at its chosen setting, at
   N_G = ``run.extract.n``, with equal seeds across methods within a replicate.
3. **Intervals.** Per method and metric, the mean and the min-max over held-out replicates. For each SIDE
   form against the best baseline (the baseline with the higher mean on that metric), the ratio of means and
   a 95 % interval of its log (:mod:`side_extract.bench.intervals`): its half-width the wider of the replicates'
   (their spread, paired by replicate, delta method, times Student's t at R - 1 df) and the resampling's (1.96
   times the standard error of resampling each replicate's generations, ``n_bootstrap`` draws: the shares by plain
   resampling; the distinct-image counts, which plain resampling lowers, by iNEXT's assemblage bootstrap)
   (:func:`~side_extract.bench.intervals.spread_interval`). Bootstrapped metrics are
   computed from ``per_generation.npz``: ``ams_cum/<band>`` (share of generations at that band or closer),
   ``distinct_nn/<band>`` (distinct *nearest* training images among those generations, per generation: UMS
   restricted to each generation's nearest neighbour, so at most UMS) and ``carlini`` (share with Carlini's
   ratio < 1). The headline entry, the best SIDE form (and the best label-free entry), is the one whose chosen
   setting scored highest in step 1 (:func:`chosen_on_validation`), not the one with the highest held-out mean.
4. **Budget curve.** Generation ``i`` of a run depends on (seed, i) alone, so a run's first ``n`` generations
   *are* the run at N_G = ``n``. The distinct-image ratios are re-read on such prefixes (``budget_grid``:
   N_G/10, 3 N_G/10, the training-set size when below N_G, and N_G), with the same bootstrap: plain sampling
   keeps finding new images as N_G grows while a guided method may saturate, so one N_G alone can mislead.
   (With ``extract.allocation: adaptive`` a prefix is the first generations of the full budget's rounds, not
   a run at that N_G.)
5. **Equal model samples** (``equal_samples``, on by default). The comparison above is per generation checked (the
   paper's): at equal N_G. A SIDE form also draws its synthetic set (N_S = ``sample.n`` samples) from the target
   first. On every held-out replicate UnCond also runs at N_G + N_S generations (``rep-<r>/forms/uncond-samples``;
   its first N_G generations are its N_G run, same seed and noise stream), and each form's distinct images at N_G
   are set against that count (memorization guidance draws no synthetic set: its equal-samples comparison is
   the per-generation one), with the same distinct-count interval: plain sampling given every model sample the audit drew
   (not counting the memorization scores or the classifiers' training).
6. **Dedup-driven stopping** (``extract.stop_unseen`` > 0, ``--stop-unseen``: off by default). The same label-free
   policy for every method, UnCond included: each generates in rounds and stops after the first round at whose end
   the unseen mass of its generations so far falls below the threshold (``allocation.stop_after``), so N_G is a
   ceiling; every method then runs in rounds, so a run's first n generations are its first rounds, not a run at
   N_G = n (the budget curve marks them). Tuning
   scores each setting per N_G asked for (a method gains nothing by stopping early), the table reports the
   generations each method made, and the distinct-image counts are counts within them.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as cfg
from ..data import load_shards
from ..metrics import read_bands_file
from ..evaluation import neighbor_index
from ..pipeline import (ProgressFactory, cluster_problems, config_extractor_fingerprints, copy_guard, no_progress,
                        run_audit)
from ..runs import (STAGE_VERSIONS, RunDir, atomic_write_json, npz_arrays, read_json, settings_fingerprint,
                    versions)
from ..sweeps import share_stages
from ..summary import BASELINES, LABEL_FREE, SIDE_METHODS, per_budget
from . import machine_description, write_results
from .tables import _preamble
from .intervals import INTERVAL_METHOD, bootstrap_ratios, count_ratios, distinct_count, per_generation_stats
from .extraction import (MEASURED_ALIKE, SAMPLER_KEYS, ExtractionBenchConfig, ScaleInputs, check_entry_name,
                         check_replicate, full_run_template, replicate_config, scale_inputs)

log = logging.getLogger(__name__)

SCHEMA = "side-extract/bench-fair/1"
EQUAL_SAMPLES = "uncond-samples"  # UnCond at N_G + N_S: the sub-run of step 5 (module docstring)
GUIDED = ("side", "side-teacher", "cond")
SIDE_FORMS = SIDE_METHODS
BOOT_METRICS = ("distinct_nn/high", "distinct_nn/mid", "ams_cum/high", "ams_cum/mid", "carlini")
MIN_BOOTSTRAP = 10  # resampling draws the intervals' standard deviation needs (fewer draws: a spread of 0, or half)


@dataclasses.dataclass(frozen=True)
class FairBenchConfig:
    """What ``side bench fair`` runs (see the module docstring)."""

    bench: ExtractionBenchConfig = dataclasses.field(default_factory=ExtractionBenchConfig)
    methods: tuple[str, ...] = ("side", "side-teacher", "cond", "uncond")
    scales_grid: tuple[float, ...] = (1.0, 3.0, 10.0)
    temperatures: tuple[float, ...] = (1.0, 2.0)
    validation_replicates: tuple[int, ...] = (1, 2)
    heldout_replicates: tuple[int, ...] = (11, 12, 13)
    validation_n: int | None = None  # None: N_G of the report (``bench.run.extract.n``)
    select_metric: str = "ums_cumulative/mid"
    n_bootstrap: int = 1000
    forms: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    lora_scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    memguide_scales: tuple[float, ...] = (10.0, 20.0, 30.0, 60.0, 100.0, 200.0)
    equal_samples: bool = True

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in cfg.METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods={list(self.methods)}: each must be one of {', '.join(cfg.METHODS)}")
        if not self.scales_grid or any(not np.isfinite(v) or v < 0 for v in self.scales_grid):
            raise ValueError(f"scales_grid={list(self.scales_grid)} must be finite lambdas >= 0 (at least one)")
        if not self.temperatures or any(not np.isfinite(v) or v <= 0 for v in self.temperatures):
            raise ValueError(f"temperatures={list(self.temperatures)} must be finite and > 0 (at least one)")
        if not self.validation_replicates or not self.heldout_replicates:
            raise ValueError("validation_replicates and heldout_replicates must each name at least one replicate")
        for name, reps in (("validation_replicates", self.validation_replicates),
                           ("heldout_replicates", self.heldout_replicates)):
            for r in reps:
                check_replicate(r, name)
            if len(set(reps)) != len(reps):  # (a repeat counts one replicate twice: no spread)
                raise ValueError(f"{name}={list(reps)} must be distinct replicate numbers")
        shared = set(self.validation_replicates) & set(self.heldout_replicates)
        if shared:
            raise ValueError(f"replicates {sorted(shared)} are both validation and held-out; they must differ")
        if self.validation_n is None:  # tune at the budget that is reported (see the module docstring)
            object.__setattr__(self, "validation_n", self.bench.run.extract.n)
        if self.validation_n <= 0:
            raise ValueError(f"validation_n={self.validation_n} must be positive")
        if self.n_bootstrap < MIN_BOOTSTRAP:  # (1 draw's spread is 0, 2 draws' about half the real one: the interval
            # was the replicates' alone, under a caption saying it was the wider of the two)
            raise ValueError(f"n_bootstrap={self.n_bootstrap} must be at least {MIN_BOOTSTRAP}: the intervals take "
                             "the resampling's standard deviation from its draws (the default is 1000)")
        object.__setattr__(self, "forms", {name: _dotted_form(name, form) for name, form in self.forms.items()})
        for name, form in self.forms.items():
            check_entry_name(name, "form")  # (its folder: '..' ran it in its replicate's own)
            kinds = SIDE_FORMS + LABEL_FREE + BASELINES
            if name in cfg.METHODS or name == EQUAL_SAMPLES or form.get("method") not in kinds:
                raise ValueError(f"forms: {name!r} must be a new name with 'method' one of {', '.join(kinds)}; "
                                 f"got {form}")
            fixed = MEASURED_ALIKE + (() if form["method"] in BASELINES else SAMPLER_FIXED) + STOPPING_KEYS * (
                self.bench.run.extract.stop_unseen > 0)  # (under stopping, its rounds and threshold are every method's)
            pinned = [k for k in form if k.rsplit(".", 1)[-1] in ("seed", "random_state")
                      or any(k == f or k.startswith(f + ".") for f in fixed)]
            if pinned:  # a seed would repeat one replicate; the rest is what every entry is measured with alike
                raise ValueError(f"forms: {name!r} may not set {', '.join(pinned)} (the replicate sets every seed; the "
                                 "target, the training set, N_G, its stopping and the bands are the benchmark's; so is "
                                 "the extraction's sampler (--eta), which only a baseline form may change: a stronger "
                                 "baseline to pick from)")
            tuned = [k for k in form if k in GRID_KEYS]
            if tuned:  # (the grid's value replaced it without a word, while fair.json recorded the form's)
                raise ValueError(f"forms: {name!r} may not set {', '.join(tuned)}: the tuning grid sets it (--lambdas, "
                                 "--temperatures, --lora-scales, --memguide-scales)")
            overrides = {k: v for k, v in form.items() if k != "method"}
            try:
                form_rc = method_config(self.bench.run, form["method"], None, self.validation_n, overrides)
            except ValueError as e:
                raise ValueError(f"forms: {name!r}: {e}") from None
            if problems := cluster_problems(form_rc, (form["method"],)):  # (found at the form's first run, after the
                # target was trained and the entries before it had run)
                raise ValueError(f"forms: {name!r}: " + "; ".join(problems))
            inert_keys = cfg.inert_keys(form_rc)
            inert = [text for key, text in inert_keys.items() if key in overrides]
            if inert and len(inert) == len(overrides):  # it would make its method's runs again (or the same ones)
                raise ValueError(f"forms: {name!r} changes nothing its runs read: {'; '.join(inert)}")
            if inert:
                log.warning("forms: %r sets what its runs do not read: %s", name, "; ".join(inert))
        if not self.baselines and self.compared:
            raise ValueError(f"methods={list(self.methods)}: every entry is set against the best baseline; add cond "
                             "or uncond")
        if len(self.heldout_replicates) < 2:
            raise ValueError(f"heldout_replicates={list(self.heldout_replicates)}: at least 2 are needed (the interval "
                             "takes in the replicates' spread; one replicate is a single run)")
        for name in ("scales_grid", "temperatures", "lora_scales", "memguide_scales"):
            values = list(getattr(self, name))
            if len(set(values)) != len(values):  # (a setting tried twice is one fewer tried: an unequal budget)
                raise ValueError(f"{name}={values} repeats a value; each setting of the tuning grid is tried once")
            if len({f"{v:g}" for v in values}) != len(values):  # (the tuning's scores are keyed by "lambda,T")
                raise ValueError(f"{name}={values}: two values are the same to 6 significant digits, which the "
                                 "tuning's scores are keyed by; give values that differ there")
        if self.uses("side-lora"):
            if len(self.lora_scales) != len(self.grid):
                raise ValueError(f"lora_scales has {len(self.lora_scales)} values; side-lora gets the same tuning "
                                 f"budget as the other methods: {len(self.grid)}")
        if self.uses("memguide"):
            if len(self.memguide_scales) != len(self.grid):
                raise ValueError(f"memguide_scales has {len(self.memguide_scales)} values; memguide gets the same "
                                 f"tuning budget as the other methods: {len(self.grid)}")
            if any(not np.isfinite(v) or v < 0 for v in self.memguide_scales):
                raise ValueError(f"memguide_scales={list(self.memguide_scales)} must be finite lambdas >= 0")
        key, _, band = self.select_metric.partition("/")
        if key not in ("ams", "ums", "ams_cumulative", "ums_cumulative") or not band:
            raise ValueError(f"select_metric={self.select_metric!r} must be '<ams|ums|ams_cumulative|"
                             "ums_cumulative>/<band>', e.g. 'ums_cumulative/mid'")
        ev = self.bench.run.evaluate
        # the bands every run is scored in: calibrated per scale (the bench refuses bands of its own)
        names = (["high", "mid", "low"] if len(ev.calibration_quantiles) == 3 or ev.similarity.startswith(
            "cosine:torchscript") else [f"tail{q:g}" for q in ev.calibration_quantiles])
        if band not in names:  # (found at the first tuning run's metrics, as a KeyError)
            raise ValueError(f"select_metric={self.select_metric!r}: band {band!r} is not one of the run's bands "
                             f"({', '.join(names)})")
        if not {"high", "mid"} <= set(names):  # (a KeyError after every run, at the report)
            raise ValueError(f"the run's bands ({', '.join(names)}) must include 'high' and 'mid', which the "
                             "benchmark's tables report: give three calibration_quantiles")
        # every setting of every entry's grid, as its runs will be configured (a bad --lora-scales value, or a form's
        # lora.label_dropout 0 under w != 1, failed in the tuning, after the targets trained and earlier runs ran)
        grid_of = {"side-lora": "lora_scales", "memguide": "memguide_scales"}
        for name in self.entries:
            form = {k: v for k, v in self.forms.get(name, {}).items() if k != "method"}
            for setting in self.settings(name) or [None]:
                try:
                    for n in dict.fromkeys((self.validation_n, self.bench.run.extract.n)):  # (tuned, reported)
                        method_config(self.bench.run, self.base_method(name), setting, n, form)
                except ValueError as e:
                    option = grid_of.get(self.base_method(name), "scales_grid x temperatures")
                    raise ValueError(f"{name}: the setting {setting} of its tuning grid ({option}) is refused: {e}"
                                     ) from None

    @property
    def grid(self) -> list[tuple[float, float]]:
        return [(s, t) for s in self.scales_grid for t in self.temperatures]

    @property
    def entries(self) -> list[str]:
        """Everything compared: the methods, then the forms."""
        return list(self.methods) + list(self.forms)

    @property
    def baselines(self) -> tuple[str, ...]:
        """The entries the others are set against: Cond, UnCond and their forms (a baseline form gives a baseline
        more to choose from, e.g. the same tuning budget as several SIDE forms); the best is the one with the
        higher held-out mean."""
        return tuple(m for m in self.entries if self.base_method(m) in BASELINES)

    @property
    def compared(self) -> tuple[str, ...]:
        """The entries set against the best baseline: the SIDE forms and the label-free ones."""
        return tuple(m for m in self.entries if self.base_method(m) not in BASELINES)

    def base_method(self, name: str) -> str:
        return self.forms[name]["method"] if name in self.forms else name

    def uses(self, method: str) -> bool:
        """Whether an entry (a method, or a form of it) runs ``method``."""
        return any(self.base_method(m) == method for m in self.entries)

    def settings(self, name: str) -> list[tuple[float, float]]:
        """The tuning grid of a method or form: (lambda, temperature), or (w, 0) for side-lora (CFG scale w), or
        (lambda, 0) for memguide."""
        if self.base_method(name) == "side-lora":
            return [(w, 0.0) for w in self.lora_scales]
        if self.base_method(name) == "memguide":
            return [(lam, 0.0) for lam in self.memguide_scales]
        return self.grid if self.base_method(name) in GUIDED else []


# what no form may set, beside every seed: what every entry is measured with alike (extraction.MEASURED_ALIKE); the
# extraction's sampler, which a baseline form may change (it can only give the best baseline more to pick from, so
# a SIDE form's ratio never rests on a sampler its baselines lacked); and what the tuning grid sets (method_config)
SAMPLER_FIXED = tuple(f"extract.{k}" for k in SAMPLER_KEYS)
# what dedup-driven stopping reads beside extract.stop_unseen: with --stop-unseen no form may change them (a form's
# smaller dedup_threshold never stopped while the baselines stopped at the bench's, and fewer rounds checked later)
STOPPING_KEYS = ("extract.dedup_threshold", "extract.rounds")
GRID_KEYS = ("extract.scale", "extract.temperature", "extract.cond_scale", "extract.cond_temperature",
             "extract.teacher_scale", "extract.teacher_temperature", "extract.memguide_scale", "lora.guidance_scale")


def _dotted_form(name: str, form: Any) -> dict[str, Any]:
    """A form as ``{"method": ..., dotted.key: value}``: nested mappings (``sample: {seed: 7}``, as YAML reads
    ``--form f=side,sample={seed: 7}``) spelled out as dotted keys, so that every check on a form's keys sees
    them (they had passed the refusal of seeds, N_G and the bands)."""
    if not isinstance(form, dict):
        raise ValueError(f"forms: {name!r} must be a mapping of its method and settings, got {form!r}")
    try:
        overrides = cfg.nested_to_dotted(cfg.dotted_to_nested({k: v for k, v in form.items() if k != "method"}))
    except ValueError as e:
        raise ValueError(f"forms: {name!r}: {e}") from None
    return {"method": form.get("method"), **overrides}


def method_config(rc: cfg.RunConfig, method: str, setting: tuple[float, float] | None, n: int,
                  overrides: dict[str, Any] | None = None) -> cfg.RunConfig:
    """``rc`` running ``method`` alone at N_G ``n`` with its setting ((lambda, temperature); side-lora: (w, _))
    and a form's dotted ``overrides`` (e.g. ``{"classifier.guidance_input": "x0_hat"}``)."""
    if overrides:
        rc = cfg.from_dict(cfg.RunConfig, cfg.merge(cfg.to_dict(rc), cfg.dotted_to_nested(overrides)))
    ex = dataclasses.replace(rc.extract, methods=(method,), n=n)
    if setting is not None:
        lam, temp = setting
        if method == "cond":
            ex = dataclasses.replace(ex, cond_scale=lam, cond_temperature=temp)
        elif method == "side-lora":
            rc = dataclasses.replace(rc, lora=dataclasses.replace(rc.lora, guidance_scale=lam))
        elif method == "memguide":
            ex = dataclasses.replace(ex, memguide_scale=lam)
        elif method == "side-teacher":
            ex = dataclasses.replace(ex, teacher_scale=lam, teacher_temperature=temp)
        else:
            ex = dataclasses.replace(ex, scale=lam, temperature=temp)
    return dataclasses.replace(rc, extract=ex)


def entry_run(fc: FairBenchConfig, name: str, rc: cfg.RunConfig, setting: tuple[float, float] | None, n: int,
              rep: Path) -> tuple[Path, cfg.RunConfig]:
    """Where and how a method or form runs on one replicate: a form in ``rep/forms/<name>``, which first shares
    the replicate's finished stages (synthetic set, clusters, ...) so it redoes only what its overrides change."""
    if name not in fc.forms:
        return rep, method_config(rc, name, setting, n)
    form = {k: v for k, v in fc.forms[name].items() if k != "method"}
    path = rep / "forms" / name
    if (rep / RunDir.MANIFEST).exists():  # every time: a stage the replicate made again since replaces its old share
        share_stages(RunDir(rep), RunDir(path))  # (the form made them again itself, from the stale copies)
    return path, method_config(rc, fc.forms[name]["method"], setting, n, form)


def _metric(metrics: dict[str, Any], name: str) -> float:
    key, _, band = name.partition("/")
    return float(metrics[key][band])


def tuning_score(metrics: dict[str, Any], select_metric: str, n_asked: int) -> float:
    """What tuning maximizes for one run: ``select_metric`` per generation *asked for* (``summary.per_budget``), so
    that a method stopped early by dedup-driven stopping gains nothing by making fewer."""
    return _metric(per_budget(metrics, n_asked), select_metric)


def tune(fc: FairBenchConfig, inputs: ScaleInputs, cache: Path, *, device: str = "cpu",
         progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Step 1: every guided method over the same grid on the validation replicates; the chosen settings."""
    base = inputs.run_config(fc.bench.run)
    scores: dict[str, dict[str, list[float]]] = {m: {} for m in fc.entries if fc.settings(m)}
    made: dict[str, str] = {}
    kept = 0
    for r in fc.validation_replicates:
        rc = replicate_config(base, r)
        rep = inputs.replicate_run(cache, r)
        # setting by setting, every entry at each (every grid has the same length): an entry that repeats another
        # one's runs is found at the first setting, not after the grids of every entry before it
        for i in range(len(fc.grid)):
            for m in scores:
                setting = fc.settings(m)[i]
                path, mrc = entry_run(fc, m, rc, setting, fc.validation_n, rep)
                key = validation_key(mrc, inputs)
                stored = kept_validation_run(cache, inputs, r, key)
                if stored is None:
                    res = run_audit(path, mrc, device=device, progress=progress, wait=True)
                    stored = {"metrics": res.metrics[fc.base_method(m)],
                              "extraction": made_extraction(fc, m, path)}
                    keep_validation_run(cache, inputs, r, key, stored)
                else:
                    kept += 1
                check_distinct_runs(fc, made, m, stored["extraction"])
                scores[m].setdefault(_setting_key(setting), []).append(
                    tuning_score(stored["metrics"], fc.select_metric, fc.validation_n))
    chosen: dict[str, list[float] | None] = {m: None for m in fc.entries if not fc.settings(m)}
    table: dict[str, dict[str, float]] = {}
    for m, by_setting in scores.items():
        means = {k: float(np.mean(v)) for k, v in by_setting.items()}
        table[m] = means
        best = best_setting(fc.settings(m), means)
        chosen[m] = [best[0], best[1]]
    return {"replicates": list(fc.validation_replicates), "n_generated": fc.validation_n,
            "select_metric": fc.select_metric, "mean_by_setting": table, "chosen": chosen,
            "runs": sum(len(v) for by in scores.values() for v in by.values()), "runs_kept": kept}


VALIDATION_RUNS = "validation-runs"


def validation_key(mrc: cfg.RunConfig, inputs: ScaleInputs) -> str:
    """What a validation run's metrics depend on: its config with the files it names (by their contents; a
    directory by its files' names, sizes and times), the target's weights, the stage versions of the code and the
    revisions of the feature extractors it names."""
    return settings_fingerprint(mrc, inputs.target.get("model_sha256"), dict(STAGE_VERSIONS),
                                *config_extractor_fingerprints(mrc))


def _kept_path(cache: Path, inputs: ScaleInputs, r: int, key: str) -> Path:
    return cache / VALIDATION_RUNS / Path(inputs.target["path"]).name / f"rep-{r}" / f"{key}.json"


def kept_validation_run(cache: Path, inputs: ScaleInputs, r: int, key: str) -> dict[str, Any] | None:
    """A validation run made before with the same ``key`` (:func:`validation_key`): its method's metrics and its
    extraction stage's fingerprint. A replicate's run directory keeps only its last extraction, so without these a
    fair bench run again (with one more form, say) would remake every setting of its grid."""
    path = _kept_path(cache, inputs, r, key)
    if not path.is_file():
        return None
    try:
        kept = read_json(path)
    except (OSError, ValueError) as e:
        log.warning("%s: not a kept validation run (%s); the run is made again", path, e)
        return None
    if not (isinstance(kept, dict) and kept.get("key") == key and isinstance(kept.get("metrics"), dict)):
        log.warning("%s: not a kept validation run of this key; the run is made again", path)
        return None
    log.info("validation run %s: kept from an earlier fair bench (%s)", key[:12], path)
    return kept


def keep_validation_run(cache: Path, inputs: ScaleInputs, r: int, key: str, run: dict[str, Any]) -> None:
    atomic_write_json(_kept_path(cache, inputs, r, key), {"key": key, **run})


def made_extraction(fc: FairBenchConfig, name: str, path: Path) -> str | None:
    """The fingerprint of entry ``name``'s extraction stage in the run directory ``path`` (its last run)."""
    return (RunDir(path).stage_entry(f"extraction/{fc.base_method(name)}") or {}).get("fingerprint")


def check_distinct_runs(fc: FairBenchConfig, made: dict[str, str], name: str, fp: str | None) -> None:
    """Refuse entry ``name`` when the run it just made (its extraction stage's fingerprint ``fp``) is another
    entry's (``made``: extraction stage fingerprint -> entry, filled here): a form whose overrides change nothing its
    method reads (e.g. a Cond form with ``surrogate.*`` keys: Cond is guided by the training set's own labels) makes
    the same generations, and would count as more tuning budget and one more row without being either."""
    other = made.setdefault(fp, name) if fp else name
    if other != name:
        keys = sorted(k for k in {**fc.forms.get(name, {}), **fc.forms.get(other, {})} if k != "method")
        raise ValueError(f"forms: {name!r} makes exactly the generations {other!r} makes (the same extraction stage); "
                         f"the keys that set them apart ({', '.join(keys)}) change nothing "
                         f"{fc.base_method(name)} reads. Drop the form, or override what {fc.base_method(name)} uses")


def _ratios_per_asked(h: dict[str, Any]) -> bool:
    """Whether a held-out section's distinct-image ratios are per N_G asked for (generations a stopped method did
    not make count as misses) or, in files written before that, per generation made: the best baseline's value
    times N_G is then its distinct count at N_G in the budget table, or not."""
    last = [p for p in h.get("budget_curve", []) if p["n_generated"] == h["n_generated"]]
    for rows in h["ratios"].values():
        r = rows.get("distinct_nn/mid") or {}
        count = (last[0]["distinct_mid"].get(r.get("best_baseline_method")) or {}).get("mean") if last else None
        if r.get("best_baseline") is not None and count is not None:
            return abs(r["best_baseline"] * h["n_generated"] - count) <= 1e-6 * max(1.0, count)
    return True


def best_setting(settings: list[tuple[float, float]], means: dict[str, float]) -> tuple[float, float]:
    """The setting with the highest validation mean (``means`` keyed by :func:`_setting_key`); ties: the smaller
    lambda, then the smaller temperature. Means are compared by :func:`_level`: equal scores summed over the
    replicates in another order differ by a rounding error, which must not break a tie."""
    return max(settings, key=lambda s: (_level(means[_setting_key(s)]), -s[0], -s[1]))


def _level(score: float) -> float:
    """A validation mean as it is compared (:func:`best_setting`, :func:`chosen_on_validation`): to 9 decimals, so
    that equal scores summed in another order tie."""
    return round(score, 9)


CURVE_METRICS = ("distinct_nn/mid", "distinct_nn/high", "ams_cum/mid")


def padded_to(stats: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """One run's per-generation arrays (:func:`per_generation_stats`) as a run of ``n`` generations: a method that
    dedup-driven stopping ended early gets the generations it did not make as misses (no band reached, nearest
    image -1), so that its shares and distinct-image ratios are per N_G asked for, like its tuning score, and a
    method is not favoured for stopping early (per generation made, a count that grows slower than the budget
    would be)."""
    made = len(stats["nn"])
    if made >= n:
        return stats
    return {k: np.concatenate([v, np.full(n - made, -1 if k == "nn" else False, dtype=v.dtype)])
            for k, v in stats.items()}


def budget_grid(n_generated: int, n_train: int) -> list[int]:
    """The prefixes the budget curve is read at: N_G/10, 3 N_G/10, the training-set size (when below N_G), N_G."""
    grid = {max(1, n_generated // 10), max(1, 3 * n_generated // 10), n_generated}
    if n_train < n_generated:
        grid.add(n_train)
    return sorted(grid)


def budget_curve(stats: dict[str, list[dict[str, np.ndarray]]], n_grid: list[int], n_boot: int,
                 side_forms: tuple[str, ...], seed: int = 0,
                 baselines: tuple[str, ...] = BASELINES) -> list[dict[str, Any]]:
    """For each ``n`` in ``n_grid``: every method's distinct nearest training images (mid band or closer) in its
    first ``n`` generations (mean, min, max over replicates, and each replicate's count in ``per_replicate``, in
    the held-out replicates' order, so that entries of two benchmark files can be set against each other paired
    by replicate) and :func:`bootstrap_ratios` on those prefixes."""
    first = next(iter(stats.values()))[0]
    # the bands the runs have, in the main table's order (BOOT_METRICS): each method's resampling stream is drawn
    # metric by metric, so at the full N_G the distinct-image cell is the main table's (another order gave another
    # interval for the same quantity)
    metrics = tuple(k for k in BOOT_METRICS if k in CURVE_METRICS and f"reach/{k.split('/')[1]}" in first)
    out = []
    for n in n_grid:
        pre = {m: [{k: v[:n] for k, v in s.items()} for s in reps] for m, reps in stats.items()}
        counts = {m: [distinct_count(s) for s in reps] for m, reps in pre.items()}
        out.append({"n_generated": n,
                    "distinct_mid": {m: {"mean": float(np.mean(c)), "min": float(min(c)), "max": float(max(c)),
                                         "per_replicate": [int(v) for v in c]} for m, c in counts.items()},
                    "ratios": bootstrap_ratios(pre, metrics, n_boot, side_forms, baselines, seed=seed)})
    return out


SUMMARY = ("ams/high", "ams/mid", "ums/high", "ums/mid", "ums_cumulative/mid", "p95")


def report(fc: FairBenchConfig, inputs: ScaleInputs, chosen: dict[str, list[float] | None], cache: Path, *,
           device: str = "cpu", progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Steps 2-3: every method at its chosen setting on each held-out replicate; spreads and intervals."""
    base = inputs.run_config(fc.bench.run)
    n = base.extract.n
    per_rep: dict[str, list[dict[str, Any]]] = {m: [] for m in fc.entries}
    stats: dict[str, list[dict[str, np.ndarray]]] = {m: [] for m in fc.entries}
    forms = fc.compared
    # the forms that draw a synthetic set first, of the base run's size N_S (one of another size would need UnCond
    # at its own N_G + N_S: it is left out of the equal-samples line, which says so)
    drawing = tuple(m for m in forms if fc.base_method(m) not in LABEL_FREE)
    sampled = tuple(m for m in drawing if fc.forms.get(m, {}).get("sample.n", base.sample.n) == base.sample.n)
    equal_samples = fc.equal_samples and bool(sampled)
    eq_stats: list[dict[str, np.ndarray]] = []
    rounds: set[str] = set()
    bands = list(read_bands_file(inputs.bands, base.evaluate.similarity))
    guarded_forms = [m for m in forms if fc.base_method(m) == "side-lora"]
    made: dict[str, str] = {}
    for r in fc.heldout_replicates:
        rc = replicate_config(base, r)
        rep = inputs.replicate_run(cache, r)
        paths: dict[str, Path] = {}
        for m in fc.entries:
            setting = chosen.get(m)
            path, mrc = entry_run(fc, m, rc, None if setting is None else tuple(setting), n, rep)
            paths[m] = path
            if cfg.method_in_rounds(fc.base_method(m), mrc.extract):  # its first n generations are its first rounds
                rounds.add(m)
            res = run_audit(path, mrc, device=device, progress=progress, wait=True)
            check_distinct_runs(fc, made, m, made_extraction(fc, m, path))
            met = res.metrics[fc.base_method(m)]
            per_rep[m].append({"replicate": r, "n_generated": int(met["n_generated"]),
                               **{k: _metric(met, k) for k in SUMMARY if k != "p95"},
                               "p95": float(met["p95"]), "carlini": float(met["carlini"]["extracted_fraction"]),
                               "gu": float(met["gu"]["memorized_fraction"]),
                               # side-lora's guard against copying its fine-tuning set, for every entry that draws
                               # a synthetic set (the baselines', which draw none, below; a baseline or label-free
                               # entry had one only where an earlier entry's set lay in its folder: in one replicate
                               # and not in another, the summary's KeyError)
                               **({"copy_guard": float(met["copy_guard"]["nearer_synthetic_fraction"])}
                                  if met.get("copy_guard") and m in drawing else {})})
            stats[m].append(padded_to(per_generation_stats(path, fc.base_method(m), bands, met["orientation"]), n))
        if guarded_forms:  # the baselines' share against the first side-lora form's synthetic set: the reference
            for m in fc.baselines:
                per_rep[m][-1]["copy_guard"] = reference_copy_guard(paths[m], fc.base_method(m),
                                                                    paths[guarded_forms[0]], rc.evaluate, device)
        if equal_samples:  # UnCond in its own sub-run at N_G + N_S (module docstring, step 5)
            path = rep / "forms" / EQUAL_SAMPLES
            res = run_audit(path, method_config(rc, "uncond", None, n + base.sample.n), device=device,
                            progress=progress, wait=True)
            eq_stats.append(padded_to(per_generation_stats(path, "uncond", bands, res.metrics["uncond"]["orientation"]),
                                      n + base.sample.n))
    summary = {}
    for m, rows in per_rep.items():
        keys = [k for k in rows[0] if k != "replicate"]
        summary[m] = {k: {"mean": float(np.mean([x[k] for x in rows])), "min": float(min(x[k] for x in rows)),
                          "max": float(max(x[k] for x in rows))} for k in keys}
    out = {"replicates": list(fc.heldout_replicates), "n_generated": n, "per_replicate": per_rep,
           **({"copy_guard_synthetic": guarded_forms[0]} if guarded_forms else {}),
           "summary": summary, "ratios": bootstrap_ratios(stats, BOOT_METRICS, fc.n_bootstrap, forms, fc.baselines),
           "interval_method": INTERVAL_METHOD, "in_rounds": [m for m in fc.entries if m in rounds],
           "budget_curve": budget_curve(stats, budget_grid(n, inputs.n_train), fc.n_bootstrap, forms,
                                        baselines=fc.baselines)}
    if equal_samples:
        counts = [distinct_count(s) for s in eq_stats]
        out["equal_samples"] = {
            "n_generated": n + base.sample.n, "n_synthetic": base.sample.n,
            "made": [int((s["nn"] >= 0).sum()) for s in eq_stats],  # fewer where dedup-driven stopping ended it
            "left_out": [m for m in drawing if m not in sampled],
            "uncond": {"mean": float(np.mean(counts)), "min": min(counts), "max": max(counts)},
            "ratios": count_ratios({m: stats[m] for m in sampled}, eq_stats, fc.n_bootstrap)}
    elif fc.equal_samples and drawing:  # every form drew a synthetic set of another size: fair.md says so (it was
        # silent, as if the comparison had been turned off)
        out["equal_samples"] = {"n_synthetic": base.sample.n, "left_out": list(drawing)}
    return out


def reference_copy_guard(run: Path, method: str, synthetic_run: Path, ev: cfg.EvaluateConfig, device: str) -> float:
    """The copy guard's share (``pipeline.copy_guard``) of ``method``'s generations in ``run`` against the synthetic
    set of ``synthetic_run`` (a side-lora form's: its fine-tuning data): how many generations of a method that never
    saw that set lie nearer to it than to any training image, the reference for side-lora's share (searched as the
    evaluation ``ev`` says)."""
    generated = load_shards(run / "extraction" / method)
    z = npz_arrays(run / "evaluation" / method / "per_generation.npz", "generation_id", "pixel_distance")
    d_train = dict(zip(z["generation_id"].tolist(), z["pixel_distance"].tolist()))
    d = np.array([d_train[int(i)] for i in generated.ids])
    return copy_guard(generated, load_shards(synthetic_run / "synthetic"), d,
                      neighbor_index("rms-l2", ev, device))["nearer_synthetic_fraction"]


# what may differ between a fair bench and the earlier one whose tuning it reuses (none of it touches tuning; the
# held-out replicates stay disjoint from the validation ones, FairBenchConfig checks)
REPORT_ONLY = ("n_bootstrap", "equal_samples", "heldout_replicates")
ENTRY_LISTS = ("methods", "forms")  # what each of several --tuning-from files may hold a part of
# the grids of one method's entries: compared only where both benches run that method (a file of other entries
# recorded its default, and one that ran it a grid this report leaves out: both were refused as another
# configuration, so a bench split over processes did not join, nor a report of fewer entries re-report)
ENTRY_GRIDS = {"lora_scales": "side-lora", "memguide_scales": "memguide"}


def _definition(fc: FairBenchConfig, name: str) -> dict[str, Any] | None:
    """What an entry runs: a method by its name, a form by its method and overrides; None if ``fc`` lacks it."""
    if name in fc.forms:
        return dict(fc.forms[name])
    return {"method": name} if name in fc.methods else None


def reused_tuning(fc: FairBenchConfig, *priors: tuple[dict[str, Any], str]) -> dict[int, dict[str, Any]]:
    """The tuning step of earlier fair benches (each ``(fair.json contents, its path)``), per training-set size,
    for a report on the held-out replicates (new intervals, the equal-samples line, other held-out replicates)
    without re-running the validation grid. Several files may each have tuned a part of the entries (a fair
    bench split over processes, e.g. the SIDE forms in one and the baselines in another): every entry of ``fc``
    with a grid takes its chosen setting from the file that tuned it. Refused unless each file ran this
    configuration up to :data:`REPORT_ONLY`, the entry lists and the grids of methods one of them does not run
    (:data:`ENTRY_GRIDS`), each entry taken from a file is defined there as
    here, the files tuned on the same target, and files that tuned the same entry agree on it."""
    if not priors:
        raise ValueError("reused_tuning needs at least one earlier fair.json")
    by_source: list[tuple[str, FairBenchConfig, dict[int, dict[str, Any]]]] = []
    for prior, source in priors:
        if prior.get("schema") != SCHEMA:
            raise ValueError(f"--tuning-from {source}: schema {prior.get('schema')!r}, expected {SCHEMA!r}")
        try:  # a key the earlier file lacks (an option added since) takes its default, which keeps the old behaviour
            loaded = cfg.from_dict(FairBenchConfig, prior.get("config"))
            grids = [k for k, method in ENTRY_GRIDS.items() if not (loaded.uses(method) and fc.uses(method))]
            theirs = dataclasses.replace(loaded, **{k: getattr(fc, k) for k in (*REPORT_ONLY, *ENTRY_LISTS, *grids)})
        except ValueError as e:
            raise ValueError(f"--tuning-from {source}: its configuration does not load: {e}") from None
        # (who trains: no matter)
        mine_flat, theirs_flat = (cfg.nested_to_dotted(cfg.keyed_dict(x)) for x in (fc, theirs))
        diff = sorted(k for k in mine_flat.keys() | theirs_flat.keys() if mine_flat.get(k) != theirs_flat.get(k))
        if diff:
            raise ValueError(f"--tuning-from {source} ran another configuration (differs in {', '.join(diff)}); "
                             "its settings were chosen for that one")
        if prior.get("code") is not None and prior["code"].get("stage_versions") != STAGE_VERSIONS:
            raise ValueError(f"--tuning-from {source} was made by code whose stages worked otherwise (stage versions "
                             f"{prior['code'].get('stage_versions')}, now {STAGE_VERSIONS}); tune again")
        if prior.get("code") is None:
            log.warning("--tuning-from %s records no code versions (an older file): its tuning is reused as it is",
                        source)
        # each scale's tuning with the target it was chosen on (a re-report of a re-report keeps the first one's)
        by_scale = {s["n_train"]: {"target_sha256": (s.get("target") or {}).get("model_sha256"), **s["tuning"]}
                    for s in prior.get("scales", [])}
        missing = [n for n in fc.bench.scales if n not in by_scale]
        if missing:
            raise ValueError(f"--tuning-from {source} has no tuning for scales {missing} (it has {sorted(by_scale)})")
        by_source.append((source, loaded, by_scale))
    out: dict[int, dict[str, Any]] = {}
    for n in fc.bench.scales:
        shas = {src: s[n]["target_sha256"] for src, _, s in by_source}
        known = {v for v in shas.values() if v is not None}
        if len(known) > 1:
            raise ValueError(f"--tuning-from files tuned {n} training images on other targets (weights "
                             + ", ".join(f"{src}: {str(v)[:12]}" for src, v in shas.items()) + "); tune again")
        chosen: dict[str, list[float] | None] = {m: None for m in fc.entries if not fc.settings(m)}
        means: dict[str, dict[str, float]] = {}
        origin: dict[str, str] = {}
        given: dict[str, str] = {}  # the file given here that it was first taken from (for the messages)
        for m in (m for m in fc.entries if fc.settings(m)):
            found = [(src, loaded, s[n]) for src, loaded, s in by_source if m in s[n]["chosen"]]
            if not found:
                raise ValueError(f"--tuning-from: no file tuned {m!r} ({', '.join(src for src, _, _ in by_source)}); "
                                 "tune it, or leave it out of this report")
            for src, loaded, t in found:
                if _definition(loaded, m) != _definition(fc, m):
                    raise ValueError(f"--tuning-from {src}: {m!r} is {_definition(loaded, m)} there, "
                                     f"{_definition(fc, m)} here")
                mine = (t["chosen"][m], t["mean_by_setting"].get(m))
                if m in origin and mine != (chosen[m], means.get(m)):
                    raise ValueError(f"--tuning-from {given[m]} and {src} both tuned {m!r}, with other results")
                if m not in origin:  # the file whose run tuned it (a re-report's own source, entry by entry)
                    chosen[m], given[m] = t["chosen"][m], src
                    origin[m] = (t.get("reused_from_by_entry") or {}).get(m) or t.get("reused_from", src)
                    if t["mean_by_setting"].get(m) is not None:
                        means[m] = t["mean_by_setting"][m]
        first = by_source[0][2][n]
        sources = list(dict.fromkeys(origin.values())) or [first.get("reused_from", by_source[0][0])]
        out[n] = {**{k: v for k, v in first.items()
                     if k not in ("chosen", "mean_by_setting", "reused_from", "reused_from_by_entry", "target_sha256",
                                  "target_unrecorded")},
                  # the target the files recorded, checked against this one; a file that recorded none leaves its
                  # own settings' target unchecked (the report names it; its target was taken as unknown, which let
                  # a file tuned on another target through beside it)
                  "target_sha256": next(iter(known)) if known else None,
                  **({"target_unrecorded": [src for src, v in shas.items() if v is None]}
                     if None in shas.values() else {}),
                  "mean_by_setting": means, "chosen": {m: chosen[m] for m in fc.entries},
                  # the file whose run tuned (a re-report of a re-report names the first); several: each entry's
                  "reused_from": sources[0] if len(sources) == 1 else ", ".join(sources),
                  **({"reused_from_by_entry": origin} if len(sources) > 1 else {})}
    return out


def _unrecorded_note(tuning: dict[str, Any]) -> str:
    """What the report says of reused settings whose target no file recorded (older files)."""
    files = tuning.get("target_unrecorded")
    if files:
        one = len(files) == 1
        return (f"; {', '.join(f'`{f}`' for f in files)} record{'s' if one else ''} no target, so the target "
                f"{'its' if one else 'their'} settings were chosen on is not checked")
    return ("; that file records no target, so the target it was chosen on is not checked"
            if tuning.get("target_sha256") is None else "")


def run_fair_bench(fc: FairBenchConfig, cache: str | Path, *, device: str = "cpu",
                   progress: ProgressFactory = no_progress, command: str | None = None,
                   tuning: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Steps 1-5 of the module docstring per training-set size; with ``tuning`` (:func:`reused_tuning`) step 1 is
    taken from an earlier run instead."""
    methods = {*fc.methods, *(f["method"] for f in fc.forms.values())}
    if problems := cluster_problems(fc.bench.run, methods):  # (found after the first target was trained)
        raise ValueError("; ".join(problems))
    cache = Path(cache)
    t0 = time.time()
    data: dict[str, Any] = {"schema": SCHEMA, "command": command, "machine": machine_description(),
                            "code": {"side_extract": versions().get("side-extract"), "stage_versions": dict(STAGE_VERSIONS)},
                            "size": fc.bench.size, "config": cfg.to_dict(fc), "scales": []}
    for n in sorted(fc.bench.scales):
        ts = time.time()
        inputs = scale_inputs(fc.bench, n, cache, device=device, progress=progress)
        if tuning is not None:
            tuned = tuning[n]
            sha = tuned.get("target_sha256")
            if sha is not None and sha != inputs.target.get("model_sha256"):
                raise ValueError(f"the tuning reused for {n} training images was chosen on another target (weights "
                                 f"{sha[:12]}, now {str(inputs.target.get('model_sha256'))[:12]}); tune again")
            unrecorded = tuned.get("target_unrecorded") or ([] if sha is not None else ["it"])
            if unrecorded:  # an older file: the report says so too
                log.warning("the tuning reused for %d training images: %s records no target, not checked", n,
                            ", ".join(unrecorded))
        else:
            tuned = tune(fc, inputs, cache, device=device, progress=progress)
        held = report(fc, inputs, tuned["chosen"], cache, device=device, progress=progress)
        data["scales"].append({"n_train": n, "target": inputs.target, "bands": read_json(inputs.bands)["bands"],
                               "tuning": tuned, "heldout": held, "seconds": round(time.time() - ts, 1)})
        log.info("fair bench: scale %d done in %.0f s", n, time.time() - ts)
    data["seconds"] = round(time.time() - t0, 1)
    return data


def _f(v: float | None, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}" if pct else f"{v:.2f}"


def _ratio_text(r: dict[str, Any]) -> str:
    """A ratio row's ratio: ``∞ (baseline 0)`` where the form found some and its baseline none, ``0/0`` where both
    found none (both were shown as "-", as no data: a form's clearest win read as nothing measured)."""
    if r.get("ratio") is not None:
        return _f(r["ratio"], False)
    side = r.get("side")
    return "-" if side is None else "0/0" if side == 0 else "∞ (baseline 0)"


def _ci(lo: float | None, hi: float | None, marked: bool) -> str:
    """An interval as the tables print it, "[lo, hi]" to 2 decimals; a bound of a marked one that would print as
    1.00 gets the decimals that show it off 1 (up to 6), which "1.00" beside ↑ or ↓ did not say."""
    def one(v: float | None) -> str:
        if not marked or v is None or _f(v, False) != "1.00":
            return _f(v, False)
        return next((t for d in (3, 4, 5) if float(t := f"{v:.{d}f}") != 1.0), f"{v:.6f}")
    return f"[{one(lo)}, {one(hi)}]"


def _mark(r: dict[str, Any]) -> str:
    """" ↑" / " ↓" where a ratio's whole interval lies above / below 1, else nothing."""
    return "" if not r["excludes_1"] else (" ↑" if r["ci95"][0] > 1 else " ↓")


def _method(c: dict[str, Any], name: str) -> str:
    """The method an entry of a written benchmark config ``c`` runs: a form names its own."""
    return c.get("forms", {}).get(name, {}).get("method", name)


def _family(c: dict[str, Any], name: str) -> str:
    """The family an entry of a written benchmark config ``c`` is picked among: ``side`` (the SIDE forms),
    ``label_free`` (memguide and its forms), or its baseline method (``cond``, ``uncond``, with their forms)."""
    method = _method(c, name)
    return "side" if method in SIDE_METHODS else "label_free" if method in LABEL_FREE else method


def chosen_on_validation(c: dict[str, Any], s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The headline pick of one scale of a written fair benchmark (``c`` its config, ``s`` the scale), per kind
    (``side``: the SIDE forms; ``label_free``: memguide and its forms): the entry whose chosen setting scored highest
    on the validation replicates (``select_metric``; ties: the earlier entry, the others named in ``tied``), with
    its held-out distinct-image ratio to the best baseline. The validation replicates chose each entry's setting;
    they choose the entry too, since the highest held-out mean would flatter the winner among close forms
    (``heldout_highest`` names that entry for comparison). The baseline stays the one with the higher held-out mean:
    UnCond has no validation runs, and the stronger baseline is the harder comparison."""
    tuning, ratios = s["tuning"], s["heldout"]["ratios"]
    out: dict[str, dict[str, Any]] = {}
    for kind in ("side", "label_free"):
        scored = {m: by[_setting_key(tuning["chosen"][m])] for m, by in tuning["mean_by_setting"].items()
                  if _family(c, m) == kind and m in ratios}
        if not scored:
            continue
        level = {m: _level(v) for m, v in scored.items()}
        entry = max(level, key=level.get)  # the first of equals: the earlier entry
        row = ratios[entry]["distinct_nn/mid"]
        # the highest held-out mean, ties compared as the validation means are (to 9 decimals: one total spread
        # otherwise over the replicates differed in the last bit and named the other entry), the pick first
        heldout = {m: _level(ratios[m]["distinct_nn/mid"]["side"]) for m in scored}
        highest = [m for m in scored if heldout[m] == max(heldout.values())]
        out[kind] = {"entry": entry, "validation": scored[entry], "setting": tuning["chosen"][entry],
                     "tied": [m for m, v in level.items() if v == level[entry] and m != entry],
                     "heldout_highest": entry if entry in highest else highest[0], "distinct_nn/mid": row}
    return out


def tuning_budget(c: dict[str, Any], s: dict[str, Any]) -> dict[str, dict[str, int]]:
    """How many settings each entry of one scale of a written fair benchmark tried on the validation replicates,
    grouped by the family its headline is picked among: ``side`` (the SIDE forms: the best SIDE form is the best
    of all of them), ``label_free`` (memguide and its forms), and each baseline with its baseline forms (``cond``,
    ``uncond``: the best baseline is the best of them all by held-out mean). An entry without settings (UnCond and
    its forms) tried 0."""
    tried = {m: len(by) for m, by in s["tuning"]["mean_by_setting"].items()}
    out: dict[str, dict[str, int]] = {}
    for m in [*c["methods"], *c.get("forms", {})]:
        out.setdefault(_family(c, m), {})[m] = tried.get(m, 0)
    return out


def _budget_line(c: dict[str, Any], s: dict[str, Any]) -> str:
    """The tuning budget of one scale (:func:`tuning_budget`) as a sentence, saying plainly where a headline entry
    (the best SIDE form, the best label-free entry) was picked among more settings than the baselines had."""
    budget = tuning_budget(c, s)
    label = {"side": "SIDE forms", "label_free": "label-free entries"}
    parts = []
    order = [*label, *BASELINES]
    for family in sorted(budget, key=lambda f: order.index(f) if f in order else len(order)):
        entries, total = budget[family], sum(budget[family].values())
        inner = ("nothing to tune" + (f": {', '.join(entries)}" if len(entries) > 1 else "") if total == 0
                 else ", ".join(f"{m} {k}" for m, k in entries.items()) if len(entries) > 1 else "")
        parts.append(f"{label.get(family, family)} {total}" + (f" ({inner})" if inner else ""))
    line = (f"Tuning budget (settings tried on validation replicates {c['validation_replicates']}; a headline entry is "
            "the best of its family's): " + "; ".join(parts) + ".")
    tunable = {b: sum(budget[b].values()) for b in BASELINES if sum(budget.get(b, {}).values()) > 0}
    untuned = [m for b in BASELINES for m in budget.get(b, {})]  # every baseline, when none has settings
    for family in (f for f in label if f in budget):
        total = sum(budget[family].values())
        if not tunable:
            line += (f" The {label[family]}' {total} settings have no counterpart: "
                     + (f"the only baseline, {untuned[0]}, has" if len(untuned) == 1
                        else f"the baselines ({', '.join(untuned)}) have") + " nothing to tune.")
        elif total > max(tunable.values()):
            b, k = max(tunable.items(), key=lambda kv: kv[1])
            line += (f" **Unequal:** the best of the {label[family]} is the best of {total} settings, {b} the best of "
                     f"{k}, which flatters their ratios against it; {b} forms (`--form NAME={b},key=value`) or a run "
                     f"of {b} alone on a grid of {total} settings (the same target and replicates) give it the same "
                     "budget.")
    return line


def _setting_key(setting: list[float]) -> str:
    """A setting as ``mean_by_setting`` keys it: "lambda,T" (``tune``)."""
    return f"{setting[0]:g},{setting[1]:g}"


def _setting(c: dict[str, Any], name: str, setting: list[float] | None, named: bool = False) -> str:
    """A chosen setting as the tables show it: "lambda, T" (side-lora "w, 0"); memguide's (and its forms') lambda
    alone. ``named``: with the names, "lambda 3, T 1", side-lora "w 6", memguide "lambda 60"."""
    if setting is None:
        return "-"
    method = _method(c, name)
    if not named:
        return f"{setting[0]:g}" if method in LABEL_FREE else f"{setting[0]:g}, {setting[1]:g}"
    if method == "side-lora":
        return f"w {setting[0]:g}"
    return f"lambda {setting[0]:g}" if method in LABEL_FREE else f"lambda {setting[0]:g}, T {setting[1]:g}"


def render_fair_markdown(data: dict[str, Any]) -> str:
    c = data["config"]
    lora = any(_method(c, m) == "side-lora" for m in [*c["methods"], *c.get("forms", {})])
    ex = c["bench"]["run"]["extract"]
    lines = [*_preamble("Fair extraction benchmark (replicates, equal tuning budget, intervals)", data),
             f"Images {data['size']}x{data['size']}; total {data['seconds']:.0f} s wall (the load average above says what else ran).",
             "",
             ("Forms (a SIDE method, or memguide" + (", or a baseline: one more baseline to pick the best from"
                                                      if any(f["method"] in BASELINES for f in c["forms"].values())
                                                      else "") + ", with overrides, tuned like the methods): "
              + "; ".join(f"`{k}` = {v}" for k, v in c.get("forms", {}).items()) + ". " if c.get("forms") else "")
             + f"Every guided method tuned over lambda in {c['scales_grid']} x temperature in {c['temperatures']} on "
             f"validation replicates {c['validation_replicates']} (N_G {c['validation_n']}, by "
             f"`{c['select_metric']}`)"
             + (f", memguide over lambda in {c['memguide_scales']} (t <= {ex['memguide_t_hi']:g} T, t_m = "
                f"{ex['memguide_t_m']:g} T)" if any(
                    _method(c, m) == "memguide" for m in [*c["methods"], *c.get("forms", {})]) else "")
             + (f", side-lora over CFG scale w in {c['lora_scales']}" if lora else "")
             + f"; reported on held-out replicates {c['heldout_replicates']}. A replicate redraws "
             "the synthetic set, the clustering, both classifiers"
             + ((", side-lora's fine-tuning" if data.get("code") else " (not side-lora's fine-tuning seed: these runs "
                 "kept it fixed)") if lora else "")
             + " and the extraction noise (its own noise stream, independent of the synthetic set's).", ""]
    for s in data["scales"]:
        h = s["heldout"]
        lines += [f"## {s['n_train']} training images, {data['size']}x{data['size']}, N_G {h['n_generated']} per "
                  f"method and replicate", ""]
        if "model_sha256" in s["target"]:  # (files written before the target's fingerprint was recorded lack it)
            trained = s["target"].get("trained_with", {})  # (files written before it was recorded lack it)
            lines += [f"Target `{Path(s['target']['path']).name}`, model fingerprint `{s['target']['model_sha256'][:16]}` "
                      "(sha256 of its weights and configs: results rest on the same target only where it agrees"
                      + (f"; trained on {trained['torch_threads']} torch thread(s), {trained['device']}"
                         + (f", resumed at step {trained['resumed_from']}" if trained.get("resumed_from") else "")
                         if "torch_threads" in trained else "") + ").", ""]
        stopping = ex.get("stop_unseen", 0) > 0  # dedup-driven stopping (files written before it lack the key)
        if stopping:
            made = "; ".join(f"{m} {v['n_generated']['mean']:.1f} [{v['n_generated']['min']:.0f}-"
                             f"{v['n_generated']['max']:.0f}]" for m, v in h["summary"].items() if "n_generated" in v)
            lines += [f"Dedup-driven stopping for every method (`extract.stop_unseen` = {ex['stop_unseen']:g}, rounds of "
                      f"ceil(N_G / {ex['rounds']})): a method stops after the first round at whose end the unseen "
                      "mass of its generations so far falls below it, so N_G is a ceiling (tuning scores a method per "
                      "N_G, not per generation made); generations made, mean [min-max]: " + made + ". The shares in "
                      "the first table are of the generations made; "
                      + ("the ratios and the budget table count the generations not made as misses, so they are per "
                         "N_G asked for (distinct_nn: a ratio of counts)." if _ratios_per_asked(h) else
                         "so are the ratios: this file was written before the fair benchmark counted the generations "
                         "not made as misses, which favours a method that stops early (the budget table's counts "
                         "are counts)."), ""]
        similarity = ((c.get("bench") or {}).get("run") or {}).get("evaluate", {}).get("similarity", "rms-l2")
        p95 = ("p95: the 5th percentile of the nearest RMS-L2 distance, lower = closer" if similarity == "rms-l2"
               else f"p95: the 95th percentile of the best {similarity} similarity, higher = closer")
        lines += [f"Mean over held-out replicates [min-max], % of {'generations made' if stopping else 'N_G'} "
                  f"({p95}):", "",
                  "| method | setting (lambda, T) | AMS high | AMS mid | UMS high | UMS mid | UMS cum. mid | Carlini | "
                  f"{'p95 dist.' if similarity == 'rms-l2' else 'p95 sim.'} |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, summ in h["summary"].items():
            st = s["tuning"]["chosen"].get(m)
            cell = lambda k, pct=True: (f"{_f(summ[k]['mean'], pct)} [{_f(summ[k]['min'], pct)}-"
                                        f"{_f(summ[k]['max'], pct)}]")
            lines.append(f"| {m} | {_setting(c, m, st)} | {cell('ams/high')} | "
                         f"{cell('ams/mid')} | {cell('ums/high')} | {cell('ums/mid')} | {cell('ums_cumulative/mid')} | "
                         f"{cell('carlini')} | {cell('p95', False)} |")
        guarded = {m: v["copy_guard"] for m, v in h["summary"].items() if "copy_guard" in v}
        if lora and guarded:  # (files written before it was recorded lack it)
            ref = h.get("copy_guard_synthetic")
            lines += ["", "Copy guard: share of generations nearer one of the replicate's synthetic images (side-lora's "
                      "fine-tuning set) than to any training image, % (mean [min-max] over replicates): "
                      + "; ".join(f"{m} {_f(g['mean'])} [{_f(g['min'])}-{_f(g['max'])}]" for m, g in guarded.items())
                      + (f" (the baselines' against `{ref}`'s synthetic set, the other forms' against their own: the "
                         "reference, how near generations of a model not fine-tuned on that set lie to it)." if ref
                         else ".")]
        inext = "interval_method" in h  # results written before the distinct-count interval changed say nothing
        spread = h.get("interval_method") == INTERVAL_METHOD  # and before it took in the replicates' spread
        caption = ("95 % interval of the log ratio, the wider of the replicates' spread's (paired by replicate, t at "
                   "R - 1 df) and the resampling's of each replicate's generations (distinct_nn: iNEXT's assemblage; "
                   "the normal quantile)" if spread
                   else "95 % bootstrap interval over generations"
                   + ("; distinct_nn: iNEXT's assemblage bootstrap standard error around the observed ratio, shares: "
                      "percentile" if inext else ""))
        if h["ratios"]:  # (none when only baselines ran)
            lines += ["", f"SIDE form (or memguide) / best baseline (ratio of replicate means, {caption}"
                      "; ↑ where the whole interval is above 1, ↓ where it is below 1; the best baseline is the "
                      "one with the higher mean on these held-out replicates, which makes ↑ the harder comparison and "
                      "leaves ↓ unadjusted for that choice):", "",
                      "| SIDE form | " + " | ".join(BOOT_METRICS) + " |", "|---|" + "---|" * len(BOOT_METRICS)]
        for form, rows in h["ratios"].items():
            cells = []
            for k in BOOT_METRICS:
                r = rows[k]
                lo, hi = r["ci95"]
                mark = _mark(r)
                cells.append(f"{_ratio_text(r)} {_ci(lo, hi, r['excludes_1'])} vs "
                             f"{r['best_baseline_method']}{mark}")
            lines.append(f"| {form} | " + " | ".join(cells) + " |")
        picks = chosen_on_validation(c, s)  # derived from the file's tuning and ratios, not stored beside them
        if picks:
            lines += ["", f"Chosen on validation (the entry whose chosen setting scored highest on "
                      f"`{c['select_metric']}` on the validation replicates at N_G {c['validation_n']}, as its "
                      "setting was; ties: the earlier entry), its distinct_nn/mid ratio as above (the best baseline "
                      "is still the one with the higher held-out mean: UnCond has no validation runs):", ""]
            for kind, label in (("side", "best SIDE form"), ("label_free", "best label-free entry")):
                p = picks.get(kind)
                if p is None:
                    continue
                r = p["distinct_nn/mid"]
                lo, hi = r["ci95"]
                lines.append(f"- {label}: **{p['entry']}** ({_setting(c, p['entry'], p['setting'], named=True)}; "
                             f"validation {_f(p['validation'])} %"
                             + (f", tied with {', '.join(p['tied'])}" if p["tied"] else "") + f"): "
                             f"{_ratio_text(r)} {_ci(lo, hi, r['excludes_1'])} vs "
                             f"{r['best_baseline_method']}{_mark(r)}"
                             + (f" (the highest held-out mean: {p['heldout_highest']})"
                                if p["heldout_highest"] != p["entry"] else " (also the highest held-out mean)"))
        if s["tuning"]["mean_by_setting"]:
            lines += ["", _budget_line(c, s)]
        curve = h.get("budget_curve")
        if curve:
            lines += ["", "Distinct nearest training images (mid band or closer) by budget: the first n generations "
                      "of each held-out run are that run at N_G = n. Mean [min-max] over replicates, then each form's "
                      "ratio to the best baseline at that n with its 95 % interval (as above)"
                      + ("; ‡: made in rounds (" + ", ".join(h["in_rounds"]) + "), so its first n generations are its "
                         "first rounds, not a run at N_G = n" if h.get("in_rounds") else "") + ":", "",
                      "| method | " + " | ".join(f"n = {p['n_generated']}" for p in curve) + " |",
                      "|---|" + "---|" * len(curve)]
            for m in curve[0]["distinct_mid"]:
                cells = []
                for p in curve:
                    d = p["distinct_mid"][m]
                    r = p["ratios"].get(m, {}).get("distinct_nn/mid")
                    cell = f"{d['mean']:.1f} [{d['min']:.0f}-{d['max']:.0f}]"
                    if r is not None:
                        lo, hi = r["ci95"]
                        mark = _mark(r)
                        cell += f"; {_ratio_text(r)} {_ci(lo, hi, r['excludes_1'])}{mark}"
                    if m in h.get("in_rounds", ()) and p["n_generated"] < h["n_generated"]:
                        cell += " ‡"
                    cells.append(cell)
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        eq = h.get("equal_samples")
        if eq and "uncond" not in eq:
            lines += ["", f"Equal model samples: not measured. Every form that draws a synthetic set "
                      f"({', '.join(eq['left_out'])}) drew one of another size than the run's N_S = "
                      f"{eq['n_synthetic']}, against which UnCond's N_G + N_S run is made; compare them per model "
                      "sample with UnCond given that form's N_G + N_S generations."]
        elif eq:
            u = eq["uncond"]
            lines += ["", f"Equal model samples: each form drew {eq['n_synthetic']} synthetic samples before its "
                      f"{h['n_generated']} generations"
                      + (f" (left out: {', '.join(eq['left_out'])}, which drew a synthetic set of another size)"
                         if eq.get("left_out") else "")
                      + f". UnCond with {eq['n_generated']} generations"
                      + (f" at most (it made {np.mean(eq['made']):.1f} [{min(eq['made'])}-{max(eq['made'])}] before "
                         "dedup-driven stopping ended it)" if "made" in eq and min(eq["made"]) < eq["n_generated"] else "")
                      + f" (the same noise stream, extended) reaches {u['mean']:.1f} [{u['min']:.0f}-{u['max']:.0f}] "
                      "distinct nearest "
                      "training images at the mid band or closer; each form's count at N_G against it (ratio of "
                      "replicate means, "
                      + (f"{caption}):" if spread else "95 % bootstrap interval; iNEXT's assemblage bootstrap standard "
                         "error around the observed ratio):" if inext else
                         "resampling with replacement lowers distinct counts, the shorter run's more, so the interval "
                         "sits low: read it as indicative):"), ""]
            for form, r in eq["ratios"].items():
                lo, hi = r["ci95"]
                mark = _mark(r)
                lines.append(f"- {form}: {r['side']:.1f} against {r['uncond']:.1f}: {_ratio_text(r)} "
                             f"{_ci(lo, hi, r['excludes_1'])}{mark}")
        reused = s["tuning"].get("reused_from")
        by_entry = s["tuning"].get("reused_from_by_entry") or {}
        sources = ("; ".join(f"`{src}` ({', '.join(m for m, f in by_entry.items() if f == src)})"  # several files
                             for src in dict.fromkeys(by_entry.values())) if by_entry else f"`{reused}`")
        lines += ["", f"Validation means of `{c['select_metric']}` (%) by setting "
                  "(lambda,T; side-lora: w,0; memguide: lambda,0)"
                  + (f", taken with the chosen settings from {sources} (`--tuning-from`: the validation grid was not "
                     "run again" + _unrecorded_note(s["tuning"]) + ")" if reused else "")
                  + (f"; {s['tuning']['runs_kept']} of its {s['tuning']['runs']} runs kept from an earlier fair bench "
                     f"(the cache's `{VALIDATION_RUNS}/`: the same config, the same files and target, the same stage "
                     "versions)" if not reused and s["tuning"].get("runs_kept") else "")
                  + ":", "",
                  "| method | chosen | every setting |", "|---|---|---|"]
        for m, by in s["tuning"]["mean_by_setting"].items():
            ch = s["tuning"]["chosen"].get(m)
            lines.append(f"| {m} | {_setting(c, m, ch)} | "
                         + "; ".join(f"{k}: {_f(v)}" for k, v in by.items()) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_fair_results(data: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    return write_results(out, "fair", data, render_fair_markdown)


def quick_fair_config() -> FairBenchConfig:
    """A tiny configuration for tests and a first look (the extraction benchmark's ``--quick`` inputs)."""
    from .extraction import quick_config

    return FairBenchConfig(bench=quick_config(), scales_grid=(1.0, 10.0), temperatures=(1.0,),
                           validation_replicates=(1,), heldout_replicates=(2, 3), validation_n=32, n_bootstrap=50)


__all__ = ["FairBenchConfig", "replicate_config", "method_config", "reused_tuning", "run_fair_bench", "write_fair_results",
           "render_fair_markdown", "budget_grid", "budget_curve", "quick_fair_config", "full_run_template",
           "tuning_budget"]
