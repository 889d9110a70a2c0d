"""Shared fixtures: tiny diffusers-style dummy UNets (8x8, as diffusers' own tests use) saved as pipelines."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: idle threads sleep, not spin

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from side_extract.models.target import save_target


def pytest_configure(config: pytest.Config) -> None:
    """Torch threads: SIDE_THREADS (make test THREADS=n), else the cores free now (fewer on a busy machine), shared
    among pytest-xdist's workers (``make test`` runs one per core): two workers of two threads each on two cores
    ran the suite several times slower."""
    from side_extract.cli.common import free_cores

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    torch.set_num_threads(int(os.environ.get("SIDE_THREADS") or 0) or max(1, free_cores() // workers))


def tiny_unet(channels: int = 1, size: int = 8, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def interrupt_at(stage: str, at: int = 1, *, prefix: bool = False):
    """A pipeline ``progress`` factory that raises KeyboardInterrupt (Ctrl-C) once the progress bar named ``stage``
    (any name starting so, with ``prefix``) has counted ``at``."""
    def factory(name: str):
        def cb(done: int, total: int) -> None:
            if (name.startswith(stage) if prefix else name == stage) and done >= at:
                raise KeyboardInterrupt

        return cb

    return factory


def tiny_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 8x8x1 dummy pipeline (random weights)."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    save_target(tiny_unet(), tiny_scheduler(), out)
    return out


@pytest.fixture(scope="session")
def tiny_rgb_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny_rgb"
    save_target(tiny_unet(channels=3), tiny_scheduler(), out)
    return out


@pytest.fixture
def one_thread():
    """Torch on one thread: on a shared 2-core machine, two threads run a test several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ContextRecorder:
    """A stand-in for a context manager that takes a device (``models.target.reproducible_gradients``):
    ``devices()`` is the stack of devices whose blocks are open right now, ``seen`` what was recorded inside."""

    def __init__(self) -> None:
        self.open: list[torch.device] = []
        self.seen: list[list[torch.device]] = []

    @contextlib.contextmanager
    def __call__(self, device):
        self.open.append(torch.device(device))
        try:
            yield
        finally:
            self.open.pop()

    def record(self) -> None:
        self.seen.append(list(self.open))


@pytest.fixture
def context_recorder() -> ContextRecorder:
    return ContextRecorder()
