"""Sampling: one loop for diffusers' DDPM and DDIM schedulers, per-sample seeds, sharded run output.

Sample ``i`` of a run with seed ``s`` draws all of its noise (the initial x_T and, for DDPM or DDIM with
eta > 0, every step's noise) from its own generator seeded by ``sample_seed(s, i)``; so an image does not
depend on the batch size, on which shard it lands in, or on how many processes share the work.

Guidance (``guidance.py``) enters as a function of (x_t, t) returning ``lambda * grad log p(y | x_t, t)``
for the batch's target labels; the loop applies it in guided-diffusion's two forms: DDIM
``eps' = eps - sqrt(1 - abar_t) * g`` and DDPM ``mean' = mean + Sigma_t * g``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from . import config as cfg
from .data import ImageSet, load_shards, to_uint8
from .guidance import GuidanceFn, guided_eps, guided_mean
from .models.target import Denoiser
from .runs import RunDir, atomic_save_npz, fingerprint_of

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def sample_seed(seed: int, index: int) -> int:
    """A 64-bit seed for global sample ``index`` of a run seeded ``seed`` (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0])


def sample_generators(seed: int, indices: np.ndarray | list[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(sample_seed(seed, int(i))) for i in indices]


def inference_scheduler(train_scheduler: SchedulerMixin, kind: cfg.SchedulerKind, steps: int) -> SchedulerMixin:
    """A fresh DDIM or DDPM scheduler from the target's training scheduler config, set to ``steps`` steps."""
    if kind == "ddim":
        sched = DDIMScheduler.from_config(train_scheduler.config)
    elif kind == "ddpm":
        sched = DDPMScheduler.from_config(train_scheduler.config)
    else:
        raise ValueError(f"scheduler={kind!r} must be 'ddim' or 'ddpm'")
    n_train = sched.config.num_train_timesteps
    if not 1 <= steps <= n_train:
        raise ValueError(f"steps={steps} must be between 1 and the model's {n_train} training timesteps")
    sched.set_timesteps(steps)
    return sched


def ddpm_variance(sched: DDPMScheduler, t: int) -> torch.Tensor:
    """Sigma_t of DDPM's reverse step (``fixed_small``: beta-tilde), also under respaced timesteps."""
    if sched.config.variance_type not in ("fixed_small", None):
        raise ValueError(f"guided DDPM needs variance_type='fixed_small', the model has {sched.config.variance_type!r}")
    ac = sched.alphas_cumprod
    prev_t = int(sched.previous_timestep(t))
    abar_t = ac[t]
    abar_prev = ac[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    beta_t = 1 - abar_t / abar_prev
    return torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t, min=1e-20)


@torch.no_grad()
def denoise_batch(
    denoiser: Denoiser,
    sched: SchedulerMixin,
    x: torch.Tensor,
    generators: list[torch.Generator],
    *,
    eta: float = 0.0,
    guidance: GuidanceFn | None = None,
    clip_model_output: bool = False,
) -> torch.Tensor:
    """Run the reverse process from x_T = ``x`` to x_0 with ``sched``'s timesteps. Returns (B, C, H, W).

    ``clip_model_output`` (DDIM only) recomputes eps from the clipped x0 prediction, as guided-diffusion's
    DDIM does (diffusers' ``use_clipped_model_output``). Without it, when x0 saturates at high t the guided
    eps term of the DDIM update points *against* the guidance; with it, saturated steps carry no guidance.
    """
    is_ddim = isinstance(sched, DDIMScheduler)
    for t in sched.timesteps:
        eps = denoiser(x, t)
        g = None
        if guidance is not None:
            with torch.enable_grad():
                g = guidance(x, t)
        if g is not None and is_ddim:
            eps = guided_eps(eps, g, sched.alphas_cumprod[int(t)])
        kwargs: dict[str, Any] = {"eta": eta, "use_clipped_model_output": clip_model_output} if is_ddim else {}
        x_next = sched.step(eps, t, x, generator=generators, **kwargs).prev_sample
        if g is not None and not is_ddim:
            x_next = guided_mean(x_next, g, ddpm_variance(sched, int(t)))
        x = x_next
    return x


def sample(
    denoiser: Denoiser,
    n: int,
    *,
    seed: int = 0,
    start: int = 0,
    scheduler: cfg.SchedulerKind = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    batch_size: int = 64,
    guidance: Callable[[np.ndarray], GuidanceFn | None] | None = None,
    clip_model_output: bool = False,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> torch.Tensor:
    """Draw samples ``start .. start + n - 1`` of the run seeded ``seed``.

    Parameters
    ----------
    guidance : maps a batch's global indices to a guidance function (or None for unguided)

    Returns
    -------
    (n, C, H, W) float in [-1, 1]
    """
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"n={n} and batch_size={batch_size} must be positive")
    sched = inference_scheduler(denoiser.scheduler, scheduler, steps)
    out = []
    for b0 in range(start, start + n, batch_size):
        idx = np.arange(b0, min(b0 + batch_size, start + n))
        gens = sample_generators(seed, idx, device)
        x = randn_tensor((len(idx), *denoiser.sample_shape), generator=gens, device=torch.device(device))
        g = guidance(idx) if guidance is not None else None
        out.append(denoise_batch(denoiser, sched, x, gens, eta=eta, guidance=g,
                                 clip_model_output=clip_model_output).clamp(-1, 1).cpu())
        if progress is not None:
            progress(int(idx[-1] - start + 1), n)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# sharded output in a run directory


def shard_path(directory: Path, k: int) -> Path:
    return directory / f"shard-{k:05d}.npz"


def write_shards(
    directory: Path,
    n: int,
    shard_size: int,
    make: Callable[[int, int], dict[str, np.ndarray]],
    progress: Progress | None = None,
) -> int:
    """Write ``shard-K.npz`` for index ranges [K * shard_size, ...), skipping shards already written.

    ``make(start, stop)`` returns the arrays of one shard; it must include ``images`` and ``index``.
    Each shard is written atomically, so any shard present is whole. Returns the number written now.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    n_shards = (n + shard_size - 1) // shard_size
    for k in range(n_shards):
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        p = shard_path(directory, k)
        if p.exists():
            if progress is not None:
                progress(hi, n)
            continue
        arrays = make(lo, hi)
        assert np.array_equal(arrays["index"], np.arange(lo, hi)), "shard index range mismatch"
        atomic_save_npz(p, **arrays)
        written += 1
        if progress is not None:
            progress(hi, n)
    return written


def shard_stage(
    run: RunDir,
    stage: str,
    fingerprint: str,
    n: int,
    shard_size: int,
    make: Callable[[int, int, Progress | None], dict[str, np.ndarray]],
    *,
    inputs: dict[str, str] | None = None,
    progress: Progress | None = None,
    **info: Any,
) -> ImageSet:
    """A stage whose output is ``n`` images in ``run/<stage>/shard-*.npz``: skipped when complete with the same
    fingerprint, resumed at its last whole shard when interrupted, else written afresh.

    ``make(lo, hi, progress)`` returns one shard's arrays; its progress callback counts within the whole stage.
    """
    decision = run.begin(stage, fingerprint, inputs=inputs)
    directory = run.path / stage
    if decision != "skip":
        t0 = time.time()

        def make_shard(lo: int, hi: int) -> dict[str, np.ndarray]:
            return make(lo, hi, None if progress is None else (lambda done, _total: progress(lo + done, n)))

        written = write_shards(directory, n, shard_size, make_shard, progress)
        run.complete(stage, n=n, shards_written_now=written, resumed=decision == "resume",
                     sampling_seconds=round(time.time() - t0, 3), **info)
    return load_shards(directory)


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

    def make(lo: int, hi: int, shard_progress: Progress | None) -> dict[str, np.ndarray]:
        x = sample(denoiser, hi - lo, seed=c.seed, start=lo, scheduler=c.scheduler, steps=c.steps, eta=c.eta,
                   batch_size=c.batch_size, device=device, progress=shard_progress)
        return {"images": to_uint8(x), "index": np.arange(lo, hi, dtype=np.int64)}

    return shard_stage(run, stage, _fingerprint(c, model_fingerprint), c.n, c.shard_size, make,
                       inputs={"model": model_fingerprint}, progress=progress)


def _fingerprint(c: cfg.SampleConfig, model_fingerprint: str) -> str:
    # the batch size does not change the images, so it is left out of the fingerprint
    d = cfg.to_dict(c)
    d.pop("batch_size")
    return fingerprint_of(d, model_fingerprint)
