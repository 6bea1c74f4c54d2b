"""`hyperfields tiny`: write the built-in tiny models as ordinary model folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hyperfields.cli.common import renamed, reports_errors
from hyperfields.errors import UserError


@reports_errors
def tiny_command(
    ctx: typer.Context,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help=(
                "Folder to write: OUTPUT/pipeline (diffusers SD), OUTPUT/pipeline-xl (SDXL), OUTPUT/pipeline-flux "
                "(FLUX.1-dev), OUTPUT/pipeline-sd3 (SD3.5), OUTPUT/encoder (transformers ViT), and OUTPUT/clip and "
                "OUTPUT/dino for 'hyperfields evaluate'. Required."
            ),
        ),
    ] = None,
    directory: Annotated[Path | None, typer.Argument(metavar="DIR", hidden=True)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random weights; the same seed writes identical files.")] = 0,
) -> None:
    """Write tiny random Stable Diffusion, SDXL, FLUX.1, SD3.5, ViT, CLIP and DINO models, for tests and trying the
    tool offline."""
    directory = renamed(ctx, "output", "directory")
    from hyperfields.models.tiny import write_tiny_models

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create '{directory}' ({error.strerror or error})") from None
    write_tiny_models(directory, seed=seed)
    folders = ("pipeline", "pipeline-xl", "pipeline-flux", "pipeline-sd3", "encoder", "clip")
    written = ", ".join(str(directory / name) for name in folders)
    typer.echo(f"wrote {written} and {directory / 'dino'}")
