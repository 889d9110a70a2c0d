"""Run under torchrun (tests/test_distributed.py): process 1 fails inside ProcessGroup.together; every process
must leave with an error naming it (none may wait forever), and on_main must hand the main's value over."""
import sys

from side_extract.distributed import ProcessGroup

group = ProcessGroup.from_env()
assert group.world == 2
assert group.on_main(lambda: f"from {group.rank}") == "from 0"


def work():
    if group.rank == 1:
        raise ValueError("bad shard on process 1")
    return "ok"


try:
    group.together(work)
except ValueError as e:
    print(f"rank {group.rank} raised its own: {e}", flush=True)
    sys.exit(3)
except RuntimeError as e:
    print(f"rank {group.rank} told: {e}", flush=True)
    sys.exit(4)
print(f"rank {group.rank} finished without an error", flush=True)
