"""Images from a subject's photos: the base model personalised by the predicted LoRA, or the image a predicted INR
renders.

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
from hyperfields.files import cache_root
from hyperfields.image_files import a1111_parameters, contact_sheet, write_details, write_png
from hyperfields.lora.formats import write_lora
from hyperfields.models import load_pipeline
from hyperfields.predict import (
    PhotoSet,
    check_base_model,
    lora_component,
    predict_lora,
    predicted_weights,
    require_task,
)
from hyperfields.sampling import Sampling
from hyperfields.schedulers import use_sampler
from hyperfields.tasks.inr import InrTask

ADAPTER_NAME = "hyperfields"


@dataclass
class GeneratedImage:
    """One sampled image and what makes it again: its prompt and its seed (with the batch's other settings)."""

    image: Image.Image
    prompt: str
    seed: int


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


def cached_lora_file(field: HyperField, record: FieldRecord, photos: PhotoSet, t: float, cache_dir: Path) -> Path:
    """A diffusers LoRA file of Psi(photos, t), predicted on first use, kept in `cache_dir` under (field, photos, t)."""
    path = Path(cache_dir) / f"{field_fingerprint(field, record)[:16]}-{photos.sha256[:16]}-t{t:g}.safetensors"
    if not path.is_file():  # written atomically, so a present file is complete
        write_lora(predict_lora(field, record, photos, t), path, "diffusers")
    return path


def load_lora(pipeline: Any, path: Path, scale: float = 1.0) -> None:
    """Load a diffusers LoRA file into `pipeline` as a user would, at `scale` (diffusers' adapter weight, the same
    as `cross_attention_kwargs={"scale": scale}`), without the note that it has no text-encoder part."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipeline.load_lora_weights(str(path), adapter_name=ADAPTER_NAME)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipeline.set_adapters([ADAPTER_NAME], adapter_weights=[scale])


def sample(pipeline: Any, prompts: list[str], sampling: Sampling) -> list[list[GeneratedImage]]:
    """`sampling.num_images` images per prompt (one row per prompt); image i of every prompt from seed + i."""
    seeds = sampling.seeds
    rows = []
    for prompt in prompts:
        # One CPU generator per image: image i is what its seed gives alone, and the same on every device.
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        result = pipeline(
            prompt,
            negative_prompt=sampling.negative_prompt or None,
            num_images_per_prompt=len(seeds),
            num_inference_steps=sampling.num_inference_steps,
            guidance_scale=sampling.guidance_scale,
            height=sampling.height,
            width=sampling.width,
            generator=generators,
        )
        rows.append([GeneratedImage(image, prompt, seed) for image, seed in zip(result.images, seeds, strict=True)])
    return rows


def image_name(prompt_index: int, image_index: int) -> str:
    return f"prompt{prompt_index:02d}_image{image_index:02d}.png"


def image_record(generated: GeneratedImage, details: dict[str, Any]) -> dict[str, Any]:
    """What one image's PNG records as JSON: how the batch was made, with this image's prompt, seed and size."""
    shared = {key: value for key, value in details.items() if key not in ("prompts", "num_images", "images")}
    width, height = generated.image.size
    return {**shared, "prompt": generated.prompt, "seed": generated.seed, "width": width, "height": height}


def image_parameters(generated: GeneratedImage, details: dict[str, Any]) -> str:
    """A1111's `parameters` text of one image: what pasting it into A1111 or reading it in an image browser shows."""
    width, height = generated.image.size
    settings = {
        "Steps": details["num_inference_steps"],
        "Sampler": details["sampler"],
        "CFG scale": details["guidance_scale"],
        "Seed": generated.seed,
        "Size": f"{width}x{height}",
        "Model": details["base_model"],
        "Lora scale": details["lora_scale"],
        "Field step": f"{details['step']:g} of {details['steps']}",
        "Version": f"hyperfields {details['hyperfields_version']}",
    }
    return a1111_parameters(generated.prompt, details["negative_prompt"], settings)


def write_images(rows: list[list[GeneratedImage]], folder: Path, details: dict[str, Any]) -> list[Path]:
    """The PNGs written into `folder`: one per image, each saying how it was made, contact_sheet.png, and
    generation.json on the whole batch."""
    written = []
    files = []
    for p, row in enumerate(rows):
        for i, generated in enumerate(row):
            path = Path(folder) / image_name(p, i)
            record = image_record(generated, details)
            written.append(write_png(generated.image, path, record, image_parameters(generated, details)))
            files.append({"file": path.name, "prompt": generated.prompt, "seed": generated.seed})
    details = {**details, "images": files}
    sheet = contact_sheet([[generated.image for generated in row] for row in rows])
    written.append(write_png(sheet, Path(folder) / "contact_sheet.png", details))
    write_details(folder, details)
    return written


def write_image(image: Image.Image, folder: Path, details: dict[str, Any]) -> Path:
    """image.png written into `folder` with `details` as its record, and generation.json saying the same."""
    path = write_png(image, Path(folder) / "image.png", details)
    write_details(folder, details)
    return path


def photo_details(photos: PhotoSet) -> dict[str, Any]:
    """What names the condition photos in a record of generated images: one photo's path and sha256, or each's."""
    if len(photos.photos) == 1:
        return {"photo": str(photos.photos[0].path), "photo_sha256": photos.sha256}
    return {"photos": [str(photo.path) for photo in photos.photos], "photo_sha256": photos.hashes}


def generate(
    field: HyperField,
    record: FieldRecord,
    photos: PhotoSet,
    prompts: list[str],
    t: float,
    base_model: str,
    sampling: Sampling,
    cache_dir: Path,
    device: torch.device,
) -> tuple[list[list[GeneratedImage]], dict[str, Any]]:
    """Images of the base model personalised by Psi(photos, t), a row per prompt, and a record of how they were made."""
    require_task(record, "lora", "generating with a base model")
    transformer = record.task_settings.get("component") == "transformer"
    if transformer and sampling.scheduler is not None:
        raise UserError(
            f"scheduler '{sampling.scheduler}' is for UNet bases; FLUX.1 and SD 3.x sample with their own "
            "flow-matching scheduler"
        )
    # Half precision on a GPU: bf16 for FLUX.1 and SD 3.x, whose activations overflow fp16.
    half = torch.bfloat16 if transformer else torch.float16
    pipeline = load_pipeline(base_model, half if device.type == "cuda" else torch.float32)
    check_base_model(field, record, getattr(pipeline, lora_component(record, base_model)), base_model)
    lora_file = cached_lora_file(field, record, photos, t, cache_dir)
    load_lora(pipeline, lora_file, sampling.lora_scale)
    sampler = use_sampler(pipeline, sampling.scheduler)
    rows = sample(pipeline.to(device), prompts, sampling)
    details = {
        "prompts": prompts,
        "step": t,
        "steps": field.steps,
        "strength": t / field.steps,
        "base_model": base_model,
        **photo_details(photos),
        "lora_file": str(lora_file),
        **asdict(sampling),
        "scheduler": type(pipeline.scheduler).__name__,
        "sampler": sampler,
        "hyperfields_version": hyperfields.__version__,
    }
    return rows, details


def render_inr(
    field: HyperField,
    record: FieldRecord,
    photos: PhotoSet,
    t: float,
    height: int,
    width: int,
) -> tuple[Image.Image, dict[str, Any]]:
    """The image the coordinate MLP Psi(photos, t) renders at height x width pixels, and a record of how it was made."""
    require_task(record, "inr", "rendering a predicted image")
    if height < 1 or width < 1:
        raise UserError(f"image size {height} x {width} pixels: height and width must be positive")
    settings = config_from_dict({"inr": record.task_settings["inr"]}, where="the field's inr settings").inr
    task = InrTask(settings, record.resolution)
    weights = {name: w.unsqueeze(0) for name, w in predicted_weights(field, photos, t).items()}
    with torch.no_grad():
        pixels = task.image(weights, height, width)[0]  # (3, H, W) in [-1, 1]
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    details = {
        "step": t,
        "steps": field.steps,
        "strength": t / field.steps,
        **photo_details(photos),
        "height": height,
        "width": width,
        "hyperfields_version": hyperfields.__version__,
    }
    return Image.fromarray(array), details
