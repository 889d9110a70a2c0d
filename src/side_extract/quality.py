"""Sample quality beside memorization: how far each method's generations are from held-out real images.

In a feature space the package has offline (``pixels``; ``efficientnet-lite0``, the bundled ImageNet
EfficientNet-Lite0; ``torchscript:PATH`` for an Inception- or SSCD-style model a user supplies):

- **Frechet distance** (FID's formula; Heusel et al. 2017): ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2)),
  with the square root from ``scipy.linalg.sqrtm`` (its tiny imaginary part from rounding dropped; one on the
  diagonal beyond 1e-3 of the diagonal's size (at least 1e-3, pytorch-fid's bound), which only matrices that are no
  covariances give, is refused; so are statistics that are not symmetric or have a negative eigenvalue). Biased
  upward for small N (it needs N well above the feature dimension): compare methods at equal N only.
- **Kernel distance** (KID; Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x . y / d + 1)^3, averaged over ``n_subsets`` random subsets of ``subset_size`` of each set (at
  most the smaller set's size); its standard error combines the sets' own sampling error (a two-sample
  jackknife) with the subsets' noise (:func:`kernel_distance`). Unbiased at any N.
- **Precision and recall** of the sample manifold (Kynkaanniemi et al. 2019): each set's manifold is the union
  of balls around its points with radius the distance to the k-th nearest neighbour in the set; precision is
  the share of generations inside the real manifold, recall the share of real images inside the generated one.
"""
from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy import linalg

from .data import ImageSet
from .features import extract_features


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(s1 + s2 - 2 sqrtm(s1 s2)) for means (d,) and covariances (d, d)."""
    # the rounding the covariances were computed with (float32 statistics: an eigenvalue of -1.5e-6 on a valid one)
    given = [np.asarray(s).dtype for s in (s1, s2)]
    unit = max(np.finfo(t).eps if np.issubdtype(t, np.floating) else np.finfo(np.float64).eps for t in given)
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(s1).astype(np.float64), np.atleast_2d(s2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, covariances {s1.shape} / {s2.shape}")
    if len(mu1) == 0:
        raise ValueError("mu1 and mu2 have no dimension: the Frechet distance needs features of at least one")
    for name, v in (("mu1", mu1), ("s1", s1), ("mu2", mu2), ("s2", s2)):
        if not np.isfinite(v).all():  # (max(0.0, nan) is 0.0: a NaN statistic scored a perfect distance)
            raise ValueError(f"{name} has non-finite values (NaN or inf): the statistics must be finite")
    for name, s in (("s1", s1), ("s2", s2)):  # (-I against -I, whose product's root is real, scored 0: the
        # distance, -8, was raised to 0 below); rounding is allowed for: d x the unit of the statistics' precision
        # x their norm, 1e-6 at least
        scale = max(1.0, float(np.abs(s).max()))
        if not np.allclose(s, s.T, rtol=0.0, atol=max(1e-8, 1000 * unit) * scale):
            raise ValueError(f"{name} is not symmetric: it must be a covariance matrix (symmetric, positive "
                             "semi-definite)")
        eig = np.linalg.eigvalsh((s + s.T) / 2)
        if (low := float(eig[0])) < -max(1e-6, 100 * len(s) * unit) * max(1.0, float(np.abs(eig).max())):
            raise ValueError(f"{name} has a negative eigenvalue ({low:.3g}): it must be a covariance matrix "
                             "(symmetric, positive semi-definite)")
    with warnings.catch_warnings():  # a singular product (N below the dimension) is handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # singular product: offset both (as FID's reference code does)
            off = np.eye(len(s1)) * 1e-6
            covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):  # rounding leaves a tiny imaginary part; more means the input was no covariance
        imag = float(np.abs(np.diagonal(covmean).imag).max())
        # pytorch-fid's rule (calculate_frechet_distance: 1e-3), relative to the diagonal's size for features
        # beyond unit scale: rounding grows with it (features x 255 left 0.06 on a valid pair, refused before)
        if imag > 1e-3 * max(1.0, float(np.abs(np.diagonal(covmean).real).max())):
            raise ValueError(f"sqrtm(s1 s2) has an imaginary part of {imag:.3g} on its diagonal, beyond rounding: "
                             "s1 and s2 must be covariance matrices (symmetric, positive semi-definite)")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(max(0.0, diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))


def feature_sets(a: Any, b: Any, names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    """Two feature sets as float64 arrays (n, d) and (m, d), or a ValueError naming the one that is not 2-D, has
    non-finite values (an extractor's NaN gave scipy's sqrtm error, a NaN KID, or numbers) or another dimension."""
    out = []
    for x, name in zip((a, b), names):
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] == 0:  # (no feature: a NaN KID and a perfect FID, precision and recall)
            raise ValueError(f"{name} must be a 2-D array (samples, features), got shape {x.shape}"
                             + ("; it needs at least one feature" if x.ndim == 2 else ""))
        bad = int((~np.isfinite(x)).any(1).sum())
        if bad:
            raise ValueError(f"{name} has non-finite features (NaN or inf) in {bad} of its {len(x)} rows")
        out.append(x)
    if out[0].shape[1] != out[1].shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} have features of other dimensions: {out[0].shape[1]} and "
                         f"{out[1].shape[1]}")
    return out[0], out[1]


def frechet_distance_of(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to feature sets a (n, d) and b (m, d)."""
    a, b = feature_sets(a, b)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    if a.shape[1] <= min(len(a), len(b)):
        return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    # more dimensions than the smaller set's samples (pixels of 32x32 RGB against the 1,000 reference images the
    # quality measure takes): the d x d covariances cost d^2 memory and sqrtm d^3 time (pixels of 128x128 RGB: 19 GB
    # each; the rule was d > n + m, so 2,072 generations of 32x32 RGB took 111 s where 2,071 took 1.4 s). With
    # centred A (n, d) and B (m, d), s1 s2 = A^T (A B^T B) / c has the
    # nonzero eigenvalues of (A B^T)(A B^T)^T / c, so Tr sqrtm(s1 s2) = (sum of the singular values of A B^T) / sqrt(c),
    # c = (n - 1)(m - 1): the same distance from an n x m matrix, exactly (no offset for the singular product)
    mu1, mu2 = a.mean(0), b.mean(0)
    a, b = a - mu1, b - mu2
    cross = linalg.svdvals(a @ b.T).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    diff = mu1 - mu2
    return float(max(0.0, diff @ diff + (a * a).sum() / (len(a) - 1) + (b * b).sum() / (len(b) - 1) - 2 * cross))


def _kernels(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """KID's kernel k(x, y) = (x . y / d + 1)^3 within a, within b and between them."""
    d = a.shape[1]
    return (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3


def _at_least(k: int, n: int, m: int, what: str) -> None:
    if min(n, m) < k:
        raise ValueError(f"{what} needs at least {k} samples per set, got {n} and {m}")


def mmd2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x . y / d + 1)^3 between a (n, d) and b (m, d)."""
    kaa, kbb, kab = _kernels(*feature_sets(a, b))
    n, m = len(a), len(b)
    _at_least(2, n, m, "the unbiased MMD^2")  # (one sample divided by n (n - 1) = 0: NaN)
    return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                 - 2 * kab.mean())


BLOCK_VALUES = 1 << 22  # values per block of a kernel or distance matrix (32 MiB in float64)


def _row_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    """Row slices of an (n_rows, n_cols) matrix, each at most :data:`BLOCK_VALUES` values (one row at least): the
    whole-set statistics below never hold an N_G x N_G matrix (at the paper's N_G of 50,000, 20 GB each)."""
    step = max(1, BLOCK_VALUES // max(1, n_cols))
    for i in range(0, n_rows, step):
        yield slice(i, min(n_rows, i + step))


def _kernel_row_sums(x: np.ndarray, y: np.ndarray, same: bool) -> np.ndarray:
    """Row sums of KID's kernel between x (n, d) and y (m, d), block by block; with ``same`` (y is x) the
    diagonal k(x_i, x_i) is left out."""
    d, out = x.shape[1], np.empty(len(x))
    for rows in _row_blocks(len(x), len(y)):
        k = (x[rows] @ y.T / d + 1) ** 3
        if same:
            k[np.arange(k.shape[0]), np.arange(rows.start, rows.stop)] = 0.0
        out[rows] = k.sum(1)
    return out


def mmd2_jackknife_se(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample jackknife standard error (Arvesen 1969) of :func:`mmd2_unbiased` on the whole sets: the
    statistic left without each point of ``a`` and of ``b`` in turn (from the kernel matrices' row sums, made block
    by block), var = (n-1)/n sum_i (theta_-i - mean)^2 + (m-1)/m sum_j (theta_-j - mean)^2. Needs 3 or more points
    per set."""
    a, b = feature_sets(a, b)
    n, m = len(a), len(b)
    _at_least(3, n, m, "the jackknife standard error")
    ra, rb = _kernel_row_sums(a, a, True), _kernel_row_sums(b, b, True)
    ca, cb = _kernel_row_sums(a, b, False), _kernel_row_sums(b, a, False)
    saa, sbb, sab = ra.sum(), rb.sum(), ca.sum()
    without_a = (saa - 2 * ra) / ((n - 1) * (n - 2)) + sbb / (m * (m - 1)) - 2 * (sab - ca) / ((n - 1) * m)
    without_b = saa / (n * (n - 1)) + (sbb - 2 * rb) / ((m - 1) * (m - 2)) - 2 * (sab - cb) / (n * (m - 1))
    var = (n - 1) / n * ((without_a - without_a.mean()) ** 2).sum() + \
        (m - 1) / m * ((without_b - without_b.mean()) ** 2).sum()
    return float(np.sqrt(var))


def kernel_distance(a: np.ndarray, b: np.ndarray, *, n_subsets: int = 50, subset_size: int = 1000,
                    random_state: int = 0) -> tuple[float, float]:
    """KID: the mean of the unbiased MMD^2 over random subsets of min(``subset_size``, both sets' sizes) of each
    set (without replacement within one; the whole sets when both have that many, then every subset gives the
    same value; a larger set is drawn from again in every subset), and its standard error: the
    sampling error of the sets themselves (the two-sample jackknife of the whole-set statistic, which the subset
    mean estimates without bias) plus the subsets' own noise. Before, the error was the subsets' spread / sqrt(50)
    alone: 0 when the subsets were the whole sets, and about 10x too small otherwise."""
    a, b = feature_sets(a, b)
    m = min(subset_size, len(a), len(b))
    if n_subsets < 1:  # (0 gave a NaN distance with numpy's warnings only)
        raise ValueError(f"n_subsets={n_subsets} must be >= 1")
    if subset_size < 3:
        raise ValueError(f"subset_size={subset_size}: the kernel distance's subsets need at least 3 samples")
    if m < 3:
        raise ValueError(f"the kernel distance needs at least 3 samples per set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(random_state)
    vals = np.array([mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
                     for _ in range(n_subsets)])
    subsets_var = float(vals.var(ddof=1)) / n_subsets if n_subsets > 1 else 0.0
    return float(vals.mean()), float(np.sqrt(mmd2_jackknife_se(a, b) ** 2 + subsets_var))


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (n, m) by |a|^2 + |b|^2 - 2 a.b (no (n, m, d) intermediate)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0))


def _kth_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Each point's distance to its k-th nearest neighbour in ``x`` (itself excluded), block by block."""
    out = np.empty(len(x))
    for rows in _row_blocks(len(x), len(x)):
        d = _dist(x[rows], x)
        d[np.arange(d.shape[0]), np.arange(rows.start, rows.stop)] = 0.0  # the point itself: column 0 once sorted
        out[rows] = np.partition(d, k, axis=1)[:, k]
    return out


def check_k(k: int, n_real: int, n_fake: int) -> None:
    """Refuse a precision/recall ``k`` the sets cannot give (before the kernel distance's quadratic work)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:  # (k 0 gave 0 and 0, k -1 gave 1 and
        # 1, k 2.5 failed inside np.partition)
        raise ValueError(f"k={k!r} must be an integer >= 1 (the k-th nearest neighbour's distance is each sample's "
                         "radius)")
    if n_real <= k or n_fake <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {n_real} and {n_fake}")


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds, see the module docstring), block by block over the
    generations."""
    real, fake = feature_sets(real, fake, ("real", "fake"))
    check_k(k, len(real), len(fake))
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    inside_real = np.zeros(len(fake), bool)  # a generation inside the real manifold
    covered = np.zeros(len(real), bool)  # a real image inside the generated manifold
    for rows in _row_blocks(len(fake), len(real)):
        d = _dist(fake[rows], real)  # (block of fakes, n_real)
        inside_real[rows] = (d <= r_real[None, :]).any(1)
        covered |= (d <= r_fake[rows, None]).any(0)
    return float(inside_real.mean()), float(covered.mean())


@dataclasses.dataclass(frozen=True)
class Quality:
    """Sample quality of one set of generations against held-out real images in one feature space."""

    features: str
    n_generated: int
    n_reference: int
    frechet: float
    kid: float
    kid_se: float
    precision: float
    recall: float
    k: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def quality_from_features(gen: np.ndarray, ref: np.ndarray, features: str, *, k: int = 3, n_subsets: int = 50,
                          subset_size: int = 1000, random_state: int = 0) -> Quality:
    gen, ref = feature_sets(gen, ref, (f"generated {features} features", f"reference {features} features"))
    check_k(k, len(ref), len(gen))  # (said after the kernel distance had run, seconds to hours)
    kid, se = kernel_distance(gen, ref, n_subsets=n_subsets, subset_size=subset_size, random_state=random_state)
    p, r = precision_recall(ref, gen, k)
    return Quality(features, len(gen), len(ref), frechet_distance_of(gen, ref), kid, se, p, r, k)


def image_features(name: str, images: ImageSet, *, device: str = "cpu", batch_size: int = 256,
                   reference: ImageSet | None = None) -> np.ndarray:
    """Features for quality: ``pixels`` are the raw pixels in [-1, 1]; others from the extractor registry. A
    fitted extractor (``pixels-pca``) is fitted on ``reference`` (the held-out images), so generated and real
    features share one basis (fitted on each set apart, the Frechet distance lost its mean term)."""
    return extract_features(name, images, device=device, batch_size=batch_size,
                            reference=reference).astype(np.float64)


__all__ = ["Quality", "feature_sets", "frechet_distance", "frechet_distance_of", "kernel_distance", "mmd2_unbiased",
           "mmd2_jackknife_se", "precision_recall", "quality_from_features", "image_features"]
