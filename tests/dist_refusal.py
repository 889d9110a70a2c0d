"""Run under torchrun (tests/test_distributed_launch.py): every process of a launch meets the same refusal of the
run's checks (overlapping bands), in a run without sweeps (argv[2] "plain") or with them ("sweep"). Each process
records what it raised in FOLDER/rank-N.json (argv[1]): the main process the refusal, the others that the main one
failed (they say nothing of their own)."""
import json
import sys
from pathlib import Path

from side_extract import config as cfg
from side_extract.api import as_target
from side_extract.distributed import ProcessGroup
from side_extract.sweeps import run_with_sweeps

from conftest import tiny_scheduler, tiny_unet

folder, kind = Path(sys.argv[1]), sys.argv[2]
group = ProcessGroup.from_env()
rc = cfg.RunConfig(model="in-memory", train="digits:30",
                   sample=cfg.SampleConfig(n=8, steps=2), extract=cfg.ExtractConfig(methods=("side", "uncond"), n=2, steps=2),
                   evaluate=cfg.EvaluateConfig(bands="high=0:0.1,mid=0.05:0.2"),
                   sweep=cfg.SweepConfig(tau=(0.1, 0.2) if kind == "sweep" else ()))
try:
    run_with_sweeps(folder / "run", rc, target=as_target(tiny_unet(), scheduler=tiny_scheduler()))
except BaseException as e:
    (folder / f"rank-{group.rank}.json").write_text(json.dumps({"error": type(e).__name__, "text": str(e)}))
    raise
