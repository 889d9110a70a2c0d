"""Every model form an audit takes, as a :class:`~side_extract.models.target.Target` with its fingerprint: a diffusers
directory or embedded target (or what :func:`load_target` made of one), a ``UNet2DModel`` with its scheduler, a
``DDPMPipeline`` / ``DDIMPipeline``, or any
callable ``eps(x_t, t)`` with its scheduler and sample shape (:func:`as_target`); and the target a run was made from,
checked against its manifest (:func:`run_target`). The public API (:mod:`side_extract.api`) and the theory's
measurement of a run read models through here.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import operator
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..distributed import check_device
from .target import (EMBEDDED_TARGETS, LATENT_WHY, CallableDenoiser, Target, UNetDenoiser, check_unet, demo_model_path,
                     load_target, model_fingerprint, resolve_model_path)

log = logging.getLogger(__name__)

ModelLike = str | Path | UNet2DModel | DiffusionPipeline | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _config_blob(obj: Any) -> bytes:
    """A config's JSON, arrays as their values (``str`` of a numpy array over 1,000 values, a scheduler's
    ``trained_betas`` given from Python, elides its middle: two schedules differing there had one fingerprint)."""
    return json.dumps({k: v for k, v in dict(obj.config).items() if not k.startswith("_")}, sort_keys=True,
                      default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)).encode()


def module_fingerprint(unet: torch.nn.Module, scheduler: SchedulerMixin) -> str:
    """sha256 over a model's config, its weights, the state that changes its output outside them
    (:func:`runtime_state`) and its scheduler's config. What a module does through forward hooks or a replaced
    ``forward`` is not seen: audit such a model as a callable (identified by its outputs), or with its changes
    merged into its weights."""
    h = hashlib.sha256()
    if hasattr(unet, "config"):
        h.update(_config_blob(unet))
    for name, t in sorted(unet.state_dict().items()):
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        # numpy has no bfloat16: its bytes as int16 (a bf16 model's own fingerprint, not its float32 copy's)
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    if state := runtime_state(unet):  # (none for a plain model: its fingerprint is as it always was)
        h.update(json.dumps(state, sort_keys=True, default=str).encode())
    h.update(_config_blob(scheduler))
    return h.hexdigest()


PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "AttnAddedKVProcessor", "AttnAddedKVProcessor2_0")


def runtime_state(unet: torch.nn.Module) -> list[list[Any]]:
    """What changes a UNet's output beside its weights and config: its peft adapters' state (switched off,
    merged, which are active, their scaling) and its attention layers' processors other than diffusers' plain
    ones (a model whose adapters were switched off, or whose attention was replaced, kept its fingerprint, and an
    audit into the same run reused the other model's stages)."""
    state: list[list[Any]] = []
    for name, m in unet.named_modules():
        if (hasattr(m, "merged_adapters") and hasattr(m, "disable_adapters") and hasattr(m, "active_adapters")
                and not callable(m.active_adapters) and not callable(m.disable_adapters)):  # (a peft tuner layer's
            # properties; diffusers' PeftAdapterMixin on the model has methods of those names)
            active = m.active_adapters
            state.append([name, "adapters", bool(m.disable_adapters), sorted([active] if isinstance(active, str)
                                                                              else active),
                          sorted(m.merged_adapters), getattr(m, "scaling", None)])
        processor = getattr(m, "processor", None)
        if processor is not None and type(processor).__name__ not in PLAIN_PROCESSORS:
            # its plain settings (a module's weights are in the state dict; an object's repr may hold its address)
            plain = {k: v for k, v in getattr(processor, "__dict__", {}).items()
                     if isinstance(v, (int, float, str, bool, type(None)))}
            state.append([name, "processor", f"{type(processor).__module__}.{type(processor).__qualname__}", plain])
    return state


def _shape(sample_shape: Any) -> tuple[int, int, int]:
    """``sample_shape`` as (C, H, W), three integers of at least 1, or refused naming it ("1,8,8" failed in int()'s
    words, naming neither the argument nor the form it takes)."""
    ok = not isinstance(sample_shape, (str, bytes)) and isinstance(sample_shape, Iterable)
    values = [_whole(v) for v in sample_shape] if ok else []
    if not (len(values) == 3 and all(v is not None and v >= 1 for v in values)):
        raise ValueError(f"sample_shape={sample_shape!r} must be (C, H, W): three integers, each at least 1")
    return tuple(values)


def _whole(v: Any) -> int | None:
    """``v`` as an int where it is a whole number (an int, numpy or torch integer, or a float such as 8.0), else
    None (a bool, 1.5, a string)."""
    if isinstance(v, (bool, str, bytes)):
        return None
    try:
        return operator.index(v)
    except TypeError:
        pass
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else None


def probe_fingerprint(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sample_shape: Sequence[int],
                      scheduler: SchedulerMixin, device: str = "cpu", *, differentiable: bool | None = None) -> str:
    """sha256 of what a callable computes: its outputs on fixed seeded inputs at three timesteps, with its
    scheduler's config (a callable has no weights to hash). It is also called once with a timestep per sample, a
    (B,) tensor, as the memorization score and memorization guidance call it (not hashed): a callable that takes
    only one t failed inside their stage, after the run's first stages were written."""
    g = torch.Generator().manual_seed(20241002)
    x = torch.randn((2, *sample_shape), generator=g).to(device)
    h = hashlib.sha256(_config_blob(scheduler))
    n_t = int(scheduler.config.num_train_timesteps)
    with torch.no_grad():
        seen = {}
        for t in (1, n_t // 2, n_t - 1):
            eps = seen[t] = fn(x, torch.tensor(t, device=device))
            if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
                raise ValueError(f"model: the callable must return eps shaped like its input {tuple(x.shape)}; it "
                                 f"returned {tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__}")
            if not torch.isfinite(eps).all():  # (found after the run directory and a stage were written, before)
                raise ValueError(f"model: the callable returns non-finite eps (NaN or inf) at t={t} on random inputs; "
                                 "an audit would diverge at its first step")
            h.update(eps.float().cpu().numpy().round(5).tobytes())
        again = fn(x, torch.tensor(n_t // 2, device=device))
        try:
            alone = fn(x[:1], torch.tensor(n_t // 2, device=device))
        except Exception as e:  # (BatchNorm1d in training mode: torch's "Expected more than 1 value per channel")
            raise ValueError(f"model: the callable failed on a batch of one image ({type(e).__name__}: {e}); the "
                             "stages call it so (a shard's last batch): where it is a model in training mode "
                             "(BatchNorm), put it in eval mode (model.eval())") from None
        if isinstance(again, torch.Tensor) and not torch.allclose(again, seen[n_t // 2], rtol=1e-4, atol=1e-5):
            # (a model in training mode behind a lambda, its dropout on: the generations were sampled with it, a rerun
            # redid every stage, and verify blamed rounding; a module itself is put in eval mode)
            far = float((again - seen[n_t // 2]).abs().max())
            raise ValueError(f"model: the callable returns another eps for the same x and t when called again (they "
                             f"differ by up to {far:.3g}): a model in training mode (dropout) or one that draws noise "
                             "inside; the audit's generations would not repeat and verify would fail: put the model "
                             "in eval mode (model.eval()) or fix its randomness")
        if (isinstance(alone, torch.Tensor) and alone.shape == x[:1].shape
                and not torch.allclose(alone, seen[n_t // 2][:1], rtol=1e-2, atol=1e-2)):  # (loose: a GPU's
            # batch-size-dependent kernels move eps by rounding, BatchNorm's batch statistics by far more)
            far = float((alone - seen[n_t // 2][:1]).abs().max())
            raise ValueError(f"model: the callable's eps for an image depends on the other images of its batch (alone "
                             f"and in a batch of 2 they differ by up to {far:.3g}): a model in training mode "
                             "(BatchNorm's batch statistics); generations would depend on their batch: put the model "
                             "in eval mode (model.eval())")
        if differentiable is None:
            differentiable = carries_gradient(fn, sample_shape, scheduler, device)
        if not differentiable:  # (a @torch.no_grad callable fixed later was known by the same outputs: its memguide
            # stage, made without the model's gradient, was reused)
            h.update(b"\0no-gradient")
        per_sample = torch.tensor([1, n_t - 1], device=device)
        try:
            eps = fn(x, per_sample)
        except Exception as e:  # (a user's callable: any error it raises)
            raise ValueError(f"model: the callable eps(x, t) failed with t a tensor of one timestep per sample, shape "
                             f"{tuple(per_sample.shape)} ({type(e).__name__}: {e}); stages call it so (as a diffusers "
                             "UNet takes t), as well as with a 0-d t") from None
        if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
            raise ValueError(f"model: with t a tensor of one timestep per sample the callable must return eps shaped "
                             f"like its input {tuple(x.shape)}; it returned "
                             f"{tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__}")
    return h.hexdigest()


def weight_dtypes(model: Any) -> set[torch.dtype]:
    """The dtypes of a module's floating-point weights and buffers (none: not a module, or no such weights)."""
    if not isinstance(model, torch.nn.Module):
        return set()
    return {p.dtype for p in (*model.parameters(), *model.buffers()) if p.is_floating_point()}


def _names(dtypes: set[torch.dtype]) -> str:
    return "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def _float32(unet: UNet2DModel) -> UNet2DModel:
    """``unet``, or a float32 copy of it where its weights are of another dtype (bf16, fp16, fp64), as a model
    directory's weights load: the stages feed it float32 images and run the precision their settings name (a half
    UNet failed at the first stage's first step, "Input type (float) and bias type (c10::Half)", after the run's
    files were written). The object given is left as it is; the run knows the copy by its float32 weights, which a
    directory of the same weights loads as."""
    dtypes = weight_dtypes(unet) - {torch.float32}
    if not dtypes:
        return unet
    log.warning("model: the UNet2DModel's weights are %s: the audit runs a float32 copy of it (as a model directory's "
                "weights load); the stages' precision settings choose their arithmetic (bf16: extract.precision, "
                "sample.precision)", _names(dtypes))
    return copy.deepcopy(unet).to(torch.float32)


def identity_fingerprint(model_id: str, sample_shape: Sequence[int], scheduler: SchedulerMixin,
                         differentiable: bool = True) -> str:
    """sha256 of a callable's identity as its user names it (``model_id``), its sample shape and its scheduler's
    config: what keys a callable's stages when ``model_id`` is given instead of its outputs on probe inputs; and
    whether its output carries the gradient (:func:`carries_gradient`)."""
    h = hashlib.sha256(b"side-extract/model-id/1\0" + model_id.encode() + b"\0")
    h.update(json.dumps([int(v) for v in sample_shape]).encode())
    h.update(_config_blob(scheduler))
    if not differentiable:
        h.update(b"\0no-gradient")
    return h.hexdigest()


def carries_gradient(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sample_shape: Sequence[int],
                     scheduler: SchedulerMixin, device: str = "cpu") -> bool:
    """Whether a callable's output carries its gradient with respect to its input ``x``: memorization guidance, a
    classifier guided through x0_hat and the theory's likelihood differentiate through the model, and a callable
    run under ``torch.no_grad`` (or detaching, or through numpy) gave them a gradient of 0 without a word
    (memguide's generations were UnCond's, bit for bit: an API review's find)."""
    return gradient_probe(fn, sample_shape, scheduler, device)[0]


def gradient_probe(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sample_shape: Sequence[int],
                   scheduler: SchedulerMixin, device: str = "cpu") -> tuple[bool, str | None]:
    """:func:`carries_gradient`, and the error a backward that could not be taken met (None: none)."""
    x = torch.randn((1, *sample_shape), generator=torch.Generator().manual_seed(20241002)).to(device)
    x.requires_grad_(True)
    try:
        with torch.enable_grad():
            out = fn(x, torch.tensor(int(scheduler.config.num_train_timesteps) // 2, device=device))
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                return False, None
            (grad,) = torch.autograd.grad(out.float().sum(), x, allow_unused=True)
    except Exception as e:  # a user's callable: one whose backward cannot be taken (a forward-only autograd Function,
        # an in-place op on its input) has no gradient to give; it is audited for the methods that need none, and the
        # refusal of the others says its error (a review's find)
        return False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return grad is not None, None


def as_target(model: ModelLike, *, scheduler: SchedulerMixin | None = None,
              sample_shape: Sequence[int] | None = None, device: str = "cpu", model_id: str | None = None) -> Target:
    """The :class:`~side_extract.models.target.Target` of any model form ``audit`` accepts (see the module docstring).

    A ``UNet2DModel``, or a callable that is a ``torch.nn.Module``, is moved to ``device`` and put in eval mode in
    place; a ``UNet2DModel`` whose weights are not float32 (bf16, fp16) is audited as a float32 copy, as a model
    directory's weights load (the object is left as it is). A pipeline object brings its scheduler;
    ``scheduler=`` replaces it (with a warning where it is another class or config). A callable needs
    ``scheduler`` and ``sample_shape`` (C, H, W); it is identified by its outputs on fixed probe inputs
    (:func:`probe_fingerprint`), rounded to 5 decimals, which another device, thread count or library version can
    move by a rounding step: the run would then no longer know it as its target, and every stage would be made
    again. ``model_id`` (a callable only)
    names the model instead, e.g. its checkpoint's sha256: the stages are keyed on it, the scheduler's config and
    the sample shape, so it must change whenever the weights do. The callable is still probed once for its
    output's shape.
    """
    check_device(str(device))  # (torch's own error came from deep inside the first .to())
    if model_id is not None:
        if not isinstance(model_id, str) or not model_id.strip():
            raise ValueError(f"model_id={model_id!r} must be a non-empty string naming the model's weights (e.g. "
                             "their checkpoint's sha256)")
        if isinstance(model, (str, Path, DiffusionPipeline, UNet2DModel, UNetDenoiser)) or not callable(model):
            raise ValueError(f"model_id={model_id!r} is for a callable eps(x, t); a {type(model).__name__} is "
                             "identified by its own weights and config")
    if scheduler is not None and not isinstance(scheduler, SchedulerMixin):
        raise ValueError(f"scheduler={scheduler!r} must be a diffusers scheduler object (e.g. DDPMScheduler), not a "
                         f"{type(scheduler).__name__}")
    if isinstance(model, UNetDenoiser):  # what load_target returns: its directory, or its UNet and scheduler
        source = Path(model.source) if model.source and model.source != "in-memory" else None
        if source is not None and source.is_dir() and scheduler is None and sample_shape is None:
            # the directory only while it still holds what the object computes (weights changed in memory since
            # the load, or files changed on disk, were dropped without a word: the audit ran on the disk's model)
            if (found := _from_its_directory(source, model.unet, model.scheduler, device)) is not None:
                return found
            log.warning("the target loaded from %s differs from that directory now (changed in memory since it was "
                        "loaded, or on disk): the audit takes the model in memory, known by its weights", source)
        model, scheduler = model.unet, scheduler or model.scheduler
    elif isinstance(model, CallableDenoiser):  # a wrapped callable: the callable (its output read once, not twice)
        sample_shape = model.sample_shape if sample_shape is None else sample_shape
        model, scheduler = model.fn, scheduler or model.scheduler
    if isinstance(model, (str, Path)):
        if scheduler is not None or sample_shape is not None:  # (they were ignored without a word)
            raise ValueError(f"scheduler= and sample_shape= are for a model object; the model directory {str(model)!r} "
                             "brings its own (leave them out)")
        return Target(load_target(model, device), model_fingerprint(model), str(model))
    if isinstance(model, DiffusionPipeline):
        if extra := sorted(k for k, v in model.components.items() if k not in ("unet", "scheduler") and v is not None):
            # (an LDMPipeline's UNet was audited on its VQ-VAE latents as if they were images)
            raise ValueError(f"model: the {type(model).__name__} holds {', '.join(extra)} beside its unet and "
                             f"scheduler: {LATENT_WHY} (where it samples in pixel space, pass model=pipe.unet, "
                             "scheduler=pipe.scheduler)")
        own = getattr(model, "scheduler", None)
        unet, sched = getattr(model, "unet", None), scheduler or own
        if scheduler is not None and isinstance(own, SchedulerMixin) and (
                type(own) is not type(scheduler) or _config_blob(own) != _config_blob(scheduler)):
            log.warning("scheduler=%s replaces the %s's own %s (another class or config): the audit uses the one "
                        "given (its noise schedule is part of the target's fingerprint)", type(scheduler).__name__,
                        type(model).__name__, type(own).__name__)
        if not isinstance(unet, UNet2DModel) or sched is None:
            raise ValueError(f"model: a {type(model).__name__} must have a UNet2DModel 'unet' and a 'scheduler' "
                             "(DDPMPipeline or DDIMPipeline)")
        model, scheduler = unet, sched
    if isinstance(model, UNet2DModel):
        if scheduler is None:
            raise ValueError("model: a UNet2DModel needs the scheduler it was trained with (scheduler=...)")
        check_unet(model, "model")
        if model.config.sample_size is None:  # (with sample_shape=: a TypeError unpacking None)
            raise ValueError("model: the UNet2DModel's config has no sample_size (diffusers' default None), so the "
                             "size of the images it makes is unknown; set it on the model "
                             "(unet.register_to_config(sample_size=H), or sample_size=(H, W)); sample_shape= is for "
                             "a callable")
        if sample_shape is not None and _shape(sample_shape) != (
                model.config.in_channels, *([model.config.sample_size] * 2 if isinstance(model.config.sample_size, int)
                                            else model.config.sample_size)):
            raise ValueError(f"sample_shape={tuple(sample_shape)} is not the UNet2DModel's own (in_channels "
                             f"{model.config.in_channels}, sample_size {model.config.sample_size}): leave it out")
        model = _float32(model)
        fp = module_fingerprint(model, scheduler)
        return Target(UNetDenoiser(model, scheduler, source="in-memory").to(device), fp, f"in-memory UNet2DModel {fp[:12]}")
    if callable(model):
        if scheduler is None or sample_shape is None:
            raise ValueError("model: a callable eps(x, t) needs scheduler=... and sample_shape=(C, H, W)")
        shape = _shape(sample_shape)
        if isinstance(model, torch.nn.Module):  # (left in training mode, a dropout made its probe fingerprint random:
            # every rerun made every stage again; as audit's docstring says of a model object)
            model.to(device).eval()
        denoiser = CallableDenoiser(model, shape, scheduler)  # (refuses an unknown prediction type)
        # (probed once: the fingerprint marks a callable without gradient, and the methods that need it refuse it)
        denoiser.differentiable, denoiser.gradient_error = gradient_probe(model, shape, scheduler, device)
        try:
            fp = probe_fingerprint(model, shape, scheduler, device,  # (also refuses an output of the wrong shape)
                                   differentiable=denoiser.differentiable)
        except RuntimeError as e:  # (a float16 module met float32 probes: torch's words named no setting)
            if weights := weight_dtypes(model) - {torch.float32}:
                raise ValueError(f"model: the callable module's weights are {_names(weights)} and "
                                 f"it failed on the float32 inputs the audit samples with ({e}): pass it in float32 "
                                 "(model.float()), or as a UNet2DModel, which is audited as a float32 copy") from e
            raise
        name = getattr(model, "__name__", "eps")
        if model_id is not None:
            fp = identity_fingerprint(model_id, shape, scheduler, denoiser.differentiable)
            return Target(denoiser, fp, f"callable {name} model_id={model_id} {fp[:12]}")
        return Target(denoiser, fp, f"callable {name} {fp[:12]}")
    raise ValueError(f"model of type {type(model).__name__} is not supported: pass a diffusers directory, a "
                     "UNet2DModel with its scheduler, a DDPMPipeline/DDIMPipeline, or a callable eps(x, t)")


def as_recorded(target: Target, model: Any, recorded: str | None, device: str = "cpu", *,
                own_scheduler: bool = True) -> Target:
    """``target``, the :func:`as_target` of a pipeline object ``model``, as the run records its model (its model
    entry's fingerprint ``recorded``): a pipeline loaded from a directory (``DDPMPipeline.from_pretrained(DIR)``) is
    audited as a model in memory, known by its weights, unless the run was made from that directory and it still
    holds what the pipeline computes; then the directory, so that the run's stages are its own (every one was made
    again for the same weights, and verify without model= was then refused: an API review's find). A run made in
    memory stays in memory (keyed by the directory, such runs were made again: an earlier review's)."""
    pipeline = isinstance(model, DiffusionPipeline) and own_scheduler
    source = getattr(model, "name_or_path", None) if pipeline else None
    if (recorded is None or not isinstance(source, (str, Path)) or not str(source) or not Path(source).is_dir()
            or not target.description.startswith("in-memory") or not isinstance(target.denoiser, UNetDenoiser)):
        return target
    try:
        if model_fingerprint(source) != recorded:
            return target
    except (OSError, ValueError):  # (no model directory side-extract reads)
        return target
    return _from_its_directory(Path(source), target.denoiser.unet, target.denoiser.scheduler, device) or target


def _from_its_directory(path: Path, unet: UNet2DModel, scheduler: SchedulerMixin, device: str) -> Target | None:
    """Model directory ``path`` as the target, known by its files as an audit of it is, where it holds what ``unet``
    and ``scheduler`` compute (their weights, and its scheduler read as its own class or as the DDPMScheduler the
    audit samples with); else None."""
    try:
        on_disk = load_target(path)
    except ValueError:  # (no directory side-extract reads: the object is the target)
        return None
    mine = module_fingerprint(unet, scheduler)
    if any(module_fingerprint(on_disk.unet, s) == mine for s in (on_disk.scheduler, *_saved_scheduler(path))):
        name = next((n for n in EMBEDDED_TARGETS if demo_model_path(n).resolve() == path.resolve()), str(path))
        # (an embedded target by its name, as a run of it records it: its path was "settings changed")
        return Target(on_disk.to(device), model_fingerprint(path), name)
    return None


def _saved_scheduler(model: str | Path) -> list[SchedulerMixin]:
    """The scheduler of model directory ``model`` as the diffusers class its config names (a DDIMScheduler, a
    PNDMScheduler, ..., which :func:`load_target` reads as the DDPMScheduler it samples with: a pipeline audited in
    memory with it, whose config the fingerprint took, was never its own saved directory's), or none."""
    import diffusers

    path = resolve_model_path(model) / "scheduler"
    try:
        name = json.loads((path / "scheduler_config.json").read_text(encoding="utf-8")).get("_class_name")
        kind = getattr(diffusers, name, None) if isinstance(name, str) else None
        if not (isinstance(kind, type) and issubclass(kind, SchedulerMixin)) or kind is diffusers.DDPMScheduler:
            return []
        return [kind.from_pretrained(path)]
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return []


def run_target(run_model: str, recorded: str | None, model: ModelLike | None = None, *,
               scheduler: SchedulerMixin | None = None, sample_shape: Sequence[int] | None = None, device: str = "cpu",
               model_id: str | None = None, pass_as: str = "model=") -> Target:
    """The target a run was made from, to make or measure something of the run again: ``model`` when given (any form
    :func:`audit` takes, with ``model_id`` if the audit had one), else the run config's ``run_model`` from disk;
    refused where its fingerprint is not ``recorded``, the one the run's manifest holds (None: not checked).
    ``pass_as``: how the caller takes a model, for the error of a run whose target is not on disk."""
    if model is None:
        if not resolve_model_path(run_model).exists():
            raise ValueError(f"the run's target {run_model!r} is not a model on disk: pass it as {pass_as}")
        model = run_model
    target = as_target(model, scheduler=scheduler, sample_shape=sample_shape, device=device, model_id=model_id)
    if (recorded is not None and recorded != target.fingerprint and isinstance(model, (str, Path))
            and isinstance(target.denoiser, UNetDenoiser)
            and any(module_fingerprint(target.denoiser.unet, s) == recorded
                    for s in (target.denoiser.scheduler, *_saved_scheduler(model)))):
        # a run audited with the model in memory knows it by its weights: the same weights saved to a directory are
        # its target (they were refused by their file hash, so such a run could never be verified from the CLI)
        return Target(target.denoiser, recorded, target.description)
    if (recorded is not None and recorded != target.fingerprint and not isinstance(model, (str, Path))
            and isinstance(target.denoiser, UNetDenoiser) and resolve_model_path(run_model).is_dir()
            and model_fingerprint(run_model) == recorded
            and _from_its_directory(resolve_model_path(run_model), target.denoiser.unet, target.denoiser.scheduler,
                                    device) is not None):
        # and the other way: a run of a directory, given the same weights in memory (refused as another model)
        return Target(target.denoiser, recorded, target.description)
    if recorded is not None and recorded != target.fingerprint:
        hint = ""
        if "model_id=" in run_model and model_id is None:
            hint = f"; the run knows its target by the model_id it was given ({run_model}): pass the same model_id="
        elif model_id is None and callable(model) and not isinstance(model, (str, Path, UNet2DModel,
                                                                             DiffusionPipeline)):
            hint = ("; a callable is known by its outputs on probe inputs, which another device or thread count "
                    "can move by a rounding step (audit with model_id= to key a run on a name instead)")
        if isinstance(target.denoiser, CallableDenoiser) and not target.denoiser.differentiable and recorded == (
                identity_fingerprint(model_id, target.denoiser.sample_shape, target.denoiser.scheduler)
                if model_id is not None else probe_fingerprint(model, target.denoiser.sample_shape,
                                                               target.denoiser.scheduler, device, differentiable=True)):
            hint = ("; it returns no gradient with respect to x, and is known apart from the same callable with its "
                    "gradient since this release (a run an earlier one made of it knew it without that mark): pass "
                    "the callable with its gradient (no torch.no_grad), or audit it again")  # (accepting it let a
            # callable without gradient verify a run made with one, memguide's: other pixels; a review's find)
        raise ValueError(f"model: fingerprint {target.fingerprint[:16]} is not the run's target "
                         f"({recorded[:16]}, manifest.json){hint}")
    return target
