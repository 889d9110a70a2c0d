"""Memorization divergence M(D; p, eps) = KL(q_eps || p) and closed-form density models.

The paper (arXiv 2410.02467, section on theory) measures how closely a model p reproduces its training set
D = {x_1, ..., x_N} by

    M(D; p, eps) = KL(q_eps || p),    q_eps = (1/N) sum_i N(x_i, eps^2 I),

smaller meaning more memorization. It is estimated here by Monte Carlo:

1. draw x = x_i + eps * xi, xi ~ N(0, I), with the index i stratified over D (every point is used equally
   often; see :func:`sample_q_eps`), which is an exact sample of q_eps;
2. log q_eps(x) exactly, by a log-sum-exp over all N training points (:func:`log_q_eps`);
3. M is the mean of log q_eps(x) - log p(x); its 95% interval is mean +- t * stderr, the standard error of the
   stratified design (:meth:`Estimate.from_strata`; sd / sqrt(n), the i.i.d. formula, wider, where a point is
   drawn fewer than three times: n < 3N) and t Student's quantile at its degrees of freedom.

Because M(D; p) = -H(q_eps) + CE(q_eps, p) and the entropy H(q_eps) does not depend on the model, the
difference of M between two models evaluated on the same samples is a difference of cross-entropies; it is
estimated from paired samples (:func:`divergence_gap`), whose interval is far narrower than the two apart.

Models (all numpy float64, ``log_prob(x: (n, d)) -> (n,)``): :class:`GaussianModel`,
:class:`GaussianMixtureModel`, and :class:`EmpiricalOptimum`, the kernel density
(1/N) sum_i N(x_i, sigma^2 I). The last is what a *fully converged* denoiser samples: the optimal
denoiser of the empirical training distribution at noise level sigma has exactly this marginal, so its
reverse process started at that level reproduces training points plus N(0, sigma^2 I) noise.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable

import numpy as np
import scipy.stats
import torch
from scipy.special import logsumexp

from ..config import check_int
from ..metrics import Z95

MIN_DRAWS = 3  # draws of every point the stratified standard error needs (Estimate.from_strata)
MIN_REPEATS = 10  # repeat draws (degrees of freedom) the stratified standard error needs (Estimate.from_strata)

LOG_2PI = math.log(2.0 * math.pi)
LogProb = Callable[[np.ndarray], np.ndarray]
RandomState = int | np.random.Generator


def as_generator(random_state: RandomState) -> np.random.Generator:
    """A numpy Generator from a seed or a Generator (passed through)."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        return np.random.default_rng(int(random_state))
    raise ValueError(f"random_state={random_state!r} must be an int seed or a numpy Generator")


def as_points(data: np.ndarray | torch.Tensor, name: str = "data") -> np.ndarray:
    """(N, ...) array or tensor -> (N, d) float64, rows flattened; rejects empty or non-finite input."""
    if isinstance(data, torch.Tensor):  # (numpy has no bfloat16: a bf16 training set was a TypeError)
        t = data.detach().cpu()
        arr = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    else:
        arr = np.asarray(data)
    if arr.ndim < 1 or len(arr) == 0:
        raise ValueError(f"{name} with shape {arr.shape} is empty; it must hold at least one point")
    arr = arr.reshape(len(arr), -1).astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds non-finite values (NaN or inf)")
    return arr


def _check_positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} must be a positive finite number")
    return float(value)


def check_width(name: str, value: float) -> float:
    """A kernel width (eps, a bandwidth) as a float: positive, finite, and with a square that neither underflows
    in float64 (below ~1.5e-154 it did, to NaN densities) nor overflows (above ~1.3e154, ``value**2`` raised
    OverflowError); refused naming ``name``."""
    value = _check_positive(name, value)
    square = value * value  # (inf, not an OverflowError, where it overflows)
    if not math.isfinite(square):
        raise ValueError(f"{name}={value!r} is too large: {name}^2 overflows in float64")
    if square == 0.0 or not math.isfinite(1.0 / square):
        raise ValueError(f"{name}={value!r} is too small: {name}^2 underflows in float64")
    return value


# --------------------------------------------------------------------------------------------------
# estimates


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A Monte Carlo mean with its standard error (an exact value has ``stderr = 0``).

    Attributes
    ----------
    mean : the estimate
    stderr : its standard error (sd / sqrt(n) of i.i.d. values; :meth:`from_strata` for stratified draws)
    n : number of samples
    df : the degrees of freedom of ``stderr`` (n - 1 for i.i.d. values; Welch-Satterthwaite's for stratified
        draws; infinite where the error is known); the interval takes Student's t quantile at ``df``
    """

    mean: float
    stderr: float
    n: int
    df: float = math.inf

    @classmethod
    def from_values(cls, values: np.ndarray) -> "Estimate":
        v = np.asarray(values, dtype=np.float64).ravel()
        if len(v) < 2:  # one value has no spread: an infinite error would let any check pass
            raise ValueError(f"cannot estimate a mean and its error from {len(v)} value(s); at least 2 are needed")
        sd = float(v.std(ddof=1))
        return cls(float(v.mean()), sd / math.sqrt(len(v)), len(v), len(v) - 1)

    @classmethod
    def from_strata(cls, values: np.ndarray, index: np.ndarray, n_data: int) -> "Estimate":
        """The mean of ``values`` drawn by :func:`stratified_indices` (``index``: each value's training point, of
        ``n_data``), with the standard error of that design.

        Each of the N points is drawn c_i = m or m + 1 times (m = n // N; the r = n - m N extra draws fall on a
        random subset without replacement). The mean's variance is then (sum_i c_i s_i^2 + r (1 - r/N) S^2) / n^2,
        with s_i^2 the variance within point i's draws and S^2 the spread of the points' own means (their observed
        spread less the part their draws' noise explains). The i.i.d. formula, sd / sqrt(n), also counts the spread
        between points, which the stratification removes: on far-apart points it was about 80-100x too wide. Each
        point's s_i^2 needs :data:`MIN_DRAWS` draws of it: with any point drawn fewer times (n < 3N), or fewer than
        :data:`MIN_REPEATS` repeat draws in all, the i.i.d. formula is kept (wider than the truth: conservative). It
        was used from a single repeat draw (at n = N + 1 one point's two draws set the variance of all of them), then
        from ten (at n = N + 10 the ten points drawn twice lent their variance to the 90 drawn once: where one of
        those carried most of the variance the interval covered M in 91 % of trials, 81 % on synthetic values), then
        from two draws of every point (at n = 2N a dominant point's variance had one degree of freedom, and where its
        two draws fell close the interval covered the mean in 90 % of trials at the df below).

        The variance is a sum of parts estimated with few degrees of freedom each: each point's squared deviations
        sq_i (c_i - 1 of them), its part c_i / (c_i - 1) sq_i; and the between-point one's from the N points, less
        one. Its degrees of freedom are Welch-Satterthwaite's over these independent parts, (sum of parts)^2 / sum
        (part^2 / its df): where one point carries most of the variance they are few, and a normal 1.96 covered 92 %
        instead of 95 % (n = 60)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        idx = np.asarray(index, dtype=np.int64).ravel()
        if v.shape != idx.shape:
            raise ValueError(f"values {v.shape} and index {idx.shape} must have the same length")
        if len(v) and (idx.min() < 0 or idx.max() >= n_data):
            raise ValueError(f"index must lie in [0, {n_data}); got [{idx.min()}, {idx.max()}]")
        counts = np.bincount(idx, minlength=n_data)
        if len(v) < 2 or counts.min() < MIN_DRAWS or len(v) - n_data < MIN_REPEATS:  # (draws beyond the first)
            return cls.from_values(v)
        n = len(v)
        means = np.bincount(idx, weights=v, minlength=n_data) / counts
        sq = np.bincount(idx, weights=(v - means[idx]) ** 2, minlength=n_data)
        parts = [*zip(counts / (counts - 1.0) * sq, counts - 1.0)]  # (part, its degrees of freedom)
        r = n - (n // n_data) * n_data
        if r > 0:
            spread = float(np.var(means, ddof=1)) - float(np.mean(sq / (counts - 1.0) / counts))
            parts.append((r * (1 - r / n_data) * max(spread, 0.0), float(n_data - 1)))
        var = float(sum(p for p, _ in parts))
        spread_of_var = sum(p * p / df for p, df in parts if p > 0)
        df = var * var / spread_of_var if spread_of_var > 0 else math.inf
        return cls(float(v.mean()), math.sqrt(var) / n, n, df)

    @classmethod
    def exact(cls, value: float) -> "Estimate":
        return cls(float(value), 0.0, 0)

    @property
    def ci95(self) -> tuple[float, float]:
        """95% interval, mean +- q stderr with q Student's t quantile at :attr:`df` (1.96 where it is infinite)."""
        q = Z95 if math.isinf(self.df) else float(scipy.stats.t.ppf(0.975, self.df))
        return (self.mean - q * self.stderr, self.mean + q * self.stderr)

    def to_dict(self) -> dict[str, float | int | None]:
        lo, hi = self.ci95
        return {"mean": self.mean, "stderr": self.stderr, "ci95_low": lo, "ci95_high": hi, "n": self.n,
                "df": None if math.isinf(self.df) else self.df}

    def __str__(self) -> str:
        if self.stderr == 0:
            return f"{self.mean:.4g} (exact)"
        lo, hi = self.ci95
        return f"{self.mean:.4g} [{lo:.4g}, {hi:.4g}]"


@dataclasses.dataclass(frozen=True, eq=False)
class DivergenceEstimate:
    """M(D; p, eps) by Monte Carlo.

    Attributes
    ----------
    estimate : M in nats, mean and standard error over the samples
    eps : the smoothing scale
    x : (n, d) the samples of q_eps
    index : (n,) the training point each sample was drawn around
    log_q : (n,) log q_eps(x)
    log_p : (n,) log p(x)
    """

    estimate: Estimate
    eps: float
    x: np.ndarray
    index: np.ndarray
    log_q: np.ndarray
    log_p: np.ndarray


# --------------------------------------------------------------------------------------------------
# q_eps


def log_q_eps(x: np.ndarray | torch.Tensor, data: np.ndarray | torch.Tensor, eps: float,
              chunk: int = 1024) -> np.ndarray:
    """log q_eps(x) = log (1/N) sum_j N(x; x_j, eps^2 I), exactly, by log-sum-exp.

    Parameters
    ----------
    x : (n, d) or (n, ...) points (flattened per row)
    data : (N, d) or (N, ...) training points, same flattened dimension d
    eps : smoothing scale > 0
    chunk : rows of ``x`` per block (memory is chunk * N floats)

    Returns
    -------
    (n,) float64 log densities in nats.
    """
    eps = check_width("eps", eps)
    xp, dp = as_points(x, "x"), as_points(data, "data")
    if xp.shape[1] != dp.shape[1]:
        raise ValueError(f"x has dimension {xp.shape[1]} but data has dimension {dp.shape[1]}")
    n_data, d = dp.shape
    d2 = (dp**2).sum(1)
    const = -math.log(n_data) - 0.5 * d * (LOG_2PI + 2 * math.log(eps))
    check_int(chunk, "chunk", 1)  # (-1 computed no block and returned np.empty's memory as densities)
    out = np.empty(len(xp))
    for s in range(0, len(xp), chunk):
        xb = xp[s:s + chunk]
        xsq = (xb**2).sum(1)
        sq = xsq[:, None] + d2[None, :] - 2.0 * xb @ dp.T
        np.maximum(sq, 0.0, out=sq)
        _exact_near(sq, xb, dp, xsq, d2, eps)
        out[s:s + chunk] = logsumexp(-sq / (2 * eps**2), axis=1) + const
    return out


_TAIL_WIDTHS = 40.0  # a term this many 2 eps^2 past a row's nearest weighs under e^-40 of it in the sum


def _exact_near(sq: np.ndarray, x: np.ndarray, data: np.ndarray, x_sq: np.ndarray, data_sq: np.ndarray,
                eps: float) -> None:
    """Make ``sq`` (|x|^2 + |x_j|^2 - 2 x.x_j, rows of ``x`` by ``data``) exact where rounding could move a density
    by more than ~1e-6 nats, in place: the expansion's error grows with |x|^2 + |x_j|^2 (up to d * unit roundoff
    times it), not with the distance, so at a small eps it spans many kernel widths (d = 49152, eps = 1e-7: 1,490
    nats off). The terms that can matter, those within the error and the tail of a row's nearest, are made again
    from the differences."""
    slack = data.shape[1] * np.finfo(np.float64).eps * (x_sq[:, None] + data_sq[None, :])
    if not (slack > 1e-6 * eps**2).any():
        return
    near = sq - slack <= (sq + slack).min(1, keepdims=True) + 2 * eps**2 * _TAIL_WIDTHS
    for i in range(len(x)):
        cols = np.flatnonzero(near[i])
        sq[i, cols] = ((data[cols] - x[i]) ** 2).sum(1)


def stratified_indices(n_data: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices into range(n_data): whole random permutations, then a random subset for the remainder.

    Each training point is used floor(n / N) or ceil(n / N) times, so the estimator keeps q_eps's equal
    weights while having lower variance than i.i.d. indices; n <= N gives a subset without replacement.
    """
    if not (isinstance(n_data, numbers.Integral) and n_data >= 1 and isinstance(n, numbers.Integral) and n >= 0):
        # (n=-1 returned N - 1 indices; n_data=0 was a ZeroDivisionError)
        raise ValueError(f"stratified_indices: n_data={n_data!r} must be an integer >= 1 and n={n!r} an integer >= 0")
    full, rest = divmod(n, n_data)
    parts = [rng.permutation(n_data) for _ in range(full)]
    parts.append(rng.permutation(n_data)[:rest])
    return np.concatenate(parts).astype(np.int64)


def sample_q_eps(data: np.ndarray | torch.Tensor, eps: float, n: int,
                 random_state: RandomState = 0) -> tuple[np.ndarray, np.ndarray]:
    """n samples x = x_i + eps * xi of q_eps, indices stratified over D.

    Returns
    -------
    x : (n, d) float64
    index : (n,) int64, the training point of each sample
    """
    eps = _check_positive("eps", eps)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer")
    dp = as_points(data)
    rng = as_generator(random_state)
    index = stratified_indices(len(dp), int(n), rng)
    x = dp[index] + eps * rng.standard_normal((len(index), dp.shape[1]))
    return x, index


def _check_samples(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 2:  # (EmpiricalOptimum.sample(1), needing none, was refused so)
        raise ValueError(f"n={n!r} must be an integer >= 2 (an interval needs two samples)")


def memorization_divergence(data: np.ndarray | torch.Tensor, log_prob: LogProb, eps: float, n: int = 2000,
                            random_state: RandomState = 0) -> DivergenceEstimate:
    """Monte Carlo estimate of M(D; p, eps) = KL(q_eps || p), with a 95% interval.

    Parameters
    ----------
    data : (N, d) training set D (or (N, C, H, W), flattened)
    log_prob : the model's log density, (n, d) float64 -> (n,) nats
    eps : smoothing scale of q_eps, > 0
    n : number of Monte Carlo samples (>= 2; at least three times the number of points N, and N +
        :data:`MIN_REPEATS`, for the stratified design's interval, which is far narrower on far-apart points than
        the i.i.d. one kept below that)
    random_state : seed or numpy Generator

    Returns
    -------
    DivergenceEstimate with the mean of log q_eps(x) - log p(x) over x ~ q_eps.
    """
    _check_samples(n)
    x, index = sample_q_eps(data, eps, n, random_state)
    lq = log_q_eps(x, data, eps)
    lp = _log_density(log_prob, x, "log_prob")
    return DivergenceEstimate(Estimate.from_strata(lq - lp, index, len(as_points(data))), eps, x, index, lq, lp)


def divergence_gap(data: np.ndarray | torch.Tensor, log_prob_a: LogProb, log_prob_b: LogProb, eps: float,
                   n: int = 2000, random_state: RandomState = 0) -> Estimate:
    """M(D; a, eps) - M(D; b, eps) = E_{q_eps}[log b(x) - log a(x)], from paired samples.

    The entropy of q_eps cancels, so log q_eps is never needed. Negative means ``a`` memorizes D more.
    """
    _check_samples(n)
    x, index = sample_q_eps(data, eps, n, random_state)
    gap = _log_density(log_prob_b, x, "log_prob_b") - _log_density(log_prob_a, x, "log_prob_a")
    return Estimate.from_strata(gap, index, len(as_points(data)))


def _log_density(log_prob: LogProb, x: np.ndarray, name: str) -> np.ndarray:
    """``log_prob(x)`` as (n,) float64, one value per point (an (n, 1) result is flattened: left as it was, a
    difference of two broadcast to (n, n)); any other size is an error."""
    out = np.asarray(log_prob(x), dtype=np.float64)
    if out.size != len(x):
        raise ValueError(f"{name} returned shape {out.shape}, expected ({len(x)},)")
    if not np.isfinite(out).all():  # (NaN read as an "inconclusive" interval, as if a statistical outcome)
        raise ValueError(f"{name} returned {int((~np.isfinite(out)).sum())} non-finite log-densities of {len(x)} "
                         "(NaN or inf: an overflow, or a model that diverges there)")
    return out.reshape(-1)


# --------------------------------------------------------------------------------------------------
# closed-form models


class GaussianModel:
    """N(mean, cov) in d dimensions.

    Parameters
    ----------
    mean : (d,)
    cov : (d, d) symmetric positive definite, or a scalar variance (isotropic)
    """

    def __init__(self, mean: np.ndarray, cov: np.ndarray | float) -> None:
        self.mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        d = len(self.mean)
        if d == 0:  # (numpy's "zero-size array to reduction operation maximum" came out of the symmetry check)
            raise ValueError(f"mean has shape {np.shape(mean)}: a Gaussian needs a mean of at least one dimension")
        c = np.asarray(cov, dtype=np.float64)
        self.cov = c * np.eye(d) if c.ndim == 0 else c
        if self.cov.shape != (d, d):
            raise ValueError(f"cov has shape {self.cov.shape}, expected ({d}, {d}) for a mean of dimension {d}")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.cov).all()):
            raise ValueError("mean and cov must be finite (NaN gave NaN densities without a word)")
        if not np.allclose(self.cov, self.cov.T, rtol=1e-10, atol=1e-12 * float(np.abs(self.cov).max())):
            # (Cholesky reads the lower triangle only: log_prob and kl_gaussians took two other matrices)
            raise ValueError("cov must be symmetric positive definite; it is not symmetric")
        try:
            self._chol = np.linalg.cholesky(self.cov)
        except np.linalg.LinAlgError:
            raise ValueError("cov must be symmetric positive definite") from None
        self.logdet = 2.0 * float(np.log(np.diag(self._chol)).sum())

    @property
    def dim(self) -> int:
        return len(self.mean)

    @classmethod
    def fit(cls, data: np.ndarray | torch.Tensor, extra_var: float = 0.0) -> "GaussianModel":
        """Moment-matched Gaussian of the points (ML covariance) plus ``extra_var`` * I."""
        x = as_points(data)
        return cls(x.mean(0), np.cov(x, rowvar=False, bias=True).reshape(x.shape[1], x.shape[1])
                   + extra_var * np.eye(x.shape[1]))

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        x = as_points(x, "x")
        if x.shape[1] != self.dim:  # ((n, 1) points broadcast against the mean: confident wrong densities)
            raise ValueError(f"x has points of dimension {x.shape[1]}, the model's are {self.dim}")
        z = np.linalg.solve(self._chol, (x - self.mean).T)
        return -0.5 * (self.dim * LOG_2PI + self.logdet + (z**2).sum(0))

    def sample(self, n: int, random_state: RandomState = 0) -> np.ndarray:
        rng = as_generator(random_state)
        return self.mean + rng.standard_normal((n, self.dim)) @ self._chol.T


def kl_gaussians(p: GaussianModel, q: GaussianModel) -> float:
    """KL(p || q) between two Gaussians, in nats (closed form)."""
    if p.dim != q.dim:
        raise ValueError(f"dimensions differ: {p.dim} vs {q.dim}")
    q_inv = np.linalg.inv(q.cov)
    diff = q.mean - p.mean
    return 0.5 * float(np.trace(q_inv @ p.cov) + diff @ q_inv @ diff - p.dim + q.logdet - p.logdet)


def gaussian_cross_entropy(data: np.ndarray | torch.Tensor, eps: float, model: GaussianModel) -> float:
    """CE(q_eps, N(mu, S)) = E_{q_eps}[-log N(x; mu, S)], exactly.

    It needs only q_eps's first two moments: mean m = mean_i x_i, second moment about mu
    E[(x - mu)(x - mu)^T] = eps^2 I + mean_i (x_i - mu)(x_i - mu)^T, so
    CE = 1/2 [d log 2 pi + log det S + tr(S^-1 E[(x - mu)(x - mu)^T])].
    """
    eps = _check_positive("eps", eps)
    x = as_points(data)
    if x.shape[1] != model.dim:
        raise ValueError(f"data has dimension {x.shape[1]} but the model has {model.dim}")
    dev = x - model.mean
    second = eps**2 * np.eye(model.dim) + dev.T @ dev / len(x)
    return 0.5 * float(model.dim * LOG_2PI + model.logdet + np.trace(np.linalg.solve(model.cov, second)))


def gaussian_divergence_single_point(point: np.ndarray, eps: float, model: GaussianModel) -> float:
    """M({x_1}; N(mu, S), eps) = KL(N(x_1, eps^2 I) || N(mu, S)), closed form (N = 1 training point).

    For N > 1, q_eps is a mixture whose entropy has no closed form; see :func:`gaussian_cross_entropy`
    for the part of M that does.
    """
    eps = _check_positive("eps", eps)
    p = np.asarray(point, dtype=np.float64).reshape(-1)
    return kl_gaussians(GaussianModel(p, eps**2), model)


class GaussianMixtureModel:
    """sum_k w_k N(mu_k, S_k).

    Parameters
    ----------
    weights : (K,) positive, normalised here
    means : (K, d)
    covs : (K, d, d), or (K,) isotropic variances
    """

    def __init__(self, weights: np.ndarray, means: np.ndarray, covs: np.ndarray) -> None:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if len(w) == 0 or (w <= 0).any() or not np.isfinite(w).all():
            raise ValueError(f"weights={w.tolist()} must be positive and finite, at least one")
        means = np.asarray(means, dtype=np.float64)
        if means.ndim != 2 or len(means) != len(w):
            raise ValueError(f"means has shape {means.shape}, expected ({len(w)}, d)")
        covs = np.asarray(covs, dtype=np.float64)
        if covs.ndim == 0 or len(covs) != len(w):  # (a scalar was len()'s TypeError)
            raise ValueError(f"covs has shape {covs.shape}, expected {len(w)} entries (one covariance or variance "
                             "per component)")
        self.weights = w / w.sum()
        self.components = [GaussianModel(m, c) for m, c in zip(means, covs)]

    @property
    def dim(self) -> int:
        return self.components[0].dim

    def component_log_prob(self, x: np.ndarray) -> np.ndarray:
        """(n, K): log w_k + log N(x; mu_k, S_k)."""
        return np.stack([math.log(w) + c.log_prob(x) for w, c in zip(self.weights, self.components)], axis=1)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return logsumexp(self.component_log_prob(x), axis=1)

    def sample(self, n: int, random_state: RandomState = 0) -> tuple[np.ndarray, np.ndarray]:
        """n samples and their component labels."""
        rng = as_generator(random_state)
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        x = np.empty((n, self.dim))
        for k, comp in enumerate(self.components):
            idx = np.flatnonzero(labels == k)
            x[idx] = comp.sample(len(idx), rng)
        return x, labels


class EmpiricalOptimum:
    """The kernel density (1/N) sum_i N(x_i, sigma^2 I): what a fully converged denoiser samples.

    Parameters
    ----------
    data : (N, d) training points (or (N, C, H, W))
    sigma : bandwidth > 0: the noise level at which the optimal denoiser's reverse process is stopped
    """

    def __init__(self, data: np.ndarray | torch.Tensor, sigma: float) -> None:
        self.data = as_points(data)
        self.sigma = _check_positive("sigma", sigma)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return log_q_eps(x, self.data, self.sigma)

    def sample(self, n: int, random_state: RandomState = 0) -> np.ndarray:
        return sample_q_eps(self.data, self.sigma, n, random_state)[0]


__all__ = [
    "Estimate", "DivergenceEstimate", "log_q_eps", "sample_q_eps", "stratified_indices", "memorization_divergence",
    "divergence_gap", "GaussianModel", "GaussianMixtureModel", "EmpiricalOptimum", "kl_gaussians",
    "gaussian_cross_entropy", "gaussian_divergence_single_point", "as_points", "as_generator", "Z95",
]
