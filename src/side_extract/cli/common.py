"""What every subcommand shares: clean errors, config file + typed flags, progress bars."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import config as cfg
from ..distributed import (PEER_FAILED_STATUS, PeerFailed, ProcessGroup, check_device, launch, leaving_on_error,
                           record_stop)

# soft_wrap: a message is one line however long (a path or value in it stays whole; the terminal wraps it)
console = Console(stderr=True, emoji=False, soft_wrap=True)


def say(text: str, **kw: Any) -> None:
    """Print ``text`` on the console as it is: paths and names from the user or from a run's files are no rich markup
    (a run directory "exp[v2]" was printed as "exp", and "exp[/]" ended a finished run in a MarkupError)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True, **kw)


T = TypeVar("T")


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """A warning said while a command runs is one line, ``warning: MESSAGE`` (Python's own form printed the source
    file's path and the source line that warned, ``labeler.fit(...)``, to the user), control characters escaped as
    in log lines (:class:`_PlainFormatter`: a file named with an escape sequence, in a folder someone gave, set the
    terminal's title through the warning that left it out); restored after."""
    before = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_a, **_k: f"warning: {escape_controls(str(message))}\n"
    try:
        yield
    finally:
        warnings.formatwarning = before


def path_value(value: Any) -> Path:
    """A path option's or argument's value as typed: an empty one (an unset shell variable, ``--out "$OUT"``) is
    refused, where click read it as ``Path("")``, the current folder, and the command wrote (or read) there."""
    if isinstance(value, Path):  # (a default)
        return value
    if not str(value).strip():
        raise typer.BadParameter(f"{str(value)!r} is empty: give a path (an empty one was read as the current folder)")
    return Path(value)


FLAG_PATHS = "side_extract.flag_paths"  # ctx.meta: setting path -> the parameter that sets it (typed_flags)


def flags_set(ctx: Any, names: dict[str, str]) -> None:
    """Record which setting each of the command's parameters sets (``names``: parameter -> setting path, as
    :func:`typed_flags` takes them; an API argument's name too, ``{"generations": "indices"}``), so that
    :func:`as_typed` names the flag in an error that starts with the setting."""
    ctx.meta.setdefault(FLAG_PATHS, {}).update({path: param for param, path in names.items()})


def as_typed(message: str, ctx: Any) -> str:
    """A library error that starts with a setting's name (``n_points=1000 must be ...``; ``sample.n=0 ...`` from
    ``side sample``, whose flags are its section's keys) as the flag the user typed (``--n-points=1000 must be
    ...``): the user typed no ``n_points``. Left as it is where the value did not come from the command line (a
    --config file names the key) or names a key of another section. ``ctx``: the command's context; the settings
    its flags set (``surrogate.n_clusters`` for ``side cluster --n-clusters``) are those :func:`typed_flags` was
    given."""
    m = re.match(r"((?:[a-z_]+\.)*)([a-z_]+)=", message)
    if m is None or ctx is None:
        return message
    param = ctx.meta.get(FLAG_PATHS, {}).get(m.group(1) + m.group(2))
    if param is None and m.group(1) and m.group(1)[:-1] != ctx.command.name:  # (another section's key)
        return message
    for p in ctx.command.params:
        if (p.name == (param or m.group(2)) and p.param_type_name == "option" and p.opts
                and was_typed(ctx, p.name)):
            flag = max(p.opts, key=len)  # (--n-points, not a short alias)
            return f"{flag}={message[m.end():]}"
    return message


def in_launch() -> bool:
    """Whether this process is one of a launch of several (torchrun's, accelerate's: ``WORLD_SIZE`` above 1)."""
    return os.environ.get("WORLD_SIZE", "1") not in ("", "1")


class StoppedBySignal(KeyboardInterrupt):
    """Raised in a command's main thread by SIGTERM (what ``timeout``, Slurm, Kubernetes and torchrun send to stop a
    process): it unwinds as Ctrl-C does, so the run's stages under way are recorded as failed and temporary folders
    are removed, where the signal's default action killed the process on the spot and left them ``running``."""

    def __init__(self, signum: int, at: float | None = None) -> None:
        # (in a launch the launcher also stops the others so once one process has ended, by a crash among others:
        # the manifest said "stopped by SIGTERM", pointing outside; a review's find)
        super().__init__(f"stopped by {signal.Signals(signum).name}" + (
            " (sent from outside, or by the launcher once another process of the launch had ended)"
            if in_launch() else ""))
        self.signum = signum
        self.at = time.monotonic() if at is None else at  # (for a launcher to name the process stopped first)


STOP_GRACE_ENV = "SIDE_STOP_GRACE_S"


def stop_grace() -> float:
    """How long a command stopped by SIGTERM may take to unwind before it leaves without: ``$SIDE_STOP_GRACE_S``
    seconds, 10 by default."""
    raw = os.environ.get(STOP_GRACE_ENV, "10")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise ValueError(f"{STOP_GRACE_ENV}={raw!r} must be a positive number of seconds, at most 3600")
    return seconds


@contextlib.contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """While a command runs: SIGTERM raises :class:`StoppedBySignal` (once; a second one kills at once, as before,
    where the unwinding hangs). Installed only where the signal's action is the default (a launcher's own
    handling, or one the embedding program set, is left as it is) and only in the main thread (the only one that
    may set it); restored after.

    Python runs the handler only once the main thread is back from a C call: a process of a launch waiting in an
    exchange for the others (at a stage's check-in, its share done) stopped only once they came there, after their
    share of the stage, without bound (it died at once before the handler; a review's find). So the signal also
    wakes a watch (``signal.set_wakeup_fd``), which, where the process is still there :func:`stop_grace` seconds
    later, records the stop and leaves without unwinding, exit status 143 (128 + SIGTERM)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    grace = stop_grace()

    def stop(signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise StoppedBySignal(signum)

    read, write = os.pipe()
    os.set_blocking(write, False)
    before = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    if before != -1:  # (another user of the wakeup fd, an event loop: it keeps it, and the stop waits for the handler)
        signal.set_wakeup_fd(before)
    else:
        threading.Thread(target=_stop_watch, args=(read, grace), name="side-stop-watch", daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if before == -1:
            signal.set_wakeup_fd(-1)
        os.close(write)  # (the watch reads its end and leaves)
        if before != -1:
            os.close(read)


def _stop_watch(read: int, grace: float) -> None:
    """:func:`stopped_by_sigterm`'s watch: on SIGTERM, wait ``grace`` seconds for the command to unwind and end the
    process (:func:`end_by_signal`); still here, leave without (exit status 143), the stop recorded and said."""
    try:
        while data := os.read(read, 64):
            if signal.SIGTERM in data:
                at = time.monotonic()
                time.sleep(grace)
                record_stop(at)
                if not in_launch():
                    os.write(2, f"error: stopped by SIGTERM, and still in a call that did not return after {grace:g} "
                                f"s ({STOP_GRACE_ENV}): left without recording it; a rerun resumes what was left "
                                "unfinished\n".encode())
                os._exit(128 + signal.SIGTERM)
    finally:
        os.close(read)


def end_by_signal(e: StoppedBySignal) -> None:
    """Leave after :class:`StoppedBySignal` has unwound the command: killed by that signal, as without the handler
    (status -15 to a parent: a launch names a process the launcher stopped as such, and a shell sees 143), with one
    line first where this is no process of a launch of several (whose launcher says which process stopped)."""
    leaving_on_error(128 + e.signum)
    record_stop(e.at)
    if not in_launch():
        console.print(f"[bold red]error:[/] {e}; a rerun resumes what was left unfinished", highlight=False,
                      soft_wrap=True)
    signal.signal(e.signum, signal.SIG_DFL)
    os.kill(os.getpid(), e.signum)


def cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a ValueError from the library, or an OS error (read-only or missing directory, disk full,
    permission denied), into one clear line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if isinstance(kwargs.get("device"), str):  # before any work (a bad one failed in the first stage)
                check_device(kwargs["device"])
            launch_if_asked(kwargs.get("ctx"))
            set_threads(kwargs.get("ctx"))
            with one_line_warnings(), stopped_by_sigterm():
                return fn(*args, **kwargs)
        except StoppedBySignal as e:
            end_by_signal(e)
            raise
        except ValueError as e:
            said = as_typed(str(e), kwargs.get("ctx"))
            console.print(f"[bold red]error:[/] {escape(said)}", highlight=False, soft_wrap=True)
            leaving_on_error(2)
            raise typer.Exit(2) from None
        except PeerFailed:  # another process of the launch failed and said why: no second account, no traceback
            leaving_on_error(PEER_FAILED_STATUS)
            raise typer.Exit(PEER_FAILED_STATUS) from None
        except OSError as e:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            console.print(f"[bold red]error:[/] {escape(str(e.strerror or e) + where)}", highlight=False,
                          soft_wrap=True)
            leaving_on_error(2)
            raise typer.Exit(2) from None
        except BaseException as e:
            if out_of_memory(e):  # (a batch size of 10^12 was a traceback ending in torch's allocator)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                ctx = kwargs.get("ctx")
                lower = ("lower --feature-batch-size (images per batch of the feature extractor) or --query-chunk "
                         "or --ref-chunk (the rows of a block of the nearest-neighbour search)"
                         if ctx is not None and {"query_chunk", "ref_chunk"} <= ctx.params.keys() else
                         "lower a batch size (the config's batch_size keys, or the command's batch-size option where "
                         "it has one)")  # (side evaluate and calibrate, which have no batch size, were told to)
                console.print(f"[bold red]error:[/] out of memory ({escape(first)}): {lower}, the number or the size "
                              "of the images (--resize), or use a larger machine", highlight=False, soft_wrap=True)
                leaving_on_error(2)
                raise typer.Exit(2) from None
            code = getattr(e, "exit_code", getattr(e, "code", 1))
            if code not in (0, None):  # (typer.Exit / SystemExit 0: a command that is done)
                leaving_on_error(code if isinstance(code, int) else 1)
            raise

    return wrapper


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says the machine ran out of memory: Python's MemoryError, torch's OutOfMemoryError (a GPU's), or
    the RuntimeError of torch's CPU allocator."""
    text = str(e)
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or (isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)))


# the commands whose work a launch of several processes splits (each process its shards, its rows of each batch);
# the others would run N times over, side by side
LAUNCHED = ("run", "extract", "sample", "cluster", "train-classifier", "train-target", "demo")


FREE_CORES_ENV = "SIDE_LAUNCH_FREE_CORES"  # set by side --processes N for its processes (--threads 0)


def launch_if_asked(ctx: typer.Context | None) -> None:
    """``side --processes N COMMAND ...``: once the command's arguments have parsed (a usage error is said once,
    before any process starts), run this same command line as a launch of N processes and exit with its status.
    A process of the launch (``WORLD_SIZE`` set) runs the command itself. A command a launch does not split is
    refused (it ran once per process, side by side, each writing the same files)."""
    import sys

    obj = ctx.find_root().obj if hasattr(ctx, "find_root") else None
    n = obj.get("processes", 1) if isinstance(obj, dict) else 1
    if n <= 1:  # (a process of the launch: its command line has no --processes)
        return
    if "WORLD_SIZE" in os.environ:  # (--processes was passed over without a word: one process ran)
        raise ValueError(f"--processes={n}: WORLD_SIZE={os.environ['WORLD_SIZE']} is set here, as in a process of a "
                         "launch already (a cluster job's, an earlier export): unset it, or leave --processes out and "
                         "let that launcher start the processes")
    names, c = [], ctx
    while c is not None and c.parent is not None:
        names.insert(0, c.info_name)
        c = c.parent
    if " ".join(names) not in LAUNCHED:
        raise ValueError(f"--processes={n}: side {' '.join(names)} runs in one process (a launch splits the work of "
                         f"side {', '.join(LAUNCHED)}); leave --processes out")
    args, skip = [], False
    given = ctx.meta.get("side.argv") if hasattr(ctx, "meta") else None  # (the root command's: cli.main)
    for a in sys.argv[1:] if given is None else given:  # the same command line, less --processes
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            args.append(a)
    if obj.get("threads") == 0:  # the cores free before the launch, for its processes to share (measured by each of
        # them, the others' start counted as busy: too few)
        os.environ[FREE_CORES_ENV] = str(free_cores())
    raise typer.Exit(launch(n, args))



def set_threads(ctx: typer.Context | None) -> None:
    """Set torch's CPU threads to ``side --threads N`` (0: the cores free now) once the command's own parsing
    succeeded: the root callback only records the request, so ``--help`` and usage errors never import torch.
    ``ctx``: the command's context (every command takes one; None when called outside the CLI)."""
    obj = ctx.find_root().obj if hasattr(ctx, "find_root") else None
    if not isinstance(obj, dict) or "threads" not in obj or obj.get("threads_set"):
        return
    import torch

    # 0: the cores free now, shared between the processes a launch runs on this machine (each took them all, and
    # two processes on 2 cores ran 4 threads: the oversubscription --threads 0 is there to avoid)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    free = os.environ.get(FREE_CORES_ENV, "") if local > 1 else ""  # (a launch side made: measured before it)
    n = obj["threads"] or max(1, (int(free) if free.isdigit() else free_cores()) // local)
    torch.set_num_threads(n)
    obj["threads_set"] = True
    logging.getLogger(__name__).info("torch threads: %d%s", n, "" if obj["threads"] else
                                     " (the cores free now" + (f", shared by {local} processes)" if local > 1 else ")"))


def typed_flags(ctx: typer.Context, names: dict[str, str]) -> dict[str, Any]:
    """The flags the user actually typed, as a nested override dict.

    ``names`` maps a CLI parameter name to its dotted config path (``"steps" -> "sample.steps"``).
    Flags left at their default do not override the config file.
    """
    typed: dict[str, Any] = {}
    flags_set(ctx, names)
    for param, path in names.items():
        if was_typed(ctx, param):
            value = ctx.params[param]
            if isinstance(value, Path):
                value = str(value)
            typed[path] = list(value) if isinstance(value, tuple) else value
    return cfg.dotted_to_nested(typed)


def was_typed(ctx: typer.Context, param: str) -> bool:
    """Whether the user gave parameter ``param`` (its name, or its flag: ``--sweep-scale``), not its default."""
    source = ctx.get_parameter_source(param.lstrip("-").replace("-", "_"))
    # compared by name: typer may carry its own copy of click's ParameterSource enum
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def build_config(cls: type[T], config_file: Path | None, overrides: dict[str, Any]) -> T:
    base = cfg.load_yaml(config_file) if config_file is not None else {}
    return cfg.from_dict(cls, cfg.merge(base, overrides))


BAND_SOURCES = ("bands", "bands_file", "heldout")  # the ways to give an evaluation's bands: alternatives


def without_replaced_bands(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` (an evaluate section) less the ways of giving bands that ``over`` replaces by giving another: they
    are alternatives, so one given later replaces the earlier ones, as any later value does (a --config with
    bands_file over a run's bands was refused as "give one of them, not both"). A held-out set is also the sample
    quality's reference: bands given later replace only the other bands, never it (the quality was measured against
    something else, or skipped, without a word); a held-out set given later replaces fixed bands (calibrated on it)."""
    given = [k for k in BAND_SOURCES if over.get(k) is not None]
    dropped = {k for k in ("bands", "bands_file") if given and k not in given}
    return {k: v for k, v in base.items() if k not in dropped}


def _overlay(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged over ``base`` (a run config's dicts), the bands it gives replacing ``base``'s others."""
    if isinstance(base.get("evaluate"), dict) and isinstance(over.get("evaluate"), dict):
        base = {**base, "evaluate": without_replaced_bands(base["evaluate"], over["evaluate"])}
    return cfg.merge(base, over)


def _run_config_dict(run: Path, config: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {}
    if (run / "config.yaml").is_file():
        from ..runs import read_run_config  # (the sets audit() saved into the run, where the run was moved to)

        base = read_run_config(run)
    if config is not None:
        base = _overlay(base, cfg.load_yaml(config))
    return _overlay(base, overrides)


def stage_config(run: Path, config: Path | None, overrides: dict[str, Any]) -> tuple[str | None, cfg.RunConfig]:
    """A stage command's config (the run's own ``config.yaml`` where it exists, then ``config``, then the flags) and
    what the command says when it leaves where nothing named the model (a new run directory, no ``--config`` or flag
    naming one: that it used the default, rather than doing so without a word), from one reading of ``config``: a
    pipe (``--config <(...)``) reads once, and a second reading found it empty, the command running on the defaults
    and writing them as the run's config without a word."""
    d = _run_config_dict(run, config, overrides)
    note = None if "model" in d else no_model_note(f"{run}: no config names a model",
                                                   "a --config file with model: ..., or side sample --model, names "
                                                   "another")
    return note, cfg.from_dict(cfg.RunConfig, d)


@contextlib.contextmanager
def holding_run(run: Path, wait: bool) -> Iterator[None]:
    """The run's lock held from before its ``config.yaml`` is read to the end of the command (``run_lock`` is
    re-entrant: the stages take it again); ``wait``: waited for where another process holds it, else that is an
    error at once. With ``--wait`` it was read before the wait, so a command queued behind another writer that
    changed the run's settings made its stages with the settings of before and wrote them back, undoing the other's;
    and the lock was let go between the stages and what the command does after them (``side run``'s report and
    findings), where a writer waiting took it and changed the run under them. A run that does not exist yet is
    made, locked, at once (a command started just before this one, still loading, then finds it held and says so;
    this one read no config and went on to write its defaults over the other's settings and results), and removed
    again where the command leaves nothing in it (a refusal). In a launch the other processes read it once the main
    one holds it."""
    group = ProcessGroup.from_env()
    # (the main process's answer for all: processes that saw the folder made or removed between their checks took
    # different branches, and one barrier met another exchange)
    new = not group.share(Path(run).is_dir())
    from ..runs import check_run_path, missing_folders, remove_empty_folders, run_lock

    if group.main:
        check_run_path(run)  # (a folder that is no run gets no lock file; --out FILE/sub is said as such, not as the
        # lock's mkdir's "Not a directory")
    made = missing_folders(run)  # (the lock makes them: a refused --out new/nested/run left new/nested behind)
    with run_lock(run, wait=wait) if group.main else contextlib.nullcontext():
        group.barrier()
        try:
            yield
        finally:
            if new and group.main and Path(run).is_dir() and [p.name for p in Path(run).iterdir()] == [".lock"]:
                shutil.rmtree(run)  # (held: a writer waiting on the removed file takes the folder's new one)
                remove_empty_folders(made[1:])


def say_note(note: str | None) -> None:
    """Print ``note`` as it is (no markup), where there is one."""
    if note is not None:
        console.print(note, highlight=False, markup=False)


def say_stale_report(run: Path) -> None:
    """Say that ``RUN/report/`` shows the run as it was before this call, where a stage was made since the report was
    written (:func:`~side_extract.report.shows_the_run_now`: a run with --no-report, a step command): it stayed in
    place, showing earlier results without a word."""
    if not ProcessGroup.from_env().main or not (Path(run) / "report" / "report.json").is_file():
        return
    from ..report import shows_the_run_now

    if shows_the_run_now(run) is False:
        say(f"{Path(run) / 'report'} shows the run as it was before this call: `side report {run}` "
            "writes it again")


def no_model_note(what: str, how: str) -> str:
    """The sentence said where nothing named the model and a run used the default target: ``what`` says what named
    none, ``how`` how to name another."""
    return f"{what}, so the run used the default, the embedded target {cfg.RunConfig.model!r} ({how})"


def progress_enabled(ctx: typer.Context) -> bool:
    return bool((ctx.find_root().obj or {}).get("progress", True))


def progress_lines(name: str, every: float = 30.0) -> Callable[[int, int], None]:
    """A ``callback(done, total)`` for runs without progress bars (``--no-progress``: logs, CI): a line at its
    first report, one every ``every`` seconds while the work runs, and one when it is done, timed from this call
    (a stage's start). A stage that is skipped (its results are already there) never reports: it prints nothing."""
    t0 = last = time.monotonic()
    state = {"said": False, "finished": False}

    def update(done: int, total: int) -> None:
        nonlocal last
        if state["finished"]:
            return
        now = time.monotonic()
        if total and done >= total:
            state["finished"] = True
            say(f"{name}: {done} of {total} done in {now - t0:.0f} s")
        elif not state["said"] or now - last >= every:
            state["said"], last = True, now
            say(f"{name}: {done} of {total}, {now - t0:.0f} s")

    return update


@contextlib.contextmanager
def progress_bar(ctx: typer.Context, description: str, *,
                 lines: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar as a ``callback(done, total)``; with progress bars switched off, a line now and then
    (:func:`progress_lines`), or None where ``lines`` is False (the caller reports in its own words). In a launch
    of several processes only the main one reports (the others' bars interleaved with its own, and stopped short)."""
    if not ProcessGroup.from_env().main:
        yield (lambda done, total: None) if lines else None
        return
    if not progress_enabled(ctx):
        yield progress_lines(description) if lines else None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


class _PlainFormatter(logging.Formatter):
    """Log lines with control characters other than newline and tab escaped: a folder name in a run someone gave
    (a method's, a file's) cannot set the terminal's title or clear its screen through a warning that names it."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """``text`` with control characters other than newline and tab written as escapes (``\\x1b``)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_PlainFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        fields = [float(v) for v in open("/proc/stat", encoding="ascii").readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def free_cores(sample_seconds: float = 0.25) -> int:
    """How many of this process's cores are free now: their count minus the cores other processes keep busy,
    measured over ``sample_seconds`` (/proc/stat; the 1-minute load average where that is missing). At least 1."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    a = _cpu_times()
    if a is not None:
        time.sleep(sample_seconds)
        b = _cpu_times()
        if b is not None and b[1] > a[1]:
            busy = (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or n)
            return max(1, min(n, n - int(round(busy))))
    try:
        return max(1, min(n, n - int(round(os.getloadavg()[0]))))
    except OSError:
        return n
