"""Atomic writes and safe reads: every file is written to a temporary name in its directory and renamed into
place, so a crash never leaves a half-written file; leftovers of a crash are swept; checkpoints and JSON are read
without unpickling."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import NPZ_READ_ERRORS, check_npz_size

log = logging.getLogger(__name__)


_UMASK = os.umask(0)
os.umask(_UMASK)

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
    except NPZ_READ_ERRORS:
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
    except (*NPZ_READ_ERRORS, TypeError) as e:
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
    """Yield a temporary sibling directory; on success it takes ``path``'s place: in one rename where ``path`` does
    not exist, else in two (``path`` moved aside to ``.NAME.XXXXXXXX.side-old``, then the new one in place from its
    ``.side-tmp``; the old one is then renamed ``.side-del`` and deleted). A process killed between the two renames
    leaves ``path`` missing beside both; the run's next lock holder puts the folder of before back
    (:func:`sweep_leftovers`)."""
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
            # renamed before it is deleted: a .side-old is then only ever a folder moved aside whose replacement is
            # not in place (the sweep puts such a one back), never one half deleted after a finished replacement
            gone = old.with_name(old.name.removesuffix(".side-old") + ".side-del")
            os.replace(old, gone)
            shutil.rmtree(gone, ignore_errors=True)  # (what is left is a leftover: the next writer's sweep takes it)
        else:
            os.replace(tmp, path)
        _sync_directory(path.parent)
    except BaseException as e:
        said = write_failure(e, path, tmp)  # (measured before the partial files go: the disk as it was when full)
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():  # interrupted between the two renames (Ctrl-C): the old folder back,
            if path.exists():  # not left under a temporary name with path gone (a finished classifier retrained)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, path)
        if said is not None:
            raise said from e
        raise


def missing_folders(path: str | Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, innermost first: the folders that making ``path``
    (a run lock's mkdir) makes, which a call refused before it wrote anything removes again
    (:func:`remove_empty_folders`)."""
    path = Path(path).absolute()
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove each of ``folders`` (innermost first) that exists and is empty; one something else wrote into stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


FULL_BYTES = 64 << 20  # free space below which a write torch could not finish is said as a full disk


def write_failure(e: BaseException, path: Path, tmp: Path) -> OSError | None:
    """The OSError naming ``path`` that a failed write of its files into ``tmp`` is raised as, or None where ``e`` is
    no write failure. safetensors raises SafetensorError ("I/O error: No space left on device (os error 28)") and
    torch.save a RuntimeError ("unexpected pos 14336 vs 14228"), which reached the user of a full disk as a
    traceback of 60-80 lines that never named the disk, and the manifest's error as torch's text (an interruption
    review's find); an OSError is one line of the CLI, and where it happened."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if type(e).__name__ == "SafetensorError" and "I/O error" in text:
        code = int(m.group(1)) if (m := re.search(r"os error (\d+)", text)) else errno.EIO
    elif isinstance(e, RuntimeError) and any(s in text for s in ("unexpected pos", "PytorchStreamWriter failed",
                                                                 "file write failed")):
        try:
            free = shutil.disk_usage(tmp).free
        except OSError:
            free = None
        code = errno.ENOSPC if free is not None and free < FULL_BYTES else errno.EIO
        first = f"torch: {first}; {'unknown' if free is None else f'{free / 2**20:.1f} MiB'} free there"
    else:
        return None
    said = "" if code == errno.EIO and first.startswith("torch:") else f"{os.strerror(code)}: "  # (torch says no
    # cause: not named Input/output error where a file size limit stopped it)
    return OSError(code, f"{said}writing {path.name} failed ({first})", str(path))


# atomic_write_bytes' and atomic_directory's names; the marker `side-` keeps a user's own `.notes.20240101.old` out
_LEFTOVER = re.compile(r"\..+\.[a-z0-9_]{8}\.side-(tmp|old|del)")
LEFTOVER_AGE_S = 900.0  # how long a temporary name must be untouched before the sweep takes it for a leftover


def _legacies(legacy: str | Sequence[str] | None) -> tuple[str, ...]:
    """:meth:`RunDir.begin`'s ``legacy`` as a tuple of fingerprints."""
    return () if legacy is None else (legacy,) if isinstance(legacy, str) else tuple(legacy)


def leftover_of(name: str) -> str | None:
    """The name a temporary name of :func:`atomic_write_bytes` or :func:`atomic_directory` stands for (``.final``
    for ``..final.XXXXXXXX.side-tmp``); None for any other name."""
    return name[1:].rsplit(".", 2)[0] if _LEFTOVER.fullmatch(name) else None


def links_inside(folder: Path) -> list[Path]:
    """The symbolic links anywhere inside ``folder`` (not followed; a link to a folder is listed, not entered)."""
    return [Path(here) / n for here, folders, files in os.walk(folder) for n in (*folders, *files)
            if (Path(here) / n).is_symlink()]


def sweep_leftovers(path: str | Path, now: float | None = None, min_age_s: float = LEFTOVER_AGE_S) -> list[Path]:
    """Remove what writers killed mid-write (SIGKILL, power loss) left in run directory ``path``: the temporary
    files and directories of :func:`atomic_write_bytes` and :func:`atomic_directory` (``.NAME.XXXXXXXX.side-tmp``,
    ``.NAME.XXXXXXXX.side-old`` and ``.side-del``; a ``.side-old`` folder whose NAME is missing beside a
    ``.NAME.XXXXXXXX.side-tmp`` folder is put back instead, whatever its age: the folder atomic_directory moved aside
    before a kill between its renames), which nothing reads, once untouched for ``min_age_s`` seconds before
    ``now`` (the file system's clock, which on a network file system can differ from this machine's; default: this
    machine's). :func:`run_lock` calls it for the lock's new holder, before its first write: no other writer of the
    run's stages can be between a temporary name and its rename then, and the age spares what readers such as
    ``side report`` write without the lock (small files, written in an instant). A nested run directory (one with
    its own ``.lock``) is left to its own writers; an entry that cannot be read or removed is left as it is. Returns
    what was removed."""
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
        # atomic_directory's replacements of a folder (.NAME.XXXXXXXX.side-tmp) by NAME
        listed = list(dirnames)  # (dirnames loses the entries not to be walked into as the loop goes)
        replacing = {leftover_of(n) for n in listed if n.endswith(".side-tmp") and leftover_of(n)}
        for name in listed:
            if not os.path.lexists(here / name):  # (a replacement removed below, its folder put back)
                continue
            p = here / name
            if (name.endswith(".side-old") and (back := leftover_of(name)) in replacing
                    and not (here / back).exists() and not p.is_symlink() and not links_inside(p)):  # (a link
                # planted as one, or in one, was put in the folder's place after the run's links were checked)
                # atomic_directory killed between its two renames (the folder moved aside, the new one not yet in
                # place): the complete folder of before is put back, whatever its age (the sweep took it after 15
                # minutes, and a classifier's checkpoints with it: trained again from step 0)
                with contextlib.suppress(OSError):
                    os.replace(p, here / back)
                    for other in [n for n in listed if n.endswith(".side-tmp") and leftover_of(n) == back]:
                        shutil.rmtree(here / other, ignore_errors=True)  # (the replacement that never took its place)
                        if other in dirnames:
                            dirnames.remove(other)
                    log.warning("run directory %s: %s was put back from %s, where a writer killed while replacing "
                                "it left it", root, here / back, name)
                    dirnames.remove(name)
                    dirnames.append(back)
                    continue
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
        value = json.loads(Path(path).read_text(encoding="utf-8"))
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
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
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
