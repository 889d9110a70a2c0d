"""Image sets: folders of PNG/JPEG, ``.npz`` files, bundled real data; conversions; fingerprints.

Every image set is held as uint8 pixels of shape ``(N, H, W, C)`` (C = 1 or 3). Conversion to the
float range the models use, ``(N, C, H, W)`` in [-1, 1], happens in :func:`to_float` and back in
:func:`to_uint8`, and nowhere else.

Specs accepted by :func:`load_image_set`:

- ``digits`` / ``digits:N``: scikit-learn's bundled digits (1,797 8x8 grayscale, labels 0-9); with N,
  the class-balanced subset "first N/10 of each class in dataset order" (as Gu et al. build theirs);
- a folder of ``.png``/``.jpg``/``.jpeg`` files (sorted by name);
- an ``.npz`` file with key ``images`` (uint8, (N, H, W) or (N, H, W, C)) and optional ``labels``;
- a directory of ``shard-*.npz`` files as written by ``side sample`` / ``side extract``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import numbers
import os
import struct
import tokenize
import unicodedata
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import check_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# image formats Pillow may not open here (no plugin installed), left out of a folder with a warning all the same
UNOPENED_IMAGE_SUFFIXES = (".heic", ".heif", ".jxl", ".dng", ".cr2", ".nef", ".arw", ".svg")


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSet:
    """A set of images with optional labels and per-image ids.

    Attributes
    ----------
    images : (N, H, W, C) uint8
    labels : (N,) int64 or None
    ids : (N,) int64, the images' indices in their source (global sample index for generations)
    name : where the set came from
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    ids: np.ndarray | None = None
    name: str = ""

    def __post_init__(self) -> None:
        for name in ("images", "labels", "ids"):  # a list (of arrays) as the array it is (an AttributeError before)
            if getattr(self, name) is not None and not isinstance(getattr(self, name), np.ndarray):
                object.__setattr__(self, name, np.asarray(getattr(self, name)))
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
            raise ValueError(
                f"images must be uint8 of shape (N, H, W, C) with C in (1, 3), got {self.images.dtype} "
                f"{self.images.shape}"
            )
        n = len(self.images)
        if self.labels is not None and self.labels.shape != (n,):
            raise ValueError(f"labels shape {self.labels.shape} does not match {n} images")
        if self.ids is None:
            object.__setattr__(self, "ids", np.arange(n, dtype=np.int64))
        elif self.ids.shape != (n,):
            raise ValueError(f"ids shape {self.ids.shape} does not match {n} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        _, h, w, c = self.images.shape
        return (c, h, w)

    def fingerprint(self) -> str:
        return fingerprint(self.images)

    def to_float(self) -> torch.Tensor:
        return to_float(self.images)

    def subset(self, idx: np.ndarray) -> "ImageSet":
        return ImageSet(
            self.images[idx],
            None if self.labels is None else self.labels[idx],
            self.ids[idx],
            self.name,
        )


def labelled_classes(labels: np.ndarray | None) -> int:
    """How many classes ``labels`` holds (-1: unlabelled); 0 without labels. A classifier on them needs 2."""
    return 0 if labels is None else len(np.unique(labels[labels >= 0]))


def fingerprint(images: np.ndarray) -> str:
    """sha256 over the array's shape and its pixel bytes (C order)."""
    h = hashlib.sha256()
    h.update(repr(tuple(images.shape)).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def integer_labels(labels: Any, what: str = "labels") -> np.ndarray:
    """``labels`` as an array, refused unless it holds integers (or booleans): a float label was truncated to
    another class without a word. ``what``: how the error names them."""
    lab = np.asarray(labels)
    if not (np.issubdtype(lab.dtype, np.integer) or np.issubdtype(lab.dtype, np.bool_)):
        raise ValueError(f"{what} must hold integers, got {lab.dtype}")
    return lab


def check_image_set(value: Any, name: str) -> None:
    """Refuse ``value`` unless it is an :class:`ImageSet`, naming the argument (an array or a spec given instead was
    an AttributeError deep inside)."""
    if not isinstance(value, ImageSet):
        raise ValueError(f"{name} must be an ImageSet (side_extract.load_image_set('digits:100'), or "
                         f"side_extract.ImageSet(uint8 (N, H, W, C) images)), got {type(value).__name__}")


def check_levels(images: np.ndarray, name: str) -> None:
    """Refuse uint8 images whose every pixel is 0 or 1: images in [0, 1] cast to uint8 (which truncates them),
    not 0-255 images; audited or trained on as they are, they are near-black and every method finds nothing. For
    images given as a training set (a model's generations may be all black)."""
    if images.size and images.max() <= 1:
        raise ValueError(f"{name}: every pixel is 0 or 1, so these look like images in [0, 1] cast to uint8 (which "
                         "truncates them); give uint8 in 0-255, e.g. (x * 255).round().astype(np.uint8)")


def check_float_images(x: Any, name: str, shape: Sequence[int] | None = None) -> None:
    """Refuse ``x`` unless it is images as the stages take them: a float torch tensor (n, C, H, W) in [-1, 1]
    (:func:`to_float` of uint8 images); ``shape``: the (C, H, W) it must have (a model's ``sample_shape``)."""
    form = "a float torch tensor (n, C, H, W) in [-1, 1] (side_extract.data.to_float of uint8 (N, H, W, C) images)"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: images must be {form}, got {got}")
    if x.ndim != 4 or (shape is None and x.shape[1] not in (1, 3)):
        raise ValueError(f"{name}: images must be {form}, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"{name}: images are {tuple(x.shape[1:])} (C, H, W) but the model's are {tuple(shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: images hold NaN or infinite values")
    if x.numel() and (float(x.min()) < -1.001 or float(x.max()) > 1.001):
        raise ValueError(f"{name}: images must lie in [-1, 1], got values {float(x.min()):g}..{float(x.max()):g} "
                         "(0-255 pixels? use side_extract.data.to_float)")


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), rounding as diffusers' pipelines do."""
    x = (x.detach().float().cpu() / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def check_size(size: Any, name: str = "resize", what: str = "image size") -> None:
    """Refuse an image size (or another count, ``what``) that is not a positive integer (a string or 2.5 was a
    TypeError inside torch; a negative batch size left a loop empty and its output uninitialised)."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
        raise ValueError(f"{name}={size!r} must be a positive {what} (an integer)")


def _warn_stretched(where: str, non_square: list[str], size: int, count: int | None = None) -> None:
    """One warning for a set whose non-square images (``non_square``: each named, or the first few of ``count``) a
    resize stretches (diffusers' training scripts centre-crop; it was done in silence)."""
    if non_square:
        warnings.warn(f"{count or len(non_square)} image(s) of {where} are not square (the first: "
                      f"{', '.join(non_square[:3])}) and are stretched to {size}x{size}: their aspect ratio changes; "
                      "crop them to squares first where the model was trained on crops", UserWarning, stacklevel=3)


RESIZE_BYTES = 64 * 2**20  # resize works on blocks of images whose float32 copies fit in this many bytes


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (N, H, W, C) to (N, size, size, C): bilinear with antialiasing (torch), a block of images at a
    time (:data:`RESIZE_BYTES` of float32 input or output), so that the memory beyond the result stays bounded (the
    whole set's float32 copies took 12x the result's size: 2.3 GB for 4,000 images resized to 128)."""
    check_size(size)
    if images.shape[1:3] == (size, size):
        return images
    n, h, w, c = images.shape
    out = np.empty((n, size, size, c), dtype=np.uint8)
    step = max(1, RESIZE_BYTES // (4 * c * max(h * w, size * size)))
    for a in range(0, n, step):
        # (a copy of the block: torch shares no memory with a flipped view's negative strides, which np.require
        # let through for a block of one image, nor with a read-only array such as PIL's, of which it warned)
        x = torch.from_numpy(images[a:a + step].copy()).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[a:a + step] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def balanced_first_n(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first ``n / C`` images of each of the C classes, in dataset order.

    When ``n`` is not a multiple of C, the first ``n % C`` classes (by label value) get one more.
    """
    classes = np.unique(labels)
    per, extra = divmod(n, len(classes))
    picked = []
    for k, c in enumerate(classes):
        want = per + (1 if k < extra else 0)
        idx = np.flatnonzero(labels == c)[:want]
        if len(idx) < want:
            raise ValueError(f"n={n} asks for {want} images of class {c}, but only {len(idx)} exist")
        picked.append(idx)
    return np.sort(np.concatenate(picked))


def largest_balanced(labels: np.ndarray) -> int:
    """The largest n :func:`balanced_first_n` can take from ``labels`` (a scan of every size)."""
    per_class = np.bincount(labels)
    return max(m for m in range(1, len(labels) + 1) if all(
        m // len(per_class) + (k < m % len(per_class)) <= have for k, have in enumerate(per_class)))


def load_digits_set(n: int | None = None) -> ImageSet:
    """scikit-learn's digits as uint8 (1797, 8, 8, 1); pixel value v in 0..16 maps to round(v * 255 / 16)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    ids = np.arange(len(images), dtype=np.int64)
    name = "digits"
    if n is not None:
        try:
            if n < 1:
                raise ValueError(n)
            idx = balanced_first_n(labels, n)
        except ValueError:  # name the largest class-balanced subset
            raise ValueError(f"digits:{n} must ask for 1..{largest_balanced(labels)} images (a class-balanced "
                             f"subset; the rarest class has {np.bincount(labels).min()} images); `digits` alone is "
                             f"all {len(images)}") from None
        images, labels, ids, name = images[idx], labels[idx], ids[idx], f"digits:{n}"
    return ImageSet(images, labels, ids, name)


def _nested_images(path: Path) -> list[str]:
    """The image files in ``path``'s subfolders (hidden ones passed over; links to folders not followed), relative."""
    out = []
    for top, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if Path(top) != path:
            out += [str(Path(top, n).relative_to(path)) for n in sorted(names)
                    if Path(n).suffix.lower() in IMAGE_SUFFIXES and not n.startswith(".")]
    return out


def load_folder(path: Path, resize_to: int | None = None) -> ImageSet:
    dangling = sorted(p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_symlink()
                      and not p.exists())
    if dangling:  # (left out without a word, as git-annex or DVC leave files not fetched: a copy of one went uncounted)
        raise ValueError(f"{len(dangling)} image file(s) in {str(path)!r} are symbolic links to nothing (the first: "
                         f"{', '.join(dangling[:3])}): fetch their targets, or remove the links")
    files, hidden = _image_files(path)
    nested = _nested_images(path)
    if hidden or nested:  # (the images of class subfolders were left out without a word)
        warnings.warn("; ".join(
            ([f"{len(nested)} image file(s) in subfolders of {str(path)!r} are left out (the first: "
              f"{', '.join(nested[:3])}): only the folder's own files are read; give each folder, or move them up"]
             if nested else []) + ([f"{len(hidden)} hidden file(s) are left out (the first: {', '.join(hidden[:3])})"]
                                   if hidden else [])), UserWarning, stacklevel=2)
    if not files:
        raise ValueError(f"folder {str(path)!r} holds no images (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    other_kinds = {*Image.registered_extensions(), *UNOPENED_IMAGE_SUFFIXES} - set(IMAGE_SUFFIXES)
    others = sorted(p.name for p in path.iterdir() if p.suffix.lower() in other_kinds and p.is_file())
    if others:  # (left out without a word: a generation copying one of them counted as no copy)
        warnings.warn(f"{len(others)} image file(s) in {str(path)!r} in another format are left out (the first: "
                      f"{', '.join(others[:3])}); only {', '.join(IMAGE_SUFFIXES)} files are read: convert them to PNG",
                      UserWarning, stacklevel=2)
    if resize_to is None:  # sizes that differ however EXIF turns them, refused from the headers (every image was
        # decoded at full size first: a photo set without train_resize ran out of memory before the message)
        _refuse_mixed_sizes(path, files, _stored_sizes(files), surely=True)
    arrays, see_through, odd_exif, non_square = [], [], [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)  # as a viewer (and diffusers' load_image) shows it
                except (SyntaxError, ValueError, struct.error):  # metadata Pillow cannot parse (its pixels decoded):
                    odd_exif.append(f.name)  # shown as stored, as a viewer does (it was refused as corrupt)
                a = _as_8bit(im, f)
                if resize_to is not None:  # at once: the set's full-size pixels are never all held
                    if a.shape[0] != a.shape[1]:
                        non_square.append(f"{f.name}, {a.shape[0]}x{a.shape[1]}")
                    a = resize(a.reshape(1, *a.shape[:2], -1), resize_to)[0]
                    a = a[..., 0] if a.shape[-1] == 1 else a
                arrays.append(a)
                if _transparent(im):
                    see_through.append(f.name)
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:  # (a bomb: Pillow's
            raise ValueError(f"image file {str(f)!r} is unreadable or corrupt: {e}") from e  # traceback, no file)
    if odd_exif:
        warnings.warn(f"{len(odd_exif)} of the {len(files)} images in {str(path)!r} have EXIF metadata that cannot be "
                      f"read (the first: {', '.join(odd_exif[:3])}); they are taken as stored, not turned by an EXIF "
                      "orientation", UserWarning, stacklevel=2)
    if see_through:  # the alpha channel is dropped: what lies under a transparent pixel is shown as it is
        warnings.warn(f"{len(see_through)} of the {len(files)} images in {str(path)!r} have transparent pixels (the "
                      f"first: {', '.join(see_through[:3])}); their alpha is dropped, so each transparent pixel shows "
                      "the colour stored under it: flatten them onto a background first if that matters",
                      UserWarning, stacklevel=2)
    if resize_to is not None:
        _warn_stretched(repr(str(path)), non_square, resize_to)
    _refuse_mixed_sizes(path, files, [a.shape[:2] for a in arrays])
    rgb = any(a.ndim == 3 for a in arrays)
    if rgb and (grey := [f.name for f, a in zip(files, arrays) if a.ndim == 2]):  # a few stray files turn the set
        colour = [f.name for f, a in zip(files, arrays) if a.ndim == 3]  # RGB: say which, for a greyscale model
        warnings.warn(f"{len(colour)} of the {len(files)} images in {str(path)!r} are in colour (the first: "
                      f"{', '.join(colour[:3])}) and {len(grey)} greyscale: every image is read as RGB",
                      UserWarning, stacklevel=2)
    h, w = arrays[0].shape[:2]
    stacked = np.empty((len(arrays), h, w, 3 if rgb else 1), np.uint8)
    for i in range(len(arrays)):  # (np.stack, then astype, held three copies of the set at once)
        a = arrays[i]
        stacked[i] = a[..., None] if a.ndim == 2 else a  # (a greyscale image broadcast to RGB where the set is)
        arrays[i] = None
    return ImageSet(stacked, name=str(path))


def _image_files(path: Path) -> tuple[list[Path], list[str]]:
    """The image files of folder ``path`` in the order they are read (their ids: 0, 1, ...), and the hidden ones left
    out (a thumbnail, macOS's ._a.png: taken in as training images, or an unreadable one that stopped the load)."""
    files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=_name_order)
    return [p for p in files if not p.name.startswith(".")], [p.name for p in files if p.name.startswith(".")]


def folder_files(spec: str | Path) -> list[str] | None:
    """The file names behind the ids 0, 1, ... of the image set ``spec`` loads, where it is a folder of image files
    (a set's ids are positions in name order, 10.png before 2.png: the names tell which file an id is); None for
    digits, an .npz file or a folder of shards, whose ids are their own."""
    p = Path(spec)
    if is_digits_spec(spec) or not p.is_dir() or any(p.glob("shard-*.npz")):
        return None
    return [f.name for f in _image_files(p)[0]]


def folder_sizes(spec: str | Path) -> set[tuple[int, int]]:
    """The sizes of the images of folder ``spec`` from their headers alone, each as its sides in increasing order (an
    EXIF orientation may turn it); empty where ``spec`` is no folder of image files or a header cannot be read."""
    files = folder_files(spec)
    if not files:
        return set()
    sizes = _stored_sizes([Path(spec) / f for f in files])
    return set() if None in sizes else {tuple(sorted(s)) for s in sizes if s is not None}


def _name_order(p: Path) -> tuple[str, str]:
    """A folder's files in an order every machine gives: by name, Unicode-composed first (a folder copied from macOS
    holds decomposed names, "e" + accent, which sorted apart from the composed "é" written on Linux: the same images
    got other ids and another fingerprint), then as stored."""
    return unicodedata.normalize("NFC", p.name), p.name


def _stored_sizes(files: list[Path]) -> list[tuple[int, int] | None]:
    """Each file's (height, width) as stored, from its header alone (None where it cannot be read: decoding it says
    why)."""
    out: list[tuple[int, int] | None] = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append((im.size[1], im.size[0]))
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError):
            out.append(None)
    return out


def _refuse_mixed_sizes(path: Path, files: list[Path], sizes: list[tuple[int, int] | None], *,
                        surely: bool = False) -> None:
    """Refuse a folder whose images have more than one size (``sizes``, per file; None: unknown). ``surely``: sizes
    as stored, before an EXIF orientation turns some: only sizes that differ either way round are refused."""
    examples: dict[tuple[int, int], str] = {}
    for f, size in zip(files, sizes):
        if size is not None:
            examples.setdefault(tuple(sorted(size)) if surely else size, f"{f.name} is {size[0]}x{size[1]}")
    if len(examples) > 1:
        raise ValueError(f"images in {str(path)!r} have mixed sizes ({', '.join(examples.values())}); resize them all "
                         "to one size (train_resize in a run config; --resize in side evaluate, side calibrate and "
                         "side train-target)")


def _transparent(im: Image.Image) -> bool:
    """Whether an opened image has a pixel that is not fully opaque (an alpha channel or a transparency key)."""
    if im.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in im.info:
        return False
    if im.mode.startswith("I") and isinstance(im.info.get("transparency"), int):  # 16-bit grey with a key: Pillow's
        return bool((np.asarray(im) == im.info["transparency"]).any())  # RGBA conversion drops the key
    return im.convert("RGBA").getchannel("A").getextrema()[0] < 255


def _as_8bit(im: Image.Image, f: Path) -> np.ndarray:
    """A greyscale (H, W) or RGB (H, W, 3) uint8 array of an opened image. 16-bit greyscale is scaled to 8 bits
    (Pillow's ``convert("L")`` clips it, so a 0..65535 ramp became 0 and 255)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"image file {str(f)!r}: integer pixels outside 0..65535 ({a.min()}..{a.max()}); "
                             "convert it to 8 or 16 bits")
        return ((a + 128) // 257).astype(np.uint8)
    if im.mode in ("1", "L", "LA"):
        return np.asarray(im.convert("L"))
    rgb = np.asarray(im.convert("RGB"))
    if im.mode in ("P", "PA") and (rgb == rgb[..., :1]).all():  # a palette of greys (as some tools save greyscale
        return rgb[..., 0].copy()  # PNGs) is a greyscale image: it made the folder 3-channel for a greyscale model
    if _png_colour_type(f) in (0, 4):  # a greyscale PNG that Pillow opened in colour (16-bit grey with alpha: RGBA)
        return rgb[..., 0].copy()
    return rgb


def _png_colour_type(f: Path) -> int | None:
    """The colour type in a PNG file's header (0: greyscale, 4: greyscale with alpha; PNG specification, IHDR), or
    None for another file."""
    with open(f, "rb") as fh:
        head = fh.read(26)
    return head[25] if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" else None


def _memory_bytes() -> int | None:
    """This machine's physical memory (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# What np.load raises for a damaged .npz, beside its TypeError for a bare .npy (each reader says that its own way):
# zlib's for a damaged deflate stream, tokenize's for a damaged array header, zipfile's NotImplementedError for a
# damaged compression method (they went through the readers bare, naming no file: a damaged shard failed every rerun
# of its stage instead of being named and made again)
NPZ_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, tokenize.TokenError,
                   NotImplementedError)


def check_npz_size(path: str | Path) -> None:
    """Refuse an .npz whose arrays inflate past this machine's memory (a zip bomb: a few megabytes of a file someone
    gave that inflate to terabytes, read in full), from its zip directory, before anything is inflated."""
    try:
        with zipfile.ZipFile(path) as z:
            total = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):  # (the loader says what is wrong with it)
        return
    memory = _memory_bytes()
    if memory is not None and total > memory:
        raise ValueError(f"{str(path)!r} inflates to {total / 2**30:.1f} GiB, more than this machine's "
                         f"{memory / 2**30:.1f} GiB of memory: it is damaged or not one of side-extract's (a zip "
                         "bomb?)")


def load_npz(path: Path) -> ImageSet:
    check_npz_size(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k in ("images", "labels", "index")}
            files = z.files
    except MemoryError as e:  # (a header claiming terabytes: "out of memory", advising a smaller batch)
        raise ValueError(f"{str(path)!r} claims an array larger than memory ({e}): it is damaged or not an image "
                         "set") from None
    except TypeError:  # a .npy file: np.load returns a bare array, which is no context manager
        raise ValueError(f"{str(path)!r} is not a readable .npz file: it holds one array (a .npy file), "
                         "not named arrays") from None
    except NPZ_READ_ERRORS as e:
        if isinstance(e, ValueError) and "pickled" in str(e):  # numpy's words for a file that is no array file at
            # all: it would load it as a pickle, and suggests allowing that, which side-extract never does
            raise ValueError(f"{str(path)!r} is not a readable .npz file: not a zip of named arrays (as np.savez "
                             "writes; side-extract never loads pickles)") from None
        raise ValueError(f"{str(path)!r} is not a readable .npz file: {type(e).__name__}: {e}") from e
    if "images" not in arrays:
        raise ValueError(f"{str(path)!r} has no 'images' array (it has: {', '.join(files) or 'nothing'})")
    images, labels, ids = arrays["images"], arrays.get("labels"), arrays.get("index")
    images = _as_nhwc_uint8(images, str(path))
    for name, a in (("labels", labels), ("index", ids)):
        if a is not None:
            if a.ndim != 1:  # (a 0-d index was a TypeError, len() of unsized object; a length is checked below)
                raise ValueError(f"{str(path)!r}: '{name}' has shape {a.shape}, expected ({len(images)},): one per "
                                 "image")
            integer_labels(a, f"{str(path)!r}: '{name}'")
            if a.size and a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max:  # (wrapped to negative ids)
                raise ValueError(f"{str(path)!r}: '{name}' holds {a.max()}, past the largest int64")
    if labels is not None and labels.size and labels.min() < -1:  # (taken as unlabelled in silence)
        raise ValueError(f"{str(path)!r}: 'labels' hold {labels.min()}: classes are 0, 1, ... and -1 "
                         "marks an unlabelled image")
    if ids is not None and len(uniq := np.unique(ids)) != len(ids):  # (distinct nearest images sharing an id
        # counted once: the summary's and the findings' counts fell)
        raise ValueError(f"{str(path)!r}: its 'index' repeats {len(ids) - len(uniq)} value(s); the ids must be "
                         "distinct (they name each image in pairs and findings)")
    try:
        return ImageSet(images, None if labels is None else np.asarray(labels, dtype=np.int64),
                        None if ids is None else np.asarray(ids, dtype=np.int64), str(path))
    except ValueError as e:  # labels or index of another length: say which file
        raise ValueError(f"{str(path)!r}: {e}") from None


def _npz_names(path: Path) -> list[str]:
    """The names of the arrays an npz holds (its zip directory, no array read)."""
    with np.load(path, allow_pickle=False) as z:
        return list(z.files)


class UnreadableShard(ValueError):
    """A shard that does not read (cut short, or damaged since it was written); ``path``: which."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(why)
        self.path = path


def load_shards(path: Path) -> ImageSet:
    """Concatenate ``shard-*.npz`` in ``path`` in order of their sample indices (:class:`UnreadableShard` where one
    does not read)."""
    shards = sorted(path.glob("shard-*.npz"))
    if not shards:
        raise ValueError(f"directory {str(path)!r} holds no shard-*.npz files")
    parts = []
    for s in shards:
        try:
            parts.append(load_npz(s))
        except ValueError as e:
            raise UnreadableShard(s, str(e)) from None
    if len(shards) > 1 and (unindexed := [s.name for s in shards if "index" not in _npz_names(s)]):
        # (each counted 0..n-1: "the shards hold sample indices more than once ... remove the extra files")
        raise ValueError(f"{str(path)!r}: {len(unindexed)} of its {len(shards)} shards have no 'index' array (the "
                         f"first: {', '.join(unindexed[:3])}); shards of one set need each image's sample index")
    if (unlabelled := [s.name for s, p in zip(shards, parts) if p.labels is None]) and len(unlabelled) < len(parts):
        # (one shard without labels dropped every shard's labels, without a word)
        raise ValueError(f"{str(path)!r}: {len(unlabelled)} of its {len(shards)} shards have no 'labels' (the first: "
                         f"{', '.join(unlabelled[:3])}) and the others have: give every shard its labels, or none")
    shapes = {s.name: p.images.shape[1:] for s, p in zip(shards, parts)}
    if len(set(shapes.values())) > 1:  # (numpy's bare "all the input array dimensions ... must match exactly")
        first = next(iter(shapes.items()))
        other = next((n, sh) for n, sh in shapes.items() if sh != first[1])
        raise ValueError(f"{str(path)!r}: its shards hold images of other shapes ({first[0]}: {first[1]}, "
                         f"{other[0]}: {other[1]}, as (H, W, C)); one set's images share one shape")
    labels = None if unlabelled else np.concatenate([p.labels for p in parts])
    ids = np.concatenate([p.ids for p in parts])
    images = np.empty((len(ids), *parts[0].images.shape[1:]), np.uint8)
    at = 0
    for i, p in enumerate(parts):  # each shard's images released once copied (the parts, the set and its reordered
        images[at:at + len(p)] = p.images  # copy were held at once: three times the set)
        at += len(p)
        parts[i] = None
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():  # e.g. a stray copy of a shard: every generation in it would count twice
        raise ValueError(f"{str(path)!r}: the shards hold sample indices more than once (e.g. "
                         f"{uniq[counts > 1][:5].tolist()}); remove the extra shard-*.npz files")
    if (ids[1:] > ids[:-1]).all():  # in order already (as a run's shards are): no reordered copy
        return ImageSet(images, labels, ids, str(path))
    order = np.argsort(ids, kind="stable")
    return ImageSet(images[order], None if labels is None else labels[order], ids[order], str(path))


def _as_nhwc_uint8(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: 'images' must be uint8, got {images.dtype}")
    if images.ndim == 3:
        if images.shape[-1] in (3, 4) and images.shape[1] > 4:  # (H, W, C) of one picture, read as N thin images
            raise ValueError(f"{where}: 'images' of shape {images.shape} looks like one colour image (H, W, C); "
                             f"give a batch (N, H, W, C), e.g. images[None], or (N, H, W) greyscale images")
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: 'images' must have shape (N, H, W) or (N, H, W, C) with C in (1, 3), got {images.shape}")
    if len(images) == 0:
        raise ValueError(f"{where}: 'images' is empty")
    if 0 in images.shape[1:3]:
        raise ValueError(f"{where}: 'images' of shape {images.shape} have no pixels (height or width 0)")
    return images


def absolute_spec(spec: Any) -> Any:
    """An image-set spec that names a file or folder here, made absolute: a run's files are read again from other
    working directories, where a relative path named nothing (or other files). Other specs (``digits:N``, None, a
    name that is no path here) as they are."""
    if not isinstance(spec, (str, Path)) or not str(spec) or is_digits_spec(spec):
        return spec
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def is_digits_spec(spec: Any) -> bool:
    """Whether a data spec names scikit-learn's digits (``digits``, ``digits:N``), whatever folder of that name lies
    here: a string (a ``Path`` names a path, whatever its text)."""
    return isinstance(spec, str) and (spec == "digits" or spec.startswith("digits:"))


def load_image_set(spec: str | Path, resize_to: int | None = None) -> ImageSet:
    """Load an image set from a spec (see the module docstring), optionally resized to a square size."""
    check_path(spec, "spec")
    if resize_to is not None:  # (before the set loads)
        check_size(resize_to, "resize_to")
    s = str(spec)
    if is_digits_spec(spec):  # (a str: a Path can only name a path; str(Path("./digits")) is "digits")
        n = None
        if ":" in s:
            try:
                n = int(s.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"data spec {s!r}: expected digits:N with an integer N") from None
        if Path(s).exists():  # (the folder or file of that name was passed over without a word)
            kind = "folder" if Path(s).is_dir() else "file"
            warnings.warn(f"data spec {s!r} names scikit-learn's digits, not the {kind} {s!r} here; give ./{s} for "
                          "that", UserWarning, stacklevel=2)
        out = load_digits_set(n)
    else:
        p = Path(s)
        if p.is_dir():
            if any(p.glob("shard-*.npz")):
                if pictures := sorted(q.name for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES):
                    # (the shards were read and every image file left out, without a word)
                    raise ValueError(f"folder {s!r} holds both shard-*.npz files and image files ({len(pictures)}, "
                                     f"the first: {', '.join(pictures[:3])}): keep one kind in a folder")
                if stray := sorted(q.name for q in p.glob("*.npz") if not q.name.startswith(("shard-", "."))):
                    # (read as shards, every other npz left out without a word)
                    raise ValueError(f"folder {s!r} holds shard-*.npz files and other .npz files ({len(stray)}, the "
                                     f"first: {', '.join(stray[:3])}): give the other file itself, or move it out")
                out = load_shards(p)
            else:
                out = load_folder(p, resize_to)
        elif p.is_file() and p.suffix.lower() == ".npz":
            out = load_npz(p)
        elif p.exists():
            raise ValueError(f"data spec {s!r}: expected a folder of images, an .npz file, or 'digits[:N]'")
        else:
            raise ValueError(f"data spec {s!r} does not exist (expected a folder, an .npz file, or 'digits[:N]')")
        if is_digits_spec(out.name):  # (a folder 'digits' here, given as ./digits, was named 'digits': the run's
            # sources recorded scikit-learn's digits)
            out = dataclasses.replace(out, name=str(p.absolute()))
    if resize_to is not None and out.images.shape[1:3] != (resize_to, resize_to):
        h, w = out.images.shape[1:3]
        _warn_stretched(repr(s), [f"all {h}x{w}"] if h != w else [], resize_to, len(out))  # (it said "1 image(s)")
        out = ImageSet(resize(out.images, resize_to), out.labels, out.ids, out.name)
    return out
