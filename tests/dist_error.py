"""Run under torchrun (tests/test_distributed.py): process 1 fails alone while the main process waits for it at an
exchange (as after writing its shards). argv[1]: "uncaught" (an exception no one catches) or "cli" (a command's
ValueError, which the command line turns into exit status 2)."""
import sys

import typer

from side_extract.cli.common import cli_errors
from side_extract.distributed import ProcessGroup

group = ProcessGroup.from_env()


@cli_errors
def work() -> None:
    if not group.main:
        raise ValueError("process 1 fails alone")
    group.barrier()  # the main process waits here for process 1
    print("main passed the barrier", flush=True)


if sys.argv[1] == "cli":
    app = typer.Typer()
    app.command()(lambda: work())
    app(args=[])
else:
    if not group.main:
        raise RuntimeError("process 1 fails alone")
    group.barrier()
