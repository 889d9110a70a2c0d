"""Sampling: one loop for diffusers' DDPM and DDIM schedulers, per-sample seeds, guidance per batch.

Sample ``i`` of a run with seed ``s`` draws all of its noise (the initial x_T and, for DDPM or DDIM with
eta > 0, every step's noise) from its own generator seeded by ``sample_seed(s, i, stream)``; so an image does
not depend on which shard it lands in or on how many processes share the work. The stream keeps stages
apart: the synthetic set draws from :data:`SYNTHETIC_STREAM` and the extraction from
:data:`EXTRACTION_STREAM`, so a run whose ``sample.seed`` equals its ``extract.seed`` does not generate its
synthetic set a second time as UnCond's output (nor start SIDE's generation ``i`` from synthetic sample
``i``'s noise).

Guidance (``guidance.py``) is an object called as ``g(x_t, t, y)`` with the batch's target labels;
:func:`guided_step` applies it in guided-diffusion's order (see there), for DDIM and DDPM alike.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from . import config as cfg
from .data import ImageSet, integer_labels, to_uint8
from .distributed import check_device
from .guidance import Guidance
from .models.target import Denoiser, predict_x0, reproducible_gradients, sampler_config
from .runs import MODEL_INPUT, Progress, RunDir, shard_stage, stage_fingerprint

log = logging.getLogger(__name__)


# Every noise stream of a run, in one place (a new one takes the next number; two uses never share one):
SYNTHETIC_STREAM = 0  # the synthetic set (and other noise keyed by image index, e.g. noised features)
EXTRACTION_STREAM = 1  # the generations of every extraction method
MEMORIZATION_STREAM = 2  # the probe noise of the synthetic set's memorization scores (memorization.py)
MEMGUIDE_STREAM = 3  # the probe noise of memorization guidance, keyed by (generation, step) (memorization.py)
DIVERGED_ABOVE = 1e6  # |x_t| no sane reverse process reaches (x_t ~ N(0, 1) plus a clipped-x0 mean)


class SamplingDiverged(ValueError):
    """x_t became non-finite or absurdly large during sampling (usually: the guidance scale is too large)."""


def sample_seed(seed: int, index: int, stream: int = SYNTHETIC_STREAM, step: int | None = None) -> int:
    """A 64-bit seed for global sample ``index`` of noise stream ``stream`` of a run seeded ``seed`` (numpy
    SeedSequence of (seed, index) for stream 0, as before streams existed, and (seed, index, stream) otherwise).
    ``step``: a fresh seed per reverse step t for noise drawn at each step by a stateless caller (memorization
    guidance's probe): (seed, index, step[, stream])."""
    if stream < 0:
        raise ValueError(f"stream={stream} must be >= 0")
    entropy = [int(seed), int(index)] + ([int(step)] if step is not None else []) + ([int(stream)] if stream else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def sample_generators(seed: int, indices: np.ndarray | list[int], stream: int = SYNTHETIC_STREAM,
                      step: int | None = None) -> list[torch.Generator]:
    """One CPU generator per index, seeded from (seed, index, stream, step) alone. CPU on every device: CUDA's
    generator draws other numbers from the same seed, so noise drawn here and moved to the device is the same
    on a GPU as on this machine."""
    return [torch.Generator("cpu").manual_seed(sample_seed(seed, int(i), stream, step)) for i in indices]


def inference_scheduler(train_scheduler: SchedulerMixin, kind: cfg.SchedulerKind, steps: int) -> SchedulerMixin:
    """A fresh DDIM or DDPM scheduler from the target's training scheduler config, set to ``steps`` steps: an
    epsilon model's, since a denoiser returns epsilon whatever its model predicts (``models.target.as_epsilon``)."""
    if kind == "ddim":
        try:
            sched = DDIMScheduler.from_config(sampler_config(train_scheduler), prediction_type="epsilon")
        except NotImplementedError:  # (diffusers' DDPM takes sigmoid and laplace, its DDIM not: a traceback)
            raise ValueError(f"the model's beta_schedule={train_scheduler.config.beta_schedule!r} has no DDIM "
                             "sampler in diffusers: sample with scheduler ddpm") from None
        if sched.config.thresholding:
            raise ValueError("the model's scheduler sets thresholding (dynamic thresholding of x0): the DDIM sampler "
                             "here clips x0 to clip_sample_range as guided-diffusion does; save the scheduler with "
                             "thresholding false, or sample with scheduler ddpm")
    elif kind == "ddpm":
        sched = DDPMScheduler.from_config(sampler_config(train_scheduler), prediction_type="epsilon")
        if sched.config.variance_type in ("learned", "learned_range"):  # (diffusers' step failed with a TypeError)
            raise ValueError(f"the model's scheduler has variance_type={sched.config.variance_type!r}: the DDPM "
                             "sampler here reads only the model's eps, not a learned variance; sample with scheduler "
                             "ddim")
    else:
        raise ValueError(f"scheduler={kind!r} must be 'ddim' or 'ddpm'")
    check_steps(steps, sched)
    sched.set_timesteps(steps)
    first, n_train = int(sched.timesteps.max()), sched.config.num_train_timesteps
    if first >= n_train:  # diffusers' leading spacing with steps_offset (huggingface/diffusers#10003)
        raise ValueError(f"steps={steps} with the model's steps_offset={sched.config.steps_offset} and "
                         f"timestep_spacing={sched.config.timestep_spacing!r} starts at timestep {first}, past its "
                         f"{n_train} training timesteps (0..{n_train - 1}); use fewer steps, or save the scheduler "
                         "with timestep_spacing 'trailing' or 'linspace'")
    ac = sched.alphas_cumprod
    if float(ac[first]) > 0.5 >= float(ac[n_train - 1]):  # (leading or linspace spacing's one step is timestep 0)
        raise ValueError(f"steps={steps} with the model's timestep_spacing={sched.config.timestep_spacing!r} "
                         f"starts at timestep {first}, where an image is more signal than noise (alpha_bar "
                         f"{float(ac[first]):.3g} > 0.5; {float(ac[n_train - 1]):.3g} at the model's last timestep): "
                         "the starting noise would be taken for a nearly clean image and returned as one; use more "
                         "steps, or save the scheduler with timestep_spacing 'trailing'")
    return sched


def check_sampler(train_scheduler: SchedulerMixin, kind: cfg.SchedulerKind, steps: int, name: str,
                  guided: bool = False) -> None:
    """What the sampler (``kind``, ``steps``; ``name``: the setting) would refuse at its first step, checked before
    any stage runs: the number of steps, a DDIM sampler's thresholding, a DDPM sampler's learned variance, and, where
    it is ``guided``, a DDPM variance other than guided DDPM's (:func:`ddpm_variance`)."""
    check_steps(steps, train_scheduler, f"{name}.steps")
    try:
        sched = inference_scheduler(train_scheduler, kind, steps)
    except ValueError as e:
        raise ValueError(f"{name}.scheduler={kind}: {e}") from None
    if guided and isinstance(sched, DDPMScheduler):
        _guided_ddpm_variance_type(sched, f"{name}.scheduler=ddpm: ")


def _guided_ddpm_variance_type(sched: DDPMScheduler, where: str = "") -> None:
    if sched.config.variance_type not in ("fixed_small", None):
        raise ValueError(f"{where}guided DDPM needs variance_type='fixed_small', the model has "
                         f"{sched.config.variance_type!r}")


def check_steps(steps: int, scheduler: SchedulerMixin, name: str = "steps") -> None:
    """Refuse a number of sampling steps outside 1..the model's training timesteps (``name``: the setting)."""
    n_train = scheduler.config.num_train_timesteps
    if not 1 <= steps <= n_train:
        raise ValueError(f"{name}={steps} must be between 1 and the model's {n_train} training timesteps")


def ddpm_variance(sched: DDPMScheduler, t: int) -> torch.Tensor:
    """Sigma_t of DDPM's reverse step (``fixed_small``: beta-tilde), also under respaced timesteps."""
    _guided_ddpm_variance_type(sched)
    ac = sched.alphas_cumprod
    prev_t = int(sched.previous_timestep(t))
    abar_t = ac[t]
    abar_prev = ac[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    beta_t = 1 - abar_t / abar_prev
    return torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t, min=1e-20)


def guidance_moving_x0(sched: SchedulerMixin, t: int, shift: torch.Tensor, *, ddpm: bool | None = None) -> torch.Tensor:
    """The guidance g that moves the denoised estimate x0 of the step at ``t`` by ``shift`` (shape of x), for the
    sampler's scheduler ``sched`` (:func:`guided_step`'s order; ``ddpm``: whether it steps as DDPM, by default
    whether it is a DDPMScheduler, set to its steps; otherwise DDIM's step with its ``alphas_cumprod``).

    DDIM: eps' = eps - sqrt(1 - abar_t) g moves x0 by (1 - abar_t) g / sqrt(abar_t), so g = shift sqrt(abar_t) /
    (1 - abar_t). DDPM: g adds Sigma_t g to the posterior mean sqrt(abar_prev) beta_t / (1 - abar_t) x0 + ..., and
    Sigma_t = (1 - abar_prev) beta_t / (1 - abar_t), so the mean moves as if x0 moved by shift where g = shift
    sqrt(abar_prev) / (1 - abar_prev), abar_prev at the schedule's previous timestep; at its last step Sigma_t = 0
    and no guidance moves the sample (g = 0)."""
    if isinstance(sched, DDPMScheduler) if ddpm is None else ddpm:
        prev = int(sched.previous_timestep(t))
        if prev < 0:
            return torch.zeros_like(shift)
        abar_prev = sched.alphas_cumprod[prev].to(device=shift.device, dtype=shift.dtype)
        return shift * abar_prev.sqrt() / (1 - abar_prev)
    abar = sched.alphas_cumprod[int(t)].to(device=shift.device, dtype=shift.dtype)
    return shift * abar.sqrt() / (1 - abar)


def ddim_previous(sched: DDIMScheduler, t: int) -> int:
    """The timestep a DDIM step from ``t`` lands on: the next of ``sched.timesteps``, -1 after the last (then
    abar_prev is the scheduler's ``final_alpha_cumprod``). diffusers' own ``DDIMScheduler.step`` takes
    t - T // steps instead, which is that timestep only when the schedule's stride is T // steps throughout
    (``leading`` spacing, or ``trailing`` where the steps divide T); under ``linspace`` spacing it stepped to
    timesteps the schedule never visits and the next step read x at the wrong noise level."""
    ts = sched.timesteps
    at = torch.nonzero(ts == int(t)).flatten()
    if len(at) != 1:
        raise ValueError(f"t={int(t)} is not one of the scheduler's {len(ts)} timesteps")
    i = int(at[0]) + 1
    return int(ts[i]) if i < len(ts) else -1


def ddim_step(sched: DDIMScheduler, x: torch.Tensor, t: int, eps: torch.Tensor, generators: list[torch.Generator],
              *, eta: float, clip_x0: bool, eps_from_x0: bool) -> torch.Tensor:
    """DDIM's update (Song et al. 2021, eq. 12) from x_t to the next scheduled timestep (:func:`ddim_previous`):
    x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clamped to the scheduler's range when ``clip_x0``, eps
    recomputed from that x0 when ``eps_from_x0``, then x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev -
    sigma^2) eps + sigma z with sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) and z
    drawn from ``generators`` (one per sample). diffusers' ``DDIMScheduler.step``'s arithmetic in its order, so on
    a schedule it steps right the images are its images bit for bit (tests/test_sampling.py); where float32 rounds
    the root's non-negative term below 0 (eta 1, abar_t near 0), the root is 0, not diffusers' NaN."""
    prev = ddim_previous(sched, t)
    abar_t = sched.alphas_cumprod[int(t)]
    abar_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
    beta_t = 1 - abar_t
    x0 = (x - beta_t ** (0.5) * eps) / abar_t ** (0.5)
    if clip_x0:
        x0 = x0.clamp(-sched.config.clip_sample_range, sched.config.clip_sample_range)
    std = eta * (((1 - abar_prev) / beta_t) * (1 - abar_t / abar_prev)) ** (0.5)
    if eps_from_x0:
        eps = (x - abar_t ** (0.5) * x0) / beta_t ** (0.5)
    # the term under the root is abar_t (1 - abar_prev)^2 / (abar_prev (1 - abar_t)) >= 0, but at eta 1 with abar_t
    # near 0 (a cosine schedule's t = 999) float32 rounds it to -6e-8, and its root was NaN: sampling "diverged"
    x_prev = abar_prev ** (0.5) * x0 + (1 - abar_prev - std**2).clamp(min=0) ** (0.5) * eps
    if eta > 0:
        x_prev = x_prev + std * randn_tensor(eps.shape, generator=generators, device=eps.device, dtype=eps.dtype)
    return x_prev


def clipped_eps(sched: DDIMScheduler, x: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
    """eps recomputed from the clipped x0 prediction (guided-diffusion's ``p_mean_variance`` with
    ``clip_denoised`` then ``_predict_eps_from_xstart``); eps itself when the scheduler does not clip."""
    if not sched.config.clip_sample:
        return eps
    abar = sched.alphas_cumprod[t].to(device=x.device, dtype=x.dtype)
    x0 = predict_x0(sched, x, t, eps, sched.config.clip_sample_range)
    return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def guided_step(
    sched: SchedulerMixin,
    x: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    generators: list[torch.Generator],
    *,
    eta: float = 0.0,
    g: torch.Tensor | None = None,
    clip_eps: bool = True,
) -> torch.Tensor:
    """One reverse step x_t -> x_{t-1} with optional guidance ``g`` = lambda * grad log p(y | x_t, t).

    DDIM, guided-diffusion's ``ddim_sample`` + ``condition_score``:

    1. x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped to the scheduler's range;
    2. eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)  (eps of the clipped x0);
    3. eps' = eps - sqrt(1 - abar_t) g;
    4. x0' = (x_t - sqrt(1 - abar_t) eps') / sqrt(abar_t), *not* clipped again;
    5. x_{t-1} = sqrt(abar_prev) x0' + sqrt(1 - abar_prev - sigma^2) eps' + sigma z  (:func:`ddim_step`, abar_prev
       at the schedule's next timestep).

    Unguided (``g`` None), :func:`ddim_step` with the scheduler's clipping, eps from the clipped x0 if ``clip_eps``
    (steps 1-2 and 5).

    DDPM, guided-diffusion's ``p_sample`` + ``condition_mean``: diffusers' step (clipped x0, posterior mean,
    Sigma_t z), then + Sigma_t g: adding it to the sampled x_{t-1} shifts its mean by exactly that.
    """
    if isinstance(sched, DDIMScheduler):
        ti = int(t)
        if g is None:
            return ddim_step(sched, x, ti, eps, generators, eta=eta, clip_x0=sched.config.clip_sample,
                             eps_from_x0=clip_eps)
        eps_g = clipped_eps(sched, x, ti, eps) - (1 - sched.alphas_cumprod[ti].to(x.device, x.dtype)).sqrt() * g
        return ddim_step(sched, x, ti, eps_g, generators, eta=eta, clip_x0=False, eps_from_x0=False)
    if isinstance(sched, DDPMScheduler):
        x_next = sched.step(eps, t, x, generator=generators).prev_sample
        if g is not None:
            x_next = x_next + ddpm_variance(sched, int(t)).to(g.device, g.dtype) * g
        return x_next
    raise ValueError(f"scheduler {type(sched).__name__} is not supported: use DDIM or DDPM")


@contextlib.contextmanager
def float32_matmul(precision: cfg.Precision) -> Iterator[None]:
    """While the block runs, CUDA's float32 convolutions and matrix products in IEEE float32 (``"fp32"``) or in
    TF32, a 10-bit mantissa (``"tf32"``); ``"bf16"`` leaves them as they are (autocast chooses). No effect on the
    CPU. cuDNN runs float32 convolutions in TF32 by default: on an H200, 50 unguided DDIM steps of the demo target
    in TF32 ended up to 15/255 from the CPU's images on 2.7 % of pixels, in IEEE float32 at most 1/255 on 0.006 %
    (``scripts/gpu-check``, benchmarks/results/gpu-check.md), so ``"fp32"`` turns it off. IEEE float32 costs
    speed on a large model: 20 TFLOP/s against TF32's 66 for the CIFAR-10 DDPM architecture there."""
    if precision == "bf16":
        yield
        return
    mode = "ieee" if precision == "fp32" else "tf32"
    flags = [torch.backends.cudnn.conv, torch.backends.cuda.matmul]
    if all(hasattr(f, "fp32_precision") for f in flags):  # torch >= 2.9
        old = [f.fp32_precision for f in flags]
        for f in flags:
            f.fp32_precision = mode
        try:
            yield
        finally:
            for f, o in zip(flags, old):
                f.fp32_precision = o
        return
    old_legacy = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # pragma: no cover
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"  # pragma: no cover
    try:  # pragma: no cover
        yield
    finally:  # pragma: no cover
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old_legacy


@torch.no_grad()
def denoise_batch(
    denoiser: Denoiser,
    sched: SchedulerMixin,
    x: torch.Tensor,
    generators: list[torch.Generator],
    *,
    eta: float = 0.0,
    guidance: Guidance | None = None,
    y: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    clip_eps: bool = True,
    precision: cfg.Precision = "fp32",
) -> torch.Tensor:
    """Run the reverse process from x_T = ``x`` to x_0 with ``sched``'s timesteps. Returns (B, C, H, W).

    ``precision="bf16"``: the denoiser runs under bfloat16 autocast, its eps cast back to ``x``'s dtype; the
    scheduler arithmetic and the guidance stay in float32. ``"fp32"`` / ``"tf32"``: CUDA's float32 convolutions
    and matrix products, the guidance's too, in IEEE float32 / TF32 (:func:`float32_matmul`).

    ``guidance(x_t, t, y)`` with the batch's target labels ``y`` (B,), or a label-free one (``uses_ids``) with
    the batch's sample indices ``ids`` (B,) instead; ``clip_eps`` (DDIM) recomputes eps from the clipped x0 in
    unguided steps too, as guided-diffusion's DDIM always does (diffusers' DDIMPipeline does not:
    ``clip_eps=False`` reproduces it).
    """
    if precision not in cfg.PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {', '.join(cfg.PRECISIONS)}")
    cfg.check_eta(eta)
    if guidance is not None and isinstance(sched, DDIMScheduler) and not clip_eps:
        raise ValueError("guided DDIM sampling takes eps from the clipped x0 in every guided step (guided-diffusion's "
                         "order, the extraction's sampler): pass clip_eps=True, and sample an unguided baseline with "
                         "clip_eps=True too (clip_eps=False is diffusers' DDIMPipeline, another sampler)")
    label_free = getattr(guidance, "uses_ids", False)
    if (getattr(denoiser, "conditional", False) or (guidance is not None and not label_free)) and y is None:
        raise ValueError("guided or conditional sampling needs the batch's target labels y")
    if label_free and ids is None:
        raise ValueError("label-free guidance needs the batch's sample indices ids")
    keys = {"ids": ids} if label_free else {}
    conditional = getattr(denoiser, "conditional", False)
    low = precision == "bf16"
    with float32_matmul(precision):
        for i, t in enumerate(sched.timesteps):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low):
                eps = denoiser(x, t, y) if conditional else denoiser(x, t)
            eps = eps.to(x.dtype)
            g = None
            if guidance is not None:
                with torch.enable_grad(), reproducible_gradients(x.device):
                    g = guidance(x, t, y, **keys, **({"eps": eps} if getattr(guidance, "uses_eps", False) else {}),
                                 **({"sampler": sched} if getattr(guidance, "uses_sampler", False) else {}))
            x = guided_step(sched, x, t, eps, generators, eta=eta, g=g, clip_eps=clip_eps)
            if not bool(torch.isfinite(x).all()) or float(x.abs().max()) > DIVERGED_ABOVE:
                scale = getattr(guidance, "scale", None)
                cause = (f"the guidance scale lambda={scale:g} is likely too large" if scale else
                         "the model's eps predictions are not finite (check the weights and the scheduler)")
                state = "not finite" if not bool(torch.isfinite(x).all()) else "beyond 1e6"
                raise SamplingDiverged(f"sampling diverged at step {i + 1} of {len(sched.timesteps)} (t={int(t)}): "
                                       f"x_t is {state}; {cause}")
    return x


class BatchSize:
    """The batch size of a stage's denoiser calls, halved on a GPU out-of-memory error (and kept halved for
    the rest of the stage, so that one error costs one retry). Every sample draws its noise from its own
    generator, so a smaller batch gives the same images up to the rounding of batched convolutions
    (:func:`sample_batches` yields the batches that succeeded, so the images can be made again in their own
    batches)."""

    def __init__(self, size: int) -> None:
        cfg.check_int(size, "batch_size", 1)  # (2.5 made batches of 3, 3, 2; True batches of 1)
        self.size = size
        self.backoffs: list[int] = []  # the sizes that ran out of memory

    def shrink(self, error: BaseException) -> None:
        if self.size == 1:
            raise error
        self.backoffs.append(self.size)
        log.warning("out of memory at a batch of %d: going on with %d", self.size, self.size // 2)
        self.size //= 2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def ddim_settings(scheduler: cfg.SchedulerKind, eta: float, clip_eps: bool) -> dict[str, Any]:
    """The keywords ``eta`` and ``clip_eps`` of :func:`sample_batches` where ``scheduler`` reads them (DDIM); none
    for DDPM, which refuses them (a run's config holds both whatever its scheduler: runs warn of them as inert)."""
    return {"eta": eta, "clip_eps": clip_eps} if scheduler == "ddim" else {}


def sample(denoiser: Denoiser, n: int, **options) -> torch.Tensor:
    """Draw samples ``start .. start + n - 1`` of noise stream ``stream`` of the run seeded ``seed``
    (``options``: the keywords of :func:`sample_batches`, which makes them batch by batch and documents each:
    ``seed``, ``start``, ``scheduler``, ``steps``, ``eta``, ``batch_size``, ``guidance``, ``labels``, ``clip_eps``,
    ``precision``, ``device``, ``progress``, ``stream``; ``help`` shows their defaults). Guided DDIM sampling (a
    ``guidance``) needs ``clip_eps=True`` (guided-diffusion's order, the extraction's sampler; ``False``, the default,
    is diffusers' DDIMPipeline) and says so; sample an unguided baseline you compare with ``clip_eps=True`` too.

    Returns
    -------
    (n, C, H, W) float in [-1, 1], on the CPU
    """
    return torch.cat([images for _, images in sample_batches(denoiser, n, **options)])


def sample_batches(
    denoiser: Denoiser,
    n: int,
    *,
    seed: int = 0,
    start: int = 0,
    scheduler: cfg.SchedulerKind = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    batch_size: int | BatchSize = 64,
    guidance: Guidance | None = None,
    labels: np.ndarray | None = None,
    clip_eps: bool = False,
    precision: cfg.Precision = "fp32",
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    stream: int = SYNTHETIC_STREAM,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Samples ``start .. start + n - 1`` of noise stream ``stream`` of the run seeded ``seed``, one denoiser
    batch at a time: yields ``(first, images)`` for each batch that succeeded, ``first`` the index of its first
    sample and ``images`` (b, C, H, W) float in [-1, 1] on the CPU. A batch that ran out of memory is redone in
    halves, so the batches tell how the samples were made.

    Parameters
    ----------
    batch_size : images per denoiser call, or a stage's :class:`BatchSize` (halved on out-of-memory)
    guidance : ``g(x, t, y)`` (``guidance.Guidance``), or None for unguided sampling
    labels : (n,) int, the target output index of each sample (needed with guidance, unless it is label-free:
        that one receives the samples' indices ``start ..`` instead)
    clip_eps : DDIM: eps from the clipped x0 in every step (guided-diffusion's DDIM); False is diffusers'
        ``DDIMPipeline``
    precision : "fp32" (IEEE float32), "tf32" (CUDA's TF32 convolutions and matrix products) or "bf16" (the
        denoiser under bfloat16 autocast)
    """
    size = batch_size if isinstance(batch_size, BatchSize) else BatchSize(batch_size)
    # (n=2.5 made 3 samples; seed=None was a TypeError deep in the noise streams; steps=2.5 an IndexError in
    # diffusers)
    for name, v, least in (("n", n, 1), ("seed", seed, 0), ("start", start, 0), ("steps", steps, 1)):
        cfg.check_int(v, name, least)
    if not isinstance(clip_eps, bool):  # ("no" was taken as True)
        raise ValueError(f"clip_eps={clip_eps!r} must be True or False")
    cfg.check_eta(eta)
    if scheduler == "ddpm" and (eta != 0 or clip_eps):  # (taken without a word: DDPM reads neither)
        raise ValueError(f"eta={eta!r} and clip_eps={clip_eps!r} are DDIM's settings; scheduler='ddpm' reads neither: "
                         "leave them out, or sample with scheduler='ddim'")
    check_device(str(device))  # ("gpu" was torch's list of device types, from inside the first noise draw)
    if guidance is not None and not callable(guidance):
        raise ValueError(f"guidance={guidance!r} must be a guidance g(x, t, y) (e.g. side_extract.ClassifierGuidance)")
    needs_labels = getattr(denoiser, "conditional", False) or (
        guidance is not None and not getattr(guidance, "uses_ids", False))
    if labels is not None and not needs_labels:  # (they were ignored)
        raise ValueError("labels= given, but nothing here reads them: " + (
            f"{type(guidance).__name__} is label-free (it takes each sample's index): leave labels out"
            if guidance is not None else "unguided sampling of an unconditional model (give guidance=..., or leave "
            "labels out)"))
    if needs_labels and (labels is None or len(labels) != n):
        raise ValueError(f"guided or conditional sampling of {n} samples needs {n} target labels, got "
                         f"{None if labels is None else len(labels)}")
    if needs_labels:
        labels = integer_labels(labels, "target labels (integer output indices)")
        k = len(getattr(denoiser if getattr(denoiser, "conditional", False) else guidance, "classes", ()))
        if labels.min() < 0 or (k and labels.max() >= k):  # (found before the first step, not at it)
            raise ValueError(f"target labels must be output indices 0..{k - 1 if k else 'K-1'} (one per class, not "
                             f"the class values), got {labels.min()}..{labels.max()}")
    if not hasattr(denoiser, "scheduler") or not hasattr(denoiser, "sample_shape"):
        hint = " (a Target: pass target.denoiser)" if hasattr(denoiser, "denoiser") else (
            " (a model: side_extract.as_target(model, scheduler=...).denoiser)")
        raise ValueError(f"denoiser must be eps(x, t) with its scheduler and sample_shape{hint}, got "
                         f"{type(denoiser).__name__}")
    own_t, target_t = getattr(guidance, "num_train_timesteps", None), denoiser.scheduler.config.num_train_timesteps
    if own_t is not None and own_t != target_t:  # (its t_range, a fraction of T, guided only t <= 1000 of 2000)
        raise ValueError(f"{type(guidance).__name__}(num_train_timesteps={own_t}) guides a target of {target_t} "
                         f"training timesteps: give num_train_timesteps={target_t} (t_range is a fraction of them)")
    sched = inference_scheduler(denoiser.scheduler, scheduler, steps)
    b0 = start
    while b0 < start + n:
        idx = np.arange(b0, min(b0 + size.size, start + n))
        gens = sample_generators(seed, idx, stream)  # CPU streams: a run resumed or regenerated on another device
        # type draws the same noise
        x = randn_tensor((len(idx), *denoiser.sample_shape), generator=gens, device=torch.device(device))
        y = None if not needs_labels else torch.as_tensor(labels[idx - start], dtype=torch.long, device=device)
        try:
            batch = denoise_batch(denoiser, sched, x, gens, eta=eta, guidance=guidance, y=y,
                                  ids=torch.as_tensor(idx, dtype=torch.long), clip_eps=clip_eps, precision=precision)
        except torch.OutOfMemoryError as e:
            del x, gens
            size.shrink(e)
            continue  # the same samples again, in a smaller batch
        b0 = int(idx[-1]) + 1
        if progress is not None:
            progress(b0 - start, n)
        yield int(idx[0]), batch.clamp(-1, 1).cpu()


# help(sample) and inspect show sample_batches' keywords and defaults, not just **options (api.md's reference)
sample.__signature__ = inspect.signature(sample_batches).replace(return_annotation="torch.Tensor")


def sample_stage(
    run: RunDir,
    denoiser: Denoiser,
    c: cfg.SampleConfig,
    *,
    model_fingerprint: str,
    stage: str = "synthetic",
    device: str = "cpu",
    progress: Progress | None = None,
) -> ImageSet:
    """Unguided sampling of ``c.n`` images into ``run/<stage>/shard-*.npz`` (skips or resumes as the manifest says)."""

    size = BatchSize(c.batch_size)

    def make(lo: int, hi: int, shard_progress: Progress | None) -> dict[str, np.ndarray]:
        x = sample(denoiser, hi - lo, seed=c.seed, start=lo, scheduler=c.scheduler, steps=c.steps,
                   **ddim_settings(c.scheduler, c.eta, c.clip_eps), batch_size=size, precision=c.precision,
                   device=device, progress=shard_progress)
        return {"images": to_uint8(x), "index": np.arange(lo, hi, dtype=np.int64)}

    return shard_stage(run, stage, _fingerprint(c, model_fingerprint), c.n, c.shard_size, make,
                       inputs={MODEL_INPUT: model_fingerprint}, progress=progress)


def _fingerprint(c: cfg.SampleConfig, model_fingerprint: str) -> str:
    # what the images depend on, the batch size included (batched convolutions round differently)
    c = cfg.at_defaults(c, cfg.unread_keys(c))  # e.g. DDIM's eta and clipped eps under DDPM
    d = {k: getattr(c, k) for k in ("n", "seed", "scheduler", "steps", "eta", "batch_size", "shard_size")}
    if c.precision != "fp32":
        d["precision"] = c.precision
    if c.clip_eps:
        d["clip_eps"] = True
    return stage_fingerprint("synthetic", d, model_fingerprint)
