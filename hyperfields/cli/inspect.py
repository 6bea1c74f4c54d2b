"""`hyperfields inspect`: per LoRA target, generated weight statistics and update size along the trajectory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hyperfields.cli.common import BaseModelOption, FieldOption, reports_errors


@reports_errors
def inspect_command(
    field: FieldOption,
    image: Annotated[Path | None, typer.Option("--image", "-i", help="Condition photo; default a mid-grey image.")] = None,
    base_model: BaseModelOption = None,
) -> None:
    """Show, per LoRA target, the generated A/B std against the hyperfan target and ||scale B A|| / ||W|| at t = 0, T/2, T."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from hyperfields.field.model import HyperField
    from hyperfields.predict import check_base_model, default_device, read_photo
    from hyperfields.inspection import inspect_field, inspection_steps
    from hyperfields.models import load_pipeline_components

    loaded = HyperField.from_pretrained(field, device=default_device())
    resolution = loaded.record["resolution"]
    pixels = read_photo(image, resolution).pixels if image is not None else torch.zeros(3, resolution, resolution)
    base = base_model or loaded.record["base_model"]
    unet = load_pipeline_components(base).unet
    check_base_model(loaded, unet, base)
    reports = inspect_field(loaded, unet, pixels)

    steps = inspection_steps(loaded.steps)
    condition = f"photo '{image}'" if image is not None else "a mid-grey image"
    table = Table(title=f"field '{field}' on {condition}: generated Delta at t = T vs hyperfan; update ||scale B A|| / ||W||")
    for column in ("LoRA target", "A std", "hyperfan A", "B std", "hyperfan B", *(f"t = {t:g}" for t in steps)):
        table.add_column(column, justify="left" if column == "LoRA target" else "right", no_wrap=True)
    for report in reports:
        table.add_row(report.target, f"{report.std_a:.4g}", f"{report.hyperfan_a:.4g}", f"{report.std_b:.4g}", f"{report.hyperfan_b:.4g}",
                      *(f"{report.relative_update[t]:.3g}" for t in steps))
    console = Console()
    if not console.is_terminal:  # piped or captured: room for whole module names rather than 80 columns
        console.width = 240
    console.print(table)
