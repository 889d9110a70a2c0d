"""Log-likelihood of a diffusion model by its probability-flow ODE (Song et al. 2021, ICLR, section 4.3).

Discrete-to-continuous mapping
------------------------------
A diffusers VP model is trained on x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) n for integer t = 0..T-1,
``abar = scheduler.alphas_cumprod``. In the scaled variables of DDIM (Song et al. 2021a, eq. 14) and
EDM (Karras et al. 2022),

    y = x_t / sqrt(abar_t),    sigma_t = sqrt((1 - abar_t) / abar_t),    so  y = x_0 + sigma_t n,

the probability-flow ODE of the VP SDE is exactly

    dy / dsigma = eps(sqrt(abar) y, t(sigma))                                      (1)

and its instantaneous change of variables (Chen et al. 2018) gives

    log p_{sigma_0}(y_0) = log p_{sigma_K}(y_K) + int_{sigma_0}^{sigma_K} div_y eps dsigma.   (2)

The ODE is integrated only on the model's own integer training timesteps t_0 = t_min < ... < t_K = T - 1
(those of a DDIM sampler), so a model (or a classifier) is never asked about a timestep it was not trained
at, and the sigma it sees is exactly the schedule's; no continuous beta(s) has to be invented. The grid is
uniform in log sigma, rounded to integers. Each integrand is discretised in the variable in which it is
nearly constant at large noise: the trajectory (1) by Heun's method in sigma (EDM's second-order sampler;
its Euler part is exactly a DDIM step), the divergence integral (2) by the trapezoidal rule in log sigma,
int div dsigma = int (sigma div) dlog sigma. Both use the same model evaluations, at grid nodes only.

Discretisation bias, measured on a Gaussian N(mu, s^2 I) in d = 64 (s = 0.1 .. 1): about 0.7 nats at
32 steps, 0.2 at 64, 0.05-0.08 at 128 (second order); on the fully memorizing empirical optimum of 50
points, under 0.03 nats on average from 32 steps on, but up to 1.2 nats for one point at 32 steps (d = 4; 0.39 in
d = 64), 0.08 at 64 and 0.03 at 128 (``benchmarks/results/experiments/theory-figures.md``). Summing sigma*div
in log sigma rather than div in sigma cut the Gaussian error 3 to 5 fold at equal cost (div ~ d / sigma at large
sigma is badly served by trapezoids in sigma); an EDM (rho = 7) grid was no better than the log-uniform one
on the linear schedule.

What is measured: ``log p(x)`` is the density of the model's samples at the noise level of t_min, in
data coordinates (y = x_0 + sigma_min n, images in [-1, 1], dimension d = C*H*W). t_min = 0 gives
sigma_min = sqrt(beta_0 / (1 - beta_0)), 0.01 for diffusers' linear schedule; a larger t_min integrates
from a blurrier version of the model. The discretisation figures above hold for points typical of the density
at sigma_min. A point far from them in units of sigma_min (a memorizing model's density at sigma_min is a sum of
kernels of that width; a point eps = 10 sigma_min from its training image lies ten widths out) is not followed by
the grid: on the empirical optimum of 30 points in d = 4 at sigma_min = 0.01, points 0.1 from their training
image gave an M of 102.5 nats where the exact one is 216 (32 steps; an independent review found such errors
shrink little at 256 steps, so doubling ``n_steps`` does not reveal them). :func:`~.measure.measure` therefore
starts the ODE at the timestep whose sigma is nearest its eps (:func:`timestep_at_sigma`).
The prior at t_K: x_T ~ N(0, I) in x-space, i.e.
log p(y_K) = log N(sqrt(abar_K) y_K; 0, I) + (d/2) log abar_K; its error is KL(p_T || N(0, I)), negligible
for abar_{T-1} ~ 4e-5.

Trace estimator
---------------
``trace="exact"``: d backward passes per model evaluation (tests, small d). ``trace="hutchinson"``:
div = E_v[v^T (d eps / dy) v] with ``n_probes`` Rademacher probes (default 1), one backward pass each,
drawn *afresh at every evaluation*. FFJORD keeps one probe per trajectory because an adaptive solver needs a
fixed ODE; on a fixed grid the trajectory (1) never depends on the probes, so fresh probes keep the
estimate of log p unbiased (given the discretisation) while its noise averages over the 2K evaluations.
On an 8x8 digits UNet no longer shipped (32 steps, 1 probe) the per-point standard deviation of log p fell
from 6.7 nats with one probe per trajectory to 0.6 with fresh probes, against a spread of ~8 nats between points
(its command was not kept); on the shipped ``demo`` target fresh probes give 1.0 nats against a spread of 14.7
(``benchmarks/results/experiments/theory-figures.md``); so one probe is the default and the interval over
Monte Carlo points, which includes this noise, is hardly wider than with the exact trace. Per-sample generators
(a list) make results independent of the batching, and two models run with generators of the same seeds see
the same probes (a paired comparison). The ODE discretisation error is a bias the interval does not cover:
check it by doubling ``n_steps``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from ..models.target import math_attention, reproducible_gradients

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TraceKind = Literal["hutchinson", "exact"]


def _alphas_cumprod(alphas_cumprod: torch.Tensor | np.ndarray) -> torch.Tensor:
    ac = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64) if not isinstance(alphas_cumprod, torch.Tensor)
                         else alphas_cumprod.detach().cpu().double())
    if ac.ndim != 1 or len(ac) < 2 or not bool(((ac > 0) & (ac < 1)).all()) or not bool((ac[1:] <= ac[:-1]).all()):
        raise ValueError("alphas_cumprod must be a 1-d, non-increasing sequence in (0, 1) of length >= 2")
    return ac


def sigmas(alphas_cumprod: torch.Tensor | np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep t."""
    ac = _alphas_cumprod(alphas_cumprod)
    return torch.sqrt((1 - ac) / ac).numpy()


def timestep_at_sigma(alphas_cumprod: torch.Tensor | np.ndarray, sigma: float) -> int:
    """The training timestep whose sigma_t is nearest ``sigma`` in log sigma (at most T - 2, the ODE's last start)."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma={sigma!r} must be a positive finite number")
    log_sig = np.log(sigmas(alphas_cumprod))
    return int(np.abs(log_sig[:-1] - math.log(sigma)).argmin())


def ode_timesteps(alphas_cumprod: torch.Tensor | np.ndarray, n_steps: int, t_min: int = 0) -> np.ndarray:
    """Increasing integer timesteps t_min = t_0 < ... < t_K = T - 1, uniform in log sigma.

    ``n_steps + 1`` log-uniform sigmas between sigma_{t_min} and sigma_{T-1}, each mapped to the training
    timestep of nearest log sigma; duplicates (at small t, where the integer grid is coarse) are dropped, so
    K <= n_steps.
    """
    sig = sigmas(alphas_cumprod)
    n_train = len(sig)
    if not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps={n_steps!r} must be a positive integer")
    if not isinstance(t_min, (int, np.integer)) or not 0 <= t_min < n_train - 1:
        raise ValueError(f"t_min={t_min!r} must be an integer timestep in [0, {n_train - 2}]")
    log_sig = np.log(sig)
    target = np.linspace(log_sig[t_min], log_sig[-1], n_steps + 1)
    ts = t_min + np.abs(log_sig[None, t_min:] - target[:, None]).argmin(1)
    ts[0], ts[-1] = t_min, n_train - 1
    return np.unique(ts)


@dataclasses.dataclass(frozen=True, eq=False)
class LikelihoodResult:
    """Per-sample PF-ODE log-likelihood.

    Attributes
    ----------
    log_prob : (B,) log p(x) in nats, data coordinates, at noise level sigma_min
    prior_log_prob : (B,) log p_T(y_K) of the encoded point
    delta : (B,) the integral of the divergence, (2)
    timesteps : (K + 1,) the integer grid
    sigma_min, sigma_max : the grid's end noise levels
    trace : "exact" or "hutchinson"; n_probes : probes per sample (0 when exact)
    n_evals : model evaluations per sample (2 K)
    dim : d = C*H*W
    """

    log_prob: np.ndarray
    prior_log_prob: np.ndarray
    delta: np.ndarray
    timesteps: np.ndarray
    sigma_min: float
    sigma_max: float
    trace: TraceKind
    n_probes: int
    n_evals: int
    dim: int

    @property
    def bits_per_dim(self) -> np.ndarray:
        """-log2 p(x) / d, per sample (data coordinates in [-1, 1], no dequantisation)."""
        return -self.log_prob / (math.log(2) * self.dim)


def _rademacher(shape: tuple[int, ...], n_probes: int, generator: torch.Generator | list[torch.Generator],
                like: torch.Tensor) -> torch.Tensor:
    """(n_probes, *shape) signs; with a list of generators, sample b's come from generator b."""
    if isinstance(generator, torch.Generator):
        signs = torch.randint(0, 2, (n_probes, *shape), generator=generator, device=generator.device)
    else:
        signs = torch.stack([torch.randint(0, 2, (n_probes, *shape[1:]), generator=g, device=g.device)
                             for g in generator], dim=1)
    return (2.0 * signs - 1.0).to(dtype=like.dtype, device=like.device)


def _drift_and_divergence(eps_fn: EpsFn, y: torch.Tensor, t: int, sqrt_abar: float, trace: TraceKind,
                          n_probes: int, generator: torch.Generator | list[torch.Generator] | None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """f = eps(sqrt(abar) y, t) and div_y f, per sample (float64 divergences).

    Attention runs in PyTorch's math kernel here: the divergence of a guided eps is a second derivative, and the
    fused attention kernels have no double backward (a classifier on the target's UNet features, whose blocks
    attend, failed with "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented")."""
    b = len(y)
    with torch.enable_grad(), math_attention(), reproducible_gradients(y.device):
        y_in = y.detach().requires_grad_(True)
        f = eps_fn(sqrt_abar * y_in, torch.full((b,), t, dtype=torch.long, device=y.device))
        if f.shape != y.shape:
            raise ValueError(f"the model returned shape {tuple(f.shape)} for input {tuple(y.shape)}")
        div = torch.zeros(b, dtype=torch.float64, device=y.device)
        if trace == "exact":
            flat = f.reshape(b, -1)
            d = flat.shape[1]
            for i in range(d):
                (g,) = torch.autograd.grad(flat[:, i].sum(), y_in, retain_graph=i < d - 1)
                div += g.reshape(b, -1)[:, i].double()
        else:
            assert generator is not None
            probes = _rademacher(tuple(y.shape), n_probes, generator, y)
            for k, v in enumerate(probes):
                (g,) = torch.autograd.grad(f, y_in, v, retain_graph=k < n_probes - 1)
                div += (g * v).reshape(b, -1).sum(1).double()
            div /= n_probes
    return f.detach(), div.detach()


def pf_ode_log_likelihood(
    eps_fn: EpsFn,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor | np.ndarray,
    *,
    n_steps: int = 16,
    t_min: int = 0,
    trace: TraceKind = "hutchinson",
    n_probes: int = 1,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> LikelihoodResult:
    """log p(x) of the model eps(x_t, t) by the probability-flow ODE, per sample.

    Parameters
    ----------
    eps_fn : eps(x_t, t) with x_t (B, ...) and t (B,) int64 training timesteps; differentiable in x_t and
        per-sample (row b of the output depends only on row b of the input)
    x : (B, C, H, W) (or any (B, ...)) points in data coordinates, images in [-1, 1]
    alphas_cumprod : (T,) the model's training schedule
    n_steps : log-sigma-uniform grid intervals before de-duplication; 2 * K model evaluations per sample
    t_min : first timestep of the grid (sigma_min = sigma_{t_min}); see the module docstring
    trace : "hutchinson" (``n_probes`` Rademacher probes) or "exact" (d backward passes per evaluation)
    n_probes : Hutchinson probes per sample and evaluation, drawn afresh at each evaluation
    generator : for the probes (required for "hutchinson"): one torch generator, or a list of B, one per
        sample (results then do not depend on the batching)

    Returns
    -------
    LikelihoodResult with ``log_prob`` (B,) in nats.

    Steps: (i) grid t_0..t_K (:func:`ode_timesteps`); (ii) Heun in sigma on (1), the divergence integral
    (2) accumulated by the trapezoidal rule in log sigma; (iii) add the N(0, I) prior at t_K.
    """
    if trace not in ("hutchinson", "exact"):
        raise ValueError(f"trace={trace!r} must be 'hutchinson' or 'exact'")
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or len(x) == 0:
        raise ValueError(f"x must be a (B, ...) tensor with B >= 1, got {type(x).__name__} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    ac = _alphas_cumprod(alphas_cumprod)
    ts = ode_timesteps(ac, n_steps, t_min)
    sig = np.sqrt((1 - ac.numpy()[ts]) / ac.numpy()[ts])
    sqrt_abar = np.sqrt(ac.numpy()[ts])
    log_sig = np.log(sig)
    b, d = len(x), int(np.prod(x.shape[1:]))
    if trace == "hutchinson":
        if not isinstance(n_probes, (int, np.integer)) or n_probes < 1:
            raise ValueError(f"n_probes={n_probes!r} must be a positive integer")
        if generator is None:
            raise ValueError("generator=None: the Hutchinson trace estimator needs an explicit torch.Generator "
                             "(or a list of one per sample)")
        if isinstance(generator, (list, tuple)) and len(generator) != b:
            raise ValueError(f"{len(generator)} generators for a batch of {b} samples")
    y = x.detach().clone()
    delta = torch.zeros(b, dtype=torch.float64, device=x.device)

    def field(y_: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _drift_and_divergence(eps_fn, y_, int(ts[k]), float(sqrt_abar[k]), trace, n_probes, generator)

    f0, d0 = field(y, 0)
    for k in range(len(ts) - 1):
        h = float(sig[k + 1] - sig[k])
        f1, d1 = field(y + h * f0, k + 1)  # Euler predictor (a DDIM step), then the trapezoidal corrector
        y = y + 0.5 * h * (f0 + f1)
        delta += 0.5 * float(log_sig[k + 1] - log_sig[k]) * (sig[k] * d0 + sig[k + 1] * d1)
        if k < len(ts) - 2:
            f0, d0 = field(y, k + 1)
    abar_K = float(ac[ts[-1]])
    x_T = math.sqrt(abar_K) * y.double().reshape(b, -1)
    prior = -0.5 * (d * math.log(2 * math.pi) + (x_T**2).sum(1)) + 0.5 * d * math.log(abar_K)
    log_p = prior + delta
    return LikelihoodResult(log_p.cpu().numpy(), prior.cpu().numpy(), delta.cpu().numpy(), ts, float(sig[0]),
                            float(sig[-1]), trace, 0 if trace == "exact" else int(n_probes),
                            2 * (len(ts) - 1), d)


# --------------------------------------------------------------------------------------------------
# eps functions: a denoiser, its guided version, and optimal denoisers with known densities


def guided_eps_fn(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  labels: torch.Tensor, scale: float, alphas_cumprod: torch.Tensor | np.ndarray) -> EpsFn:
    """eps_guided = eps - scale * sqrt(1 - abar_t) * grad_x log p(y | x, t)  (guided-diffusion's score form).

    The gradient is taken with ``create_graph`` when x requires grad, so the guided field can itself be
    differentiated (its divergence enters (2)). ``labels`` (B,) are the classes of the batch's rows.
    """
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale={scale!r} must be a finite number >= 0")
    ac = _alphas_cumprod(alphas_cumprod)
    labels = torch.as_tensor(labels, dtype=torch.long)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = denoiser(x, t)
        if scale == 0.0:
            return eps
        if len(labels) != len(x):
            raise ValueError(f"{len(labels)} labels for a batch of {len(x)}")
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            logp = torch.log_softmax(classifier(x_in, t).float(), dim=-1)
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= logp.shape[-1]):  # (an IndexError)
                raise ValueError(f"labels must be classes 0..{logp.shape[-1] - 1} of the classifier, got "
                                 f"{int(labels.min())}..{int(labels.max())}")
            sel = logp[torch.arange(len(x), device=x.device), labels.to(x.device)].sum()
            (g,) = torch.autograd.grad(sel, x_in, create_graph=x.requires_grad)
        s = torch.sqrt(1 - ac[t.cpu()]).to(dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return eps - scale * s * g.to(eps.dtype)

    return fn


def gaussian_optimal_eps(mean: torch.Tensor | float, std: float, alphas_cumprod: torch.Tensor | np.ndarray) -> EpsFn:
    """The optimal eps of data N(mean, std^2 I).

    eps*(x, t) = sqrt(1 - abar) (x - sqrt(abar) mean) / (abar std^2 + 1 - abar).

    Its PF-ODE density at sigma_min is N(mean, (std^2 + sigma_min^2) I) exactly.
    """
    ac = _alphas_cumprod(alphas_cumprod)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ac[t.cpu()].to(dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)  # (on an accelerator: the host's was an error)
        return torch.sqrt(1 - a) * (x - torch.sqrt(a) * m) / (a * std**2 + 1 - a)

    return fn


def empirical_optimal_eps(data: torch.Tensor, alphas_cumprod: torch.Tensor | np.ndarray) -> EpsFn:
    """The optimal eps of the empirical distribution of ``data`` (N, ...): a fully memorizing denoiser.

    eps*(x, t) = (x - sqrt(abar) xhat) / sqrt(1 - abar), xhat = sum_i softmax_i(-|x - sqrt(abar) x_i|^2 /
    (2 (1 - abar))) x_i. Its marginal at sigma_t in data coordinates is the kernel density
    (1/N) sum_i N(x_i, sigma_t^2 I) (:class:`~side_extract.theory.divergence.EmpiricalOptimum`).
    """
    ac = _alphas_cumprod(alphas_cumprod)
    pts = data.reshape(len(data), -1)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ac[t.cpu()].to(dtype=x.dtype, device=x.device).reshape(-1, 1)
        xf = x.reshape(len(x), -1)
        p = pts.to(dtype=x.dtype, device=x.device)
        sq = (xf**2).sum(1, keepdim=True) - 2 * torch.sqrt(a) * xf @ p.T + a * (p**2).sum(1)[None, :]
        w = torch.softmax(-sq / (2 * (1 - a)), dim=1)
        xhat = w @ p
        return ((xf - torch.sqrt(a) * xhat) / torch.sqrt(1 - a)).reshape(x.shape)

    return fn


__all__ = [
    "EpsFn", "LikelihoodResult", "pf_ode_log_likelihood", "ode_timesteps", "sigmas", "guided_eps_fn",
    "gaussian_optimal_eps", "empirical_optimal_eps",
]
