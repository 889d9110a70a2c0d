"""Run under torchrun (tests/test_distributed_launch.py): a stage of three shards of two images, one round, where
process 1 fails writing its shard (the middle one) and the main process writes the last. The main process must
not report the stage done (its own last shard ended at 6 of 6: "sample: 6 of 6 done" for a stage that failed).
argv[1]: the run folder; each process writes what it raised and its reports to rank-R.json beside it (read from a
file: the two processes' lines on one shared stdout can interleave, and a test read one's reports from the other's)."""
import json
import sys
from pathlib import Path

import numpy as np

from side_extract.distributed import ProcessGroup
from side_extract.runs import RunDir, shard_stage

group = ProcessGroup.from_env()
said = []


def make(lo, hi, progress):
    if group.rank == 1:
        raise ValueError("diverged on process 1")
    if progress is not None:
        progress(hi - lo, hi - lo)
    return {"images": np.zeros((hi - lo, 1, 2, 2), np.uint8), "index": np.arange(lo, hi)}


try:
    shard_stage(RunDir(Path(sys.argv[1]), group=group), "sample", "f", 6, 2, make,
                progress=lambda done, total: said.append((done, total)))
except Exception as e:
    told = {"error": f"{type(e).__name__}: {e}", "reported": said}
    (Path(sys.argv[1]).parent / f"rank-{group.rank}.json").write_text(json.dumps(told))
    print(f"rank {group.rank} {type(e).__name__}: {e}; reported {said}", flush=True)
    sys.exit(3)
print(f"rank {group.rank} finished without an error", flush=True)
