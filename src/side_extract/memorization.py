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

The score is differentiable, and :class:`MemorizationGuidance` steers sampling toward low score: the label-free
extraction method ``memguide`` (beyond the paper; no synthetic set, no labels, no training data).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch
from diffusers import SchedulerMixin

from . import config as cfg
from .data import check_float_images, check_size
from .models.target import Denoiser, add_noise, predict_x0
from .sampling import MEMGUIDE_STREAM, MEMORIZATION_STREAM, guidance_moving_x0, sample_generators


def denoising_error(denoiser: Denoiser, x0: torch.Tensor, t_fraction: float = 0.2, draws: int = 4, seed: int = 0,
                    *, batch_size: int = 256, device: str | torch.device = "cpu") -> np.ndarray:
    """score (n,) float64 of images ``x0`` (n, C, H, W) in [-1, 1]; see the module docstring."""
    cfg.check_real(t_fraction, "t_fraction")  # (a str was a comparison's TypeError; draws=2.5 torch's; seed=1.5
    cfg.check_int(draws, "draws", 1)  # was taken as 1, and -1 was numpy's "expected non-negative integer")
    cfg.check_int(seed, "seed")
    if not 0.0 < t_fraction < 1.0:
        raise ValueError(f"t_fraction={t_fraction} must lie strictly between 0 and 1 (a fraction of the training timesteps)")
    check_size(batch_size, "batch_size", "number of images per batch")  # (-1 returned np.empty's memory as scores)
    check_float_images(x0, "denoising_error x0", denoiser.sample_shape)
    t = timestep(t_fraction, denoiser.scheduler.config.num_train_timesteps)
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
    in ``x0`` when called with gradients enabled (:class:`MemorizationGuidance`)."""
    sched = denoiser.scheduler
    tt = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
    xt = add_noise(sched, x0, z, tt)
    x0_hat = predict_x0(sched, xt, t, denoiser(xt, tt).to(torch.float32), clip_range)
    return (x0_hat - x0).pow(2).flatten(1).mean(1)


def timestep(fraction: float, num_train_timesteps: int) -> int:
    """round(fraction * T), kept within 1 .. T - 1."""
    return min(num_train_timesteps - 1, max(1, round(fraction * num_train_timesteps)))


@dataclasses.dataclass(frozen=True, eq=False)
class MemorizationGuidance:
    """Memorization guidance (beyond the paper): plain sampling steered toward images the target reproduces well.

    At every reverse step with t <= ``t_hi`` * T, for each sample b of the batch:

    1. x0_hat = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t)  (the current denoised estimate, unclipped);
    2. s_b = :func:`reconstruction_error` of x0_hat at t_m = round(``t_m`` * T) with one probe noise z_b
       (unclamped): how well the target re-denoises its own estimate, the memorization score of the module
       docstring with one draw;
    3. g = ``scale`` * grad_{x_t} -log s_b, the gradient through both denoiser calls.

    The sampler applies g like classifier guidance (``sampling.guided_step``: guided-diffusion's order), so
    ``scale`` 0 (or t above ``t_hi`` T) reproduces plain sampling bit for bit. The probe noise z_b is drawn
    from (``seed``, generation index, t) in its own stream (:data:`MEMGUIDE_STREAM`): a generation does not
    depend on its batch. Cost: two extra denoiser passes and their backward pass on each guided step.

    Being label-free (``uses_ids``), the guidance is called as ``g(x_t, t, None, ids=ids)`` with the batch's
    generation indices, which key its probe noise. t_hi 0.2 and t_m 0.1 were chosen on the fair protocol's validation replicate 1 at 300
    images (``benchmarks/results/experiments/memorization-guidance-16px-n300.md``); ``side bench fair`` chose
    lambda 30 there and 100 at 1,000 images (``benchmarks/results/fair16/memguide-n*``; ``extract.memguide_scale``
    defaults to 100, see ``config.ExtractConfig``).

    **Avoidance** (``avoid`` > 0; label-free, beyond the paper). Memorization guidance piles its copies onto the
    images it reaches most easily. With a ``memory`` of earlier generations (:meth:`remembering`; the extraction
    stage runs in rounds and gives each round the earlier rounds' images), every step with
    ``avoid_window[0]`` T <= t <= ``avoid_window[1]`` T adds :meth:`repulsion`, which pushes each clipped denoised
    estimate away from the memory images within about ``avoid_h`` (pixel RMS in [0, 1]) of it, so that the memorized
    image a trajectory settles on is less often one already generated. h 0.05 and the window 0.2-0.6 T (the
    defaults), strength 1 and 4 rounds were chosen on validation seeds 1-2 of the fair protocol's 300-image 16x16
    target (``benchmarks/experiments/avoidance.py``, ``benchmarks/results/experiments/avoidance-16px-n300.md``);
    a wider kernel, or avoidance where memorization guidance acts, pushes generations off memorized images.
    The push is converted for the sampler's scheduler (``sampling.guidance_moving_x0``), so that under DDPM too each
    step's denoised estimate moves by Delta (before, DDIM's conversion moved it by 0.26-0.55 of Delta at 10 DDPM
    steps); the settings were chosen under DDIM.

    Parameters
    ----------
    denoiser : the target (``eps(x, t)`` with its ``scheduler``)
    scale : lambda >= 0
    t_hi : guide at training timesteps t <= t_hi * T; in (0, 1]
    t_m : the score's reconstruction time, a fraction of T in (0, 1)
    seed : seed of the probe noise (the extraction seed)
    avoid : avoidance strength eta >= 0 (0: off)
    avoid_h : the kernel width, a pixel RMS distance in (0, 1)
    avoid_window : (t_lo, t_hi) fractions of T where avoidance acts
    memory : (M, C, H, W) images in [-1, 1] to avoid (None: nothing yet)
    """

    denoiser: Denoiser
    scale: float
    t_hi: float = 0.2
    t_m: float = 0.1
    seed: int = 0
    avoid: float = 0.0
    avoid_h: float = 0.05
    avoid_window: tuple[float, float] = (0.2, 0.6)
    memory: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("scale", "t_hi", "t_m", "avoid", "avoid_h"):  # (a str or None was numpy's TypeError)
            cfg.check_real(getattr(self, name), f"memguide {name}")
        cfg.check_int(self.seed, "memguide seed")  # (-1 failed at the first guided step; 1.5 was taken as 1)
        if not np.isfinite(self.avoid) or self.avoid < 0:
            raise ValueError(f"memguide avoid={self.avoid} must be a finite number >= 0 (0: no avoidance)")
        if not 0.0 < self.avoid_h < 1.0:
            raise ValueError(f"memguide avoid_h={self.avoid_h} must be a pixel RMS distance in (0, 1)")
        lo, hi = cfg.check_pair(self.avoid_window, "memguide avoid_window")
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"memguide avoid_window={list(self.avoid_window)} must satisfy 0 <= t_lo < t_hi <= 1 "
                             "(fractions of the training timesteps)")
        if not np.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"memguide scale={self.scale} must be a finite number >= 0")
        if not 0.0 < self.t_hi <= 1.0:
            raise ValueError(f"memguide t_hi={self.t_hi} must lie in (0, 1] (a fraction of the training timesteps)")
        if not 0.0 < self.t_m < 1.0:
            raise ValueError(f"memguide t_m={self.t_m} must lie strictly between 0 and 1 (a fraction of the "
                             "training timesteps)")
        if not hasattr(self.denoiser, "scheduler"):
            raise ValueError("MemorizationGuidance needs the target denoiser (eps(x, t) with its scheduler)")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.denoiser.scheduler.config.num_train_timesteps)

    def guides_at(self, t: torch.Tensor | int) -> bool:
        return self.scale > 0 and float(t) <= self.t_hi * self.num_train_timesteps

    def probe(self, indices: torch.Tensor, t: int, shape: tuple[int, ...]) -> torch.Tensor:
        """z (B, *shape): generation ``indices[b]``'s probe noise at step ``t``."""
        gens = sample_generators(self.seed, indices.tolist(), stream=MEMGUIDE_STREAM, step=t)
        return torch.stack([torch.randn(shape, generator=g) for g in gens])

    def remembering(self, images: torch.Tensor) -> MemorizationGuidance:
        """This guidance, avoiding ``images`` (M, C, H, W) in [-1, 1]: the earlier rounds' generations."""
        # (0-255 pixels made every kernel exp(-huge) = 0: avoidance did nothing, without a word; another shape
        # failed at the avoidance window's first step, naming nothing)
        check_float_images(images, "memory images (the earlier rounds' generations)", self.denoiser.sample_shape)
        return dataclasses.replace(self, memory=images.to(torch.float32))

    def avoids_at(self, t: torch.Tensor | int) -> bool:
        lo, hi = self.avoid_window
        return (self.avoid > 0 and self.memory is not None and len(self.memory) > 0
                and lo * self.num_train_timesteps <= float(t) <= hi * self.num_train_timesteps)

    def repulsion(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None,
                  sampler: SchedulerMixin | None = None) -> torch.Tensor:
        """The avoidance term: the guidance that moves each denoised estimate x0_i (clipped to [-1, 1], the memory
        images' range) by Delta_i = avoid * sum_j k_ij (x0_i - m_j), k_ij = exp(-d_ij^2 / (2 avoid_h^2)), d_ij the
        pixel RMS distance of x0_i and memory image m_j in [0, 1] units: g = ``sampling.guidance_moving_x0`` of
        Delta for the sampler's scheduler ``sampler`` (DDIM: Delta sqrt(abar_t) / (1 - abar_t); DDPM: Delta
        sqrt(abar_prev) / (1 - abar_prev); None: DDIM's). ``eps``: the sampler's eps(x_t, t), when it has one
        (else the denoiser runs for it)."""
        sched, ti = self.denoiser.scheduler, int(t)
        memory = self.memory.to(device=x.device, dtype=x.dtype)
        with torch.no_grad():
            if eps is None:
                eps = self.denoiser(x, t.expand(len(x)) if t.ndim == 0 else t)
            x0 = predict_x0(sched, x, ti, eps.detach().to(x.dtype), 1.0)
            delta = torch.zeros_like(x0)
            chunk = max(1, 2 ** 24 // x0.numel())  # memory images per pass: (B, chunk, C, H, W) <= 16M values
            for j0 in range(0, len(memory), chunk):
                diff = x0[:, None] - memory[None, j0:j0 + chunk]
                k = torch.exp(-diff.pow(2).flatten(2).mean(2) / 4 / (2 * self.avoid_h ** 2))
                delta += (k[..., None, None, None] * diff).sum(1)
        if sampler is None:  # DDIM's conversion with the training schedule (a DDPMScheduler there is no sampler)
            return guidance_moving_x0(sched, ti, self.avoid * delta, ddpm=False)
        return guidance_moving_x0(sampler, ti, self.avoid * delta)

    uses_eps: ClassVar[bool] = True  # the sampler passes its eps (guidance.Guidance): avoidance needs no extra pass
    uses_sampler: ClassVar[bool] = True  # and its scheduler, whose step sets how far the push moves x0
    uses_ids: ClassVar[bool] = True  # label-free: the sampler passes the generation indices, not labels

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *,
                 ids: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                 sampler: SchedulerMixin | None = None) -> torch.Tensor | None:
        """The guidance for the batch ``x`` at ``t``: ``ids`` (B,) are its generation indices (``y`` is not used:
        no labels); ``eps`` and ``sampler``: the sampler's eps(x_t, t) and scheduler (:meth:`repulsion`)."""
        if ids is None or len(ids) != len(x):
            raise ValueError(f"memorization guidance needs the batch's {len(x)} generation indices (ids=), got "
                             f"{None if ids is None else len(ids)}")
        g = self.memorization_term(x, t, ids)
        if not self.avoids_at(t):
            return g
        push = self.repulsion(x, t, eps, sampler)
        return push if g is None else g + push

    def memorization_term(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """``scale`` * grad_{x_t} -log s (steps 1-3 above), or None above ``t_hi`` T."""
        if not self.guides_at(t):
            return None
        sched = self.denoiser.scheduler
        x_in = x.detach().requires_grad_(True)
        tt = t.expand(len(x)) if t.ndim == 0 else t
        x0 = predict_x0(sched, x_in, int(t), self.denoiser(x_in, tt).to(x.dtype))
        z = self.probe(ids, int(t), tuple(x.shape[1:])).to(device=x.device, dtype=x.dtype)
        s = reconstruction_error(self.denoiser, x0, timestep(self.t_m, self.num_train_timesteps), z, clip_range=None)
        (grad,) = torch.autograd.grad((-s.clamp_min(1e-8).log()).sum(), x_in)
        return self.scale * grad


def candidate_count(n: int, fraction: float) -> int:
    """How many of ``n`` samples :func:`memorization_candidates` keeps: ``fraction`` of them, at least 2."""
    cfg.check_real(fraction, "memorized_fraction")  # (True was taken as 1.0; a string met a comparison's TypeError)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"memorized_fraction={fraction} must lie in (0, 1]")
    return min(n, max(2, int(round(fraction * n))))


def memorization_candidates(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Sorted indices of the ``fraction`` of samples with the lowest scores (at least 2; ties broken by index)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:  # (an (n, m) array gave (n, k) column indices)
        raise ValueError(f"memorization scores must be one per sample, shape (n,); got shape {scores.shape}")
    k = candidate_count(len(scores), fraction)
    if not np.isfinite(scores).all():
        raise ValueError("memorization scores must be finite")
    return np.sort(np.argsort(scores, kind="stable")[:k])
