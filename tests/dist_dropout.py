"""Run under torchrun (tests/test_distributed.py): side-lora's fine-tuning of a target with dropout on two
processes. Each process writes the dropout masks it drew at step 1 (OUT/masks-RANK.npy): both processes drew the
same masks (one seed) for other rows, which no single process does."""
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from side_extract import config as cfg
from side_extract.distributed import ProcessGroup
from side_extract.finetune import finetune
from side_extract.models.target import UNetDenoiser

out = Path(sys.argv[1])
group = ProcessGroup.from_env()
torch.manual_seed(0)
unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                   norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D"), dropout=0.5)
target = UNetDenoiser(unet, DDPMScheduler(num_train_timesteps=1000))
masks = []


def record(module, inputs, output):  # the first dropout layer's mask: where it zeroed its input
    if not masks and isinstance(module, torch.nn.Dropout) and module.training:
        masks.append((output == 0) & (inputs[0] != 0))


torch.nn.modules.module.register_module_forward_hook(record)  # (fine-tuning runs a copy of the target)
x0 = torch.rand(16, 1, 8, 8) * 2 - 1
labels = np.arange(16) % 2
c = cfg.LoraConfig(rank=2, steps=1, batch_size=8, checkpoint_every=1, target_modules=("conv1", "conv2"))
finetune(target, x0, labels, c, out / "lora", group=group)
np.save(out / f"masks-{group.rank}.npy", masks[0].numpy())
print(f"rank {group.rank} done", flush=True)
