"""The run directory: resolved config, manifest, atomic writes, skip and resume.

Layout (see DESIGN.md)::

    run/
      config.yaml      resolved config, every default written out
      manifest.json    per stage: status, fingerprint of its inputs + config, versions, timings
      synthetic/ features/ surrogate/ classifier/ extraction/<method>/ evaluation/<method>/ report/

Every file is written to a temporary name in the same directory and renamed into place, so a crash never
leaves a half-written file. A stage whose fingerprint (its config plus its inputs' fingerprints) matches a
``complete`` entry is skipped; a stage that was interrupted resumes from what it wrote completely; a stage
whose fingerprint changed is cleared and redone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import config as cfg

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


# --------------------------------------------------------------------------------------------------
# atomic writes


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def fingerprint_of(*parts: Any) -> str:
    """sha256 of a JSON rendering of ``parts`` (configs, other fingerprints, numbers)."""
    blob = json.dumps([cfg.to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True,
                      default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()


def versions() -> dict[str, str]:
    out = {}
    for dist in ("side-extract", "torch", "diffusers", "numpy", "scikit-learn", "faiss-cpu", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


# --------------------------------------------------------------------------------------------------
# run directory


class RunDir:
    """A run directory and its manifest.

    Parameters
    ----------
    path : the directory (created if missing)
    """

    MANIFEST = "manifest.json"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run directory {str(self.path)!r} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)

    # manifest ----------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        p = self.path / self.MANIFEST
        if not p.exists():
            return {"stages": {}}
        return read_json(p)

    def _write_manifest(self, m: dict[str, Any]) -> None:
        atomic_write_json(self.path / self.MANIFEST, m)

    def stage_entry(self, stage: str) -> dict[str, Any] | None:
        return self.manifest()["stages"].get(stage)

    def stage_dir(self, stage: str) -> Path:
        d = self.path / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def begin(self, stage: str, fingerprint: str, inputs: dict[str, str] | None = None) -> Literal["skip", "resume", "fresh"]:
        """Start ``stage``: say whether to skip it, resume it, or start it afresh (its folder cleared)."""
        entry = self.stage_entry(stage)
        if entry is not None and entry.get("fingerprint") == fingerprint:
            if entry.get("status") == "complete":
                log.info("stage %s: inputs and config unchanged, skipped", stage)
                return "skip"
            decision: Literal["skip", "resume", "fresh"] = "resume"
        else:
            decision = "fresh"
            if (self.path / stage).exists():
                shutil.rmtree(self.path / stage)
        m = self.manifest()
        m["stages"][stage] = {
            "status": "running",
            "fingerprint": fingerprint,
            "inputs": inputs or {},
            "versions": versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "started_unix": time.time(),
        }
        self._write_manifest(m)
        return decision

    def complete(self, stage: str, **info: Any) -> None:
        m = self.manifest()
        entry = m["stages"][stage]
        entry["status"] = "complete"
        entry["seconds"] = round(time.time() - entry.get("started_unix", time.time()), 3)
        entry.update(info)
        self._write_manifest(m)

    def write_config(self, run_config: Any) -> None:
        atomic_write_text(self.path / "config.yaml", cfg.dump_yaml(run_config))
