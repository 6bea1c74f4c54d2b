"""LoRA files from a field: one photo to one file, or a folder of photos to a folder of files (one per photo)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hyperfields.data import scan_image_folder
from hyperfields.errors import UserError
from hyperfields.field.model import HyperField
from hyperfields.files import writable_folder
from hyperfields.generate import predict_lora, read_photo
from hyperfields.lora import LoraFormat, LoraPrecision
from hyperfields.lora.formats import BaseModelFamily, LoraOrigin, write_lora
from hyperfields.models import resolve_model_path

SUFFIX = ".safetensors"


def base_model_family(record: dict[str, Any]) -> BaseModelFamily:
    """The family of the base model a field was trained for: from its record, else from the base model's configs."""
    if isinstance(record.get("base_family"), dict):
        return BaseModelFamily(**record["base_family"])
    # Fields written before the record named the family: read the two configs the trainer read it from.
    from diffusers import DDPMScheduler, UNet2DConditionModel

    base_model = str(record["base_model"])
    path = resolve_model_path(base_model, "pipeline")
    try:
        unet_config = UNet2DConditionModel.load_config(path, subfolder="unet")
        scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler")
    except Exception as error:  # missing folder, offline hub id, broken JSON: all mean the configs cannot be read
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"the field's record does not say which Stable Diffusion it is for, and base model "
                        f"'{base_model}' cannot be read to tell ({type(error).__name__}: {reason}); "
                        "make it reachable again") from None
    return BaseModelFamily.from_configs(unet_config, scheduler_config)


def lora_origin(field: HyperField) -> LoraOrigin:
    """What the field's LoRAs are for: its base model and family, training resolution and trigger token."""
    record = field.record
    return LoraOrigin(base_model=str(record["base_model"]), family=base_model_family(record),
                      resolution=int(record["resolution"]), trigger_phrase=str(record["token"]))


def export_photo(field: HyperField, photo_path: Path, out: Path, t: float, format: LoraFormat,
                 precision: LoraPrecision = "fp16") -> Path:
    """The LoRA file `out` holding Psi(photo, t) in `format` and `precision`, written atomically."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder; give the path of the {SUFFIX} file to write (or use --images DIR)")
    origin = lora_origin(field)
    photo = read_photo(photo_path, field.record["resolution"])
    writable_folder(out.parent)
    return write_lora(predict_lora(field, photo, t), out, format, precision, origin)


def export_folder(field: HyperField, folder: Path, out: Path, t: float, format: LoraFormat,
                  precision: LoraPrecision = "fp16", warn: Callable[[str], None] | None = None) -> list[Path]:
    """The LoRA files written into folder `out`, one per usable photo under `folder`, named by the photo's path there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; --images writes one LoRA per photo into a folder")
    origin = lora_origin(field)
    records = scan_image_folder(Path(folder), warn=warn).records
    targets: dict[Path, Path] = {}
    for record in records:
        name = out / record.path.relative_to(folder).with_suffix(SUFFIX)
        if name in targets.values():
            other = next(photo for photo, target in targets.items() if target == name)
            raise UserError(f"photos '{other}' and '{record.path}' would both be exported to '{name}'; rename one of them")
        targets[record.path] = name
    writable_folder(out)
    return [write_lora(predict_lora(field, read_photo(photo, field.record["resolution"]), t), name, format, precision,
                       origin) for photo, name in targets.items()]
