"""Theory: the divergence estimator, the PF-ODE likelihood and ``measure`` against closed forms; checks A-E."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy.stats import multivariate_normal
from typer.testing import CliRunner

from side_extract.cli.main import app
from side_extract.models.target import CallableDenoiser
from side_extract.theory import (EmpiricalOptimum, Estimate, GaussianModel, empirical_optimal_eps,
                                 gaussian_divergence_single_point, gaussian_optimal_eps, guided_eps_fn, log_q_eps,
                                 measure, memorization_divergence, pf_ode_log_likelihood, run_checks)
from side_extract.theory.likelihood import ode_timesteps, sigmas

SCHED = DDPMScheduler(num_train_timesteps=1000)
AC = SCHED.alphas_cumprod
SIG_MIN = float(sigmas(AC)[0])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription (10x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# divergence


def test_log_q_eps_matches_scipy_mixture():
    rng = np.random.default_rng(0)
    data, x, eps = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)), 0.7
    ref = np.log(np.mean([multivariate_normal(m, eps**2 * np.eye(3)).pdf(x) for m in data], axis=0))
    np.testing.assert_allclose(log_q_eps(x, data, eps), ref, rtol=1e-10)


def test_divergence_estimator_matches_analytic_gaussian_kl():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 4))
    model = GaussianModel(rng.standard_normal(4), a @ a.T / 4 + np.eye(4))
    point = rng.standard_normal((1, 4))
    exact = gaussian_divergence_single_point(point[0], 0.5, model)
    # KL(N(x_1, eps^2 I) || N(mu, S)) = 1/2 [tr(S^-1 eps^2 I) + (mu - x_1)' S^-1 (mu - x_1) - d + ln det S - d ln eps^2]
    cov, diff = a @ a.T / 4 + np.eye(4), model.mean - point[0]
    by_formula = 0.5 * (0.25 * np.trace(np.linalg.inv(cov)) + diff @ np.linalg.solve(cov, diff) - 4
                        + np.linalg.slogdet(cov)[1] - 4 * math.log(0.25))
    assert exact == pytest.approx(by_formula, rel=1e-10)
    est = memorization_divergence(point, model.log_prob, 0.5, n=20_000, random_state=2).estimate
    lo, hi = est.ci95
    assert abs(est.mean - exact) < 4 * est.stderr and hi - lo < 0.1, (exact, est)


def test_empirical_optimum_at_its_own_bandwidth_has_zero_divergence():
    data = np.random.default_rng(3).standard_normal((20, 5))
    est = memorization_divergence(data, EmpiricalOptimum(data, 0.2).log_prob, 0.2, n=100).estimate
    assert est.mean == pytest.approx(0.0, abs=1e-9)


def test_estimator_is_reproducible_and_seed_dependent():
    data = np.random.default_rng(0).standard_normal((10, 2))
    model = GaussianModel(np.zeros(2), 1.0)
    a = memorization_divergence(data, model.log_prob, 0.3, n=50, random_state=5).estimate
    b = memorization_divergence(data, model.log_prob, 0.3, n=50, random_state=np.random.default_rng(5)).estimate
    c = memorization_divergence(data, model.log_prob, 0.3, n=50, random_state=6).estimate
    assert a == b and a != c


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan")])
def test_bad_eps_is_a_value_error_naming_it(eps):
    with pytest.raises(ValueError, match=r"eps="):
        log_q_eps(np.zeros((2, 2)), np.zeros((3, 2)), eps)


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match=r"n=1 must be"):
        memorization_divergence(np.zeros((3, 2)), lambda x: np.zeros(len(x)), 0.1, n=1)
    with pytest.raises(ValueError, match="dimension 3 but data has dimension 2"):
        log_q_eps(np.zeros((2, 3)), np.zeros((3, 2)), 0.1)
    with pytest.raises(ValueError, match="n_steps=0"):
        ode_timesteps(AC, 0)
    with pytest.raises(ValueError, match="trace='fast'"):
        pf_ode_log_likelihood(lambda x, t: x, torch.zeros(2, 1, 2, 2), AC, trace="fast")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# PF-ODE likelihood


def _gaussian_logpdf(x: torch.Tensor, mean, var: float) -> np.ndarray:
    d = x[0].numel()
    sq = ((x - torch.as_tensor(mean)) ** 2).reshape(len(x), -1).sum(1).double().numpy()
    return -0.5 * (d * math.log(2 * math.pi * var) + sq / var)


def test_ode_grid_is_increasing_integer_and_spans_the_schedule():
    ts = ode_timesteps(AC, 32, t_min=3)
    assert ts[0] == 3 and ts[-1] == 999 and (np.diff(ts) > 0).all() and len(ts) <= 33


def test_ode_likelihood_of_optimal_gaussian_denoiser_is_the_gaussian():
    """The optimal eps of N(mu, s^2 I) has PF-ODE density N(mu, (s^2 + sigma_min^2) I) at t_min = 0."""
    mu, s = 0.3, 0.5
    x = mu + s * torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _gaussian_logpdf(x, mu, s**2 + SIG_MIN**2)
    fn = gaussian_optimal_eps(mu, s, AC)
    res = pf_ode_log_likelihood(fn, x, AC, n_steps=64, trace="exact")
    np.testing.assert_allclose(res.log_prob, exact, atol=0.05)
    coarse = pf_ode_log_likelihood(fn, x, AC, n_steps=16, trace="exact")
    assert np.abs(coarse.log_prob - exact).mean() > np.abs(res.log_prob - exact).mean()  # converges with steps
    # Hutchinson is exact here (the Jacobian is diagonal, Rademacher v_i^2 = 1)
    hutch = pf_ode_log_likelihood(fn, x, AC, n_steps=64, n_probes=1, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(hutch.log_prob, res.log_prob, atol=1e-8)
    # several probes are averaged, not summed (no test used more than one: a missing division passed)
    hutch4 = pf_ode_log_likelihood(fn, x, AC, n_steps=64, n_probes=4, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(hutch4.log_prob, res.log_prob, atol=1e-8)


def test_every_divergence_runs_with_reproducible_gradients_on_the_points_device(monkeypatch, context_recorder):
    """Theory's divergences are gradients through the model, as guidance is: on CUDA they run under
    reproducible_gradients (sampling's is measured in benchmarks/results/gpu-determinism.json)."""
    import side_extract.theory.likelihood as likelihood

    def eps(x, t):
        context_recorder.record()
        return 0.5 * x

    monkeypatch.setattr(likelihood, "reproducible_gradients", context_recorder)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pf_ode_log_likelihood(eps, x, AC, n_steps=4, trace="exact")
    calls = context_recorder.seen
    assert calls and all(c == [torch.device("cpu")] for c in calls)


def test_ode_likelihood_of_the_empirical_optimum_is_its_kernel_density():
    data = torch.randn(12, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_min = 20
    sig = float(sigmas(AC)[t_min])
    x = data[:8] + sig * torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = pf_ode_log_likelihood(empirical_optimal_eps(data, AC), x, AC, n_steps=64, t_min=t_min, trace="exact")
    np.testing.assert_allclose(res.log_prob, log_q_eps(x, data, sig), atol=0.1)


def _mixture(means: torch.Tensor, s: float):
    """Exact eps of the two-component mixture 0.5 N(m_0, s^2 I) + 0.5 N(m_1, s^2 I) and its exact p(c | x_t, t)."""

    def logits(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = AC[t.cpu()].to(x.dtype).reshape(-1, 1)
        v = a * s**2 + 1 - a
        xf = x.reshape(len(x), -1)
        sq = ((xf[:, None, :] - torch.sqrt(a)[:, None] * means[None].to(x.dtype)) ** 2).sum(-1)
        return -sq / (2 * v)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = AC[t.cpu()].to(x.dtype).reshape(-1, 1)
        v = a * s**2 + 1 - a
        r = torch.softmax(logits(x, t), dim=1)
        xf = x.reshape(len(x), -1)
        score = -(xf - torch.sqrt(a) * (r @ means.to(x.dtype))) / v
        return (-torch.sqrt(1 - a) * score).reshape(x.shape)

    class Classifier(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return logits(x, t)

    return eps, Classifier()


def test_guided_ode_likelihood_of_exact_mixture_is_the_component():
    """score(p_t) + grad log p_t(c | x) = score(p_t(. | c)): the guided density is component c's Gaussian."""
    s = 0.4
    means = torch.tensor([[0.5, 0.5, -0.5, 0.0], [-0.5, -0.5, 0.5, 0.0]], dtype=torch.float64)
    eps, clf = _mixture(means, s)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    x = (means[labels] + s * torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    x = x.reshape(6, 1, 2, 2)
    fn = guided_eps_fn(eps, clf, labels, 1.0, AC)
    res = pf_ode_log_likelihood(fn, x, AC, n_steps=64, trace="exact")
    exact = np.array([_gaussian_logpdf(x[i:i + 1], means[c].reshape(1, 2, 2), s**2 + SIG_MIN**2)[0]
                      for i, c in enumerate(labels)])
    np.testing.assert_allclose(res.log_prob, exact, atol=0.05)


def test_guided_eps_at_any_scale_moves_eps_toward_the_components_by_that_multiple():
    """eps_guided = eps - lambda sqrt(1 - abar) grad log p(c | x_t) and, for the exact mixture, grad log p(c | x_t) =
    score_c - score, so eps_guided = eps + lambda (eps_c - eps) with the component's eps_c = sqrt(1 - abar)
    (x - sqrt(abar) m_c) / (abar s^2 + 1 - abar), written out here: at lambda 1 the component's own eps, at 2 and
    0.5 twice and half the step from eps (a scale ignored above 0 passed the scale-1 tests)."""
    s = 0.4
    means = torch.tensor([[0.5, 0.5, -0.5, 0.0], [-0.5, -0.5, 0.5, 0.0]], dtype=torch.float64)
    eps, clf = _mixture(means, s)
    labels = torch.tensor([0, 1, 1, 0])
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([50, 200, 500, 900])
    a = AC[t].to(torch.float64).reshape(-1, 1)
    eps_c = (torch.sqrt(1 - a) * (x.reshape(4, -1) - torch.sqrt(a) * means[labels]) / (a * s**2 + 1 - a))
    base = eps(x, t).reshape(4, -1)
    for scale in (0.5, 1.0, 2.0):
        got = guided_eps_fn(eps, clf, labels, scale, AC)(x, t).reshape(4, -1)
        torch.testing.assert_close(got, base + scale * (eps_c - base), rtol=1e-6, atol=1e-6)  # (AC is float32)


# --------------------------------------------------------------------------------------------------
# measure


def test_measure_on_exact_mixture_orders_as_the_theorem_says():
    s = 0.4
    means = torch.tensor([[0.5, 0.5, -0.5, 0.0], [-0.5, -0.5, 0.5, 0.0]], dtype=torch.float64)
    eps, clf = _mixture(means, s)
    g = torch.Generator().manual_seed(0)
    lab = torch.arange(40) % 2
    train = (means[lab] + s * torch.randn(40, 4, generator=g, dtype=torch.float64)).reshape(40, 1, 2, 2)
    den = CallableDenoiser(eps, (1, 2, 2), SCHED)
    res = measure(den, clf, train, labels=lab.numpy(), eps=0.1, n_points=24, n_steps=32, trace="exact",
                  batch_size=10)
    # converged models: the gain is ~ E[log p - log p_c] < 0; the empirical optimum memorizes more still
    assert res.gain_model.ci95[1] < 0
    assert res.ordering["conditioning memorizes no less: M(D_c; p_c) - M(D_c; p) <= 0"] == "holds"
    assert res.m_opt_cond.mean < res.m_guided.mean < res.m_uncond.mean
    assert res.m_opt_full.mean == pytest.approx(0.0, abs=1e-9)  # bandwidth = eps: KDE_D is q_eps
    assert res.gain_opt.mean == pytest.approx(math.log(0.5), abs=0.05)  # two equal classes, separated kernels
    # at bandwidth = eps the optimum's claim is M(D_c; p_c) >= 0, true of any model: the claim says so (it read as
    # a finding of the theory)
    assert [k for k in res.ordering if k.startswith("the conditional empirical optimum")] == [
        "the conditional empirical optimum memorizes the most: M(D_c; KDE_c) - M(D_c; p_c) <= 0 (kernel width = eps: "
        "the optimum's M is 0, so this only checks the estimate M >= 0)"]
    saved = json.loads(json.dumps(res.to_dict()))
    # the setting as asked, beside the distinct steps the ODE took (only those were saved: a rerun with them built
    # another grid)
    assert saved["n_steps_requested"] == 32 and saved["n_steps"] == len(res.timesteps) - 1 <= 32
    # a wider kernel (bandwidth = 2 eps): M(D; KDE_D) = E_{x ~ q_eps}[log q_eps(x) - log q_2eps(x)], the KL of the two
    # kernel densities (1.27 nats at d = 4 if every point saw only its own kernel; less where kernels overlap). Its
    # value for this training set by Monte Carlo, written out with scipy's logsumexp, and the per-point spread:
    from scipy.special import logsumexp

    pts, rng = train.reshape(40, 4).numpy(), np.random.default_rng(0)

    def log_kde(x, h):
        d2 = ((x[:, None] - pts[None]) ** 2).sum(-1)
        return logsumexp(-d2 / (2 * h * h), axis=1) - 2 * math.log(2 * math.pi * h * h)  # (+ const: log 1/N)

    xs = pts[rng.integers(0, 40, 20000)] + 0.1 * rng.standard_normal((20000, 4))
    per_point = log_kde(xs, 0.1) - log_kde(xs, 0.2)
    wide = measure(den, clf, train, labels=lab.numpy(), eps=0.1, bandwidth=0.2, n_points=24, n_steps=4,
                   trace="exact", batch_size=24)
    tol = 4 * per_point.std() / math.sqrt(24)  # four standard errors of a 24-point mean
    assert wide.bandwidth == 0.2 and abs(wide.m_opt_full.mean - per_point.mean()) < tol  # (0.83 against 1.09)
    assert wide.m_opt_cond.ci95[0] > 0  # within a class too: its own kernel at eps against the class's at 2 eps
    assert not any("kernel width = eps" in k for k in wide.ordering)


def _tiny_unet_denoiser():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32,), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",)).eval()
    return CallableDenoiser(lambda x, t: unet(x, t).sample, (1, 8, 8), SCHED)


class TinyClassifier(torch.nn.Module):
    """A time-dependent classifier: conv features scaled by a function of t, then 3 logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 64, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)) * (1 + t.float() / 1000).reshape(-1, 1, 1, 1)
        return self.fc(h.flatten(1))


def test_measure_runs_on_a_unet_and_scale_zero_is_exactly_unguided():
    den, clf = _tiny_unet_denoiser(), TinyClassifier().eval()
    train = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = dict(n_points=6, n_steps=6, n_probes=1, batch_size=4, seed=3)
    zero = measure(den, clf, train, guidance_scale=0.0, **kw)
    np.testing.assert_array_equal(zero.log_p_guided, zero.log_p_uncond)
    assert zero.gain_model.mean == 0.0
    guided = measure(den, clf, train, guidance_scale=2.0, **kw)
    assert np.isfinite(guided.log_p_guided).all() and not np.array_equal(guided.log_p_guided, guided.log_p_uncond)
    # per-point probes: the batch size does not change the result
    other = measure(den, clf, train, guidance_scale=2.0, **(kw | {"batch_size": 6}))
    np.testing.assert_allclose(other.log_p_guided, guided.log_p_guided, rtol=1e-5, atol=1e-3)
    assert set(guided.ordering.values()) <= {"holds", "violated", "inconclusive"}


def test_measure_rejects_bad_input():
    den, clf = _tiny_unet_denoiser(), TinyClassifier().eval()
    train = torch.zeros(5, 1, 8, 8)
    with pytest.raises(ValueError, match="n_points=9"):
        measure(den, clf, train, n_points=9)
    with pytest.raises(ValueError, match="guidance_scale=-1"):
        measure(den, clf, train, n_points=2, guidance_scale=-1.0)
    with pytest.raises(ValueError, match=r"model expects \(1, 8, 8\)"):
        measure(den, clf, torch.zeros(5, 1, 4, 4), n_points=2)
    with pytest.raises(ValueError, match="seed=-4 must be an integer >= 0"):  # numpy's words, naming no value
        measure(den, clf, train, n_points=2, seed=-4)
    # a float64 training set beside float32 weights failed in torch's words ("Input type (double) and bias type
    # (float)"), naming neither; uint8 pixels were taken as values in [-1, 1]
    with pytest.raises(ValueError, match=r"the classifier failed on train, torch.float64, beside its weights in "
                                         r"torch.float32 \(.*\): give train in torch.float32"):
        measure(den, clf, train.double(), n_points=2)

    class CastsItsInput(torch.nn.Module):  # float64 weights, float32 inputs cast: it worked, and is taken as it is
        def __init__(self):
            super().__init__()
            self.inner = TinyClassifier().double()

        def forward(self, x, t):
            return self.inner(x.double(), t)

    assert np.isfinite(measure(den, CastsItsInput(), train, n_points=2, n_steps=2).log_p_guided).all()
    with pytest.raises(ValueError, match=r"the target failed on one image of train, torch.float64 \(.*\): if its "):
        measure(den, CastsItsInput(), train.double(), n_points=2)
    with pytest.raises(ValueError, match=r"train must be a floating-point tensor in \[-1, 1\], got torch.uint8"):
        measure(den, clf, train.to(torch.uint8), n_points=2)
    # a bandwidth whose square underflows was said as "eps=1e-200 is too small" (log_q_eps's name for its width)
    with pytest.raises(ValueError, match="bandwidth=1e-200 is too small"):
        measure(den, clf, train, n_points=2, bandwidth=1e-200)
    from side_extract.theory.measure import check_options

    check_options(eps=np.float16(0.001), bandwidth=np.float32(1e-25))  # (squared in float64: no underflow)
    from side_extract.theory.divergence import stratified_indices

    for n_data, n in ((5, -1), (0, 3)):  # (4 indices for n=-1; a ZeroDivisionError)
        with pytest.raises(ValueError, match=f"n_data={n_data} must be an integer >= 1 and n={n} an integer >= 0"):
            stratified_indices(n_data, n, np.random.default_rng(0))
    k = clf(train[:1], torch.zeros(1, dtype=torch.long)).shape[-1]
    for bad in (-1, k):  # -1 guided toward the last logit, reported as class -1; K failed after a batch's ODE
        with pytest.raises(ValueError, match=f"output indices 0..{k - 1}"):
            measure(den, clf, train, n_points=2, labels=np.array([0, 0, 0, 0, bad]))


# --------------------------------------------------------------------------------------------------
# checks and CLI


def test_all_checks_pass_on_the_default_seed():
    results = run_checks(seed=0)
    assert [r.name for r in results] == ["A", "B", "C", "D", "E"]
    failed = {r.name: [row.label for row in r.rows if row.passed is False] for r in results if not r.passed}
    assert not failed, failed


def test_check_rows_fail_when_prediction_is_off():
    from side_extract.theory.checks import CheckRow

    assert CheckRow("x", Estimate.exact(1.0), Estimate(1.5, 0.1, 100)).passed is False
    assert CheckRow("x", Estimate.exact(1.0), Estimate(1.2, 0.1, 100)).passed is True
    assert CheckRow("x", Estimate.exact(1.0), Estimate(1.2, 0.1, 100), ">").passed is False
    assert CheckRow("x", Estimate.exact(1.0), Estimate(0.2, 0.1, 100), "<=").passed is True


def test_cli_check_and_errors(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["theory", "check", "--only", "E,d"])
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.output and "E[#unique]" in ok.output
    bad = runner.invoke(app, ["theory", "check", "--only", "Z"])
    assert bad.exit_code == 2 and "valid: A, B, C, D, E" in bad.output
    (tmp_path / "config.yaml").write_text("model: demo\ntrain: digits:100\n")
    missing = runner.invoke(app, ["theory", "measure", str(tmp_path)])
    assert missing.exit_code == 2 and "classifier" in missing.output


def test_the_stratified_estimate_reports_its_real_spread():
    """Samples of q_eps use every training point equally often; the i.i.d. standard error also counted the spread
    between points, which that removes (about 80-100x too wide on far-apart points), so checks on them could not
    fail. The design's error must match the estimate's spread across seeds."""
    from side_extract.theory.divergence import GaussianModel, memorization_divergence

    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 5))
    model = GaussianModel(rng.standard_normal(5), a @ a.T / 5 + 0.5 * np.eye(5))
    far = 10 * rng.standard_normal((20, 5))
    for n in (4000, 4010):  # whole permutations; and a remainder of 10 extra draws
        runs = [memorization_divergence(far, model.log_prob, 0.05, n, s).estimate for s in range(40)]
        spread = np.std([e.mean for e in runs], ddof=1)
        reported = np.mean([e.stderr for e in runs])
        assert 0.7 < reported / spread < 1.4, (n, reported, spread)


def test_the_stratified_error_is_not_set_by_a_few_repeat_draws():
    """At n = N + 1 one point is drawn twice, and its two draws alone set the within-point variance of every
    point (one degree of freedom): the interval covered the mean in 80 % of these draws, not 95 %. With too few
    repeats the i.i.d. formula is kept (conservative)."""
    from side_extract.theory.divergence import Z95, stratified_indices

    n_data, covered, trials = 20, 0, 400
    centres = np.linspace(-0.1, 0.1, n_data)  # each point's own mean; the estimand is their average
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        for n in (n_data + 1, n_data + 3):
            idx = stratified_indices(n_data, n, rng)
            e = Estimate.from_strata(centres[idx] + rng.standard_normal(n), idx, n_data)
            covered += abs(e.mean - centres.mean()) <= Z95 * e.stderr
    assert covered / (2 * trials) > 0.9, covered / (2 * trials)


def test_the_stratified_error_does_not_lend_one_points_variance_to_the_points_drawn_once():
    """110 draws of 100 points: ten drawn twice, whose squares set the within-point variance of the 90 drawn once.
    Where the one point of large variance (sd 10, the others 0.5) was among the 90 (nine trials in ten), its
    variance was taken as the others', and the interval covered the mean in 81 % of trials (a review's find; 91 %
    for M itself with one training image far out). Points drawn once borrow no variance: the stratified error
    needs every point drawn at least twice, and the i.i.d. formula (conservative) is kept below that."""
    from side_extract.theory.divergence import stratified_indices

    n_data, covered, trials = 100, 0, 1000
    sd = np.full(n_data, 0.5)
    sd[0] = 10.0
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        idx = stratified_indices(n_data, 110, rng)
        lo, hi = Estimate.from_strata(sd[idx] * rng.standard_normal(110), idx, n_data).ci95
        covered += lo <= 0.0 <= hi
    assert covered / trials >= 0.93, covered / trials
    v = np.random.default_rng(0).standard_normal(110)
    idx = np.r_[np.arange(100), np.arange(10)]
    assert Estimate.from_strata(v, idx, 100) == Estimate.from_values(v)


def test_the_stratified_error_is_not_set_by_a_points_two_draws():
    """Every point drawn twice (n = 2N): each point's variance has one degree of freedom, and where one point carries
    most of the variance and its two draws happen to fall close, the whole interval is too narrow, which no Student-t
    quantile mends (a review: 20 points, one of sd 5 and the rest 0.1, covered the mean in 89.6 % of trials at the
    Welch-Satterthwaite df). The stratified error needs three draws of every point; below, the i.i.d. formula
    (conservative) is kept."""
    from side_extract.theory.divergence import stratified_indices

    n_data, covered, trials = 20, 0, 2000
    sd = np.full(n_data, 0.1)
    sd[0] = 5.0
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        idx = stratified_indices(n_data, 2 * n_data, rng)
        lo, hi = Estimate.from_strata(sd[idx] * rng.standard_normal(2 * n_data), idx, n_data).ci95
        covered += lo <= 0.0 <= hi
    assert covered / trials >= 0.93, covered / trials
    v = np.random.default_rng(0).standard_normal(2 * n_data + 10)
    idx = np.r_[np.arange(n_data), np.arange(n_data), np.arange(10)]
    assert Estimate.from_strata(v, idx, n_data) == Estimate.from_values(v)


def test_log_q_eps_refuses_a_chunk_that_is_not_a_positive_count():
    """chunk=-1 returned np.empty's memory as densities (no block was computed); 0 was range()'s error."""
    from side_extract.theory import log_q_eps

    for chunk in (-1, 0, 2.5):
        with pytest.raises(ValueError, match=rf"chunk={chunk}"):
            log_q_eps(np.zeros((3, 2)), np.ones((4, 2)), 0.5, chunk=chunk)
    assert log_q_eps(np.zeros((3, 2)), np.ones((4, 2)), 0.5, chunk=2) == pytest.approx(
        -math.log(2 * math.pi * 0.25) - 2 / (2 * 0.25))  # four equal kernels at squared distance 2, in 2-d


def test_the_mixture_density_is_scipys():
    """GaussianMixtureModel's density (checks A and C rest on it) against scipy's multivariate normals, with full
    and isotropic covariances and unnormalised weights; its components' log-probabilities against log w_k +
    scipy's."""
    from side_extract.theory import GaussianMixtureModel

    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 3, 3))
    covs = a @ a.transpose(0, 2, 1) + 0.3 * np.eye(3)
    means = rng.standard_normal((2, 3))
    x = 2 * rng.standard_normal((7, 3))
    for cov, full in ((covs, covs), (np.array([0.5, 2.0]), np.array([0.5 * np.eye(3), 2.0 * np.eye(3)]))):
        m = GaussianMixtureModel(np.array([2.0, 6.0]), means, cov)
        comps = np.stack([np.log(w) + multivariate_normal(mu, c).logpdf(x)
                          for w, mu, c in zip((0.25, 0.75), means, full)], axis=1)
        np.testing.assert_allclose(m.component_log_prob(x), comps, rtol=1e-10)
        np.testing.assert_allclose(m.log_prob(x), np.log(np.exp(comps).sum(axis=1)), rtol=1e-10)


def test_check_d_catches_a_log_n_error_in_the_normalisation():
    """Row 3 of check D tests log q_eps's normalisation: a prediction off by log N must fail it (it passed)."""
    import math

    from side_extract.theory.checks import check_d
    from side_extract.theory.divergence import Estimate

    row = check_d(seed=0).rows[2]
    assert row.passed
    for shift in (math.log(20), 0.5):
        moved = dataclasses.replace(row, prediction=Estimate.exact(row.prediction.mean + shift))
        assert moved.passed is False, shift


def test_divergence_gap_refuses_a_wrongly_shaped_log_density():
    from side_extract.theory.divergence import Estimate, GaussianModel, divergence_gap

    data = np.random.default_rng(1).standard_normal((30, 3))
    g = GaussianModel(np.zeros(3), np.eye(3))
    other = GaussianModel(np.ones(3), 2 * np.eye(3))
    flat = divergence_gap(data, other.log_prob, g.log_prob, 0.2, n=40)
    column = divergence_gap(data, lambda x: other.log_prob(x)[:, None], g.log_prob, 0.2, n=40)
    assert column == flat  # an (n, 1) density is one value per point (it broadcast the gap to n x n)
    with pytest.raises(ValueError, match=r"log_prob_a returned shape \(41,\), expected \(40,\)"):
        divergence_gap(data, lambda x: np.append(other.log_prob(x), 0.0), g.log_prob, 0.2, n=40)
    with pytest.raises(ValueError, match="at least 2"):
        Estimate.from_values(np.array([1.0]))


def test_measure_takes_second_derivatives_through_a_classifier_on_the_targets_attending_unet(tiny_model_dir, tmp_path):
    """The guided model's divergence differentiates the classifier's gradient once more. A noise-aware classifier on
    the target's UNet features goes through the UNet's attention, whose fused kernels have no double backward:
    `side theory measure` (and `side demo`'s theory lines) on such a run failed with "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"."""

    from side_extract.pipeline import run_audit
    from side_extract.theory.measure import measure_run

    from test_pipeline import TINY_CLF, tiny_rc

    rc = tiny_rc(tiny_model_dir, methods=("side",))
    rc = dataclasses.replace(rc, classifier=dataclasses.replace(TINY_CLF, backbone="unet"))
    run_audit(tmp_path / "run", rc, until="classifier")
    res, path = measure_run(tmp_path / "run", n_points=4, n_steps=4)
    assert path.exists() and np.isfinite(res.log_p_guided).all()
    assert not np.array_equal(res.log_p_guided, res.log_p_uncond)


def test_measure_json_records_its_seed_and_more_points_than_the_set_holds_are_refused(tiny_model_dir, tmp_path):
    """measure.json said "the same points" of a measure by its indices alone, while the seed draws their noise and
    probes (two seeds on every point of a set: equal indices, other figures, no seed in the file); --n-points past the
    training set was lowered to it without a word, while measure() refused it (a review's finds)."""
    import json

    from typer.testing import CliRunner

    from side_extract.cli.main import app
    from side_extract.pipeline import run_audit
    from side_extract.theory.measure import measure_run

    from test_pipeline import tiny_rc

    run_audit(tmp_path / "run", tiny_rc(tiny_model_dir, methods=("side",)), until="classifier")
    a, path = measure_run(tmp_path / "run", n_points=30, n_steps=1, seed=1)
    got = json.loads(path.read_text())
    assert got["seed"] == a.seed == 1 and sorted(got["index"]) == list(range(30))
    with pytest.raises(ValueError, match=r"n_points=31 must be an integer in \[2, 30\]"):
        measure_run(tmp_path / "run", n_points=31, n_steps=1)
    r = CliRunner().invoke(app, ["theory", "measure", str(tmp_path / "run"), "--n-points", "1000", "--steps", "1"])
    assert r.exit_code == 2 and "error: --n-points=1000 must be an integer in [2, 30]" in r.output, r.output
    r = CliRunner().invoke(app, ["theory", "measure", str(tmp_path / "run"), "--steps", "1"])  # default: the 30
    assert r.exit_code == 0 and "30 points" in r.output and "seed 0" in r.output, r.output


def test_measure_run_refuses_bad_settings_before_it_loads_the_run(tmp_path):
    """measure_run (side theory measure) checked eps, bandwidth, guidance_scale, n_points, seed... inside measure(),
    after it had locked the run and loaded and fingerprinted the target (every weight of a large model hashed),
    its classifier and the training set (a review's find): here a run whose target and classifier cannot load
    said so, and never reached the bad setting. It is refused first."""
    from side_extract.theory.measure import measure_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: /nowhere\ntrain: digits:20\n")
    for kwargs, said in (({"eps": 0}, r"eps=0 must be a positive finite number"),
                         ({"eps": 1e200}, r"eps=1e\+200 is too large"), ({"bandwidth": 1e300}, r"bandwidth=1e\+300"),
                         ({"t_min": -1}, r"t_min=-1 must be an integer timestep >= 0"),
                         ({"t_min": 2.5}, r"t_min=2.5 must be an integer"), ({"n_steps": 0}, r"n_steps=0 must be"),
                         ({"trace": "exakt"}, r"trace='exakt' must be 'hutchinson' or 'exact'"),
                         ({"bandwidth": -1.0}, r"bandwidth=-1.0 must be > 0"),
                         ({"guidance_scale": float("nan")}, r"guidance_scale=nan must be a finite number >= 0"),
                         ({"n_points": 1}, r"n_points=1 must be an integer in \[2, N\]"),
                         ({"seed": -1}, "seed")):
        with pytest.raises(ValueError, match=said):
            measure_run(run, **kwargs)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_the_report_leaves_out_a_measure_of_a_classifier_the_run_no_longer_holds(tiny_model_dir, tmp_path):
    """theory/measure.json recorded nothing of the classifier it measured: after the classifier was trained again the
    report showed its divergences and verdicts as the run's, with no note."""

    from side_extract.pipeline import run_audit
    from side_extract.report import build_report
    from side_extract.theory.measure import measure_run

    from test_pipeline import tiny_rc

    rc = tiny_rc(tiny_model_dir, methods=("side",))
    run_audit(tmp_path / "run", rc, until="classifier")
    measure_run(tmp_path / "run", n_points=4, n_steps=2)
    data = build_report(tmp_path / "run")
    assert data["theory"] is not None and not any("theory/measure.json" in n for n in data["notes"])
    retrained = dataclasses.replace(rc, classifier=dataclasses.replace(rc.classifier, steps=rc.classifier.steps + 2))
    run_audit(tmp_path / "run", retrained, until="classifier")
    data = build_report(tmp_path / "run")
    assert data["theory"] is None
    assert any("theory/measure.json was measured on a classifier the run no longer holds" in n for n in data["notes"])
    # a file of an earlier release (no classifier recorded) is shown with a note, unless its training set is not the
    # run's (it was kept whatever its training set)
    measure_run(tmp_path / "run", n_points=4, n_steps=2)
    m = json.loads((tmp_path / "run" / "theory" / "measure.json").read_text())
    del m["classifier_fingerprint"]
    (tmp_path / "run" / "theory" / "measure.json").write_text(json.dumps(m))
    data = build_report(tmp_path / "run")
    assert data["theory"] is not None and data["theory"]["sigma_min"] == pytest.approx(m["sigma_min"])
    assert any("does not record which classifier it measured (made by an earlier release)" in n for n in data["notes"])
    (tmp_path / "run" / "theory" / "measure.json").write_text(json.dumps({**m, "train": "digits:500"}))
    data = build_report(tmp_path / "run")
    assert data["theory"] is None
    assert any("measured on a training set ('digits:500') the run no longer holds" in n for n in data["notes"])
    # an unfinished classifier stage (its last saved weights) is not measured
    manifest = tmp_path / "run" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["stages"]["classifier"]["status"] = "running"
    manifest.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="is not a finished classifier stage \\(status 'running'"):
        measure_run(tmp_path / "run", n_points=4, n_steps=2)


def test_measure_of_an_audit_made_in_memory_takes_its_model(tmp_path):
    """`side theory measure RUN` loaded the run's config model, which for side_extract.audit(unet, ...) is the text
    "in-memory UNet2DModel <fp>", not a model: it failed with "not a directory" and no way to pass the model. The
    model is now taken as audit() takes it, from Python or as a directory (--model), and checked against the run."""

    import side_extract
    from side_extract.models.target import save_target
    from side_extract.theory.measure import measure_run
    from typer.testing import CliRunner

    from side_extract.cli.main import app
    from conftest import tiny_scheduler, tiny_unet
    from test_pipeline import TINY_CLF

    unet, digits = tiny_unet(), side_extract.load_image_set("digits:30")
    config = {"sample.n": 40, "sample.steps": 2, "surrogate.n_clusters": 4, "surrogate.tau": -1.0,
              "surrogate.n_init": 1, **{f"classifier.{k}": v for k, v in dataclasses.asdict(TINY_CLF).items()},
              "extract.n": 4, "extract.steps": 2, "evaluate.bands": "high=0:0.1,mid=0.1:0.15,low=0.15:0.2",
              "evaluate.quality": []}
    side_extract.audit(unet, digits.images, scheduler=tiny_scheduler(), config=config, out=tmp_path / "run",
                       methods=["side"])
    with pytest.raises(ValueError, match="is not a model on disk: pass it"):
        measure_run(tmp_path / "run", n_points=4, n_steps=2)
    res, path = measure_run(tmp_path / "run", n_points=4, n_steps=2, model=unet, scheduler=tiny_scheduler())
    assert np.isfinite(res.log_p_guided).all() and "in-memory UNet2DModel" in json.loads(path.read_text())["model"]
    with pytest.raises(ValueError, match="is not the run's target"):
        measure_run(tmp_path / "run", n_points=4, n_steps=2, model=tiny_unet(seed=1), scheduler=tiny_scheduler())
    # a run of a model directory that has moved since: --model names where it is now
    save_target(unet, tiny_scheduler(), tmp_path / "m")
    side_extract.audit(str(tmp_path / "m"), digits.images, config=config, out=tmp_path / "run2", methods=["side"])
    (tmp_path / "m").rename(tmp_path / "moved")
    argv = ["--no-progress", "theory", "measure", str(tmp_path / "run2"), "--n-points", "4", "--steps", "2"]
    r = CliRunner().invoke(app, argv, terminal_width=200)
    assert r.exit_code == 2 and "is not a model on disk" in r.output, r.output
    r = CliRunner().invoke(app, [*argv, "--model", str(tmp_path / "moved")], terminal_width=200)
    assert r.exit_code == 0, r.output
    # a model directory replaced in place since the run is refused, not measured against the run's classifier
    save_target(tiny_unet(seed=1), tiny_scheduler(), tmp_path / "m")
    with pytest.raises(ValueError, match="model: fingerprint .* is not the run's target"):
        measure_run(tmp_path / "run2", n_points=4, n_steps=2)


def test_check_as_kernel_density_of_a_one_point_class_takes_the_pooled_spread():
    """At N=30 a mixture component can draw a single training point (seed 44: counts 18, 11, 1): Scott's bandwidth
    sd * n^(-1/(d+4)) was 0 there and `side theory check --seed 44` ended with "sigma=0.0 must be a positive finite
    number" before checks B-E. By hand: the pooled points (0, 0), (2, 0), (0, 4) have per-axis sd 0.943 and 1.886,
    mean 1.414; for one point n^(-1/6) = 1."""
    from side_extract.theory.checks import _scott_kde

    pooled = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    kde = _scott_kde(pooled[2:], pooled)
    assert kde.sigma == pytest.approx((np.sqrt(8 / 9) + np.sqrt(32 / 9)) / 2)
    assert np.isfinite(kde.log_prob(np.array([[0.5, 3.0]]))).all()


def test_a_gaussian_model_refuses_a_covariance_that_is_not_symmetric_or_not_finite():
    """Cholesky reads only the lower triangle: [[2, 1], [0, 2]] passed, and log_prob used N(1, 2I) while
    kl_gaussians inverted the full matrix (0.568 against the 0.693 of the density it drew); NaN gave NaN densities."""
    from side_extract.theory.divergence import GaussianModel

    with pytest.raises(ValueError, match="cov must be symmetric positive definite; it is not symmetric"):
        GaussianModel(np.ones(2), np.array([[2.0, 1.0], [0.0, 2.0]]))
    with pytest.raises(ValueError, match="mean and cov must be finite"):
        GaussianModel(np.array([0.0, np.nan]), 1.0)
    a = np.random.default_rng(0).standard_normal((6, 6))
    GaussianModel(np.zeros(6), a @ a.T / 6 + np.eye(6))  # a product's rounding is no asymmetry
    with pytest.raises(ValueError, match="at least one dimension"):  # (numpy's "zero-size array to reduction")
        GaussianModel(np.zeros(0), 1.0)


def test_theory_inputs_that_failed_with_python_errors_are_named():
    """A scalar covs was len()'s TypeError, a label past the classifier's classes an IndexError, and an eps whose
    square underflows gave NaN densities."""
    from side_extract.theory.divergence import GaussianMixtureModel, log_q_eps
    from side_extract.theory.likelihood import guided_eps_fn

    with pytest.raises(ValueError, match=r"covs has shape \(\), expected 2 entries"):
        GaussianMixtureModel(np.ones(2), np.zeros((2, 3)), 1.0)
    with pytest.raises(ValueError, match="eps=1e-160 is too small: eps\\^2 underflows"):
        log_q_eps(np.zeros((1, 2)), np.zeros((3, 2)), 1e-160)
    with pytest.raises(ValueError, match="eps=1e\\+200 is too large: eps\\^2 overflows"):  # (an OverflowError)
        log_q_eps(np.zeros((1, 2)), np.zeros((3, 2)), 1e200)
    fn = guided_eps_fn(lambda x, t: torch.zeros_like(x), lambda x, t: x.flatten(1)[:, :2], torch.tensor([0, 2]),
                       1.0, np.linspace(0.99, 0.01, 10))
    with pytest.raises(ValueError, match=r"labels must be classes 0..1 of the classifier, got 0..2"):
        fn(torch.zeros(2, 1, 2, 2), torch.tensor([3, 3]))


def test_measure_by_default_reads_the_model_at_the_noise_level_of_eps(caplog):
    """A fully memorizing model (the empirical optimum) and its exact Bayes classifier: the model's density at
    noise sigma is the kernel density of width sigma, so with the optimum's kernel at the sigma the ODE starts from,
    M(model) must equal M(optimum), guided and not. From t_min = 0 (sigma 0.01) points eps = 0.1 from their
    training image lie ten kernel widths out, where the ODE's grid does not follow the density (tens of nats off,
    and doubling the steps did not show it); the default now starts at the sigma nearest eps."""
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(30, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1)
    lab = np.arange(30) % 2
    pts = train.reshape(30, -1)

    class Bayes(torch.nn.Module):  # log sum_{i in c} N(x_t; sqrt(abar) x_i, (1 - abar) I), up to a shared constant
        def forward(self, x, t):
            a = AC[t.cpu()].to(x.dtype).reshape(-1, 1, 1)
            sq = ((x.reshape(len(x), 1, -1) - torch.sqrt(a) * pts[None]) ** 2).sum(-1)  # (B, N)
            k = -sq / (2 * (1 - a[:, :, 0]))
            return torch.stack([torch.logsumexp(k[:, lab == c], 1) for c in (0, 1)], 1)

    sig = np.sqrt((1 - AC.double().numpy()) / AC.double().numpy())
    t_star = int(np.abs(np.log(sig[:-1]) - np.log(0.1)).argmin())
    den = CallableDenoiser(empirical_optimal_eps(train, AC), (1, 2, 2), SCHED)
    res = measure(den, Bayes(), train, labels=lab, eps=0.1, bandwidth=float(sig[t_star]), n_points=16, n_steps=32,
                  trace="exact", batch_size=16)
    assert res.timesteps[0] == t_star and res.sigma_min == pytest.approx(0.1, rel=0.05)
    import logging

    with caplog.at_level(logging.WARNING, logger="side_extract.theory.measure"):  # (it was taken in silence)
        far = measure(den, Bayes(), train, labels=lab, eps=1e-4, n_points=4, n_steps=4, trace="exact")
    assert far.timesteps[0] == 0 and "eps=0.0001 lies outside the model's noise levels: the ODE starts at t=0" \
        in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="side_extract.theory.measure"):  # a t_min given far from eps: M
        # 102.5 for 216 in a review's run, in silence (the warning was only for the t_min chosen from eps)
        measure(den, Bayes(), train, labels=lab, eps=0.1, t_min=0, n_points=4, n_steps=4, trace="exact")
    assert "t_min=0 (sigma 0.01) is far from eps=0.1" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="side_extract.theory.measure"):  # (one near it says nothing)
        measure(den, Bayes(), train, labels=lab, eps=0.1, t_min=t_star, n_points=4, n_steps=4, trace="exact")
    assert "far from eps" not in caplog.text
    assert res.m_uncond.mean == pytest.approx(res.m_opt_uncond.mean, abs=0.3)
    assert res.m_guided.mean == pytest.approx(res.m_opt_cond.mean, abs=0.3)
    assert res.gain_model.mean == pytest.approx(res.gain_opt.mean, abs=0.3)
    # the other reported quantities, from their definitions: M(D; p) = E[log q_eps - log p] over the whole set equals
    # the optimum's M(D; KDE_D) for this exact model; on the same points, M(D_c; .) - M(D; .) = E[log q_eps,c -
    # log q_eps] for the model and for the optimum alike; opt_minus_guided = M(D_c; KDE_c) - M(D_c; p_c) (a wrong
    # field or a flipped sign passed every test)
    assert res.m_uncond_full.mean == pytest.approx(res.m_opt_full.mean, abs=0.3)
    assert res.m_opt_uncond.mean - res.m_opt_full.mean == pytest.approx(res.m_uncond.mean - res.m_uncond_full.mean,
                                                                        abs=1e-9)
    assert res.m_opt_uncond.mean - res.m_opt_full.mean > 0.5  # two classes: about log 2 (kernels apart)
    assert res.opt_minus_guided.mean == pytest.approx(res.m_opt_cond.mean - res.m_guided.mean, abs=1e-9)


def test_measure_refuses_a_classifier_made_from_results_the_run_no_longer_holds(tiny_model_dir, tmp_path):
    """`side sample` (or `side cluster`) after the classifier left it stale, and `side theory measure` measured that
    classifier beside the run's new synthetic set and model without a word (the report flags it as stale)."""

    from side_extract.pipeline import run_audit
    from side_extract.theory.measure import measure_run

    from test_pipeline import tiny_rc

    rc = tiny_rc(tiny_model_dir, methods=("side",))
    run_audit(tmp_path / "run", rc, until="classifier")
    resampled = dataclasses.replace(rc, sample=dataclasses.replace(rc.sample, seed=rc.sample.seed + 1))
    run_audit(tmp_path / "run", resampled, until="surrogate")  # side sample / side cluster: the classifier stays
    with pytest.raises(ValueError, match=r"was trained on results the run no longer holds \(surrogate made again"):
        measure_run(tmp_path / "run", n_points=4, n_steps=2)
    assert not (tmp_path / "run" / "theory" / "measure.json").exists()


def test_stratified_interval_takes_student_t_at_satterthwaites_degrees_of_freedom():
    """An independent review's find: where one point carries most of the variance, the stratified variance has few
    degrees of freedom and mean +- 1.96 stderr covered M 91-93 % of the time instead of 95 %. By hand: point 0 drawn
    6 times (0..5, variance 3.5), point 1 six times (all 7, variance 0): var = (6 * 3.5 + 6 * 0) / 12^2, and
    Welch-Satterthwaite's df = (21 + 0)^2 / (21^2 / 5) = 5, so the half-width is t_5(0.975) = 2.5706 stderr."""
    e = Estimate.from_strata(np.array([0, 1, 2, 3, 4, 5, 7, 7, 7, 7, 7, 7.0]), np.repeat([0, 1], 6), 2)
    assert e.mean == pytest.approx(57 / 12) and e.stderr == pytest.approx(math.sqrt(21) / 12)
    assert e.df == pytest.approx(5.0)
    lo, hi = e.ci95
    assert (hi - lo) / 2 == pytest.approx(2.5706 * math.sqrt(21) / 12, rel=1e-4)
    assert Estimate.from_values(np.array([1.0, 2.0, 4.0])).df == 2  # i.i.d.: n - 1
    # 110 draws of 100 points: points 0-9 twice (+1 and -1 about their mean 0, squares 2 each), 90 once, their
    # variance pooled from those squares: var n^2 = 10 * 2 * 2 + 90 * 20 / 10 = 220, 11 times the sum of ten squares
    # of one degree of freedom each, so 10 degrees of freedom (a review's find: 14.2, the pooled part counted as a
    # part of its own)
    # 20 draws of 10 points, each drawn twice (+1 and -1 about its mean), and one more round of 10: var n^2 = the
    # sum over points of c_i s_i^2 = 10 * 2 * 2 ... with 3 draws of point i (+1, -1, 0: s_i^2 = 1), 10 * 3 * 1 = 30,
    # and 10 parts of 2 degrees of freedom each, equal: 20 degrees of freedom
    v = np.r_[np.ones(10), -np.ones(10), np.zeros(10)]
    e = Estimate.from_strata(v, np.tile(np.arange(10), 3), 10)
    assert (e.stderr * 30) ** 2 == pytest.approx(30.0) and e.df == pytest.approx(20.0)
    # coverage against the closed form: 20 far-apart points, one 100 away, under N(0, 4 I); M = the mean
    # cross-entropy of the kernels N(x_i, eps^2 I) under p, less the entropy of q_eps (kernels far apart)
    d, eps, n_pts = 3, 0.05, 20
    pts = np.random.default_rng(123).normal(size=(n_pts, d)) * 10
    pts[0] = [100, 0, 0]
    model = GaussianModel(np.zeros(d), 4.0)
    ce = np.mean([0.5 * (d * math.log(2 * math.pi * 4.0) + (np.sum(x ** 2) + d * eps ** 2) / 4.0) for x in pts])
    truth = ce - (math.log(n_pts) + 0.5 * d * math.log(2 * math.pi * math.e * eps ** 2))
    covered = [lo <= truth <= hi for lo, hi in (
        memorization_divergence(pts, model.log_prob, eps, 60, seed).estimate.ci95 for seed in range(1000))]
    assert np.mean(covered) >= 0.935  # 0.940; 0.925 with 1.96 (1000 seeds: a standard error of 0.007; at n = 40,
    # two draws of each image, 0.910 with 1.96, and the i.i.d. formula now)


def test_theory_inputs_misstated_are_named():
    """An independent review's finds: a Gaussian's density broadcast (n, 1) points against its d-dimensional mean
    (a confident wrong M, its interval missing the closed form); NaN log-densities gave an "inconclusive" verdict
    and NaN in measure.json; EmpiricalOptimum.sample(1) was refused as "an interval needs two samples"; measure
    refused eps and guidance scales given as np.float32."""
    model = GaussianModel(np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="x has points of dimension 1, the model's are 3"):
        model.log_prob(np.array([[0.5], [1.0]]))
    with pytest.raises(ValueError, match="x has points of dimension 1, the model's are 3"):
        memorization_divergence(np.array([1.0, -0.5, 2.0]), model.log_prob, 0.3, 200, 0)
    with pytest.raises(ValueError, match="log_prob returned 50 non-finite log-densities of 50"):
        memorization_divergence(np.zeros((5, 3)), lambda x: np.full(len(x), np.nan), 0.3, 50, 0)
    assert EmpiricalOptimum(np.zeros((4, 2)), 0.1).sample(1).shape == (1, 2)
    with pytest.raises(ValueError, match="n=1 must be an integer >= 2"):
        memorization_divergence(np.zeros((5, 3)), model.log_prob, 0.3, 1, 0)
    # measure: np.float32 settings taken; a model whose ODE goes non-finite named, not an inconclusive verdict
    s = 0.4
    means = torch.tensor([[0.5, 0.5, -0.5, 0.0], [-0.5, -0.5, 0.5, 0.0]], dtype=torch.float64)
    eps, clf = _mixture(means, s)
    lab = torch.arange(8) % 2
    train = (means[lab] + s * torch.randn(8, 4, generator=torch.Generator().manual_seed(0),
                                          dtype=torch.float64)).reshape(8, 1, 2, 2)
    kw = dict(labels=lab.numpy(), n_points=4, n_steps=4, trace="exact")
    res = measure(CallableDenoiser(eps, (1, 2, 2), SCHED), clf, train, eps=np.float32(0.1),
                  guidance_scale=np.float32(1.0), **kw)
    assert res.eps == pytest.approx(0.1) and res.guidance_scale == 1.0

    def diverging(x, t):
        return torch.where(t.view(-1, 1, 1, 1) > 900, torch.full_like(x, torch.nan), eps(x, t))

    with pytest.raises(ValueError, match="the ODE log-likelihood of the target is not finite at 4 of 4 points"):
        measure(CallableDenoiser(diverging, (1, 2, 2), SCHED), clf, train, eps=0.1, **kw)


def test_measure_on_a_run_without_a_training_set_says_how_to_give_one(tmp_path):
    """`side theory measure RUN` on a run made without `train` said only that M needs the training set: the command
    has no flag for one, and the way (a step's --config) was not said."""
    from side_extract import config as cfg
    from side_extract.runs import RunDir
    from side_extract.theory.measure import measure_run

    RunDir(tmp_path / "run").write_config(cfg.RunConfig())
    with pytest.raises(ValueError, match=r"names no training set \('train'\); M needs the training set D: give the run "
                                         r"one through a step's --config naming train:"):
        measure_run(tmp_path / "run", n_points=4, n_steps=2)


def test_log_q_eps_is_exact_at_a_small_eps_in_image_dimensions():
    """|x|^2 + |x_j|^2 - 2 x.x_j loses ~d * 1e-16 * |x|^2 to rounding whatever the distance: divided by 2 eps^2, at
    eps = 1e-6 in 3x32x32 the densities were 0.26 nats off, at 1e-7 29 (a review's find). The reference sums the
    squared differences directly."""
    rng = np.random.default_rng(0)
    d, n_data = 3072, 40
    data = rng.uniform(-1, 1, (n_data, d))
    for eps in (1e-7, 1e-6, 0.1, 3.0):
        x = data[rng.integers(0, n_data, 6)] + eps * rng.standard_normal((6, d))
        x[0] = data[1] + (data[2] - data[1]) * 0.5  # a point between two, where both terms count
        direct = np.array([-((data - xi) ** 2).sum(1) / (2 * eps**2) for xi in x])
        ref = (np.logaddexp.reduce(direct, axis=1) - math.log(n_data)
               - 0.5 * d * (math.log(2 * math.pi) + 2 * math.log(eps)))
        np.testing.assert_allclose(log_q_eps(x, data, eps, chunk=4), ref, rtol=1e-12, atol=1e-6)


def test_theory_takes_a_bfloat16_training_set():
    """numpy has no bfloat16: log_q_eps of a bf16 tensor was a TypeError, and measure() of the bf16 training set its
    own error asks for beside a bf16 model failed the same way (a review's find)."""
    data = torch.tensor([[0.5, -0.25], [0.0, 1.0], [-1.0, 0.75]], dtype=torch.bfloat16)  # exact in bf16
    np.testing.assert_allclose(log_q_eps(data, data, 0.3), log_q_eps(data.double().numpy(), data.double(), 0.3))
    denoiser = CallableDenoiser(lambda x, t: 0.5 * x, (1, 1, 2), SCHED)
    res = measure(denoiser, lambda x, t: torch.stack([x.flatten(1).sum(1), -x.flatten(1).sum(1)], 1),
                  data.reshape(3, 1, 1, 2),
                  labels=np.array([0, 1, 1]), n_points=2, n_steps=2, trace="exact", eps=0.1)
    assert np.isfinite(res.m_uncond.mean)


def test_the_reference_denoisers_run_on_the_points_device():
    """gaussian_optimal_eps and empirical_optimal_eps took their schedule (and the data) on the host beside device
    points: on an accelerator both were an error (a review's find)."""
    from fake_device import FAKE, FakeDevice

    x, t = torch.randn(3, 1, 2, 2), torch.tensor([5, 500, 900])
    data = torch.randn(4, 1, 2, 2)
    for fn in (gaussian_optimal_eps(0.25, 0.5, AC), empirical_optimal_eps(data, AC)):
        host = fn(x, t)
        with FakeDevice():
            on = fn(x.to(FAKE), t.to(FAKE)).cpu()
        torch.testing.assert_close(on, host)


def test_the_report_leaves_out_a_measure_of_training_images_changed_since(tiny_model_dir, tmp_path):
    """measure.json recorded the training set's path only: the same file holding other images, the run audited
    again from them, the report still showed the divergences of the old images, with no note (a review's find)."""
    from side_extract.data import load_image_set
    from side_extract.pipeline import run_audit
    from side_extract.report import build_report
    from side_extract.theory.measure import measure_run

    from test_pipeline import tiny_rc

    digits = load_image_set("digits:60").images
    np.savez(tmp_path / "train.npz", images=digits[:30])
    rc = tiny_rc(tiny_model_dir, methods=("side",), n=4)
    rc = dataclasses.replace(rc, train=str(tmp_path / "train.npz"),  # (30 images: a coarse null)
                             evaluate=dataclasses.replace(rc.evaluate, calibration_quantiles=(0.1, 0.2, 0.3)))
    run_audit(tmp_path / "run", rc)
    measure_run(tmp_path / "run", n_points=4, n_steps=2)
    assert build_report(tmp_path / "run")["theory"] is not None
    np.savez(tmp_path / "train.npz", images=digits[30:])
    run_audit(tmp_path / "run", rc)
    data = build_report(tmp_path / "run")
    assert data["theory"] is None
    assert any("theory/measure.json was measured on a training set" in n and "its images changed since" in n
               for n in data["notes"]), data["notes"]
    measure_run(tmp_path / "run", n_points=4, n_steps=2)
    assert build_report(tmp_path / "run")["theory"] is not None
    # a method no longer run keeps the stages of the old images: the newest stage tells the set now (the report left a
    # fresh measure out, "images changed since"; a review of the fix)
    run_audit(tmp_path / "run", dataclasses.replace(rc, extract=dataclasses.replace(rc.extract,
                                                                                    methods=("side", "uncond"))))
    np.savez(tmp_path / "train.npz", images=digits[:30])
    run_audit(tmp_path / "run", rc)  # side alone: uncond's evaluation keeps the other images' fingerprint
    measure_run(tmp_path / "run", n_points=4, n_steps=2)
    assert build_report(tmp_path / "run")["theory"] is not None
