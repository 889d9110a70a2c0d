"""The fair benchmark's intervals: iNEXT's assemblage from its published formula, and coverage of the distinct-count
interval on simulated populations whose expected counts are known exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest

from side_extract.bench.intervals import bootstrap_ratios, count_ratios, distinct_draws, richness_assemblage


def test_assemblage_follows_inext_by_hand():
    """Counts 1, 1, 2, 3 (n = 7): f1 = 2, f2 = 1, so Chao1's f0 = 6/7 * 2^2 / 2 = 12/7, A = 7 f0 / (7 f0 + 2) = 6/7,
    the undetected share a = f1 / n * A = 12/49, shared by ceil(f0) = 2 species; the detected ones are shrunk by
    w = a / sum(p (1 - p)^7) (iNEXT's EstiBootComm.Ind; Chao et al. 2014, Appendix G)."""
    p = np.array([1, 1, 2, 3]) / 7
    b = 2 * (1 / 7) * (6 / 7) ** 7 + (2 / 7) * (5 / 7) ** 7 + (3 / 7) * (4 / 7) ** 7
    w = (12 / 49) / b
    expected = [*(p * (1 - w * (1 - p) ** 7)), 6 / 49, 6 / 49]
    got = richness_assemblage(np.array([1, 1, 2, 3]))
    assert got == pytest.approx(expected, rel=1e-12)
    assert got.sum() == pytest.approx(1.0)
    # no singletons: nothing unseen, the observed shares unchanged; one singleton and no doubleton: f0 = 0
    assert richness_assemblage(np.array([2, 2, 4])) == pytest.approx([0.25, 0.25, 0.5])
    assert richness_assemblage(np.array([1, 3])) == pytest.approx([0.25, 0.75])
    # f0 that rounds down but not by ceil: counts 1, 1, 1, 2, 2, 2 (n = 9, f1 = f2 = 3): f0 = 8/9 * 9/6 = 4/3,
    # A = 9 f0 / (9 f0 + 3) = 0.8, a = 3/9 * 0.8 = 4/15 shared by ceil(4/3) = 2 unseen species (round would give 1)
    p = np.array([1, 1, 1, 2, 2, 2]) / 9
    w = (4 / 15) / (3 * (1 / 9) * (8 / 9) ** 9 + 3 * (2 / 9) * (7 / 9) ** 9)
    expected = [*(p * (1 - w * (1 - p) ** 9)), 2 / 15, 2 / 15]
    assert richness_assemblage(np.array([1, 1, 1, 2, 2, 2])) == pytest.approx(expected, rel=1e-12)


def _population(n_images: int, hit: float, zipf: float, seed: int) -> np.ndarray:
    """Per-generation probabilities: index 0 = reaches no training image at the band, i >= 1 = nearest image i - 1."""
    w = np.random.default_rng(seed).permutation(1.0 / np.arange(1, n_images + 1) ** zipf)
    return np.concatenate([[1 - hit], hit * w / w.sum()])


def _expected_distinct(p: np.ndarray, n: int) -> float:
    return float(np.sum(1 - (1 - p[1:]) ** n))


def _run(p: np.ndarray, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    label = rng.choice(len(p), size=n, p=p)
    return {"nn": np.maximum(label - 1, 0), "reach/mid": label > 0, "carlini": label > 0}


def _coverage(pa, na, pb, nb, trials, ratio_of):
    truth = _expected_distinct(pa, na) / _expected_distinct(pb, nb)
    rng = np.random.default_rng(0)
    inside = below = above = 0
    for t in range(trials):
        lo, hi = ratio_of(_run(pa, na, rng), _run(pb, nb, rng), t)
        inside += lo <= truth <= hi
        below += hi < truth
        above += lo > truth
    return inside / trials, below / trials, above / trials


def test_equal_samples_interval_covers_the_true_ratio():
    """A form's N_G = 1,000 generations against UnCond's 2,000 from the same skewed population (300 images, a
    quarter of generations reach one; the 300-image benchmark's shape): the true ratio of expected distinct counts
    is known exactly. Plain resampling put the whole interval below it in 15 % of these trials (coverage 84 %);
    the assemblage interval: 4 % below, coverage 95 %."""
    pop = _population(300, 0.25, 1.0, 1)
    cover, below, above = _coverage(pop, 1000, pop, 2000, 150,
                                    lambda a, b, t: count_ratios({"f": [a]}, [b], 200, seed=t)["f"]["ci95"])
    assert 0.85 <= cover <= 0.99 and max(below, above) <= 0.08  # (not wider than it must be)


def test_distinct_ratio_interval_covers_the_true_ratio():
    """Per generation (bootstrap_ratios' distinct_nn) for a form that concentrates on few images against a baseline
    that spreads, both at N_G = 1,000. Plain resampling loses more of the spread run's images and put the whole
    interval *above* the truth in 21 % of these trials (coverage 77 %): it flattered the concentrating form. The
    assemblage interval: 2 % above, 5 % below, coverage 93 %."""
    pa, pb = _population(300, 0.5, 2.0, 2), _population(300, 0.2, 0.5, 3)

    def ratio_of(a, b, t):
        return bootstrap_ratios({"side": [a], "uncond": [b]}, ("distinct_nn/mid",), 200, ("side",), ("uncond",),
                                seed=t)["side"]["distinct_nn/mid"]["ci95"]

    cover, below, above = _coverage(pa, 1000, pb, 1000, 150, ratio_of)
    assert 0.85 <= cover <= 0.99 and max(below, above) <= 0.08


def test_distinct_draws_centre_on_the_observed_count_when_every_image_repeats():
    """Images hit many times each leave nothing unseen: every resample finds all of them (iNEXT's standard error 0),
    so 99 images against 100 is 0.99 with a zero-width interval, which is not marked as excluding 1 (the percentile
    interval put the point at its top end)."""
    a = {"nn": np.repeat(np.arange(99), 20), "reach/mid": np.ones(1980, bool)}
    b = {"nn": np.repeat(np.arange(100), 30), "reach/mid": np.ones(3000, bool)}
    assert set(distinct_draws(a, "mid", 50, np.random.default_rng(0)) * 1980) == {99}
    r = count_ratios({"f": [a]}, [b], 100)["f"]
    assert r["ratio"] == pytest.approx(0.99) and r["ci95"] == pytest.approx([0.99, 0.99])
    assert math.isclose(r["ci95"][0], r["ratio"]) and not r["excludes_1"]


def test_a_run_of_singletons_stays_cheap_and_a_run_without_hits_has_no_upper_bound():
    """1,000 generations on 1,000 different images: Chao1 adds f0 = 999 * 1000 / 2 unseen images (about 500,000
    categories; a multinomial over all of them took gigabytes at 1,000 draws). Pooled, each resample holds about
    1,000 images (singletons are as likely lost as replaced). A form that reached nothing: [0, None], unmarked."""
    run = {"nn": np.arange(1000), "reach/mid": np.ones(1000, bool)}
    d = distinct_draws(run, "mid", 1000, np.random.default_rng(0)) * 1000
    assert abs(d.mean() - 1000) < 20 and d.std() > 0
    none = {"nn": np.zeros(1000, np.int64), "reach/mid": np.zeros(1000, bool)}
    r = count_ratios({"f": [none]}, [run], 50)["f"]
    assert r["ratio"] == 0 and r["ci95"] == [0.0, None] and not r["excludes_1"]


def _varied(base: np.ndarray, sigma_hit: float, sigma_w: float, rng: np.random.Generator) -> np.ndarray:
    """One replicate's population: the form's hit rate and each image's weight redrawn (log-normal), as a replicate
    redraws the synthetic set, clustering and classifier."""
    hit = min(0.95, (1 - base[0]) * math.exp(sigma_hit * rng.standard_normal()))
    w = base[1:] * np.exp(sigma_w * rng.standard_normal(len(base) - 1))
    return np.concatenate([[1 - hit], hit * w / w.sum()])


def test_the_interval_covers_the_true_ratio_when_the_replicates_themselves_vary():
    """Six replicates, N_G 1,000, 300 images: the form's population is redrawn per replicate (hit rate sigma 0.2,
    image weights sigma 0.5), the baseline's fixed; the truth is the ratio of expected distinct counts averaged over
    replicate populations. The resampling interval alone (before) covered it in 63 % of 200 trials; with the
    replicates' paired standard error (and t at 5 degrees of freedom where it is the larger), 94 %."""
    base, form = _population(300, 0.25, 1.0, 1), _population(300, 0.25, 1.0, 4)
    rng = np.random.default_rng(0)
    truth = (np.mean([_expected_distinct(_varied(form, 0.2, 0.5, rng), 1000) for _ in range(4000)])
             / _expected_distinct(base, 1000))
    inside, trials = 0, 120
    for t in range(trials):
        side = [_run(_varied(form, 0.2, 0.5, rng), 1000, rng) for _ in range(6)]
        plain = [_run(base, 1000, rng) for _ in range(6)]
        lo, hi = bootstrap_ratios({"side": side, "uncond": plain}, ("distinct_nn/mid",), 100, ("side",), ("uncond",),
                                  seed=t)["side"]["distinct_nn/mid"]["ci95"]
        inside += lo <= truth <= hi
    assert 0.88 <= inside / trials <= 0.99  # (an interval twice as wide would cover about every time)


def test_replicate_se_is_the_paired_delta_method_by_hand():
    """num 2, 4 and den 1, 1: d = (2/3 - 1, 4/3 - 1) = (-1/3, 1/3), sd 0.4714, se = sd / sqrt(2) = 1/3, one degree
    of freedom; equal ratios in every replicate: no spread at all."""
    from side_extract.bench.intervals import interval, replicate_se

    se, df = replicate_se([2.0, 4.0], [1.0, 1.0])
    assert se == pytest.approx(1 / 3) and df == 1
    assert replicate_se([2.0, 4.0], [1.0, 2.0]) == (0.0, 1)
    assert replicate_se([2.0], [1.0]) == (0.0, None)
    lo, hi = interval(3.0, 1.0, np.full(10, 3.0), np.ones(10), [2.0, 4.0], [1.0, 1.0])
    q = 12.706204736174698  # t(0.975, 1)
    assert (lo, hi) == pytest.approx((3 * math.exp(-q / 3), 3 * math.exp(q / 3)))


def test_the_interval_is_the_wider_of_the_replicates_t_interval_and_the_resamplings():
    """Both errors non-zero, by the module docstring's rule: ratio * exp(+-h), h the wider of t(0.975, R - 1) *
    se_rep and 1.96 * se_boot. Draws 3 +- 0.3 and 1 +- 0.05: se_boot = sqrt(0.09 / 9 + 0.0025 / 1) = sqrt(0.0125).
    Replicates (2, 4) / (1, 1): se_rep 1/3, t(0.975, 1) * 1/3 wins; (2.99, 3.01) / (1, 1): d = (-1/300, 1/300),
    se_rep 1/300, t * 1/300 = 0.042 loses to 1.96 * se_boot = 0.219. (2.9, 3.1) / (1, 1): se_rep = 1/30 is below
    se_boot (0.112), but t * 1/30 = 0.424 is wider than 1.96 * se_boot: the old rule (t only where se_rep was the
    larger) took 0.219, an interval half as wide as the replicates' own."""
    from side_extract.bench.intervals import interval

    num_draws, den_draws = np.array([2.7, 3.3] * 5), np.array([0.95, 1.05] * 5)
    se_boot = math.sqrt(0.0125)
    q, z = 12.706204736174698, 1.959963984540054  # t(0.975, 1), the normal's
    lo, hi = interval(3.0, 1.0, num_draws, den_draws, [2.0, 4.0], [1.0, 1.0])
    assert (lo, hi) == pytest.approx((3 * math.exp(-q / 3), 3 * math.exp(q / 3)))
    lo, hi = interval(3.0, 1.0, num_draws, den_draws, [2.99, 3.01], [1.0, 1.0])
    assert (lo, hi) == pytest.approx((3 * math.exp(-z * se_boot), 3 * math.exp(z * se_boot)))
    assert interval(3.0, 1.0, num_draws, den_draws) == pytest.approx((lo, hi))  # no replicates: the draws alone
    lo, hi = interval(3.0, 1.0, num_draws, den_draws, [2.9, 3.1], [1.0, 1.0])
    assert (lo, hi) == pytest.approx((3 * math.exp(-q / 30), 3 * math.exp(q / 30)))


def test_an_interval_wholly_above_or_below_1_is_marked_and_one_across_1_is_not():
    """The arrows of fair.md: ``excludes_1`` where the whole interval lies on one side of 1. Draws with spread (a
    zero-width interval is never marked): 3 +- 0.3 against 1 +- 0.05 is [2.41, 3.73] by the rule above; 0.3 +- 0.03
    against 1 +- 0.05 lies below 1; 1.05 +- 0.3 against 1 +- 0.05 spans it."""
    from side_extract.bench.intervals import _row

    den = np.array([0.95, 1.05] * 5)
    above = _row(3.0, 1.0, np.array([2.7, 3.3] * 5), den)
    below = _row(0.3, 1.0, np.array([0.27, 0.33] * 5), den)
    across = _row(1.05, 1.0, np.array([0.75, 1.35] * 5), den)
    assert above["ci95"][0] > 1 and above["excludes_1"] is True
    assert below["ci95"][1] < 1 and below["excludes_1"] is True
    assert across["ci95"][0] < 1 < across["ci95"][1] and across["excludes_1"] is False


def test_reinterval_restates_an_old_rule_interval_as_the_new_rule_makes_it():
    """``benchmarks/reinterval.py`` re-stated the committed fair.json files from their per-replicate values alone.
    For rows made by the old rule (q = t only where the replicates' error was the larger, else 1.96, on the larger
    error), written here from that rule, its interval equals what ``interval`` now gives from the same draws."""
    import importlib.util
    from pathlib import Path

    from scipy.stats import t as student_t

    from side_extract.bench.intervals import _row, interval, replicate_se

    spec = importlib.util.spec_from_file_location(
        "reinterval", Path(__file__).resolve().parents[1] / "benchmarks" / "reinterval.py")
    reinterval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reinterval)
    num_draws, den_draws = np.array([2.7, 3.3] * 5), np.array([0.95, 1.05] * 5)
    for num_reps in ([2.0, 4.0], [2.99, 3.01], [2.9, 3.1], [2.9, 3.0, 3.1], [3.0, 3.0]):
        den_reps = [1.0] * len(num_reps)
        num = float(np.mean(num_reps))
        se_boot = math.sqrt(float(np.var(num_draws)) / num ** 2 + float(np.var(den_draws)) / 1.0)
        se_rep, df = replicate_se(num_reps, den_reps)
        q = float(student_t.ppf(0.975, df)) if df is not None and se_rep > se_boot else 1.959963984540054
        h = q * max(se_boot, se_rep)
        old = {**_row(num, 1.0, num_draws, den_draws, num_reps, den_reps),
               "ci95": [num * math.exp(-h), num * math.exp(h)]}
        (lo, hi), excludes = reinterval.restate(old)
        assert (lo, hi) == pytest.approx(interval(num, 1.0, num_draws, den_draws, num_reps, den_reps)), num_reps
        assert excludes == _row(num, 1.0, num_draws, den_draws, num_reps, den_reps)["excludes_1"]


def test_tied_baselines_give_the_widest_interval_whatever_their_order():
    """Cond and UnCond tied on the mean (17.25 each in mem-n1000-retuned-a) but spread differently across
    replicates: the first listed in --methods was taken, so the order alone decided the interval and its ↓ mark
    (0.64 [0.35, 1.17] against cond, [0.44, 0.93] ↓ against uncond). The widest is kept, and both are named."""
    def run(k: int, n: int = 1000) -> dict[str, np.ndarray]:
        nn = np.full(n, -1)
        nn[:2 * k] = np.repeat(np.arange(k), 2)
        return {"nn": nn, "reach/mid": nn >= 0, "reach/high": nn >= 0, "carlini": nn >= 0}

    stats = {"side": [run(k) for k in (17, 7, 10, 10)], "cond": [run(k) for k in (19, 14, 23, 13)],
             "uncond": [run(k) for k in (24, 17, 15, 13)]}
    rows = [bootstrap_ratios(stats, ("distinct_nn/mid",), 200, ("side",), bases)["side"]["distinct_nn/mid"]
            for bases in (("cond", "uncond"), ("uncond", "cond"))]
    assert rows[0]["ci95"] == rows[1]["ci95"] and rows[0]["best_baseline_method"] == rows[1]["best_baseline_method"]
    assert rows[0]["tied_baselines"] == ["cond", "uncond"] and rows[1]["tied_baselines"] == ["uncond", "cond"]
    lo, hi = rows[0]["ci95"]
    assert lo < 1 < hi and not rows[0]["excludes_1"]  # against cond, the wider: no mark


def test_the_compute_table_takes_the_smallest_and_largest_n_g_in_any_order():
    """rss_sizes given largest first printed the smallest's RSS over the largest's (0.50 for 2.00)."""
    import json
    from pathlib import Path

    from side_extract.bench.tables import render_compute_markdown

    data = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/compute.json").read_text())
    rss = [{"n_generated": 100_000, "n_train": 50, "peak_rss_mb": 400.0, "seconds": 2.0},
           {"n_generated": 1_000, "n_train": 50, "peak_rss_mb": 200.0, "seconds": 1.0}]
    md = render_compute_markdown({**data, "evaluate_rss": rss})
    assert "N_G 1,000: 200 MB | **2.00** (peaks, largest / smallest N_G)" in md


def test_interval_faults_of_a_review():
    """An independent review's finds: the budget curve drew its resampling in another metric order than the main
    table, so at the full N_G the same distinct-image ratio had another interval; a method with fewer replicates
    lost its replicates' spread (a narrow interval marked as excluding 1); a NaN replicate was dropped by max()."""
    from side_extract.bench.intervals import spread_interval
    from side_extract.bench.protocol import BOOT_METRICS, budget_curve

    def run(k: int, n: int = 1000, h: float = 0.0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(k)
        nn = np.where(rng.random(n) < 0.05 + h, rng.integers(0, 20000, n), -1)
        return {"nn": nn, "reach/mid": nn >= 0, "reach/high": nn >= 0, "carlini": nn >= 0}

    # replicates alike: no spread between them, so the resampling alone sets the interval
    stats = {"side": [run(1)] * 3, "uncond": [run(4, h=-0.015)] * 3}
    main = bootstrap_ratios(stats, BOOT_METRICS, 300, ("side",), ("uncond",))["side"]["distinct_nn/mid"]
    curve = budget_curve(stats, [1000], 300, ("side",), baselines=("uncond",))[0]["ratios"]["side"]["distinct_nn/mid"]
    assert curve["ci95"] == main["ci95"]
    with pytest.raises(ValueError, match="every method needs the same replicates: side has 3, uncond 2"):
        bootstrap_ratios({"side": stats["side"], "uncond": stats["uncond"][:2]}, ("ams_cum/mid",), 50, ("side",),
                         ("uncond",))
    with pytest.raises(ValueError, match="non-finite input"):
        spread_interval(2.0, 0.05, [0.5, math.nan, 0.6], [0.25, 0.3, 0.28])


@pytest.mark.parametrize("n_reps", [1, 3])
def test_a_zero_width_interval_is_never_marked_whatever_the_rounding(n_reps):
    """Fifty images reached 20 times each against forty reached 25 times: every resample finds them all, so the ratio
    1.25 has nothing to resample, but np.var of the constant resampled shares was 4.8e-35, not 0 (the mean
    rounds), and the interval [1.2499999999999996, 1.2500000000000004] was marked as excluding 1 (a review found 124
    of 201 such pairs marked, by rounding alone). Its width is 0 and it is not marked, over one replicate or three
    equal ones."""
    a = {"nn": np.repeat(np.arange(50), 20), "reach/mid": np.ones(1000, bool)}
    b = {"nn": np.repeat(np.arange(40), 25), "reach/mid": np.ones(1000, bool)}
    r = bootstrap_ratios({"side": [a] * n_reps, "uncond": [b] * n_reps}, ("distinct_nn/mid",), 200, ("side",),
                         ("uncond",))["side"]["distinct_nn/mid"]
    assert r["ratio"] == pytest.approx(1.25) and r["ci95"] == [r["ratio"], r["ratio"]], r
    assert not r["excludes_1"]


def test_resampling_a_run_of_mostly_distinct_hits_does_not_build_the_unseen_images():
    """10,000 generations each on its own training image: Chao1 puts about 5 * 10^7 unseen images beside them, and
    the resampling built an array of their equal shares (400 MB; 2 GB at 15,000), though it draws them pooled."""
    import tracemalloc

    n = 10_000
    stats = {"nn": np.arange(n), "reach/mid": np.ones(n, dtype=bool)}
    tracemalloc.start()
    try:
        got = distinct_draws(stats, "mid", 2, np.random.default_rng(0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6, f"peak {peak / 1e6:.0f} MB"
    assert got.shape == (2,) and np.all((got > 0.5) & (got <= 1.0))
