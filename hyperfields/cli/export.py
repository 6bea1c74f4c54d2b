"""`hyperfields export`: files of predicted weights (LoRA: diffusers or kohya) from a subject's photos or a folder of
subjects."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hyperfields.cli.common import (
    DeviceOption,
    FieldOption,
    FormerOutOption,
    LoraFormatOption,
    PhotoOption,
    StepOption,
    SubjectOption,
    check_photo_options,
    note,
    refuse_lora_options,
    renamed,
    reports_errors,
    subject_photos,
)
from hyperfields.errors import UserError
from hyperfields.lora import LoraPrecision
from hyperfields.progress import progress

PrecisionOption = Annotated[
    LoraPrecision,
    typer.Option(
        "--precision", help="Number type of the stored weights: fp16 (as shared LoRAs are; half of fp32), bf16 or fp32."
    ),
]

ImagesOption = Annotated[
    Path | None,
    typer.Option(
        "--images",
        help="A folder of subjects, as train reads one: one file per sub-folder (its photos together), or per photo.",
    ),
]


@reports_errors
def export_command(
    ctx: typer.Context,
    field: FieldOption,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help=("The .safetensors file to write; with --images, a folder (one file per subject). Required."),
        ),
    ] = None,
    image: PhotoOption = None,
    subject: SubjectOption = None,
    images: ImagesOption = None,
    format: LoraFormatOption = "diffusers",
    step: StepOption = None,
    precision: PrecisionOption = "fp16",
    device: DeviceOption = "auto",
    out: FormerOutOption = None,
) -> None:
    """Write the weights the field predicts for a subject's photos: a LoRA in a format diffusers, A1111 or ComfyUI
    load."""
    output = renamed(ctx, "output", "out")
    if sum([bool(image), subject is not None, images is not None]) != 1:
        raise UserError("give exactly one of --image PHOTO (repeatable), --subject DIR or --images DIR")
    check_photo_options(image, subject, required=images is None)
    from hyperfields.devices import resolve_device
    from hyperfields.export import export_folder, export_photos
    from hyperfields.field.io import load_field
    from hyperfields.predict import resolve_step

    loaded, record = load_field(field, device=resolve_device(device))
    refuse_lora_options(ctx, record.task, ["format", "precision"])
    t = resolve_step(record.steps, step)
    if images is None:
        photos = subject_photos(image, subject, record.resolution)
        written = [export_photos(loaded, record, photos, output, t, format, precision)]
    else:
        with progress("export", "photos") as advance:
            written = export_folder(loaded, record, images, output, t, format, precision, warn=note, on_file=advance)
    kind = f"{format} {precision} LoRA" if record.task == "lora" else f"{record.task} weights"
    what = f"{kind} '{written[0]}'" if images is None else f"{len(written)} {kind} files to '{output}'"
    typer.echo(f"wrote {what} (t = {t:g} of T = {record.steps})")
