"""Personalise from one photo: predict the LoRA at step t, load it into the base pipeline the diffusers way, sample.

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
from hyperfields.data import load_image
from hyperfields.errors import UserError
from hyperfields.field.io import field_state_dict
from hyperfields.field.model import HyperField
from hyperfields.files import atomic_write
from hyperfields.lora.formats import LoraWeights, write_lora
from hyperfields.lora.targets import layout_mismatch
from hyperfields.models import load_pipeline
from hyperfields.models.tiny import cache_root

ADAPTER_NAME = "hyperfields"


@dataclass
class Photo:
    """A condition photo as the field sees it, with the sha256 of its file (it names the photo in headers and the cache)."""

    path: Path
    pixels: torch.Tensor  # (3, R, R) in [-1, 1]
    sha256: str


@dataclass
class Sampling:
    """How the base pipeline samples: the same values and seed give the same images."""

    num_images: int = 1  # images per prompt
    seed: int = 0  # every prompt starts from this seed, so rows of a contact sheet differ only by prompt
    num_inference_steps: int = 30
    guidance_scale: float = 7.5


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_photo(path: Path, resolution: int) -> Photo:
    """The photo at `path` centre-cropped to `resolution` as the field was trained; UserError when it is not a readable image."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"photo '{path}' does not exist or is not a file")
    try:
        data = path.read_bytes()
        pixels = load_image(path, resolution)
    except Exception as error:  # Pillow raises many types for broken files; all mean "not a usable photo"
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"photo '{path}' cannot be read as an image ({type(error).__name__}: {reason})") from None
    return Photo(path=path, pixels=pixels, sha256=hashlib.sha256(data).hexdigest())


def resolve_step(steps: int, step: float | None = None, strength: float | None = None) -> float:
    """The trajectory step t in [0, T]: `step` itself, `strength` * T (0 = base model, 1 = T), or T when neither is given."""
    if step is not None and strength is not None:
        raise UserError("give --step or --strength, not both")
    if strength is not None:
        if not 0.0 <= strength <= 1.0:
            raise UserError(f"--strength {strength:g} is outside [0, 1] (0 = base model, 1 = the field's full trajectory)")
        return strength * steps
    if step is None:
        return float(steps)
    if not 0.0 <= step <= steps:
        raise UserError(f"--step {step:g} is outside [0, {steps}] (the field was trained for T = {steps} steps)")
    return float(step)


def lora_metadata(record: dict[str, Any], t: float, photo: Photo) -> dict[str, str]:
    """The provenance written into every LoRA file's header."""
    return {
        "hyperfields.version": hyperfields.__version__,
        "hyperfields.base_model": str(record["base_model"]),
        "hyperfields.step": f"{t:g}",
        "hyperfields.steps": str(record["steps"]),
        "hyperfields.photo_sha256": photo.sha256,
    }


@torch.no_grad()
def predict_lora(field: HyperField, photo: Photo, t: float) -> LoraWeights:
    """Psi(photo, t) as a LoRA with the field's trained alpha and provenance, on the CPU."""
    device = next(field.parameters()).device
    weights = field(t=t, images=photo.pixels.unsqueeze(0).to(device))
    tensors = {name: w[0].float().cpu() for name, w in weights.items()}
    return LoraWeights(tensors=tensors, alpha=float(field.record["alpha"]), metadata=lora_metadata(field.record, t, photo),
                       sdxl_layers_per_block=field.record.get("sdxl_layers_per_block"))


def field_fingerprint(field: HyperField) -> str:
    """A sha256 of the field's saved tensors and record: a retrained or different field never reuses a cached LoRA."""
    digest = hashlib.sha256(json.dumps(field.record, sort_keys=True, default=str).encode())
    for name, tensor in sorted(field_state_dict(field).items()):
        digest.update(name.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def lora_cache_dir() -> Path:
    """The default folder of cached predicted LoRAs: $HYPERFIELDS_CACHE/loras (~/.cache/hyperfields/loras)."""
    return cache_root() / "loras"


def cached_lora_file(field: HyperField, photo: Photo, t: float, cache_dir: Path) -> Path:
    """A diffusers LoRA file of Psi(photo, t), predicted on first use and kept in `cache_dir` under (field, photo, t)."""
    path = Path(cache_dir) / f"{field_fingerprint(field)[:16]}-{photo.sha256[:16]}-t{t:g}.safetensors"
    if not path.is_file():  # written atomically, so a present file is complete
        write_lora(predict_lora(field, photo, t), path, "diffusers")
    return path


def check_base_model(field: HyperField, unet: torch.nn.Module, base_model: str) -> None:
    """Nothing when `unet` has every LoRA target of the field with the same shapes; else a one-line UserError."""
    problem = layout_mismatch(field.shapes, unet)
    if problem is not None:
        raise UserError(f"the field was trained for base model '{field.record['base_model']}' and does not fit "
                        f"base model '{base_model}': {problem}")


def load_lora(pipeline: Any, path: Path) -> None:
    """Load a diffusers LoRA file into `pipeline` as a user would, without diffusers' note that it has no text-encoder part."""
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
        result = pipeline(prompt, num_images_per_prompt=sampling.num_images, num_inference_steps=sampling.num_inference_steps,
                          guidance_scale=sampling.guidance_scale, generator=generator)
        rows.append(list(result.images))
    return rows


def contact_sheet(rows: list[list[Image.Image]], gap: int = 2) -> Image.Image:
    """One image holding all `rows` (one per prompt) side by side, on a white background."""
    width, height = rows[0][0].size
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * width + (columns - 1) * gap, len(rows) * height + (len(rows) - 1) * gap), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image, (c * (width + gap), r * (height + gap)))
    return sheet


def image_name(prompt_index: int, image_index: int) -> str:
    return f"prompt{prompt_index:02d}_image{image_index:02d}.png"


def write_images(rows: list[list[Image.Image]], folder: Path, details: dict[str, Any]) -> list[Path]:
    """The PNGs written into `folder`: one per image, contact_sheet.png, and generation.json saying how they were made."""
    written = []
    for p, row in enumerate(rows):
        for i, image in enumerate(row):
            written.append(atomic_write(Path(folder) / image_name(p, i), lambda tmp, image=image: image.save(tmp, format="PNG")))
    sheet = contact_sheet(rows)
    written.append(atomic_write(Path(folder) / "contact_sheet.png", lambda tmp: sheet.save(tmp, format="PNG")))
    atomic_write(Path(folder) / "generation.json", lambda tmp: tmp.write_text(json.dumps(details, indent=2) + "\n", encoding="utf-8"))
    return written


def generate(field: HyperField, photo: Photo, prompts: list[str], t: float, base_model: str, sampling: Sampling,
             cache_dir: Path) -> tuple[list[list[Image.Image]], dict[str, Any]]:
    """Images of the base model personalised by Psi(photo, t), one row per prompt, and a record of how they were made."""
    device = default_device()
    pipeline = load_pipeline(base_model, torch.float16 if device.type == "cuda" else torch.float32)
    check_base_model(field, pipeline.unet, base_model)
    lora_file = cached_lora_file(field, photo, t, cache_dir)
    load_lora(pipeline, lora_file)
    rows = sample(pipeline.to(device), prompts, sampling)
    details = {"prompts": prompts, "step": t, "steps": field.steps, "base_model": base_model, "photo": str(photo.path),
               "photo_sha256": photo.sha256, "lora_file": str(lora_file), **asdict(sampling),
               "hyperfields_version": hyperfields.__version__}
    return rows, details
