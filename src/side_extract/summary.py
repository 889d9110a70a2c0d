"""The audit summary a person can act on: ``RUN/summary.json`` and the report's first screen.

For each method: how many distinct training images it reached per band (exclusive and cumulative: UMS counts,
every training image within the band of some generation; and ``distinct_nearest_cumulative``, the distinct
*nearest* training images of the generations at that band or closer, the fair benchmark's count), the estimate
at twice the budget (``estimated_2x``: Chao et al.'s extrapolation, which counts images not yet hit; the N_G law's
plug-in sum never passes the images already hit, so it is no projection), what it cost (seconds, images/s), where
dedup-driven stopping ended it
(``stopped``: after ``at`` of the ``of`` generations asked for), its sample quality, and the ratio of
each SIDE form to the best baseline per metric (shares per generation asked for, where a method stopped early:
:func:`per_budget`); the verdict in one sentence; and ``findings``, what every method and the synthetic set found
together and each one that no other did (:mod:`side_extract.findings`, whose ``RUN/findings.csv`` lists the training
images).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from .evaluation import distinct_count, generation_stats
from .findings import FILE, Findings, from_evaluations, not_compared, with_synthetic, write_findings
from .metrics import Band, closest_first
from .runs import atomic_write_json, evaluated_methods, generated_source, read_json, read_stages

SIDE_METHODS = ("side", "side-teacher", "side-lora")
BASELINES = ("cond", "uncond")
LABEL_FREE = ("memguide",)  # guided without labels (beyond the paper): neither a SIDE form nor a paper baseline
COMPARED = SIDE_METHODS + LABEL_FREE  # what is set against the best baseline
SCHEMA = "side-extract/summary/1"
Better = Literal["higher", "lower"]


def metric_values(metrics: dict[str, Any]) -> dict[str, tuple[float, Better]]:
    """Flatten one ``metrics.json`` into {name: (value, which direction means more memorization)}.

    Names: ``ams/<band>``, ``ums/<band>``, ``ams_cumulative/<band>``, ``ums_cumulative/<band>``, ``p95``,
    ``carlini`` (extracted fraction), ``gu`` (memorized fraction). p95 is a distance for rms-l2 (lower =
    closer to the training set) and a similarity for cosine.
    """
    out: dict[str, tuple[float, Better]] = {}
    for key in ("ams", "ums", "ams_cumulative", "ums_cumulative"):
        for band, v in metrics[key].items():
            out[f"{key}/{band}"] = (float(v), "higher")
    out["p95"] = (float(metrics["p95"]), "lower" if metrics["orientation"] == "distance" else "higher")
    out["carlini"] = (float(metrics["carlini"]["extracted_fraction"]), "higher")
    out["gu"] = (float(metrics["gu"]["memorized_fraction"]), "higher")
    return out


def ratios_to_best_baseline(methods: dict[str, dict[str, Any]], side_methods: tuple[str, ...] = COMPARED,
                            baselines: tuple[str, ...] = BASELINES, budgets: dict[str, int] | None = None,
                            ) -> dict[str, dict[str, dict[str, Any]]]:
    """SIDE / best baseline for every metric, for each SIDE variant present (and memorization guidance, label-free).

    The best baseline of a metric is the baseline with the most memorization by that metric (the largest
    fraction; the smallest p95 distance). ``ratio`` = side / best baseline, None when the baseline is 0
    (``side`` and ``best_baseline`` are kept, so nothing is lost). For ``better == "lower"`` (p95 as a
    distance) a ratio below 1 means SIDE comes closer. ``side_better`` says whether SIDE strictly beats it.
    ``budgets``: each method's number of generations (asked for); the distinct-image shares (``ums*``) are set only
    against the baselines given the method's budget, and where none was, not compared (``ratio`` and
    ``side_better`` None, ``unequal_budgets`` gives every budget): distinct images do not grow in proportion to
    N_G, so a ratio of shares favoured the smaller budget (1.86x for a method that had reached 0.37x the baseline's
    images).

    Returns ``{side_method: {metric: {side, best_baseline, best_baseline_method, ratio, better, side_better}}}``.
    """
    present = [b for b in baselines if b in methods]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    if not present:
        return out
    base_vals = {b: metric_values(methods[b]) for b in present}
    for s in side_methods:
        if s not in methods:
            continue
        rows = {}
        for name, (v, better) in metric_values(methods[s]).items():
            pick = max if better == "higher" else min
            # distinct images: only the baselines given the method's budget (a smaller one's share is inflated)
            pool = ([b for b in present if budgets[b] == budgets[s]] if name.startswith("ums") and budgets is not None
                    else present)
            best_method = pick(pool or present, key=lambda b: base_vals[b][name][0])
            b = base_vals[best_method][name][0]
            rows[name] = {"side": v, "best_baseline": b, "best_baseline_method": best_method,
                          "tied_baselines": [o for o in pool if o != best_method and base_vals[o][name][0] == b],
                          "ratio": None if b == 0 else v / b, "better": better,
                          "side_better": v > b if better == "higher" else v < b}
            if not pool:  # no baseline of the method's budget: not compared
                rows[name].update(ratio=None, side_better=None,
                                  unequal_budgets={s: budgets[s], **{o: budgets[o] for o in present}})
        out[s] = rows
    return out


def verdict_band(closest_first: list[str]) -> str:
    """The band the verdict counts at (``closest_first``: band names, the closest first): the second closest of
    three or more (the paper's mid band of low, mid, high), else the closest."""
    return closest_first[1] if len(closest_first) > 2 else closest_first[0]


def method_summary(m: dict[str, Any], stage: dict[str, Any] | None, eval_dir: Path | None = None) -> dict[str, Any]:
    """One method's row of the summary (see the module docstring); ``eval_dir``: its evaluation's directory, whose
    ``per_generation.npz`` gives the distinct nearest training images (None, or no such file: not given)."""
    n = int(m["n_generated"])
    nearest = None
    if eval_dir is not None and (eval_dir / "per_generation.npz").is_file():
        stats = generation_stats(eval_dir, [Band(b, lo, hi) for b, (lo, hi) in m["bands"].items()], m["orientation"])
        nearest = {b: distinct_count(stats, b) for b in m["bands"]}
    out: dict[str, Any] = {
        "n_generated": n,
        "distinct": {b: int(round(v * n)) for b, v in m["ums"].items()},
        "distinct_cumulative": {b: int(round(v * n)) for b, v in m["ums_cumulative"].items()},
        "distinct_nearest_cumulative": nearest,
        "estimated_2x": {}, "carlini_extracted": m["carlini"]["extracted_fraction"],
        "seconds": None, "images_per_second": None, "quality": m.get("quality") or {},
        "copy_guard": m.get("copy_guard")}
    for b, law in (m.get("ng_law") or {}).items():  # (an evaluation made before the estimate has none)
        est = dict(zip(law.get("n_grid") or [], law.get("extrapolated_unique") or []))
        if est.get(2 * n) is not None:
            out["estimated_2x"][b] = {"n_generated": 2 * n, "distinct": round(float(est[2 * n]), 1),
                                      "seen_once": law.get("q1"), "seen_twice": law.get("q2")}
    if stage and "stopped" in stage:  # dedup-driven stopping ended it before N_G (extract.stop_unseen)
        out["stopped"] = {**stage["stopped"], "of": stage.get("n")}
    if stage and (stage.get("resumed") or "grown_from" in stage):  # its seconds are the last session's alone
        out["timing"] = ("not kept: the extraction was resumed or grown, and the manifest's seconds count only its "
                         "last session")
    elif stage and stage.get("seconds"):
        out["seconds"] = stage["seconds"]
        out["images_per_second"] = round(n / stage["seconds"], 2) if stage["seconds"] > 0 else None
    return out


def verdict(metrics: dict[str, dict[str, Any]], methods: dict[str, dict[str, Any]],
            asked: dict[str, int] | None = None) -> str:
    """The audit in one sentence: distinct training images reached at the middle band or closer. ``asked``: the
    generations each method was asked for, where dedup-driven stopping made fewer (None: as many as it made); a
    ratio is given between methods asked for as many."""
    if not metrics:
        return "No method has been evaluated yet."
    first = next(iter(metrics.values()))
    band = verdict_band(closest_first(first["bands"], first["orientation"]))
    n_train = first["n_train"]
    count = {k: v["distinct_cumulative"][band] for k, v in methods.items()}
    n_of = {k: int(metrics[k]["n_generated"]) for k in methods}  # differ where dedup-driven stopping ended one
    sides = [k for k in SIDE_METHODS if k in count] or [k for k in LABEL_FREE if k in count]
    bases = [k for k in BASELINES if k in count]
    where = f"the '{band}' band or closer"
    asked = {**n_of, **(asked or {})}
    if sides and bases:
        s = max(sides, key=lambda k: count[k])
        # the best baseline among those asked for as many generations, as the ratio table takes it (across budgets
        # it named another baseline than the table and withheld the table's ratio)
        pool = [k for k in bases if asked[k] == asked[s]] or bases
        b = max(pool, key=lambda k: count[k])
        # (a ratio of counts made in other numbers of generations: the ratio table below refuses it, "N_G differs")
        def unequal(k: str) -> str:
            return f"no ratio: {k} was asked for {asked[k]} generations, {b} {asked[b]}"

        ratio = (unequal(s) if asked[s] != asked[b] else
                 f"{count[s] / count[b]:.2f}x" if count[b] else "the baseline found none")
        word = "more than" if count[s] > count[b] else ("as many as" if count[s] == count[b] else "fewer than")
        same = n_of[s] == n_of[b]
        # (a tie, both named: among the baselines compared, asked for as many as the best; it named another budget's,
        # and left out one that stopped earlier with as many images)
        tied = " and ".join(k for k in pool if count[k] == count[b] and asked[k] == asked[b])
        # (asked for other numbers of generations, no word compares them: "more than" read as a win the ratio
        # table refused, of counts that grow with the generations)
        out = (f"{s} reached {count[s]} distinct training images (of {n_train}) at {where} with {n_of[s]} generations, "
               + (f"{word} the best baseline, {tied}, with " if asked[s] == asked[b] else f"and the best baseline, "
                  f"{tied}, reached ") + f"{count[b]}{'' if same else f' in {n_of[b]}'} ({ratio}).")
        for k in (k for k in LABEL_FREE if k in count and k != s):
            out += (f" {k} (label-free, beyond the paper) reached {count[k]}"
                    + ("" if n_of[k] == n_of[b] else f" in {n_of[k]} generations")
                    + (f" ({unequal(k)})." if asked[k] != asked[b] else
                       f" ({count[k] / count[b]:.2f}x the best baseline)." if count[b] else "."))
        return out
    best = max(count, key=lambda k: count[k])
    return (f"{best} reached {count[best]} distinct training images (of {n_train}) at {where} with {n_of[best]} "
            "generations.")


def per_budget(metrics: dict[str, Any], n_asked: int) -> dict[str, Any]:
    """``metrics`` with its shares per generation *asked for* (``n_asked``) where dedup-driven stopping made fewer:
    the generations not made count as misses, so a method is not favoured for stopping early (its distinct images
    per generation made would be), in the summary's ratios as in the fair benchmark's tuning. Otherwise
    ``metrics`` itself."""
    if metrics["n_generated"] >= n_asked:
        return metrics
    made = metrics["n_generated"]

    def share(v: float) -> float:  # count / made -> count / asked, from the count (v * made / asked rounded off it:
        return round(v * made) / n_asked  # equal counts compared as unequal, a tie read as a win)

    out = {**metrics, **{k: {b: share(v) for b, v in metrics[k].items()}
                         for k in ("ams", "ums", "ams_cumulative", "ums_cumulative")}}
    out["carlini"] = {**metrics["carlini"], "extracted_fraction": share(metrics["carlini"]["extracted_fraction"])}
    out["gu"] = {**metrics["gu"], "memorized_fraction": share(metrics["gu"]["memorized_fraction"])}
    return out


def audit_summary(run: str | Path) -> dict[str, Any]:
    """The summary of a run directory's evaluated methods."""
    return summary_and_findings(run)[0]


def summary_and_findings(run: str | Path) -> tuple[dict[str, Any], Findings | None]:
    """:func:`audit_summary` and the :class:`~side_extract.findings.Findings` its ``findings`` block is made from."""
    run = Path(run)
    dirs = evaluated_methods(run)
    metrics = {k: read_json(d / "metrics.json", dict) for k, d in dirs.items()}
    stages = read_stages(run)
    # each method's extraction, where its evaluation measured it: one side evaluate wrote under the method's name
    # (no manifest stage) measured other images, and took that extraction's budget, timing and stopping
    made = {k: stages.get(f"extraction/{k}") if (here := generated_source(run, k, dirs[k], m, stages)) is not None
            and here.resolve() == (run / "extraction" / k).resolve() else None for k, m in metrics.items()}
    methods = {k: method_summary(m, made[k], dirs[k]) for k, m in metrics.items()}
    found_in, weighed = with_synthetic(run, dirs, metrics)  # (the findings weigh the synthetic set's too)
    findings = from_evaluations(found_in, weighed, not_compared(run, weighed))
    other = not_compared(run, metrics)  # other bands or training set (side evaluate --out into the run, an earlier
    # call's), or of another target's generations (an earlier call's): not compared
    same = {k: m for k, m in metrics.items() if k not in other}
    asked = {k: int((made[k] or {}).get("n") or m["n_generated"]) for k, m in same.items()}
    said = (verdict(same, {k: methods[k] for k in same}, asked) if same or not other else  # ("No method has been
            "No evaluation in the run can be compared with its current settings and target.")  # evaluated yet" was)
    if other:
        said += " Not compared: " + "; ".join(f"{k} ({why})" for k, why in other.items()) + "."
    return {"schema": SCHEMA, "verdict": said, "methods": methods, "not_compared": other,
            "ratios_to_best_baseline": ratios_to_best_baseline({k: per_budget(m, asked[k]) for k, m in same.items()},
                                                               budgets=asked),
            "findings": None if findings is None else {
                **findings.to_json(), "synthetic_set": next((k for k in found_in if k not in dirs
                                                             and k in findings.generations), None)}}, findings


def findings_file_current(run: str | Path, findings: Findings | None) -> bool:
    """Whether ``RUN/findings.csv`` lists ``findings``, what the run's evaluations hold now (a reader, as the report,
    writes nothing into the run: :func:`write_summary` does, under the run's lock, after each evaluation)."""
    path = Path(run) / FILE
    return findings is not None and path.is_file() and path.read_text(encoding="utf-8") == findings.to_csv()


def write_summary(run: str | Path) -> Path:
    """``RUN/summary.json``, and ``RUN/findings.csv`` where the run holds an evaluation."""
    summary, findings = summary_and_findings(run)
    path = Path(run) / "summary.json"
    atomic_write_json(path, summary)
    if findings is not None:
        write_findings(run, findings)
    else:  # no evaluation now: a list left by an earlier one would describe results the run no longer holds
        (Path(run) / FILE).unlink(missing_ok=True)
    return path


__all__ = ["SIDE_METHODS", "BASELINES", "LABEL_FREE", "COMPARED", "audit_summary", "write_summary", "verdict",
           "summary_and_findings", "findings_file_current", "ratios_to_best_baseline", "metric_values"]
