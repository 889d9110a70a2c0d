"""Label-free detection: planted duplicate groups among generations are found and verified."""
from __future__ import annotations

import numpy as np
import pytest

from side_extract import config as cfg
from side_extract.data import ImageSet
from side_extract.detection import default_grid, detect_memorized, near_duplicate_pairs, tiled_distances
from side_extract.evaluation import evaluate


def planted(seed: int = 0):
    """30 random training images; generations: 6 noisy copies of train 3, 5 of train 7, 4 copies of a
    non-training image (a false positive group), and 40 random images."""
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)
    outsider = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)

    def copies(img, n):
        noise = rng.integers(-3, 4, (n, *img.shape))
        return np.clip(img[None].astype(int) + noise, 0, 255).astype(np.uint8)

    gen = np.concatenate([copies(train[3], 6), copies(train[7], 5), copies(outsider, 4),
                          rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)])
    order = rng.permutation(len(gen))
    return ImageSet(train), ImageSet(gen[order]), order


def test_tiled_distance_is_max_over_tiles():
    a = np.zeros((1, 8, 8, 1), np.uint8)
    b = a.copy()
    b[0, :4, :4] = 255  # one 4x4 tile differs completely
    assert tiled_distances(a, b, 2)[0, 0] == pytest.approx(1.0)
    assert tiled_distances(a, b, 1)[0, 0] == pytest.approx(0.5)  # whole-image RMS: sqrt(16 / 64)
    assert default_grid(8, 8) == 2 and default_grid(32, 32) == 4 and default_grid(4, 4) == 1


def test_pairs_match_brute_force():
    _, gen, _ = planted()
    d = tiled_distances(gen.images, gen.images, 2)
    i, j, dd = near_duplicate_pairs(gen.images, 0.1, 2, chunk=13)
    want = {(a, b) for a, b in zip(*np.nonzero(d < 0.1)) if a < b}
    assert set(zip(i.tolist(), j.tolist())) == want
    np.testing.assert_allclose(dd, d[i, j])


@pytest.mark.parametrize("mode", ["cliques", "components"])
def test_planted_groups_found_with_precision(mode):
    train, gen, order = planted()
    where = np.argsort(order)  # original position -> row in the shuffled set
    det = detect_memorized(gen, 0.05, min_size=4, mode=mode, train=train, chunk=16)
    groups = sorted(sorted(g) for g in det.groups)
    assert groups == sorted([sorted(where[:6].tolist()), sorted(where[6:11].tolist()), sorted(where[11:15].tolist())])
    by_size = {len(g): v for g, v in zip(det.groups, det.verified)}
    assert by_size == {6: True, 5: True, 4: False}
    assert det.precision == pytest.approx(2 / 3)
    near = dict(zip(map(len, det.groups), det.nearest_train_index))
    assert near[6] == 3 and near[5] == 7
    assert det.to_json()["n_suspected"] == 15


def test_cliques_stricter_than_components():
    # a chain: 0-1 and 1-2 are near, 0-2 are not
    base = np.zeros((3, 8, 8, 1), np.uint8)
    base[1] += 10
    base[2] += 20
    gen = ImageSet(base)
    thr = 15 / 255 + 1e-9
    assert detect_memorized(gen, thr, min_size=3, mode="components").groups == [[0, 1, 2]]
    assert detect_memorized(gen, thr, min_size=3, mode="cliques").groups == []
    assert detect_memorized(gen, thr, min_size=3, mode="cliques", train=gen).precision is None


def test_a_group_whose_every_pair_is_near_is_one_clique_without_the_clique_search(monkeypatch):
    """One image generated many times links every pair: the clique search over that complete graph took ~n^3
    (1,000 copies 18 s, 2,000 copies 127 s; a review's find). Such a group is one clique as it is; the planted groups
    (complete too) come out as the search found them, and a group with a pair missing still goes to the search."""
    import networkx as nx

    train, gen, order = planted()
    searched = []
    real = nx.find_cliques
    monkeypatch.setattr(nx, "find_cliques", lambda g: searched.append(g.number_of_nodes()) or real(g))
    where = np.argsort(order)
    det = detect_memorized(gen, 0.05, min_size=4, mode="cliques", train=train, chunk=16)
    assert sorted(sorted(g) for g in det.groups) == sorted(
        [sorted(where[:6].tolist()), sorted(where[6:11].tolist()), sorted(where[11:15].tolist())])
    assert searched == []
    base = np.zeros((3, 8, 8, 1), np.uint8)
    base[1] += 10
    base[2] += 20  # 0-2 not near: a chain, searched
    assert detect_memorized(ImageSet(base), 15 / 255 + 1e-9, min_size=3, mode="cliques").groups == []
    assert searched == [3]


def test_a_clique_overlapping_a_larger_one_keeps_its_other_members():
    """Two groups of near-copies with one generation between them (near both, the groups far apart): two maximal
    cliques of 5 sharing it. The second group was dropped whole because it overlapped the first."""
    values = [0, 0, 0, 0, 5, 10, 10, 10, 10]  # group A, the generation between, group B
    gen = ImageSet(np.stack([np.full((8, 8, 1), v, np.uint8) for v in values]))
    thr = 6 / 255
    assert detect_memorized(gen, thr, min_size=4, mode="cliques").groups == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert detect_memorized(gen, thr, min_size=5, mode="cliques").groups == [[0, 1, 2, 3, 4]]  # B alone: 4
    assert detect_memorized(gen, thr, min_size=4, mode="components").groups == [list(range(9))]
    i, j, d = near_duplicate_pairs(gen.images[:0], thr, 2)  # no images: no pairs (it raised)
    assert len(i) == len(j) == len(d) == 0


def test_a_component_of_exponentially_many_maximal_cliques_takes_its_groups_greedily_and_says_so(caplog):
    """100 noisy copies of one image with 2 % of their pairs just above the threshold: the old code listed every
    maximal clique (millions; 5.9 GB and more than 90 s, a review's find). Past MAX_CLIQUES the component's groups are
    taken greedily: still disjoint cliques of at least min_size, counted in Detection.greedy and warned of."""
    import signal

    rng = np.random.default_rng(0)
    base = rng.integers(40, 216, (1, 16, 16, 3))
    images = np.clip(base + rng.normal(0, 6, (100, 16, 16, 3)), 0, 255).astype(np.uint8)
    d = tiled_distances(images, images, 4)
    threshold = float(np.quantile(d[np.triu_indices(100, 1)], 0.98))
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the clique search ran past 30 s"))
    signal.alarm(30)
    try:
        with caplog.at_level("WARNING", logger="side_extract.detection"):
            det = detect_memorized(ImageSet(images), threshold, min_size=10, grid=4)
    finally:
        signal.alarm(0)
    assert det.greedy == 1 and det.to_json()["greedy"] == 1
    assert "more than 20000 maximal cliques" in caplog.text
    members = [m for g in det.groups for m in g]
    assert len(members) == len(set(members)) and all(len(g) >= 10 for g in det.groups)
    for g in det.groups:  # every group a clique: each pair below the threshold
        assert (d[np.ix_(g, g)][np.triu_indices(len(g), 1)] < threshold).all()
    assert len(det.groups[0]) >= 60  # (68 here; at the 0.99 quantile, where the exact search ends in 5 s, both 78)


def test_the_greedy_groups_equal_the_exact_ones_on_the_hand_made_graphs(monkeypatch):
    """With the clique list cut at once, the greedy groups of the hand-made cases are the exact search's: the two
    groups with a generation between them, and a chain (no clique of 3)."""
    import side_extract.detection as detection

    values = [0, 0, 0, 0, 5, 10, 10, 10, 10]
    gen = ImageSet(np.stack([np.full((8, 8, 1), v, np.uint8) for v in values]))
    exact = detect_memorized(gen, 6 / 255, min_size=4, mode="cliques")
    monkeypatch.setattr(detection, "MAX_CLIQUES", 0)
    greedy = detect_memorized(gen, 6 / 255, min_size=4, mode="cliques")
    assert greedy.groups == exact.groups == [[0, 1, 2, 3, 4], [5, 6, 7, 8]] and (exact.greedy, greedy.greedy) == (0, 1)
    chain = np.zeros((3, 8, 8, 1), np.uint8)
    chain[1] += 10
    chain[2] += 20
    assert detect_memorized(ImageSet(chain), 15 / 255 + 1e-9, min_size=3, mode="cliques").groups == []


def test_detection_in_evaluate(tmp_path):
    train, gen, _ = planted()
    r = evaluate(gen, train, cfg.EvaluateConfig(bands="high=0:0.05", carlini_n=5, detect_threshold=0.05,
                                                detect_min_size=4))
    assert r.detection.precision == pytest.approx(2 / 3)
    assert r.to_json()["detection"]["n_groups"] == 3


def test_errors():
    _, gen, _ = planted()
    with pytest.raises(ValueError, match="min_size=1"):
        detect_memorized(gen, 0.1, min_size=1)
    with pytest.raises(ValueError, match="threshold=nan must be > 0"):  # it linked no pair and found no group
        detect_memorized(gen, float("nan"))
    with pytest.raises(ValueError, match="mode='stars'"):
        detect_memorized(gen, 0.1, mode="stars")
    with pytest.raises(ValueError, match="grid=9"):
        detect_memorized(gen, 0.1, grid=9)
    with pytest.raises(ValueError, match="needs at least one generation, got none"):  # (was numpy's reshape error)
        detect_memorized(gen.subset(np.arange(0)), 0.1)


def test_bad_settings_refused_before_the_pair_scan(monkeypatch):
    import side_extract.detection as detection
    import side_extract.evaluation as evaluation

    train, gen, _ = planted()

    def no_scan(*a, **k):
        raise AssertionError("the pair scan ran before the refusal")

    monkeypatch.setattr(detection, "near_duplicate_pairs", no_scan)
    other = ImageSet(np.zeros((5, 4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match=r"differ in shape"):  # (refused after the O(N^2) scan and the cliques)
        detect_memorized(gen, 0.1, train=other)
    for bad in (float("nan"), -1.0, 0.0):  # (accepted: an exact copy's group was reported as not extracted)
        with pytest.raises(ValueError, match=f"extraction_threshold={bad} must be > 0"):
            detect_memorized(gen, 0.1, train=train, extraction_threshold=bad)
    monkeypatch.setattr(evaluation, "NearestNeighborIndex", no_scan)
    with pytest.raises(ValueError, match="detect_grid=20 must be between 1 and the image side 8"):
        # (refused only after both neighbour searches of the whole evaluation)
        evaluate(gen, train, cfg.EvaluateConfig(bands="high=0:0.05", detect_threshold=0.1, detect_grid=20))


def test_detection_refuses_a_chunk_below_one_and_an_empty_training_set_before_its_pair_scan(monkeypatch):
    """chunk 0 met numpy's range error inside the pair scan; an empty training set was refused after the pair
    scan's quadratic work; an array for the generations was an AttributeError."""
    from side_extract import detection
    from side_extract.data import ImageSet, load_image_set

    generated = load_image_set("digits:20")
    with pytest.raises(ValueError, match="generated must be an ImageSet"):  # (an AttributeError)
        detection.detect_memorized(generated.images, 0.1)
    monkeypatch.setattr(detection, "near_duplicate_pairs", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the pair scan ran")))
    for chunk in (0, -3):
        with pytest.raises(ValueError, match=f"chunk={chunk} must be an integer >= 1"):
            detection.detect_memorized(generated, 0.1, chunk=chunk)
    empty = ImageSet(generated.images[:0], None, np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="train holds no images"):
        detection.detect_memorized(generated, 0.1, train=empty)


def test_many_small_maximal_cliques_do_not_make_the_groups_greedy():
    """The cap counted every maximal clique: a chain of 25,000 linked pairs joined to a dense group of 10 (one pair
    unlinked) had its groups taken greedily though listing them takes a second (a review's find). Only the cliques
    of min_size or more count: the groups are the exact search's, two cliques of 9 sharing 8 taken as 9 then none."""
    from side_extract.detection import _groups

    dense = [(a, b) for a in range(10) for b in range(a + 1, 10) if (a, b) != (0, 1)]
    chain = [(k, k + 1) for k in range(9, 9 + 25_000)]
    i, j = np.array([p[0] for p in dense + chain]), np.array([p[1] for p in dense + chain])
    groups, greedy = _groups(9 + 25_001, i, j, 4, "cliques")
    assert greedy == 0 and groups == [[0] + list(range(2, 10))]
