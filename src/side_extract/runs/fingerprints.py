"""Fingerprints of a stage's inputs (configs, files, arrays, the stage's code version) and the versions recorded."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as cfg
from ..data import is_digits_spec
from .files import _json_default



def fingerprint_of(*parts: Any) -> str:
    """sha256 of a JSON rendering of ``parts`` (configs, other fingerprints, numbers)."""
    blob = json.dumps([cfg.to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True,
                      default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes: a stage that reads a file the user names (a bands file, a TorchScript
    extractor) is keyed by what the file holds, not by its path, so replacing it redoes the stage."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Bump a stage's version when a change of the code changes what the stage writes: every run's cached stage of
# that kind (and, through the fingerprints, everything downstream of it) is then redone instead of reused.
STAGE_VERSIONS: dict[str, int] = {
    "synthetic": 1,
    "features": 1,
    "memorization": 1,
    "surrogate": 2,     # 2: select_k always part of the fingerprint
    "classifier": 2,    # 2: classes split held-out per class; resume keyed by the training data
    "teacher": 2,       # 2: inputs on the classifier's device
    "lora": 1,
    "extraction": 3,    # 2: guidance in guided-diffusion's order (after the x0 clip); 3: its own noise stream
    "calibration": 2,   # 2: held-out images resized like the training set
    "train-features": 1,
    "evaluation": 2,    # 2: a cosine score of 1 in one band (bands meeting at 1 counted it in two, or none)
}


def stage_fingerprint(kind: str, *parts: Any) -> str:
    """The fingerprint of a stage of ``kind`` (a key of :data:`STAGE_VERSIONS`): its code version, its settings
    and the fingerprints of what it reads (``parts``)."""
    if kind not in STAGE_VERSIONS:
        raise ValueError(f"stage kind {kind!r} must be one of {', '.join(STAGE_VERSIONS)}")
    return fingerprint_of({"stage": kind, "version": STAGE_VERSIONS[kind]}, *parts)


# the settings that may name a file or folder (a torchscript extractor by its path after the prefix)
FILE_KEYS = ("model", "train", "evaluate.heldout", "evaluate.bands_file", "evaluate.similarity", "evaluate.quality",
             "features.extractor")


def settings_fingerprint(config: Any, *parts: Any, names: tuple[str, ...] = ()) -> str:
    """A run config's fingerprint that follows the files it names: each value of :data:`FILE_KEYS` that is an
    existing file counts by its bytes, a directory by its files' names, sizes and modification times (a training set
    or bands file rewritten under the same path is other settings). ``names``: values that name no file whatever
    the folder holds (an embedded target's name). Only those keys are read as paths: every string was, so a folder
    named like a value (``model: demo`` beside ``--out demo``, a folder named ``side``) was hashed, the run's own
    among them, and an interrupted run was not recognised by its rerun."""
    named: dict[str, str] = {}
    d = cfg.keyed_dict(config) if dataclasses.is_dataclass(config) else config
    for key, value in cfg.nested_to_dotted(d).items():
        if key not in FILE_KEYS:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(v, str) or not v or len(v) >= 4096 or v in names or is_digits_spec(v):  # (--out digits)
                continue
            spec = v.split("torchscript:", 1)[1] if "torchscript:" in v else v
            p = Path(spec)
            try:
                if p.is_file():
                    named[spec] = file_fingerprint(p)
                elif p.is_dir():
                    files = sorted(f for f in p.rglob("*") if f.is_file())
                    named[spec] = fingerprint_of([(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns)
                                                  for f in files])
            except OSError:
                pass
    return fingerprint_of(d, named, *parts)


def array_fingerprint(*arrays: Any) -> str:
    """sha256 of arrays' dtypes, shapes and bytes (numpy arrays or CPU/device tensors), for data-keyed resume."""
    h = hashlib.sha256()
    for a in arrays:
        if hasattr(a, "detach"):
            a = a.detach().cpu().numpy()
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return None if torch is None else int(torch.get_num_threads())


def versions() -> dict[str, str]:
    out = {}
    for dist in ("side-extract", "torch", "diffusers", "numpy", "scikit-learn", "faiss-cpu", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out
