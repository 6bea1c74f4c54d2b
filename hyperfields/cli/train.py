"""`hyperfields train`: train a field on an image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hyperfields.cli.common import (
    BaseModelOption,
    ConfigOption,
    EncoderOption,
    FormerDataOption,
    SetOption,
    TrainingImagesOption,
    note,
    reports_errors,
    training_photos,
)
from hyperfields.config import load_config


@reports_errors
def train_command(
    ctx: typer.Context,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Run folder: checkpoints/, logs/ (tensorboard) and the final field/.")
    ],
    images: TrainingImagesOption = None,
    config: ConfigOption = None,
    base_model: BaseModelOption = None,
    encoder: EncoderOption = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Optimiser steps to train for (train.max_steps).")
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option("--checkpoint-every", help="Save a resumable checkpoint every N steps.")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="'latest' (newest complete checkpoint in --output) or a checkpoint folder."),
    ] = None,
    skip_nonfinite: Annotated[
        int | None, typer.Option("--skip-nonfinite", help="Skip up to N steps with NaN/Inf values instead of stopping.")
    ] = None,
    set_: SetOption = None,
    data: FormerDataOption = None,
) -> None:
    """Train a hypernetwork field by gradient matching on an image folder."""
    overrides = list(set_ or [])
    for key, value in (
        ("model.base_model", base_model),
        ("model.encoder", encoder),
        ("train.max_steps", max_steps),
        ("train.checkpoint_every", checkpoint_every),
        ("train.skip_nonfinite", skip_nonfinite),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(config, overrides, note)
    images = training_photos(ctx)
    from hyperfields.training import train  # heavy imports only once the arguments are known to be good

    train(cfg, images, output, resume)
