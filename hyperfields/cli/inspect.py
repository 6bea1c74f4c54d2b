"""`hyperfields inspect`: generated weight statistics and update size along t, per LoRA target or tensor."""

from __future__ import annotations

import typer

from hyperfields.cli.common import (
    BaseModelOption,
    DeviceOption,
    FieldOption,
    PhotoOption,
    SubjectOption,
    check_photo_options,
    refuse_lora_options,
    reports_errors,
    subject_photos,
)


@reports_errors
def inspect_command(
    ctx: typer.Context,
    field: FieldOption,
    image: PhotoOption = None,
    subject: SubjectOption = None,
    base_model: BaseModelOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Show the generated std against the hyperfan target and the update size at t = 0, T/2, T, per target or tensor.

    The condition is the subject's photos (--image, --subject), or a mid-grey image without them.
    """
    check_photo_options(image, subject, required=False)
    import torch
    from rich.console import Console
    from rich.table import Table

    from hyperfields.devices import resolve_device
    from hyperfields.field.io import load_field
    from hyperfields.inspection import inspect_lora_field, inspect_tensors, inspection_steps
    from hyperfields.models import load_denoiser
    from hyperfields.predict import check_base_model, lora_component

    loaded, record = load_field(field, device=resolve_device(device))
    refuse_lora_options(ctx, record.task, ["base_model"])
    side = record.resolution
    photos = subject_photos(image, subject, side)
    pixels = photos.pixels if photos is not None else torch.zeros(1, 3, side, side)  # (P, 3, H, W)
    steps = inspection_steps(record.steps)
    condition = f"photo {photos.describe()}" if photos is not None else "a mid-grey image"
    if record.task == "lora":
        base = base_model or record.task_settings["base_model"]
        lora_component(record, base)
        denoiser = load_denoiser(base)
        check_base_model(loaded, record, denoiser, base)
        table = Table(
            title=f"field '{field}' on {condition}: generated Delta at t = T vs hyperfan; update ||scale B A|| / ||W||"
        )
        columns = ["LoRA target", "A std", "hyperfan A", "B std", "hyperfan B"]
        rows = [
            [
                r.target,
                f"{r.std_a:.4g}",
                f"{r.hyperfan_a:.4g}",
                f"{r.std_b:.4g}",
                f"{r.hyperfan_b:.4g}",
                *(f"{r.relative_update[t]:.3g}" for t in steps),
            ]
            for r in inspect_lora_field(loaded, record, denoiser, pixels)
        ]
    else:
        table = Table(
            title=f"field '{field}' ({record.task}) on {condition}: generated Delta at t = T vs hyperfan; "
            "update ||Psi_t - theta_0|| / ||theta_0||"
        )
        columns = ["tensor", "Delta std", "hyperfan"]
        rows = [
            [r.name, f"{r.std:.4g}", f"{r.hyperfan:.4g}", *(f"{r.relative_update[t]:.3g}" for t in steps)]
            for r in inspect_tensors(loaded, pixels)
        ]
    for i, column in enumerate([*columns, *(f"t = {t:g}" for t in steps)]):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped or captured: room for whole module names rather than 80 columns
        console.width = 240
    console.print(table)
