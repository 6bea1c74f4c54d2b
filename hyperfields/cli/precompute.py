"""`hyperfields precompute`: real per-subject optimisation of every training image, for the supervised baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hyperfields.cli.common import (
    BaseModelOption,
    ConfigOption,
    DeviceOption,
    FormerDataOption,
    SetOption,
    TrainingImagesOption,
    former_flag_as_key,
    note,
    reports_errors,
    training_photos,
)
from hyperfields.config import load_config
from hyperfields.progress import progress


@reports_errors
def precompute_command(
    ctx: typer.Context,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder to write: theta_T.safetensors and index.json.")
    ],
    images: TrainingImagesOption = None,
    config: ConfigOption = None,
    base_model: BaseModelOption = None,
    device: DeviceOption = "auto",
    set_: SetOption = None,
    data: FormerDataOption = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, hidden=True)] = None,
) -> None:
    """Run T real optimisation steps per training image (train.batch_size at a time), store theta_T; train on it with
    objective.kind=supervised."""
    overrides = former_flag_as_key(ctx, "batch_size", "train.batch_size", list(set_ or []))
    if base_model is not None:
        overrides.append(f"model.base_model={base_model}")
    cfg = load_config(config, overrides, note)
    images = training_photos(ctx)
    from hyperfields.devices import resolve_device
    from hyperfields.precompute import precompute  # heavy imports only once the arguments are known to be good

    chosen = resolve_device(device)

    def warn(message: str) -> None:
        typer.echo(message, err=True)

    with progress("precompute", "real updates") as advance:
        folder = precompute(cfg, images, output, chosen, on_step=advance, warn=warn)
    typer.echo(
        f"wrote theta_T (T={cfg.objective.steps}) of the training images to '{folder}'; "
        f"train on it with --set objective.kind=supervised --set objective.precomputed={folder}"
    )
