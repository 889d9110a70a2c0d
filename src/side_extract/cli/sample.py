"""``side sample``: unguided samples of a target model, as shards in a run directory."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .. import config as cfg
from ..distributed import ProcessGroup
from .common import (cli_errors, say, holding_run, path_value, progress_bar, say_note, say_stale_report, stage_config,
                     typed_flags)

if TYPE_CHECKING:
    from ..runs import RunDir

D = cfg.SampleConfig()
log = logging.getLogger(__name__)


@cli_errors
def sample_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Run directory; images go to OUT/synthetic/shard-*.npz.",
                             parser=path_value),
    model: str = typer.Option(cfg.RunConfig.model, help="diffusers pipeline directory, or an embedded target: 'demo' or 'demo-1000'."),
    n: int = typer.Option(D.n, help="Number of images."),
    seed: int = typer.Option(D.seed, help="Run seed; image i's noise is seeded by (seed, i)."),
    scheduler: str = typer.Option(D.scheduler, help="ddim or ddpm."),
    steps: int = typer.Option(D.steps, help="Inference steps."),
    eta: float = typer.Option(D.eta, help="DDIM eta (0 = deterministic)."),
    batch_size: int = typer.Option(D.batch_size),
    shard_size: int = typer.Option(D.shard_size, help="Images per shard file."),
    device: str = typer.Option("cpu"),
    config: Path | None = typer.Option(None, "--config", help="Run YAML (keys: model, sample: {...}).",
                                       parser=path_value),
    wait: bool = typer.Option(False, "--wait", help="If another process is writing OUT, wait for it instead of failing."),
) -> None:
    """Sample N images; a rerun skips finished work and resumes an interrupted run at its last whole shard.
    Flags left out keep the run's config.yaml values (the defaults shown are a new run's)."""
    names = {"model": "model"} | {k: f"sample.{k}" for k in cfg.to_dict(D)}
    flags = typed_flags(ctx, names)
    with holding_run(out, wait):
        note, run, n = _sample(ctx, out, config, flags, device, wait)
    if ProcessGroup.from_env().main:
        from ..pipeline import warn_out_of_date

        warn_out_of_date(run)  # (a step command: what was made from the earlier synthetic set, or model, is named)
        say(f"{n} images in {run.path / 'synthetic'}")  # (once per launch, not once per process)
        say_stale_report(run.path)
        say_note(note)


def _sample(ctx: typer.Context, out: Path, config: Path | None, flags: dict[str, Any], device: str,
            wait: bool) -> tuple[str | None, RunDir, int]:
    """The run's settings read and its synthetic set made: (the default-model note, the run, its image count)."""
    note, rc = stage_config(out, config, flags)  # an existing run keeps its other settings
    group = ProcessGroup.from_env()  # torchrun / accelerate launch: each process writes its own shards
    device = group.device(device)
    from ..models.target import load_target, model_fingerprint
    from ..pipeline import absolute_paths
    from ..runs import RunDir, check_run_path, check_unlocked, fingerprint_of, run_lock
    from ..sampling import check_sampler, sample_stage

    # (the values, not the files they name, as side run's: processes given other settings mixed their shards into
    # one run, and config.yaml recorded process 0's; each machine of a launch reads its own command line)
    group.agree({"config": fingerprint_of(rc), "run": str(out)}, "settings (config or model) or run directory")
    check_run_path(out)  # a folder that is no run: said before its lock is taken
    if group.main and not wait:
        check_unlocked(out)  # another writer: said at once, not after the model has loaded
    denoiser = load_target(rc.model, device)  # before anything is written: a bad --model leaves nothing behind
    check_sampler(denoiser.scheduler, rc.sample.scheduler, rc.sample.steps, "sample")
    if group.main and (inert := [t for k, t in cfg.inert_keys(rc).items() if k.startswith("sample.")]):
        log.warning("settings that change nothing in this run: %s", "; ".join(inert))  # (as side run says)
    with (run_lock(out, wait=wait) if group.main else contextlib.nullcontext()), progress_bar(ctx, "sample") as cb:
        run = RunDir(out, group=group)
        run.write_config(absolute_paths(rc))  # (read again from other folders: side cluster, side report)
        fp = model_fingerprint(rc.model)
        run.set_model(fp, str(rc.model), denoiser.prediction)
        try:
            images = sample_stage(run, denoiser, rc.sample, model_fingerprint=fp, device=device, progress=cb)
        except BaseException as e:  # (an interrupted sample left its stage "running", as the report showed it)
            if group.main:
                run.fail_running(e)
            raise
    return note, run, len(images)
