"""Per-sample memorization scores of the synthetic set (beyond the paper), for memorization-aware surrogate labels.

A synthetic sample that the target has memorized is a near copy of a training image, and a diffusion model
denoises its training images better than other images: the denoising error at a moderate noise level is the
loss-threshold / "t-error" membership signal (Matsumoto et al. 2023, "Membership Inference Attacks against
Diffusion Models"; Duan et al. 2023, SecMI). Here, for a synthetic image x_0 and t = round(t_fraction * T):

    score(x_0) = mean over ``draws`` noise draws z of  mean_pixels (clip(x0_hat(x_t, t)) - x_0)^2,
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) z,   x0_hat = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t)

Lower = more likely memorized. The noise of sample i is drawn from its own generator (seed, i, stream
:data:`MEMORIZATION_STREAM`), so a score does not depend on the batch it was computed in or on the other
samples.

On the digits targets of ``side bench fair`` (16x16, 300 images, 1,000 synthetic samples at t = 0.2 T) the score
separates synthetic samples at the mid similarity band of a training image from the rest with ROC AUC 0.79;
at 0.5 T and above it carries no signal (AUC 0.53 / 0.41;
``benchmarks/results/experiments/memorization-auc-16px-n300.md``).
"""
from __future__ import annotations

import numpy as np
import torch

from .models.target import Denoiser, predict_x0
from .sampling import sample_generators

MEMORIZATION_STREAM = 2  # noise of the memorization scores (the synthetic set: 0, the extraction: 1)


def denoising_error(denoiser: Denoiser, x0: torch.Tensor, t_fraction: float = 0.2, draws: int = 4, seed: int = 0,
                    *, batch_size: int = 256, device: str | torch.device = "cpu") -> np.ndarray:
    """score (n,) float64 of images ``x0`` (n, C, H, W) in [-1, 1]; see the module docstring."""
    if not 0.0 < t_fraction < 1.0:
        raise ValueError(f"t_fraction={t_fraction} must lie strictly between 0 and 1 (a fraction of the training timesteps)")
    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1")
    if x0.ndim != 4:
        raise ValueError(f"images must be (n, C, H, W), got shape {tuple(x0.shape)}")
    n_t = denoiser.scheduler.config.num_train_timesteps
    t = min(n_t - 1, max(1, round(t_fraction * n_t)))
    out = np.empty(len(x0), dtype=np.float64)
    for b0 in range(0, len(x0), batch_size):
        xb = x0[b0:b0 + batch_size].to(torch.float32)
        gens = sample_generators(seed, range(b0, b0 + len(xb)), stream=MEMORIZATION_STREAM)
        z = torch.stack([torch.randn((draws, *xb.shape[1:]), generator=g) for g in gens], 1)  # (draws, B, C, H, W)
        err = torch.zeros(len(xb), dtype=torch.float64)
        with torch.no_grad():
            for d in range(draws):
                err += reconstruction_error(denoiser, xb.to(device), t, z[d].to(device)).cpu().double()
        out[b0:b0 + len(xb)] = (err / draws).numpy()
    return out


def reconstruction_error(denoiser: Denoiser, x0: torch.Tensor, t: int, z: torch.Tensor,
                         clip_range: float | None = 1.0) -> torch.Tensor:
    """(B,) mean_pixels (x0_hat(x_t, t) - x0)^2 with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z: one noise draw of
    the score in the module docstring (x0_hat clamped to ``clip_range``; None leaves it unclamped). Differentiable
    in ``x0`` when called with gradients enabled (memorization guidance,
    ``benchmarks/experiments/memorization_guidance.py``)."""
    sched = denoiser.scheduler
    tt = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
    xt = sched.add_noise(x0, z, tt)
    x0_hat = predict_x0(sched, xt, t, denoiser(xt, tt).to(torch.float32), clip_range)
    return (x0_hat - x0).pow(2).flatten(1).mean(1)


def candidate_count(n: int, fraction: float) -> int:
    """How many of ``n`` samples :func:`memorization_candidates` keeps: ``fraction`` of them, at least 2."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"memorized_fraction={fraction} must lie in (0, 1]")
    return min(n, max(2, int(round(fraction * n))))


def memorization_candidates(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Sorted indices of the ``fraction`` of samples with the lowest scores (at least 2; ties broken by index)."""
    scores = np.asarray(scores, dtype=np.float64)
    k = candidate_count(len(scores), fraction)
    if not np.isfinite(scores).all():
        raise ValueError("memorization scores must be finite")
    return np.sort(np.argsort(scores, kind="stable")[:k])
