"""Classifier guidance for unconditional denoisers, in k-diffusion's shape: ``g(x, t, y)``.

A guidance object maps a batch ``x_t`` (B, C, H, W), a *training* timestep ``t`` and the batch's target
labels ``y`` (B,) to ``g = lambda * grad_x log p(y | x_t, t)`` (the shape of x), or to ``None`` where it does
not guide (scale 0, or t outside its range). The sampler (``sampling.guided_step``) applies g in
guided-diffusion's order:

- DDIM (``condition_score``): x0 from the *unguided* eps, clipped; eps recomputed from the clipped x0;
  eps' = eps - sqrt(1 - abar_t) * g; the guided x0 that follows from eps' is not clipped again.
- DDPM (``condition_mean``): the posterior mean from the clipped x0; mean' = mean + Sigma_t * g.

The classifier always receives the training timestep t; diffusers' respaced DDIM timesteps already are
training timesteps, so no remapping is needed (guided-diffusion's ``_WrappedModel`` does it by hand).
Guidance that returns ``None`` leaves the sampler on its unguided path, so scale 0 reproduces unguided
output bit for bit.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import config as cfg
from .models.target import predict_x0
from .surrogate import target_outputs


class Guidance(Protocol):
    """``g(x, t, y)``: x (B, C, H, W) float, t a 0-dim training timestep, y (B,) int output indices.

    Returns lambda * grad_x log p(y | x_t, t), shape of x, or None where the guidance is off. A guidance whose
    class sets ``uses_eps = True`` is called ``g(x, t, y, eps=eps)`` with the sampler's own eps(x_t, t), so that it
    need not run the denoiser again for it; one that sets ``uses_sampler = True`` gets ``sampler=sched`` too, the
    sampler's scheduler, whose step decides how far g moves the denoised estimate (memorization guidance's
    avoidance, ``sampling.guidance_moving_x0``).
    A label-free guidance (its class sets ``uses_ids = True``) is called ``g(x, t, None, ids=ids)`` with the
    batch's sample indices (B,), the keys of its per-sample randomness, and sampling with it needs no labels
    (memorization guidance).
    """

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None: ...


def _selected(logp: torch.Tensor, y: torch.Tensor, n_classes: int | None) -> torch.Tensor:
    """``logp[b, y_b]`` for each sample b; the classifier's outputs checked against the guidance's ``n_classes``
    and each label against the outputs (a label of -1 picked the last output without a word; 99, an IndexError)."""
    k = logp.shape[-1]
    if n_classes is not None and k != n_classes:
        raise ValueError(f"the guidance classifier has {k} outputs but the guidance names {n_classes} classes "
                         "(classes: the label value of each output, in order)")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"target labels must be output indices 0..{k - 1} of the classifier, got "
                         f"{int(y.min())}..{int(y.max())} (an output index, not a class value)")
    return logp[torch.arange(len(y), device=logp.device), y.to(logp.device)]


def log_prob_grad(
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    temperature: float = 1.0,
    n_classes: int | None = None,
) -> torch.Tensor:
    """grad_x sum_b log softmax(classifier(x, t) / T)[b, y_b], shape of x (``y``: output indices; ``n_classes``,
    where given: the outputs the classifier must have).

    The classifier must be in eval mode (a ``torch.nn.Module`` in training mode is refused): in training mode
    BatchNorm mixes the samples of a batch, so one sample's guidance would depend on its batch-mates.
    """
    if isinstance(classifier, torch.nn.Module) and classifier.training:
        raise ValueError("the guidance classifier is in training mode; call .eval() first (BatchNorm would "
                         "mix the samples of a batch)")
    x_in = x.detach().requires_grad_(True)
    tt = t.expand(len(x)) if t.ndim == 0 else t
    logits = classifier(x_in, tt.to(x.device)) / temperature
    selected = _selected(F.log_softmax(logits.float(), dim=-1), y, n_classes)
    (grad,) = torch.autograd.grad(selected.sum(), x_in)
    return grad


@dataclasses.dataclass(frozen=True, eq=False)
class ClassifierGuidance:
    """Guidance toward per-sample target classes by a classifier of (x_t, t).

    Parameters
    ----------
    classifier : module called as ``classifier(x, t) -> logits (B, K)``; put in eval mode here. A
        time-independent classifier ignores t (the Cond baseline).
    classes : (K,) int, the label value of each classifier output (cluster id, or training-set class)
    scale : lambda >= 0
    temperature : logits are divided by this before the softmax (1 = the classifier as trained)
    t_range : (lo, hi) fraction of the training timesteps over which to guide; guidance is off outside
    num_train_timesteps : the target's number of training timesteps (what ``t_range`` is a fraction of)
    background : label values (of ``classes``) that no generation is guided toward: the background class of
        memorization-aware surrogate labels, which the classifier tells apart so that guidance pulls away from it
    """

    classifier: torch.nn.Module
    classes: np.ndarray
    scale: float
    temperature: float = 1.0
    t_range: tuple[float, float] = (0.0, 1.0)
    num_train_timesteps: int = 1000
    background: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not callable(self.classifier):  # (found at the first sampling step)
            raise ValueError(f"classifier must be a module called as classifier(x, t), got "
                             f"{type(self.classifier).__name__}")
        for name, v in (("scale", self.scale), ("temperature", self.temperature)):  # (a str was numpy's TypeError)
            cfg.check_real(v, f"guidance {name}")
        if not np.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"guidance scale={self.scale} must be a finite number >= 0")
        if not np.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be a finite number > 0")
        if isinstance(self.background, (int, np.integer)):  # one label value (it was "'int' is not iterable")
            object.__setattr__(self, "background", (int(self.background),))
        lo, hi = cfg.check_pair(self.t_range, "t_range")
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"t_range={self.t_range} must satisfy 0 <= lo < hi <= 1")
        if len(self.classes) < 1:
            raise ValueError("classes=[] : a guidance classifier needs at least one class to guide toward")
        classes = np.asarray(self.classes)
        if classes.ndim != 1 or len(np.unique(classes)) != len(classes):  # (a repeated value credited every
            # generation of that label to one of its outputs; a nested list was "unhashable type: 'list'")
            raise ValueError(f"classes={classes.tolist()} must be distinct label values, one per classifier output")
        object.__setattr__(self, "classes", np.asarray(classes, dtype=np.int64))
        object.__setattr__(self, "background", tuple(int(v) for v in self.background))
        missing = sorted(set(self.background) - set(self.classes.tolist()))
        if missing:
            raise ValueError(f"background={missing} must be label values of the classifier's classes "
                             f"{self.classes.tolist()}")
        if len(self.target_outputs) < 1:
            raise ValueError(f"every class {self.classes.tolist()} is background: nothing to guide toward")
        if isinstance(self.classifier, torch.nn.Module):
            self.classifier.eval()

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def target_outputs(self) -> np.ndarray:
        """Output indices of the classes that generations may be guided toward (every class but background)."""
        return target_outputs(self.classes, self.background)

    def guides_at(self, t: torch.Tensor | int) -> bool:
        """Whether this guidance is on at training timestep ``t``."""
        lo, hi = self.t_range
        return self.scale > 0 and lo * self.num_train_timesteps <= float(t) <= hi * self.num_train_timesteps

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if not self.guides_at(t):
            return None
        return self.scale * log_prob_grad(self.classifier, x, t, y, self.temperature, len(self.classes))


@dataclasses.dataclass(frozen=True, eq=False)
class DenoisedGuidance(ClassifierGuidance):
    """Guidance through the denoised estimate (beyond the paper): a *clean* classifier applied to
    x0_hat(x_t, t) = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t), the gradient taken through the
    denoiser: g = lambda * grad_x log p(y | x0_hat(x_t, t)). The classifier never sees noise (it is trained on
    clean synthetic images), at the cost of a backward pass through the target at every step. x0_hat is not
    clipped (a clip would zero the gradient wherever it saturates).

    ``denoiser``: the target (``eps(x, t)`` with its ``scheduler``), whose number of training timesteps it takes.
    """

    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.denoiser is None or not hasattr(self.denoiser, "scheduler"):
            raise ValueError("DenoisedGuidance needs the target denoiser (eps(x, t) with its scheduler)")
        own = self.denoiser.scheduler.config.num_train_timesteps
        if self.num_train_timesteps != own:  # its denoiser's T (the default 1000 guided only t <= 1000 of 2000)
            if self.num_train_timesteps != ClassifierGuidance.num_train_timesteps:
                raise ValueError(f"num_train_timesteps={self.num_train_timesteps}, but the denoiser's scheduler has "
                                 f"{own}: leave it out (DenoisedGuidance takes its denoiser's)")
            object.__setattr__(self, "num_train_timesteps", own)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if not self.guides_at(t):
            return None
        if isinstance(self.classifier, torch.nn.Module) and self.classifier.training:
            raise ValueError("the guidance classifier is in training mode; call .eval() first")
        x_in = x.detach().requires_grad_(True)
        x0 = predict_x0(self.denoiser.scheduler, x_in, int(t), self.denoiser(x_in, t))
        zeros = torch.zeros(len(x), dtype=torch.long, device=x.device)
        logp = F.log_softmax(self.classifier(x0, zeros).float() / self.temperature, dim=-1)
        selected = _selected(logp, y, len(self.classes))
        (grad,) = torch.autograd.grad(selected.sum(), x_in)
        return self.scale * grad
