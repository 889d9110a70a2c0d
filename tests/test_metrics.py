"""Hand-computed memorization metrics: AMS / UMS bands, orientation, Carlini and Gu ratios, N_G law, calibration."""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from side_extract import config as cfg
from side_extract.data import ImageSet, load_digits_set
from side_extract.evaluation import calibrate, digits_complement, evaluate, propose_bands
from side_extract.metrics import (PAPER_COSINE_BANDS, Band, ams, ams_ums_dense, bands_json, closest_first, ng_law,
                                  parse_bands, pixel_ratios, read_bands_file)


def flat(values, size: int = 8) -> ImageSet:
    """Constant 8x8x1 images: RMS-L2 between two of them is |a - b| / 255, exactly."""
    v = np.asarray(values, dtype=np.uint8)
    return ImageSet(np.broadcast_to(v[:, None, None, None], (len(v), size, size, 1)).copy())


TRAIN = flat([0, 60, 120, 180, 240])
GEN = flat([60, 60, 180, 30])  # two copies of train 1, one of train 3, one halfway between train 0 and 1
BANDS = "low=0.1:0.2,mid=0.01:0.1,high=0:0.01"


def run(gen=GEN, train=TRAIN, **kw):
    return evaluate(gen, train, cfg.EvaluateConfig(bands=kw.pop("bands", BANDS), carlini_n=kw.pop("n", 2), **kw))


def test_planted_copies_exact_ams_ums_and_ums_above_ams():
    r = run()
    # best distances: 0, 0, 0, 30/255 = 0.1176 (equal to train 0 and train 1: both in the low band)
    assert r.ams == {"low": 0.25, "mid": 0.0, "high": 0.75}
    assert r.ums == {"low": 0.5, "mid": 0.0, "high": 0.5}  # low: {0, 1}; high: {1, 3}; denominator N_G = 4
    assert r.ums["low"] > r.ams["low"]
    assert r.ams_cumulative == {"low": 1.0, "mid": 0.75, "high": 0.75}
    assert r.ums_cumulative == {"low": 0.75, "mid": 0.5, "high": 0.5}  # low: {0, 1, 3}
    assert r.p95 == 0.0 and r.p95_quantile == 0.05  # 5th percentile of the best distances
    np.testing.assert_array_equal(r.table.nearest_train_index, [1, 1, 3, 0])  # tie 0 / 1 -> lower index
    assert list(r.table.band) == ["high", "high", "high", "low"]
    np.testing.assert_allclose(r.table.similarity, [0, 0, 0, 30 / 255])


def test_empty_band_gives_zero():
    r = run(bands="far=0.9:1.0,high=0:0.01")
    assert r.ams["far"] == 0.0 and r.ums["far"] == 0.0
    # cumulative "far" is d < 1: all 5 training images; UMS's denominator is N_G = 4, so it can exceed 1
    assert r.ams_cumulative["far"] == 1.0 and r.ums_cumulative["far"] == 1.25


def test_distance_orientation_small_is_close():
    b = Band("high", 0.0, 0.1)
    d = np.array([0.0, 0.05, 0.1, 0.5])
    np.testing.assert_array_equal(b.contains(d, "distance"), [True, True, False, False])
    np.testing.assert_array_equal(b.reaches(d, "distance"), [True, True, False, False])  # d < hi
    s = Band("high", 0.6, 1.0)
    v = np.array([0.59, 0.6, 0.99, 1.0, 1.0000001])
    np.testing.assert_array_equal(s.contains(v, "similarity"), [False, True, True, True, True])  # closed at 1
    np.testing.assert_array_equal(Band("mid", 0.5, 0.6).reaches(v, "similarity"), [True] * 5)  # s >= lo
    # best = min for a distance: the generation at 30 is nearest (30/255) to train 0, not farther ones
    assert run().table.similarity[3] == pytest.approx(30 / 255)


def test_cosine_orientation_with_given_features():
    def unit(deg):
        return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]

    # training features at 0, 100, 200 degrees; generations at 0 (copy), 50 (cos 50 = 0.643 to 0 and to 100)
    # and 150 (cos 50 to 100 and 200), and 300 (cos 60 = 0.5 to 0 -> mid, cos 100 to 200 -> none)
    tf = np.array([unit(0), unit(100), unit(200)], np.float32)
    gf = np.array([unit(0), unit(50), unit(150), unit(302)], np.float32)
    train, gen = flat([0, 100, 200]), flat([0, 50, 150, 30])
    r = evaluate(gen, train, cfg.EvaluateConfig(similarity="cosine:test", carlini_n=2),
                 generated_features=gf, train_features=tf)
    assert r.bands == PAPER_COSINE_BANDS and r.bands_source == "paper-default" and r.orientation == "similarity"
    assert r.ams == {"low": 0.0, "mid": 0.25, "high": 0.75}
    assert r.ums == {"low": 0.0, "mid": 0.25, "high": 0.75}  # high: {0, 1, 2}; mid: {0}
    assert r.ums_cumulative["mid"] == 0.75
    np.testing.assert_allclose(r.table.similarity, [1.0, np.cos(np.radians(50)), np.cos(np.radians(50)),
                                                    np.cos(np.radians(58))], atol=1e-6)
    assert r.p95 == pytest.approx(np.quantile(r.table.similarity, 0.95)) and r.p95_quantile == 0.95


def test_carlini_and_gu_by_hand():
    r = run(n=3)
    # generation 30: distances to train (0, 60, 120, ...) = 30, 30, 90 (/255); nearest 3 mean 50
    np.testing.assert_allclose(r.carlini.ratio, [0, 0, 0, 30 / (0.5 * 50)])
    np.testing.assert_allclose(r.gu.ratio, [0, 0, 0, 1.0])  # d1 / d2 = 30 / 30
    assert r.carlini.extracted_fraction == 0.75 and r.gu.memorized_fraction == 0.75
    assert r.carlini.n_effective == 3 and r.carlini.centering == "generation"
    # reference centering: nn of generation 30 is train 0, whose 2 nearest other images are 60, 120 -> mean 90
    c, g = pixel_ratios(GEN, TRAIN, n=2, centering="reference")
    np.testing.assert_allclose(c.ratio[3], 30 / (0.5 * 90))
    # generation 60 = train 1: d1 = 0 -> 0, whatever the denominator
    assert c.ratio[0] == 0.0 and g.ratio[0] == 0.0


def test_carlini_clamps_n_to_the_training_set(caplog):
    with caplog.at_level(logging.WARNING):
        r = run(n=50)
        rr = run(n=50, carlini_centering="reference")
    assert r.carlini.n == 50 and r.carlini.n_effective == 5 and rr.carlini.n_effective == 4
    assert "exceeds the 5 training images" in caplog.text
    # generation 30: mean over all 5 training images: (30 + 30 + 90 + 150 + 210) / 5 = 102
    np.testing.assert_allclose(r.carlini.ratio[3], 30 / (0.5 * 102))


def test_streaming_equals_dense_reference_on_random_data():
    rng = np.random.default_rng(0)
    train = ImageSet(rng.integers(0, 256, (70, 4, 4, 1), dtype=np.uint8))
    gen = ImageSet(np.concatenate([train.images[:10], rng.integers(0, 256, (50, 4, 4, 1), dtype=np.uint8)]))
    bands = "low=0.25:0.3,mid=0.2:0.25,high=0:0.2"
    r = evaluate(gen, train, cfg.EvaluateConfig(bands=bands, carlini_n=5, query_chunk=7, ref_chunk=11))
    d = np.sqrt(((gen.images.reshape(60, 1, -1).astype(float) - train.images.reshape(1, 70, -1)) ** 2).mean(-1)) / 255
    dense = ams_ums_dense(d, parse_bands(bands), "distance")
    assert dense == {"ams": r.ams, "ams_cumulative": r.ams_cumulative, "ums": r.ums, "ums_cumulative": r.ums_cumulative}
    assert r.ums["low"] > 0 and r.ums["high"] >= 10 / 60


def test_bands_from_training_null_when_none_given():
    with pytest.raises(ValueError, match="cannot estimate its 0.001 quantile") as e:
        evaluate(GEN, TRAIN, cfg.EvaluateConfig(carlini_n=2))  # a null of a few values: refused
    # the remedies by the names each command reads (it named config keys alone, which side calibrate and side demo do
    # not read; a review's find)
    assert "--heldout of side calibrate, evaluate and demo" in str(e.value)
    assert "--calibration-quantiles of side calibrate and evaluate" in str(e.value)
    r = evaluate(GEN, TRAIN, cfg.EvaluateConfig(carlini_n=2, calibration_quantiles=(0.05, 0.1, 0.2)))
    assert r.bands_source == "train-null" and r.null["source"] == "train-vs-rest"
    # the null: each training image's nearest other is 60/255 away
    assert [b.name for b in r.bands] == ["low", "mid", "high"]
    assert r.bands[-1].lo == 0.0 and r.bands[-1].hi == pytest.approx(60 / 255)
    assert r.ams["high"] == 1.0  # all best distances (0 and 30/255) are below 60/255


def test_json_schema(tmp_path):
    r = run()
    r.write(tmp_path)
    import json

    d = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("n_generated", "n_train", "similarity", "bands", "ams", "ums", "ams_cumulative", "ums_cumulative",
                "p95", "carlini", "gu", "bands_source", "fingerprints", "ng_law"):
        assert key in d
    assert d["bands"]["low"] == [0.1, 0.2]
    # the values written are the evaluation's own (by hand in test_planted_copies_exact_ams_ums_and_ums_above_ams)
    assert d["ams"] == r.ams == {"low": 0.25, "mid": 0.0, "high": 0.75} and d["ums"] == r.ums
    assert d["ams_cumulative"] == r.ams_cumulative and d["ums_cumulative"] == r.ums_cumulative
    assert d["p95"] == r.p95 == 0.0 and d["n_generated"] == 4 and d["n_train"] == 5
    assert d["carlini"]["extracted_fraction"] == 0.75 and d["carlini"]["n"] == 2
    assert set(d["carlini"]) >= {"alpha", "n", "centering", "extracted_fraction"}
    assert set(d["gu"]) >= {"threshold", "memorized_fraction"}
    assert (tmp_path / "per_generation.csv").read_text().splitlines()[0].startswith("generation_id,method,target_label")
    z = np.load(tmp_path / "per_generation.npz")
    np.testing.assert_array_equal(z["nearest_train_index"], [1, 1, 3, 0])


def test_errors():
    with pytest.raises(ValueError, match=r"generated images are 8x8x1 .* training images are 4x4x1"):
        evaluate(GEN, flat([0, 1], size=4))
    with pytest.raises(ValueError, match="name=lo:hi"):
        parse_bands("high=0.6")
    with pytest.raises(ValueError, match="lo < hi"):
        parse_bands("high=0.6:0.5")
    with pytest.raises(ValueError, match="'high' \\(0.0:0.1\\) and 'mid' \\(0.0:0.2\\) overlap"):
        parse_bands("high=0:0.1,mid=0:0.2")  # accepted before: AMS per band summed to 150 %
    assert [b.name for b in parse_bands("mid=0.1:0.2,high=0:0.1")] == ["mid", "high"]  # order is free, touching ok
    with pytest.raises(ValueError, match="similarity='l2'"):
        cfg.EvaluateConfig(similarity="l2")
    with pytest.raises(ValueError, match="at least 2"):
        evaluate(GEN, flat([0]))
    with pytest.raises(ValueError, match="at least one generation"):
        ams(np.array([]), PAPER_COSINE_BANDS, "similarity")
    with pytest.raises(ValueError, match="carlini n=0 must be at least 1"):
        pixel_ratios(GEN, TRAIN, n=0)
    # alpha and the threshold, which EvaluateConfig checks, taken by the ratio functions as given: alpha=-1 made
    # every ratio <= 0 and every generation extracted, NaN no generation, 0 infinite ratios (a review's find)
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"carlini alpha={bad} must be a finite number > 0"):
            pixel_ratios(GEN, TRAIN, n=2, alpha=bad)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=rf"gu threshold={bad} must be in \(0, 1\]"):
            pixel_ratios(GEN, TRAIN, n=2, gu_threshold=bad)
    # the library functions that evaluate() guards, called directly on nothing (were numpy's reshape or
    # "need at least one array to concatenate", and ng_law's "Geometric sequence cannot include zero")
    empty = GEN.subset(np.arange(0))
    with pytest.raises(ValueError, match="the ratios need at least one generation, got none"):
        pixel_ratios(empty, TRAIN)
    with pytest.raises(ValueError, match="n_generated=0 and n_train=5 must be >= 1"):
        ng_law(np.array([], int), np.array([], int), 0, 5)


def test_ng_law_against_simulation():
    rng = np.random.default_rng(0)
    n_train, n_g = 300, 3000
    p = rng.uniform(0, 0.004, n_train) * (rng.random(n_train) < 0.5)
    hits = rng.random((n_g, n_train)) < p
    g, t = np.nonzero(hits)
    law = ng_law(g, t, n_g, n_train, n_grid=[100, 1000, 3000, 15000], n_repeats=3)
    truth = [(1 - (1 - p) ** n).sum() for n in law.n_grid]
    np.testing.assert_allclose(law.predicted_unique, truth, rtol=0.1)
    np.testing.assert_allclose(law.observed_unique[:2], truth[:2], rtol=0.15)
    np.testing.assert_allclose(law.rarefied_unique[:2], law.observed_unique[:2], rtol=0.1)
    assert law.observed_unique[2] == law.rarefied_unique[2] == (hits.any(0)).sum()
    assert law.observed_unique[3] is None and law.predicted_unique[3] > law.predicted_unique[2]


def test_propose_bands_quantiles_and_orientation():
    null = np.linspace(0, 1, 100001)
    d = propose_bands(null, "distance")  # (its 0 and 1 are exact copies, left out: 4 decimals)
    assert [(b.name, round(b.lo, 4), round(b.hi, 4)) for b in d] == [("low", 0.01, 0.05), ("mid", 0.001, 0.01),
                                                                      ("high", 0.0, 0.001)]
    s = propose_bands(null, "similarity")
    assert [(b.name, round(b.lo, 4), round(b.hi, 4)) for b in s] == [("low", 0.95, 0.99), ("mid", 0.99, 0.999),
                                                                      ("high", 0.999, 1.0)]
    for levels in ((0.01, 0.01, 0.05), (0.0, 0.01), (0.05, 0.01)):  # an IndexError, a ZeroDivisionError, or none
        with pytest.raises(ValueError, match=r"levels=.* must be strictly increasing values in \(0, 0.5\)"):
            propose_bands(null, "distance", levels)


def test_evaluate_says_when_the_training_set_holds_duplicates(caplog):
    with caplog.at_level(logging.WARNING):
        evaluate(GEN, TRAIN, cfg.EvaluateConfig(bands="low=0.1:0.2,mid=0.05:0.1,high=0:0.05"))
    assert "duplicates" not in caplog.text
    with caplog.at_level(logging.WARNING):
        e = evaluate(GEN, flat([0, 60, 60, 120, 180, 180, 180]),
                     cfg.EvaluateConfig(bands="low=0.1:0.2,mid=0.05:0.1,high=0:0.05"))
    assert "holds 3 exact duplicates of 2 images" in caplog.text
    assert e.gu.memorized_fraction == 0.75  # the literal definition: exact copies of a duplicated image, 0/0


def test_calibrated_bands_keep_exact_copies_in_the_closest_band_when_the_reference_has_duplicates(caplog):
    """A null holding exact copies (5 of 1,005: the training set has duplicates) put the 0.1 % edge at the
    extreme: for a similarity, high = [1, 1] and mid = [q, 1] both held an exact copy; for a distance,
    high = [0, 0) was empty and exact copies fell in mid. The copies are left out of the edges."""
    rng = np.random.default_rng(0)
    sims = np.concatenate([rng.uniform(0.2, 0.9, 1000), np.ones(5)])
    with caplog.at_level(logging.WARNING):
        bands = propose_bands(sims, "similarity")
    assert "5 of the null's 1005 best scores are exact copies" in caplog.text
    assert ams(np.array([1.0]), bands, "similarity") == {"low": 0.0, "mid": 0.0, "high": 1.0}
    assert 0.85 < bands[-1].lo < 0.9  # the 0.1 % edge is the non-copies'
    dists = np.concatenate([rng.uniform(0.1, 0.8, 1000), np.zeros(5)])
    bands = propose_bands(dists, "distance")
    assert ams(np.array([0.0]), bands, "distance") == {"low": 0.0, "mid": 0.0, "high": 1.0}
    assert bands[-1].hi > 0.1
    with pytest.raises(ValueError, match="every best score of the null is an exact copy"):
        propose_bands(np.zeros(10), "distance")


def test_calibrate_reads_the_configs_heldout_as_evaluate_does(tmp_path):
    """calibrate(train, config=EvaluateConfig(heldout=SPEC)) took the training set's own null without a word, where
    evaluate() and `side calibrate` calibrate on SPEC's images (a review's find); held-out images given in memory
    still come first."""
    from side_extract.runs import atomic_save_npz

    atomic_save_npz(tmp_path / "h.npz", images=flat([10, 70, 130, 200]).images)
    c = cfg.EvaluateConfig(heldout=str(tmp_path / "h.npz"), calibration_quantiles=(0.1, 0.25, 0.4))
    cal = calibrate(TRAIN, config=c)
    assert cal.null_source == "heldout" and cal.sources["heldout"] == str(tmp_path / "h.npz")
    np.testing.assert_allclose(np.sort(cal.nulls["heldout"]), np.array([10, 10, 10, 20]) / 255)
    assert calibrate(TRAIN, flat([10, 70, 130]), c).sources["heldout"] != str(tmp_path / "h.npz")


def test_calibrate_and_bands_file(tmp_path):
    heldout = flat([10, 70, 130, 200])  # nearest training distances 10, 10, 10, 20 (/255)
    cal = calibrate(TRAIN, heldout, cfg.EvaluateConfig(calibration_quantiles=(0.1, 0.25, 0.4)))
    assert cal.null_source == "heldout"
    np.testing.assert_allclose(np.sort(cal.nulls["heldout"]), np.array([10, 10, 10, 20]) / 255)
    np.testing.assert_allclose(cal.nulls["train"], np.full(5, 60 / 255))
    cal.write(tmp_path)
    bands = read_bands_file(tmp_path / "bands.json", "rms-l2")
    assert [b.name for b in bands] == ["low", "mid", "high"] and bands[-1].hi == pytest.approx(10 / 255)
    assert sum(cal.to_json()["null"]["heldout"]["histogram"]["counts"]) == 4
    with pytest.raises(ValueError, match="calibrated for similarity='rms-l2'"):
        read_bands_file(tmp_path / "bands.json", "cosine:x")
    with pytest.raises(ValueError, match=r"is a folder: give the bands.json in it"):  # (side calibrate's --out;
        read_bands_file(tmp_path, "rms-l2")  # it was said "does not exist")


def test_beside_a_held_out_null_the_training_sets_own_is_measured_on_a_draw(tmp_path):
    """calibrate searched every training image's nearest other one (O(N^2)) for a null that is only shown where
    held-out images set the bands: 21 of 27 s of side calibrate on 20,000 images (a scale review's find). It is
    measured on a fixed draw of as many training images as are held out (at least 1,000): each drawn image's value
    is the one the whole search gives it, the bands are the held-out null's as before, and bands.json says of how
    many the draw was made."""
    from side_extract.evaluation import TRAIN_NULL_LEAST, train_null_rows

    train, heldout = load_digits_set().subset(np.arange(1500)), load_digits_set().subset(np.arange(1500, 1797))
    c = cfg.EvaluateConfig(calibration_quantiles=(0.05, 0.1, 0.2))
    whole = calibrate(train, config=c)  # (no held-out images: the training set's null sets the bands, every one)
    assert len(whole.nulls["train"]) == 1500 and "drawn_from" not in whole.to_json()["null"]["train"]
    cal = calibrate(train, heldout, c)
    rows = train_null_rows(1500, 297)
    assert TRAIN_NULL_LEAST == 1000 and len(rows) == len(set(rows.tolist())) == 1000 and rows.max() < 1500
    assert np.array_equal(rows, train_null_rows(1500, 297))  # (a fixed draw: a rerun shows the same histogram)
    np.testing.assert_array_equal(cal.nulls["train"], whole.nulls["train"][rows])  # (each its own nearest other)
    assert cal.to_json()["null"]["train"]["drawn_from"] == 1500 and cal.to_json()["null"]["train"]["n"] == 1000
    assert cal.null_source == "heldout" and len(cal.nulls["heldout"]) == 297
    bands = propose_bands(cal.nulls["heldout"], "distance", c.calibration_quantiles)
    assert cal.bands == bands  # (set by the held-out null alone, as before)
    small = calibrate(train.subset(np.arange(800)), heldout, c)  # (fewer training images than the draw: all)
    assert len(small.nulls["train"]) == 800 and "drawn_from" not in small.to_json()["null"]["train"]


def test_a_bands_file_is_checked_as_inline_bands_are(tmp_path):
    """Overlapping bands in a hand-written bands.json counted a score in both (the AMS shares summed past 100 %),
    and a file of no bands failed with max()'s error after every extraction; inline bands were refused for both.
    Zero-width bands stay allowed: calibration writes them where quantiles coincide (above)."""
    path = tmp_path / "bands.json"
    for bands, says in (({"high": [0, 0.12], "mid": [0.109, 0.135]}, "'high' \\(0.0:0.12\\) and 'mid' .* overlap"),
                        ({}, "names no band"), ({"high": [0.2, 0.1]}, "lo <= hi"),
                        ({"high": [0.1]}, "name: \\[lo, hi\\]")):
        path.write_text(json.dumps({"similarity": "rms-l2", "bands": bands}))
        with pytest.raises(ValueError, match=says):
            read_bands_file(path, "rms-l2")
    path.write_text(json.dumps({"similarity": "rms-l2", "bands": {"high": [0, 0.1], "mid": [0.1, 0.1],
                                                                  "low": [0.1, 0.2]}}))
    assert [b.name for b in read_bands_file(path, "rms-l2")] == ["high", "mid", "low"]


def test_evaluate_reads_its_bands_file_and_refuses_unread_held_out_images_before_any_features(tmp_path,
                                                                                                monkeypatch):
    """A bands file of another similarity was refused only after both sets' features were extracted (at the paper's
    scale, the whole extraction pass); held-out images given with a cosine similarity and no bands were silently
    not read (the paper's bands were taken)."""
    from side_extract import evaluation

    def no_features(*args, **kwargs):
        raise AssertionError("features were extracted before the bands were checked")

    calibrate(TRAIN, flat([10, 70, 130, 200]), cfg.EvaluateConfig(calibration_quantiles=(0.1, 0.25, 0.4))).write(
        tmp_path)
    monkeypatch.setattr(evaluation, "_rows", no_features)
    gen = flat([0, 60])
    for bands_file, says in ((tmp_path / "bands.json", "calibrated for similarity='rms-l2', not 'cosine:pixels'"),
                             (tmp_path / "none.json", "does not exist")):
        with pytest.raises(ValueError, match=says):
            evaluate(gen, TRAIN, cfg.EvaluateConfig(similarity="cosine:pixels", bands_file=str(bands_file)))
    with pytest.raises(ValueError, match=r"held-out images \(mine\) calibrate bands, but cosine:pixels without "
                                         "bands takes the paper's cosine bands: they would not be read"):
        evaluate(gen, TRAIN, cfg.EvaluateConfig(similarity="cosine:pixels"),
                 heldout=dataclasses.replace(flat([10]), name="mine"))


def test_digits_complement():
    held = digits_complement("digits:100")
    train = load_digits_set(100)
    assert len(held) == 1797 - 100 and not set(held.ids) & set(train.ids)
    with pytest.raises(ValueError, match="complement is empty"):
        digits_complement("digits:1797")
    # at the training set's size (train_resize / --resize): the same digits, resized as load_image_set resizes
    from side_extract.data import load_image_set

    big = digits_complement("digits:100", 16)
    assert big.images.shape[1:3] == (16, 16) and big.ids.tolist() == held.ids.tolist() and big.name == held.name
    assert np.array_equal(big.images[:5], load_image_set("digits", 16).subset(held.ids[:5]).images)


def test_bands_from_given_heldout_images(tmp_path):
    """evaluate.heldout: the bands come from held-out images vs the training set, not from train vs train."""
    heldout = np.concatenate([GEN.images] * 4)
    np.savez(tmp_path / "h.npz", images=heldout)
    r = evaluate(GEN, TRAIN, cfg.EvaluateConfig(carlini_n=2, heldout=str(tmp_path / "h.npz"),
                                                calibration_quantiles=(0.05, 0.1, 0.2)))
    assert r.bands_source == f"heldout:{tmp_path / 'h.npz'}" and r.null["n"] == len(heldout)


def test_carlini_and_gu_thresholds_are_strict_by_hand():
    """Gu: memorized when d1 / d2 < 1/3; Carlini: extracted when d1 / (alpha * mean of the n nearest) < 1 (both
    papers' strict inequalities). Row 0 sits exactly on both thresholds, row 1 below both."""
    from side_extract.metrics import carlini_from_neighbors, gu_from_neighbors
    from side_extract.neighbors import NearestNeighborIndex, Neighbors

    nb = Neighbors(np.array([[1.0, 3.0], [0.5, 3.0]]), np.array([[0, 1], [0, 1]]))
    gu = gu_from_neighbors(nb)
    assert gu.ratio.tolist() == pytest.approx([1 / 3, 1 / 6]) and gu.memorized_fraction == 0.5
    index = NearestNeighborIndex("rms-l2").fit(np.zeros((2, 4), np.float32))
    c = carlini_from_neighbors(nb, index, n=2)  # alpha 0.5: 1 / (0.5 * (1 + 3) / 2) = 1; 0.5 / (0.5 * 1.75)
    assert c.ratio.tolist() == pytest.approx([1.0, 0.5 / 0.875]) and c.extracted_fraction == 0.5


def test_cumulative_similarity_band_includes_its_lower_edge():
    # similarity 0.6 is the high band's lower edge: it reaches high, and so mid and low too
    assert ams(np.array([0.6]), PAPER_COSINE_BANDS, "similarity", cumulative=True) == {"low": 1.0, "mid": 1.0,
                                                                                      "high": 1.0}
    assert ams(np.array([0.6]), PAPER_COSINE_BANDS, "similarity") == {"low": 0.0, "mid": 0.0, "high": 1.0}


def test_a_score_of_1_falls_in_one_cosine_band_where_a_band_starts_at_1(caplog):
    """A cosine band reaching 1 is closed above (it holds 1, and values rounded past it), but "mid=0.6:1,exact=1:2"
    then counted a score of 1 in both: AMS and UMS summed past 100 %, while the table named one band (a review's
    find). Calibrated bands whose top edge is 1 (mid [q, 1), high [1, 1]) did the same, and called high empty."""
    bands = parse_bands("mid=0.6:1,exact=1:2")
    best = np.array([1.0, 0.7, 1.0 + 1e-12])
    assert ams(best, bands, "similarity") == {"mid": pytest.approx(1 / 3), "exact": pytest.approx(2 / 3)}
    scores = np.array([[1.0, 0.7], [0.65, 0.2]])  # two generations, two training images
    dense = ams_ums_dense(scores, bands, "similarity")
    assert dense["ams"] == {"mid": 0.5, "exact": 0.5} and dense["ums"] == {"mid": 1.0, "exact": 0.5}
    alone = parse_bands("high=0.6:1")  # (no band above it: 1, and past it, are high)
    assert ams(best, alone, "similarity") == {"high": 1.0}
    null = np.concatenate([np.linspace(0.5, 0.99, 990), np.ones(10)])  # 1 % of the null scores 1, no copies
    with caplog.at_level(logging.WARNING):
        low, mid, high = propose_bands(null, "similarity", copies=np.zeros(1000, bool))
    assert (mid.hi, high.lo, high.hi) == (1.0, 1.0, 1.0) and "empty" not in caplog.text
    shares = ams(np.array([1.0, 0.995]), (low, mid, high), "similarity")
    assert shares["high"] == 0.5 and shares["mid"] == 0.5 and sum(shares.values()) == 1.0


def test_a_score_of_1_falls_in_exactly_one_band_when_two_calibrated_bands_are_1_1(caplog):
    """With 3 % of the null at exactly 1 (no copies), calibration puts mid and high both at [1, 1]: each saw the
    other "start at or past its hi", so both, and low [q, 1), were closed above, and a score of 1 fell in no band
    at all (AMS and UMS summed below 100 %), while the "empty band" warning was kept back for both (a review's
    find). One of them, the closest (high, by name on an exact tie), holds it, whatever order the set is listed
    in; mid is empty and said so. A band that starts past 1 holds nothing of it."""
    null = np.concatenate([np.ones(30), np.linspace(0.5, 0.99, 970)])
    with caplog.at_level(logging.WARNING):
        low, mid, high = propose_bands(null, "similarity", copies=np.zeros(1000, bool))
    assert (mid.lo, mid.hi, high.lo, high.hi, low.hi) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert "calibrated band 'mid' is empty" in caplog.text and "'high' is empty" not in caplog.text
    best = np.array([1.0, 0.995, 0.9])
    for order in ((low, mid, high), (high, mid, low), (mid, high, low)):
        shares = ams(best, order, "similarity")
        assert shares == {"low": pytest.approx(1 / 3), "mid": 0.0, "high": pytest.approx(1 / 3)}
    scores = np.array([[1.0, 0.2], [0.995, 0.3]])
    dense = ams_ums_dense(scores, (low, mid, high), "similarity")
    assert dense["ams"] == {"low": 0.5, "mid": 0.0, "high": 0.5}
    assert closest_first(bands_json((low, mid, high)), "similarity") == ["high", "mid", "low"]
    assert closest_first(bands_json((high, mid, low)), "similarity") == ["high", "mid", "low"]
    beyond = parse_bands("a=0.6:1,b=1.5:2")  # (b starts past any cosine score: a holds 1)
    assert ams(np.array([1.0, 0.7]), beyond, "similarity") == {"a": 1.0, "b": 0.0}


def test_best_quantile_by_hand():
    from side_extract.metrics import best_quantile

    v = np.linspace(0, 1, 21)  # 0, 0.05, ..., 1: the 5th percentile is the second value, the 95th the 20th
    assert best_quantile(v, "distance") == (pytest.approx(0.05), 0.05)
    assert best_quantile(v, "similarity") == (pytest.approx(0.95), 0.95)
    # between data points, linear interpolation between order statistics (numpy's default, Hyndman & Fan's type 7:
    # position q (n - 1)): on 0, 1, 2, 3 the 5th percentile lies at 0.15, the 95th at 2.85 (not the nearest or a
    # lower / higher value, which agree with it on the grid above)
    u = np.array([3.0, 0.0, 2.0, 1.0])
    assert best_quantile(u, "distance") == (pytest.approx(0.15), 0.05)
    assert best_quantile(u, "similarity") == (pytest.approx(2.85), 0.95)


def test_ng_law_by_hand():
    """One training image hit by 1 of 2 generations: p = 1/2, predicted unique 1 - (1/2)^N at N = 1, 2, 4; rarefied
    (N of the 2 generations drawn without replacement) 1 - C(1, N) / C(2, N): 1/2, 1, and none past N_G."""
    law = ng_law(np.array([0]), np.array([0]), 2, 1, n_grid=[1, 2, 4], n_repeats=1)
    assert law.predicted_unique == pytest.approx([0.5, 0.75, 0.9375])
    assert law.rarefied_unique[:2] == pytest.approx([0.5, 1.0]) and law.rarefied_unique[2] is None


def test_extrapolation_counts_images_not_yet_hit_by_hand():
    """Chao et al. (2014, eq. 9, incidence data): T = 10 generations hit six images, three once (Q1) and two twice
    (Q2): Q0 = (9/10) 3^2 / (2 * 2) = 2.025 unseen; at 2T, S = 6 + Q0 (1 - (1 - Q1 / (T Q0 + Q1))^10)
    = 6 + 2.025 (1 - (1 - 3/23.25)^10) = 7.5163. The plug-in sum_j 1 - (1 - p_j)^N can never pass 6."""
    from side_extract.metrics import extrapolated_unique, unseen_estimate

    counts = np.array([1, 1, 1, 2, 2, 5, 0, 0])
    assert unseen_estimate(3, 2, 10) == pytest.approx(2.025)
    assert unseen_estimate(3, 0, 10) == pytest.approx(0.9 * 3)  # no doubletons: (T-1)/T Q1 (Q1 - 1) / 2
    assert extrapolated_unique(counts, 10, 20) == pytest.approx(7.5163, abs=1e-4)
    assert extrapolated_unique(counts, 10, 10) == 6.0  # at T itself: the images hit
    assert extrapolated_unique(counts, 10, 21) is None and extrapolated_unique(counts, 10, 9) is None
    assert extrapolated_unique(np.array([2, 3, 0]), 10, 20) == 2.0  # nothing seen once: nothing unseen
    gen = np.repeat(np.arange(6), [1, 1, 1, 2, 2, 5])  # the same hits as a law: generation g hit image t
    law = ng_law(np.arange(12), gen, n_generated=12, n_train=8, n_grid=[12, 24, 120])
    assert law.extrapolated_unique[0] is None and law.extrapolated_unique[2] is None
    assert law.extrapolated_unique[1] == pytest.approx(extrapolated_unique(np.bincount(gen, minlength=8), 12, 24))
    assert law.extrapolated_unique[1] > 6 >= law.predicted_unique[2]  # (q1, q2) = (3, 2) recorded
    assert (law.q1, law.q2) == (3, 2)


def test_the_per_generation_carlini_hit_the_benchmarks_read_is_the_evaluations_own(tmp_path):
    """The fair benchmark bootstraps Carlini's share from each generation's hit in ``per_generation.npz``
    (``generation_stats``), not from metrics.json. By hand (n = 2, alpha 0.5): the three copies have d1 = 0, a ratio
    of 0 (extracted); the halfway image has d1 = d2 = 30/255, a ratio d1 / (0.5 * d1) = 2 (not)."""
    from side_extract.evaluation import distinct_count, generation_stats

    r = run()
    r.write(tmp_path)
    stats = generation_stats(tmp_path, parse_bands(BANDS), "distance")
    assert stats["carlini"].tolist() == [True, True, True, False]
    assert stats["carlini"].mean() == r.carlini.extracted_fraction == 0.75
    assert distinct_count(stats, "high") == 2  # train 1 and 3


def test_an_empty_calibrated_band_is_ranked_beyond_the_band_it_touches():
    """A null with ties makes an empty band (lo == hi) sharing its near edge with the next band: sorted on that edge
    alone, it came first ('mid' before 'high'), and the findings named high-band images 'mid'."""
    from side_extract.metrics import closest_first

    assert closest_first({"low": [0.3, 0.5], "mid": [0.05, 0.05], "high": [0.0, 0.05]}, "distance") == [
        "high", "mid", "low"]
    assert closest_first({"low": [0.4, 0.6], "mid": [0.6, 0.6], "high": [0.6, 1.0]}, "similarity") == [
        "high", "mid", "low"]


def test_given_bands_are_checked_as_inline_bands_are():
    """evaluate(bands=...) took overlapping bands (AMS 200 %), a repeated name (a wrong AMS of 0 for exact copies)
    and an empty list (max() of an empty sequence)."""
    with pytest.raises(ValueError, match="overlap"):
        evaluate(GEN, TRAIN, cfg.EvaluateConfig(carlini_n=2), bands=[Band("high", 0, .2), Band("mid", 0, .3)])
    with pytest.raises(ValueError, match="each band once"):
        evaluate(GEN, TRAIN, cfg.EvaluateConfig(carlini_n=2), bands=[Band("a", 0, .1), Band("a", .1, .2)])
    with pytest.raises(ValueError, match="names no band"):
        evaluate(GEN, TRAIN, cfg.EvaluateConfig(carlini_n=2), bands=[])
    with pytest.raises(ValueError, match="would not be read"):  # (rms-l2 held-out images beside given bands)
        evaluate(GEN, TRAIN, cfg.EvaluateConfig(carlini_n=2, bands=BANDS), heldout=flat([10, 70, 130]))


def test_the_recorded_null_is_the_one_the_bands_came_from(caplog):
    """Exact copies are left out of the band edges; metrics.json's null summary counted and took quantiles of them
    too, so its quantiles were not the band edges."""
    rng = np.random.default_rng(0)
    train = ImageSet(rng.integers(0, 256, (200, 4, 4, 1)).astype(np.uint8))
    train.images[100:110] = train.images[:10]
    with caplog.at_level(logging.WARNING):
        ev = evaluate(ImageSet(train.images[:3]), train, cfg.EvaluateConfig(carlini_n=2,
                                                                            calibration_quantiles=(0.05, 0.1, 0.2)))
    edges = sorted(b.hi for b in ev.bands)
    assert ev.null["n"] == 200 and ev.null["copies_left_out"] == 20
    assert sorted(ev.null["quantiles"].values()) == pytest.approx(edges)


def test_a_ratio_exactly_on_its_threshold_is_decided_exactly():
    """Gu's d1 / d2 exactly 1/3 and Carlini's ratio exactly 1 (one pixel 7 and 21 levels off: squared sums 49 and
    441) came out 0.33333333333333326 and 0.9999999999999999 from the square-rooted floats, so the strict tests
    counted the generation memorized and extracted (5 of 209 such ties in a review's sweep). The exact squared sums
    decide now: neither."""
    from side_extract.metrics import carlini_from_neighbors
    from side_extract.neighbors import NearestNeighborIndex

    g = np.full((1, 3, 3, 3), 100, np.uint8)
    g[0, 0, 0, 0] = 248
    t = np.full((2, 3, 3, 3), 100, np.uint8)
    t[0, 0, 0, 0], t[1, 0, 0, 0] = 255, 227
    carlini, gu = pixel_ratios(ImageSet(g), ImageSet(t), n=2)
    assert gu.ratio[0] == pytest.approx(1 / 3) and gu.memorized_fraction == 0.0
    assert carlini.ratio[0] == 1.0 and carlini.extracted_fraction == 0.0
    # the reference centering: train 0's nearest other training image is train 1 (28 levels off): ratio
    # 7 / (0.25 * 28) = 1 exactly
    index = NearestNeighborIndex("rms-l2").fit(t.reshape(2, -1))
    nb = index.kneighbors(g.reshape(1, -1), 2)
    ref = carlini_from_neighbors(nb, index, alpha=0.25, n=1, centering="reference")
    assert ref.ratio[0] == 1.0 and ref.extracted_fraction == 0.0
    # just below each threshold still counts (one level closer: 6 / 21 < 1/3, 6 / (0.5 * 27) < 1)
    g[0, 0, 0, 0] = 249
    carlini, gu = pixel_ratios(ImageSet(g), ImageSet(t), n=2)
    assert gu.memorized_fraction == 1.0 and carlini.extracted_fraction == 1.0


def test_features_given_for_a_pixel_similarity_are_refused():
    """evaluate(..., train_features=) and calibrate(..., heldout_features=) under rms-l2 ignored the features, of any
    shape, without a word (a review's find): rms-l2 compares pixels."""
    bands = cfg.EvaluateConfig(bands="low=0.1:0.2,mid=0.05:0.1,high=0:0.05")
    with pytest.raises(ValueError, match=r"train_features=\.\.\.: similarity 'rms-l2' compares the images' pixels"):
        evaluate(GEN, TRAIN, bands, train_features=np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"generated_features=\.\.\., train_features=\.\.\.: similarity 'rms-l2'"):
        evaluate(GEN, TRAIN, bands, generated_features=np.zeros((3, 4)), train_features=np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"heldout_features=\.\.\.: similarity 'rms-l2'"):
        calibrate(TRAIN, flat([10, 70]), heldout_features=np.zeros((2, 4)))
