"""Run under torchrun (2 processes): ``side ARGS`` with ``{rank}`` in ARGS replaced by each process's rank, as
when each machine of a launch reads its own command line; says how each process ended."""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
from side_extract.cli.main import app  # noqa: E402

rank = os.environ["RANK"]
try:
    code = app([a.replace("{rank}", rank) for a in sys.argv[1:]], standalone_mode=False)
    print(f"rank {rank}: " + (f"exit {code}" if code else "finished without an error"), flush=True)
    sys.exit(code or 0)
except SystemExit as e:
    print(f"rank {rank}: exit {e.code}", flush=True)
    sys.exit(e.code or 0)
except Exception as e:  # noqa: BLE001 - said, then the launch fails
    print(f"rank {rank}: {type(e).__name__}: {e}", flush=True)
    sys.exit(1)
