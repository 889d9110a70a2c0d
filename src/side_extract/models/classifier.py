"""Noise-aware (time-dependent) ResNet classifier p(y | x_t, t), and its time-independent twin.

Architecture (the SIDE paper's appendix): a ResNet whose *single* time module sits right after the first
BatchNorm: the timestep's sinusoidal embedding goes through an MLP and either scale-shifts
(``h * (1 + scale) + shift``, FiLM) or is added to the normalised stem features. Everything after that is a
plain ResNet (BasicBlocks, 18/34-style depths), so the same network with ``time_mode="none"`` is the
standard time-independent classifier of the Carlini Cond baseline. ``time_blocks="every"`` conditions every
residual block on t as well (guided-diffusion's classifier: the time embedding projected and added, or
scale-shifted, after each block's first BatchNorm), beyond the paper's single module.

``backbone="unet"`` (beyond the paper; the extraction-power issue's "diffusion features" signal) replaces the
ResNet by the *target's own* frozen UNet at the same t: the mean-pooled outputs of each down block and of the
mid block (captured with forward hooks during the UNet's forward pass) feed a trained two-layer head. Only
the head is trained and saved; the UNet's weights are passed detached (``torch.func.functional_call``), so
gradients reach the input x_t (guidance) and the head, never the target.

Works from 8x8 to 128x128 and 1 or 3 channels: small images keep full resolution in the stem (3x3 conv,
stride 1, as CIFAR ResNets do); from 64 px the stem downsamples by 2 and max-pools, as ImageNet ResNets do.
Saved as ``model.safetensors`` + ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from safetensors.torch import load_file, save_file

from ..runs import atomic_directory, read_json, whole_safetensors

TimeMode = Literal["scale_shift", "add", "none"]
DEPTHS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

# a noise-aware classifier's held-out accuracy is measured per quarter of the training timesteps: each needs one
MIN_TRAIN_TIMESTEPS = 4


@dataclasses.dataclass(frozen=True)
class ClassifierArch:
    """Everything needed to rebuild a classifier (written to ``config.json``)."""

    num_classes: int
    in_channels: int
    image_size: int
    depth: int = 18
    width: int = 32
    time_mode: TimeMode = "scale_shift"
    time_embed_dim: int = 128
    classes: tuple[int, ...] = ()  # the surrogate-label (cluster) id of each output, in order
    time_blocks: Literal["first", "every"] = "first"
    backbone: Literal["resnet", "unet"] = "resnet"

    def __post_init__(self) -> None:
        # the sizes are integers (not bools): 3.0 classes met a bare torch TypeError building the network, an image
        # size of 8.5 loaded; time_embed_dim 1 is no sinusoidal embedding at all (diffusers' Timesteps(1) is all zero:
        # the noise-aware classifier ignored t without a word)
        for name, least in (("num_classes", 2), ("in_channels", 1), ("image_size", 8), ("depth", 1), ("width", 1),
                            ("time_embed_dim", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"{name}={value!r} must be an integer >= {least}")
        if self.backbone == "resnet" and self.depth not in DEPTHS:  # the UNet's features have no depth of their own
            raise ValueError(f"depth={self.depth} must be one of {sorted(DEPTHS)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes} must be >= 2 (guidance needs a choice of labels)")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels={self.in_channels} must be 1 or 3")
        if not 8 <= self.image_size <= 256:
            raise ValueError(f"image_size={self.image_size} must be between 8 and 256")
        if self.time_mode not in ("scale_shift", "add", "none"):
            raise ValueError(f"time_mode={self.time_mode!r} must be 'scale_shift', 'add' or 'none'")
        if self.time_blocks not in ("first", "every"):
            raise ValueError(f"time_blocks={self.time_blocks!r} must be 'first' or 'every'")
        if self.backbone not in ("resnet", "unet"):
            raise ValueError(f"backbone={self.backbone!r} must be 'resnet' or 'unet'")
        if self.backbone == "unet" and self.time_mode == "none":
            raise ValueError("backbone='unet' reads the target's features at the sample's timestep; a clean "
                             "(time-independent) classifier must use backbone='resnet'")
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"classes has {len(self.classes)} entries for num_classes={self.num_classes}")
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in self.classes) or \
                len(set(self.classes)) != len(self.classes):  # (floats were cut to ints later; repeats made the
            # output <-> cluster mapping ambiguous)
            raise ValueError(f"classes={list(self.classes)!r} must be distinct integer cluster ids")
        # plain ints, as config.json writes them (numpy integers were accepted, then failed json.dumps after training)
        object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        for name in ("num_classes", "in_channels", "image_size", "depth", "width", "time_embed_dim"):
            object.__setattr__(self, name, int(getattr(self, name)))


class BasicBlock(nn.Module):
    """A ResNet basic block; with ``emb_dim`` its first normalised features are conditioned on a time embedding
    (``mode``: FiLM scale-shift or addition)."""

    def __init__(self, cin: int, cout: int, stride: int, emb_dim: int = 0, mode: str = "scale_shift") -> None:
        super().__init__()
        self.mode = mode
        self.emb = nn.Linear(emb_dim, 2 * cout if mode == "scale_shift" else cout) if emb_dim else None
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.bn1(self.conv1(x))
        if self.emb is not None and emb is not None:
            e = self.emb(F.silu(emb))[:, :, None, None]
            if self.mode == "scale_shift":
                scale, shift = e.chunk(2, dim=1)
                h = h * (1 + scale) + shift
            else:
                h = h + e
        h = F.relu(h)
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class NoiseAwareResNet(nn.Module):
    """``forward(x, t) -> logits``: x (B, C, H, W) in [-1, 1], t (B,) training timesteps (ignored when
    ``time_mode == "none"``)."""

    def __init__(self, arch: ClassifierArch) -> None:
        super().__init__()
        self.arch = arch
        w = arch.width
        big = arch.image_size >= 64
        self.conv1 = nn.Conv2d(arch.in_channels, w, 7 if big else 3, 2 if big else 1, 3 if big else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.pool = nn.MaxPool2d(3, 2, 1) if big else nn.Identity()
        if arch.time_mode != "none":
            self.time_proj = Timesteps(arch.time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
            out = 2 * w if arch.time_mode == "scale_shift" else w
            self.time_mlp = TimestepEmbedding(arch.time_embed_dim, arch.time_embed_dim, out_dim=out)
        layers, cin = [], w
        every = arch.time_mode != "none" and arch.time_blocks == "every"
        if every:  # the shared embedding every block projects (guided-diffusion: one time MLP, a Linear per block)
            self.block_time_mlp = TimestepEmbedding(arch.time_embed_dim, arch.time_embed_dim)
        for i, n_blocks in enumerate(DEPTHS[arch.depth]):
            cout = w * 2**i
            for j in range(n_blocks):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1,
                                         arch.time_embed_dim if every else 0, arch.time_mode))
                cin = cout
        self.layers = nn.ModuleList(layers)
        self.fc = nn.Linear(cin, arch.num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        h = self.bn1(self.conv1(x))
        block_emb = None
        if self.arch.time_mode != "none":
            if t is None:
                raise ValueError("a time-dependent classifier needs the timestep t")
            t = torch.as_tensor(t, device=x.device).reshape(-1).expand(len(x))
            proj = self.time_proj(t).to(h.dtype)
            emb = self.time_mlp(proj)[:, :, None, None]
            if self.arch.time_mode == "scale_shift":
                scale, shift = emb.chunk(2, dim=1)
                h = h * (1 + scale) + shift
            else:
                h = h + emb
            if self.arch.time_blocks == "every":
                block_emb = self.block_time_mlp(proj)
        h = self.pool(F.relu(h))
        for layer in self.layers:
            h = layer(h, block_emb)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class UNetFeatureClassifier(nn.Module):
    """``forward(x, t) -> logits`` from the target UNet's features at the same t (``backbone="unet"``).

    The UNet is held outside the module's registry: it is not a parameter, not in the state dict and not moved
    by ``.to``; it stays on its own (the target's) device. ``arch.width`` sets the head's hidden size (4 x width).
    """

    def __init__(self, arch: ClassifierArch, unet: nn.Module) -> None:
        super().__init__()
        if arch.backbone != "unet":
            raise ValueError(f"UNetFeatureClassifier needs backbone='unet', got {arch.backbone!r}")
        self.arch = arch
        object.__setattr__(self, "_unet", unet)
        self._blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else [])]
        device = next(unet.parameters()).device
        with torch.no_grad():
            dim = self.features(torch.zeros((1, arch.in_channels, arch.image_size, arch.image_size), device=device),
                                torch.zeros(1, dtype=torch.long, device=device)).shape[1]
        hidden = 4 * arch.width
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, arch.num_classes))

    @property
    def unet(self) -> nn.Module:
        return self._unet

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, D): the mean over pixels of each down block's and the mid block's output, concatenated."""
        captured: list[torch.Tensor] = []

        def keep(_module: nn.Module, _inputs: object, output: object) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        hooks = [b.register_forward_hook(keep) for b in self._blocks]
        try:
            params = {k: v.detach() for k, v in self._unet.named_parameters()}
            t = torch.as_tensor(t, device=x.device).reshape(-1).expand(len(x))
            torch.func.functional_call(self._unet, params, (x, t))
        finally:
            for h in hooks:
                h.remove()
        return torch.cat([f.float().mean((2, 3)) for f in captured], 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if t is None:
            raise ValueError("the UNet-feature classifier needs the timestep t")
        return self.head(self.features(x, t))


Classifier = NoiseAwareResNet | UNetFeatureClassifier


def _check_unet(unet: nn.Module | None) -> None:
    if unet is None or not hasattr(unet, "down_blocks"):
        raise ValueError("backbone='unet' needs the target's diffusers UNet2DModel (a plain callable target "
                         "has no features to read)")


def build_classifier(arch: ClassifierArch, unet: nn.Module | None = None) -> Classifier:
    """The classifier ``arch`` describes; ``backbone="unet"`` needs the target's ``unet``."""
    if arch.backbone == "unet":
        _check_unet(unet)
        return UNetFeatureClassifier(arch, unet)
    return NoiseAwareResNet(arch)


def save_classifier(model: Classifier, directory: str | Path, extra: dict | None = None) -> None:
    """Write ``model.safetensors`` (the trained weights: a UNet-feature classifier's head only) and
    ``config.json`` (arch + ``extra``) atomically."""
    with atomic_directory(directory) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        meta = {"arch": dataclasses.asdict(model.arch), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def saved_whole(directory: str | Path) -> bool:
    """Whether ``directory`` holds a classifier :func:`load_classifier` can read: a ``config.json`` with its
    architecture, and the weights file whole."""
    try:
        arch = read_json(Path(directory) / "config.json", dict)["arch"]
    except (OSError, ValueError, KeyError):
        return False
    return isinstance(arch, dict) and whole_safetensors(Path(directory) / "model.safetensors")


def load_classifier(directory: str | Path, device: str | torch.device = "cpu", *, unet: nn.Module | None = None
                    ) -> Classifier:
    """Load a classifier saved by :func:`save_classifier`, in eval mode (safetensors only); a UNet-feature
    classifier needs the target's ``unet`` it was trained on."""
    d = Path(directory)
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise ValueError(f"{str(d)!r} is not a saved classifier (expected config.json and model.safetensors)")
    damaged = (f"the classifier in {str(d)!r} is damaged (%s): restore it, or delete the folder and train it again "
               "(side train-classifier, or side extract --force in its run)")
    try:
        arch_d = json.loads((d / "config.json").read_text(encoding="utf-8"))["arch"]
        if not isinstance(arch_d, dict):
            raise ValueError(f"its arch is {type(arch_d).__name__}, not an object")
        arch_d.pop("num_train_timesteps", None)  # written by versions before 0.2, never used
        arch_d["classes"] = tuple(arch_d.get("classes", ()))
        arch = ClassifierArch(**arch_d)
    except (ValueError, KeyError, TypeError) as e:  # (not JSON, no arch, unknown fields: a traceback before)
        raise ValueError(damaged % f"config.json: {type(e).__name__} {e}") from None
    if arch.backbone == "unet":  # the caller's part, not the folder's: said as it is
        _check_unet(unet)
    try:
        with torch.random.fork_rng():  # its random initialisation, overwritten below, leaves the caller's RNG alone
            model = build_classifier(arch, unet)
    except (ValueError, RuntimeError, TypeError) as e:  # (an architecture no network can have: a bare torch error)
        raise ValueError(damaged % f"config.json: {type(e).__name__} {e}") from None
    try:
        weights = load_file(str(d / "model.safetensors"))
    except Exception as e:  # (safetensors' own SafetensorError is no ValueError)
        raise ValueError(damaged % f"model.safetensors: {e}") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # (weights of another architecture than config.json says)
        raise ValueError(damaged % f"model.safetensors does not fit config.json: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()
