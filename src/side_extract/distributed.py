"""Several processes on one run (``torchrun`` or ``accelerate launch``): who does what.

A launch of N processes is one writer of the run directory. The sharded stages (the synthetic set and every
method's generations) are split between the processes by shard: process r writes the shards k with
k % N == r, each atomically, so the union is the same files, bit for bit on the CPU, as a one-process run
(every sample draws its noise from its own generator seeded by (seed, global index)); a killed process's
shards are missing and are written by the rerun. Every other stage runs on the main process first; the
others then find it complete in the manifest and read its files. Only the main process holds the run lock
and writes the manifest.

On the CPU: ``torchrun --nproc_per_node 2 -m -- side_extract ...`` (the ``--`` keeps torchrun from reading
our ``--n`` as an abbreviation of its own options) or ``accelerate launch --multi_gpu
--num_processes 2 -m side_extract ...`` (``accelerate launch --cpu --num_processes 2`` starts one
process only). The processes talk through ``accelerate``'s ``PartialState`` (gloo: only small control messages
cross between them; the images go through the run directory).

Training (the classifiers, side-lora's fine-tuning, ``side train-target``) is data-parallel: every process
draws the same global batch from the step's generator, takes its rows ``rank::world`` (``local_rows``) and
computes ``world / n * sum(per-row losses)`` (``local_loss``); torch's ``DistributedDataParallel`` (the
engine ``accelerate`` wraps) averages the gradients over the processes, which gives every process the
gradient of the global batch's mean loss, so the optimizer steps are the same as one process's up to the
order of floating-point sums (gloo on the CPU, an NCCL group on GPUs); a target with dropout, fine-tuned by
side-lora, is the exception: each process draws its own rows' masks (warned of). One process is the same code: its
rows are the whole batch and no wrapper is added. BatchNorm layers (the classifiers) normalise with the global
batch's statistics: torch's SyncBatchNorm on GPUs, and on the CPU, which it does not support, the same sums
all-reduced over gloo (:func:`_global_batchnorm`).
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
log = logging.getLogger(__name__)


TIMEOUT_ENV = "SIDE_PROCESS_TIMEOUT_S"


def check_device(device: str) -> None:
    """Refuse a device torch cannot use here, naming it and what is available (torch's own errors were an
    assertion or a parse error from deep inside the first stage)."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device: expected cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA (a CPU build)" if torch.version.cuda is None
                   else "no GPU is visible to it")
            raise ValueError(f"device={device!r}: {why}; use device 'cpu', or install a CUDA build of torch on a "
                             "machine with a GPU")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}: MPS is not available here; use device 'cpu'")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r}: expected cpu, cuda, cuda:N or mps")


MAX_TIMEOUT_S = 365 * 86400.0
PEER_FAILED_STATUS = 3  # the exit status of a process that stops because another process of its launch failed


class PeerFailed(RuntimeError):
    """Another process of the launch failed (it says why itself): raised on the processes it did not fail on, which
    leave with :data:`PEER_FAILED_STATUS` and no words of their own (a traceback of a RuntimeError, status 1, on
    every other process; the launcher then named whichever left first)."""


class ExchangeTimedOut(ValueError):
    """No answer from the other processes within the process timeout (:func:`process_timeout`): said by the process
    that waited, naming the setting (it left as :class:`PeerFailed`, silent, and the launcher named the main process
    it had stopped itself, "killed by signal 15")."""


@contextlib.contextmanager
def _exchange() -> Iterator[None]:
    """An exchange with the other processes; its failure (the connection reset by a process that died) is another
    process's: :class:`PeerFailed` (gloo's traceback, status 1, on the survivor, which the launcher then named); no
    answer within the process timeout is :class:`ExchangeTimedOut`."""
    try:
        yield
    except PeerFailed:
        raise
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "timed out" in str(e).lower():
            raise ExchangeTimedOut(
                f"no answer from the other processes within {TIMEOUT_ENV}={process_timeout().total_seconds():g} s "
                "(one process worked alone, or waited for another writer of the run, that long while the others "
                "waited): "
                f"raise {TIMEOUT_ENV} ({first})") from None
        raise PeerFailed(f"the exchange with the other processes failed: {first}") from None


def process_timeout() -> datetime.timedelta:
    """How long a process waits for the others at one exchange: ``$SIDE_PROCESS_TIMEOUT_S`` seconds, by default
    24 hours. The others wait while the main process works alone (memorization scores, features, clustering,
    calibration) or waits for another writer's lock (``--wait``); torch's own default, 30 minutes, ended such a
    launch with a bare gloo error. It bounds the exchanges only: the first connection, which waits for every process
    of the launch to start, is given at least 30 minutes (``CONNECT_TIMEOUT``)."""
    raw = os.environ.get(TIMEOUT_ENV, "86400")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_TIMEOUT_S:  # (inf passed, and timedelta failed with an OverflowError on every process)
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds, at most {MAX_TIMEOUT_S:.0f} "
                         "(a year)")
    return datetime.timedelta(seconds=seconds)


CONNECT_TIMEOUT = datetime.timedelta(minutes=30)  # the first connection's bound at least (torch's default)


def _bound_exchanges(timeout: datetime.timedelta) -> None:
    """Bound every later exchange of the default group by ``timeout`` (the group was made with the connection's)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout  # (torch's own setter, private in 2.13)

    _set_pg_timeout(timeout)


CLOSE_BARRIER_S = 60.0  # how long a finished process waits at exit for the others (a dead peer: then it goes on)
_LEAVING_WITH: list[int] = []  # the exit status this process leaves with on an error (see leaving_on_error)


def leaving_on_error(status: int = 1) -> None:
    """Say that this process is leaving on an error (the command line's error exit says so; an uncaught exception
    is seen by itself): its exit then tears the group down at once instead of waiting at the exit barrier. The
    others may be waiting for it at another exchange, which that barrier never answers: a launch whose process 1
    failed alone hung until ``$SIDE_PROCESS_TIMEOUT_S`` (a day by default). Leaving at once, its launcher
    (torchrun, accelerate) stops the others. ``status``: the exit status it leaves with."""
    _LEAVING_WITH[:] = [status]


def _close_process_group() -> None:
    """Tear the process group down before the interpreter does, once every process has got there: left to
    interpreter shutdown, gloo's threads were destroyed while still joinable on one process of a finished 2-process
    launch ("terminate called without an active exception", SIGABRT), and torchrun then failed a launch whose work
    was done. Destroying it at exit alone still did so in about 1 of 40 launches: the main process's last broadcast
    returns before the others have received it, so it could tear its group down with that send still in flight. A
    barrier that every process answers (gloo's monitored barrier, which gives up after ``CLOSE_BARRIER_S`` on a
    process that died) comes first."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if _LEAVING_WITH or getattr(sys, "last_value", None) is not None:  # (uncaught: Python sets it)
            if _LEAVING_WITH not in ([PEER_FAILED_STATUS], [2]):  # (one that leaves for another's failure has no
                # words of its own, and one that said its error, status 2, has said it: the warning followed every
                # refusal of a launch)
                log.warning("this process is leaving on an error: its launcher stops the others")
            os._exit(_LEAVING_WITH[0] if _LEAVING_WITH else 1)  # (no teardown: the others may be inside an
            # exchange with it, and gloo's would wait for them)
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=CLOSE_BARRIER_S))
        except RuntimeError as e:  # a process that failed or died: tear down anyway
            log.warning("at exit, not every process reached the end (%s)", str(e).splitlines()[0] if str(e) else e)
        dist.destroy_process_group()


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a launch: ``rank`` of ``world`` (1 process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "ProcessGroup":
        """The launch this process belongs to (``WORLD_SIZE`` / ``RANK`` as torchrun and accelerate set them)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        from accelerate import PartialState

        # gloo carries the few control messages (decisions, barriers, errors); the models run on the device the
        # command names, this process's GPU under --device cuda (``device``)
        exchanges = process_timeout()
        # the first connection waits for every process to start, however short the bound on exchanges: processes of
        # one launch start seconds apart on a loaded machine, and a bound of a few seconds failed them there
        state = PartialState(cpu=True, timeout=max(exchanges, CONNECT_TIMEOUT))
        _bound_exchanges(exchanges)
        _watch_launcher()
        atexit.unregister(_close_process_group)  # once, however many times a command asks for its group
        atexit.register(_close_process_group)
        return cls(state.process_index, state.num_processes, state.local_process_index)

    def device(self, device: str) -> str:
        """``cuda`` means this process's GPU (``cuda:<local rank>``) in a launch of several processes; a machine
        with fewer GPUs than the processes launched on it is refused (they would fail at their first tensor). A
        GPU named by number (``cuda:1``) is taken by every process, as asked, and the main one says so."""
        if self.world > 1 and device.startswith("cuda:") and self.main:
            log.warning("--device %s: all %d processes of this launch share that one GPU; --device cuda gives each "
                        "process its own (cuda:<local rank>)", device, self.world)
        if device != "cuda" or self.world == 1:
            return device
        import torch

        if self.local_rank >= torch.cuda.device_count():
            raise ValueError(f"--device cuda: process {self.rank} would take cuda:{self.local_rank}, but this machine "
                             f"has {torch.cuda.device_count()} GPU(s); launch at most that many processes per machine")
        return f"cuda:{self.local_rank}"

    def owns(self, shard: int) -> bool:
        return shard % self.world == self.rank

    def _broadcast(self, value: Any) -> Any:
        import torch.distributed as dist

        box = [value if self.main else None]
        with _exchange():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            self._broadcast(None)

    def share(self, value: T) -> T:
        """The main process's ``value`` on every process."""
        return value if self.world == 1 else self._broadcast(value)

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the main process, then on the others (which then find its results on disk). An error
        on the main process is raised on every process instead of leaving them waiting."""
        if self.world == 1:
            return fn()
        if self.main:
            try:
                out = fn()
            except BaseException as e:
                self._broadcast(f"{type(e).__name__}: {e}")
                raise
            self._broadcast(None)
            return out
        error = self._broadcast(None)
        if error is not None:
            raise PeerFailed(f"the main process failed: {error}")
        return fn()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the main process only and give its value to every process (its error too)."""
        if self.world == 1:
            return fn()
        if self.main:
            try:
                value = fn()
            except BaseException as e:
                self._broadcast(("error", f"{type(e).__name__}: {e}"))
                raise
            self._broadcast(("ok", value))
            return value
        status, value = self._broadcast(None)
        if status == "error":
            raise PeerFailed(f"the main process failed: {value}")
        return value

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process (``[value]`` for one process)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        with _exchange():
            dist.all_gather_object(values, value)
        return values

    def total(self, value: int) -> int:
        """The sum of every process's ``value`` (e.g. the shards each one wrote), on every process."""
        return sum(self.gather(value))

    def agree(self, value: Any, what: str) -> None:
        """Refuse, on every process, a launch whose processes disagree on ``value`` (``what`` names it): processes
        given other configs or run directories mixed their stages' files without a word (each machine of a launch
        reads its own command line)."""
        values = self.gather(value)
        if any(v != values[0] for v in values):
            other = next(r for r, v in enumerate(values) if v != values[0])
            raise ValueError(f"the processes of this launch were given different {what}: process 0 {values[0]!r}, "
                             f"process {other} {values[other]!r} (give every process the same command line)")

    def together(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every process (each its own share of some work), then check in: an error on any
        process is raised on every process (the failing one re-raises its own) instead of leaving the others
        waiting at the next collective step."""
        if self.world == 1:
            return fn()
        mine: BaseException | None = None
        value: Any = None
        try:
            value = fn()
        except KeyboardInterrupt:  # a stop (SIGTERM, Ctrl-C) leaves at once: the check-in waited for the others'
            # share of the work, hours where a stage is long, before this process could go (a launch's process 1
            # stopped by SIGTERM waited there as process 0 went on sampling); its exit tears the group down, and the
            # launcher stops the others
            raise
        except BaseException as e:  # reported to the others, then re-raised
            mine = e
        errors = self.gather(None if mine is None else f"process {self.rank}: {type(mine).__name__}: {mine}")
        if mine is not None:
            raise mine
        failed = [e for e in errors if e]
        if failed:
            raise PeerFailed(f"another process failed: {failed[0]}")
        return value

    # ---------------------------------------------------------------------------------------------
    # data-parallel training
    def local_rows(self, n: int) -> slice:
        """This process's rows of a global batch of ``n`` (all of them for one process)."""
        if n < self.world:
            raise ValueError(f"a batch of {n} rows cannot be split between {self.world} processes; "
                             f"use a batch size of at least {self.world}")
        return slice(self.rank, n, self.world)

    def local_loss(self, per_row: "torch.Tensor", n: int) -> "torch.Tensor":
        """This process's share of the global batch's mean loss, scaled so that the gradients that
        ``data_parallel`` averages over the processes are the mean loss's gradient."""
        return per_row.sum() * (self.world / n)

    def data_parallel(self, model: "torch.nn.Module", device: str) -> "torch.nn.Module":
        """``model`` wrapped in ``DistributedDataParallel`` over this launch (the model itself for one
        process). On GPUs its BatchNorm layers become SyncBatchNorm."""
        if self.world == 1:
            return model
        import torch
        from torch.nn.parallel import DistributedDataParallel

        # peft's 1x1 LoRA convolutions get weight gradients whose strides differ from the weights' only along
        # their size-1 axes, which DDP's reducer reports once per process as a possible slowdown (it copies them
        # into its buckets): not a fault of the run, so not said to the user
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides",
                                category=UserWarning)
        if torch.device(device).type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=_nccl_group())
            return DistributedDataParallel(model, device_ids=[torch.device(device).index],
                                           process_group=_nccl_group())
        _global_batchnorm(model)
        return DistributedDataParallel(model)

    def local_count(self, n: int) -> int:
        """How many of a global batch's ``n`` rows this process trains on."""
        return len(range(n)[self.local_rows(n)])

    def batch_mean(self, per_row: "torch.Tensor", n: int) -> float:
        """The global batch's mean of a per-row quantity (the loss to log), from each process's rows."""
        total = float(per_row.detach().sum().item())
        if self.world == 1:
            return total / n
        import torch
        import torch.distributed as dist

        box = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(box)
        return float(box.item()) / n

    def check_replicas(self, model: "torch.nn.Module", what: str) -> None:
        """Raise unless every process holds the same parameters in ``model`` (data-parallel training keeps the
        replicas equal; a difference means the processes trained on different data or settings). Buffers are
        left out: BatchNorm's running statistics, updated from the global batch on every process, may differ in their
        last bits; the main process's are saved."""
        if self.world == 1:
            return
        h = hashlib.sha256()
        for name, v in sorted(model.named_parameters()):
            h.update(name.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        if len(set(self.gather(h.hexdigest()))) != 1:
            raise RuntimeError(f"{what}: the {self.world} processes ended with different weights; they must be "
                               "launched with the same configuration and data")


def _global_batchnorm(model: "torch.nn.Module") -> None:
    """Make ``model``'s BatchNorm2d layers normalise with the global batch's statistics on the CPU, as torch's
    SyncBatchNorm does on GPUs (which it alone supports): each layer's per-channel sums, sums of squares and row
    counts are summed over the processes with an all-reduce that autograd differentiates (its backward sums the
    gradients), so the forward and the averaged gradients equal one process's on the whole batch up to float
    rounding. With each process's own rows instead, a 2-process classifier ended 0.04-0.11 away from a 1-process
    one. In eval mode the layers are plain BatchNorm (the running statistics, updated from the global batch)."""
    import torch

    for module in model.modules():
        if type(module) is torch.nn.BatchNorm2d:
            module.__class__ = _global_batchnorm_class()


def _global_batchnorm_forward(self: "torch.nn.BatchNorm2d", x: "torch.Tensor") -> "torch.Tensor":
    import torch
    from torch.distributed.nn.functional import all_reduce

    if not self.training:
        return torch.nn.BatchNorm2d.forward(self, x)
    c = x.shape[1]
    rows = x.new_tensor([float(x.numel() // c)])
    with warnings.catch_warnings():  # deprecated in torch 2.13 (the pin keeps it) for a functional all_reduce
        # whose gradient older torch lacks
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                                category=FutureWarning)
        total = all_reduce(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), rows]))  # (summed over processes)
    n = total[-1]
    mean = total[:c] / n
    var = (total[c:2 * c] / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)  # unbiased, as BatchNorm keeps
    y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
    return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y


@functools.cache
def _global_batchnorm_class() -> type:
    """BatchNorm2d with :func:`_global_batchnorm_forward` (made on first use: this module imports torch lazily);
    its state dict is BatchNorm2d's, so the saved model loads as the plain one."""
    import torch

    return type("GlobalBatchNorm2d", (torch.nn.BatchNorm2d,), {"forward": _global_batchnorm_forward})


@functools.cache
def _nccl_group() -> Any:
    import torch.distributed as dist

    return dist.new_group(backend="nccl", timeout=process_timeout())  # (its own default: 10 minutes)


def launch_arguments(nproc: int) -> list[str]:
    """torchrun's arguments for a launch of ``side`` on this machine: append the ``side`` arguments. The ``--``
    keeps torchrun's parser from reading our ``--n`` as an abbreviation of its own options."""
    return ["--standalone", f"--nproc_per_node={nproc}", "-m", "--", "side_extract.cli.main"]


def torchrun_command(nproc: int) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m -- side_extract.cli.main``: append the ``side`` arguments."""
    import shutil
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        raise ValueError("several processes need torchrun (it comes with torch), next to this Python or on PATH")
    return [torchrun, *launch_arguments(nproc)]


LAUNCHER_ENV = "SIDE_LAUNCHER_PID"  # set by launch() for its processes: the side process that waits for them
STOPS_ENV = "SIDE_LAUNCH_STOPS"  # set by launch(): the folder where its processes record when a signal stopped them


def record_stop(at: float) -> None:
    """In a process of a launch ``side --processes N`` made: record that a signal stopped it at ``at``
    (``time.monotonic()``, one clock for every process of the machine), so that the launcher names the process
    stopped first: one stopped from outside and the others torchrun stopped after it all end by SIGTERM, and the
    launcher named process 0 (an interruption review's find)."""
    folder, rank = os.environ.get(STOPS_ENV), os.environ.get("RANK", "")
    if folder and rank.isdigit() and os.path.isdir(folder):
        with contextlib.suppress(OSError):  # (a record lost: the launcher names the process as before)
            with open(os.path.join(folder, f"rank-{rank}"), "w", encoding="utf-8") as f:
                f.write(repr(at))


def _stops(folder: str) -> dict[int, float]:
    """rank -> when a signal stopped it, as its processes recorded them (:func:`record_stop`)."""
    stops = {}
    for name in os.listdir(folder):
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                stops[int(name.removeprefix("rank-"))] = float(f.read())
    return stops


@functools.cache
def _watch_launcher() -> None:
    """In a process of a launch ``side --processes N`` made (:data:`LAUNCHER_ENV`): stop this process (SIGTERM)
    within about a second of that ``side`` being gone. torchrun starts each process in a session of its own, so a
    launcher killed outright (SIGKILL, the OOM killer, a CI job cancelled) left them running on, writing the run and
    holding its lock: a rerun was refused as written by a process the user never started. Watched only where this
    process's parent is that launcher."""
    import threading
    import time

    raw = os.environ.get(LAUNCHER_ENV, "")
    if not raw.isdigit() or os.getppid() != int(raw):
        return
    launcher = int(raw)

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="side-launcher-watch", daemon=True).start()


def launch(nproc: int, args: list[str]) -> int:
    """Run ``side ARGS`` as a launch of ``nproc`` processes on this machine (torchrun's launcher, run in this
    process, which waits for them) and return the launch's exit status: 0, or the first failed process's. A
    process that failed with status 2 (an error it printed itself: a config or input error, said by every process
    that met it) gets no more words; another status (a crash, a signal) is named in one line, not torchrun's report
    and traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's default for each process, without its warning: each process sets its own threads (side --threads)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # (its processes stop once it is gone: _watch_launcher)
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)  # its per-process failure lines: said below, once
    stops = tempfile.mkdtemp(prefix="side-launch-stops-")
    os.environ[STOPS_ENV] = stops
    try:
        run(parse_args([*launch_arguments(nproc), *args]))
    except ChildFailedError as e:
        # the first to fail of its own: any before one the launcher stopped (SIGTERM, in the same second), and never
        # one that left because another failed (PEER_FAILED_STATUS); within a second (torch stamps every failure it
        # notices together), one killed by a signal, then one that said its error (status 2), before a status 1,
        # which the survivors of a killed process leave with (the survivor, process 0, was named: a review's find).
        # Of those ended by SIGTERM, the one stopped first, as they recorded it (one stopped from outside, before
        # the launcher stopped the others), then any that recorded nothing
        def kind(code: int) -> int:
            return 0 if code < 0 else 1 if code == 2 else 2

        stopped = _stops(stops)

        def by_term(r: int, code: int) -> bool:  # (143: one that left its unwinding after the stop's grace)
            return code == -signal.SIGTERM or (code == 128 + signal.SIGTERM and r in stopped)

        own = sorted((by_term(r, f.exitcode), stopped.get(r, math.inf) if by_term(r, f.exitcode) else 0.0,
                      f.timestamp, kind(f.exitcode), r) for r, f in e.failures.items()
                     if f.exitcode != PEER_FAILED_STATUS)
        rank, failure = (own[0][-1], e.failures[own[0][-1]]) if own else e.get_first_failure()
        code = failure.exitcode
        if code != 2:
            how = (f"was killed by signal {-code}" if code < 0 else "was stopped by signal 15 (exit status 143)"
                   if by_term(rank, code) else f"ended with exit status {code}")
            print(f"error: process {rank} of the launch of {nproc} {how}", file=sys.stderr, flush=True)
        return code if code > 0 else 1
    except SignalException as e:  # the launcher itself stopped (Ctrl-C): torchrun has stopped its processes; its
        # traceback (23 lines, "SignalException: Process ... got signal: 2") said it, where one process says nothing
        print(f"error: the launch of {nproc} processes was stopped by {signal.Signals(e.sigval).name}; a rerun "
              "resumes what was left unfinished", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    finally:
        elastic.setLevel(level)
        os.environ.pop(STOPS_ENV, None)
        shutil.rmtree(stops, ignore_errors=True)
    return 0


SINGLE = ProcessGroup()

__all__ = ["ProcessGroup", "PeerFailed", "PEER_FAILED_STATUS", "SINGLE", "launch", "launch_arguments", "torchrun_command",
           "process_timeout", "TIMEOUT_ENV"]
