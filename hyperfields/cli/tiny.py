"""`hyperfields tiny`: write the built-in tiny models as ordinary model folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hyperfields.cli.common import reports_errors
from hyperfields.errors import UserError


@reports_errors
def tiny_command(
    directory: Annotated[Path, typer.Argument(help="Folder to write: DIR/pipeline (diffusers SD), DIR/pipeline-xl (SDXL) and DIR/encoder (transformers ViT).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights; the same seed writes identical files.")] = 0,
) -> None:
    """Write tiny random Stable Diffusion, SDXL and ViT models, for tests and trying the tool without downloads."""
    from hyperfields.models.tiny import write_tiny_models

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create '{directory}' ({error.strerror or error})") from None
    write_tiny_models(directory, seed=seed)
    typer.echo(f"wrote {directory / 'pipeline'}, {directory / 'pipeline-xl'} and {directory / 'encoder'}")
