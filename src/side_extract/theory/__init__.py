"""The paper's theory made executable: memorization divergence, PF-ODE likelihoods, numerical checks.

- :mod:`.divergence`: M(D; p, eps) = KL(q_eps || p) by Monte Carlo with intervals; Gaussian, Gaussian
  mixture and empirical-optimum (kernel density) models with closed forms;
- :mod:`.likelihood`: log p(x) of a diffusion model (or its classifier-guided version) by the
  probability-flow ODE with an exact or Hutchinson trace;
- :mod:`.measure`: M of a trained target, unconditional and guided, beside the empirical optimum;
- :mod:`.checks`: checks A-E of the theorem and its consequences (``side theory check``).

See docs/theory.md.
"""
from __future__ import annotations

from .checks import CHECKS, CheckResult, CheckRow, run_checks
from .divergence import (DivergenceEstimate, EmpiricalOptimum, Estimate, GaussianMixtureModel, GaussianModel,
                         divergence_gap, gaussian_cross_entropy, gaussian_divergence_single_point, kl_gaussians,
                         log_q_eps, memorization_divergence, sample_q_eps)
from .likelihood import (LikelihoodResult, empirical_optimal_eps, gaussian_optimal_eps, guided_eps_fn,
                         ode_timesteps, pf_ode_log_likelihood)
from .measure import MeasureResult, assign_classes, measure

__all__ = [
    "CHECKS", "CheckResult", "CheckRow", "run_checks",
    "DivergenceEstimate", "EmpiricalOptimum", "Estimate", "GaussianMixtureModel", "GaussianModel", "divergence_gap",
    "gaussian_cross_entropy", "gaussian_divergence_single_point", "kl_gaussians", "log_q_eps",
    "memorization_divergence", "sample_q_eps",
    "LikelihoodResult", "empirical_optimal_eps", "gaussian_optimal_eps", "guided_eps_fn", "ode_timesteps",
    "pf_ode_log_likelihood",
    "MeasureResult", "assign_classes", "measure",
]
