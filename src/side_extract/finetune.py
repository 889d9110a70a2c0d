"""SIDE's second form (the paper's Algorithm 1 for large models): fine-tune the target on its own synthetic set
with the surrogate labels as classes, then sample the conditional model toward each cluster.

1. The target ``UNet2DModel`` gets a class embedding with one row per kept cluster plus a *null* label (the
   last row). It is initialised to zero, so before fine-tuning the conditional model computes exactly the
   target's eps for every label (diffusers adds the class embedding to the time embedding).
2. LoRA adapters (``peft``) on the layers ``lora.target_modules`` names (rank ``lora.rank``; by default the
   resnets' ``conv1``/``conv2`` and attention's ``to_q``/``to_k``/``to_v``/``to_out.0``: ``conv_in``, ``conv_out``,
   the shortcuts, up/down-samplers and the time embedding stay frozen; ``rank: full`` trains every weight
   instead) and the class embedding (at ``lora.class_lr``) are trained with the
   DDPM loss ||eps - eps_{theta + Delta}(x_t, t, y)||^2 on the synthetic images (paper: rank 512, lr 1e-5; for
   a target trained to predict v or x0, the same loss on that output, as it was trained);
   with probability ``label_dropout`` a sample's label is replaced by the null label, which teaches the
   unconditional eps for classifier-free guidance.
3. Sampling for cluster y uses eps = eps(x, t, null) + w (eps(x, t, y) - eps(x, t, null)) with ``w =
   lora.guidance_scale`` (w = 1: plain conditional sampling, one forward per step).

With memorization-aware surrogate labels the background label (the samples outside the memorization candidates)
is one more class of the fine-tune, so the model learns where the unlikely-memorized samples lie; no generation
is drawn toward it (``ConditionalDenoiser.target_outputs``), as for the classifier of method ``side``.

Training is resumable (checkpoints keyed by the images, labels, target and settings, as the classifiers'), and
the adapters are written in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``; a full
fine-tune as ``unet/`` in diffusers' format) beside ``classes.json``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file

from . import config as cfg
from .data import check_float_images, integer_labels
from .distributed import SINGLE, ProcessGroup
from .models.forms import module_fingerprint
from .models.target import UNetDenoiser, add_noise, as_epsilon, has_class_embedding, prediction_target
from .runs import (array_fingerprint, atomic_directory, atomic_write_json, fingerprint_of, read_checkpoint, read_json,
                   check_writable, whole_safetensors)
from .surrogate import target_outputs

log = logging.getLogger(__name__)


CONDITIONAL_TARGET = "the target UNet already has a class embedding; side-lora needs an unconditional target"


def lora_settings(c: cfg.LoraConfig) -> dict:
    """What fine-tuning reads, for the lora stage's fingerprint: not the CFG scale w (sampling's), nor how often it
    checkpoints (each step draws from its own generator, so a run checkpointed more often, or resumed, trains the
    same), nor at rank ``full`` LoRA's ``alpha`` and ``target_modules``; those take their defaults, so that changing
    them does not fine-tune again (the last two: :func:`~side_extract.config.unread_keys`, which a run warns of)."""
    unread = cfg.at_defaults(c, ["checkpoint_every", *cfg.unread_keys(c)])
    return {k: v for k, v in cfg.keyed_settings(unread).items() if k != "guidance_scale"}


LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)  # peft's


def lora_problems(unet: UNet2DModel, c: cfg.LoraConfig) -> list[str]:
    """What makes ``unet`` unfit for side-lora with ``c``, found before any stage: a class embedding of its own,
    or ``target_modules`` naming no layer (peft's rule: a module whose name is the entry or ends in ``.entry``) or
    a layer that LoRA does not adapt."""
    problems = []
    if has_class_embedding(unet):
        problems.append(CONDITIONAL_TARGET)
    if c.rank != "full":
        modules = list(unet.named_modules())
        matched = {t: [(n, m) for n, m in modules if n == t or n.endswith(f".{t}")] for t in c.target_modules}
        unmatched = [t for t, found in matched.items() if not found]
        if unmatched:
            problems.append(f"lora.target_modules: {', '.join(map(repr, unmatched))} name no layer of the target "
                            f"UNet (the default: {', '.join(cfg.LoraConfig().target_modules)})")
        for t, found in matched.items():  # peft refuses to adapt any other layer (a norm, a block, a ModuleList)
            if other := [(n, m) for n, m in found if not isinstance(m, LORA_LAYERS)]:
                n, m = other[0]
                problems.append(f"lora.target_modules: {t!r} names {n!r}, a {type(m).__name__}; LoRA adapts only "
                                f"{', '.join(k.__name__ for k in LORA_LAYERS)} layers")
    return problems


def conditional_unet(unet: UNet2DModel, n_classes: int) -> UNet2DModel:
    """A copy of ``unet`` with a zero-initialised class embedding of ``n_classes + 1`` rows (the last: null)."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    if has_class_embedding(unet):
        raise ValueError(CONDITIONAL_TARGET)
    config["num_class_embeds"] = n_classes + 1
    # from_config, as diffusers loads one: a key of the target's config.json that UNet2DModel takes no more (a
    # legacy image_size) was a TypeError here, after the synthetic set, features and clusters were made
    out = UNet2DModel.from_config(config)
    missing, unexpected = out.load_state_dict(unet.state_dict(), strict=False)
    assert set(missing) == {"class_embedding.weight"} and not unexpected, (missing, unexpected)
    with torch.no_grad():
        out.class_embedding.weight.zero_()
    return out.to(next(unet.parameters()).device)


def attach_adapters(unet: UNet2DModel, c: cfg.LoraConfig) -> torch.nn.Module:
    """LoRA adapters on ``c.target_modules`` plus a trainable class embedding (peft), or every weight trainable
    for ``rank: full``. Returns the model to train (a ``PeftModel`` or the UNet itself)."""
    if c.rank == "full":
        unet.requires_grad_(True)
        return unet
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=int(c.rank), lora_alpha=float(c.alpha if c.alpha is not None else c.rank),
                    target_modules=list(c.target_modules), modules_to_save=["class_embedding"], lora_dropout=0.0,
                    init_lora_weights=True)
    return get_peft_model(unet, lc)


class ConditionalDenoiser:
    """The fine-tuned target as ``eps(x, t, y)`` with classifier-free guidance (see the module docstring).

    ``y``: (B,) output indices 0..K-1 (``classes`` maps them to cluster ids); ``denoiser(x, t)`` without y is
    the null label (the unconditional eps the model learnt by label dropout). ``background``: the label value
    (of ``classes``) of memorization-aware labels' background class, never a generation's target; None without."""

    conditional = True

    def __init__(self, model: torch.nn.Module, target: UNetDenoiser, classes: np.ndarray, guidance_scale: float,
                 background: int | None = None) -> None:
        self.model = model.eval()
        self.scheduler = target.scheduler
        self.prediction = target.prediction  # what the fine-tuned UNet outputs, as the target: eps, v or x0
        self.sample_shape = target.sample_shape
        self.classes = np.asarray(classes, dtype=np.int64)
        self.null = len(self.classes)
        self.guidance_scale = float(guidance_scale)
        if background is not None and int(background) not in self.classes:
            raise ValueError(f"background={background} must be one of the fine-tuned classes {self.classes.tolist()}")
        self.background = None if background is None else int(background)
        if len(self.target_outputs) < 1:
            raise ValueError(f"every class {self.classes.tolist()} is background: nothing to generate toward")

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def target_outputs(self) -> np.ndarray:
        """Output indices of the classes that generations may be drawn toward (every class but background)."""
        return target_outputs(self.classes, () if self.background is None else (self.background,))

    def _eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.model(x, torch.as_tensor(t, device=x.device), class_labels=y).sample
        return as_epsilon(self.scheduler, self.prediction, x, t, out)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        null = torch.full((len(x),), self.null, dtype=torch.long, device=x.device)
        if y is None:
            return self._eps(x, t, null)
        y = y.to(x.device)
        if self.guidance_scale == 1.0:
            return self._eps(x, t, y)
        t2 = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t  # a per-sample t covers both halves
        both = self._eps(torch.cat([x, x]), t2, torch.cat([null, y]))
        eps_u, eps_c = both.chunk(2)
        return eps_u + self.guidance_scale * (eps_c - eps_u)


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    classes: np.ndarray
    losses: list[float]
    resumed_from: int


def _param_groups(model: torch.nn.Module, c: cfg.LoraConfig) -> list[dict[str, Any]]:
    """The trainable parameters: one group at ``lr``, or, with ``class_lr``, the class embedding's in a second group
    at ``class_lr`` (one group as before otherwise, so an earlier release's optimizer checkpoint still loads)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if c.class_lr is None:
        return [{"params": [p for _, p in named]}]
    cls = [p for n, p in named if "class_embedding" in n]
    assert cls, "the conditional UNet has a trainable class embedding"
    return [{"params": [p for n, p in named if "class_embedding" not in n]}, {"params": cls, "lr": c.class_lr}]


def _cuda_indices(device: str) -> list[int]:
    """The CUDA device whose generator a step's fork of torch's RNG saves and restores (none on the CPU)."""
    d = torch.device(device)
    return [] if d.type != "cuda" else [d.index if d.index is not None else torch.cuda.current_device()]


def _trainable_state(model: torch.nn.Module, full: bool) -> dict[str, torch.Tensor]:
    if full:
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def _load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], full: bool) -> None:
    if full:
        model.load_state_dict(state)
        return
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, state)


def _dropout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a target's dropout masks at ``step`` on process ``rank``: one process's (rank 0's) as before;
    another process's its own (they drew the same masks for other rows, which no single process does)."""
    if rank == 0:
        return seed * 1_000_003 + step
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def finetune(
    target: UNetDenoiser,
    x0: torch.Tensor,
    labels: np.ndarray,
    c: cfg.LoraConfig,
    out: str | Path,
    *,
    target_fingerprint: str | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    group: ProcessGroup = SINGLE,
    background: int | None = None,
) -> FinetuneResult:
    """Fine-tune ``target`` on ``x0`` (n, C, H, W) in [-1, 1] with surrogate ``labels`` (n,; -1 = unlabelled,
    left out) and write the result to ``out`` (see the module docstring). Resumes from ``out/work``. Under a
    launch of several processes each trains on its rows of every batch and the main one writes
    (``distributed.py``). ``background``: the label value of memorization-aware labels' background class (trained
    like the others, recorded so that sampling never targets it). ``target_fingerprint`` keys the resumable
    checkpoint by the target (a run passes its model's; None: the fingerprint of ``target``'s weights and
    scheduler), so a checkpoint of another target in ``out`` is never continued."""
    if not isinstance(target, UNetDenoiser):
        raise ValueError("side-lora fine-tunes a diffusers UNet2DModel target; this target is a plain callable")
    # (other sizes trained and were saved, NaN images too, 0-255 pixels as if in [-1, 1], float labels were
    # truncated into classes; a float64 set or labels of another length met torch's errors)
    check_float_images(x0, "side-lora: x0", target.sample_shape)
    labels = integer_labels(labels, "side-lora: labels")
    if labels.shape != (len(x0),):
        raise ValueError(f"side-lora: labels must be one per image of x0 ({len(x0)},), got shape {labels.shape}")
    x0 = x0.float()
    keep = labels >= 0
    classes = np.unique(labels[keep])
    if len(classes) < 2:
        raise ValueError(f"side-lora: {len(classes)} labelled cluster(s); it needs labels of at least 2 classes")
    if background is not None and int(background) not in classes:
        raise ValueError(f"background={background} is not among the labels {classes.tolist()}")
    x = x0[torch.from_numpy(keep)]
    y = torch.as_tensor(np.searchsorted(classes, labels[keep]), dtype=torch.long)
    out = Path(out)
    cfg.check_path(out, "out")
    if out.exists() and not out.is_dir():  # (found at the first checkpoint, checkpoint_every steps in)
        raise ValueError(f"side-lora: out {str(out)!r} is a file; expected a folder to write the fine-tune to")
    check_writable(out, "side-lora: out")
    full = c.rank == "full"
    with torch.random.fork_rng():
        torch.manual_seed(c.seed)
        model = attach_adapters(conditional_unet(target.unet, len(classes)), c)
    model.to(device).train()
    opt = torch.optim.AdamW(_param_groups(model, c), lr=c.lr, weight_decay=0.0)
    weights = module_fingerprint(target.unet, target.scheduler)  # (recorded with the fine-tune: load_finetuned)
    if target_fingerprint is None:
        target_fingerprint = weights
    # a longer fine-tune into the same ``out`` continues a shorter one (a run's lora stage keys ``steps``, and
    # starts afresh, its work folder removed, when they change)
    key = fingerprint_of({k: v for k, v in lora_settings(c).items() if k not in ("steps", "checkpoint_every")},
                         array_fingerprint(x, y), target_fingerprint)
    ckpt = out / "work" / "checkpoint"
    start, losses = 0, []
    found = read_checkpoint(ckpt, key, c.steps, "trainable.safetensors", "side-lora", ("losses",))
    group.barrier()  # every process has read the checkpoint before the main one may discard or replace it
    if found is not None:
        _load_trainable(model, found.weights, full)
        opt.load_state_dict(found.optimizer)
        start, losses = int(found.state["step"]), list(found.state["losses"])
        log.info("side-lora: resuming at step %d", start)
    elif ckpt.exists() and group.main:
        shutil.rmtree(ckpt)
    sched = target.scheduler
    n_t = int(sched.config.num_train_timesteps)
    null = len(classes)
    n_batch = min(c.batch_size, len(x))
    rows = group.local_rows(n_batch)
    net = group.data_parallel(model, device)
    rates = sorted({m.p for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0})
    if rates and group.world > 1 and group.main:
        log.warning("side-lora: the target has dropout (p=%s): each of the %d processes draws the masks of its own "
                    "rows, so the adapters differ from one process's beyond float rounding (the stage's fingerprint "
                    "does not record the number of processes)", ", ".join(f"{p:g}" for p in rates), group.world)
    for step in range(start + 1, c.steps + 1):
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        idx = torch.randint(0, len(x), (n_batch,), generator=g)
        xb, yb = x[idx], y[idx].clone()
        yb[torch.rand(len(yb), generator=g) < c.label_dropout] = null
        t = torch.randint(0, n_t, (len(xb),), generator=g)
        eps = torch.randn(xb.shape, generator=g)
        xt = add_noise(sched, xb, eps, t)
        xt, eps, t, yb = xt[rows], eps[rows], t[rows], yb[rows]  # this process's rows of the global batch
        # a target with dropout draws its masks from torch's global generator: seeded per step, so a resumed
        # fine-tune and one in a process that drew other numbers before train the same
        with torch.random.fork_rng(devices=_cuda_indices(device)):
            torch.manual_seed(_dropout_seed(c.seed, step, group.rank))
            pred = net(xt.to(device), t.to(device), class_labels=yb.to(device)).sample
            want = prediction_target(sched, target.prediction, xb[rows], eps, t).to(device)  # eps for an eps model
            per_row = (pred - want).pow(2).flatten(1).mean(1)
            loss = group.local_loss(per_row, n_batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        losses.append(round(group.batch_mean(per_row, n_batch), 6))
        if not math.isfinite(losses[-1]):  # (the mean of every process's rows: each raises here, none waits) a NaN
            # fine-tune was saved and its stage completed, and every later run reused it to fail at sampling
            raise ValueError(f"side-lora diverged: the loss is {losses[-1]} at step {step} (lora.lr={c.lr:g}); lower "
                             f"lora.lr. Nothing past step {step - 1} was written")
        if progress is not None:
            progress(step, c.steps)
        if group.main and (step % c.checkpoint_every == 0 or step == c.steps):
            with atomic_directory(ckpt) as tmp:
                save_file(_trainable_state(model, full), str(tmp / "trainable.safetensors"))
                torch.save(opt.state_dict(), tmp / "optimizer.pt")
                atomic_write_json(tmp / "state.json", {"step": step, "losses": losses, "resume_key": key})
    model.eval()
    group.check_replicas(model, "side-lora")
    if group.main:
        save_finetuned(model, out, classes, c, losses, background, target=weights)
    return FinetuneResult(classes, losses, start)


def save_finetuned(model: torch.nn.Module, out: Path, classes: np.ndarray, c: cfg.LoraConfig, losses: list[float],
                   background: int | None = None, *, target: str | None = None) -> None:
    """``out/adapter/`` (peft: adapter_config.json + adapter_model.safetensors) or ``out/unet/`` (full), and
    ``out/classes.json``; the work directory stays for a later resume. ``target``: the fingerprint of the target's
    weights and scheduler (``models.forms.module_fingerprint``), which :func:`load_finetuned` checks."""
    form, other = ("unet", "adapter") if c.rank == "full" else ("adapter", "unet")
    with atomic_directory(out / form) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
    if (out / other).exists():  # an earlier fine-tune of the other form in this folder: load_finetuned reads one
        shutil.rmtree(out / other)
    atomic_write_json(out / "classes.json", {"classes": [int(v) for v in classes], "config": cfg.to_dict(c),
                                             "background": None if background is None else int(background),
                                             "target": target,
                                             "final_loss": float(np.mean(losses[-50:])) if losses else None})


def saved_whole(directory: str | Path) -> bool:
    """Whether ``directory`` holds a fine-tuned model that :func:`load_finetuned` can read: a readable
    ``classes.json`` and, whole, the weights file of the form it names (``adapter/`` or ``unet/``) beside its
    config."""
    d = Path(directory)
    try:
        full = read_json(d / "classes.json", dict)["config"]["rank"] == "full"
    except (OSError, ValueError, KeyError, TypeError):
        return False
    form, weights, config = (("unet", "diffusion_pytorch_model.safetensors", "config.json") if full
                             else ("adapter", "adapter_model.safetensors", "adapter_config.json"))
    return (d / form / config).is_file() and whole_safetensors(d / form / weights)


def load_finetuned(target: UNetDenoiser, directory: str | Path, *, guidance_scale: float | None = None,
                   device: str = "cpu") -> ConditionalDenoiser:
    """The fine-tuned conditional model written by :func:`finetune` (safetensors only), of ``target`` only: one
    fine-tuned from another target's weights is refused (its adapters on other base weights are a model nobody
    trained; a full fine-tune would be another target's model beside this one's scheduler)."""
    d = Path(directory)
    if not (d / "classes.json").is_file():
        raise ValueError(f"{str(d)!r} holds no fine-tuned model (expected classes.json)")
    meta: dict[str, Any] = json.loads((d / "classes.json").read_text(encoding="utf-8"))
    made_from = meta.get("target")  # (absent from fine-tunes written before it was recorded: not checked)
    if made_from is not None and made_from != module_fingerprint(target.unet, target.scheduler):
        raise ValueError(f"{str(d)!r} was fine-tuned from another target (its weights or scheduler differ from the "
                         "one given): load it with the target it was made from, or fine-tune this one")
    classes = np.asarray(meta["classes"], dtype=np.int64)
    c = cfg.from_dict(cfg.LoraConfig, meta["config"])
    w = c.guidance_scale if guidance_scale is None else float(guidance_scale)
    try:  # LoraConfig's own check: w != 1 needs a null label, which only label dropout trains
        dataclasses.replace(c, guidance_scale=w)
    except ValueError as e:
        raise ValueError(f"{str(d)!r} (fine-tuned with label_dropout={c.label_dropout}): {e}") from None
    form = d / ("unet" if c.rank == "full" else "adapter")  # the form classes.json names, not whichever folder exists
    if not form.is_dir():
        raise ValueError(f"{str(d)!r} holds no {form.name}/ folder, which its classes.json (rank {c.rank!r}) names")
    with torch.random.fork_rng():  # (building the model drew its throwaway initial weights from the caller's RNG)
        model = _load_form(form, c, target, classes)
    return ConditionalDenoiser(model.to(device), target, classes, w, meta.get("background"))


def _load_form(form: Path, c: cfg.LoraConfig, target: UNetDenoiser, classes: np.ndarray) -> torch.nn.Module:
    """The fine-tuned model in ``form`` (``unet/`` of a full fine-tune, else peft's ``adapter/``)."""
    if c.rank == "full":
        model = UNet2DModel.from_pretrained(form, use_safetensors=True)
        if model.config.num_class_embeds != len(classes) + 1:  # (the null label read another class's row)
            raise ValueError(f"{str(form)!r} does not fit the target with the {len(classes)} classes and null label "
                             f"that classes.json names: its class embedding has {model.config.num_class_embeds} "
                             f"rows, not {len(classes) + 1}")
    else:
        from peft import PeftModel

        if not (form / "adapter_model.safetensors").is_file():  # (peft took a pickled .bin in its place, or said
            # "Repo id must be in the form ..." for a folder without weights)
            raise ValueError(f"{str(form)!r} holds no adapter_model.safetensors (peft's safetensors adapter weights, "
                             "which finetune writes)")

        try:
            model = PeftModel.from_pretrained(conditional_unet(target.unet, len(classes)), str(form))
        except RuntimeError as e:  # (torch's list of size mismatches: edited classes.json, or another architecture)
            said = str(e).splitlines()
            raise ValueError(f"{str(form)!r} does not fit the target with the {len(classes)} classes and null label "
                             "that classes.json names: " + next((x.strip() for x in said if "mismatch" in x), said[0])
                             ) from None
    return model


__all__ = ["conditional_unet", "attach_adapters", "ConditionalDenoiser", "finetune", "save_finetuned",
           "load_finetuned", "saved_whole", "FinetuneResult"]
