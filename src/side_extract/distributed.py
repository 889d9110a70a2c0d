"""Several processes on one run (``torchrun`` or ``accelerate launch``): who does what.

A launch of N processes is one writer of the run directory. The sharded stages (the synthetic set and every
method's generations) are split between the processes by shard: process r writes the shards k with
k % N == r, each atomically, so the union is the same files, bit for bit on the CPU, as a one-process run
(every sample draws its noise from its own generator seeded by (seed, global index)); a killed process's
shards are missing and are written by the rerun. Every other stage runs on the main process first; the
others then find it complete in the manifest and read its files. Only the main process holds the run lock
and writes the manifest.

On the CPU: ``torchrun --nproc_per_node 2 -m side_extract.cli.main ...`` or ``accelerate launch --multi_gpu
--num_processes 2 -m side_extract.cli.main ...`` (``accelerate launch --cpu --num_processes 2`` starts one
process only). The processes talk through ``accelerate``'s ``PartialState`` (gloo: only small control messages
cross between them; the images go through the run directory).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


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
        state = PartialState(cpu=True)
        return cls(state.process_index, state.num_processes, state.local_process_index)

    def device(self, device: str) -> str:
        """``cuda`` means this process's GPU (``cuda:<local rank>``) in a launch of several processes."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world > 1 else device

    def owns(self, shard: int) -> bool:
        return shard % self.world == self.rank

    def _broadcast(self, value: Any) -> Any:
        import torch.distributed as dist

        box = [value if self.main else None]
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
            raise RuntimeError(f"the main process failed: {error}")
        return fn()


SINGLE = ProcessGroup()

__all__ = ["ProcessGroup", "SINGLE"]
