"""Files of predicted weights: one photo to one file, or a folder of photos to a folder of files (one per photo).

A LoRA field writes LoRA files (diffusers or kohya); a field of another task writes its tensors under their own names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file

from hyperfields.data import scan_image_folder
from hyperfields.errors import UserError
from hyperfields.field.model import HyperField
from hyperfields.field.record import FieldRecord
from hyperfields.files import atomic_write, writable_folder
from hyperfields.lora import LoraFormat, LoraPrecision
from hyperfields.lora.formats import LoraOrigin, write_lora
from hyperfields.predict import (
    Photo,
    lora_origin,
    predict_lora,
    predicted_weights,
    prediction_metadata,
    read_photo,
)

SUFFIX = ".safetensors"


def write_prediction(
    field: HyperField,
    record: FieldRecord,
    photo: Photo,
    t: float,
    path: Path,
    format: LoraFormat,
    precision: LoraPrecision,
    origin: LoraOrigin | None,
) -> Path:
    """`path`, holding Psi(photo, t): a LoRA file in `format` and `precision` for a LoRA field (labelled with its
    `origin`), else the tensors by name in fp32; written atomically."""
    if record.task == "lora":
        return write_lora(predict_lora(field, record, photo, t), path, format, precision, origin)
    tensors = {name: w.contiguous() for name, w in predicted_weights(field, photo, t).items()}
    header = {"format": "pt", **prediction_metadata(record, t, photo)}
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=header))


def export_photo(
    field: HyperField,
    record: FieldRecord,
    photo_path: Path,
    out: Path,
    t: float,
    format: LoraFormat = "diffusers",
    precision: LoraPrecision = "fp16",
) -> Path:
    """The file `out` holding Psi(photo, t) (in `format` and `precision` for a LoRA field), written atomically."""
    out = Path(out)
    if out.is_dir():
        raise UserError(
            f"output '{out}' is a folder; give the path of the {SUFFIX} file to write, "
            "or export a folder of photos into it"
        )
    origin = lora_origin(record)
    photo = read_photo(photo_path, record.resolution)
    writable_folder(out.parent)
    return write_prediction(field, record, photo, t, out, format, precision, origin)


def export_folder(
    field: HyperField,
    record: FieldRecord,
    folder: Path,
    out: Path,
    t: float,
    format: LoraFormat = "diffusers",
    precision: LoraPrecision = "fp16",
    warn: Callable[[str], None] | None = None,
    on_file: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """The files written into folder `out`, one per usable photo under `folder`, named by the photo's path there;
    `on_file(done, total)` after each."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' is a file; a folder of photos is exported into a folder, one file per photo")
    origin = lora_origin(record)
    records = scan_image_folder(Path(folder), warn=warn).records
    targets: dict[Path, Path] = {}
    for image in records:
        name = out / image.path.relative_to(folder).with_suffix(SUFFIX)
        if name in targets.values():
            other = next(photo for photo, target in targets.items() if target == name)
            raise UserError(
                f"photos '{other}' and '{image.path}' would both be exported to '{name}'; rename one of them"
            )
        targets[image.path] = name
    writable_folder(out)
    written = []
    for photo, name in targets.items():
        written.append(
            write_prediction(field, record, read_photo(photo, record.resolution), t, name, format, precision, origin)
        )
        if on_file is not None:
            on_file(len(written), len(targets))
    return written
