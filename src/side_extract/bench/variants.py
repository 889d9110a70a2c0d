"""Which settings make SIDE extract more (``side bench variants``): chosen on one seed, reported on another.

A *variant* is a name and overrides of the extraction benchmark's audit configuration, written with dotted
keys (``extract.t_hi: 0.5``, ``sample.n: 6000``). Every variant is applied on top of ``base`` (the
paper's settings, spelled out so that the comparison does not move when the library's defaults do).

For each seed and each scale (training-set size) of the extraction benchmark:

1. the benchmark's own run of that seed (``CACHE/runs/<target>/rep-<seed>``, all methods at the ``base``
   settings) supplies the baselines, Cond and UnCond; it is computed here when the cache lacks it;
2. each variant runs the SIDE methods (``methods``, default cluster-label SIDE) as a sub-run
   ``.../rep-<seed>/variants/<name>`` that first shares the run's complete stages, so it recomputes only
   what its overrides change (a guidance setting: extraction; ``sample.n``: everything from the synthetic
   set on);
3. the variant's score is its **objective**: the mean, over the scales and the ``objective`` metrics, of
   ``log((v + e) / (b + e))``, v the variant's value, b the best baseline's (Cond or UnCond, whichever
   memorizes more by that metric), e = 1 / N_G (so a metric at zero on both sides counts as a tie, not
   as infinity). Each variant's run holds Cond and UnCond too: a baseline whose generations the variant does
   not change (the same extraction fingerprint as in the base run) is the base run's, shared and not made again;
   one the variant changes (the sampler: ``extract.scheduler``, ``steps``, ``eta``, ``precision``; for Cond also
   ``extract.scale`` where ``cond_scale`` is null, Cond's own settings, its clean classifier's, adaptive
   allocation; not K, as Cond's classifier learns the training set's labels) is made with the variant's settings,
   and the variant's best baseline is the best of both: a setting that makes every method memorize more is not a
   SIDE win (before, only a sampler change reran the baselines: a variant moving Cond's lambda with SIDE's was set
   against the base's Cond).

**Protocol.** The variants are scored on ``validation_seed``; the best-scoring one (``base`` itself when
none beats it) is *chosen* there. Only then are ``base`` and the chosen variant run on ``heldout_seed``
(every variant with ``heldout="all"``), whose figures are the ones to report. Nothing is selected on the
held-out seed.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Literal

from .. import config as cfg
from ..metrics import read_bands_file
from ..models.target import Target
from ..pipeline import ProgressFactory, cluster_problems, load_run_target, no_progress, preflight, run_audit
from ..runs import RunDir, read_stages
from ..summary import BASELINES, SIDE_METHODS
from ..sweeps import share_stages
from . import machine_description, write_results
from .extraction import (MEASURED_ALIKE, ExtractionBenchConfig, ScaleInputs, check_entry_name,
                         check_replicate, compact, ratios_to_best_baseline, refuse_stopping, replicate_config, scale_inputs)
from .tables import render_variants_markdown

SCHEMA = "side-extract/bench-variants/1"
BASE = "base"
FIXED = MEASURED_ALIKE  # what a variant may not change (the benchmark sets it for every entry alike)
DEFAULT_OBJECTIVE = ("ams_cumulative/high", "ams_cumulative/mid", "ums_cumulative/high", "ums_cumulative/mid",
                     "carlini")


def apply_overrides(rc: cfg.RunConfig, overrides: dict[str, Any], where: str) -> cfg.RunConfig:
    """``rc`` with dotted ``overrides`` applied; an unknown key or a bad value names ``where`` it came from."""
    return cfg.from_dict(cfg.RunConfig, cfg.merge(cfg.to_dict(rc), cfg.dotted_to_nested(overrides)), where=where)


def _dotted(overrides: dict[str, Any], name: str) -> dict[str, Any]:
    """A variant's (or the base's) overrides with every nested mapping spelled out as dotted keys."""
    try:
        return cfg.nested_to_dotted(cfg.dotted_to_nested(overrides))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


@dataclasses.dataclass(frozen=True)
class VariantsBenchConfig:
    """The variants experiment.

    ``bench`` supplies the targets, bands, training sets and the audit template (its ``scales`` are the
    scales run here); ``base`` holds the paper's settings applied before every variant (and to the
    baselines' run); ``variants`` maps a name to its dotted overrides (``base`` is always variant zero).
    """

    bench: ExtractionBenchConfig
    base: dict[str, Any] = dataclasses.field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    methods: tuple[str, ...] = ("side",)
    objective: tuple[str, ...] = DEFAULT_OBJECTIVE
    validation_seed: int = 1
    heldout_seed: int | None = 2
    heldout: Literal["chosen", "all"] = "chosen"

    def __post_init__(self) -> None:
        if BASE in self.variants:
            raise ValueError(f"variant name {BASE!r} is reserved for the base settings; rename it")
        # nested mappings (``extract: {n: 24}``, as YAML writes them) spelled out as dotted keys, so that the checks
        # below see them: they had passed the refusal of N_G, stopping and seeds (a variant scored at 4x the N_G)
        object.__setattr__(self, "base", _dotted(self.base, BASE))
        object.__setattr__(self, "variants", {n: _dotted(v, n) for n, v in self.variants.items()})
        bad = [m for m in self.methods if m not in SIDE_METHODS]
        if bad or not self.methods or len(set(self.methods)) != len(self.methods):  # (a repeat: its tables twice)
            raise ValueError(f"methods={list(self.methods)}: each must be one of {', '.join(SIDE_METHODS)}, "
                             "named once")
        if self.heldout not in ("chosen", "all"):
            raise ValueError(f"heldout={self.heldout!r} must be 'chosen' or 'all'")
        check_replicate(self.validation_seed, "validation_seed")
        if self.heldout_seed is not None:
            check_replicate(self.heldout_seed, "heldout_seed")
        if self.heldout_seed is not None and self.heldout_seed == self.validation_seed:
            raise ValueError(f"heldout_seed={self.heldout_seed} must differ from validation_seed "
                             f"(settings are chosen on the validation seed)")
        known = {"ams/", "ums/", "ams_cumulative/", "ums_cumulative/"}
        if not self.objective or len(set(self.objective)) != len(self.objective):  # (none: every score NaN and base
            # chosen without a word; a repeat counted twice)
            raise ValueError(f"objective={list(self.objective)} must name at least one metric, each once")
        for name in self.objective:
            if name not in ("p95", "carlini", "gu") and not any(name.startswith(k) for k in known):
                raise ValueError(f"objective metric {name!r} is not a metric name (ams/<band>, ums/<band>, "
                                 "ams_cumulative/<band>, ums_cumulative/<band>, p95, carlini, gu)")
        for name in self.names:
            check_entry_name(name, "variant")
            for key in (self.base if name == BASE else self.variants[name]):
                if any(key == f or key.startswith(f + ".") for f in FIXED):
                    raise ValueError(f"{name}: {key!r} cannot be varied (the benchmark fixes {', '.join(FIXED)} so "
                                     "that every variant is measured like the baselines)")
                if key.rsplit(".", 1)[-1] in ("seed", "random_state"):  # (replicate_config set it back: the variant
                    # ran as a copy of base, scored as another)
                    raise ValueError(f"{name}: {key!r} cannot be varied: the replicate sets every seed")
            rc = self.run_config(name)  # every override is checked up front, not after an hour of runs
            if problems := cluster_problems(rc, self.methods):  # (found after the target was trained, before)
                raise ValueError(f"{name}: " + "; ".join(problems))

    def run_config(self, name: str) -> cfg.RunConfig:
        """The audit config of variant ``name`` (scale-independent part; ``base`` for the baselines)."""
        rc = apply_overrides(self.bench.run, self.base, where="base")
        if name != BASE:
            rc = apply_overrides(rc, self.variants[name], where=f"variants.{name}")
        return rc

    @property
    def names(self) -> list[str]:
        return [BASE, *self.variants]


def load_variants_file(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``base`` and ``variants`` of a variants YAML file (each a mapping of dotted keys, or nested mappings, to
    values)."""
    data = cfg.load_yaml(path)
    unknown = set(data) - {"base", "variants"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected 'base' and 'variants'")
    base = data.get("base") or {}
    variants = data.get("variants") or {}
    if not isinstance(base, dict) or not isinstance(variants, dict) or not all(isinstance(v, dict) or v is None
                                                                                 for v in variants.values()):
        raise ValueError(f"{path}: 'base' must map dotted keys to values and 'variants' must map names to such maps")
    if not variants:
        raise ValueError(f"{path}: 'variants' names none; list at least one (name -> dotted overrides) to set "
                         "against the base (the base alone is `side bench extraction`)")
    names = [str(k) for k in variants]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{path}: variant name(s) {twice} given twice (e.g. 1: and \"1\":); each needs its own name")
    return base, {str(k): dict(v or {}) for k, v in variants.items()}


P95_FLOOR = 0.5 / 255  # half an 8-bit level, in RMS-L2 over pixels in [0, 1]: p95 distances below it are copies


def objective_score(per_scale: list[tuple[int, dict[str, dict[str, Any]]]], metrics: tuple[str, ...]) -> float:
    """Mean over scales and ``metrics`` of log((v + e) / (b + e)), e = 1 / N_G (p95, a distance: log((b + d) /
    (v + d)), d = :data:`P95_FLOOR`, so that a variant at distance 0, exact copies, scores above one at 0.001).

    ``per_scale``: ``[(N_G, rows)]``, ``rows`` one SIDE method's :func:`ratios_to_best_baseline` entry, which
    holds each metric's value (``side``), its best baseline's (``best_baseline``) and its direction.
    """
    terms = []
    for n_generated, rows in per_scale:
        e = 1.0 / n_generated
        for name in metrics:
            v, b = rows[name]["side"], rows[name]["best_baseline"]
            if rows[name]["better"] == "higher":
                terms.append(math.log((v + e) / (b + e)))
            else:
                terms.append(math.log((b + P95_FLOOR) / (v + P95_FLOOR)))
    return sum(terms) / len(terms) if terms else float("nan")


def _scale_config(vc: VariantsBenchConfig, name: str, inputs: ScaleInputs, seed: int,
                  methods: tuple[str, ...]) -> cfg.RunConfig:
    rc = inputs.run_config(vc.run_config(name))
    rc = replicate_config(rc, seed)
    return dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, methods=methods))


def _variant_config(vc: VariantsBenchConfig, name: str, inputs: ScaleInputs, seed: int,
                    main_rc: cfg.RunConfig) -> cfg.RunConfig:
    """Variant ``name``'s run at one scale and seed: its SIDE methods and the baselines (those it does not change
    are the base run's, shared: :func:`changed_baselines`)."""
    return _scale_config(vc, name, inputs, seed, main_rc.extract.methods)


def changed_baselines(main_path: Path, run_path: Path) -> list[str]:
    """The baselines whose generations differ between the base run ``main_path`` and a variant's run ``run_path``:
    those whose extraction stage has another fingerprint (its sampler, classifier, clusters or guidance)."""
    main, run = read_stages(main_path), read_stages(run_path)
    return [b for b in BASELINES if run[f"extraction/{b}"]["fingerprint"] != main[f"extraction/{b}"]["fingerprint"]]


def _check_variants(vc: VariantsBenchConfig, inputs: ScaleInputs, configs: dict[str, cfg.RunConfig],
                    target: Target) -> None:
    """Every variant's run checked against the scale's target, and the objective's bands against its bands, before
    the first run: a variant the target cannot run (extract.steps above its timesteps) was found when its turn came,
    hours in, and a band the bands file does not name was a bare KeyError after the validation runs."""
    bands = [b.name for b in read_bands_file(inputs.bands, configs[BASE].evaluate.similarity)]
    for name in vc.objective:
        if "/" in name and name.split("/", 1)[1] not in bands:
            raise ValueError(f"objective metric {name!r}: the benchmark's bands are {', '.join(bands)} "
                             f"({inputs.bands})")
    for name, rc in configs.items():
        try:
            preflight(rc, target.denoiser, warn_inert=False)
        except ValueError as e:
            raise ValueError(f"variant {name}: {e}") from None


def run_seed(vc: VariantsBenchConfig, seed: int, names: list[str], cache: Path, *, device: str = "cpu",
             progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Variants ``names`` on every scale at extraction seed ``seed``: metrics, ratios and objective of each."""
    out: dict[str, Any] = {"seed": seed, "scales": [], "variants": {}}
    all_methods = tuple(dict.fromkeys((*vc.methods, *BASELINES)))
    for n in sorted(vc.bench.scales):
        inputs = scale_inputs(vc.bench, n, cache, device=device, progress=progress)
        main_path = inputs.replicate_run(cache, seed)
        main_rc = _scale_config(vc, BASE, inputs, seed, all_methods)
        target = load_run_target(main_rc, device)
        _check_variants(vc, inputs, {BASE: main_rc, **{name: _variant_config(vc, name, inputs, seed, main_rc)
                                                       for name in names if name != BASE}}, target)
        t_main = time.time()
        main = run_audit(main_path, main_rc, device=device, progress=progress, target=target)
        base_seconds = time.time() - t_main
        baselines = {b: main.metrics[b] for b in BASELINES}
        scale: dict[str, Any] = {"n_train": n, "n_generated": main_rc.extract.n, "run": str(main_path),
                                 "baselines": {b: compact(m) for b, m in baselines.items()}, "variants": {}}
        for name in names:
            t0 = time.time() - (base_seconds if name == BASE else 0.0)  # (base's run is the main one, made above:
            own: dict[str, dict] = {}  # its seconds read 0)
            if name == BASE:
                metrics, run_path = {m: main.metrics[m] for m in vc.methods}, main_path
            else:
                run_path = main_path / "variants" / name
                share_stages(RunDir(main_path), RunDir(run_path))
                rc = _variant_config(vc, name, inputs, seed, main_rc)
                metrics = run_audit(run_path, rc, device=device, progress=progress, target=target).metrics
                changed = changed_baselines(main_path, run_path)
                own = {f"{b} ({name})": metrics.pop(b) for b in changed}
                for b in BASELINES:  # (the others are the base run's own, shared)
                    metrics.pop(b, None)
            best_of = {**baselines, **own}
            scale["variants"][name] = {
                "run": str(run_path), "seconds": round(time.time() - t0, 1),
                "methods": {m: compact(v) for m, v in metrics.items()},
                "own_baselines": {b: compact(v) for b, v in own.items()},
                "ratios": ratios_to_best_baseline({**metrics, **best_of}, side_methods=vc.methods,
                                                  baselines=tuple(best_of)),
            }
        out["scales"].append(scale)
    for name in names:
        out["variants"][name] = {
            "overrides": {} if name == BASE else vc.variants[name],
            "objective": {m: objective_score([(s["n_generated"], s["variants"][name]["ratios"][m])
                                              for s in out["scales"]], vc.objective) for m in vc.methods},
        }
    return out


def choose(validation: dict[str, Any], method: str) -> str:
    """The variant with the highest validation objective for ``method``: ``base`` unless one scores strictly
    higher; among variants with equal scores, the one listed first."""
    scores = {name: v["objective"][method] for name, v in validation["variants"].items()}
    best = max(scores, key=lambda k: (scores[k], k == BASE))
    return best if scores[best] > scores[BASE] else BASE


def run_variants_bench(vc: VariantsBenchConfig, cache: str | Path, *, device: str = "cpu",
                       progress: ProgressFactory = no_progress, command: str | None = None) -> dict[str, Any]:
    """Score every variant on the validation seed, choose, then run the held-out seed; the results dict."""
    refuse_stopping(vc.bench.run.extract, "side bench variants")
    cache = Path(cache)
    t0 = time.time()
    data: dict[str, Any] = {"schema": SCHEMA, "command": command, "machine": machine_description(),
                            "size": vc.bench.size, "config": cfg.to_dict(vc), "objective": list(vc.objective)}
    data["validation"] = run_seed(vc, vc.validation_seed, vc.names, cache, device=device, progress=progress)
    data["chosen"] = {m: choose(data["validation"], m) for m in vc.methods}
    if vc.heldout_seed is not None:
        names = vc.names if vc.heldout == "all" else list(dict.fromkeys([BASE, *data["chosen"].values()]))
        data["heldout"] = run_seed(vc, vc.heldout_seed, names, cache, device=device, progress=progress)
    data["seconds"] = round(time.time() - t0, 1)
    return data


def write_variants_results(data: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``variants.json`` + ``variants.md`` in ``out``."""
    return write_results(out, "variants", data, render_variants_markdown)


__all__ = ["VariantsBenchConfig", "load_variants_file", "apply_overrides", "objective_score",
           "run_seed", "choose", "run_variants_bench", "write_variants_results", "BASE",
           "DEFAULT_OBJECTIVE"]
