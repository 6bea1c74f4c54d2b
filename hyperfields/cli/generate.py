"""`hyperfields generate`: the base model personalised from one photo samples images; an inr field renders its own."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hyperfields.cli.common import (
    BaseModelOption,
    DeviceOption,
    FieldOption,
    FormerOutOption,
    HeightOption,
    PhotoOption,
    StepOption,
    SubjectOption,
    WidthOption,
    check_photo_options,
    refuse_lora_options,
    renamed,
    reports_errors,
    subject_photos,
)
from hyperfields.errors import UserError

OutputOption = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Folder for the PNGs, contact sheet and generation.json. Required."),
]
PromptOption = Annotated[list[str] | None, typer.Option("--prompt", "-p", help="Text prompt; repeatable.")]
CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir", help="Where predicted LoRAs are kept per (field, photo, t); default $HYPERFIELDS_CACHE/loras."
    ),
]
NegativePromptOption = Annotated[
    str, typer.Option("--negative-prompt", help="What guidance steers away from, for every prompt.")
]
SchedulerOption = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="Sampler: ddim, ddpm, pndm, lms, euler, euler-a, heun, dpm++ (dpmsolver-multistep), unipc; "
        "default the base model's own.",
    ),
]
LoraScaleOption = Annotated[
    float,
    typer.Option(
        "--lora-scale", help="Weight of the predicted LoRA, as diffusers' adapter weight: 0 = base model, 1 = as is."
    ),
]
# Options that only mean something with a base model to personalise.
LORA_OPTIONS = [
    "prompt",
    "negative_prompt",
    "num_images",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "scheduler",
    "lora_scale",
    "base_model",
    "cache_dir",
]


@reports_errors
def generate_command(
    ctx: typer.Context,
    field: FieldOption,
    image: PhotoOption = None,
    subject: SubjectOption = None,
    output: OutputOption = None,
    prompt: PromptOption = None,
    negative_prompt: NegativePromptOption = "",
    step: StepOption = None,
    strength: Annotated[
        float | None,
        typer.Option("--strength", help="Walk the trajectory instead of --step: 0 = base model, 1 = t = T."),
    ] = None,
    num_images: Annotated[int, typer.Option("--num-images", min=1, help="Images per prompt.")] = 1,
    seed: Annotated[
        int, typer.Option("--seed", help="Image i of every prompt uses seed + i (recorded in each PNG).")
    ] = 0,
    num_inference_steps: Annotated[int, typer.Option("--num-inference-steps", min=1, help="Sampler steps.")] = 30,
    guidance_scale: Annotated[
        float, typer.Option("--guidance-scale", min=0.0, help="Classifier-free guidance scale.")
    ] = 7.5,
    scheduler: SchedulerOption = None,
    lora_scale: LoraScaleOption = 1.0,
    height: HeightOption = None,
    width: WidthOption = None,
    base_model: BaseModelOption = None,
    device: DeviceOption = "auto",
    cache_dir: CacheDirOption = None,
    out: FormerOutOption = None,
) -> None:
    """Personalise the base model by the field's LoRA for a subject's photos at step t and sample; inr fields render an
    image."""
    output = renamed(ctx, "output", "out")
    check_photo_options(image, subject)
    if step is not None and strength is not None:
        raise UserError("give --step or --strength, not both")
    from hyperfields.devices import resolve_device
    from hyperfields.field.io import load_field
    from hyperfields.files import writable_folder
    from hyperfields.generate import Sampling, generate, lora_cache_dir, render_inr, write_image, write_images
    from hyperfields.predict import resolve_step

    chosen = resolve_device(device)
    loaded, record = load_field(field, device=chosen)
    refuse_lora_options(ctx, record.task, LORA_OPTIONS)
    photos = subject_photos(image, subject, record.resolution)
    t = resolve_step(record.steps, step, strength)
    if record.task != "lora":
        folder = writable_folder(output)  # after the quick checks, so bad input leaves no folder
        size = (height or record.resolution, width or record.resolution)
        rendered, details = render_inr(loaded, record, photos, t, *size)
        written = write_image(rendered, folder, {"field": field, **details})
        typer.echo(f"wrote '{written}' ({rendered.width} x {rendered.height} pixels; t = {t:g} of T = {record.steps})")
        return
    if not prompt:
        raise UserError("give at least one --prompt for a LoRA field")
    sampling = Sampling(
        num_images=num_images,
        seed=seed,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        negative_prompt=negative_prompt,
        scheduler=scheduler,
        lora_scale=lora_scale,
    )
    folder = writable_folder(output)  # after the quick checks, so bad input leaves no folder; before the slow sampling
    base = base_model or record.task_settings["base_model"]
    rows, details = generate(loaded, record, photos, prompt, t, base, sampling, cache_dir or lora_cache_dir(), chosen)
    written = write_images(rows, folder, {"field": field, **details})
    images = f"{len(written) - 1} image{'s' if len(written) != 2 else ''}"
    typer.echo(f"wrote {images} and contact_sheet.png to '{folder}' (t = {t:g} of T = {record.steps})")
