import re

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from side_extract.surrogate import ClusterLabeler, TeacherLabeler, filter_advice


def blobs(n_per=30, d=16, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    centers = np.eye(d)[:3] * 5  # three orthogonal directions: well separated in cosine
    x = np.concatenate([c + spread * rng.standard_normal((n_per, d)) for c in centers])
    return x, np.repeat(np.arange(3), n_per)


def test_three_blobs_three_clusters():
    x, truth = blobs()
    lab = ClusterLabeler(n_clusters=3, tau=0.5, random_state=0).fit(x)
    assert lab.kept_.all()
    assert adjusted_rand_score(truth, lab.labels_) == 1.0
    assert np.all(lab.cohesion_ > 0.99)
    assert lab.sizes_.tolist() == [30, 30, 30]


def test_low_cohesion_cluster_dropped_and_samples_excluded():
    x, truth = blobs(n_per=40)
    rng = np.random.default_rng(1)
    diffuse = rng.standard_normal((40, 16))  # a fourth, incoherent group
    diffuse[:, :3] = 0
    x4 = np.concatenate([x, diffuse])
    lab = ClusterLabeler(n_clusters=4, tau=0.5, random_state=0).fit(x4)
    assert lab.kept_.sum() == 3
    dropped = np.flatnonzero(~lab.kept_)[0]
    assert lab.cohesion_[dropped] < 0.5
    # the diffuse samples (rows 120..159) are exactly the excluded ones
    assert np.array_equal(np.flatnonzero(lab.labels_ == -1), np.arange(120, 160))
    relabel = ClusterLabeler(n_clusters=4, tau=0.5, random_state=0, dropped="relabel").fit(x4)
    assert (relabel.labels_ >= 0).all() and set(relabel.labels_) <= set(np.flatnonzero(relabel.kept_))


def test_relabel_sends_a_dropped_clusters_samples_to_the_nearest_kept_centroid():
    """``dropped="relabel"``: a loose group around blob 2's direction (cosine about 0.57 to it, about 0 to blobs 0
    and 1) forms a cluster of low cohesion that tau 0.8 drops; its samples go to blob 2's cluster, the nearest kept
    centroid, not merely to some kept cluster (blob 2's is not the first kept one here)."""
    rng = np.random.default_rng(1)
    centers = np.eye(16)[:3] * 5
    x = np.concatenate([c + 0.05 * rng.standard_normal((30, 16)) for c in centers])
    loose = np.zeros((30, 16))
    loose[:, 2], loose[:, 3:] = 5, 2.0 * rng.standard_normal((30, 13))
    x4 = np.concatenate([x, loose])
    lab = ClusterLabeler(n_clusters=4, tau=0.8, random_state=0).fit(x4)
    blob2 = lab.cluster_[60]
    dropped = np.flatnonzero(lab.labels_ == -1)
    assert len(dropped) > 0 and set(dropped) <= set(range(90, 120)) and lab.kept_[blob2]
    assert np.flatnonzero(lab.kept_)[0] != blob2
    relabel = ClusterLabeler(n_clusters=4, tau=0.8, random_state=0, dropped="relabel").fit(x4)
    assert (relabel.labels_[dropped] == blob2).all()
    kept_rows = np.setdiff1d(np.arange(120), dropped)
    assert np.array_equal(relabel.labels_[kept_rows], lab.labels_[kept_rows])  # the kept clusters' samples stay


def test_relabel_keeps_every_kept_clusters_samples_where_k_means_put_them():
    """With every cluster kept (tau -1, min_size 1) nothing is dropped, so ``relabel`` labels equal ``drop``'s
    K-means clusters row for row. Random points in 3-D put samples near cluster boundaries, where K-means'
    Euclidean rule and the nearest normalised centroid by cosine disagree (seed 7: two samples)."""
    x = np.random.default_rng(7).standard_normal((60, 3))
    drop = ClusterLabeler(n_clusters=8, tau=-1.0, min_size=1, n_init=1, random_state=7).fit(x)
    relabel = ClusterLabeler(n_clusters=8, tau=-1.0, min_size=1, n_init=1, random_state=7, dropped="relabel").fit(x)
    assert drop.kept_.all() and np.array_equal(drop.labels_, drop.cluster_)
    assert np.array_equal(relabel.labels_, drop.labels_)


def test_cohesion_by_hand():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [10.0, 0.0], [0.0, 10.0]])
    lab = ClusterLabeler(n_clusters=2, tau=0.0, min_size=1, random_state=0, n_init=1).fit(x)
    for k in range(2):
        members = x[lab.cluster_ == k] / np.linalg.norm(x[lab.cluster_ == k], axis=1, keepdims=True)
        c = members.mean(0)
        c /= np.linalg.norm(c)
        assert lab.cohesion_[k] == pytest.approx((members @ c).mean())


def test_cohesion_against_the_normalised_centroid_and_inclusive_filters_by_hand():
    """Cluster {(1, 0), (0, 1)}: its normalised centroid is (s, s), s = 1/sqrt(2), so each member's cosine, and the
    cohesion, is s = 0.7071 (without normalising the centroid it would be 0.5 and tau = 0.6 would drop it). The two
    filters keep a cluster at exactly tau and at exactly min_size."""
    s = 1 / np.sqrt(2)
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-s, -s], [-2 * s, -2 * s]])
    lab = ClusterLabeler(n_clusters=2, tau=0.6, min_size=2, random_state=0, n_init=5).fit(x)
    a = lab.cluster_[0]
    assert lab.cluster_[1] == a and lab.cluster_[2] == lab.cluster_[3] != a
    assert lab.cohesion_[a] == pytest.approx(s) and lab.cohesion_[1 - a] == pytest.approx(1.0)
    assert lab.kept_.all()
    y = np.array([[1.0, 0.0], [10.0, 0.0], [0.0, 1.0], [0.0, 10.0]])  # cohesion exactly 1, size exactly 2
    lab = ClusterLabeler(n_clusters=2, tau=1.0, min_size=2, random_state=0, n_init=1).fit(y)
    assert lab.cohesion_.tolist() == [1.0, 1.0] and lab.kept_.all()
    assert not ClusterLabeler(n_clusters=2, tau=0.0, min_size=3, random_state=0, n_init=1).fit(
        np.concatenate([y, y[:1]])).kept_.all()  # sizes 3 and 2: the pair is dropped at min_size 3


def test_all_dropped_warns_with_advice():
    x, _ = blobs(spread=3.0)
    with pytest.warns(RuntimeWarning, match=r"all 3 clusters were dropped.*set surrogate.tau <="):
        lab = ClusterLabeler(n_clusters=3, tau=0.999).fit(x)
    assert (lab.labels_ == -1).all()
    # dropped by their size alone: the advice names min_size (it said "set tau <= ..." with tau already at -1)
    with pytest.warns(RuntimeWarning, match=r"by the size filter \(min_size=1000; the largest has \d+ images\)"):
        lab = ClusterLabeler(n_clusters=3, tau=-1.0, min_size=1000).fit(x)
    assert (lab.labels_ == -1).all()


def test_filter_advice_names_the_setting_that_keeps_enough_clusters():
    """By hand: sizes 30, 20, 5 and cohesions 0.9, 0.4, 0.95. To keep 2 at min_size 10, tau must be <= 0.4 (the
    third cluster is too small, however cohesive); at min_size 25 only one cluster is big enough, and of those that
    pass tau 0.5 (30 and 5 images) the second largest has 5, so min_size <= 5 keeps 2 at this tau."""
    sizes, cohesion = np.array([30, 20, 5]), np.array([0.9, 0.4, 0.95])
    assert filter_advice(sizes, cohesion, 0.5, 10, keep=2).startswith(
        "the cohesion filter (tau=0.5, min_size=10); the second most cohesive of at least min_size images has "
        "cohesion 0.4000: set surrogate.tau <= 0.400")
    assert filter_advice(sizes, cohesion, 0.5, 25, keep=2).startswith(
        "the size filter (min_size=25; the largest has 30 images, the second largest of cohesion >= tau=0.5 has 5): "
        "set surrogate.min_size <= 5 (or use")
    assert "set surrogate.tau <= 0.900" in filter_advice(sizes, np.array([0.9, np.nan, 0.95]), 0.95, 10, keep=1)


def test_filter_advice_on_collapsed_features_advises_no_impossible_setting():
    """Features all pointing one way leave one full cluster and the rest empty: the advice for 2 classes was
    "set surrogate.min_size <= 0", which the config refuses and which would keep no more."""
    lab = ClusterLabeler(n_clusters=3, tau=0.5, min_size=2, n_init=1).fit(np.tile([[1.0, 2.0, 3.0]], (10, 1)))
    said = filter_advice(lab.sizes_, lab.cohesion_, 0.5, 2, keep=2)
    assert "only 1 of the 3 clusters hold any image" in said and "min_size <=" not in said, said


def test_filter_advice_rounds_tau_down_so_following_it_keeps_a_cluster():
    """A best cohesion of 0.98352 was advised as "tau <= 0.984" (rounded up): that tau keeps none of the clusters again
    (a review's find). The advised tau is now rounded down, and following it on real clusters keeps one."""
    assert "set surrogate.tau <= 0.983 " in filter_advice(np.array([10, 10]), np.array([0.98352, 0.5]), 1.0, 2, keep=1)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.5, (10, 6)) for c in rng.normal(0, 2, (3, 6))])
    with pytest.warns(RuntimeWarning, match="all 3 clusters were dropped") as said:
        ClusterLabeler(n_clusters=3, tau=1.0, n_init=1, random_state=0).fit(x)
    advised = float(re.search(r"set surrogate.tau <= ([0-9.]+)", str(said[0].message)).group(1))
    assert ClusterLabeler(n_clusters=3, tau=advised, n_init=1, random_state=0).fit(x).kept_.any()


def test_select_k_on_a_collapsed_set_says_why():
    """Synthetic features that all point the same way: K-means finds one cluster and sklearn's silhouette raised
    "Number of labels is 1", naming neither K nor the synthetic set (a review's find)."""
    y = np.tile(np.random.default_rng(0).normal(size=(1, 6)), (10, 1))
    with pytest.raises(ValueError, match=r"K=2 put all 10 synthetic images in one cluster.*surrogate.n_clusters"):
        ClusterLabeler(select_k=(2, 3), n_init=1).fit(y)


def test_too_many_clusters_names_both_numbers():
    x, _ = blobs(n_per=5)
    with pytest.raises(ValueError, match=r"n_clusters=100 .*\(15\)"):
        ClusterLabeler(n_clusters=100).fit(x)


def test_seeded_determinism_and_predict():
    x, _ = blobs()
    a = ClusterLabeler(n_clusters=3, random_state=5).fit(x)
    b = ClusterLabeler(n_clusters=3, random_state=5).fit(x)
    assert np.array_equal(a.labels_, b.labels_)
    assert np.array_equal(a.predict(x), a.labels_)


def test_teacher_labels_and_confidence():
    class Fixed(torch.nn.Module):
        def forward(self, x, t):
            return torch.stack([x.flatten(1).mean(1) * 10, -x.flatten(1).mean(1) * 10], 1)

    x = torch.cat([torch.full((3, 1, 4, 4), 0.5), torch.full((2, 1, 4, 4), -0.5), torch.zeros(1, 1, 4, 4)])
    t = TeacherLabeler(Fixed(), np.array([7, 9]), min_confidence=0.6).fit(x)
    assert t.labels_.tolist() == [7, 7, 7, 9, 9, -1]


def test_select_k_by_silhouette_finds_the_true_k():
    x, truth = blobs()
    lab = ClusterLabeler(select_k=(2, 3, 5, 8), tau=0.5, random_state=0).fit(x)
    assert set(lab.k_scores_) == {2, 3, 5, 8}
    assert lab.n_clusters_ == 3 and max(lab.k_scores_, key=lab.k_scores_.get) == 3
    assert adjusted_rand_score(truth, lab.labels_) == 1.0 and len(lab.cohesion_) == 3
    # same answer as fixing K = 3
    fixed = ClusterLabeler(n_clusters=3, tau=0.5, random_state=0).fit(x)
    assert np.array_equal(fixed.labels_, lab.labels_) and fixed.k_scores_ == {}
    with pytest.raises(ValueError, match="select_k value 90 must be between 2 and .* \\(89\\)"):
        ClusterLabeler(select_k=(3, 90)).fit(x)


def test_a_cluster_of_identical_images_passes_tau_one_whatever_the_rounding():
    """tau = 1 keeps the clusters of identical images, the surest copies a run finds: their cohesion rounds to
    1 - 1.1e-16 or 1 + 2.2e-16 by chance, and an exact >= dropped 6 of 60 such clusters over 20 seeds."""
    dropped = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        x = np.repeat(rng.normal(size=(3, 16)).astype(np.float32), 4, axis=0)  # 3 clusters of 4 exact copies
        lab = ClusterLabeler(3, tau=1.0, n_init=1, random_state=seed).fit(x)
        dropped += int((~lab.kept_).sum())
    assert dropped == 0
    x = np.repeat(np.eye(3, 16, dtype=np.float32), 4, axis=0)
    x[0] += 0.05  # one cluster a little less than perfectly cohesive: still dropped at tau 1
    assert ClusterLabeler(3, tau=1.0, n_init=1).fit(x).kept_.sum() == 2


def test_an_empty_clusters_cohesion_is_listed_as_none_not_zero():
    """clusters.json wrote an empty cluster's cohesion (NaN) as 0.0, a real-looking value (a review's find)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (K-means' own warning of fewer distinct points than clusters)
        lab = ClusterLabeler(3, tau=0.5, min_size=1, n_init=1).fit(np.array([[1.0, 0], [1, 0], [1, 0], [0, 1]]))
    rows = lab.clusters()
    assert [r["size"] for r in rows] == lab.sizes_.tolist() and sorted(lab.sizes_.tolist()) == [0, 1, 3]
    empty = next(r for r in rows if r["size"] == 0)
    assert empty["cohesion"] is None and not empty["kept"]
    assert all(r["cohesion"] == pytest.approx(1.0) for r in rows if r["size"])


def test_labeler_settings_of_the_wrong_kind_are_named():
    """From Python: tau=None was a comparison's TypeError at fit; select_k=[2.5] passed the range check and
    sklearn then said n_clusters was wrong; a teacher given fewer label values than outputs failed with an
    IndexError only where argmax reached a missing one, and more were ignored."""
    for kw, said in [(dict(tau=None), "tau=None must be a number"), (dict(tau="0.5"), "tau='0.5' must be a number"),
                     (dict(select_k=[2.5]), "select_k value=2.5 must be an integer >= 2")]:
        with pytest.raises(ValueError, match=re.escape(said)):
            ClusterLabeler(n_clusters=3, **kw)

    class Three(torch.nn.Module):
        def forward(self, x, t):
            return torch.stack([x.flatten(1).mean(1) * k for k in (1, 2, 3)], 1)

    x = torch.full((4, 1, 4, 4), 0.5)
    for classes in ([10, 20], [10, 20, 30, 40]):
        with pytest.raises(ValueError, match=f"classes has {len(classes)} entries but the classifier has 3 outputs"):
            TeacherLabeler(Three(), np.array(classes)).fit(x)
    assert TeacherLabeler(Three(), np.array([10, 20, 30])).fit(x).labels_.tolist() == [30] * 4


def test_filter_advice_for_min_size_also_names_tau_when_those_clusters_fail_it():
    """By hand: sizes 10, 1, 1 and cohesions 0.9, 0.2, 0.2 at tau 0.5, min_size 2. To keep 2, min_size must be
    <= 1, and then the second most cohesive cluster has 0.2 < tau: the advice names min_size alone, following it kept
    one cluster, and only the next refusal named tau (a review's find). Following the advice now keeps 2."""
    sizes, cohesion = np.array([10, 1, 1]), np.array([0.9, 0.2, 0.2])
    said = filter_advice(sizes, cohesion, 0.5, 2, keep=2)
    assert "set surrogate.min_size <= 1 and surrogate.tau <= 0.200 " in said, said
    assert ("1 of two images or more pass tau=0.5, and the second most cohesive of at least 1 images has cohesion "
            "0.2000") in said, said
    kept = (sizes >= 1) & (cohesion >= 0.2)
    assert kept.sum() >= 2
    # where those clusters pass tau, min_size alone (as before)
    said = filter_advice(sizes, np.array([0.9, 0.6, 0.2]), 0.5, 2, keep=2)
    assert "set surrogate.min_size <= 1 (or use" in said and "tau <=" not in said, said
    # large diffuse clusters and small tight ones (SIDE's copies): a smaller min_size keeps 2 at this tau, so the
    # advice does not lower tau to the diffuse ones' cohesion (a review of the first version's find)
    sizes, cohesion = np.array([10, 9, 3, 3]), np.array([0.10, 0.12, 0.90, 0.85])
    said = filter_advice(sizes, cohesion, 0.5, 11, keep=2)
    assert "set surrogate.min_size <= 3 (or use" in said and "tau <=" not in said, said
    assert ((sizes >= 3) & (cohesion >= 0.5)).sum() == 2
    # lone images (cohesion 1 by definition) are no classes to advise: min_size stays at 2 or more, tau goes down
    said = filter_advice(np.array([14, 13, 12, 1, 1]), np.array([0.48, 0.47, 0.46, 1.0, 1.0]), 0.5, 20, keep=2)
    assert "set surrogate.min_size <= 13 and surrogate.tau <= 0.470 " in said, said
