"""Classifier guidance for unconditional denoisers (guided-diffusion's formulas).

With a classifier p(y | x_t, t) and scale lambda, the guidance term is g = lambda * grad_x log p(y | x_t, t):

- DDIM / score form (guided-diffusion ``condition_score``): eps' = eps - sqrt(1 - abar_t) * g
- DDPM / mean form (guided-diffusion ``condition_mean``):  mean' = mean + Sigma_t * g

The classifier always receives the *training* timestep t; diffusers' respaced DDIM timesteps already are
training timesteps, so no remapping is needed (guided-diffusion's ``_WrappedModel`` does it by hand).
Scale 0 returns no guidance at all, so the sampler reproduces unguided output bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

GuidanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided_eps(eps: torch.Tensor, g: torch.Tensor, alpha_bar_t: torch.Tensor | float) -> torch.Tensor:
    """eps' = eps - sqrt(1 - abar_t) * g."""
    abar = torch.as_tensor(alpha_bar_t, dtype=eps.dtype, device=eps.device)
    return eps - torch.sqrt(1 - abar) * g


def guided_mean(mean_or_sample: torch.Tensor, g: torch.Tensor, variance: torch.Tensor | float) -> torch.Tensor:
    """mean' = mean + Sigma_t * g (adding it to the sampled x_{t-1} shifts its mean by exactly that)."""
    return mean_or_sample + torch.as_tensor(variance, dtype=g.dtype, device=g.device) * g


def log_prob_grad(
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """grad_x sum_b log softmax(classifier(x, t) / T)[b, y_b], shape of x.

    Each sample's gradient depends only on its own log-probability (the classifier is in eval mode, so
    BatchNorm does not mix samples), which keeps results independent of the batch composition.
    """
    x_in = x.detach().requires_grad_(True)
    tt = t.expand(len(x)) if t.ndim == 0 else t
    logits = classifier(x_in, tt.to(x.device)) / temperature
    logp = F.log_softmax(logits.float(), dim=-1)
    selected = logp[torch.arange(len(x), device=x.device), y.to(x.device)]
    (grad,) = torch.autograd.grad(selected.sum(), x_in)
    return grad


class ClassifierGuidance:
    """Guidance toward per-sample target labels by a classifier of (x_t, t).

    Parameters
    ----------
    classifier : module called as ``classifier(x, t) -> logits (B, K)``; a time-independent classifier
        is wrapped to ignore t (the Cond baseline)
    scale : lambda >= 0
    labels : (N,) int, the target label of each global sample index (the run's index space)
    temperature : logits are divided by this before the softmax (1 = the classifier as trained)
    t_range : (lo, hi) fraction of the training timesteps over which to guide; guidance is off outside
    """

    def __init__(
        self,
        classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        scale: float,
        labels: np.ndarray,
        num_train_timesteps: int,
        temperature: float = 1.0,
        t_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if scale < 0:
            raise ValueError(f"guidance scale={scale} must be >= 0")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        lo, hi = t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"t_range={t_range} must satisfy 0 <= lo < hi <= 1")
        self.classifier = classifier
        self.scale = float(scale)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.temperature = float(temperature)
        self.t_lo, self.t_hi = lo * num_train_timesteps, hi * num_train_timesteps

    def for_indices(self, indices: np.ndarray) -> GuidanceFn | None:
        """The guidance function of a batch holding global samples ``indices`` (None when scale is 0)."""
        if self.scale == 0.0:
            return None
        y = torch.from_numpy(self.labels[np.asarray(indices)])

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not self.t_lo <= float(t) <= self.t_hi:
                return torch.zeros_like(x)
            return self.scale * log_prob_grad(self.classifier, x, t, y, self.temperature)

        return fn
