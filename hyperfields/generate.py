"""Images from one photo: the base model personalised by the predicted LoRA, or the image a predicted INR renders.

The predicted LoRA goes through a diffusers-format file and `pipe.load_lora_weights`, the same path a user's
own pipeline takes with an exported file, so what `generate` shows is what an export gives elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import hyperfields
from hyperfields.config import config_from_dict
from hyperfields.errors import UserError
from hyperfields.field.io import field_state_dict
from hyperfields.field.model import HyperField
from hyperfields.field.record import FieldRecord
from hyperfields.files import atomic_write, cache_root
from hyperfields.lora.formats import write_lora
from hyperfields.models import load_pipeline
from hyperfields.predict import Photo, check_base_model, default_device, predict_lora, predicted_weights, require_task
from hyperfields.tasks.inr import InrTask

ADAPTER_NAME = "hyperfields"


@dataclass
class Sampling:
    """How the base pipeline samples: the same values and seed give the same images."""

    num_images: int = 1  # images per prompt
    seed: int = 0  # every prompt starts from this seed, so rows of a contact sheet differ only by prompt
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    height: int | None = None  # image size in pixels; None = the base model's own
    width: int | None = None


def field_fingerprint(field: HyperField, record: FieldRecord) -> str:
    """A sha256 of the field's saved tensors and record: a retrained or different field never reuses a cached LoRA."""
    digest = hashlib.sha256(json.dumps(record.to_json(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(field_state_dict(field).items()):
        digest.update(name.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def lora_cache_dir() -> Path:
    """The default folder of cached predicted LoRAs: $HYPERFIELDS_CACHE/loras (~/.cache/hyperfields/loras)."""
    return cache_root() / "loras"


def cached_lora_file(field: HyperField, record: FieldRecord, photo: Photo, t: float, cache_dir: Path) -> Path:
    """A diffusers LoRA file of Psi(photo, t), predicted on first use, kept in `cache_dir` under (field, photo, t)."""
    path = Path(cache_dir) / f"{field_fingerprint(field, record)[:16]}-{photo.sha256[:16]}-t{t:g}.safetensors"
    if not path.is_file():  # written atomically, so a present file is complete
        write_lora(predict_lora(field, record, photo, t), path, "diffusers")
    return path


def load_lora(pipeline: Any, path: Path) -> None:
    """Load a diffusers LoRA file into `pipeline` as a user would, without the note that it has no text-encoder part."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipeline.load_lora_weights(str(path), adapter_name=ADAPTER_NAME)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def sample(pipeline: Any, prompts: list[str], sampling: Sampling) -> list[list[Image.Image]]:
    """`sampling.num_images` images per prompt (one row per prompt), each prompt from `sampling.seed`."""
    rows = []
    for prompt in prompts:
        # A CPU generator draws the same latents on every device, so a seed means the same image everywhere.
        generator = torch.Generator().manual_seed(sampling.seed)
        result = pipeline(
            prompt,
            num_images_per_prompt=sampling.num_images,
            num_inference_steps=sampling.num_inference_steps,
            guidance_scale=sampling.guidance_scale,
            height=sampling.height,
            width=sampling.width,
            generator=generator,
        )
        rows.append(list(result.images))
    return rows


def contact_sheet(rows: list[list[Image.Image]], gap: int = 2) -> Image.Image:
    """One image holding all `rows` (one per prompt) side by side, on a white background."""
    width, height = rows[0][0].size
    columns = max(len(row) for row in rows)
    sheet = Image.new(
        "RGB", (columns * width + (columns - 1) * gap, len(rows) * height + (len(rows) - 1) * gap), "white"
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image, (c * (width + gap), r * (height + gap)))
    return sheet


def image_name(prompt_index: int, image_index: int) -> str:
    return f"prompt{prompt_index:02d}_image{image_index:02d}.png"


def write_images(rows: list[list[Image.Image]], folder: Path, details: dict[str, Any]) -> list[Path]:
    """The PNGs written into `folder`: one per image, contact_sheet.png, and generation.json on how they were made."""
    written = []
    for p, row in enumerate(rows):
        for i, image in enumerate(row):
            written.append(
                atomic_write(Path(folder) / image_name(p, i), lambda tmp, image=image: image.save(tmp, format="PNG"))
            )
    sheet = contact_sheet(rows)
    written.append(atomic_write(Path(folder) / "contact_sheet.png", lambda tmp: sheet.save(tmp, format="PNG")))
    write_details(folder, details)
    return written


def write_image(image: Image.Image, folder: Path, details: dict[str, Any]) -> Path:
    """image.png written into `folder`, and generation.json saying how it was made."""
    path = atomic_write(Path(folder) / "image.png", lambda tmp: image.save(tmp, format="PNG"))
    write_details(folder, details)
    return path


def write_details(folder: Path, details: dict[str, Any]) -> Path:
    """generation.json in `folder`: how its images were made."""
    text = json.dumps(details, indent=2) + "\n"
    return atomic_write(Path(folder) / "generation.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def generate(
    field: HyperField,
    record: FieldRecord,
    photo: Photo,
    prompts: list[str],
    t: float,
    base_model: str,
    sampling: Sampling,
    cache_dir: Path,
) -> tuple[list[list[Image.Image]], dict[str, Any]]:
    """Images of the base model personalised by Psi(photo, t), a row per prompt, and a record of how they were made."""
    require_task(record, "lora", "generating with a base model")
    device = default_device()
    pipeline = load_pipeline(base_model, torch.float16 if device.type == "cuda" else torch.float32)
    check_base_model(field, record, pipeline.unet, base_model)
    lora_file = cached_lora_file(field, record, photo, t, cache_dir)
    load_lora(pipeline, lora_file)
    rows = sample(pipeline.to(device), prompts, sampling)
    details = {
        "prompts": prompts,
        "step": t,
        "steps": field.steps,
        "base_model": base_model,
        "photo": str(photo.path),
        "photo_sha256": photo.sha256,
        "lora_file": str(lora_file),
        **asdict(sampling),
        "hyperfields_version": hyperfields.__version__,
    }
    return rows, details


def render_inr(
    field: HyperField,
    record: FieldRecord,
    photo: Photo,
    t: float,
    height: int,
    width: int,
) -> tuple[Image.Image, dict[str, Any]]:
    """The image the coordinate MLP Psi(photo, t) renders at height x width pixels, and a record of how it was made."""
    require_task(record, "inr", "rendering a predicted image")
    if height < 1 or width < 1:
        raise UserError(f"image size {height} x {width} pixels: height and width must be positive")
    settings = config_from_dict({"inr": record.task_settings["inr"]}, where="the field's inr settings").inr
    task = InrTask(settings, record.resolution)
    weights = {name: w.unsqueeze(0) for name, w in predicted_weights(field, photo, t).items()}
    with torch.no_grad():
        pixels = task.image(weights, height, width)[0]  # (3, H, W) in [-1, 1]
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    details = {
        "step": t,
        "steps": field.steps,
        "photo": str(photo.path),
        "photo_sha256": photo.sha256,
        "height": height,
        "width": width,
        "hyperfields_version": hyperfields.__version__,
    }
    return Image.fromarray(array), details
