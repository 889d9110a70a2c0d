"""Numerical checks A-E of the paper's theory (paper-notes section 4; docs/theory.md explains each).

Every check returns a :class:`CheckResult` whose rows pair a prediction with an estimate and its 95%
interval. A row passes by its relation:

- ``"~="``: |estimate - prediction| <= tolerance + 3 * combined standard error;
- ``"<="``: estimate <= prediction + tolerance + 3 * combined standard error (not significantly above);
- ``">"``: estimate - 3 * combined standard error > prediction (significantly above; a counterexample);

rows without a relation show a trend and do not decide. Three standard errors (rather than the t of the
printed interval, about 2) keep a check with several rows from failing by chance on about one seed in 20; the
``tolerance`` covers a bias the theory allows for at finite size (stated per row).
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
from scipy.special import logsumexp

from .divergence import (EmpiricalOptimum, Estimate, GaussianMixtureModel, GaussianModel, as_generator,
                         gaussian_cross_entropy, gaussian_divergence_single_point, kl_gaussians,
                         memorization_divergence, sample_q_eps)

Relation = Literal["~=", "<=", ">"]
CHECKS = ("A", "B", "C", "D", "E")


@dataclasses.dataclass(frozen=True)
class CheckRow:
    """One prediction against one estimate.

    Attributes
    ----------
    label : what is compared
    prediction : the theory's value (exact, or with its own Monte Carlo error)
    estimate : the measured value
    relation : how they must relate, or None for a trend row that does not decide
    tolerance : allowed bias beyond Monte Carlo noise
    """

    label: str
    prediction: Estimate
    estimate: Estimate
    relation: Relation | None = "~="
    tolerance: float = 0.0

    @property
    def passed(self) -> bool | None:
        if self.relation is None:
            return None
        se = math.hypot(self.estimate.stderr, self.prediction.stderr)
        diff = self.estimate.mean - self.prediction.mean
        if self.relation == "~=":
            return abs(diff) <= self.tolerance + 3 * se
        if self.relation == "<=":
            return diff <= self.tolerance + 3 * se
        return diff - 3 * se > self.tolerance


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The outcome of one check."""

    name: str
    title: str
    claim: str
    rows: tuple[CheckRow, ...]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(r.passed is not False for r in self.rows)


def _rng(seed: int, check: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), ord(check)]))


# --------------------------------------------------------------------------------------------------
# A: informative vs random labels on a Gaussian mixture


def _demo_mixture() -> GaussianMixtureModel:
    return GaussianMixtureModel(
        [0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]],
        [np.diag([1.0, 0.5]), np.array([[0.8, 0.3], [0.3, 0.6]]), np.diag([0.4, 1.2])],
    )


def _scott_kde(x: np.ndarray, pooled: np.ndarray | None = None) -> EmpiricalOptimum:
    """A consistent density estimate: kernel density with Scott's bandwidth sd * n^(-1/(d+4)); a class of one
    point (sd 0) takes the sd of ``pooled``, the whole data set (a zero bandwidth ended check A on some seeds)."""
    sd = float(x.std(0).mean())
    if not sd > 0 and pooled is not None:
        sd = float(pooled.std(0).mean())
    return EmpiricalOptimum(x, sd * len(x) ** (-1.0 / (x.shape[1] + 4)))


def check_a(seed: int = 0) -> CheckResult:
    """A: M(D_i; p_i) - M(D_i; p) -> -KL(p_i || p) for components; random labels -> 0.

    1. A 3-component mixture in 2-d; prediction -KL(p_k || p) per component and its average -I(X; Y) over
       k by 200k samples of the mixture.
    2. For (N, eps) = (30, 1), (300, 0.3), (3000, 0.05): D ~ p with its component labels, one point of
       q_eps per training point, gain = mean of log p(x) - log p_k(x) (converged models p_k, p), and the
       same with fitted models (Scott kernel densities on D_k and on D).
    3. Random labels (2 equal classes): gain between kernel densities fitted on D_r and on D -> 0.
    """
    t0 = time.time()
    rng = _rng(seed, "A")
    gmm = _demo_mixture()
    xs, ls = gmm.sample(200_000, rng)
    comp = gmm.component_log_prob(xs)
    ratio = comp[np.arange(len(xs)), ls] - np.log(gmm.weights[ls]) - logsumexp(comp, axis=1)
    mi = Estimate.from_values(-ratio)
    kl_k = [Estimate.from_values(-ratio[ls == k]) for k in range(len(gmm.weights))]
    rows: list[CheckRow] = []
    schedule = [(30, 1.0), (300, 0.3), (3000, 0.05)]
    for j, (n, eps) in enumerate(schedule):
        last = j == len(schedule) - 1
        data, lab = gmm.sample(n, rng)
        x = data + eps * rng.standard_normal(data.shape)
        log_p = gmm.log_prob(x)
        log_pk = gmm.component_log_prob(x)[np.arange(n), lab] - np.log(gmm.weights[lab])
        gain = log_p - log_pk
        rows.append(CheckRow(f"components, converged models, N={n}, eps={eps}: gain -> -I(X;Y)", mi,
                             Estimate.from_values(gain), "~=" if last else None, 0.02))
        if last:
            for k, kl in enumerate(kl_k):
                rows.append(CheckRow(f"  component {k}: M(D_{k}; p_{k}) - M(D_{k}; p) -> -KL(p_{k} || p)", kl,
                                     Estimate.from_values(gain[lab == k]), "~=", 0.03))
        kde_all = _scott_kde(data).log_prob(x)
        fitted = np.empty(n)
        for k in np.unique(lab):
            fitted[lab == k] = _scott_kde(data[lab == k], data).log_prob(x[lab == k])
        rows.append(CheckRow(f"components, fitted KDE models, N={n}, eps={eps}: gain -> -I(X;Y)", mi,
                             Estimate.from_values(kde_all - fitted), "~=" if last else None, 0.1))
        rand = rng.permutation(n) % 2
        fitted_r = np.empty(n)
        for r in (0, 1):
            fitted_r[rand == r] = _scott_kde(data[rand == r], data).log_prob(x[rand == r])
        rows.append(CheckRow(f"random labels (C=2), fitted KDE models, N={n}, eps={eps}: gain -> 0",
                             Estimate.exact(0.0), Estimate.from_values(kde_all - fitted_r),
                             "~=" if last else None, 0.02))
    return CheckResult(
        "A", "informative vs random labels (Gaussian mixture)",
        "M(D_i; p_i) - M(D_i; p) -> -KL(p_i || p) <= 0 as |D_i| grows and eps shrinks; random labels -> 0",
        tuple(rows), time.time() - t0)


# --------------------------------------------------------------------------------------------------
# B: empirical optimum and random classes


def check_b(seed: int = 0, n_data: int = 300, dim: int = 16, eps: float = 0.1) -> CheckResult:
    """B: under the empirical optimum, C equal random classes give a gain of about -log C.

    D: ``n_data`` points of N(0, I_dim); classes by a random permutation. Models: kernel densities with
    bandwidth ``eps`` on D_r and on D (fully converged denoisers stopped at noise level eps). For kernels
    that do not overlap, KDE_D = (|D_r| / |D|) KDE_r near D_r, so the gain is log(1 / C) exactly in the
    limit; a last row with wide kernels (bandwidth 3) shows the gain vanishing once the model stops
    memorizing.
    """
    t0 = time.time()
    rng = _rng(seed, "B")
    data = rng.standard_normal((n_data, dim))
    rows = []
    for c, sigma in [(2, eps), (5, eps), (10, eps), (5, 3.0)]:
        labels = rng.permutation(n_data) % c
        x, idx = sample_q_eps(data, eps, 10 * n_data, rng)
        lab = labels[idx]
        full = EmpiricalOptimum(data, sigma).log_prob(x)
        per = np.empty(len(x))
        for r in range(c):
            per[lab == r] = EmpiricalOptimum(data[labels == r], sigma).log_prob(x[lab == r])
        memorizing = sigma == eps
        label = "gain ~ -log C" if memorizing else "wide kernels, not memorizing: gain -> 0"
        rows.append(CheckRow(f"C={c} random classes, bandwidth {sigma}: {label}",
                             Estimate.exact(-math.log(c) if memorizing else 0.0),
                             Estimate.from_strata(full - per, idx, n_data),
                             "~=" if memorizing else None, 0.01))
    return CheckResult("B", "empirical optimum: random classes", "C equal random classes give a gain of about -log C",
                       tuple(rows), time.time() - t0)


# --------------------------------------------------------------------------------------------------
# C: law of total covariance


def _trace_cov(x: np.ndarray) -> float:
    return float(((x - x.mean(0)) ** 2).sum(1).mean())


def check_c(seed: int = 0, eps: float = 0.1) -> CheckResult:
    """C: tr E[Cov(X | Y)] <= tr Cov(X) (law of total covariance), yet one class may spread more.

    1. sklearn's digits (64-d, [-1, 1], true labels): tr Cov(X) = tr E[Cov(X|Y)] + tr Cov(E[X|Y]).
    2. Counterexample: 90% of the points in a tight class N(0, 0.1^2 I), 10% in a wide one N(0, 3^2 I);
       the wide class's covariance exceeds the overall one.
    3. Even for that class, its moment-matched Gaussian N_1 memorizes no less than the overall one N:
       M(D_1; N_1) - M(D_1; N) = -KL(N_1 || N) <= 0 exactly (both fitted to the moments of q_eps),
       compared here with Monte Carlo.
    """
    from ..data import load_image_set

    t0 = time.time()
    rng = _rng(seed, "C")
    digits = load_image_set("digits")
    x = digits.to_float().reshape(len(digits), -1).double().numpy()
    y = digits.labels
    total = _trace_cov(x)
    within = sum((y == c).mean() * _trace_cov(x[y == c]) for c in np.unique(y))
    means = np.stack([x[y == c].mean(0) for c in y])
    between = _trace_cov(means)
    rows = [
        # (it follows from the identity below, tr Cov(E[X|Y]) >= 0, and holds for any labels: the numbers, not a test)
        CheckRow("digits: tr E[Cov(X|Y)] <= tr Cov(X) (by the identity below)", Estimate.exact(total),
                 Estimate.exact(within), "<="),
        CheckRow("digits: tr Cov(X) - tr E[Cov(X|Y)] - tr Cov(E[X|Y]) = 0", Estimate.exact(0.0),
                 Estimate.exact(total - within - between), "~=", 1e-8 * total),
    ]
    n = 2000
    lab = (rng.random(n) < 0.1).astype(int)
    pts = np.where(lab[:, None] == 1, 3.0, 0.1) * rng.standard_normal((n, 2))
    rows.append(CheckRow("counterexample: tr Cov(X | wide class) > tr Cov(X)", Estimate.exact(_trace_cov(pts)),
                         Estimate.exact(_trace_cov(pts[lab == 1])), ">"))
    wide = pts[lab == 1]
    n_all, n_1 = GaussianModel.fit(pts, eps**2), GaussianModel.fit(wide, eps**2)
    xq, iq = sample_q_eps(wide, eps, 20_000, rng)
    rows.append(CheckRow("counterexample: M(D_1; N_1) - M(D_1; N) = -KL(N_1 || N) <= 0",
                         Estimate.exact(-kl_gaussians(n_1, n_all)),
                         Estimate.from_strata(n_all.log_prob(xq) - n_1.log_prob(xq), iq, len(wide)), "~="))
    return CheckResult("C", "law of total covariance",
                       "conditioning shrinks covariance on average; a single class can grow (counterexample)",
                       tuple(rows), time.time() - t0)


# --------------------------------------------------------------------------------------------------
# D: Gaussian model, closed form vs Monte Carlo


def check_d(seed: int = 0, dim: int = 5, n_mc: int = 20_000) -> CheckResult:
    """D: closed forms of M for a Gaussian model N(mu, S) agree with the Monte Carlo estimator.

    q_eps is a mixture, whose entropy has no closed form, so three exact statements are tested:
    1. N = 1: M = KL(N(x_1, eps^2 I) || N(mu, S)), analytic;
    2. any N: the model-dependent part, CE(q_eps, N(mu, S)), from q_eps's first two moments;
    3. N points far apart (>> eps): H(q_eps) = log N + (d/2) log(2 pi e eps^2) up to exponentially small
       terms, so M = CE - H in closed form.
    """
    t0 = time.time()
    rng = _rng(seed, "D")
    a = rng.standard_normal((dim, dim))
    model = GaussianModel(rng.standard_normal(dim), a @ a.T / dim + 0.5 * np.eye(dim))
    rows = []
    point = rng.standard_normal((1, dim))
    mc = memorization_divergence(point, model.log_prob, 0.3, n_mc, rng)
    rows.append(CheckRow("N=1, eps=0.3: M = KL(N(x1, eps^2 I) || N(mu, S))",
                         Estimate.exact(gaussian_divergence_single_point(point[0], 0.3, model)), mc.estimate))
    data = rng.standard_normal((50, dim)) * 1.5
    x, ix = sample_q_eps(data, 0.3, n_mc, rng)
    rows.append(CheckRow("N=50, eps=0.3: E_q[-log p] (cross-entropy part of M)",
                         Estimate.exact(gaussian_cross_entropy(data, 0.3, model)),
                         Estimate.from_strata(-model.log_prob(x), ix, len(data))))
    far = 10.0 * rng.standard_normal((20, dim))
    eps = 0.05
    entropy = math.log(len(far)) + 0.5 * dim * math.log(2 * math.pi * math.e * eps**2)
    mc = memorization_divergence(far, model.log_prob, eps, n_mc, rng)
    rows.append(CheckRow("N=20 far-apart points, eps=0.05: M = CE - log N - (d/2) log(2 pi e eps^2)",
                         Estimate.exact(gaussian_cross_entropy(far, eps, model) - entropy), mc.estimate, "~=", 1e-6))
    return CheckResult("D", "Gaussian model: closed form vs Monte Carlo",
                       "the closed form of M(D; N(mu, S), eps) agrees with the Monte Carlo estimator",
                       tuple(rows), time.time() - t0)


# --------------------------------------------------------------------------------------------------
# E: the N_G law


def check_e(seed: int = 0, n_train: int = 200, hit_mass: float = 0.3, reps: int = 2000) -> CheckResult:
    """E: E[# unique training images hit] = sum_i 1 - (1 - p_i)^N_G, against simulation.

    Per generation, training image i is hit with probability p_i (Zipf-like, summing to ``hit_mass``; the
    rest is "no hit"); ``reps`` repetitions of N_G independent generations each.
    """
    t0 = time.time()
    rng = _rng(seed, "E")
    w = 1.0 / np.arange(1, n_train + 1) ** 1.1
    p = hit_mass * w / w.sum()
    probs = np.append(p, 1.0 - hit_mass)
    rows = []
    for n_g in (10, 100, 1000, 10_000):
        counts = rng.multinomial(n_g, probs, size=reps)[:, :n_train]
        unique = (counts > 0).sum(1)
        pred = float((1.0 - (1.0 - p) ** n_g).sum())
        rows.append(CheckRow(f"N_G={n_g}: E[#unique] = sum_i 1 - (1 - p_i)^N_G", Estimate.exact(pred),
                             Estimate.from_values(unique)))
    return CheckResult("E", "the N_G law of unique extractions",
                       "E[#unique] = sum_i 1 - (1 - p_i)^N_G (UMS grows non-linearly in N_G)", tuple(rows),
                       time.time() - t0)


REGISTRY: dict[str, Callable[[int], CheckResult]] = {"A": check_a, "B": check_b, "C": check_c, "D": check_d,
                                                     "E": check_e}


def parse_only(only: str | None) -> list[str]:
    """'A,c' -> ['A', 'C']; None or '' -> all. Unknown names are a ValueError listing the valid ones."""
    if only is None or not only.strip():
        return list(CHECKS)
    names = [s.strip().upper() for s in only.split(",") if s.strip()]
    bad = [n for n in names if n not in REGISTRY]
    if bad or not names:  # (',' named none: "all 0 check(s) passed")
        raise ValueError(f"only={only!r}: unknown check(s) {', '.join(bad) or '(none named)'}; valid: "
                         f"{', '.join(CHECKS)}")
    return list(dict.fromkeys(names))


def run_checks(only: str | list[str] | None = None, seed: int = 0) -> list[CheckResult]:
    """Run the named checks (default all) with ``seed``; each check derives its own generator from it."""
    names = parse_only(only if isinstance(only, str) or only is None else ",".join(only))
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    as_generator(int(seed))
    return [REGISTRY[n](int(seed)) for n in names]


__all__ = ["CheckRow", "CheckResult", "run_checks", "parse_only", "check_a", "check_b", "check_c", "check_d",
           "check_e", "CHECKS"]
