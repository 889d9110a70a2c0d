"""The audit report of a run directory: ``RUN/report/report.json`` (the source of truth) and one
self-contained ``RUN/report/report.html`` (inline CSS, PNGs as data URIs, no script, nothing fetched).

:func:`build_report` reads what the stages wrote (every input but ``config.yaml`` optional; a section whose
inputs are missing is left out and listed in ``notes``) into a JSON-safe dict. :func:`render_html` draws that
dict; only the pixels of the image pairs are read from the run (by the indices the dict names).

Sections: method comparison (AMS / UMS per band, exclusive and cumulative, p95, Carlini, Gu, N_G), the
closest generations beside their nearest training images, best scores against the null, extractions per
surrogate cluster / target label, classifier accuracy per timestep quartile, sweep curves, the N_G law,
config / fingerprints / versions / timings.
"""
from __future__ import annotations

import itertools
import logging
import math
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from . import config as cfg
from . import report_plots as plots
from .data import ImageSet, load_image_set
from .evaluation import incomparable, measured_generations
from .metrics import Z95, closest_first
from .runs import (MODEL_INPUT, SYNTHETIC_EVALUATION, atomic_write_bytes, atomic_write_json, check_run_directory,
                   evaluated_methods, evaluated_synthetic, npz_arrays, read_json, read_model_entry, read_run_config,
                   read_stages, run_input, run_locked, stage_now, stale_stages, sweep_leftovers)
from .findings import not_compared
from .summary import findings_file_current, summary_and_findings
from .sweeps import SWEEPABLE, current_sweeps, own_value, stale_sweeps, sweep_configs

log = logging.getLogger(__name__)

SCHEMA = "side-extract/report/1"
CLASSIFIERS = ("classifier", "classifier-teacher", "classifier-clean")
HIST_BINS = 40


# --------------------------------------------------------------------------------------------------
# data


def _per_generation(d: Path) -> dict[str, np.ndarray] | None:
    p = d / "per_generation.npz"
    if not p.is_file():
        return None
    return npz_arrays(p)


def _comparison(metrics: dict[str, dict], apart: dict[str, str] | None = None) -> dict[str, Any]:
    """Columns (AMS / UMS per band, exclusive then cumulative, p95, Carlini, Gu, N_G) and the best per column.
    ``apart``: the evaluations no candidate for a best (a run's :func:`~side_extract.findings.not_compared`; None:
    those of another training set or metric settings than the largest group that agree)."""
    bands: list[str] = []
    for m in metrics.values():
        bands += [b for b in closest_first(m["bands"], m["orientation"])[::-1] if b not in bands]
    # an evaluation of another training set or Carlini's or Gu's settings is no candidate for any best (the same
    # images under another alpha were highlighted as extracting the most); other similarities or bands are weighed
    # column by column below
    # (nor is an evaluation of another target's generations, an earlier call's: noted on the page)
    apart = incomparable(metrics, ("training set", "metric settings")) if apart is None else apart
    compared = [m for n, m in metrics.items() if n not in apart] or list(metrics.values())

    def one_set(of: list[dict]) -> bool:  # (bands compared as dicts: the same edges in another key order were "other")
        return all((m["similarity"], m["bands"]) == (of[0]["similarity"], of[0]["bands"]) for m in of)

    # the candidates' bands decide whether a band column has a best (one set apart in other bands turned off every
    # best between the methods compared); the caption lists each method's bands where any differs
    same, same_compared = one_set(list(metrics.values())), one_set(compared)
    # UMS is distinct images over the generations made, not a rate: where methods made other numbers of generations
    # (dedup-driven stopping, or generations evaluated apart) a larger UMS need not be more images, so none is
    # marked best; AMS, Carlini and Gu are rates per generation and stay comparable
    ums = "max" if len({m["n_generated"] for m in compared}) == 1 else None
    cols = [{"key": f"{k}:{b}", "group": g, "label": b, "unit": "%",
             "better": (ums if k.startswith("ums") else "max") if same_compared else None}
            for k, g in (("ams", "AMS exclusive (%)"), ("ums", "UMS exclusive (%)"),
                         ("ams_cumulative", "AMS cumulative (%)"), ("ums_cumulative", "UMS cumulative (%)"))
            for b in bands]
    orients = {m["orientation"] for m in compared}
    orient = orients.pop() if len(orients) == 1 else None
    p95_label = {"similarity": "p95 best sim.", "distance": "p5 best dist."}.get(orient, "p95 / p5")
    # p95 is comparable only within one similarity (cosine:pixels and cosine:pixels-pca share an orientation, not
    # a scale)
    one_space = len({m["similarity"] for m in compared}) == 1
    cols += [{"key": "p95", "group": None, "label": p95_label, "unit": "", "better":
              {"similarity": "max", "distance": "min"}.get(orient) if one_space else None},
             {"key": "carlini", "group": None, "label": "Carlini extracted (%)", "unit": "%", "better": "max"},
             {"key": "gu", "group": None, "label": "Gu memorized (%)", "unit": "%", "better": "max"},
             {"key": "n_generated", "group": None, "label": "N_G", "unit": "", "better": None}]
    rows = []
    for name, m in metrics.items():
        v: dict[str, Any] = {f"{k}:{b}": m[k].get(b) for k in ("ams", "ums", "ams_cumulative", "ums_cumulative")
                             for b in bands}
        v |= {"p95": m["p95"], "carlini": m["carlini"]["extracted_fraction"], "gu": m["gu"]["memorized_fraction"],
              "n_generated": m["n_generated"]}
        rows.append({"method": name, "values": v, "not_compared": apart.get(name)})
    best: dict[str, list[str]] = {}
    candidates = [r for r in rows if r["method"] not in apart]
    for c in cols:
        vals = [(r["method"], r["values"][c["key"]]) for r in candidates if r["values"][c["key"]] is not None]
        if c["better"] and len(candidates) > 1 and len({v for _, v in vals}) > 1:
            target = (max if c["better"] == "max" else min)(v for _, v in vals)
            best[c["key"]] = [n for n, v in vals if v == target]
    header = [{"label": g, "span": len(list(cs))} for g, cs in itertools.groupby(cols, key=lambda c: c["group"])]
    return {"columns": cols, "header": header, "rows": rows, "best": best, "bands": bands, "same_bands": same,
            "compared_same_bands": same_compared}


def _sole_best(rows: list[dict[str, Any]], key: str, *, low: bool) -> str | None:
    """The method whose ``key`` is lowest (``low``) or highest, or None where another method ties it (precision
    1.0 for several at small N_G: the first in the table was marked best)."""
    target = (min if low else max)(r[key] for r in rows)
    at = [r["method"] for r in rows if r[key] == target]
    return at[0] if len(at) == 1 else None


def _quality(metrics: dict[str, dict], apart: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Sample quality rows per feature space (``metrics.json`` ``quality``), or None where none was measured.
    ``apart``: the evaluations no candidate for a best, as in :func:`_comparison` (shown, marked; they competed, and
    an earlier call's generations of another target were highlighted as the run's best)."""
    apart = apart or {}
    spaces: dict[str, list[dict[str, Any]]] = {}
    skipped = []
    for name, m in metrics.items():
        q = m.get("quality") or {}
        if "skipped" in q:
            skipped.append(f"{name}: {q['skipped']}")
        for space, v in q.items():
            if space != "skipped":
                spaces.setdefault(space, []).append({"method": name, **v, "not_compared": apart.get(name)})
    if not spaces and not skipped:
        return None
    # Frechet's bias and the k-NN radii of precision and recall move with N: a best among other N_G (dedup-driven
    # stopping) or references was marked against the caption's "compare at equal N only"; KID is unbiased
    def same_n(rows: list[dict[str, Any]]) -> bool:
        return len({(r.get("n_generated"), r.get("n_reference"), r.get("k")) for r in rows}) == 1

    def same_reference(rows: list[dict[str, Any]]) -> bool:  # (an evaluation made before it was recorded: unknown,
        # taken as the run's one reference, as the report took it then)
        return len({(r.get("reference") or {}).get("fingerprint") for r in rows} - {None}) <= 1

    candidates = {s: [r for r in rows if not r["not_compared"]] for s, rows in spaces.items()}
    best = {s: {k: _sole_best(rows, k, low=k in ("frechet", "kid"))
                if same_reference(rows) and (k == "kid" or same_n(rows)) else None
                for k in ("frechet", "kid", "precision", "recall")}
            for s, rows in candidates.items() if len(rows) > 1}
    other_references = [s for s, rows in candidates.items() if not same_reference(rows)]
    for s, rows in candidates.items():  # KID comes with its standard error: a best within the noise is no best
        if s in best and best[s]["kid"] is not None:
            low = next(r for r in rows if r["method"] == best[s]["kid"])
            if any(r is not low and r["kid"] - low["kid"] <= Z95 * math.hypot(r.get("kid_se") or 0.0,
                                                                                low.get("kid_se") or 0.0)
                   for r in rows):
                best[s]["kid"] = None
    return {"spaces": spaces, "best": best, "skipped": skipped, "other_references": other_references}


def _top(table: dict[str, np.ndarray], orientation: str, k: int) -> list[dict[str, Any]]:
    """The ``k`` closest generations, one per nearest training image, closest first."""
    s = table["similarity"].astype(float)
    order = np.lexsort((table["generation_id"], -s if orientation == "similarity" else s))
    near, band = table["nearest_train_index"], table["band"].astype(str)
    out, seen = [], set()
    for i in order:
        t = int(near[i])
        if t in seen:
            continue
        seen.add(t)
        same = near == t
        out.append({"rank": len(out) + 1, "generation_id": int(table["generation_id"][i]),
                    "target_label": int(table["target_label"][i]), "nearest_train_index": t,
                    "nearest_train_id": int(table["nearest_train_id"][i]), "similarity": float(s[i]),
                    "band": str(band[i]), "carlini_ratio": float(table["carlini_ratio"][i]),
                    "gu_ratio": float(table["gu_ratio"][i]), "n_generations_same_nearest": int(same.sum()),
                    "n_in_band_same_nearest": int((same & (band != "")).sum())})
        if len(out) == k:
            break
    return out


def _histograms(run: Path, metrics: dict[str, dict], tables: dict[str, dict]) -> list[dict[str, Any]]:
    """Histograms of each method's best score, grouped by similarity, with the null the bands came from: the
    ``null.npz`` beside the bands file the evaluations name (the run's own calibration, ``evaluation/bands.json``,
    or a file the run was given); none for bands that came from no file (fixed bands, the paper's), even where an
    earlier calibration's files are still in the run."""
    given = next((m for m in metrics.values() if str(m.get("bands_source", "")).startswith("file:")), None)
    cal_dir: Path | None = None
    own = run / "evaluation"
    if given is not None:
        named = Path(str(given["bands_source"])[5:])

        def same_bands(d: Path) -> bool:  # the file still holds the bands the evaluations used
            return (d / "bands.json").is_file() and read_json(d / "bands.json", dict).get("bands") == given.get("bands")

        if named.parts[-2:] == ("evaluation", "bands.json") and same_bands(own):
            cal_dir = own  # the run's own calibration, however its path was spelled, or the run copied or moved
        elif named.is_file() and same_bands(named.parent):
            cal_dir = named.parent  # another run's calibration (not a stale one of this run's)
    cal = read_json(cal_dir / "bands.json", dict) if cal_dir is not None and (cal_dir / "bands.json").is_file() else {}
    nulls: dict[str, np.ndarray] = {}
    if cal_dir is not None and (cal_dir / "null.npz").is_file():
        nulls = {k: v.astype(float) for k, v in npz_arrays(cal_dir / "null.npz").items()}
    out = []
    for spec in dict.fromkeys(m["similarity"] for m in metrics.values()):
        names = [n for n, m in metrics.items() if m["similarity"] == spec and n in tables]
        if not names:
            continue
        null = nulls if cal.get("similarity") == spec else {}
        vals = [tables[n]["similarity"].astype(float) for n in names] + list(null.values())
        lo, hi = min(float(v.min()) for v in vals), max(float(v.max()) for v in vals)
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, HIST_BINS + 1)
        first = metrics[names[0]]
        out.append({"similarity": spec, "orientation": first["orientation"], "bands": first["bands"],
                    "method_bands": {n: metrics[n]["bands"] for n in names},  # (each panel shaded with its own)
                    "edges": edges.tolist(),
                    "methods": {n: np.histogram(tables[n]["similarity"], edges)[0].tolist() for n in names},
                    "null": {k: np.histogram(v, edges)[0].tolist() for k, v in null.items()},
                    "null_n": {k: len(v) for k, v in null.items()},
                    "null_file": str((cal_dir / "null.npz").resolve()) if null else None,  # (as typed: two renders
                    # differed, and a relative path named nothing once the page was opened elsewhere)
                    # where the bands came from: said of the run's own calibration only (another run's file is named)
                    "null_source": cal.get("null_source") if null and cal_dir == own else None,
                    "bands_source": first.get("bands_source")})
    return out


def _by_label(table: dict[str, np.ndarray], bands: list[str], clusters: dict[int, dict] | None) -> list[dict]:
    labels, band = table["target_label"].astype(int), table["band"].astype(str)
    rows = []
    for lab in np.unique(labels[labels >= 0]):
        sel = labels == lab
        row = {"label": int(lab), "n": int(sel.sum()), "bands": {b: int((sel & (band == b)).sum()) for b in bands},
               "distinct_train_in_top": int(len(np.unique(table["nearest_train_index"][sel & (band == bands[0])])))
               if bands else 0}
        if clusters is not None:  # a label the clustering does not hold (remade since) shows as missing
            info = clusters.get(int(lab)) or {}
            row |= {"size": info.get("size"), "cohesion": info.get("cohesion"), "kept": info.get("kept")}
        rows.append(row)
    return rows


SURROGATE_METHODS = ("side", "side-lora")  # the methods whose target labels are the surrogate clusters


def _clusters(run: Path, metrics: dict[str, dict], tables: dict[str, dict],
              stale_from: dict[str, list[str]]) -> dict[str, Any] | None:
    """Generations in the two closest bands per target label; for ``side``, joined with cluster size/cohesion
    (``stale_from``: :func:`~side_extract.runs.stale_stages` of the run)."""
    p = run / "surrogate" / "clusters.json"
    info = read_json(p, dict) if p.is_file() else None
    items = None if info is None else info.get("clusters")
    if info is not None and not (isinstance(items, list)
                                 and all(isinstance(c, dict) and isinstance(c.get("id"), int) for c in items)):
        raise ValueError(f"{str(p)!r} has no 'clusters' list of objects with an integer 'id'; it is damaged: restore "
                         "or delete it")
    by_id = {c["id"]: c for c in items} if info is not None else None
    # `side cluster` remade the labels after a SIDE form's extraction: their sizes are not the extraction's
    stale = by_id is not None and any("surrogate" in stale_from.get(f"extraction/{m}", []) for m in SURROGATE_METHODS
                                      if m in tables)
    methods = {}
    for n, t in tables.items():
        if not (t["target_label"] >= 0).any():
            continue
        bands = closest_first(metrics[n]["bands"], metrics[n]["orientation"])[:2]
        # both SIDE forms generate toward the surrogate clusters (side-lora through its fine-tuned labels)
        # (their size, cohesion and kept columns empty where the clustering is not the extraction's: remade since, or
        # no clusters.json, an evaluation side evaluate wrote into a run that clustered nothing, whose page failed)
        surrogate = n in SURROGATE_METHODS
        joined = by_id if by_id is not None and "surrogate" not in stale_from.get(f"extraction/{n}", []) else {}
        methods[n] = {"kind": "surrogate cluster" if surrogate else "target class", "bands": bands,
                      "rows": _by_label(t, bands, joined if surrogate else None)}
    if info is None and not methods:
        return None
    summary = {k: info[k] for k in ("tau", "kept", "n_clusters", "labelled") if k in info} if info else None
    if summary is not None:
        summary |= {"background": info.get("background"), "candidates": info.get("candidates"), "stale": stale}
    return {"surrogate": summary, "clusters": info["clusters"] if info else [], "methods": methods}


def _classifiers(run: Path) -> dict[str, Any]:
    out = {}
    for name in CLASSIFIERS:
        p = run / name / "config.json"
        if p.is_file():
            saved = read_json(p, dict)
            hist = saved.get("history") or []
            final = next((h["accuracy"] for h in reversed(hist) if h.get("accuracy")), {})
            balanced = next((h["balanced_accuracy"] for h in reversed(hist) if h.get("balanced_accuracy")), {})
            labels = saved.get("heldout_labels")  # what the recall averages over
            out[name] = {"history": hist, "final": final, "steps": hist[-1]["step"] if hist else 0,
                         "majority": saved.get("majority_rate"), "balanced": balanced,
                         "balanced_chance": 1 / labels if balanced and labels else None}
    return out


def _sweeps(run: Path, metrics: dict[str, dict], config: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """``sweeps/<param>=<value>/evaluation/<method>/metrics.json`` -> per param and method: metric vs value;
    this run's own result joins the curve at its configured value of the parameter."""
    found: dict[str, dict[str, dict[Any, dict]]] = {}
    rc = cfg.from_dict(cfg.RunConfig, config)  # (check_run_directory has read it so already)
    current = current_sweeps(run, rc)
    configs = dict(sweep_configs(rc))  # each sub-run's config, as the sweep makes it
    if stale := stale_sweeps(run, rc, current):  # (said in a log line only: the page said "no sweeps/")
        notes.append(f"sweeps/{', sweeps/'.join(stale)} left out: not a value of the run's sweep, or made under other "
                     "settings of the run (an earlier config's); sweep again to bring them up to date")
    own = []  # sub-runs whose every evaluation is the run's own (a value equal to the run's): no point of their own
    for d in current.values():
        param = d.name.split("=", 1)[0]
        shared = {k for k, e in read_stages(d).items() if e.get("shared_from")}  # the parent's result, not swept
        held = evaluated_methods(d)
        evaluated = {m: md for m, md in held.items() if f"evaluation/{m}" not in shared}
        sub = configs[d.name]  # (current_sweeps names only sub-runs sweep_configs makes)
        swept = sub.extract.methods
        if swept and all(m in held and m not in evaluated for m in swept):  # every swept method's is the run's (not
            # a sub-run cut short before its own evaluations, which holds only the run's unguided ones)
            own.append(d.name)
        for m, md in evaluated.items():
            # (where it sits on its curve: the value it was made with; its folder's name rounds to 6 digits)
            found.setdefault(param, {}).setdefault(m, {})[float(own_value(sub, param, m))] = read_json(
                md / "metrics.json", dict)
    if own:  # (the page said there was no sweeps/ at all)
        notes.append(f"sweeps/{', sweeps/'.join(own)} holds the run's own results (the swept value is the run's "
                     "own), drawn as the run's point of the curve")
    out: dict[str, Any] = {}
    for param, per_method in found.items():
        out[param] = {}
        for m, runs in per_method.items():
            if param in SWEEPABLE and m in metrics:  # (Cond's own lambda is cond_scale: it joined at extract.scale)
                runs.setdefault(float(own_value(rc, param, m)), metrics[m])
            values = sorted(runs)
            ref = next(iter(runs.values()))
            bands = closest_first(ref["bands"], ref["orientation"])
            series = {f"AMS {b}": [runs[v]["ams"].get(b) for v in values] for b in bands}
            series[f"UMS {bands[0]}"] = [runs[v]["ums"].get(bands[0]) for v in values]
            series["Carlini"] = [runs[v]["carlini"]["extracted_fraction"] for v in values]
            series["Gu"] = [runs[v]["gu"]["memorized_fraction"] for v in values]
            reference = {f"{n} AMS {bands[0]}": r["ams"][bands[0]] for n, r in metrics.items()
                         if n not in per_method and r["bands"] == ref["bands"] and bands[0] in r["ams"]}
            out[param][m] = {"values": values, "series": series, "reference": reference}
    return out


THEORY_ROWS = {"m_uncond": "M(D_c; p): unconditional model", "m_guided": "M(D_c; p_c): guided toward the class",
               "m_opt_uncond": "M(D_c; KDE of D): empirical optimum", "m_opt_cond": "M(D_c; KDE of D_c): conditional optimum",
               "gain_model": "gain of the model: guided - unconditional", "gain_opt": "gain of the optimum"}


def _theory(run: Path, config: dict[str, Any], notes: list[str],
            stale_of: dict[str, list[str]]) -> dict[str, Any] | None:
    """``theory/measure.json`` (``side theory measure RUN``): the divergences with 95% intervals, the verdicts; left
    out, with a note, where the run's classifier or training set is no longer the one it measured, or the classifier
    was made from results made again since (``stale_of``: :func:`~side_extract.runs.stale_stages`; another target)."""
    path = run / "theory" / "measure.json"
    if not path.is_file():
        return None
    m = read_json(path, dict)
    stages = read_stages(run)
    clf = stages.get("classifier") or {}
    now = clf.get("fingerprint") if clf.get("status") == "complete" else None
    # the training set's contents as the run's finished stage that read it last recorded them (the same path holding
    # other images, the stages made again from them, showed the divergences of the old ones; a stage of a method no
    # longer run keeps the images it was made from, so the newest alone tells the set now)
    read = sorted((float(e.get("started_unix") or 0), e["data"]["training set"]) for e in stages.values()
                  if e.get("status") == "complete" and isinstance(e.get("data"), dict)
                  and isinstance(e["data"].get("training set"), str))
    read_since = {read[-1][1]} if read else set()
    # (its training set where it is now: one saved into the run's inputs/ moved with the run)
    stale = (f"training set ({m['train']!r})"
             if "train" in m and run_input(run, m["train"]) != config.get("train") else
             f"training set ({m['train']!r}, its images changed since)"
             if "train_fingerprint" in m and read_since - {m["train_fingerprint"]} else
             "classifier" if "classifier_fingerprint" in m and m["classifier_fingerprint"] != now else
             "classifier and target (the run's inputs were made again since)" if stale_of.get("classifier") else None)
    if stale:
        notes.append(f"theory/measure.json was measured on a {stale} the run no longer holds: the theory section is "
                     "left out; run side theory measure RUN again")
        return None
    if "classifier_fingerprint" not in m:  # (written before the file recorded it)
        notes.append("theory/measure.json does not record which classifier it measured (made by an earlier "
                     "release): it may describe an earlier one; run side theory measure RUN again to be sure")
    rows = [{"key": k, "label": label, **m[k]} for k, label in THEORY_ROWS.items() if isinstance(m.get(k), dict)]
    return {"rows": rows, "ordering": m.get("ordering", {}), "eps": m.get("eps"), "guidance_scale": m.get("guidance_scale"),
            "n_points": len(m.get("index", [])), "n_steps": m.get("n_steps"), "sigma_min": m.get("sigma_min")}


def shows_the_run_now(run: str | Path) -> bool | None:
    """Whether ``RUN/report/report.json`` lists the stages the run's manifest holds now, each as it is (status and
    fingerprint): False where a stage was made since it was written (a run with --no-report, a step command); None
    where there is no readable report."""
    try:
        listed = read_json(Path(run) / "report" / "report.json", dict).get("stages") or []
    except (OSError, ValueError):  # (none, or a damaged one: side report writes it again)
        return None
    shown = {e.get("stage"): (e.get("status"), e.get("fingerprint")) for e in listed if isinstance(e, dict)}
    return shown == {k: (e.get("status"), e.get("fingerprint")) for k, e in read_stages(run).items()}


def _stages(run: Path) -> tuple[list[dict], dict[str, list[str]]]:
    stages, versions = [], {}
    for name, e in read_stages(run).items():
        info = {k: v for k, v in e.items() if k not in ("status", "fingerprint", "inputs", "versions", "seconds",
                                                          "started", "started_unix")}
        stages.append({"stage": name, "status": e.get("status"), "seconds": e.get("seconds"),
                       "fingerprint": e.get("fingerprint"), "inputs": e.get("inputs", {}), "started": e.get("started"),
                       "info": info})
        for dist, ver in (e.get("versions") or {}).items():
            versions.setdefault(dist, [])
            if ver not in versions[dist]:
                versions[dist].append(ver)
    return stages, versions


def build_report(run_dir: str | Path, *, top: int = 8) -> dict[str, Any]:
    """Everything the report shows, JSON-safe (see the module docstring); ``top`` image pairs per method."""
    run = check_run_directory(run_dir, "run_dir")
    cfg.check_int(top, "top", 1)  # (2.5 passed, and a pair was shown for every distinct nearest training image)
    text = (run / "config.yaml").read_text(encoding="utf-8")
    config = read_run_config(run)  # a damaged file: one error that names it
    notes = []
    dirs = evaluated_methods(run)  # the config's order, then the rest
    metrics = {n: read_json(d / "metrics.json", dict) for n, d in dirs.items()}
    tables = {n: t for n, d in dirs.items() if (t := _per_generation(d)) is not None}
    for n in metrics.keys() - tables.keys():
        notes.append(f"evaluation/{n}: no per_generation.npz, so no image pairs or histogram for {n}")
    if left := sorted(p.parent.name for p in (run / "evaluation").glob("*/metrics.json") if p.parent.name not in dirs):
        notes.append(f"evaluation of {', '.join(left)} left out: unfinished, or made from generations the run no "
                     "longer holds (evaluate again: side extract --run RUN, or side run)")
    elif not metrics and not config.get("train"):  # (the note sent it to the evaluation stage, which needs one)
        notes.append("no evaluation/<method>/metrics.json: the run's config names no training set (train), so nothing "
                     "was measured; give one (train: in the config, or --train) and run it again to evaluate")
    elif not metrics:
        notes.append("no evaluation/<method>/metrics.json: run the evaluation stage (side run / side evaluate)")
    if metrics and (run / SYNTHETIC_EVALUATION / "metrics.json").is_file() and evaluated_synthetic(run) is None:
        notes.append(f"{SYNTHETIC_EVALUATION}/ left out of the findings: unfinished, or made from a synthetic set the "
                     "run no longer holds (side run measures it again)")
    unfinished = {k: e for k, e in read_stages(run).items() if e.get("status") != "complete"}
    locked = run_locked(run) if unfinished else None
    configured = (config.get("extract") or {}).get("methods") or []
    for k, e in unfinished.items():  # (a stage left running by a killed process was shown as running, for good, in
        # the stage table at the page's end alone: nothing said that a method or stage was missing, or why)
        error = f" ({e['error']})" if e.get("error") else ""
        of = cfg.stage_methods(k)  # (a classifier of a method no longer named was said to be resumed: a review's)
        then = ("this report shows the run as it was" if locked and e.get("status") == "running" else
                f"left by an earlier configuration: a rerun leaves it as it is, unless extract.methods names "
                f"{' or '.join(sorted(of))} again" if of is not None and not of & set(configured) else
                "a rerun resumes it")
        notes.append(f"stage {k}: {e.get('status')}{error}, {stage_now(e.get('status'), locked)}; {then}")
    if metrics and (unmeasured := [m for m in configured if m not in metrics and m not in left]):
        notes.append(f"{', '.join(unmeasured)}: in the config's methods but not evaluated (no "
                     "evaluation/<method>/metrics.json), so this report leaves them out: the comparison and the "
                     "verdict are of the others (evaluate them: side extract --run RUN)")
    model = read_model_entry(run)
    stale = stale_stages(read_stages(run), model.get("fingerprint"))
    for n in metrics:
        if roots := stale.get(f"extraction/{n}"):
            said = [r if r != MODEL_INPUT else "the target (the run's config names another model now)" for r in roots]
            notes.append(f"extraction/{n} was made from earlier results of {', '.join(said)}, made again since: its "
                         f"figures describe the run before that (complete the run again to bring them up to date)")
    for name in CLASSIFIERS:  # (their accuracy was shown as current)
        if (run / name / "config.json").is_file() and (roots := stale.get(name)):
            said = [r if r != MODEL_INPUT else "the target (the run's config names another model now)" for r in roots]
            notes.append(f"{name} was made from earlier results of {', '.join(said)}, made again since: its accuracy "
                         "describes the run before that")
    stages, versions = _stages(run)
    for m in metrics.values():
        for dist, ver in (m.get("versions") or {}).items():
            versions.setdefault(dist, [])
            if ver not in versions[dist]:
                versions[dist].append(ver)
    keep = ("n_generated", "n_train", "similarity", "orientation", "bands", "bands_source", "band_rule", "ams", "ums",
            "ams_cumulative", "ums_cumulative", "p95", "p95_quantile", "carlini", "gu", "fingerprints", "sources",
            "quality", "config")  # (config: the resize side evaluate read the generations it names with)
    summary = summary_and_findings(run) if metrics else None  # (computed once: the report shows both)
    apart = not_compared(run, metrics, ("training set", "metric settings"))
    data: dict[str, Any] = {
        "schema": SCHEMA, "run": str(run.resolve()), "top": top,
        "summary": {"model": config.get("model"), "prediction": model.get("prediction"), "train": config.get("train"),
                    "methods": list(metrics) or (config.get("extract") or {}).get("methods", [])},
        "methods": {n: {k: m.get(k) for k in keep} | {"closest_band": closest_first(m["bands"], m["orientation"])[0]}
                    for n, m in metrics.items()},  # (the pairs mark each method's own closest band)
        "comparison": _comparison(metrics, apart) if metrics else None,
        "quality": _quality(metrics, apart),
        "audit_summary": summary[0] if summary else None,
        "findings_file_current": bool(summary) and findings_file_current(run, summary[1]),
        "top_pairs": {n: _top(t, metrics[n]["orientation"], top) for n, t in tables.items()},
        "histograms": _histograms(run, metrics, tables),
        "ng_law": {n: m["ng_law"] for n, m in metrics.items() if m.get("ng_law")},
        "clusters": _clusters(run, metrics, tables, stale), "classifiers": _classifiers(run),
        "sweeps": _sweeps(run, metrics, config, notes), "theory": _theory(run, config, notes, stale),
        "stages": stages, "versions": versions, "config": config, "config_yaml": text, "notes": notes}
    for key, what in (("clusters", "surrogate/clusters.json or labelled generations"),
                      ("classifiers", "classifier*/config.json"), ("sweeps", "sweeps/<param>=<value>/"),
                      ("stages", "manifest.json")):
        if not data[key] and not (key == "sweeps" and any(n.startswith("sweeps/") for n in notes)):
            notes.append(f"no {what}: that section is left out")
    return data


# --------------------------------------------------------------------------------------------------
# HTML


def _load_train(data: dict[str, Any], notes: list[str]) -> ImageSet | None:
    spec = data["summary"].get("train")
    if spec is None:
        notes.append("config.yaml names no training set: image pairs show the generations alone")
        return None
    config = data["config"]
    # as the run loaded it (train_resize); a config without that key: as `side evaluate` did (evaluate.resize)
    resize = config["train_resize"] if "train_resize" in config else (config.get("evaluate") or {}).get("resize")
    try:
        return load_image_set(spec, resize)
    except ValueError as e:
        notes.append(f"training set {spec!r} could not be loaded ({e}): image pairs show the generations alone")
        return None


def _pairs(data: dict[str, Any], run: Path, notes: list[str], size: int) -> dict[str, list[dict[str, Any]]]:
    """Image data URIs for each top pair: the generation from ``extraction/<method>`` (by id), the training image
    by index; each set only where its fingerprint matches the one the evaluation recorded."""
    train = _load_train(data, notes) if data["top_pairs"] else None
    train_fp = train.fingerprint() if train is not None else None
    out = {}
    for method, rows in data["top_pairs"].items():
        fps = data["methods"][method].get("fingerprints") or {}
        try:  # the images the evaluation measured: the run's extraction, or those side evaluate wrote it of (as
            # Audit.pairs: the extraction was taken, and called changed, where another set had been measured)
            gen = measured_generations(method, data["methods"][method], run / "extraction" / method)
        except ValueError as e:
            notes.append(str(e))
            gen = None
        tr = train
        if tr is not None and fps.get("train") not in (None, train_fp):
            notes.append(f"{method} was evaluated against another training set than {tr.name!r}: no training images")
            tr = None
        where = {int(g): i for i, g in enumerate(gen.ids)} if gen is not None else {}
        shown = gen if gen is not None else tr
        pixelated = shown is not None and max(shown.images.shape[1:3]) < size
        # side verify remakes the run's own extraction: not images side evaluate measured elsewhere (its command
        # was printed for them, and failed: "the run holds no extraction of it")
        own = gen is not None and Path(gen.name) == run / "extraction" / method
        out[method] = []
        for r in rows:
            g, t = where.get(r["generation_id"]), r["nearest_train_index"]
            out[method].append(r | {
                "gen_uri": None if g is None else plots.image_uri(gen.images[g], size),
                "train_uri": plots.image_uri(tr.images[t], size) if tr is not None and t < len(tr) else None,
                "pixelated": pixelated, "verifiable": own})
    return out


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "–"
    if unit == "%":  # (a share below 0.05 % read "0.0": one training image in a band of 2,500 generations lost)
        return f"{100 * value:.1f}" if value == 0 or abs(100 * value) >= 0.05 else f"{100 * value:.1g}"
    if isinstance(value, float):  # (times of 10,000 s and more read as 1.235e+04; 9,999.6 s rounds up to them)
        return f"{value:.0f}" if abs(value) >= 9999.5 else f"{value:.4g}"
    return str(value)


def render_html(data: dict[str, Any], run_dir: str | Path, *, image_size: int = 64) -> str:
    """The report page for ``data`` (from :func:`build_report` or a ``report.json``); pixels read from the run."""
    return _render(data, run_dir, image_size)[0]


def _render(data: dict[str, Any], run_dir: str | Path, image_size: int) -> tuple[str, list[str]]:
    """The page and its notes: ``data``'s and those met while reading the pixels (the training set not loaded,
    generations that cannot be shown), which ``report.json`` keeps too."""
    run = Path(run_dir)
    notes = list(data["notes"])
    figures: dict[str, Any] = {
        "histograms": [plots.histograms_figure(h) for h in data["histograms"] if h["methods"]],
        "ng_law": plots.ng_law_figure(data["ng_law"]) if data["ng_law"] else None,
        "classifiers": plots.classifier_figure(curves) if (curves := {
            n: c for n, c in data["classifiers"].items() if sum("accuracy" in h for h in c["history"]) > 1}) else None}
    figures["sweeps"] = {p: plots.sweep_figure(p, curves) for p, curves in data["sweeps"].items()}
    sweep_tables = {p: sweep_table(curves) for p, curves in data["sweeps"].items()}
    figures["theory"] = plots.theory_figure(data["theory"]["rows"]) if data.get("theory") else None
    clusters = data["clusters"] or {"methods": {}}
    figures["clusters"] = {m: plots.clusters_figure(c["rows"], c["bands"], c["kind"])
                           for m, c in clusters["methods"].items()
                           if c["rows"] and c["bands"]}
    pairs = _pairs(data, run, notes, image_size)
    notes = list(dict.fromkeys(notes))  # (data from a report.json holds the page's notes already: said twice)
    env = jinja2.Environment(loader=jinja2.FunctionLoader(_template), autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["shell"] = lambda v: shlex.quote(str(v))  # a command to paste: a path with spaces was two arguments
    return env.get_template("report.html.j2").render(d=data, figures=figures, pairs=pairs, notes=notes,
                                                     sweep_tables=sweep_tables), notes


def sweep_table(curves: dict[str, dict]) -> dict[str, Any]:
    """A sweep's table: one column per swept value of any method (``columns``), and per method and metric the
    value in each column, None where that method has none (an unfinished or stale sub-run): ``rows``."""
    columns = sorted({v for c in curves.values() for v in c["values"]}, key=lambda v: (isinstance(v, str), v))
    rows = [(method, name, [dict(zip(c["values"], ys)).get(v) for v in columns])
            for method, c in curves.items() for name, ys in c["series"].items()]
    return {"columns": columns, "rows": rows}


def _template(name: str) -> str:
    return (resources.files("side_extract") / "assets" / "templates" / name).read_text(encoding="utf-8")


MAX_IMAGE_SIZE = 1024


def write_report(run_dir: str | Path, *, top: int = 8, image_size: int = 64) -> Path:
    """Write ``RUN/report/report.json`` and the self-contained ``RUN/report/report.html``; returns the HTML path."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size!r} must be an integer from 1 to {MAX_IMAGE_SIZE} (pixels of each "
                         "image shown; every pair is inlined in the page)")
    cfg.check_path(run_dir, "run_dir")
    run = Path(run_dir)
    out = run / "report"
    if out.is_symlink() or (out.exists() and not out.is_dir()):  # (its files were written where it pointed)
        raise ValueError(f"{str(out)!r} is {'a symbolic link' if out.is_symlink() else 'a file'}, not the run's report "
                         "folder: remove it")
    data = build_report(run_dir, top=top)  # (checks run_dir first)
    html, notes = _render(data, run, image_size)  # before either file is written: never one without the other
    data = data | {"notes": notes}  # (the notes met while reading the pixels were the page's alone)
    if out.is_dir():  # a killed report's temporary files (a reader takes no lock, so no writer's sweep reaches them)
        sweep_leftovers(out)
    # (the page as bytes before either file is written: a run folder's name that is not UTF-8 failed the page's
    # encoding after report.json was written; the byte is shown as a replacement character)
    page = html.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace").encode("utf-8")
    atomic_write_json(out / "report.json", data)
    atomic_write_bytes(out / "report.html", page)
    log.info("report: %s", out / "report.html")
    return out / "report.html"
