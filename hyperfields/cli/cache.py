"""`hyperfields cache build`: the on-disk condition cache of a training run, filled up front."""

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
from hyperfields.progress import progress

OutputOption = Annotated[
    Path,
    typer.Option(
        "--output",
        "-o",
        help="Run folder of the training run (its scan manifest is shared); the cache goes to "
        "train.cache_dir, by default OUTPUT/cache.",
    ),
]

cache_app = typer.Typer(help="The on-disk cache of training conditions (train.cache=disk).", no_args_is_help=True)


@cache_app.command("build")
@reports_errors
def build_command(
    ctx: typer.Context,
    output: OutputOption,
    images: TrainingImagesOption = None,
    config: ConfigOption = None,
    base_model: BaseModelOption = None,
    encoder: EncoderOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images encoded together.")] = 16,
    set_: SetOption = None,
    data: FormerDataOption = None,
) -> None:
    """Encode every training image once (VAE latents, text embeddings, encoder tokens) into the disk cache; under
    torchrun the images are split across the processes."""
    overrides = list(set_ or [])
    for key, value in (("model.base_model", base_model), ("model.encoder", encoder)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(config, [*overrides, "train.cache=disk", "train.cache_latents=false"], note)
    images = training_photos(ctx)
    from hyperfields.training.cache_build import (
        build_cache,  # heavy imports only once the arguments are known to be good
    )

    with progress("caching", "images of this process") as advance:
        built = build_cache(cfg, images, output, batch_size, advance)
    if built.main_process:
        typer.echo(
            f"cache '{built.folder}' holds the conditions of all {built.images} training images "
            f"(built by {built.processes} process(es)); train with --set train.cache=disk"
        )
