"""The run directory: resolved config, manifest, atomic writes, skip and resume.

Layout (see DESIGN.md)::

    run/
      config.yaml      resolved config, every default written out
      manifest.json    per stage: status, fingerprint of its inputs + config, the stages it was made from
                       (``inputs``: stage -> fingerprint; what stale_stages reads), versions, timings
      synthetic/ features/ surrogate/ classifier/ extraction/<method>/ evaluation/<method>/ report/

Every file is written to a temporary name in the same directory and renamed into place, so a crash never
leaves a half-written file. A stage whose fingerprint (its config plus its inputs' fingerprints) matches a
``complete`` entry is skipped; a stage that was interrupted resumes from what it wrote completely; a stage
whose fingerprint changed is cleared and redone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import stat
import zipfile
import zlib
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import config as cfg
from .data import ImageSet, check_npz_size, is_digits_spec, load_shards
from .distributed import SINGLE, ProcessGroup

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""A progress callback: ``progress(done, total)``."""

_UMASK = os.umask(0)
os.umask(_UMASK)


# --------------------------------------------------------------------------------------------------
# atomic writes


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".side-tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_directory(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync(path: str | Path) -> None:
    """Put the file or directory ``path`` on disk (fsync through a descriptor of its own)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(path: Path) -> None:
    """Put a rename in ``path`` on disk (fsync of the directory), so that a record written after it (the manifest's
    'complete') cannot outlive it in a power loss; a file system that cannot fsync a directory is left to itself."""
    with contextlib.suppress(OSError):
        _fsync(path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def read_npz(path: str | Path, *keys: str) -> dict[str, np.ndarray] | None:
    """The arrays ``keys`` of ``path``, or None where it is missing or damaged (cut short, not an npz, a key gone):
    a finished stage whose output reads as None is made again (such files failed the run with zipfile's bare
    BadZipFile). Never unpickles."""
    try:
        return npz_arrays(path, *keys)
    except ValueError:  # (npz_arrays' error naming the file: here the stage is made again instead)
        return None


def load_torch_state(path: str | Path) -> Any:
    """A state torch saved (an optimizer's, a checkpoint's), loaded safely: tensors and plain values only. A file
    that holds anything else is a ValueError naming it, as a damaged one is (torch's UnpicklingError is no
    ValueError: such a checkpoint was not passed over, failed every later run, and torch's words advised the
    unsafe load)."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is damaged, or holds objects other than tensors and plain values, which a safe "
                         "load refuses (not a file side-extract wrote)") from None


def shard_opens(path: Path) -> bool:
    """Whether an npz opens with ``images`` and ``index`` among its arrays: its zip directory, at the file's end, is
    read, not its arrays (a file cut short fails here; checking every shard of a finished stage stays cheap)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"images", "index"} <= set(z.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


def shards_hold(directory: Path, n: Any) -> bool:
    """Whether a shard stage's ``directory`` holds ``n`` images in shards that read (their index arrays only): a
    finished stage whose shards were lost or cut short since does not."""
    try:
        return isinstance(n, int) and sum(len(npz_arrays(p, "index")["index"])
                                          for p in sorted(directory.glob("shard-*.npz"))) == n
    except ValueError:  # a shard cut short or damaged
        return False


def npz_arrays(path: str | Path, *keys: str, optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (default: all) of ``path``, and those of ``optional`` that it holds; a missing, damaged or
    incomplete file is one error that names it (zipfile's bare BadZipFile, naming none, ended the report). Never
    unpickles."""
    check_npz_size(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in (*(keys or z.files), *(k for k in optional if k in z.files))}
    except MemoryError as e:  # (a header claiming terabytes: "out of memory", advising a smaller batch)
        raise ValueError(f"{str(path)!r} claims an array larger than memory ({e}): it is damaged or not one of "
                         "side-extract's; remake it (rerun the stage that writes it)") from None
    except KeyError as e:
        raise ValueError(f"{str(path)!r} lacks the array {e}: remake it (rerun the stage that writes it)") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, TypeError) as e:
        why = ("not a zip of named arrays (as np.savez writes; side-extract never loads pickles)"
               if isinstance(e, ValueError) and "pickle" in str(e) else  # (numpy's words suggest unpickling it)
               "one bare array (a .npy file), not named arrays" if isinstance(e, TypeError) else
               f"{type(e).__name__}: {e}")
        raise ValueError(f"{str(path)!r} is not a readable .npz file ({why}): remake it (rerun the stage that "
                         "writes it)") from None


def _seal(root: Path) -> None:
    """Ready a tree for its rename into place: the user's umask on it (mkdtemp makes 0700 directories, safetensors
    writes 0600 files), and its files on disk (fsync, as :func:`atomic_write_bytes` does), so that a power loss
    after the rename cannot leave a whole-looking folder of cut files."""
    os.chmod(root, 0o777 & ~_UMASK)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~_UMASK)
        for f in filenames:
            name = os.path.join(dirpath, f)
            os.chmod(name, 0o666 & ~_UMASK)
            _fsync(name)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".side-tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        _seal(tmp)
        if path.exists():
            # a fresh empty name (rename may replace an empty directory): a leftover of a killed earlier call, or
            # of another process with the same pid in a reused container, cannot block it
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".side-old", dir=path.parent))
            os.replace(path, old)
            os.utime(old)  # (it kept the replaced folder's time: fresh, so no sweep takes it for a leftover yet)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)  # (what is left is a leftover: the next writer's sweep takes it)
        else:
            os.replace(tmp, path)
        _sync_directory(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():  # interrupted between the two renames (Ctrl-C): the old folder back,
            if path.exists():  # not left under a temporary name with path gone (a finished classifier retrained)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, path)
        raise


# atomic_write_bytes' and atomic_directory's names; the marker `side-` keeps a user's own `.notes.20240101.old` out
_LEFTOVER = re.compile(r"\..+\.[a-z0-9_]{8}\.side-(tmp|old)")
LEFTOVER_AGE_S = 900.0  # how long a temporary name must be untouched before the sweep takes it for a leftover


def _legacies(legacy: str | Sequence[str] | None) -> tuple[str, ...]:
    """:meth:`RunDir.begin`'s ``legacy`` as a tuple of fingerprints."""
    return () if legacy is None else (legacy,) if isinstance(legacy, str) else tuple(legacy)


def leftover_of(name: str) -> str | None:
    """The name a temporary name of :func:`atomic_write_bytes` or :func:`atomic_directory` stands for (``.final``
    for ``..final.XXXXXXXX.side-tmp``); None for any other name."""
    return name[1:].rsplit(".", 2)[0] if _LEFTOVER.fullmatch(name) else None


def sweep_leftovers(path: str | Path, now: float | None = None, min_age_s: float = LEFTOVER_AGE_S) -> list[Path]:
    """Remove what writers killed mid-write (SIGKILL, power loss) left in run directory ``path``: the temporary
    files and directories of :func:`atomic_write_bytes` and :func:`atomic_directory` (``.NAME.XXXXXXXX.side-tmp``,
    ``.NAME.XXXXXXXX.side-old``), which nothing reads, once untouched for ``min_age_s`` seconds before ``now`` (the
    file system's clock, which on a network file system can differ from this machine's; default: this machine's).
    :func:`run_lock` calls it for the lock's new holder, before its first write: no other writer of the run's
    stages can be between a temporary name and its rename then, and the age spares what readers such as ``side
    report`` write without the lock (small files, written in an instant). A nested run directory (one with its own
    ``.lock``) is left to its own writers; an entry that cannot be read or removed is left as it is. Returns what
    was removed."""
    root = Path(path)
    before = (time.time() if now is None else now) - min_age_s
    removed = []

    def old(p: Path) -> bool:
        try:
            return not p.is_symlink() and p.lstat().st_mtime < before
        except OSError:  # gone (renamed into place since it was listed) or unreadable
            return False

    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in list(dirnames):
            p = here / name
            leftover = _LEFTOVER.fullmatch(name) is not None
            try:
                nested = (p / ".lock").exists()
            except OSError:  # a folder this user cannot enter
                nested = True
            if leftover or nested or p.is_symlink():
                dirnames.remove(name)  # not walked into
            if leftover and old(p):
                shutil.rmtree(p, ignore_errors=True)
                if not p.exists():
                    removed.append(p)
        for name in filenames:
            p = here / name
            if _LEFTOVER.fullmatch(name) and old(p):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    if removed:
        log.info("run directory %s: removed %d temporary file(s) left by a writer killed mid-write (%s)",
                 root, len(removed), ", ".join(str(p.relative_to(root)) for p in removed[:5]))
    return removed


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


def read_json(path: str | Path, expect: type | None = None) -> Any:
    """A JSON file's value; one that is not JSON (cut short, edited by hand), or, with ``expect`` (``dict``,
    ``list``), whose value is not of that type, is a ValueError naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # (nested beyond Python's stack)
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); it is damaged: restore or delete it") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "a JSON object", list: "a JSON array"}.get(expect, expect.__name__)
        raise ValueError(f"{str(path)!r} holds {type(value).__name__}, not {kind}; it is damaged: restore or delete it")
    return value


def whole_safetensors(path: str | Path) -> bool:
    """Whether ``path`` is a readable safetensors file as long as its header says (safetensors checks both): what a
    stage that skips as complete, or keeps what a killed process saved, asks of the weights it will load."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            return True
    except (OSError, SafetensorError):
        return False


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A resumable training checkpoint read whole: ``state.json`` (``step``, ``resume_key`` and the trainer's
    own entries), its weights and the optimizer's state."""

    state: dict[str, Any]
    weights: dict[str, Any]
    optimizer: dict[str, Any]


def read_checkpoint(ckpt: Path | None, key: Any, steps: int, weights: str, who: str, needs: tuple[str, ...] = ()
                    ) -> Checkpoint | None:
    """The checkpoint in folder ``ckpt`` if it was made with ``key`` at no more than ``steps`` steps (a longer run's
    cannot be wound back) and every file reads whole; else None, and a folder that is there is to be discarded by
    the caller's main process (``who`` names the trainer in the log; ``needs``: the entries of ``state.json`` the
    trainer reads besides ``step``). A damaged file (outside damage: a disk error,
    a copy cut short) failed every later run of the stage with a bare JSON, safetensors or torch error."""
    if ckpt is None or not (ckpt / "state.json").is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = json.loads((ckpt / "state.json").read_text())
        if not isinstance(state, dict) or state.get("resume_key") != key or int(state["step"]) > steps:
            log.info("%s: discarding a checkpoint made from other data or settings, or past %d steps", who, steps)
            return None
        if missing := [k for k in needs if k not in state]:
            raise KeyError(f"state.json has no {', '.join(missing)}")
        return Checkpoint(state, load_file(str(ckpt / weights)),
                          load_torch_state(ckpt / "optimizer.pt"))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        log.warning("%s: the checkpoint in %s is damaged (%s: %s); training from the start", who, ckpt,
                    type(e).__name__, str(e)[:200])
        return None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A run's ``manifest.json``: a JSON object whose ``stages`` maps each stage to an object (its ``inputs``, where
    it has them, an object too), or a ValueError naming the file."""
    m = read_json(path, dict)
    stages = m.get("stages", {})
    if not isinstance(stages, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("inputs") or {}, dict) for e in stages.values()):
        raise ValueError(f"{str(path)!r} is not a run manifest (expected a JSON object whose 'stages' maps each stage "
                         "to an object); it is damaged: restore or delete it")
    if bad := [k for k in stages if not _stage_name(k)]:  # (../../x: a sweep cleared and copied RUN/<stage>)
        raise ValueError(f"{str(path)!r} names stages that are no folder of the run ({', '.join(map(repr, bad[:3]))})"
                         ": it is damaged or not a run's; restore or delete it")
    return m


def _stage_name(name: str) -> bool:
    """Whether ``name`` can be a stage: relative folder names below the run (``extraction/side``), none of them
    empty, ``.`` or ``..``."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") and "\\" not in p for p in parts)


def settings_changed(run: str | Path, rc: cfg.RunConfig,
                     recorded: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> list[str]:
    """``key old -> new`` for each setting of ``rc`` that differs from the config run directory ``run`` was last
    run with (none for a new run): what a rerun into it says before it replaces anything. ``recorded``: the
    config.yaml's dict as ``rc`` spells it (paths made absolute, as an earlier release did not record them)."""
    config = Path(run) / "config.yaml"
    if not config.is_file():
        return []
    try:
        old = cfg.load_yaml(config)
        return cfg.differences(*cfg.as_comparable(rc, recorded(old) if recorded is not None else old))
    except ValueError as e:  # (it blocked the rerun that writes it anew; the stages' fingerprints are in the manifest)
        return [f"none known: the run's config.yaml does not read ({e}), and this run writes it anew"]


def evaluated_methods(run: str | Path) -> dict[str, Path]:
    """Each method run directory ``run`` holds an evaluation of (``evaluation/<method>/metrics.json``) -> that
    folder: the config's methods first, in its order, then the others by name (a directory that ran one method at
    a time, as the benchmarks' replicates do, has a config naming only the last)."""
    run = Path(run)
    stages = read_stages(run)

    def current(m: str) -> bool:
        """Finished, and made from the extraction the run holds now (an evaluation that ``side evaluate --out``
        wrote into the folder has no manifest entry and is taken as it is)."""
        e = stages.get(f"evaluation/{m}")
        if e is None:
            return True
        return e.get("status") == "complete" and not remade_inputs(stages, f"evaluation/{m}")

    found = {p.parent.name: p.parent for p in (run / "evaluation").glob("*/metrics.json")}
    stale = sorted(m for m in found if not current(m))
    if stale:
        log.warning("%s: evaluation of %s left out: unfinished, or made from an extraction the run no longer holds "
                    "(rerun `side extract --run %s` to evaluate it again)", run, ", ".join(stale), run)
    found = {m: d for m, d in found.items() if m not in stale}
    order = _config_methods(run)
    return {m: found[m] for m in sorted(found, key=lambda k: (order.index(k) if k in order else len(order), k))}


def _config_methods(run: Path) -> list[str]:
    conf = run / "config.yaml"
    return list(((cfg.load_yaml(conf).get("extract") or {}).get("methods") or []) if conf.is_file() else [])


def reference_method(run: str | Path, methods: Iterable[str]) -> str | None:
    """The evaluation among ``methods`` that a run's others are set against (evaluation.incomparable): its config's
    first method that has one, made by the call that wrote the config, with its training set and bands (None: the
    config names none of them). Against the largest group that agreed, a second ``audit()`` on another training set
    for one method called that method's new results "not compared" and the earlier call's the reference."""
    return next((m for m in _config_methods(Path(run)) if m in set(methods)), None)


SYNTHETIC_EVALUATION = "synthetic-evaluation"  # the synthetic set measured against the training set (its stage)


def evaluated_synthetic(run: str | Path) -> Path | None:
    """``RUN/synthetic-evaluation`` where it is finished and made from the synthetic set the run holds now, drawn
    from the target the run's config names now, else None."""
    d = Path(run) / SYNTHETIC_EVALUATION
    stages = read_stages(run)
    e = stages.get(SYNTHETIC_EVALUATION)
    if e is None or not (d / "metrics.json").is_file():
        return None
    # (through the synthetic set's own inputs: one another target drew was counted in the findings as this run's)
    if e.get("status") != "complete" or stale_stages(stages, read_model(run)).get(SYNTHETIC_EVALUATION):
        log.warning("%s: the synthetic set's evaluation left out: unfinished, or made from a synthetic set the run no "
                    "longer holds (made again, or drawn from another target)", run)
        return None
    return d


def read_run_config(run: str | Path, config: str | Path | None = None) -> dict[str, Any]:
    """Run directory ``run``'s ``config.yaml`` (or ``config``, a file of the run such as a stage's own
    ``extraction/<m>/config.yaml``) as a dict, with the sets ``audit()`` saved into ``inputs/`` (``train``,
    ``evaluate.heldout``: images given in memory) named where they are now where the recorded absolute path is gone:
    the run was moved or sent on since (its readers looked for them at the old place, "does not exist"). They are
    looked for in the run's ``inputs/``, and a sweep sub-run's (``RUN/sweeps/NAME``, which has none) in its parent's.
    The file's name holds its content's fingerprint, so it is the same set. Every reader of a run's config reads it
    so (the report, :class:`~side_extract.api.Audit`, the sweeps' check of their sub-runs, the step commands).
    """
    run = Path(run)
    d = cfg.load_yaml(run / "config.yaml" if config is None else Path(config))
    homes = [run.resolve() / "inputs"]
    if run.resolve().parent.name == "sweeps":
        homes.append(run.resolve().parent.parent / "inputs")

    def own(spec: Any) -> Any:
        if isinstance(spec, str) and (p := Path(spec)).is_absolute() and p.parent.name == "inputs" and not p.exists():
            return next((str(h / p.name) for h in homes if (h / p.name).is_file()), spec)
        return spec

    if "train" in d:
        d["train"] = own(d["train"])
    if isinstance(d.get("evaluate"), dict) and "heldout" in d["evaluate"]:
        d["evaluate"]["heldout"] = own(d["evaluate"]["heldout"])
    return d


def check_run_directory(path: str | Path, name: str = "run") -> Path:
    """``path`` if it is a run directory (it holds a run's ``config.yaml``: one that reads as a run config); else a
    ValueError that says what it is instead (a readers' check: the report of a folder holding any ``config.yaml``
    was an empty page written into it). ``name``: the argument it came in."""
    cfg.check_path(path, name)
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{str(p)!r} does not exist (expected a run directory: side run or side demo makes one)")
    if not p.is_dir():
        raise ValueError(f"{str(p)!r} is a file, not a run directory")
    if not (p / "config.yaml").is_file():
        raise ValueError(f"{str(p)!r} is not a run directory (it has no config.yaml: side run or side demo makes one)")
    for up in (1, 2):  # a stage folder holds the config it was made with (extraction/<method>/): the report of one
        # was written into it, and side verify said the run held no extraction
        run, stage = p.parents[up - 1] if len(p.parents) >= up else None, "/".join(p.parts[-up:])
        if run is not None and not (p / RunDir.MANIFEST).is_file() and stage in read_stages(run):
            raise ValueError(f"{str(p)!r} is the stage folder {stage}/ of run {str(run)!r}, not a run directory: give "
                             f"{str(run)!r}")
    try:
        cfg.from_dict(cfg.RunConfig, cfg.load_yaml(p / "config.yaml"))
    except ValueError as e:
        raise ValueError(f"{str(p)!r} is not a run directory: its config.yaml is not a run's ({e})") from None
    return p


def read_stages(run: str | Path) -> dict[str, dict[str, Any]]:
    """The stage entries of run directory ``run``'s manifest, read only ({} where it has none; unlike
    :class:`RunDir`, which creates the directory)."""
    p = Path(run) / RunDir.MANIFEST
    return read_manifest(p).get("stages", {}) if p.is_file() else {}


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
    "evaluation": 1,
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


# --------------------------------------------------------------------------------------------------
# one writer per run directory


class RunLocked(ValueError):
    """Another process holds the run directory's lock."""


# the config section each stage is made from (a stage's name before any "/": extraction/side -> extraction)
STAGE_SECTIONS = {"synthetic": "sample", "features": "features", "surrogate": "surrogate", "classifier": "classifier",
                  "classifier-clean": "clean_classifier", "classifier-teacher": "classifier", "lora": "lora",
                  "extraction": "extract", "evaluation": "evaluate", "calibration": "evaluate",
                  "memorization": "surrogate", "teacher": "surrogate"}


class StageWouldBeReplaced(ValueError):
    """A complete stage's outputs would be deleted, and replacing them was not allowed."""


_HELD: dict[Path, int] = {}  # run directories this process holds, with a re-entry count


PROBE_PATIENCE_S = 0.25  # how long a lock held only for an instant (another process's probe) is waited out


def _take_lock(f: Any, path: Path) -> None:
    """``flock`` ``f`` exclusively without blocking, or raise :class:`RunLocked`; a lock held only for an instant
    (:func:`check_unlocked`'s probe in another process, or two probes at once) is retried for
    ``PROBE_PATIENCE_S``, so it is not mistaken for a writer holding the run (who holds it for the whole run)."""
    deadline = time.monotonic() + PROBE_PATIENCE_S
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise _locked(path, f) from None
            time.sleep(0.01)


def _held(path: Path, f: Any) -> str:
    """Who holds run directory ``path``'s lock, from its lock file ``f``."""
    f.seek(0)
    return f"run directory {str(path)!r} is being written by another process ({f.read().strip() or 'holder unknown'})"


def check_writable(out: str | Path, what: str = "--out") -> None:
    """Refuse an output folder that cannot be made or written here (its nearest existing folder read-only, or a
    file on its way), before the work whose results it would hold: found at the first write, after the work."""
    anc = Path(out).absolute()
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"{what} {str(out)!r}: {str(anc)!r} is a file, not a folder to write into")
    if not os.access(anc, os.W_OK | os.X_OK):  # (a read-only mount too, as root)
        raise ValueError(f"{what} {str(out)!r}: {str(anc)!r} is not writable here")


def _locked(path: Path, f: Any) -> RunLocked:
    return RunLocked(f"{_held(path, f)}; wait for it (--wait{WAIT_NOTE}) or use another run directory")


WAIT_NOTE = ": side run, demo, sample, cluster, train-classifier, extract; audit(wait=True)"


# the folders a run's writers clear and write (its stages' and the report's): no other run may lie inside them
RUN_FOLDERS = frozenset({*(s for s in STAGE_SECTIONS if s != "calibration"), "train-features", "synthetic-evaluation",
                         "report", "inputs"})

OWN_BEFORE_MANIFEST = ("config.yaml", "inputs", "sweeps")  # the API saves an in-memory training set in inputs/


def check_run_path(path: str | Path, name: str = "path") -> None:
    """A clear error for a run path that cannot be a run directory (before any slow work); ``name``: the argument
    it came in."""
    cfg.check_path(path, name)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"run directory {str(path)!r} exists and is not a directory")
    if path.is_dir():  # a writer clears and writes RUN/<stage> through them: outside the run (a run someone gave);
        # other links (a model or data set kept beside the run) are no writer's
        stages = _stage_folders(path)
        written = {*RUN_FOLDERS, *stages, *RUN_FILES}
        links = [p for p in path.iterdir() if p.is_symlink() and p.name in written] + [
            p for d in ("extraction", "evaluation", "sweeps") if (path / d).is_dir() and not (path / d).is_symlink()
            for p in (path / d).iterdir() if p.is_symlink()]
        if links:
            named = ", ".join(str(p.relative_to(path)) for p in links[:3])
            raise ValueError(f"run directory {str(path)!r} holds symbolic links ({named}): a run writes and clears "
                             "its folders through them, outside the run; remove them")
    check_outside_run_folders(path, "run directory")
    if path.is_dir() and not (path / RunDir.MANIFEST).is_file():
        # a run clears a stage's folder that its manifest does not list: in a folder that is no run, those are
        # someone's files. What a run writes before its first manifest (its lock, config.yaml, the API's inputs/, a
        # sweep's sub-runs) is let through.
        other = sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and p.name not in OWN_BEFORE_MANIFEST)
        if other:
            raise ValueError(
                f"run directory {str(path)!r} is not empty and holds no {RunDir.MANIFEST}, so it is no run directory "
                f"(it holds {', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); a run writes and replaces "
                "folders there: use a new or empty directory")
        if (path / "config.yaml").is_file():  # (someone's config.yaml was let through and overwritten)
            try:
                cfg.from_dict(cfg.RunConfig, cfg.load_yaml(path / "config.yaml"))
            except ValueError as e:
                raise ValueError(f"run directory {str(path)!r} holds a config.yaml that is not a run's ({e}) and no "
                                 f"{RunDir.MANIFEST}, so it is no run directory; a run would overwrite that file: use "
                                 "a new or empty directory") from None


def check_outside_run_folders(path: str | Path, what: str) -> None:
    """Refuse a ``path`` (``what`` it is, for the error) inside a run's folders, which its writers clear and replace
    (a sweep's sub-runs, RUN/sweeps/x, and a bench's, RUN/forms/x, are the run's own)."""
    path = Path(path)
    outer = enclosing_run(path.resolve().parent)
    top = path.resolve().relative_to(outer).parts[0] if outer is not None else None
    if top is not None and (top in RUN_FOLDERS or top in _stage_folders(outer)):
        raise ValueError(f"{what} {str(path)!r} lies inside run {str(outer)!r}, whose writers clear and replace its "
                         "folders (a run made in RUN/extraction/x was deleted by the next extraction there): use a "
                         "folder outside it")


RUN_FILES = frozenset({".lock", "config.yaml", "manifest.json", "summary.json", "findings.csv",
                       "sweeps", "forms", "variants"})  # (and the benches' sub-run folders)


def _stage_folders(run: Path) -> set[str]:
    """The top folders of the stages run ``run``'s manifest lists (none where it has no readable manifest)."""
    try:
        return {s.split("/", 1)[0] for s in read_stages(run)}
    except ValueError:
        return set()


def enclosing_run(path: str | Path) -> Path | None:
    """The run directory ``path`` lies in (itself or the nearest parent holding a run's ``manifest.json``), or None:
    a command that writes there (``side evaluate --out RUN/evaluation/x``) takes that run's lock. Another tool's
    ``manifest.json`` (no object with ``stages``) makes no run: it blocked every new run below it."""
    for p in (Path(path).resolve(), *Path(path).resolve().parents):
        if (p / RunDir.MANIFEST).is_file():
            try:
                if "stages" in read_json(p / RunDir.MANIFEST, dict):
                    return p
            except ValueError:
                continue
    return None


def stage_holding(run: str | Path, path: str | Path) -> str | None:
    """The stage of run directory ``run``'s manifest whose folder (``RUN/<stage>``) is ``path`` or holds it (None:
    no stage's): a folder a command outside the pipeline must not write into, as its manifest entry would then
    vouch for files the stage did not make (``side evaluate --out RUN/evaluation/side`` replacing the run's own
    evaluation of side)."""
    run, path = Path(run).resolve(), Path(path).resolve()
    if path == run / "evaluation":  # the calibration's files (bands.json, null.npz), beside the methods' folders,
        return "calibration"  # which side evaluate reads as the run's bands: the run's even before it calibrates
    for stage in read_stages(run):
        if stage != "calibration" and (path == run / stage or (run / stage) in path.parents):
            return stage
    return None


def check_unlocked(path: str | Path) -> None:
    """Raise :class:`RunLocked` at once when another process holds run directory ``path``'s lock: a probe
    before the slow work that precedes :func:`run_lock` (loading the model, checking the config), which still
    takes the lock itself."""
    path = Path(path).resolve()
    if path in _HELD or not (path / ".lock").is_file():
        return
    with _open_lock(path) as f:  # closing it releases the probe's own lock
        _take_lock(f, path)


def _open_lock(path: Path) -> Any:
    """``path/.lock`` opened for reading and appending, never through a symbolic link (a run someone gave with a
    ``.lock`` linked to another file: its contents were logged, then truncated) and only as a plain file."""
    try:
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666)
    except OSError:
        if (path / ".lock").is_symlink():
            raise ValueError(f"{str(path / '.lock')!r} is a symbolic link, not the run's lock file: remove "
                             "it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{str(path / '.lock')!r} is not a plain file, not the run's lock file: remove it")
    return os.fdopen(fd, "a+")


def _still_the_lock_file(f: Any, path: Path) -> bool:
    """Whether the open lock file ``f`` is still ``path/.lock`` (not removed or replaced while it was waited for)."""
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path / ".lock"))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def run_lock(path: str | Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the exclusive lock of run directory ``path`` (``path/.lock``, ``fcntl.flock``) for the block.

    A second writer fails at once with :class:`RunLocked` naming the holder (pid, command, since when), or with
    ``wait`` blocks until the holder is done. The kernel releases the lock of a process that dies, so a lock
    left by a killed process is taken over by the next writer (the file's stale holder is logged). Re-entrant
    within one process (a pipeline that calls another stage function of the same run).
    """
    path = Path(path).resolve()
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    said = False
    while True:
        path.mkdir(parents=True, exist_ok=True)
        f = _open_lock(path)
        try:
            if wait:
                try:
                    _take_lock(f, path)
                except RunLocked:  # said once (at warning level: shown without --verbose), then waited for
                    if not said:
                        log.warning("%s; waiting for it", _held(path, f))
                    said = True
                    fcntl.flock(f, fcntl.LOCK_EX)
            else:
                _take_lock(f, path)
        except BaseException:
            f.close()
            raise
        if _still_the_lock_file(f, path):
            break
        f.close()  # the holder removed the folder, lock file and all (a failed first call's clean-up): a lock on
        # the removed file locks nothing, so the folder's new lock file is taken instead
    try:
        f.seek(0)
        stale = f.read().strip()
        if stale:
            log.warning("run directory %s: taking over the lock left by %s", path, stale)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, command {' '.join(sys.argv)!r}, since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        f.flush()
        try:  # the file system's time now: the lock file was just written (network file systems keep their own)
            sweep_leftovers(path, now=os.fstat(f.fileno()).st_mtime)
        except OSError as e:  # housekeeping: never a reason to stop the writer
            log.warning("run directory %s: could not sweep temporary files left by killed writers (%s)", path, e)
        _HELD[path] = 1
        try:
            yield
        finally:
            del _HELD[path]
            f.seek(0)
            f.truncate()
            f.flush()
    finally:
        f.close()  # closing releases the flock


# --------------------------------------------------------------------------------------------------
# run directory


MODEL_INPUT = "model"  # an ``inputs`` key that names the target model, not a run stage


def read_model_entry(run: str | Path) -> dict[str, Any]:
    """What the run's last writer recorded in the manifest of the target the run's config names now
    (:meth:`RunDir.set_model`: ``fingerprint``, ``name``, ``prediction``); {} where nothing is recorded (a run of an
    older release)."""
    p = Path(run) / RunDir.MANIFEST
    return _model_entry(read_manifest(p)) if p.is_file() else {}


def read_model(run: str | Path) -> str | None:
    """The fingerprint of the target the run's config names now, as its last writer recorded it in the manifest
    (None: not recorded, a run of an older release)."""
    return read_model_entry(run).get("fingerprint")


def _model_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest's ``model`` entry ({} where it records none, as an older release's may)."""
    m = manifest.get("model")
    return m if isinstance(m, dict) else {}


def _model_of(manifest: dict[str, Any]) -> str | None:
    return _model_entry(manifest).get("fingerprint")


def remade_inputs(stages: dict[str, dict[str, Any]], name: str, model: str | None = None) -> list[str]:
    """The run stages stage ``name`` was made from (its manifest entry's ``inputs``) that the run no longer holds
    as they were: made again since, under another fingerprint, or gone from the manifest; and ``model``
    (:data:`MODEL_INPUT`) where the stage was made from another target than ``model``, the run's now
    (:func:`read_model`; None: not compared)."""
    entry = stages.get(name) or {}
    out = []
    for k, fp in (entry.get("inputs") or {}).items():
        if k == MODEL_INPUT:
            if model is not None and fp != model:
                out.append(k)
        elif (stages.get(k) or {}).get("fingerprint") != fp:
            out.append(k)
    return out


def stale_stages(stages: dict[str, dict[str, Any]], model: str | None = None) -> dict[str, list[str]]:
    """Each finished stage made from results the run no longer holds -> the stages made again since that it was
    made from, directly or through its inputs (an extraction guided by a classifier trained on surrogate labels
    that ``side cluster`` remade names ``surrogate``); ``model`` where it was made from another target than
    ``model``, the run's now. Read from the inputs each stage records in the manifest; a stage that records none
    (made by an older release) is taken as it is."""
    roots: dict[str, list[str]] = {}

    def of(name: str, seen: tuple[str, ...] = ()) -> list[str]:
        if name not in roots:
            found = remade_inputs(stages, name, model)
            for k in (stages.get(name) or {}).get("inputs") or {}:
                if k in stages and k not in found and k not in seen:
                    found += [r for r in of(k, (*seen, name)) if r not in found]
            roots[name] = found
        return roots[name]

    return {n: of(n) for n, e in stages.items() if e.get("status") == "complete" and of(n)}


def other_target_evaluations(run: str | Path) -> dict[str, str]:
    """Each method whose finished evaluation the run holds but was made, through its extraction, from another target
    than the one its config names now (an ``audit()`` of another model for some methods leaves the others') -> why:
    such an evaluation measures another model's generations, so it is shown, never set against the others. (One made
    from results of this target made again since, a classifier retrained, is compared as it is: the report notes it.)
    """
    stages = read_stages(run)
    return {name.split("/", 1)[1]: "made from another target (the run's config names another model now)"
            for name, roots in stale_stages(stages, read_model(run)).items()
            if name.startswith("evaluation/") and MODEL_INPUT in roots}


class RunDir:
    """A run directory and its manifest.

    Parameters
    ----------
    path : the directory (created if missing)
    """

    MANIFEST = "manifest.json"

    def __init__(self, path: str | Path, *, replace: bool = True, group: ProcessGroup = SINGLE) -> None:
        self.path = Path(path)
        self.replace = replace
        self.replaced: list[str] = []  # finished stages this writer made again (``begin``)
        self.grown: list[str] = []  # finished stages this writer grew (``grow``)
        self.group = group
        self.config_before: dict[str, Any] | None = None  # the run's settings before this writer's (``write_config``)
        if group.main:  # the others of a launch meet the folder while the main one writes into it: checked there,
            # they saw its first files before its manifest and refused it as no run directory (a clean-clone CI
            # failure of test_the_python_api_under_torchrun, sessions 45 and 46)
            check_run_path(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    # manifest ----------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        p = self.path / self.MANIFEST
        if not p.exists():
            return {"stages": {}}
        return read_manifest(p)

    def _write_manifest(self, m: dict[str, Any]) -> None:
        atomic_write_json(self.path / self.MANIFEST, m)

    def stage_entry(self, stage: str) -> dict[str, Any] | None:
        return self.manifest()["stages"].get(stage)

    def stage_dir(self, stage: str) -> Path:
        d = self.path / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def begin(self, stage: str, fingerprint: str, inputs: dict[str, str] | None = None, *,
              derived: bool = False, data: dict[str, str | None] | None = None,
              legacy: str | Sequence[str] | None = None,
              n_planned: int | None = None) -> Literal["skip", "resume", "fresh"]:
        """Start ``stage``: say whether to skip it, resume it, or start it afresh (its folder cleared). A finished
        stage made with other settings is replaced only where the writer may replace (``--force``) or its inputs
        grew, unless it is ``derived``: a measurement of files the run keeps, made again from them at no loss.
        ``data``: what the stage reads that is no run stage (``"training set"`` -> its fingerprint), recorded so
        that a refusal can name what changed (the fingerprint keys it already). ``legacy``: the fingerprint an
        earlier release gave these same results (its rule keyed settings this one finds unread), or several: an
        entry made under one is taken as this one's, and its fingerprint rewritten.

        On a process other than a launch's main one, the stage must already be complete (the main process ran
        it first): it is only read."""
        entry = self.stage_entry(stage)
        was = (entry or {}).get("fingerprint")
        if self.group.main and was != fingerprint and was in _legacies(legacy):
            m = self.manifest()
            m["stages"][stage] = entry = dict(entry, fingerprint=fingerprint, rekeyed_from=was)
            self._write_manifest(m)
        if not self.group.main:
            if entry is not None and entry.get("fingerprint") == fingerprint and entry.get("status") == "complete":
                return "skip"
            raise RuntimeError(f"process {self.group.rank}: stage {stage} was not completed by the main process")
        if entry is not None and entry.get("fingerprint") == fingerprint:
            if entry.get("status") == "complete":
                log.info("stage %s: inputs and config unchanged, skipped", stage)
                return "skip"
            decision: Literal["skip", "resume", "fresh"] = "resume"
            kept = {k: entry[k] for k in ("grown_from", "grown_from_fingerprints") if k in entry}  # an interrupted growth
        else:
            kept = {}
            decision = "fresh"
            if (refused := self.refusal(stage, fingerprint, inputs, derived=derived, data=data)) is not None:
                raise StageWouldBeReplaced(refused)
            if entry is not None and entry.get("status") == "complete":
                self.replaced.append(stage)
                log.info("stage %s: its finished results were made with other settings or inputs; made again", stage)
            if (self.path / stage).exists():
                if entry is not None:  # said first: killed while removing, the manifest said the old results stood
                    self._mark_running(stage, None, None, clearing=True)  # (readers showed "no image" for them)
                shutil.rmtree(self.path / stage)
        self._mark_running(stage, fingerprint, inputs, **kept, **({"data": data} if data else {}),
                           **({} if n_planned is None else {"n_planned": n_planned}))
        return decision

    def refusal(self, stage: str, fingerprint: str, inputs: dict[str, str] | None = None, *,
                derived: bool = False, changed: Callable[[], Sequence[str]] = tuple,
                data: dict[str, str | None] | None = None, legacy: str | Sequence[str] | None = None) -> str | None:
        """Why :meth:`begin` would refuse ``stage`` with ``fingerprint`` (None: it would not): it is finished with
        other settings or inputs, this writer may not replace, and it is neither ``derived`` nor made from inputs
        that only grew. The message names the inputs made again since, the ``data`` (:meth:`begin`) that changed
        and ``changed()``, the settings the caller found changed (``key old -> new``; asked for only when
        refusing)."""
        entry = self.stage_entry(stage)
        if (entry is None or entry.get("fingerprint") in (fingerprint, *_legacies(legacy))
                or entry.get("status") != "complete"
                or self.replace or derived or self._inputs_grew(entry, inputs)):
            return None
        said = ", ".join(f"{k} {v}" for k, v in entry.items() if k in ("n", "method", "scale")) or "see manifest.json"
        old = entry.get("inputs") or {}
        why = [*(changed() or self._section_changes(stage)),
               *("made from another target" if k == MODEL_INPUT else f"{k} made again"
                 for k, v in (inputs or {}).items() if k in old and old[k] != v),
               *(f"the {k} changed" for k, v in (data or {}).items() if k in (entry.get("data") or {})
                 and entry["data"][k] != v)]
        return (f"{stage} holds finished results made with other settings or inputs ({said})"
                + (f"; changed: {'; '.join(why)}" if why else "")
                + "; rerun with --force to replace them, or use another run directory")

    def _section_changes(self, stage: str) -> list[str]:
        """The settings of ``stage``'s config section (:data:`STAGE_SECTIONS`) that differ between the run's config
        before this writer (``config_before``) and the one it wrote: what a refusal names where its caller did not."""
        section = STAGE_SECTIONS.get(stage.split("/", 1)[0])
        now = self.path / "config.yaml"
        if section is None or self.config_before is None or not now.is_file():
            return []
        try:
            return cfg.differences(self.config_before, cfg.load_yaml(now), (f"{section}.",))
        except ValueError:  # a damaged file: the refusal says the rest
            return []

    def refuse_before(self, planned: dict[str, tuple[Any, ...]]) -> None:
        """Raise :class:`StageWouldBeReplaced` naming every stage of ``planned`` (stage -> its fingerprint, inputs,
        a function giving the settings found changed and, optionally, a dict of :meth:`refusal`'s other keywords) that
        :meth:`begin` would refuse, before any of them begins: a command that is refused leaves each sibling stage
        as it was (one method's extraction grown, or its evaluation cleared, before a later one's refusal). On the
        main process of a launch (call it through ``group.on_main``: the others learn its error)."""
        said = [r for stage, (fp, inputs, changed, *kw) in planned.items()
                if (r := self.refusal(stage, fp, inputs, changed=changed, **(kw[0] if kw else {}))) is not None]
        if said:
            raise StageWouldBeReplaced("; ".join(said))

    def out_of_date(self) -> dict[str, list[str]]:
        """For each stage this writer made again: the finished stages made from its earlier results, directly or
        through others (:func:`stale_stages`; a step command such as ``side cluster`` stops before redoing them)."""
        m = self.manifest()
        stale = stale_stages(m["stages"], _model_of(m))
        out = {}
        for stage in self.replaced:
            later = [n for n, roots in stale.items() if stage in roots]
            if later:
                out[stage] = later
        return out

    def grow(self, stage: str, fingerprint: str, inputs: dict[str, str] | None, from_n: int,
             n_planned: int | None = None) -> Literal["resume"]:
        """Mark a stage of ``from_n`` images (complete, or begun with that many and cut short) as running under
        ``fingerprint``, the same stage with more images (``n_planned``; :func:`shard_stage`): its files are kept
        and it resumes. The entry keeps the fingerprints it grew from (the stages made from it are redone without
        ``replace``: :meth:`begin`)."""
        old = self.stage_entry(stage) or {}
        earlier = [*old.get("grown_from_fingerprints", []), old.get("fingerprint")]
        # the N of the last finished stage it grew from (grows_from's floor): not an N it was cut short making
        finished = old.get("n") if old.get("status") == "complete" else old.get("finished_n")
        self._mark_running(stage, fingerprint, inputs, grown_from=from_n, grown_from_fingerprints=earlier,
                           **({} if n_planned is None else {"n_planned": n_planned}),
                           **({} if finished is None else {"finished_n": finished}))
        self.grown.append(stage)
        return "resume"

    def _inputs_grew(self, entry: dict[str, Any], inputs: dict[str, str] | None) -> bool:
        """Whether a finished stage differs from the one asked for only in inputs that grew since (each input
        named by its stage, as the evaluations name their extraction): the old results describe a stage that no
        longer exists, so redoing them replaces nothing the run still stands for. An input made again with other
        settings is no such case, whoever made it (a step command, an interrupted ``--force`` run): what was made
        from it stays a finished result, and replacing it needs ``replace``."""
        old = entry.get("inputs") or {}
        new = inputs or {}
        changed = [k for k in new if old.get(k) != new[k]]
        return (bool(changed) and set(old) == set(new)
                and all(old[k] in (self.stage_entry(k) or {}).get("grown_from_fingerprints", []) for k in changed))

    def _mark_running(self, stage: str, fingerprint: str | None, inputs: dict[str, str] | None, **info: Any) -> None:
        m = self.manifest()
        m["stages"][stage] = {
            "status": "running",
            "fingerprint": fingerprint,
            "inputs": inputs or {},
            "versions": versions(),
            "torch_threads": _torch_threads(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "started_unix": time.time(),
            **info,
        }
        self._write_manifest(m)

    # A writer allowed to replace finished results (``replace``: ``side extract --force``, ``side run``) that
    # does not finish leaves the work half done: its new stages failed or missing, the old results after them
    # still complete. A rerun with the same settings that stops no later is that writer's work resumed, and may
    # replace what it would have replaced; the manifest's ``replacing`` entry says so until a writer finishes.
    def mark_replacing(self, settings: str, until: int) -> None:
        """Record that a writer allowed to replace finished results, with run settings ``settings`` (a
        fingerprint) up to stage rank ``until``, is at work. An unfinished one with the same settings that went
        further stays recorded as far as it went (a ``side cluster`` in between does not shorten it)."""
        m = self.manifest()
        r = m.get("replacing")
        if isinstance(r, dict) and r.get("settings") == settings and isinstance(r.get("until"), int):
            until = max(until, r["until"])
        m["replacing"] = {"settings": settings, "until": until}
        self._write_manifest(m)

    def resumes_replacing(self, settings: str, until: int) -> bool:
        """Whether a writer with ``settings`` up to ``until`` resumes the unfinished one :meth:`mark_replacing`
        recorded: the same settings, and it stops no later (``side train-classifier`` cut short does not let a
        plain ``side extract`` replace the extraction it left out of date)."""
        r = self.manifest().get("replacing")
        return isinstance(r, dict) and r.get("settings") == settings and until <= r.get("until", -1)

    def done_replacing(self, settings: str, until: int) -> None:
        """A writer finished: the recorded unfinished one is no longer to be resumed when this one covered its
        work (the same settings, as far or further) or went elsewhere (other settings)."""
        m = self.manifest()
        r = m.get("replacing")
        if isinstance(r, dict) and (r.get("settings") != settings or until >= r.get("until", -1)):
            del m["replacing"]
            self._write_manifest(m)

    def fail_running(self, error: BaseException) -> list[str]:
        """Mark every stage still ``running`` as ``failed`` with ``error`` (after an exception); returns them."""
        m = self.manifest()
        failed = [k for k, v in m["stages"].items() if v.get("status") == "running"]
        for k in failed:
            m["stages"][k].update(status="failed", error=f"{type(error).__name__}: {error}"[:500])
        if failed:
            self._write_manifest(m)
        return failed

    def annotate(self, stage: str, **info: Any) -> None:
        """Add ``info`` to ``stage``'s manifest entry, its status and fingerprint as they are."""
        m = self.manifest()
        m["stages"][stage].update(info)
        self._write_manifest(m)

    def reopen(self, stage: str) -> Literal["resume"]:
        """Mark a complete stage whose files went missing as running again (it resumes: what exists is kept)."""
        m = self.manifest()
        m["stages"][stage]["status"] = "running"
        m["stages"][stage].pop("stopped", None)  # where it stopped is decided again when the stage completes
        self._write_manifest(m)
        return "resume"

    def complete(self, stage: str, **info: Any) -> None:
        m = self.manifest()
        entry = m["stages"][stage]
        entry["status"] = "complete"
        entry["seconds"] = round(time.time() - entry.get("started_unix", time.time()), 3)
        entry.update(info)
        self._write_manifest(m)

    def model_entry(self) -> Any:
        """The manifest's record of the run's target (:meth:`set_model`), as it is (None: none)."""
        return self.manifest().get("model")

    def restore_model(self, entry: Any) -> None:
        """Put back the record :meth:`model_entry` returned (a refused writer recorded its target too early)."""
        m = self.manifest()
        if m.get("model") != entry:
            m.pop("model", None)
            if entry is not None:
                m["model"] = entry
            self._write_manifest(m)

    def set_model(self, fingerprint: str, name: str, prediction: str = "epsilon") -> None:
        """Record the target the run's config names now (``name``) by its ``fingerprint`` (:func:`read_model`) and
        what it predicts (``prediction``: epsilon, v_prediction or sample; the report says it): stages made from
        another one are out of date (:func:`stale_stages`); a change is listed among the things this writer made
        again (:meth:`out_of_date`, as :data:`MODEL_INPUT`)."""
        if not self.group.main:
            return
        m = self.manifest()
        before = _model_of(m)
        entry = {"fingerprint": fingerprint, "name": name, "prediction": prediction}
        if m.get("model") == entry:
            return
        m["model"] = entry
        self._write_manifest(m)
        if before is not None and before != fingerprint:
            self.replaced.append(MODEL_INPUT)

    def write_config(self, run_config: Any, stage: str | None = None) -> None:
        """``config.yaml`` of the run, or with ``stage`` of that stage's folder: the config it was made with
        (a run directory that runs one method at a time with other settings, as the benchmarks' replicates do,
        keeps each extraction's own)."""
        if self.group.main:
            path = self.path / (stage or ".") / "config.yaml"
            if stage is None and self.config_before is None and path.is_file():
                try:
                    self.config_before = cfg.load_yaml(path)
                except ValueError:
                    pass  # a damaged file: a refusal names no setting
            atomic_write_text(path, cfg.dump_yaml(run_config))


# --------------------------------------------------------------------------------------------------
# sharded stage output


def shard_path(directory: Path, k: int) -> Path:
    return directory / f"shard-{k:05d}.npz"


def shard_ranges(n: int, shard_size: int, round_size: int | None = None) -> list[list[tuple[int, int]]]:
    """The index ranges of a stage's shards, grouped in rounds: ``n`` indices in rounds of ``round_size`` (one
    round when None), each round cut into shards of at most ``shard_size``. Shard K of the stage is the K-th
    range in this order; the layout depends on these three numbers only, never on the number of processes, so a
    stage begun by one launch resumes in another."""
    if n < 1 or shard_size < 1 or (round_size is not None and round_size < 1):
        raise ValueError(f"n={n}, shard_size={shard_size}, round_size={round_size} must be >= 1")
    step = n if round_size is None else round_size
    rounds = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        rounds.append([(lo, min(stop, lo + shard_size)) for lo in range(start, stop, shard_size)])
    return rounds


def write_shards(
    directory: Path,
    rounds: list[list[tuple[int, int]]],
    make: Callable[[int, int], dict[str, np.ndarray]],
    progress: Progress | None = None,
    *,
    group: ProcessGroup = SINGLE,
    stop: Callable[[int], bool] | None = None,
) -> int:
    """Write ``shard-K.npz`` for the K-th index range of ``rounds`` (:func:`shard_ranges`), skipping shards
    already written. ``stop(end)``, asked on every process once the round ending at index ``end`` is whole
    (before the last round), ends the writing there when true; it must decide from the shards alone, so that
    every process, and a resumed run, decides the same.

    ``make(start, stop)`` returns the arrays of one shard; it must include ``images`` and ``index``.
    Each shard is written atomically, so any shard present is whole. In a launch of several processes each
    writes the shards it owns (k % world == rank); with more than one round (shards that read the earlier
    rounds' ones) every process waits at the end of each round until the round is whole, so the shards within a
    round are written in parallel. Returns the number written now by this process.
    """
    directory.mkdir(parents=True, exist_ok=True)
    n = rounds[-1][-1][1]
    written, first = 0, 0

    def write_round(shards: list[tuple[int, int]], first: int) -> int:
        count = 0
        for k, (lo, hi) in enumerate(shards, start=first):
            p = shard_path(directory, k)
            if not group.owns(k):
                continue
            if p.exists():
                if progress is not None:
                    progress(hi, n)
                continue
            arrays = make(lo, hi)
            assert np.array_equal(arrays["index"], np.arange(lo, hi)), "shard index range mismatch"
            atomic_save_npz(p, **arrays)
            count += 1
            if progress is not None:
                progress(hi, n)
        return count

    for shards in rounds:
        # with several rounds, each ends in a check-in that carries errors (a bare barrier left the others waiting
        # there for the process timeout, a day, while the failed one waited at the caller's check-in, and its
        # error was never said)
        written += (group.together(lambda: write_round(shards, first)) if len(rounds) > 1
                    else write_round(shards, first))
        first += len(shards)
        end = shards[-1][1]
        if stop is not None and end < n and stop(end):
            break
    return written


def grows_from(entry: dict[str, Any] | None, fingerprint: str, n: int, fingerprint_at: Callable[[int], str] | None,
               round_size: int | None) -> int | None:
    """How many images a shard stage (its manifest ``entry``) was made or was being made with where
    :func:`shard_stage` grows it to ``n`` under ``fingerprint`` instead of making it again (None: it does not grow):
    it was made with the same settings at a smaller N (``fingerprint_at``), or begun with them at another N (its
    ``n_planned``) and cut short, not in rounds. (An interrupted one started afresh, its whole shards lost; one cut
    short while growing and run again at an N between lost them too, and its evaluations needed ``--force``.) A
    growth cut short is not taken below the N of the finished stage it grew from (``finished_n``): that stage is
    what it replaces."""
    if entry is None or fingerprint_at is None or round_size is not None:
        return None
    if entry.get("status") == "complete":
        old_n = entry.get("n")
        ok = isinstance(old_n, int) and 0 < old_n < n
    elif entry.get("status") in ("running", "failed"):
        old_n = entry.get("n_planned")
        ok = isinstance(old_n, int) and 0 < old_n != n and n >= (entry.get("finished_n") or 0)
    else:
        return None
    return old_n if ok and entry.get("fingerprint") == fingerprint_at(old_n) != fingerprint else None


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
    round_size: int | None = None,
    fingerprint_at: Callable[[int], str] | None = None,
    stop: Callable[[int], dict[str, Any] | None] | None = None,
    **info: Any,
) -> ImageSet:
    """A stage whose output is ``n`` images in ``run/<stage>/shard-*.npz``: skipped when complete with the same
    fingerprint, resumed at its last whole shard when interrupted, grown when complete with fewer images, else
    written afresh.

    ``make(lo, hi, progress)`` returns one shard's arrays; its progress callback counts within the whole stage.
    ``round_size``: the shards come in rounds, each made after the earlier rounds are whole (:func:`shard_ranges`,
    :func:`write_shards`). ``fingerprint_at(m)``: the stage's fingerprint had it ``m`` images, for a stage whose
    image i does not depend on ``n`` (not in rounds): a complete stage of m < ``n`` images with that fingerprint
    is grown, keeping every shard whose index range is the same in both layouts. ``stop(end)``: with rounds, asked
    after each round but the last (:func:`write_shards`); a dict ends the stage there with fewer than ``n``
    images, and is recorded in the manifest entry as ``stopped``: ``{"at": end, **that dict}``. In a launch of
    several processes the main one decides and records; every process writes its own shards.
    """
    group = run.group
    directory = run.path / stage
    decision = None
    rounds = shard_ranges(n, shard_size, round_size)
    if group.main:
        entry = run.stage_entry(stage)
        old_n = grows_from(entry, fingerprint, n, fingerprint_at, round_size)
        if old_n is not None:
            new = {r: k for k, r in enumerate(shard_ranges(n, shard_size)[0])}
            for k, r in enumerate(shard_ranges(old_n, shard_size)[0]):
                if new.get(r) != k:  # (the old last shard, when it was short)
                    shard_path(directory, k).unlink(missing_ok=True)
            log.info("stage %s: %s, keeping its whole shards", stage, f"growing its {old_n} images to {n}"
                     if old_n < n else f"made at {n} images (begun with {old_n} and cut short)")
            decision = run.grow(stage, fingerprint, inputs, old_n, n_planned=n)
        else:
            decision = run.begin(stage, fingerprint, inputs=inputs, n_planned=n)
        stopped_at = (entry.get("stopped") or {}).get("at") if decision == "skip" else None  # it stopped early
        n_shards = sum(1 for rnd in rounds for _, hi in rnd if stopped_at is None or hi <= stopped_at)
        if decision != "fresh" and (cut := [k for k in range(n_shards) if shard_path(directory, k).exists()
                                            and not shard_opens(shard_path(directory, k))]):
            # (a shard cut short since failed every later run, --force included, with "remake it"; one kept by a
            # resumed or grown stage failed its first rerun)
            log.warning("stage %s: shard(s) %s do not read (cut short or damaged since); writing them again", stage,
                        ", ".join(map(str, cut)))
            for k in cut:
                shard_path(directory, k).unlink()
        if decision == "skip" and not all(shard_path(directory, k).exists() for k in range(n_shards)):
            log.warning("stage %s: marked complete but shard files are missing or damaged; writing them again", stage)
            decision = run.reopen(stage)
    decision = group.share(decision)
    if decision != "skip":
        t0 = time.time()
        report = progress
        if progress is not None and group.world > 1:  # the whole is said once every process has checked in (the
            # main one's last shard can be the stage's last while another's failed: it said "6 of 6 done")
            def report(done: int, total: int) -> None:
                if done < total:
                    progress(done, total)

        def make_shard(lo: int, hi: int) -> dict[str, np.ndarray]:
            return make(lo, hi, None if report is None else (lambda done, _total: report(lo + done, n)))

        stopped: dict[str, Any] = {}

        def stop_at(end: int) -> bool:
            said = stop(end)
            if said is not None:
                stopped.update(at=end, **said)
            return said is not None

        # (checked in: a process that failed writing raises on every process, instead of the others waiting for it)
        written = group.total(group.together(lambda: write_shards(directory, rounds, make_shard, report, group=group,
                                                                  stop=None if stop is None else stop_at)))
        if stopped and progress is not None:  # ended early: the work is done at the stop (a bar fills, a line says so)
            progress(stopped["at"], stopped["at"])
        elif progress is not None and group.world > 1:  # every process has written its shards (the main one counted
            progress(n, n)  # only its own: a bar stopped short where another process wrote the last shard)
        if group.main and stopped:  # shards past the stop, left by an earlier attempt that stopped later
            # (a lost shard remade on another device can move the stop)
            for k, (lo, _) in enumerate(r for rnd in rounds for r in rnd):
                if lo >= stopped["at"]:
                    shard_path(directory, k).unlink(missing_ok=True)
        if group.main:
            run.complete(stage, n=n, shards_written_now=written, resumed=decision == "resume",
                         sampling_seconds=round(time.time() - t0, 3), processes=group.world,
                         **({"stopped": stopped} if stopped else {}), **info)
        group.barrier()
    return load_shards(directory)
