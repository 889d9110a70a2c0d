"""``side calibrate``: the null distribution of best scores and band edges proposed from it -> DIR/bands.json."""
from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from .. import config as cfg
from .common import cli_errors, say, path_value, progress_bar
from .evaluate import check_similarity_inputs, evaluate_config, load_feature_model, run_written_into

D = cfg.EvaluateConfig()


@cli_errors
def calibrate_cmd(
    ctx: typer.Context,
    train: str = typer.Option(..., "--train", help="Training set: digits[:N], a folder of images, an .npz."),
    out: Path = typer.Option(..., "--out", help="Directory to write bands.json and null.npz to.", parser=path_value),
    heldout: str | None = typer.Option(None, "--heldout", help="Held-out images (never trained on) "
                                                                "(default: for digits:N, the other digits; else none)."),
    similarity: str = typer.Option(D.similarity, help="rms-l2 (pixels) or cosine:<extractor>."),
    calibration_quantiles: str = typer.Option(",".join(map(str, D.calibration_quantiles)),
                                              help="Null tail shares of the high, mid, low band edges."),
    resize: int | None = typer.Option(D.resize, help="Resize all sets to this square size."),
    backend: str = typer.Option(D.backend, help="auto, faiss or torch."),
    query_chunk: int = typer.Option(D.query_chunk),
    ref_chunk: int = typer.Option(D.ref_chunk),
    feature_batch_size: int = typer.Option(D.feature_batch_size),
    device: str = typer.Option("cpu"),
    model: str | None = typer.Option(None, "--model", help="Target model (a diffusers directory or 'demo') for "
                                                           "extractors that need it: cosine:unet."),
    config: Path | None = typer.Option(None, "--config", help="YAML with evaluate options as keys (or a run "
                                                              "YAML's evaluate: section).", parser=path_value),
) -> None:
    """Best scores of held-out images vs the training set and of each training image vs the rest; band edges
    at tail quantiles of the held-out null (the train-vs-rest null without held-out images)."""
    c = evaluate_config(ctx, config)
    check_similarity_inputs(model, c.similarity)
    from ..data import load_image_set
    from ..evaluation import Calibration, calibrate, held_out_set
    from ..metrics import check_same_shape
    from ..runs import run_lock

    # (RUN/evaluation itself holds the run's own calibration: refused)
    run = run_written_into(out, Calibration.FILES, {"--train": train, "--heldout": c.heldout})
    tr = load_image_set(train, c.resize)
    ho = held_out_set(train, c.heldout, c.resize)  # --heldout, else the config file's, else the digits outside
    if c.heldout is None:
        say(f"held-out set: the {len(ho)} digits not in {train}" if ho is not None else
            "no --heldout: bands from each training image vs the rest of the training set")
    if ho is not None:  # before the work (it was found after the training set's null)
        check_same_shape(ho, tr, "held-out images")
    feature_model = load_feature_model(model, device, tr)
    with progress_bar(ctx, "calibrate") as cb:
        result = calibrate(tr, ho, c, feature_model=feature_model, device=device, progress=cb)
    with run_lock(run) if run is not None else contextlib.nullcontext():
        path = result.write(out)
    edges = ", ".join(f"{b.name} [{b.lo:.4g}, {b.hi:.4g})" for b in result.bands)
    say(f"bands from the {result.null_source} null: {edges}")
    say(f"wrote {path}")
