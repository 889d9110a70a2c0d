"""Run under torchrun (tests/test_distributed.py): process 1 fails writing a shard of the second of four rounds
(rounds: adaptive allocation, avoidance, dedup-driven stopping), inside the check-in shard_stage wraps the writing in.
Every process must leave at once with the error named (the main one waited at the round's barrier for the process
timeout, and said only gloo's error). argv[1]: the output folder."""
import sys
import time
from pathlib import Path

import numpy as np

from side_extract.distributed import ProcessGroup
from side_extract.runs import shard_ranges, write_shards

group = ProcessGroup.from_env()


def make(lo, hi):
    if group.rank == 1 and lo == 3:
        raise ValueError("diverged on process 1")
    return {"images": np.zeros((hi - lo, 1, 2, 2), np.uint8), "index": np.arange(lo, hi)}


t0 = time.time()
try:
    group.together(lambda: write_shards(Path(sys.argv[1]), shard_ranges(8, 1, 2), make, group=group))
except Exception as e:
    print(f"rank {group.rank} {type(e).__name__}: {e} after {time.time() - t0:.0f} s", flush=True)
    sys.exit(3)
print(f"rank {group.rank} finished without an error", flush=True)
