"""Intervals for the fair benchmark's ratios (``side bench fair``, steps 3-5 of :mod:`side_extract.bench.protocol`).

Two kinds of metric are bootstrapped from each run's ``per_generation.npz`` (:func:`per_generation_stats`):

- **shares** (``ams_cum/<band>``, ``carlini``): the mean of a per-generation indicator. Resampling the
  generations with replacement is unbiased for a mean (:func:`share_draws`); the interval takes the resampled log
  ratios' standard error, as for the counts below (until the replicates' spread was taken in, it was their 2.5 /
  97.5 percentiles).
- **distinct-image counts** (``distinct_nn/<band>``): how many distinct nearest training images the
  generations reaching the band hold. Resampling with replacement repeats some generations and drops others,
  which loses about 37 % of the images hit once and 14 % of those hit twice: the resampled counts of the
  benchmark's runs sit a quarter to a third below the observed ones (16x16, held-out replicates 11-13: 0.75-0.78
  of the count at 300 images, UnCond 0.62-0.66 and the memorization-aware form 0.70-0.73 at 1,000), the shorter
  and less repetitive run's more, so the
  percentile interval of a ratio shifts away from the observed ratio (an 8x8 form reaching 99 images against
  UnCond's 100 came out 0.99 [0.97, 0.99], the point at the interval's top, "below 1"). Counts of distinct images are species richness, and
  ecology's standard for its sampling error is the bootstrap of Chao et al. (2014, Ecological Monographs
  84: 45-67, Appendix G; as coded in the ``iNEXT`` R package, Hsieh, Ma & Chao 2016): resample from an
  *estimated assemblage* in which
  the rarely seen images are down-weighted and the images never seen (Chao1) are added
  (:func:`richness_assemblage`, iNEXT's ``EstiBootComm.Ind``), take the standard error of the resampled counts,
  and centre the interval on the observed count. Here the ratio's interval is
  ``ratio * exp(+-1.96 se)``, ``se`` the delta-method standard error of ``log(num / den)`` from the two
  methods' independent resampled counts (:func:`distinct_draws`). On simulated populations shaped like the
  benchmark's (``tests/test_bench_intervals.py``, 150 trials each) it covers the true ratio of expected counts in
  93-95 % of trials; the percentile interval covered it in 77-84 %, lying wholly below it in 15 % of trials when
  a 1,000-generation run faced a 2,000-generation one (the equal-samples line) and wholly *above* it in 21 % when
  a form concentrating on few images faced a baseline that spreads (it flattered the concentrating form).
  A zero-width interval (every image reached many times: nothing left to resample) is reported but not marked as
  excluding 1, and a form that reached no image gets no upper bound.

Both kinds resample within each replicate and average over replicates, as the point estimate does. That
measures the sampling noise of the generations only. A replicate also redraws the synthetic set, clustering
and classifier, and that spread (which the resampling cannot see) can be larger. So every interval is on the
log ratio with a half-width that is the wider of the resampling's (1.96 times its delta-method standard error)
and the replicates' own: Student's t at R - 1 degrees of freedom for R replicates times the delta-method standard
error of the log ratio of replicate means from the per-replicate values, paired by replicate (the methods of one
benchmark run share each replicate's seeds). (Before session 40 the quantile was t only where the replicates'
error was the larger, else 1.96 on the resampling's, which could make the interval narrower than the replicates'
alone.) Simulated six replicates of 1,000 generations on 300 images, the
form's population redrawn per replicate (hit rate and image weights log-normal, sigma 0 / 0.1 and 0.3 / 0.2 and
0.5; 200 trials each; ``tests/test_bench_intervals.py``): the resampling interval alone covered the true ratio
in 89 / 81 / 63 % of trials, this one in 96 / 96 / 94 %, 1.4-2.3 times as wide on the log scale. Shares use
the same form (before: the resampled ratios' percentiles).
"""
from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from ..evaluation import distinct_count, per_generation_stats
from ..metrics import Z95, unseen_estimate

INTERVAL_METHOD = ("log ratio of replicate means; half-width the wider of t with R - 1 df times the replicates' SE "
                   "(paired delta method) and 1.96 times the resampling's (shares: generations; distinct counts: "
                   "iNEXT assemblage)")


def value(stats: dict[str, np.ndarray], metric: str) -> float:
    """``metric`` of one run's generations: a share (``ams_cum/<band>``, ``carlini``) or distinct nearest training
    images per generation (``distinct_nn/<band>``)."""
    kind, _, band = metric.partition("/")
    if kind == "distinct_nn":
        return distinct_count(stats, band) / len(stats["nn"])
    return float(_indicator(stats, metric).mean())


def _indicator(stats: dict[str, np.ndarray], metric: str) -> np.ndarray:
    kind, _, band = metric.partition("/")
    if kind == "ams_cum":
        return stats[f"reach/{band}"]
    if kind == "carlini":
        return stats["carlini"]
    raise ValueError(f"unknown bootstrap metric {metric!r}: expected carlini, ams_cum/<band> or distinct_nn/<band>")


def richness_assemblage(counts: np.ndarray) -> np.ndarray:
    """The estimated relative abundances iNEXT resamples from (``EstiBootComm.Ind`` of the iNEXT package; Chao et al.
    2014, Appendix G):
    ``counts`` are the detected species' abundances in a sample of n = sum(counts). With f1, f2 the singletons and
    doubletons, f0 = (n-1)/n f1^2 / (2 f2) (f2 = 0: (n-1)/n f1 (f1-1) / 2) undetected species (Chao1),
    A = n f0 / (n f0 + f1), a = f1 / n * A (the undetected species' total share, one minus the estimated sample
    coverage), b = sum(p_i (1 - p_i)^n) with p_i = counts / n, w = a / b (0 when f0 = 0). A detected species gets
    p_i (1 - w (1 - p_i)^n); ceil(f0) undetected ones share a equally. The result sums to 1."""
    seen, k, a = _assemblage(counts)
    return np.concatenate([seen, np.full(k, a / k) if k else np.zeros(0)])


def _assemblage(counts: np.ndarray) -> tuple[np.ndarray, int, float]:
    """:func:`richness_assemblage` as (the detected species' shares, the number k of undetected ones, their total
    share a), without the k equal entries: Chao1 makes about f1^2 / 2 of them (10^8 for 15,000 singletons, 2 GB)."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    n = c.sum()
    if n == 0:
        return np.zeros(0), 0, 0.0
    f1, f2 = float(np.sum(c == 1)), float(np.sum(c == 2))
    f0 = unseen_estimate(f1, f2, n)
    a = f1 / n * (n * f0 / (n * f0 + f1) if f1 > 0 else 1.0)
    p = c / n
    w = 0.0 if f0 == 0 else a / float(np.sum(p * (1 - p) ** n))
    k = math.ceil(f0)
    return p * (1 - w * (1 - p) ** n), k, a if k else 0.0


def distinct_draws(stats: dict[str, np.ndarray], band: str, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` resampled distinct counts of one run at ``band`` (per generation): its N generations drawn from
    a multinomial over "no image at the band" (the observed share) and iNEXT's assemblage of the images reached,
    scaled by the observed share of generations reaching the band. The assemblage's ceil(f0) equally likely unseen
    images are one pooled category of the multinomial, split among them uniformly afterwards (the same
    distribution; Chao1 gives tens of thousands of them when almost every image is seen once)."""
    n = len(stats["nn"])
    _, counts = np.unique(stats["nn"][stats[f"reach/{band}"]], return_counts=True)
    hits = int(counts.sum())
    if hits == 0:
        return np.zeros(n_boot)
    seen, k, unseen = _assemblage(counts)  # (the k unseen images' shares never built: one pooled category)
    p = np.concatenate([[1 - hits / n], hits / n * seen, [hits / n * unseen]])
    resampled = rng.multinomial(n, p / p.sum(), size=n_boot)
    found = (resampled[:, 1:-1] > 0).sum(axis=1)
    if k:
        found += np.array([len(np.unique(rng.integers(0, k, m))) for m in resampled[:, -1]])
    return found / n


def share_draws(stats: dict[str, np.ndarray], metric: str, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` resampled shares of one run: its generations drawn with replacement."""
    x = _indicator(stats, metric)
    n = len(x)
    return np.array([x[rng.integers(0, n, n)].mean() for _ in range(n_boot)])


def draws(stats: dict[str, np.ndarray], metric: str, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    kind, _, band = metric.partition("/")
    return distinct_draws(stats, band, n_boot, rng) if kind == "distinct_nn" else share_draws(stats, metric, n_boot, rng)


def replicate_se(num_reps: list[float] | None, den_reps: list[float] | None) -> tuple[float, int | None]:
    """(se, degrees of freedom) of log(mean(num_reps) / mean(den_reps)) from the replicates' spread, paired by
    replicate: the delta method on d_i = num_i / mean(num) - den_i / mean(den). (0, None) below two replicates."""
    if num_reps is None or den_reps is None or len(num_reps) < 2 or len(num_reps) != len(den_reps):
        return 0.0, None
    a, b = np.asarray(num_reps, dtype=np.float64), np.asarray(den_reps, dtype=np.float64)
    if a.mean() <= 0 or b.mean() <= 0:
        return 0.0, None
    d = a / a.mean() - b / b.mean()
    return _spread(d, ddof=1) / math.sqrt(len(d)), len(d) - 1


def _spread(x: np.ndarray, ddof: int = 0) -> float:
    """The standard deviation of ``x``, exactly 0 where its values are all equal (numpy's is not: the mean of equal
    values rounds, and 4.8e-35 for a variance marked a zero-width interval as excluding 1)."""
    return 0.0 if np.ptp(x) == 0 else float(np.std(x, ddof=ddof))


def interval(num: float, den: float, num_draws: np.ndarray, den_draws: np.ndarray,
             num_reps: list[float] | None = None, den_reps: list[float] | None = None
             ) -> tuple[float | None, float | None]:
    """95 % interval of ``num / den`` (module docstring) around the observed ratio, on the log scale: the wider of
    1.96 times the resampled draws' delta-method standard error of the log ratio and Student's t (at the
    replicates' degrees of freedom) times the replicates' (:func:`replicate_se`, from each replicate's value
    ``num_reps`` / ``den_reps``): :func:`spread_interval`."""
    if den <= 0:
        return None, None
    if num <= 0:  # nothing reached: the resamples cannot bound it from above
        return 0.0, None
    se_boot = math.hypot(_spread(num_draws) / num, _spread(den_draws) / den)
    return spread_interval(num / den, Z95 * se_boot, num_reps, den_reps)


def spread_interval(ratio: float, half_boot: float, num_reps: list[float] | None,
                    den_reps: list[float] | None) -> tuple[float, float]:
    """``ratio * exp(+-h)``, ``h`` the wider of the resampling's half-width ``half_boot`` (on the log scale) and the
    replicates' (Student's t at R - 1 df times :func:`replicate_se`): never narrower than either alone. (Until
    session 40 the quantile was t only where the replicates' error was the larger, else 1.96 on the resampling's:
    a resampling error just above the replicates' shrank the interval below the replicates' own, by more than half
    at three replicates.)"""
    if not math.isfinite(half_boot) or any(not math.isfinite(v) for v in (*(num_reps or ()), *(den_reps or ()))):
        # (max(h, nan) kept h: a NaN replicate's spread was dropped and the interval only looked narrow)
        raise ValueError(f"the interval of ratio {ratio} has a non-finite input (half-width {half_boot}, replicates "
                         f"{list(num_reps or [])} / {list(den_reps or [])})")
    se_rep, df = replicate_se(num_reps, den_reps)
    h = max(half_boot, float(student_t.ppf(0.975, df)) * se_rep if df is not None else 0.0)
    return ratio * math.exp(-h), ratio * math.exp(h)


def _row(num: float, den: float, num_draws: np.ndarray, den_draws: np.ndarray,
         num_reps: list[float] | None = None, den_reps: list[float] | None = None) -> dict[str, Any]:
    lo, hi = interval(num, den, num_draws, den_draws, num_reps, den_reps)
    return {"ratio": num / den if den > 0 else None, "ci95": [lo, hi],
            "excludes_1": lo is not None and hi is not None and hi > lo and (lo > 1 or hi < 1),
            **({} if num_reps is None else {"per_replicate": [float(v) for v in num_reps],
                                           "baseline_per_replicate": [float(v) for v in den_reps or []]})}


def _log_width(ci: list[float | None]) -> float:
    """An interval's width on the log scale (inf where a bound is missing or the lower one is 0)."""
    lo, hi = ci
    return math.inf if lo is None or hi is None or lo <= 0 else math.log(hi / lo)


def _rng(seed: int, name: str) -> np.random.Generator:
    """One resampling stream per method (by its name): a method's interval does not depend on which other methods
    the table holds, nor on their order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def bootstrap_ratios(stats: dict[str, list[dict[str, np.ndarray]]], metrics: tuple[str, ...], n_boot: int,
                     side_forms: tuple[str, ...], baselines: tuple[str, ...], seed: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    """For each SIDE form and metric: the ratio of replicate means to the best baseline (the one with the higher
    mean; of baselines tied on it, the one giving the widest interval, all named in ``tied_baselines``), with the
    module docstring's 95 % interval from resampling within every replicate."""
    methods = list(stats)
    n_rep = len(next(iter(stats.values())))
    if uneven := {m: len(v) for m, v in stats.items() if len(v) != n_rep}:  # (their spread dropped and the means
        # taken over other replicates, without a word: a narrow interval marked as excluding 1)
        raise ValueError(f"every method needs the same replicates: {next(iter(stats))} has {n_rep}, "
                         + ", ".join(f"{m} {k}" for m, k in uneven.items()))
    reps = {m: {k: [value(s, k) for s in stats[m]] for k in metrics} for m in methods}
    point = {m: {k: float(np.mean(reps[m][k])) for k in metrics} for m in methods}
    boot = {}
    for m in methods:
        rng = _rng(seed, m)
        boot[m] = {k: np.mean([draws(s, k, n_boot, rng) for s in stats[m]], axis=0) for k in metrics}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    bases = [m for m in baselines if m in methods]
    for s in (m for m in side_forms if m in methods):
        rows = {}
        for k in metrics:
            top = max(point[m][k] for m in bases)
            tied = [m for m in bases if math.isclose(point[m][k], top, rel_tol=1e-12, abs_tol=1e-15)]
            # baselines tied on the mean give one ratio but other intervals (their replicates spread differently):
            # the widest is kept, so that the order of --methods cannot decide a mark
            by = {m: _row(point[s][k], point[m][k], boot[s][k], boot[m][k], reps[s][k], reps[m][k]) for m in tied}
            best = max(tied, key=lambda m: (_log_width(by[m]["ci95"]), -tied.index(m)))
            rows[k] = {"side": point[s][k], "best_baseline": point[best][k], "best_baseline_method": best, **by[best],
                       "replicates": n_rep, **({"tied_baselines": tied} if len(tied) > 1 else {})}
        out[s] = rows
    return out


def count_ratios(forms: dict[str, list[dict[str, np.ndarray]]], base: list[dict[str, np.ndarray]], n_boot: int,
                 seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each form's distinct nearest training images (mid band or closer; mean over replicates) against ``base``'s,
    as *counts* (the runs may differ in length), with the distinct-count interval of the module docstring."""
    def counts(reps: list[dict[str, np.ndarray]], name: str) -> tuple[list[float], np.ndarray]:
        rng = _rng(seed, name)
        return ([float(distinct_count(s)) for s in reps],
                np.mean([distinct_draws(s, "mid", n_boot, rng) * len(s["nn"]) for s in reps], axis=0))

    base_reps, base_draws = counts(base, "uncond at N_G + N_S")
    out = {}
    for name, reps in forms.items():
        form_reps, point_draws = counts(reps, name)
        point, base_point = float(np.mean(form_reps)), float(np.mean(base_reps))
        out[name] = {"side": point, "uncond": base_point,
                     **_row(point, base_point, point_draws, base_draws, form_reps, base_reps)}
    return out


__all__ = ["INTERVAL_METHOD", "per_generation_stats", "value", "distinct_count", "richness_assemblage", "distinct_draws",
           "share_draws", "replicate_se", "interval", "bootstrap_ratios", "count_ratios"]
