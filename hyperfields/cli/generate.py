"""`hyperfields generate`: images of the base model personalised from one photo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hyperfields.cli.common import BaseModelOption, FieldOption, PhotoOption, StepOption, reports_errors

CacheDirOption = Annotated[Path | None, typer.Option("--cache-dir", help="Where predicted LoRAs are kept per (field, photo, t); default $HYPERFIELDS_CACHE/loras.")]


@reports_errors
def generate_command(
    field: FieldOption,
    image: PhotoOption,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Text prompt; repeat for several (one contact-sheet row each).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs, contact_sheet.png and generation.json.")],
    step: StepOption = None,
    strength: Annotated[float | None, typer.Option("--strength", help="Walk the trajectory instead of --step: 0 = base model, 1 = t = T.")] = None,
    num_images: Annotated[int, typer.Option("--num-images", min=1, help="Images per prompt.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Every prompt starts from this seed.")] = 0,
    num_inference_steps: Annotated[int, typer.Option("--num-inference-steps", min=1, help="Sampler steps.")] = 30,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", min=0.0, help="Classifier-free guidance scale.")] = 7.5,
    base_model: BaseModelOption = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Personalise the base model from one photo with the field's LoRA at step t, and sample images."""
    from hyperfields.field.model import HyperField
    from hyperfields.files import writable_folder
    from hyperfields.generate import Sampling, generate, lora_cache_dir, write_images
    from hyperfields.predict import default_device, read_photo, resolve_step

    loaded = HyperField.from_pretrained(field, device=default_device())
    photo = read_photo(image, loaded.record["resolution"])
    t = resolve_step(loaded.steps, step, strength)
    folder = writable_folder(out)  # after the quick checks, so bad input leaves no folder; before the slow sampling
    sampling = Sampling(num_images=num_images, seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    rows, details = generate(loaded, photo, prompt, t, base_model or loaded.record["base_model"], sampling, cache_dir or lora_cache_dir())
    written = write_images(rows, folder, details)
    typer.echo(f"wrote {len(written) - 1} image{'s' if len(written) != 2 else ''} and contact_sheet.png to '{folder}' (t = {t:g} of T = {loaded.steps})")
