"""Property tests (hypothesis): the metrics' invariants on random score matrices and on real evaluations of
random uint8 image sets, and config parsing round trips."""
from __future__ import annotations


import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from side_extract import config as cfg
from side_extract.data import ImageSet
from side_extract.evaluation import evaluate
from side_extract.metrics import BandTally, ams_ums_dense, parse_bands

BANDS = parse_bands("low=0.2:0.3,mid=0.1:0.2,high=0:0.1")  # distances: lower = closer
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def score_matrices():
    return st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
        lambda s: arrays(np.float64, s, elements=st.floats(0.0, 0.4, allow_nan=False)))


@FAST
@given(score_matrices(), st.randoms(use_true_random=False))
def test_ams_ums_ranges_cumulative_and_permutations(scores, rnd):
    d = ams_ums_dense(scores, BANDS, "distance")
    n_g, n = scores.shape
    for key in ("ams", "ams_cumulative"):
        assert all(0.0 <= v <= 1.0 for v in d[key].values())
    for b in BANDS:
        assert d["ams_cumulative"][b.name] >= d["ams"][b.name] and d["ums_cumulative"][b.name] >= d["ums"][b.name]
        # UMS = distinct training images in the band / N_G (the paper's eq. 8): each training image counts
        # once, so it is at most n / N_G; it can pass 1 when one generation lies near several training images
        in_band = (scores >= b.lo) & (scores < b.hi)  # (written out: not the implementation's Band.contains)
        assert d["ums"][b.name] * n_g == in_band.any(0).sum() <= min(n, in_band.sum())
    rows, cols = list(range(n_g)), list(range(n))
    rnd.shuffle(rows)
    rnd.shuffle(cols)
    assert ams_ums_dense(scores[rows][:, cols], BANDS, "distance") == d


@FAST
@given(score_matrices())
def test_duplicating_generations_never_counts_a_training_image_twice(scores):
    once = ams_ums_dense(scores, BANDS, "distance")
    twice = ams_ums_dense(np.concatenate([scores, scores]), BANDS, "distance")
    for b in ("low", "mid", "high"):
        assert abs(twice["ums"][b] * 2 * len(scores) - once["ums"][b] * len(scores)) < 1e-9
        assert abs(twice["ams"][b] - once["ams"][b]) < 1e-12


@FAST
@given(score_matrices())
def test_streamed_tally_equals_the_dense_formula(scores):
    n_g, n = scores.shape
    tally = BandTally(BANDS, "distance", n_g, n)
    g, t = np.nonzero(np.ones_like(scores, bool))
    half = len(g) // 2
    tally.add(g[:half], t[:half], scores.ravel()[:half])
    tally.add(g[half:], t[half:], scores.ravel()[half:])
    d = ams_ums_dense(scores, BANDS, "distance")
    assert tally.ums() == d["ums"] and tally.ums_cumulative() == d["ums_cumulative"]


image_sets = st.tuples(st.integers(2, 8), st.integers(3, 10)).flatmap(
    lambda s: st.tuples(arrays(np.uint8, (s[0], 4, 4, 1)), arrays(np.uint8, (s[1], 4, 4, 1)))
).filter(lambda s: s[1].max() > 1)  # (a training set whose every pixel is 0 or 1 is refused: images in [0, 1])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_sets, st.randoms(use_true_random=False))
def test_evaluation_is_invariant_to_the_order_of_both_sets(sets, rnd):
    gen, train = sets
    c = cfg.EvaluateConfig(bands="low=0.2:0.3,mid=0.1:0.2,high=0:0.1", carlini_n=2, ng_repeats=1)
    first = evaluate(ImageSet(gen), ImageSet(train), c)
    gi, ti = list(range(len(gen))), list(range(len(train)))
    rnd.shuffle(gi)
    rnd.shuffle(ti)
    again = evaluate(ImageSet(gen[gi]), ImageSet(train[ti]), c)
    for key in ("ams", "ums", "ams_cumulative", "ums_cumulative"):
        a, b = getattr(first, key), getattr(again, key)
        assert all(abs(a[k] - b[k]) < 1e-12 for k in a), (key, a, b)
        assert all(v >= 0 for v in a.values())
    assert abs(first.p95 - again.p95) < 1e-9


finite = st.floats(0.01, 100.0, allow_nan=False, allow_infinity=False)


@FAST
@given(st.builds(cfg.ExtractConfig, methods=st.lists(st.sampled_from(cfg.METHODS), min_size=1, unique=True).map(tuple),
                 n=st.integers(1, 10_000), seed=st.integers(0, 2**31), scale=finite, temperature=finite,
                 steps=st.integers(1, 1000), eta=st.floats(0, 1)),
       st.builds(cfg.SurrogateConfig, n_clusters=st.integers(2, 500), tau=st.floats(-1, 1),
                 select_k=st.lists(st.integers(2, 50), max_size=3).map(tuple)))
def test_config_round_trips_through_dict_and_yaml(extract, surrogate):
    import yaml

    rc = cfg.RunConfig(extract=extract, surrogate=surrogate)
    assert cfg.from_dict(cfg.RunConfig, cfg.to_dict(rc)) == rc
    assert cfg.from_dict(cfg.RunConfig, yaml.safe_load(cfg.dump_yaml(rc))) == rc


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 30), st.integers(2, 40), st.integers(1, 5), st.integers(1, 7), st.integers(1, 9),
       st.sampled_from(["rms-l2", "cosine"]), st.integers(0, 2**31))
def test_sharded_top_k_merge_equals_one_search(n_q, n_r, k, q_chunk, r_chunk, metric, seed):
    """The exact search over reference shards (ref_chunk rows at a time) merges per-shard top-k into the
    same neighbours as one search over everything, and as brute force written out here."""
    from side_extract.neighbors import NearestNeighborIndex

    k = min(k, n_r)
    rng = np.random.default_rng(seed)
    q, r = rng.normal(size=(n_q, 6)).astype(np.float32), rng.normal(size=(n_r, 6)).astype(np.float32)
    sharded = NearestNeighborIndex(metric, backend="torch", query_chunk=q_chunk, ref_chunk=r_chunk).fit(r).kneighbors(q, k)
    whole = NearestNeighborIndex(metric, backend="torch", query_chunk=10_000, ref_chunk=10_000).fit(r).kneighbors(q, k)
    np.testing.assert_array_equal(sharded.indices, whole.indices)
    np.testing.assert_allclose(sharded.scores, whole.scores, rtol=1e-5, atol=1e-6)
    if metric == "rms-l2":
        d = np.sqrt(((q[:, None, :].astype(np.float64) - r[None]) ** 2).mean(-1))
        ref = np.argsort(d, axis=1, kind="stable")[:, :k]
    else:
        qn, rn = q / np.linalg.norm(q, axis=1, keepdims=True), r / np.linalg.norm(r, axis=1, keepdims=True)
        ref = np.argsort(-(qn @ rn.T), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(sharded.indices, ref)
