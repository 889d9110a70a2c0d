"""Target diffusion models: the :class:`Denoiser` protocol, loading, saving and training.

A target is anything that predicts the noise ``eps(x_t, t)`` together with the noise scheduler it was
trained with (a model trained to predict v or x0 is read as the epsilon its output means). Model directories
are read exactly as diffusers' ``DDPMPipeline.save_pretrained`` writes them (``unet/`` + ``scheduler/`` +
``model_index.json``), safetensors only: a pickle checkpoint is refused, never unpickled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import platform
import re
import shutil
import warnings
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import EMAModel

from .. import config as cfg
from ..data import ImageSet, check_image_set, check_levels
from ..distributed import SINGLE, ProcessGroup, check_device
from ..runs import (atomic_directory, atomic_write_json, atomic_write_text, check_outside_run_folders, check_writable,
                    fingerprint_of, leftover_of, load_torch_state, read_json, run_lock, sweep_leftovers, versions)
from .classifier import MIN_TRAIN_TIMESTEPS

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2  # older checkpoints are pruned once a newer one is complete
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@runtime_checkable
class Denoiser(Protocol):
    """eps(x_t, t) with the shape of one sample and the scheduler the model was trained with (a v- or
    x0-predicting model's denoiser returns the epsilon its output means; its scheduler still says what it predicts).

    ``__call__(x, t)``: x (B, C, H, W) float, t a scalar or (B,) tensor of *training* timesteps, on any device
    (the denoiser puts it on x's: diffusers' UNets move a 0-dim t but not a (B,) one); returns eps (B, C, H, W).
    """

    sample_shape: tuple[int, int, int]
    scheduler: SchedulerMixin

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def math_attention() -> contextlib.AbstractContextManager:
    """``scaled_dot_product_attention`` in PyTorch's math kernel while the block runs: it supports derivatives of
    any order, and its backward is a fixed sequence of matrix products (the fused kernels' backward is not:
    CUDA's memory-efficient kernel splits the keys and adds the parts up in whatever order they finish)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def reproducible_gradients(device: torch.device) -> Iterator[None]:
    """While the block runs on an accelerator, gradients come out the same run to run, so that ``side verify``
    can make a guided generation again bit for bit: cuDNN picks deterministic algorithms and attention runs in
    the math kernel (:func:`math_attention`). Sampling runs every guidance call under it, and theory its
    divergences. Without them, on an H200, guidance through the demo target's UNet (whose middle block attends)
    differed from one making to the next in 60 of 256 memguide generations, up to 196/255
    (benchmarks/results/gpu-determinism.json); with them, in none, at the same speed. On the CPU, whose kernels
    are deterministic, nothing changes, so CPU results stay as they were."""
    if torch.device(device).type == "cpu":
        yield
        return
    old = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        with math_attention():
            yield
    finally:
        torch.backends.cudnn.deterministic = old


def predict_x0(sched: SchedulerMixin, x: torch.Tensor, t: int, eps: torch.Tensor,
               clip_range: float | None = None) -> torch.Tensor:
    """The denoised estimate x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clamped to
    [-clip_range, clip_range] when ``clip_range`` is given (the one place this formula is written: the clipped
    DDIM step, guidance through the denoised estimate and the memorization score all call it)."""
    abar = sched.alphas_cumprod[int(t)].to(device=x.device, dtype=x.dtype)
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    return x0 if clip_range is None else x0.clamp(-clip_range, clip_range)


PREDICTIONS = ("epsilon", "v_prediction", "sample")
"""What a model's output can be (diffusers' ``prediction_type``): the noise, the velocity v = sqrt(abar) eps -
sqrt(1 - abar) x0, or the clean image x0. Every sampler, guidance and score here reads epsilon: a denoiser turns
the others into it (:func:`as_epsilon`), and the samplers step it as an epsilon model's
(``sampling.inference_scheduler``)."""


def _unknown_prediction(kind: Any) -> ValueError:
    return ValueError(f"prediction_type={kind!r}: a model must predict one of {', '.join(PREDICTIONS)}")


def prediction_type(scheduler: SchedulerMixin, model_prediction: str | None = None) -> str:
    """The prediction type a model was trained with: its scheduler's ``prediction_type`` (diffusers' default:
    epsilon), or the UNet config's own where it declares one (``model_prediction``); refused where the two declare
    different ones, or one that is not in :data:`PREDICTIONS`."""
    declared = scheduler.config.get("prediction_type", None)
    if model_prediction is not None and declared is not None and model_prediction != declared:
        raise ValueError(f"the UNet's config says prediction_type={model_prediction!r}, its scheduler's "
                         f"prediction_type={declared!r}: save it with the scheduler it was trained with")
    kind = model_prediction or declared or "epsilon"
    if kind not in PREDICTIONS:
        raise _unknown_prediction(kind)
    check_schedule(scheduler)
    return kind


def sampler_config(scheduler: SchedulerMixin) -> dict[str, Any]:
    """``scheduler``'s config for a DDIM or DDPM sampler of the same schedule (``from_config``): without diffusers'
    record of the arguments left at their defaults, which ``from_config`` would fill with the new class's own
    defaults (a ``HeunDiscreteScheduler()`` built in Python has betas 0.00085..0.012, and was sampled with DDPM's
    0.0001..0.02)."""
    return {k: v for k, v in dict(scheduler.config).items() if k != "_use_default_values"}


def check_schedule(scheduler: SchedulerMixin) -> None:
    """Refuse a noise schedule no stage here can use, when the model is loaded: alphas_cumprod must hold one value
    per training timestep (``num_train_timesteps``; ``trained_betas`` of another length failed inside diffusers'
    step), finite, in (0, 1] and non-increasing (a NaN or negative beta ended sampling as 'diverged'), and its last
    value above 0."""
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:  # (a ScoreSdeVeScheduler given from Python: a synthetic set sampled by an invented DDIM
        # schedule, clustered, and then a refusal at the classifier that printed the scheduler's whole config)
        raise ValueError(f"the scheduler is a {type(scheduler).__name__}, which has no alphas_cumprod: a variance-"
                         "exploding or other non-DDPM schedule; side-extract audits a DDPM/DDIM (variance-preserving) "
                         "model")
    a = torch.as_tensor(abar, dtype=torch.float64).cpu()
    n_train = scheduler.config.get("num_train_timesteps", len(a))
    betas = {k: scheduler.config.get(k) for k in ("beta_start", "beta_end", "beta_schedule")}
    if len(a) == 0 or len(a) != n_train:
        raise ValueError(f"the scheduler's noise schedule has {len(a)} steps and num_train_timesteps={n_train}: it "
                         "needs at least one, and trained_betas one beta per training timestep")
    if not bool(torch.isfinite(a).all() and (a <= 1).all() and (a >= 0).all() and (a[1:] <= a[:-1]).all()):
        raise ValueError(f"the scheduler's noise schedule is not one of a diffusion ({betas}): alphas_cumprod must be "
                         "finite, in (0, 1] and non-increasing (betas in [0, 1))")
    if a[-1] <= 0:  # (sampling stopped with a bare 'diverged' at its first step)
        raise ValueError("the scheduler's noise schedule ends with no signal at all (alphas_cumprod[T-1] = 0, as "
                         "rescale_betas_zero_snr makes it): the noise and x0 cannot be read from x_t there, and every "
                         "stage here reads them; audit the model with its schedule's last step kept above zero")
    # the samplers step a DDIM/DDPM schedule rebuilt from the config: it must be this one (Euler's zero-SNR
    # rescaling keeps 2^-24 at the last step where DDIM's and DDPM's put 0: it passed the check above, and the model's
    # v was read with one schedule and stepped with the other, 0.1 from diffusers' DDIM, or 'diverged')
    try:
        rebuilt = torch.as_tensor(DDPMScheduler.from_config(sampler_config(scheduler)).alphas_cumprod,
                                  dtype=torch.float64)
    except NotImplementedError as e:  # (a beta_schedule DDPM lacks, given from Python: its traceback)
        raise ValueError(f"the {type(scheduler).__name__}'s noise schedule cannot be stepped by the DDIM and DDPM "
                         f"samplers here ({e}); audit the model with a DDPMScheduler or DDIMScheduler") from None
    if rebuilt.shape != a.shape or not torch.allclose(rebuilt, a, rtol=1e-5, atol=0.0):
        worst = int((rebuilt - a).abs().argmax()) if rebuilt.shape == a.shape else len(a) - 1
        raise ValueError(f"the {type(scheduler).__name__}'s noise schedule is not the one its config gives the DDIM "
                         f"and DDPM samplers here (alphas_cumprod at timestep {worst}: {float(a[worst]):.3g} in the "
                         f"scheduler, {float(rebuilt[worst]):.3g} from its config, {betas}); audit the model with a "
                         "DDPMScheduler or DDIMScheduler of its schedule")


def _abar(scheduler: SchedulerMixin, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod at timestep(s) ``t`` (a number, or one per sample, broadcast over ``like``'s sample axes), in
    float32 whatever the model ran in: under bf16 abar near t = 0 rounds to 1 (x0's epsilon: a division by 0)."""
    abar = scheduler.alphas_cumprod[torch.as_tensor(t).long().cpu()].to(device=like.device, dtype=torch.float32)
    return abar.reshape(-1, *([1] * (like.ndim - 1))) if abar.ndim else abar


def as_epsilon(scheduler: SchedulerMixin, kind: str, x: torch.Tensor, t: torch.Tensor | int,
               output: torch.Tensor) -> torch.Tensor:
    """The noise epsilon that a model of prediction type ``kind`` means by ``output`` at x_t = ``x``, timestep(s)
    ``t`` (a number, or one per sample), as diffusers' schedulers convert it in their step: v-prediction
    eps = sqrt(abar) v + sqrt(1 - abar) x_t; x0-prediction (``sample``) eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    if kind == "epsilon":
        return output
    abar = _abar(scheduler, t, output)
    out, x = output.float(), x.float()
    if kind == "v_prediction":
        return abar.sqrt() * out + (1 - abar).sqrt() * x
    if kind == "sample":
        return (x - abar.sqrt() * out) / (1 - abar).sqrt()
    raise _unknown_prediction(kind)


def add_noise(scheduler: SchedulerMixin, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) ``noise`` at timesteps ``t`` (one per sample, or one for all), with
    the scheduler's alphas_cumprod in ``x0``'s dtype: the forward process the samplers here invert (they step a
    DDIM or DDPM scheduler made from this one's config: ``sampling.inference_scheduler``), whatever ``scheduler``'s
    class. DDPM's and DDIM's own ``add_noise`` compute it so, bit for bit; Euler's and LMS's compute x0 + sigma
    noise, DPM-Solver's another scale, so a classifier trained on their x_t (inputs up to 500 where the sampler's are
    within 4) guided sampling with inputs it had never seen."""
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: the stages here need a variance-"
                         "preserving (DDPM-type) noise schedule")
    a = torch.as_tensor(abar).to(device=x0.device, dtype=x0.dtype)[torch.as_tensor(t).to(x0.device).long()]
    shape = (-1, *([1] * (x0.ndim - 1)))
    return (a ** 0.5).flatten().reshape(shape) * x0 + ((1 - a) ** 0.5).flatten().reshape(shape) * noise


def prediction_target(scheduler: SchedulerMixin, kind: str, x0: torch.Tensor, noise: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
    """What a model of prediction type ``kind`` is trained to output for x_t = sqrt(abar) x0 + sqrt(1 - abar)
    ``noise`` at timesteps ``t`` (one per sample): the noise, v = sqrt(abar) noise - sqrt(1 - abar) x0, or x0
    (as diffusers' training scripts set the loss's target)."""
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        abar = _abar(scheduler, t, x0)
        return (abar.sqrt() * noise.float() - (1 - abar).sqrt() * x0.float()).to(x0.dtype)
    raise _unknown_prediction(kind)


def has_class_embedding(unet: UNet2DModel) -> bool:
    """Whether ``unet`` is class-conditional (a class embedding of its own)."""
    return bool(unet.config.get("num_class_embeds") or unet.config.get("class_embed_type"))


class UNetDenoiser:
    """A diffusers ``UNet2DModel`` with the noise scheduler it was trained with (``scheduler``, as given: part
    of the model's identity), as a denoiser: it returns epsilon whatever the model predicts (``prediction``, one of
    :data:`PREDICTIONS`)."""

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, source: str = "") -> None:
        self.prediction = prediction_type(scheduler, unet.config.get("prediction_type", None))
        if has_class_embedding(unet):
            raise ValueError(f"{source or 'the model'}: a class-conditional UNet2DModel (num_class_embeds="
                             f"{unet.config.get('num_class_embeds')}, class_embed_type="
                             f"{unet.config.get('class_embed_type')!r}); side-extract audits unconditional models "
                             "(eps(x, t) with no label). To audit one class of it, pass a callable that fixes the "
                             "class, e.g. lambda x, t: unet(x, t, class_labels=torch.full((len(x),), y, "
                             "device=x.device)).sample, with its scheduler and sample_shape (side_extract.audit)")
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.source = source
        size = unet.config.sample_size
        if size is None:  # (diffusers' default: a TypeError "'NoneType' object is not iterable")
            raise ValueError(f"{source or 'the model'}: the UNet2DModel's config has no sample_size (diffusers' "
                             "default None), so the size of the images it makes is unknown; set it "
                             "(UNet2DModel(..., sample_size=H) or unet/config.json's \"sample_size\") and save it "
                             "again")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (int(unet.config.in_channels), int(h), int(w))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.unet(x, torch.as_tensor(t, device=x.device)).sample
        return as_epsilon(self.scheduler, self.prediction, x, t, out)

    def to(self, device: str | torch.device) -> "UNetDenoiser":
        self.unet.to(device)
        return self


class CallableDenoiser:
    """Wrap any callable ``fn(x, t)`` as a :class:`Denoiser`: its output is what its scheduler's
    ``prediction_type`` says (epsilon unless it says otherwise), turned into epsilon as :class:`UNetDenoiser`
    does."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        sample_shape: tuple[int, int, int],
        scheduler: SchedulerMixin,
    ) -> None:
        self.prediction = prediction_type(scheduler)
        self.fn = fn
        self.sample_shape = tuple(int(s) for s in sample_shape)  # type: ignore[assignment]
        self.scheduler = scheduler
        self.differentiable = True  # whether fn's output carries its gradient (as_target probes it: carries_gradient)
        self.gradient_error: str | None = None  # the error its backward met, where it failed

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return as_epsilon(self.scheduler, self.prediction, x, t, self.fn(x, torch.as_tensor(t, device=x.device)))


@dataclasses.dataclass(frozen=True)
class Target:
    """A model under audit: its denoiser, a fingerprint of what it computes (keys every cached stage), and a
    description for the run's config."""

    denoiser: Denoiser
    fingerprint: str
    description: str


EMBEDDED_TARGETS = ("demo-1000", "demo")  # side_extract/assets/<name>/, recipes in docs/demo-model.md
LATENT_WHY = ("a latent-diffusion or text-conditioned pipeline, whose UNet denoises latents (or reads a prompt), not "
              "images; side-extract audits pixel-space DDPM/DDIM models")
LATENT_PARTS = ("vae", "vqvae", "movq", "text_encoder", "tokenizer", "image_encoder")  # subfolders that say so


def other_components(path: Path) -> list[str]:
    """The parts model directory ``path`` holds beside ``unet`` and ``scheduler``: those its ``model_index.json``
    names (diffusers' list of a pipeline's parts), and the subfolders of a latent or text-conditioned pipeline
    (:data:`LATENT_PARTS`) holding a config."""
    named: set[str] = set()
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):  # (none, or unreadable: diffusers' loader does not read it)
        index = None
    if isinstance(index, dict):
        named = {k for k, v in index.items() if isinstance(k, str) and not k.startswith("_")
                 and k not in ("unet", "scheduler") and v is not None and v != [None, None]}
    named |= {p for p in LATENT_PARTS if any((path / p / f).is_file() for f in ("config.json", "tokenizer_config.json",
                                                                               "vocab.json"))}
    return sorted(named)


def demo_model_path(name: str = "demo") -> Path:
    """An embedded target, ``demo`` or ``demo-1000`` (docs/demo-model.md has the commands that made them)."""
    if name not in EMBEDDED_TARGETS:
        raise ValueError(f"embedded target {name!r}: expected one of {', '.join(EMBEDDED_TARGETS)}")
    return Path(str(resources.files("side_extract") / "assets" / name))


def resolve_model_path(spec: str | Path) -> Path:
    return demo_model_path(str(spec)) if str(spec) in EMBEDDED_TARGETS else Path(spec)


def load_target(spec: str | Path, device: str | torch.device = "cpu") -> UNetDenoiser:
    """Load a diffusers pipeline directory (or an embedded target: ``demo``, ``demo-1000``) as a
    :class:`UNetDenoiser`.

    Raises ``ValueError`` when the directory lacks ``unet/`` weights in safetensors or a scheduler config.
    """
    check_device(str(device))
    cfg.check_path(spec, "spec")
    path = resolve_model_path(spec)
    if str(spec) in EMBEDDED_TARGETS and (Path(spec) / "unet").is_dir():  # (a model saved as ./demo, as
        # docs/demo-model.md's recipe does, was passed over for the embedded one without a word)
        warnings.warn(f"model {str(spec)!r} names the embedded target, not the model directory {str(spec)!r} here; "
                      f"give ./{spec} for that", UserWarning, stacklevel=2)
    if not path.is_dir():
        raise ValueError(f"model {str(spec)!r}: {str(path)!r} is not a directory (expected a diffusers pipeline "
                         "directory with unet/ and scheduler/, or one of the embedded targets: "
                         f"{', '.join(EMBEDDED_TARGETS)})")
    if (path / ".final").is_dir():  # (a cut among the final moves: the weights of one training, the config of another)
        raise ValueError(f"model directory {str(path)!r} holds .final/: train-target was stopped while putting its "
                         "final model in place; run the same train-target command again to finish it")
    if extra := other_components(path):  # (an LDM pipeline's UNet was audited on its VQ-VAE latents as images)
        raise ValueError(f"model directory {str(path)!r} holds {', '.join(extra)} beside unet and scheduler: "
                         f"{LATENT_WHY} (where it samples in pixel space, save its unet and scheduler alone: "
                         "DDPMPipeline(unet=..., scheduler=...).save_pretrained(NEW_DIR))")
    unet_dir, sched_dir = path / "unet", path / "scheduler"
    if (path / "config.json").is_file() and not unet_dir.is_dir():
        raise ValueError(f"model directory {str(path)!r} holds a model saved alone (config.json, no unet/ and "
                         "scheduler/); save it with the noise schedule it was trained with: DDPMPipeline(unet="
                         f"UNet2DModel.from_pretrained({str(path)!r}), scheduler=DDPMScheduler("
                         "num_train_timesteps=..., beta_schedule=...)).save_pretrained(NEW_DIR) (README \"Your own "
                         "model\")")
    if not (sched_dir / "scheduler_config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no scheduler/scheduler_config.json; "
                         "save it with DDPMPipeline(unet, scheduler).save_pretrained(...)")
    if not (unet_dir / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no unet/config.json")
    weights = sorted(unet_dir.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in unet_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"model directory {str(path)!r} holds only pickle checkpoint(s) ({', '.join(pickles)}); "
                "side-extract never unpickles weights. Convert them to safetensors where you trust them: "
                "UNet2DModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise ValueError(f"model directory {str(path)!r} has no unet/*.safetensors weights")
    check_weight_indexes(path)
    for f in (unet_dir / "config.json", sched_dir / "scheduler_config.json"):
        try:
            if not isinstance(json.loads(f.read_text(encoding="utf-8")), dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"model directory {str(path)!r}: {str(f.relative_to(path))} is not a readable config "
                             f"({e})") from None
    kind = json.loads((unet_dir / "config.json").read_text(encoding="utf-8")).get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":  # (diffusers would load another class's config into a UNet2DModel without a word)
        raise ValueError(f"model directory {str(path)!r}: unet/ holds a {kind}; side-extract audits an "
                         "unconditional diffusers UNet2DModel (another architecture can be audited from Python as "
                         "a callable eps(x, t) with its scheduler and sample_shape)")
    sched = json.loads((sched_dir / "scheduler_config.json").read_text(encoding="utf-8"))
    if not {"beta_schedule", "beta_start", "trained_betas"} & set(sched) and sched.get(
            "_class_name", "DDPMScheduler") not in ("DDPMScheduler", "DDIMScheduler"):  # (a ScoreSdeVeScheduler's
        # was read with DDPM's defaults, an invented schedule: sampling "diverged" after a run folder was made)
        raise ValueError(f"model directory {str(path)!r}: scheduler/ holds a {sched.get('_class_name', 'scheduler')} "
                         "with no beta schedule (beta_schedule, beta_start or trained_betas): a variance-exploding "
                         "or other non-DDPM schedule; side-extract samples a DDPM/DDIM (variance-preserving) model")
    scheduler = _loaded(path, "scheduler/scheduler_config.json", lambda: DDPMScheduler.from_pretrained(sched_dir))
    variant = weights_variant(path)
    unet = _loaded(path, "unet/", lambda: UNet2DModel.from_pretrained(unet_dir, use_safetensors=True,
                                                                      variant=variant))
    check_unet(unet, f"model directory {str(path)!r}")
    missing = [name for name, t in (*unet.named_parameters(), *unet.named_buffers()) if t.is_meta]
    if missing:  # (diffusers leaves them unset: "Cannot copy out of meta tensor" when moved to the device)
        raise ValueError(f"model directory {str(path)!r}: unet/ weights lack {len(missing)} of the UNet's tensors "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); save the whole model again")
    return UNetDenoiser(unet, scheduler, source=str(path)).to(device)


WEIGHTS = "diffusion_pytorch_model"  # the name diffusers saves a UNet's weights under (.safetensors, sharded: an index)


def weights_variant(path: Path) -> str | None:
    """The variant of ``unet/``'s weights to load (``DDPMPipeline.save_pretrained(dir, variant="fp16")`` writes only
    ``diffusion_pytorch_model.fp16.safetensors``): None where the plain weights are there, else the one variant
    there is. Such a directory was refused as holding no diffusion_pytorch_model.safetensors, the variant sitting
    beside it unnamed (a review's find); where several variants and no plain weights are there, which one to audit
    is the user's choice."""
    unet = path / "unet"
    if (unet / f"{WEIGHTS}.safetensors").is_file() or (unet / f"{WEIGHTS}.safetensors.index.json").is_file():
        return None
    found = sorted({next(g for g in m.groups() if g) for f in unet.iterdir() if (m := re.fullmatch(  # (one file, or
        # shards and their index, as diffusers names them)
        rf"{WEIGHTS}\.(?:([\w-]+?)(?:-\d+-of-\d+)?\.safetensors|safetensors\.index\.([\w-]+)\.json)", f.name))})
    if len(found) > 1:
        raise ValueError(f"model directory {str(path)!r}: unet/ holds the weight variants {', '.join(found)} and no "
                         f"plain {WEIGHTS}.safetensors: keep the one to audit as that (save the pipeline again "
                         "without variant=), or move the others out")
    return found[0] if found else None


def check_weight_indexes(path: Path) -> None:
    """Refuse a model directory whose ``unet/*.safetensors.index.json`` (a sharded model's) names weight files
    other than safetensors files beside it: diffusers follows such an index even to ``.bin`` files, which it loads
    with torch's pickle-based loader (``weights_only``), and which the model's fingerprint did not cover."""
    for index in sorted({*(path / "unet").glob("*.safetensors.index.json"),  # (a variant's: .index.fp16.json)
                         *(path / "unet").glob("*.safetensors.index.*.json")}):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"model directory {str(path)!r}: unet/{index.name} is not a readable weight index "
                             f"({type(e).__name__}: {e})") from None
        bad = sorted(str(s) for s in shards if not (isinstance(s, str) and s.endswith(".safetensors")
                                                    and Path(s).name == s and (path / "unet" / s).is_file()))
        if bad:
            raise ValueError(f"model directory {str(path)!r}: unet/{index.name} names weight files that are not "
                             f"safetensors files beside it ({', '.join(bad[:3])}); side-extract never unpickles "
                             "weights: save the model again with safe_serialization=True")


def check_unet(unet: UNet2DModel, what: str) -> None:
    """Refuse a UNet2DModel that is no noise predictor of the images side-extract reads: out_channels other than
    in_channels (a learned-variance UNet), or channels other than 1 (grey) and 3 (RGB)."""
    c_in, c_out = unet.config.in_channels, unet.config.out_channels
    if c_out != c_in:  # (a conv error in the first sampling step)
        raise ValueError(f"{what}: the UNet2DModel maps {c_in} channels to {c_out}; a noise-predicting UNet's "
                         "out_channels equal its in_channels")
    if c_in not in (1, 3):  # (the images and shards side-extract writes and reads)
        raise ValueError(f"{what}: the UNet2DModel has {c_in} channels; side-extract audits images of 1 (grey) or "
                         "3 (RGB) channels")


def _loaded(path: Path, name: str, load: Callable[[], Any]) -> Any:
    """``load()``, with diffusers' own error on a config it cannot build from (a negative num_train_timesteps, an
    unknown beta_schedule: tracebacks before) said as the file of model directory ``path`` it comes from."""
    try:
        return load()
    except (RuntimeError, NotImplementedError, ValueError, TypeError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model directory {str(path)!r}: {name} cannot be loaded by diffusers "
                         f"({type(e).__name__}: {first})") from None


def model_fingerprint(spec: str | Path) -> str:
    """sha256 over a model directory's UNet config and weights and its scheduler config."""
    path = resolve_model_path(spec)
    h = hashlib.sha256()
    # (a sharded model's shards are safetensors files beside its index, check_weight_indexes: each counts)
    for f in [path / "unet" / "config.json", *sorted((path / "unet").glob("*.safetensors")),
              path / "scheduler" / "scheduler_config.json"]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def save_target(unet: UNet2DModel, scheduler: SchedulerMixin, out: str | Path, extra: dict[str, str] | None = None) -> None:
    """Write ``out`` as ``DDPMPipeline.save_pretrained`` does (safetensors), atomically."""
    with atomic_directory(out) as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        for name, text in (extra or {}).items():
            atomic_write_text(tmp / name, text)


RESIZE_HOW = "train_resize in a run config, side run --config"  # how a run's training images are resized


def check_fits(images_shape: tuple[int, int, int], model_shape: tuple[int, int, int], what: str, *,
               resize: str = RESIZE_HOW) -> None:
    """Raise if (C, H, W) of the images differs from the model's; ``resize``: the setting that resizes them, for the
    caller's command (the advice named --resize of side train-target to side demo, which has neither it nor a
    config, and to side calibrate, whose --resize made the mismatch)."""
    if tuple(images_shape) != tuple(model_shape):
        c, h, w = images_shape
        mc, mh, mw = model_shape
        convert = {(1, 3): "; give them as RGB (PIL's Image.convert('RGB'), as diffusers' train_unconditional.py read "
                           "them for training)", (3, 1): "; give them as greyscale (PIL's Image.convert('L'))"}
        raise ValueError(
            f"{what} are {h}x{w} with {c} channel(s), but the model expects {mh}x{mw} with {mc} channel(s)"
            + (convert.get((c, mc), "") if c != mc else "" if (h, w) == (mh, mw) else
               f"; resize them to {mh} ({resize})" if mh == mw else
               f"; give them at {mh}x{mw} (height x width): resizing makes square images")
        )  # (a square advice to a model of another height and width was refused in turn; one of another width only
        # had none)


# --------------------------------------------------------------------------------------------------
# training


def check_image_size(c: cfg.TrainTargetConfig, h: int, w: int) -> None:
    """Refuse images of ``h`` x ``w`` that the UNet of ``c`` cannot take: not square, or a side its blocks cannot
    halve as often as they downsample."""
    if h != w:
        raise ValueError(f"images are {h}x{w}; train-target needs square images (pass --resize)")
    n = len(c.block_out_channels)
    if h % (2 ** (n - 1)):
        raise ValueError(f"image size {h} is not divisible by 2**{n - 1} = {2 ** (n - 1)} "
                         f"(block_out_channels={c.block_out_channels} downsamples {n - 1} times)")


def build_unet(c: cfg.TrainTargetConfig, shape: tuple[int, int, int]) -> UNet2DModel:
    channels, h, w = shape
    check_image_size(c, h, w)
    n = len(c.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if c.attention and n > 1:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=h,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_num_groups,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        # diffusers' 8 channels a head, fewer where the attention's blocks (the mid block, and with attention the
        # last down and first up block: all at the last width) are narrower (0 heads: a ZeroDivisionError)
        attention_head_dim=min(8, c.block_out_channels[-1]),
    )


def _step_generator(seed: int, step: int) -> torch.Generator:
    # One generator per step, so a resumed run draws exactly the batches an uninterrupted one would.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _latest_checkpoint(out: Path, at_most: int) -> Path | None:
    """The latest ``checkpoints/step-N`` with N <= ``at_most``: a checkpoint past the requested steps cannot be
    wound back, so a shorter rerun starts from an earlier one (or afresh) instead of returning a longer-trained model."""
    ckpts = [p for p in (out / "checkpoints").glob("step-*")
             if re.fullmatch(r"step-\d+", p.name) and int(p.name.split("-")[1]) <= at_most]
    return max(ckpts, key=lambda p: int(p.name.split("-")[1]), default=None)


def _read_target_checkpoint(ckpt: Path, resume_key: dict, out: Path
                            ) -> tuple[int, list, UNet2DModel, dict, list[dict]] | None:
    """(step, losses, raw UNet, optimizer/EMA state, segments: how each stretch of steps up to it was trained,
    :func:`_segment`) of ``checkpoints/step-N``; None, with a warning, where it is
    damaged from outside (a bare JSON, safetensors or torch error failed every later run); a ValueError where it
    was made with another config or data set."""
    def damaged(e: Exception) -> None:
        log.warning("checkpoint %s is damaged (%s: %s); trying an earlier one", ckpt, type(e).__name__, str(e)[:200])

    try:
        meta = read_json(ckpt / "training_state.json", dict)
        key, step = meta["resume_key"], int(meta["step"])
    except (ValueError, KeyError, TypeError) as e:
        return damaged(e)
    if not _same_training(key, resume_key):
        raise ValueError(f"{str(out)!r} holds checkpoints of a different config or data set; choose another --out "
                         "or delete it")
    try:
        unet = UNet2DModel.from_pretrained(ckpt / "raw_unet", use_safetensors=True)
        segments = meta.get("segments") or _segments_of_log(out, step, resume_key)
        return step, list(meta.get("losses", [])), unet, load_torch_state(ckpt / "training_state.pt"), segments
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        return damaged(e)


TRAIN_OUT_FILES = ("unet", "scheduler", "model_index.json", "train_config.yaml", "training_log.json", "checkpoints",
                   ".final", ".lock")  # what train_target writes into --out


def _own_leftover(name: str) -> bool:
    """Whether ``name`` is what a write of train-target's own killed mid-write left (``..final.XXXXXXXX.side-tmp``,
    ``.training_log.json.XXXXXXXX.side-tmp``): refused as someone else's file, it blocked the resume for good."""
    return leftover_of(name) in TRAIN_OUT_FILES


def _same_training(key: dict, resume_key: dict) -> bool:
    """Whether a checkpoint's resume key is this training's: the data by its images' fingerprint, not the spec's
    spelling (``imgs``, ``./imgs/`` and its absolute path were refused as "a different data set"); keys without a
    fingerprint (none were written so) by the spec as well. A key nothing read when it was written (ema_decay without
    ema) is taken at its default, as :func:`training_key` takes this training's (a checkpoint written before that
    rule, of the very same command, was refused)."""
    default = cfg.TrainTargetConfig()
    unread = cfg.unread_keys(dataclasses.replace(default, ema=bool(key.get("ema", default.ema))))
    key = {k: getattr(default, k) if k in unread else v for k, v in key.items()}
    if "data_fingerprint" in key:
        return {k: v for k, v in key.items() if k != "data"} == {k: v for k, v in resume_key.items() if k != "data"}
    return key == resume_key


def check_train_folder(out: str | Path) -> None:
    """Refuse an ``out`` that train-target cannot write or must not write into, whatever it trains: a file, a run's
    folder, a folder it may not write, or one holding files or a model it did not write (:func:`check_train_out`
    checks the rest against the data; this part needs none, so the CLI checks it before loading the data)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; expected a directory to write the target to")
    check_outside_run_folders(out, "--out")  # (trained into RUN/extraction/x, the next extraction deleted it)
    check_writable(out)  # (found at the first checkpoint: up to checkpoint_every steps lost)
    if not out.exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in TRAIN_OUT_FILES and not _own_leftover(p.name))
    if foreign:
        raise ValueError(f"--out {str(out)!r} holds files train-target did not write ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}); choose a new or empty --out")
    made = out / "train_config.yaml"
    if ((out / "unet").exists() or (out / "model_index.json").exists()) and not (
            made.is_file() or (out / ".final" / "train_config.yaml").is_file()):  # (a move cut short keeps it there)
        raise ValueError(f"--out {str(out)!r} holds a model that train-target did not write (no train_config.yaml): "
                         "training here would replace it; choose a new or empty --out")


def training_key(c: cfg.TrainTargetConfig) -> dict[str, Any]:
    """The settings a checkpoint or a finished target is continued by: all but the step budget and checkpoint
    spacing, with the keys nothing reads (``ema_decay`` without ``ema``) at their defaults, and without the keys added
    later at the value that trains as before (``config.LATER_KEYS``)."""
    return {k: v for k, v in cfg.keyed_settings(cfg.at_defaults(c, cfg.unread_keys(c))).items()
            if k not in ("steps", "checkpoint_every")}


def check_train_out(out: Path, resume_key: dict, *, data: bool = True) -> None:
    """Refuse an ``out`` that holds what this training must not replace: files it did not write
    (:func:`check_train_folder`), or a model or checkpoints trained with another config or data set (at any step: a
    checkpoint past the requested steps is not resumed, but the model trained to it is still the folder's).
    ``data=False``: the settings alone, before the data is loaded (``resume_key`` without its fingerprint): another
    config was refused only once the data had loaded and been hashed."""
    check_train_folder(out)
    if not out.exists():
        return

    def settings(k: dict) -> dict:  # (the whole key, or without the data where it is not known yet)
        return k if data else {n: v for n, v in k.items() if n not in ("data", "data_fingerprint")}

    made = out / "train_config.yaml"
    differs = f"{str(out)!r} holds a target trained with a different config or data set"
    for state in sorted((out / "checkpoints").glob("step-*/training_state.json")):
        try:
            key = read_json(state, dict)["resume_key"]
        except (ValueError, KeyError):  # damaged: passed over when training resumes (train_target)
            continue
        if not _same_training(settings(key), settings(resume_key)):
            raise ValueError(f"{differs} ({state.parent.name}); training here would replace it: choose another "
                             "--out or delete it")
    if made.is_file():
        try:
            old = training_key(cfg.from_dict(cfg.TrainTargetConfig, cfg.load_yaml(made)))
        except ValueError as e:  # (said in the words of the user's own options: "--steps=-1 must be ...", of a file
            # that is no config of this release: "unknown config key(s)", naming no file)
            raise ValueError(f"{str(made)!r} does not read as a train-target config ({e}): the target in "
                             f"{str(out)!r} was written by another release or damaged since; choose another --out or "
                             "delete it") from None
        # the data by the fingerprint training_log.json records (a model trained on other images under the same
        # spec was replaced once its checkpoints were gone); by the spec where it records none (made before)
        try:
            trained_on = read_json(out / "training_log.json", dict).get("data_fingerprint")
        except (OSError, ValueError):  # (none: a training cut short after the model moved in, or damaged)
            trained_on = None
        if trained_on is not None:
            old = {**{k: v for k, v in old.items() if k != "data"}, "data_fingerprint": trained_on}
            new = {k: v for k, v in resume_key.items() if k != "data"}
        else:
            new = {k: v for k, v in resume_key.items() if k != "data_fingerprint"}
        if settings(old) != settings(new):
            raise ValueError(f"{differs} (train_config.yaml); training here would replace it: choose another --out "
                             "or delete it")


def _refuse_retraining(out: Path, steps: int) -> None:
    """Refuse to train again from step 0 into ``out``, which holds a finished target of this config and no checkpoint
    to continue it from (pruned, or a copy made without them), for as many steps or more: the target was retrained
    from scratch without a word, other weights wherever the thread count or machine differed, and a longer --steps
    did not continue it. Fewer steps train a shorter model from step 0, as where no checkpoint is that early."""
    try:
        done = read_json(out / "training_log.json", dict).get("steps")
    except (OSError, ValueError):
        done = None
    if isinstance(done, int) and steps < done:
        return
    trained = f"trained to {done} steps" if isinstance(done, int) else "trained"
    if isinstance(done, int) and steps > done:
        then = (f"it cannot be continued to --steps {steps}: its checkpoints, with the optimizer's state, are gone "
                "(checkpoints/step-N)")
    else:
        then = "it is done: audit it as it is"
    raise ValueError(f"{str(out)!r} holds a target {trained} with these settings and no checkpoint: training again "
                     f"would start over from step 0 and replace it; {then}, or choose another --out (or delete it) to "
                     "train a new one")


@dataclasses.dataclass(frozen=True)
class TrainResult:
    path: Path
    steps: int
    final_loss: float
    resumed_from: int


def target_scheduler(c: cfg.TrainTargetConfig) -> DDPMScheduler:
    """The noise scheduler a target trained with ``c`` gets, refused where the audit could not use it: a schedule
    :func:`check_schedule` refuses (float32's alphas_cumprod reaches 0 from about 12,000 linear timesteps: the whole
    training ran, then every stage refused the model) or fewer than 4 timesteps (SIDE's noise-aware classifier
    measures its accuracy per quarter of them: the audit failed at the classifier)."""
    scheduler = DDPMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                              clip_sample=True, prediction_type=c.prediction_type)
    try:
        check_schedule(scheduler)
    except ValueError as e:
        raise ValueError(f"num_train_timesteps={c.num_train_timesteps}, beta_schedule={c.beta_schedule!r}: {e}; "
                         "train with fewer timesteps") from None
    if c.num_train_timesteps < MIN_TRAIN_TIMESTEPS:
        raise ValueError(f"num_train_timesteps={c.num_train_timesteps} must be at least {MIN_TRAIN_TIMESTEPS}: "
                         f"SIDE's noise-aware classifier needs {MIN_TRAIN_TIMESTEPS} (its accuracy is measured per "
                         "quarter of them)")
    return scheduler


def train_target(
    c: cfg.TrainTargetConfig,
    data: ImageSet,
    out: str | Path,
    *,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    report: Callable[[int, int, float, float], None] | None = None,
    report_every: int = 0,
    group: ProcessGroup = SINGLE,
) -> TrainResult:
    """Train a ``UNet2DModel`` with the DDPM loss on ``data`` and write a diffusers directory to ``out``.

    Under a launch of several processes each trains on its rows of every batch and the main one writes
    (``distributed.py``).

    ``report(step, steps, mean_loss, seconds)`` is called every ``report_every`` steps (default: 20 times in
    all) with the mean loss since the last call and the seconds since the start; the steps are also logged.

    1. x_0 from the data, t ~ U{0..T-1}, eps ~ N(0, I), x_t = add_noise(scheduler, x_0, eps, t);
    2. loss = ||eps_theta(x_t, t) - eps||^2 (``c.prediction_type``: v or x_0 in place of eps,
       :func:`prediction_target`), AdamW, optional EMA of the weights;
    3. every ``checkpoint_every`` steps a diffusers directory (plus optimizer/EMA state) is written under
       ``out/checkpoints/step-N``; a rerun resumes from the latest one with the same config.

    The final model (EMA weights when ``ema``) is ``out/unet`` + ``out/scheduler``.
    """
    cfg.check_section(c, cfg.TrainTargetConfig, "c")  # (a dict, or an array for data, was an AttributeError)
    check_device(str(device))  # (torch's own error, or an AssertionError, from the first .to())
    check_image_set(data, "data")
    cfg.check_path(out, "out")
    check_levels(data.images, f"data ({data.name})" if data.name else "data")
    out = Path(out)
    x0_all = data.to_float()
    with torch.random.fork_rng():  # seeded initialisation without touching the global RNG
        torch.manual_seed(c.seed)
        unet = build_unet(c, data.shape)
    scheduler = target_scheduler(c)
    # what must match to continue from a checkpoint (training_key: ema_decay without ema, read by nothing, refused a
    # rerun without it as "a different config"; said here)
    unread = cfg.set_away(c, cfg.unread_keys(c))  # (as the run's inert keys: one at its default was said in every
    # default training)
    if unread and group.main:
        log.warning("settings that change nothing in this training: %s",
                    "; ".join(f"{k}={getattr(c, k)!r} ({why})" for k, why in unread.items()))
    resume_key = training_key(c)
    resume_key["data_fingerprint"] = data.fingerprint()
    # (processes given other settings or data trained one model on a mixture, or waited forever for a step another
    # had not; each machine of a launch reads its own command line)
    group.agree({"settings": fingerprint_of(c), "data": resume_key["data_fingerprint"], "out": str(out)},
                "training settings, data or output folder")

    check_train_out(out, resume_key)  # before anything is written (and nothing is: the lock makes the folder)
    # one writer at a time (two trainings into one folder interleaved their checkpoints and final moves): the main
    # process holds the folder's lock (side run's, .lock) for the training; another waits for none, it is refused
    with _holding(out, group.main):
        # the others go on once the main process holds the lock (refused it, the main process's error is the launch's:
        # they read the folder another training writes, and failed in DDP's constructor with gloo's traceback)
        group.barrier()
        check_train_out(out, resume_key)  # (again, under the lock: what a writer that just left made)
        if group.main and out.is_dir():
            sweep_leftovers(out)  # what a training killed mid-write left (untouched for a while: not a live writer's)
        start, losses, state, segments = 0, [], None, []
        at_most = c.steps
        # every process reads it; only the main one writes checkpoints, after a step that synchronises the processes
        # (the gradient exchange), so no process reads a half-replaced checkpoint
        while (ckpt := _latest_checkpoint(out, at_most)) is not None:
            if (found := _read_target_checkpoint(ckpt, resume_key, out)) is not None:
                start, losses, unet, state, segments = found
                log.info("resuming training from %s (step %d)", ckpt, start)
                break
            at_most = int(ckpt.name.split("-")[1]) - 1  # damaged: an earlier one
        if (start == 0 and (out / "train_config.yaml").is_file() and (out / "unet").is_dir()
                and _latest_checkpoint(out, math.inf) is None):
            _refuse_retraining(out, c.steps)
        # the model moves before the optimizer and EMA are made or loaded, so their state lives on its device
        unet.to(device).train()
        opt = torch.optim.AdamW(unet.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        ema = EMAModel(unet.parameters(), decay=c.ema_decay) if c.ema else None
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
        if ema is not None:
            ema.to(device)
        x0_all = x0_all.to(device)

        rows = group.local_rows(c.batch_size)  # this process's rows of every global batch (distributed.py)
        net = group.data_parallel(unet, device)
        step = start
        every = report_every or max(1, c.steps // 20)
        t_start, since = time.time(), []
        for step in range(start + 1, c.steps + 1):
            g = _step_generator(c.seed, step)
            idx = torch.randint(0, len(x0_all), (c.batch_size,), generator=g)
            eps = torch.randn((c.batch_size, *data.shape), generator=g).to(device)
            t = torch.randint(0, c.num_train_timesteps, (c.batch_size,), generator=g).to(device)
            x0 = x0_all[idx.to(device)]
            xt = add_noise(scheduler, x0, eps, t)
            xt, eps, t = xt[rows], eps[rows], t[rows]
            want = prediction_target(scheduler, c.prediction_type, x0[rows], eps, t)  # eps itself for an eps model
            per_row = (net(xt, t).sample - want).pow(2).flatten(1).mean(1)
            loss = group.local_loss(per_row, c.batch_size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.step(unet.parameters())
            losses.append(group.batch_mean(per_row, c.batch_size))
            if not math.isfinite(losses[-1]):  # (every later step ran, NaN checkpoints and model written, exit 0)
                # (lowering --lr was refused beside the checkpoints written before: "a different config")
                kept = _latest_checkpoint(out, step)
                how = ("lower --lr" if kept is None else
                       f"lower --lr, training into another --out, or delete {str(out)!r} first: it holds checkpoints "
                       f"to {kept.name} made with lr={c.lr:g}, beside which another lr is refused")
                raise ValueError(f"train-target diverged: the loss is {losses[-1]} at step {step} (lr={c.lr:g}); "
                                 f"{how}. Nothing of this run past step {step - 1} was written")
            since.append(losses[-1])
            if progress is not None:
                progress(step, c.steps)
            if step % every == 0 or step == c.steps:
                mean = sum(since) / len(since)
                log.info("train-target step %d/%d: loss %.4f, %.0f s", step, c.steps, mean, time.time() - t_start)
                if report is not None:
                    report(step, c.steps, mean, time.time() - t_start)
                since = []
            if group.main and (step % c.checkpoint_every == 0 or step == c.steps):
                _write_checkpoint(out, unet, ema, scheduler, opt, c, resume_key, step, losses,
                                  [*segments, _segment(start, step, c, device, group)])

        group.check_replicas(unet, "train-target")
        final = float(sum(losses[-100:]) / max(1, len(losses[-100:])))
        if not group.main:
            return TrainResult(out, c.steps, final, start)
        final_unet = _averaged(unet, ema)
        # how it was trained beyond the config: the same config on another thread count, device or library version can
        # round differently and end at other weights, and a result rests on the weights (model_fingerprint). Each
        # stretch of steps a call trained is a segment; the top level is the last one's. (A rerun that trained nothing
        # wrote its own thread count, device and versions over those of the run that made the weights, and a resumed
        # run kept only its last stretch's.)
        if start < c.steps:
            segments = [*segments, _segment(start, c.steps, c, device, group)]
        last = {k: v for k, v in segments[-1].items() if k in SEGMENT_KEYS}
        trained = {"steps": c.steps, "loss_every_step": [round(x, 6) for x in losses],
                   "data_fingerprint": resume_key["data_fingerprint"], **last, "resumed_from": segments[-1]["from"],
                   "segments": segments}
        save_target(final_unet, scheduler, out_final := out / ".final", extra={
            "train_config.yaml": cfg.dump_yaml(c), "training_log.json": json.dumps(trained, indent=2) + "\n"})
        # Move the pipeline files into out/ itself, each by rename, so out/ is a diffusers directory; until .final is
        # gone it is refused as a model (load_target): a cut among the moves left new weights beside the earlier
        # config and log
        for name in ("unet", "scheduler", "model_index.json", "train_config.yaml", "training_log.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            (out_final / name).replace(target)
        out_final.rmdir()
        return TrainResult(out, c.steps, final, start)


@contextlib.contextmanager
def _holding(out: Path, main: bool) -> Iterator[None]:
    """``out``'s lock for the block, on the main process; a folder the lock made, left holding nothing but the lock
    by a training that failed (out of memory at its first step), is removed: nothing half-made is left behind."""
    if not main:
        yield
        return
    made = out  # the outermost folder the lock makes (run_lock makes its parents too)
    while not made.parent.exists():
        made = made.parent
    fresh = not out.exists()
    try:
        with run_lock(out, advice="wait for it to finish, or train into another --out"):
            yield
    except BaseException:
        if fresh and out.is_dir() and {p.name for p in out.iterdir()} <= {".lock"}:
            shutil.rmtree(out, ignore_errors=True)
            for parent in out.parents:  # the empty folders above it that the lock made, up to the first one
                if parent == made.parent:
                    break
                with contextlib.suppress(OSError):  # (not empty: another's)
                    parent.rmdir()
        raise


SEGMENT_KEYS = ("processes", "rows_per_process", "torch_threads", "device", "platform", "versions")


def _segments_of_log(out: Path, step: int, resume_key: dict) -> list[dict[str, Any]]:
    """The segments of a checkpoint written before they were kept: those of ``out/training_log.json`` where it is the
    log of a training of the same data that ended at that step (a log of that time records its last stretch, from
    ``resumed_from``; a stretch before it is not recorded), else one stretch not recorded. (A placeholder alone wiped
    a finished model's record on a rerun.)"""
    unknown = [{"from": 0, "to": step, "not_recorded": True}]
    try:
        old = read_json(out / "training_log.json", dict)
    except (OSError, ValueError):
        return unknown
    if old.get("steps") != step or old.get("data_fingerprint") != resume_key["data_fingerprint"]:
        return unknown
    if isinstance(old.get("segments"), list) and old["segments"]:
        return old["segments"]
    start = old.get("resumed_from") if isinstance(old.get("resumed_from"), int) else 0
    last = {"from": start, "to": step, **{k: old[k] for k in SEGMENT_KEYS if k in old}}
    return [*([{"from": 0, "to": start, "not_recorded": True}] if start else []), last]


def _segment(start: int, end: int, c: cfg.TrainTargetConfig, device: str | torch.device,
             group: ProcessGroup) -> dict[str, Any]:
    """How steps ``start`` + 1 .. ``end`` of a training were made, beyond its config."""
    return {"from": start, "to": end, "processes": group.world, "rows_per_process": group.local_count(c.batch_size),
            "torch_threads": torch.get_num_threads(), "device": str(device), "platform": platform.platform(),
            "versions": versions()}


def _averaged(unet: UNet2DModel, ema: EMAModel | None) -> UNet2DModel:
    if ema is None:
        return unet
    with torch.random.fork_rng():  # (its random initialisation, overwritten at once, drew from the caller's RNG)
        copy = UNet2DModel.from_config(unet.config)
    copy.load_state_dict(unet.state_dict())
    ema.copy_to(copy.parameters())
    return copy


def _write_checkpoint(out: Path, unet, ema, scheduler, opt, c, resume_key, step: int, losses: list[float],
                      segments: list[dict]) -> None:
    dest = out / "checkpoints" / f"step-{step:06d}"
    with atomic_directory(dest) as tmp:
        DDPMPipeline(unet=_averaged(unet, ema), scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        unet.save_pretrained(tmp / "raw_unet", safe_serialization=True)
        state = {"optimizer": opt.state_dict()}
        if ema is not None:
            state["ema"] = ema.state_dict()
        torch.save(state, tmp / "training_state.pt")
        atomic_write_json(tmp / "training_state.json", {"step": step, "resume_key": resume_key, "losses": losses,
                                                         "segments": segments})
        atomic_write_text(tmp / "train_config.yaml", cfg.dump_yaml(c))
    log.info("checkpoint written: %s", dest)
    # the KEEP_CHECKPOINTS - 1 latest before this one are kept beside it, by step number; a longer run's later
    # checkpoints are left alone (ordered by name, with them kept as "the newest", a shorter rerun removed each
    # checkpoint it wrote, and its interruption restarted it from step 0)
    earlier = sorted((s, p) for p in (out / "checkpoints").glob("step-*")
                     if re.fullmatch(r"step-\d+", p.name) and (s := int(p.name.split("-")[1])) < step)
    for _, old in earlier[:max(0, len(earlier) - (KEEP_CHECKPOINTS - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "Denoiser", "UNetDenoiser", "CallableDenoiser", "load_target", "save_target", "train_target", "build_unet",
    "check_fits", "model_fingerprint", "demo_model_path", "EMBEDDED_TARGETS", "resolve_model_path", "TrainResult",
]
