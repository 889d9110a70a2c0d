"""One writer per run directory: the run lock, and the checks that a path is, or lies outside, a run."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


from .. import config as cfg
from .contents import MANIFEST, read_stages
from .files import links_inside, read_json, sweep_leftovers

log = logging.getLogger(__name__)


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


def _take_lock(f: Any, path: Path, advice: str | None = None) -> None:
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
                raise _locked(path, f, advice) from None
            time.sleep(0.01)


def _held(path: Path, f: Any) -> str:
    """Who holds run directory ``path``'s lock, from its lock file ``f``."""
    f.seek(0)
    return f"{str(path)!r} is being written by another process ({f.read().strip() or 'holder unknown'})"


def check_writable(out: str | Path, what: str = "--out", files: Sequence[str] = ()) -> None:
    """Refuse an output folder that cannot be made or written here (its nearest existing folder read-only, or a
    file on its way), or where one of the ``files`` the command writes in it is a folder, before the work whose
    results it would hold: found at the first write, after the work."""
    for name in files:
        if (Path(out) / name).is_dir():
            raise ValueError(f"{what} {str(out)!r}: {str(Path(out) / name)!r} is a folder, where the results' {name} "
                             "is written: move it away or write elsewhere")
    anc = Path(out).absolute()
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"{what} {str(out)!r}: {str(anc)!r} is a file, not a folder to write into")
    if not os.access(anc, os.W_OK | os.X_OK):  # (a read-only mount too, as root)
        raise ValueError(f"{what} {str(out)!r}: {str(anc)!r} is not writable here")


def _locked(path: Path, f: Any, advice: str | None = None) -> RunLocked:
    advice = advice or f"wait for it (--wait{WAIT_NOTE}) or use another run directory"
    return RunLocked(f"{_held(path, f)}; {advice}")


WAIT_NOTE = ": side run, demo, sample, cluster, train-classifier, extract; audit(wait=True)"


# the folders a run's writers clear and write (its stages' and the report's): no other run may lie inside them
RUN_FOLDERS = frozenset({*(s for s in STAGE_SECTIONS if s != "calibration"), "train-features", "synthetic-evaluation",
                         "report", "inputs", "theory"})

OWN_BEFORE_MANIFEST = ("config.yaml", "inputs", "sweeps")  # the API saves an in-memory training set in inputs/


def check_run_path(path: str | Path, name: str = "path") -> None:
    """A clear error for a run path that cannot be a run directory (before any slow work); ``name``: the argument
    it came in."""
    cfg.check_path(path, name)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"run directory {str(path)!r} exists and is not a directory")
    check_writable(path, "run directory")  # (a file on its way, or a read-only folder, was met at the lock's mkdir,
    # after the model and the data had loaded)
    if path.is_dir():  # a writer clears and writes RUN/<stage> through them: outside the run (a run someone gave);
        # other links (a model or data set kept beside the run) are no writer's
        links = _links_where_written(path, {*RUN_FOLDERS, *_stage_folders(path), *RUN_FILES})
        if links:
            named = ", ".join(str(p.relative_to(path)) for p in links[:3])
            raise ValueError(f"run directory {str(path)!r} holds symbolic links ({named}): a run writes and clears "
                             "its folders through them, outside the run; remove them")
    check_outside_run_folders(path, "run directory")
    if path.is_dir() and not (path / MANIFEST).is_file():
        # a run clears a stage's folder that its manifest does not list: in a folder that is no run, those are
        # someone's files. What a run writes before its first manifest (its lock, config.yaml, the API's inputs/, a
        # sweep's sub-runs) is let through.
        other = sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and p.name not in OWN_BEFORE_MANIFEST)
        if other:
            raise ValueError(
                f"run directory {str(path)!r} is not empty and holds no {MANIFEST}, so it is no run directory "
                f"(it holds {', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); a run writes and replaces "
                "folders there: use a new or empty directory")
        if (path / "config.yaml").is_file():  # (someone's config.yaml was let through and overwritten)
            try:
                cfg.from_dict(cfg.RunConfig, cfg.load_yaml(path / "config.yaml"))
            except ValueError as e:
                raise ValueError(f"run directory {str(path)!r} holds a config.yaml that is not a run's ({e}) and no "
                                 f"{MANIFEST}, so it is no run directory; a run would overwrite that file: use "
                                 "a new or empty directory") from None


def _links_where_written(run: Path, written: set[str]) -> list[Path]:
    """The symbolic links among ``run``'s entries named in ``written`` and anywhere inside those folders (not
    followed). Only the stages' own folders and their children were looked at: a trainer's ``RUN/classifier/work``
    linked elsewhere had its checkpoints cleared and written, and its log overwritten, where the link pointed."""
    found = []
    for top in run.iterdir():
        if top.name not in written:
            continue
        if top.is_symlink():
            found.append(top)
        elif top.is_dir():
            found += links_inside(top)
    return found


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
        if (p / MANIFEST).is_file():
            try:
                if "stages" in read_json(p / MANIFEST, dict):
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


def run_locked(path: str | Path) -> bool | None:
    """Whether another process holds run directory ``path``'s lock now: a stage the manifest says is ``running`` is
    being made where one does, and was interrupted (its process killed) where none does. False where this process
    holds it (side run writing its report: the stages an earlier run left were called "being made now by another
    process"; a review's find). None where that cannot be told (a lock file that cannot be opened here: a read-only
    copy of the run)."""
    path = Path(path).resolve()
    if path in _HELD:
        return False
    if not (path / ".lock").is_file():
        return False
    try:
        check_unlocked(path)
    except RunLocked:
        return True
    except (OSError, ValueError):
        return None
    return False


def stage_now(status: str | None, locked: bool | None) -> str:
    """What a stage that is not complete is now, from its manifest ``status`` and :func:`run_locked`."""
    if status == "running":
        return ("being made now (another process holds the run's lock)" if locked else
                "interrupted (no other process holds the run's lock: the one making it was killed)" if locked is False
                else "being made or interrupted (whether a process holds the run's lock cannot be told here)")
    return "not finished" + (" (another process holds the run's lock now)" if locked else "")


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
    return os.fdopen(fd, "a+", encoding="utf-8", errors="replace")  # (its holder's command line: any characters,
    # whatever the locale)


def _still_the_lock_file(f: Any, path: Path) -> bool:
    """Whether the open lock file ``f`` is still ``path/.lock`` (not removed or replaced while it was waited for)."""
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path / ".lock"))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def run_lock(path: str | Path, *, wait: bool = False, advice: str | None = None) -> Iterator[None]:
    """Hold the exclusive lock of run directory ``path`` (``path/.lock``, ``fcntl.flock``) for the block.

    A second writer fails at once with :class:`RunLocked` naming the holder (pid, command, since when), or with
    ``wait`` blocks until the holder is done. The kernel releases the lock of a process that dies, so a lock
    left by a killed process is taken over by the next writer (the file's stale holder is logged). Re-entrant
    within one process (a pipeline that calls another stage function of the same run). ``advice``: what the
    refusal tells the user to do (a run's: wait for it with --wait, or use another run directory).
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
                    _take_lock(f, path, advice)
                except RunLocked:  # said once (at warning level: shown without --verbose), then waited for
                    if not said:
                        log.warning("%s; waiting for it", _held(path, f))
                    said = True
                    fcntl.flock(f, fcntl.LOCK_EX)
            else:
                _take_lock(f, path, advice)
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
        line = f"pid {os.getpid()}, command {' '.join(sys.argv)!r}, since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
        data = line.encode("utf-8", "replace")
        try:  # (unbuffered: a write the disk refused stayed in the file object's buffer, and its close said it again,
            # "No space left on device", naming no file)
            while data:
                data = data[os.write(f.fileno(), data):]
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), str(path / ".lock")) from e
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
