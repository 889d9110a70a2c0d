"""Run under torchrun (tests/test_distributed.py): the main process works alone for argv[1] seconds before the
next exchange; the other waits at it, as in the stages the main process runs first. The wait is bounded by
$SIDE_PROCESS_TIMEOUT_S. With argv[2], process 1 starts that many seconds late (before its first connection)."""
import os
import sys
import time

from side_extract.distributed import ProcessGroup

if len(sys.argv) > 2 and os.environ["RANK"] == "1":
    time.sleep(float(sys.argv[2]))
group = ProcessGroup.from_env()
if group.main:
    time.sleep(float(sys.argv[1]))
group.barrier()
print(f"rank {group.rank} passed the barrier", flush=True)
