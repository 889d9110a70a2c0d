"""Which settings make SIDE extract more (``side bench variants``): chosen on one seed, reported on another.

A *variant* is a name and overrides of the extraction benchmark's audit configuration, written with dotted
keys (``extract.t_hi: 0.5``, ``sample.n: 6000``). Every variant is applied on top of ``base`` (the
paper's settings, spelled out so that the comparison does not move when the library's defaults do).

For each seed and each scale (training-set size) of the extraction benchmark:

1. the benchmark's own run of that seed (``CACHE/runs/<target>/seed-<seed>``, all methods at the ``base``
   settings) supplies the baselines, Cond and UnCond; it is computed here when the cache lacks it;
2. each variant runs the SIDE methods (``methods``, default cluster-label SIDE) as a sub-run
   ``.../seed-<seed>/variants/<name>`` that first shares the run's complete stages, so it recomputes only
   what its overrides change (a guidance setting: extraction; ``sample.n``: everything from the synthetic
   set on);
3. the variant's score is its **objective**: the mean, over the scales and the ``objective`` metrics, of
   ``log((v + e) / (b + e))``, v the variant's value, b the best baseline's (Cond or UnCond, whichever
   memorizes more by that metric), e = 1 / N_G (so a metric at zero on both sides counts as a tie, not
   as infinity). A variant that changes the sampler itself (``extract.scheduler``, ``steps``, ``eta``,
   ``clip_model_output``) also reruns Cond and UnCond with that sampler, and its best baseline is the best
   of both samplers' baselines: a sampler that makes every method memorize more is not a SIDE win.

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
from ..pipeline import ProgressFactory, _no_progress, run_audit
from ..runs import RunDir, read_json
from ..sweeps import share_stages
from . import machine_description, write_results
from .extraction import (BASELINES, SIDE_METHODS, ExtractionBenchConfig, _scale_run_config, _share_from_sibling_seed,
                         _tag, compact, ensure_bands, ensure_target, metric_values, ratios_to_best_baseline,
                         training_set)

SCHEMA = "side-extract/bench-variants/1"
BASE = "base"
# what a variant may not change: the comparison with the baselines needs the same target, training set,
# N_G, seeds and measurement (the benchmark sets them)
FIXED = ("model", "train", "train_resize", "extract.n", "extract.seed", "extract.methods", "evaluate", "sweep")
DEFAULT_OBJECTIVE = ("ams_cumulative/high", "ams_cumulative/mid", "ums_cumulative/high", "ums_cumulative/mid",
                     "carlini")


def dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"extract.t_hi": 0.5}`` -> ``{"extract": {"t_hi": 0.5}}`` (nested dicts are merged as they are)."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        if not all(parts):
            raise ValueError(f"override key {key!r} must be dotted section.field names, e.g. 'extract.t_hi'")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override key {key!r} conflicts with another override of {p!r}")
        node[parts[-1]] = cfg.merge(node.get(parts[-1], {}), value) if isinstance(value, dict) else value
    return out


def apply_overrides(rc: cfg.RunConfig, overrides: dict[str, Any], where: str) -> cfg.RunConfig:
    """``rc`` with dotted ``overrides`` applied; an unknown key or a bad value names ``where`` it came from."""
    return cfg.from_dict(cfg.RunConfig, cfg.merge(cfg.to_dict(rc), dotted_to_nested(overrides)), where=where)


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
        bad = [m for m in self.methods if m not in SIDE_METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods={list(self.methods)}: each must be one of {', '.join(SIDE_METHODS)}")
        if self.heldout not in ("chosen", "all"):
            raise ValueError(f"heldout={self.heldout!r} must be 'chosen' or 'all'")
        if self.heldout_seed is not None and self.heldout_seed == self.validation_seed:
            raise ValueError(f"heldout_seed={self.heldout_seed} must differ from validation_seed "
                             f"(settings are chosen on the validation seed)")
        known = {"ams/", "ums/", "ams_cumulative/", "ums_cumulative/"}
        for name in self.objective:
            if name not in ("p95", "carlini", "gu") and not any(name.startswith(k) for k in known):
                raise ValueError(f"objective metric {name!r} is not a metric name (ams/<band>, ums/<band>, "
                                 "ams_cumulative/<band>, ums_cumulative/<band>, p95, carlini, gu)")
        for name in self.names:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"variant name {name!r} must be non-empty, without '/', not starting with '.'")
            for key in (self.base if name == BASE else self.variants[name]):
                if any(key == f or key.startswith(f + ".") for f in FIXED):
                    raise ValueError(f"{name}: {key!r} cannot be varied (the benchmark fixes {', '.join(FIXED)} so "
                                     "that every variant is measured like the baselines)")
            self.run_config(name)  # every override is checked up front, not after an hour of runs

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
    """``base`` and ``variants`` of a variants YAML file (each a mapping of dotted keys to values)."""
    data = cfg.load_yaml(path)
    unknown = set(data) - {"base", "variants"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected 'base' and 'variants'")
    base = data.get("base") or {}
    variants = data.get("variants") or {}
    if not isinstance(base, dict) or not isinstance(variants, dict) or not all(isinstance(v, dict) or v is None
                                                                                 for v in variants.values()):
        raise ValueError(f"{path}: 'base' must map dotted keys to values and 'variants' must map names to such maps")
    return base, {str(k): dict(v or {}) for k, v in variants.items()}


def objective_score(per_scale: list[dict[str, Any]], metrics: tuple[str, ...]) -> float:
    """Mean over scales and ``metrics`` of log((v + e) / (b + e)), e = 1 / N_G (p95: log(b / v), a distance).

    ``per_scale``: ``[{"n_generated": N_G, "side": metrics.json, "baselines": {name: metrics.json}}]``.
    """
    terms = []
    for s in per_scale:
        e = 1.0 / s["n_generated"]
        side = metric_values(s["side"])
        base = {b: metric_values(m) for b, m in s["baselines"].items()}
        for name in metrics:
            v, better = side[name]
            if better == "higher":
                b = max(bv[name][0] for bv in base.values())
                terms.append(math.log((v + e) / (b + e)))
            else:
                b = min(bv[name][0] for bv in base.values())
                terms.append(math.log(b / v) if v > 0 and b > 0 else 0.0)
    return sum(terms) / len(terms) if terms else float("nan")


SAMPLER_KEYS = ("scheduler", "steps", "eta", "clip_model_output")


def sampler_settings(rc: cfg.RunConfig) -> dict[str, Any]:
    """The extraction settings that change unguided samples too (a variant changing them reruns the baselines)."""
    return {k: getattr(rc.extract, k) for k in SAMPLER_KEYS}


def _scale_inputs(vc: VariantsBenchConfig, n: int, cache: Path, device: str, progress: ProgressFactory):
    bc = vc.bench
    train, train_path, heldout = training_set(n, bc.size, cache)
    target = ensure_target(bc.target, n, bc.size, cache, device=device, progress=progress)
    bands = ensure_bands(train, heldout, bc.run.evaluate, cache, _tag(n, bc.size), model=target["path"], device=device)
    return target, train_path, bands


def _scale_config(vc: VariantsBenchConfig, name: str, target: dict, train_path: Path, bands: Path, seed: int,
                  methods: tuple[str, ...]) -> cfg.RunConfig:
    rc = vc.run_config(name)
    rc = _scale_run_config(dataclasses.replace(vc.bench, run=rc), target, train_path, bands)
    return dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, seed=seed, methods=methods))


def run_seed(vc: VariantsBenchConfig, seed: int, names: list[str], cache: Path, *, device: str = "cpu",
             progress: ProgressFactory = _no_progress) -> dict[str, Any]:
    """Variants ``names`` on every scale at extraction seed ``seed``: metrics, ratios and objective of each."""
    out: dict[str, Any] = {"seed": seed, "scales": [], "variants": {}}
    per_variant: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
    for n in sorted(vc.bench.scales):
        target, train_path, bands = _scale_inputs(vc, n, cache, device, progress)
        main_path = cache / "runs" / Path(target["path"]).name / f"seed-{seed}"
        _share_from_sibling_seed(main_path)
        all_methods = tuple(dict.fromkeys((*vc.methods, *BASELINES)))
        main_rc = _scale_config(vc, BASE, target, train_path, bands, seed, all_methods)
        main = run_audit(main_path, main_rc, device=device, progress=progress)
        baselines = {b: main.metrics[b] for b in BASELINES}
        scale: dict[str, Any] = {"n_train": n, "n_generated": main_rc.extract.n, "run": str(main_path),
                                 "baselines": {b: compact(m) for b, m in baselines.items()}, "variants": {}}
        for name in names:
            t0 = time.time()
            own: dict[str, dict] = {}
            if name == BASE:
                metrics, run_path = {m: main.metrics[m] for m in vc.methods}, main_path
            else:
                run_path = main_path / "variants" / name
                share_stages(RunDir(main_path), RunDir(run_path))
                rc = _scale_config(vc, name, target, train_path, bands, seed, vc.methods)
                resampled = sampler_settings(rc) != sampler_settings(main_rc)
                if resampled:  # the baselines also get the variant's sampler: a sampler alone is no SIDE win
                    rc = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, methods=all_methods))
                metrics = run_audit(run_path, rc, device=device, progress=progress).metrics
                own = {f"{b} ({name})": metrics.pop(b) for b in BASELINES if resampled}
            best_of = {**baselines, **own}
            scale["variants"][name] = {
                "run": str(run_path), "seconds": round(time.time() - t0, 1),
                "methods": {m: compact(v) for m, v in metrics.items()},
                "own_baselines": {b: compact(v) for b, v in own.items()},
                "ratios": ratios_to_best_baseline({**metrics, **best_of}, side_methods=vc.methods,
                                                  baselines=tuple(best_of)),
            }
            per_variant[name].append({"n_generated": main_rc.extract.n, "metrics": metrics, "baselines": best_of})
        out["scales"].append(scale)
    for name, rows in per_variant.items():
        out["variants"][name] = {
            "overrides": {} if name == BASE else vc.variants[name],
            "objective": {m: objective_score([{"n_generated": r["n_generated"], "side": r["metrics"][m],
                                               "baselines": r["baselines"]} for r in rows], vc.objective)
                          for m in vc.methods},
        }
    return out


def choose(validation: dict[str, Any], method: str) -> str:
    """The variant with the highest validation objective for ``method`` (``base`` wins ties)."""
    scores = {name: v["objective"][method] for name, v in validation["variants"].items()}
    best = max(scores, key=lambda k: (scores[k], k == BASE))
    return best if scores[best] > scores[BASE] else BASE


def run_variants_bench(vc: VariantsBenchConfig, cache: str | Path, *, device: str = "cpu",
                       progress: ProgressFactory = _no_progress, command: str | None = None) -> dict[str, Any]:
    """Score every variant on the validation seed, choose, then run the held-out seed; the results dict."""
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
    from .tables import render_variants_markdown

    return write_results(out, "variants", data, render_variants_markdown(data))


def read_variants_results(path: str | Path) -> dict[str, Any]:
    data = read_json(path)
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {data.get('schema')!r} is not {SCHEMA!r}")
    return data


__all__ = ["VariantsBenchConfig", "load_variants_file", "apply_overrides", "dotted_to_nested", "objective_score",
           "run_seed", "choose", "run_variants_bench", "write_variants_results", "read_variants_results", "BASE",
           "DEFAULT_OBJECTIVE"]
