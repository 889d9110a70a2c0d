"""Sample quality against independent references: the Frechet distance of Gaussians in closed form, the
unbiased MMD^2 written as a double loop, precision/recall on hand-made manifolds; and in a run's metrics."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from side_extract.pipeline import run_audit
from side_extract.quality import (frechet_distance, frechet_distance_of, kernel_distance, mmd2_jackknife_se,
                                  mmd2_unbiased, precision_recall, quality_from_features)

from test_pipeline import tiny_rc


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_frechet_commuting_covariances_closed_form():
    """S1 = R diag(a) R^T, S2 = R diag(b) R^T: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    r = _rotation(5, 0)
    a, b = np.array([1.0, 2.0, 0.5, 3.0, 0.1]), np.array([0.3, 2.0, 1.5, 1.0, 0.4])
    mu1, mu2 = np.arange(5.0), np.arange(5.0)[::-1] * 0.5
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, r @ np.diag(a) @ r.T, mu2, r @ np.diag(b) @ r.T) == pytest.approx(expect, rel=1e-9)


def test_frechet_non_commuting_2x2_closed_form():
    """For 2x2 M = S1 S2 with eigenvalues l1, l2 >= 0: Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M))."""
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.2], [-0.2, 1.5]])
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expect = 1.0 ** 2 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(np.array([1.0, 0.0]), s1, np.zeros(2), s2) == pytest.approx(expect, rel=1e-9)


def test_frechet_refuses_matrices_that_are_no_covariances():
    """sqrtm of a product with a negative eigenvalue is imaginary; its real part was taken without a word. Where the
    product's root is real (-I against -I: the formula gives -8; diag(4, -1) against diag(1, -4)), the negative
    distance was raised to 0, a perfect score (a review's find): a statistic with a negative eigenvalue, or not
    symmetric, is refused, by name."""
    s1 = np.diag([-1.0, 1.0])  # not positive semi-definite: sqrtm(s1 @ I) = diag(i, 1)
    with pytest.raises(ValueError, match=r"s1 has a negative eigenvalue \(-1\): it must be a covariance matrix"):
        frechet_distance(np.zeros(2), s1, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="s1 has a negative eigenvalue"):
        frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), -np.eye(2))
    with pytest.raises(ValueError, match=r"s2 has a negative eigenvalue \(-4\)"):
        frechet_distance(np.zeros(2), np.diag([4.0, 1.0]), np.zeros(2), np.diag([1.0, -4.0]))
    with pytest.raises(ValueError, match="s2 is not symmetric"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]))
    # a NaN statistic scored 0.0, a perfect distance (max(0.0, nan) is 0.0: a review's find)
    eye = np.eye(2)
    with pytest.raises(ValueError, match=r"mu1 has non-finite values \(NaN or inf\)"):
        frechet_distance(np.array([np.nan, 0.0]), eye, np.zeros(2), eye)
    with pytest.raises(ValueError, match="s2 has non-finite values"):
        frechet_distance(np.zeros(2), eye, np.zeros(2), np.array([[np.nan, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="no dimension"):
        frechet_distance(np.zeros(0), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)))
    assert frechet_distance(np.array([3.0, 0.0]), eye, np.zeros(2), eye) == pytest.approx(9.0)


def test_frechet_takes_float32_statistics_of_fewer_samples_than_features():
    """Covariances computed in float32 (100 samples of 1,024 features, as an Inception pipeline might keep them)
    have eigenvalues float32 rounds below 0 (about -1e-6): a bound of 1e-6 of the entries refused them as "no
    covariance" (a review's find). The bound follows the statistics' precision and dimension."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 1024)).astype(np.float32) / 8
    x = np.maximum(rng.standard_normal((100, 64)).astype(np.float32) @ w + 0.2, 0)
    xc = x - x.mean(0)
    s = xc.T @ xc / np.float32(99)
    assert s.dtype == np.float32 and np.linalg.eigvalsh(s.astype(np.float64))[0] < -1e-6 * np.abs(s).max()
    fd = frechet_distance(x.mean(0), s, x.mean(0) + 0.01, s)
    assert fd == pytest.approx(0.01 ** 2 * 1024, rel=1e-2)


def test_frechet_scales_with_the_features_without_refusing_rounding():
    """FD(s a, s b) = s^2 FD(a, b). With fewer samples than dimensions sqrtm's rounding leaves an imaginary part
    that grows with the features' scale: features x 255 were refused as 'no covariances' (an absolute 1e-3)."""
    rng = np.random.default_rng(0)
    a = np.maximum(rng.normal(size=(100, 300)), 0)
    b = a.copy()
    b[::2] = np.maximum(rng.normal(size=(50, 300)), 0)
    base = frechet_distance_of(a, b)
    assert base > 0
    assert frechet_distance_of(a * 255, b * 255) == pytest.approx(base * 255**2, rel=1e-4)


def test_frechet_from_samples_of_known_gaussians():
    rng = np.random.default_rng(1)
    r = _rotation(4, 2)
    a, b = np.array([1.0, 0.5, 2.0, 0.2]), np.array([0.5, 0.5, 1.0, 0.8])
    x = rng.normal(size=(40_000, 4)) * np.sqrt(a) @ r.T
    y = rng.normal(size=(40_000, 4)) * np.sqrt(b) @ r.T + 0.5
    expect = 4 * 0.25 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance_of(x, y) == pytest.approx(expect, rel=0.03)
    assert frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_with_fewer_samples_than_dimensions_is_exact():
    """Below the dimension (pixels of 32x32 RGB and up against 1,000 images) the covariances are singular: FID's
    reference code offsets both by 1e-6 I, and the d x d sqrtm took 197 s at d = 3072 (d^2 memory: 19 GB each at
    128x128 RGB). The reference here: Tr sqrtm(s1 s2) = Tr sqrt(s1^1/2 s2 s1^1/2), symmetric PSD, from eigh."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(30, 120)) @ rng.normal(size=(120, 120)) * 0.1
    b = rng.normal(size=(25, 120)) * 0.7 + 0.2

    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.where(w > 1e-10 * w.max(), w, 0))) @ v.T

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r = psd_sqrt(s1)
    w = np.linalg.eigvalsh(r @ s2 @ r)  # rank <= 24: the rest is rounding, whose square roots would add up
    tr_sqrt = np.sqrt(w[w > 1e-10 * w.max()]).sum()
    expect = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance_of(a, b) == pytest.approx(expect, rel=1e-9)
    assert frechet_distance_of(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_takes_the_small_route_whenever_one_set_has_fewer_samples_than_dimensions(monkeypatch):
    """The d x d covariances and their sqrtm were taken while d <= n + m: 2,072 generations of 32x32 RGB pixels
    against the 1,000 reference images took 111 s where 2,071 took 1.4 s (a review's find). The n x m route is exact
    for any sizes; it is taken where the smaller set has fewer samples than dimensions, and agrees with the d x d
    route (checked here against it, run by hand)."""
    import side_extract.quality as quality

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(200, 100)), rng.normal(size=(30, 100)) * 0.8 + 0.1
    expect = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))

    def refused(*args):
        raise AssertionError("the d x d route")

    monkeypatch.setattr(quality, "frechet_distance", refused)
    assert frechet_distance_of(a, b) == pytest.approx(expect, rel=1e-6)


def mmd2_loop(a, b):
    """The unbiased estimator written out: pairs i != j within each set, all pairs across."""
    k = lambda x, y: (x @ y / len(x) + 1) ** 3  # noqa: E731
    n, m = len(a), len(b)
    xx = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_kid_estimator_and_its_standard_error():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(7, 3)), rng.normal(size=(9, 3)) + 0.3
    assert mmd2_unbiased(a, b) == pytest.approx(mmd2_loop(a, b), rel=1e-10)
    same1, same2 = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    kid, se = kernel_distance(same1, same2, n_subsets=30, subset_size=200)
    assert abs(kid) < 4 * se
    far, se_far = kernel_distance(same1, same2 + 0.5, n_subsets=30, subset_size=200)
    assert far > 10 * se_far > 0
    with pytest.raises(ValueError, match=r"subset_size=2: the kernel distance's subsets need at least 3"):
        kernel_distance(same1, same2, subset_size=2)  # (it blamed the sets: "got 600 and 600")


def test_precision_recall_on_hand_made_manifolds():
    rng = np.random.default_rng(4)
    modes = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    real = np.concatenate([m + 0.3 * rng.normal(size=(100, 2)) for m in modes])
    half = np.concatenate([m + 0.3 * rng.normal(size=(100, 2)) for m in modes[:2]])  # two of four modes
    p, r = precision_recall(real, half, k=3)
    assert p > 0.95 and 0.4 < r < 0.6
    p, r = precision_recall(real, real + 100, k=3)
    assert p == 0.0 and r == 0.0
    for k in (0, -1, 2.5, True):  # (0 gave 0 and 0, -1 gave 1 and 1, 2.5 failed inside np.partition)
        with pytest.raises(ValueError, match=f"k={k} must be an integer >= 1"):
            precision_recall(real, half, k=k)
    with pytest.raises(ValueError, match="n_subsets=0 must be >= 1"):  # (a NaN distance)
        kernel_distance(real, half, n_subsets=0)


def test_quality_in_a_runs_metrics(tiny_model_dir, tmp_path, one_thread):
    rc = tiny_rc(tiny_model_dir, methods=("uncond",))
    rc = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, quality=("pixels", "efficientnet-lite0"),
                                                              quality_max_reference=40))
    res = run_audit(tmp_path / "run", rc)
    q = res.metrics["uncond"]["quality"]
    assert set(q) == {"pixels", "efficientnet-lite0"}
    for v in q.values():
        assert v["n_generated"] == 6 and v["n_reference"] == 40 and v["frechet"] >= 0 and 0 <= v["precision"] <= 1
    on_disk = json.loads((tmp_path / "run" / "evaluation" / "uncond" / "metrics.json").read_text())
    assert on_disk["quality"] == q
    # without held-out images (a training set that is not digits:N), quality says why it was not measured
    from side_extract.data import load_image_set

    np.savez(tmp_path / "t.npz", images=load_image_set("digits:30").images)
    other = dataclasses.replace(rc, train=str(tmp_path / "t.npz"), evaluate=dataclasses.replace(
        rc.evaluate, bands="high=0:0.1,mid=0.1:0.15,low=0.15:0.2"))
    res = run_audit(tmp_path / "run2", other)
    assert "no held-out real images" in res.metrics["uncond"]["quality"]["skipped"]


def test_kid_error_is_the_sets_sampling_error():
    """KID's error was the subsets' spread / sqrt(n_subsets): 0 when the subsets are the whole sets (the default
    sizes), about 10x too small otherwise. It must match KID's spread over independent draws of both sets."""
    for n, subset in ((120, 1000), (160, 40)):
        vals, ses = [], []
        for s in range(30):
            r = np.random.default_rng(s)
            k, se = kernel_distance(r.standard_normal((n, 8)), r.standard_normal((n, 8)) * 1.1 + 0.1, n_subsets=10,
                                    subset_size=subset)
            vals.append(k)
            ses.append(se)
        assert 0.7 < np.mean(ses) / np.std(vals, ddof=1) < 1.4, (n, subset, np.mean(ses), np.std(vals, ddof=1))


def test_a_fitted_quality_space_is_fitted_on_the_held_out_images():
    """pixels-pca as a quality space was fitted on each set apart (two bases: the Frechet distance lost its mean
    term); both sets now share the reference's basis."""
    from side_extract.data import load_image_set
    from side_extract.features import get_extractor
    from side_extract.quality import image_features

    ref, gen = load_image_set("digits:100"), load_image_set("digits:200").subset(np.arange(100, 200))
    ours = image_features("pixels-pca", gen, reference=ref)
    ex = get_extractor("pixels-pca")
    ex.fit(ref)
    np.testing.assert_allclose(ours, ex.transform(gen), atol=1e-6)


def test_whole_set_statistics_block_by_block_equal_the_dense_formulas(monkeypatch):
    """The jackknife error and precision/recall are made block by block; with blocks of a few rows they equal the
    dense formulas written out here: leave-one-out MMD^2 by the double loop, k-NN radii and balls from every
    pairwise distance."""
    import side_extract.quality as q

    monkeypatch.setattr(q, "BLOCK_VALUES", 50)  # 1-3 rows a block: many blocks, a last one shorter
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(23, 3)), rng.normal(size=(17, 3)) + 0.4
    loo_a = np.array([mmd2_loop(np.delete(a, i, 0), b) for i in range(len(a))])
    loo_b = np.array([mmd2_loop(a, np.delete(b, j, 0)) for j in range(len(b))])
    want = np.sqrt((len(a) - 1) / len(a) * ((loo_a - loo_a.mean()) ** 2).sum()
                   + (len(b) - 1) / len(b) * ((loo_b - loo_b.mean()) ** 2).sum())
    assert q.mmd2_jackknife_se(a, b) == pytest.approx(want, rel=1e-9)

    real, fake, k = rng.normal(size=(31, 2)), rng.normal(size=(29, 2)) * 0.6 + 1.5, 3

    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, 1)[:, k]  # column 0: the point itself

    d = np.sqrt(((fake[:, None] - real[None]) ** 2).sum(-1))
    want_p = (d <= radii(real)[None, :]).any(1).mean()
    want_r = (d.T <= radii(fake)[None, :]).any(1).mean()
    assert 0 < want_p < 1 and 0 < want_r < 1
    assert precision_recall(real, fake, k) == pytest.approx((want_p, want_r), abs=0)


def test_quality_memory_does_not_grow_with_the_square_of_n_generated():
    """At N_G = 5,000 the whole-set statistics held N_G x N_G matrices (200 MB each; 20 GB at the paper's N_G of
    50,000); block by block the peak stays near one block's few copies. Counted by tracemalloc, which numpy
    reports its arrays to: no timing involved."""
    import tracemalloc

    from side_extract.quality import quality_from_features

    rng = np.random.default_rng(6)
    gen, ref = rng.normal(size=(5000, 4)), rng.normal(size=(60, 4))
    tracemalloc.start()
    try:
        quality_from_features(gen, ref, "pixels", n_subsets=2, subset_size=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 160 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_features_that_are_not_two_finite_sets_of_one_dimension_are_named():
    """An extractor's NaN ended the quality step in scipy's sqrtm error (-102), gave a NaN KID, or precision and
    recall numbers; features of other dimensions gave numpy's matmul error; 1-D input an IndexError."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    nan = a.copy()
    nan[3, 1] = np.nan
    for f in (frechet_distance_of, kernel_distance, mmd2_unbiased, mmd2_jackknife_se):
        with pytest.raises(ValueError, match=r"a has non-finite features \(NaN or inf\) in 1 of its 20 rows"):
            f(nan, b)
        with pytest.raises(ValueError, match="a and b have features of other dimensions: 4 and 3"):
            f(a, b[:, :3])
        with pytest.raises(ValueError, match=r"b must be a 2-D array \(samples, features\), got shape \(20,\)"):
            f(a, b[:, 0])
        with pytest.raises(ValueError, match=r"got shape \(20, 0\); it needs at least one feature"):
            f(a[:, :0], b[:, :0])  # (a NaN KID, a perfect FID: a review's find)
    with pytest.raises(ValueError, match="fake has non-finite"):
        precision_recall(a, nan)
    with pytest.raises(ValueError, match="it needs at least one feature"):  # (precision and recall 1.0)
        precision_recall(a[:, :0], b[:, :0])
    with pytest.raises(ValueError, match="generated pixels features has non-finite"):
        quality_from_features(nan, b, "pixels")


def test_quality_inputs_misstated_are_named_before_the_work():
    """An independent review's finds: a precision/recall k the sets cannot give was refused only after the kernel
    distance's quadratic work; the public MMD^2 and its jackknife error returned NaN on too few samples; the
    feature extractors took batch sizes 0 and -1 into errors naming nothing; pixels-pca fitted on one image gave
    every image the feature 0; detection ran grid 2.5 as 2 and recorded 2.5."""
    from unittest import mock

    from side_extract import quality
    from side_extract.data import ImageSet
    from side_extract.detection import detect_memorized
    from side_extract.features import extract_features, get_extractor

    rng = np.random.default_rng(0)
    gen, ref = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    with mock.patch.object(quality, "kernel_distance", side_effect=AssertionError("the kernel distance ran")):
        for k, said in ((0, "k=0 must be an integer >= 1"), (20, "with k=20 needs more than 20 samples per set")):
            with pytest.raises(ValueError, match=said):
                quality.quality_from_features(gen, ref, "pixels", k=k)
    with pytest.raises(ValueError, match="the unbiased MMD\\^2 needs at least 2 samples per set, got 1 and 20"):
        quality.mmd2_unbiased(gen[:1], ref)
    with pytest.raises(ValueError, match="the jackknife standard error needs at least 3 samples per set, got 20 and 2"):
        quality.mmd2_jackknife_se(gen, ref[:2])
    images = ImageSet(rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8))
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"batch_size={bad} must be a positive number of images per batch"):
            extract_features("pixels", images, batch_size=bad)
    with pytest.raises(ValueError, match="pixels-pca is fitted on 1 image"):
        get_extractor("pixels-pca").fit(images.subset(np.arange(1)))
    with pytest.raises(ValueError, match="grid=2.5 must be an integer number of tiles per side"):
        detect_memorized(images, 0.1, min_size=2, grid=2.5)
