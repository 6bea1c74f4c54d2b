"""`hyperfields refine`: a predicted LoRA refined by a few real optimisation steps, written as a LoRA file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hyperfields.cli.common import (
    BaseModelOption,
    DeviceOption,
    FieldOption,
    FormerOutOption,
    LoraFormatOption,
    PhotoOption,
    SubjectOption,
    check_photo_options,
    renamed,
    reports_errors,
    subject_photos,
)
from hyperfields.errors import UserError


@reports_errors
def refine_command(
    ctx: typer.Context,
    field: FieldOption,
    image: PhotoOption = None,
    subject: SubjectOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="The .safetensors LoRA file to write. Required.")
    ] = None,
    updates: Annotated[
        int, typer.Option("--updates", min=1, help="Real optimisation updates to continue from the prediction.")
    ] = 40,
    format: LoraFormatOption = "diffusers",
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank", min=1, help="Refine and write at this LoRA rank (SVD of the prediction); default the field's."
        ),
    ] = None,
    caption: Annotated[
        str | None,
        typer.Option("--caption", help="Caption of the photo in the task loss; default the field's training template."),
    ] = None,
    base_model: BaseModelOption = None,
    device: DeviceOption = "auto",
    out: FormerOutOption = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, hidden=True)] = None,
) -> None:
    """Continue the per-subject optimisation on a subject's photos from the field's prediction, and write the LoRA."""
    output = renamed(ctx, "output", "out")
    check_photo_options(image, subject)
    updates = renamed(ctx, "updates", "steps", required=False)
    from hyperfields.devices import resolve_device
    from hyperfields.field.io import load_field
    from hyperfields.files import writable_folder
    from hyperfields.lora.formats import write_lora
    from hyperfields.predict import lora_origin, require_task
    from hyperfields.refine import refine

    if output.is_dir():
        raise UserError(f"--output '{output}' is a folder; give the path of the .safetensors file to write")
    loaded, record = load_field(field, device=resolve_device(device))
    require_task(record, "lora", "refine")
    photos = subject_photos(image, subject, record.resolution)
    base = base_model or record.task_settings["base_model"]
    writable_folder(output.parent)  # after the quick checks, so bad input leaves no folder; before the slow refinement
    with typer.progressbar(length=updates, label="refining") as bar:
        result = refine(
            loaded, record, photos, updates, base, rank=rank, caption=caption, on_step=lambda k: bar.update(1)
        )
    write_lora(result.lora, output, format, origin=lora_origin(record, base))
    typer.echo(
        f"task loss on fixed draws: predicted {result.loss_predicted:.5f} -> refined {result.loss_refined:.5f}; "
        f"wrote {format} LoRA (rank {result.lora.rank}) to '{output}'"
    )
