"""Run under torchrun (tests/test_distributed.py): ``side_extract.audit`` with an in-memory training set on two
processes. Every rank took the run lock (the loser failed with RunLocked) and wrote the inputs."""
import sys

import side_extract
from side_extract.distributed import ProcessGroup

model, out = sys.argv[1], sys.argv[2]
digits = side_extract.load_image_set("digits:30")
config = {"extract.n": 6, "extract.steps": 2, "evaluate.carlini_n": 5, "evaluate.quality": [],
          "evaluate.bands": "high=0:0.1,mid=0.1:0.15,low=0.15:0.2"}
if len(sys.argv) > 3:  # "disagree": process 1 is given another seed (each machine reads its own command line)
    config["extract.seed"] = ProcessGroup.from_env().rank
res = side_extract.audit(model, digits.images, out=out, config=config, methods=["uncond"])
print(f"rank {ProcessGroup.from_env().rank} done: {res.methods['uncond'].n_generated} generations", flush=True)
