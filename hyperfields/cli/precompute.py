"""`hyperfields precompute`: real per-subject optimisation of every training image, for the supervised baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hyperfields.cli.common import (
    BaseModelOption,
    ConfigOption,
    FormerDataOption,
    SetOption,
    TrainingImagesOption,
    reports_errors,
    training_photos,
)
from hyperfields.config import load_config


@reports_errors
def precompute_command(
    ctx: typer.Context,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder to write: theta_T.safetensors and index.json.")
    ],
    images: TrainingImagesOption = None,
    config: ConfigOption = None,
    base_model: BaseModelOption = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Images optimised together in one batched run.")
    ] = 16,
    set_: SetOption = None,
    data: FormerDataOption = None,
) -> None:
    """Run T real optimisation steps per training image, store theta_T; train on it with objective.kind=supervised."""
    overrides = list(set_ or []) + ([f"model.base_model={base_model}"] if base_model is not None else [])
    cfg = load_config(config, overrides)
    images = training_photos(ctx)
    from hyperfields.precompute import precompute  # heavy imports only once the arguments are known to be good

    def warn(message: str) -> None:
        typer.echo(message, err=True)

    def progress(done: int, total: int) -> None:
        typer.echo(f"optimised {done} of {total} training images ({cfg.objective.steps} steps each)", err=True)

    folder = precompute(cfg, images, output, batch_size, on_batch=progress, warn=warn)
    typer.echo(
        f"wrote theta_T (T={cfg.objective.steps}) of the training images to '{folder}'; "
        f"train on it with --set objective.kind=supervised --set objective.precomputed={folder}"
    )
