"""``side train-target``: train a diffusers UNet2DModel target for memorization studies."""
from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from .. import config as cfg
from ..distributed import ProcessGroup
from .common import build_config, cli_errors, say, path_value, progress_bar, typed_flags

D = cfg.TrainTargetConfig()


@cli_errors
def train_target_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Directory to write (a diffusers pipeline directory).",
                             parser=path_value),
    data: str = typer.Option(D.data, help="Training set: digits[:N], a folder of images, or an .npz."),
    resize: int | None = typer.Option(D.resize, help="Resize training images to this square size."),
    block_out_channels: str = typer.Option(",".join(map(str, D.block_out_channels)), help="UNet widths, comma-separated."),
    layers_per_block: int = typer.Option(D.layers_per_block),
    norm_num_groups: int = typer.Option(D.norm_num_groups),
    attention: bool = typer.Option(D.attention, help="Self-attention in the lowest-resolution down and up blocks too (the mid block always has one)."),
    num_train_timesteps: int = typer.Option(D.num_train_timesteps),
    beta_schedule: str = typer.Option(D.beta_schedule),
    prediction_type: str = typer.Option(D.prediction_type, help="What the UNet learns to output: epsilon (the noise), "
                                        "v_prediction or sample (x0), as in diffusers' training scripts."),
    steps: int = typer.Option(D.steps, help="Optimizer steps in total (a rerun resumes from the last checkpoint)."),
    batch_size: int = typer.Option(D.batch_size),
    lr: float = typer.Option(D.lr),
    weight_decay: float = typer.Option(D.weight_decay),
    ema: bool = typer.Option(D.ema, help="Keep an exponential moving average of the weights and save it."),
    ema_decay: float = typer.Option(D.ema_decay),
    checkpoint_every: int = typer.Option(D.checkpoint_every),
    seed: int = typer.Option(D.seed),
    device: str = typer.Option("cpu", help="Torch device."),
    config: Path | None = typer.Option(None, "--config", help="YAML file with any of these options as keys.",
                                       parser=path_value),
) -> None:
    """Train a UNet2DModel with the DDPM loss; writes checkpoints and a diffusers directory to OUT."""
    names = {k: k for k in cfg.to_dict(D)}
    overrides = typed_flags(ctx, names)
    if "block_out_channels" in overrides:
        try:
            overrides["block_out_channels"] = [int(v) for v in str(overrides["block_out_channels"]).split(",")]
        except ValueError:
            raise ValueError(f"block_out_channels={block_out_channels!r} must be comma-separated integers") from None
    c = build_config(cfg.TrainTargetConfig, config, overrides)
    from ..data import load_image_set
    from ..models.target import check_image_size, check_train_out, target_scheduler, train_target, training_key

    # before the data loads (they came after loading and hashing it, "training on ..." said): the folder, and a
    # target or checkpoints in it trained with other settings (the data is compared once it is loaded)
    check_train_out(out, training_key(c), data=False)
    target_scheduler(c)
    if c.resize is not None:
        check_image_size(c, c.resize, c.resize)
    images = load_image_set(c.data, c.resize)
    group = ProcessGroup.from_env()  # several processes (torchrun / accelerate launch): data-parallel training
    if group.main:
        say(f"training on {images.name}: {len(images)} images of shape {images.shape}"
            + (f", {group.world} processes" if group.world > 1 else ""))
    def report(step: int, steps: int, loss: float, seconds: float) -> None:
        say(f"step {step}/{steps}: loss {loss:.4f}, {seconds:.0f} s")

    with progress_bar(ctx, "train-target", lines=False) if group.main else contextlib.nullcontext() as cb:
        # without progress bars, a line every 5 % of the steps (step, mean loss since the last line, time)
        result = train_target(c, images, out, device=group.device(device), progress=cb,
                              report=report if cb is None and group.main else None, group=group)
    if not group.main:
        return
    say(f"wrote {result.path} (steps {result.steps}, mean loss of the last {min(100, result.steps)} steps "
        f"{result.final_loss:.4f})")
