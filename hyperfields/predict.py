"""Photos to weights to LoRA: the one prediction API of a trained field, used by every command that reads one."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import hyperfields
from hyperfields.data import scan_image_folder
from hyperfields.dataset import load_image
from hyperfields.errors import UserError, error_line
from hyperfields.field.model import HyperField
from hyperfields.field.record import FieldRecord
from hyperfields.lora.families import BaseModelFamily
from hyperfields.lora.formats import LoraOrigin, LoraWeights
from hyperfields.lora.targets import layout_mismatch
from hyperfields.models import pipeline_family, resolve_model_path


@dataclass
class Photo:
    """A condition photo as the field sees it, with the sha256 of its file (names the photo in headers and caches)."""

    path: Path
    pixels: torch.Tensor  # (3, R, R) in [-1, 1]
    sha256: str


def read_photo(path: Path, resolution: int) -> Photo:
    """The photo at `path` centre-cropped to `resolution` as the field was trained; UserError when not an image."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"photo '{path}' does not exist or is not a file")
    try:
        data = path.read_bytes()
        pixels = load_image(path, resolution)
    except Exception as error:  # Pillow raises many types for broken files; all mean "not a usable photo"
        raise UserError(f"photo '{path}' cannot be read as an image ({error_line(error)})") from None
    return Photo(path=path, pixels=pixels, sha256=hashlib.sha256(data).hexdigest())


@dataclass
class PhotoSet:
    """The photos of one subject the field is conditioned on: one or several, their order of no consequence."""

    photos: list[Photo]

    @property
    def pixels(self) -> torch.Tensor:
        """(P, 3, R, R) in [-1, 1]."""
        return torch.stack([photo.pixels for photo in self.photos])

    @property
    def hashes(self) -> list[str]:
        """Each photo's sha256, sorted: the same photos in any order are the same set."""
        return sorted(photo.sha256 for photo in self.photos)

    @property
    def sha256(self) -> str:
        """Names the set in caches: a single photo's own sha256, else the sha256 of the sorted hashes."""
        if len(self.photos) == 1:
            return self.photos[0].sha256
        return hashlib.sha256(",".join(self.hashes).encode()).hexdigest()

    def describe(self) -> str:
        """The photo's path, or the first one's and how many more, for messages."""
        first = f"'{self.photos[0].path}'"
        return first if len(self.photos) == 1 else f"{first} and {len(self.photos) - 1} more photo(s)"


def read_photos(paths: Sequence[Path], resolution: int) -> PhotoSet:
    """The photos at `paths` (one subject's), each read as `read_photo` reads it; UserError when there is none."""
    if not paths:
        raise UserError("no photo given; a prediction needs at least one photo of the subject")
    return PhotoSet([read_photo(path, resolution) for path in paths])


def read_subject(folder: Path, resolution: int, warn: Callable[[str], None] | None = None) -> PhotoSet:
    """Every usable photo under `folder`, one subject's; a one-line UserError when it holds none."""
    return read_photos([record.path for record in scan_image_folder(Path(folder), warn=warn).records], resolution)


def resolve_step(steps: int, step: float | None = None, strength: float | None = None) -> float:
    """The trajectory step t in [0, T]: `step`, `strength` * T (0 = theta_0, 1 = T), or T when neither is given."""
    if step is not None and strength is not None:
        raise UserError(f"step {step:g} and strength {strength:g} both given; give one of them")
    if strength is not None:
        if not 0.0 <= strength <= 1.0:
            raise UserError(f"strength {strength:g} is outside [0, 1] (0 = the start, 1 = the end of the trajectory)")
        return strength * steps
    if step is None:
        return float(steps)
    if not 0.0 <= step <= steps:
        raise UserError(f"step {step:g} is outside [0, {steps}] (the field was trained for T = {steps} steps)")
    return float(step)


def require_task(record: FieldRecord, task: str, what: str) -> None:
    """Nothing when the field predicts for `task`; else a one-line UserError saying that `what` needs such a field."""
    if record.task != task:
        raise UserError(f"{what} needs a field of task '{task}'; this field was trained on task '{record.task}'")


@torch.no_grad()
def predicted_weights(field: HyperField, photos: PhotoSet, t: float) -> dict[str, torch.Tensor]:
    """Psi(photos, t) by name, without batch dimension, in fp32 on the CPU."""
    device = next(field.parameters()).device
    weights = field(t=t, images=photos.pixels.unsqueeze(0).to(device))  # one subject of P photos
    return {name: w[0].float().cpu() for name, w in weights.items()}


def prediction_metadata(record: FieldRecord, t: float, photos: PhotoSet) -> dict[str, str]:
    """The provenance written into the header of every file of predicted weights: how many photos made it and the
    sha256 of each (comma-separated, sorted)."""
    metadata = {
        "hyperfields.version": hyperfields.__version__,
        "hyperfields.task": record.task,
        "hyperfields.step": f"{t:g}",
        "hyperfields.steps": str(record.steps),
        "hyperfields.photos": str(len(photos.photos)),
        "hyperfields.photo_sha256": ",".join(photos.hashes),
    }
    if record.task == "lora":
        metadata["hyperfields.base_model"] = str(record.task_settings["base_model"])
    return metadata


def predict_lora(field: HyperField, record: FieldRecord, photos: PhotoSet, t: float) -> LoraWeights:
    """Psi(photos, t) as a LoRA with the field's trained alpha and provenance, on the CPU."""
    require_task(record, "lora", "a LoRA")
    settings = record.task_settings
    return LoraWeights(
        tensors=predicted_weights(field, photos, t),
        alpha=float(settings["alpha"]),
        metadata=prediction_metadata(record, t, photos),
        sdxl_layers_per_block=settings.get("sdxl_layers_per_block"),
        component=str(settings.get("component", "unet")),
    )


def lora_component(record: FieldRecord, base_model: str) -> str:
    """The pipeline component a LoRA field's targets are modules of ("unet", or "transformer" for FLUX.1 and SD 3.x),
    when `base_model` has it; else a one-line UserError."""
    component = str(record.task_settings.get("component", "unet"))
    has = "unet" if pipeline_family(base_model) == "unet" else "transformer"
    if has != component:
        raise UserError(
            f"the field was trained for base model '{record.task_settings['base_model']}', a LoRA of its {component}, "
            f"and does not fit base model '{base_model}': it has no {component}"
        )
    return component


def check_base_model(field: HyperField, record: FieldRecord, unet: torch.nn.Module, base_model: str) -> None:
    """Nothing when `unet` (or transformer) has every LoRA target of the field with the same shapes; else a one-line
    UserError."""
    problem = layout_mismatch(field.shapes, unet)
    if problem is not None:
        raise UserError(
            f"the field was trained for base model '{record.task_settings['base_model']}' and does not fit "
            f"base model '{base_model}': {problem}"
        )


def base_model_family(settings: dict[str, Any]) -> BaseModelFamily:
    """The family of the base model a LoRA field was trained for: from its record, else from the base's configs."""
    if isinstance(settings.get("base_family"), dict):
        return BaseModelFamily(**settings["base_family"])
    # Fields written before the record named the family, or another base: read the configs the trainer read it from.
    from diffusers import DDPMScheduler, UNet2DConditionModel

    base_model = str(settings["base_model"])
    path = resolve_model_path(base_model, "pipeline")
    try:
        family = pipeline_family(base_model)
        if family != "unet":
            from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

            transformer = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
            return BaseModelFamily.from_transformer(family, transformer.load_config(path, subfolder="transformer"))
        unet_config = UNet2DConditionModel.load_config(path, subfolder="unet")
        scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler")
    except Exception as error:  # missing folder, offline hub id, broken JSON: all mean the configs cannot be read
        raise UserError(
            f"the field's record does not say which base model family it is for, and base model "
            f"'{base_model}' cannot be read to tell ({error_line(error)}); make it reachable again"
        ) from None
    return BaseModelFamily.from_configs(unet_config, scheduler_config)


def lora_origin(record: FieldRecord, base_model: str | None = None) -> LoraOrigin | None:
    """What a LoRA field's LoRAs are for: its base model (or `base_model`, another the LoRA was fitted on) and
    family, training resolution and trigger token; None for a field of another task."""
    if record.task != "lora":
        return None
    settings = record.task_settings
    if base_model is not None and base_model != settings["base_model"]:
        settings = {"base_model": base_model}  # another base: its own configs tell its family
    return LoraOrigin(
        base_model=str(settings["base_model"]),
        family=base_model_family(settings),
        resolution=record.resolution,
        trigger_phrase=record.token,
    )
