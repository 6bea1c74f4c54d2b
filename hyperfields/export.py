"""Files of predicted weights: a subject's photos to one file, or a folder of subjects to a folder of files (one per
subject: a sub-folder, or a photo beside them).

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
    PhotoSet,
    lora_origin,
    predict_lora,
    predicted_weights,
    prediction_metadata,
    read_photos,
)
from hyperfields.subjects import Subject, group_subjects

SUFFIX = ".safetensors"


def write_prediction(
    field: HyperField,
    record: FieldRecord,
    photos: PhotoSet,
    t: float,
    path: Path,
    format: LoraFormat,
    precision: LoraPrecision,
    origin: LoraOrigin | None,
) -> Path:
    """`path`, holding Psi(photos, t): a LoRA file in `format` and `precision` for a LoRA field (labelled with its
    `origin`), else the tensors by name in fp32; written atomically."""
    if record.task == "lora":
        return write_lora(predict_lora(field, record, photos, t), path, format, precision, origin)
    tensors = {name: w.contiguous() for name, w in predicted_weights(field, photos, t).items()}
    header = {"format": "pt", **prediction_metadata(record, t, photos)}
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=header))


def export_photos(
    field: HyperField,
    record: FieldRecord,
    photos: PhotoSet,
    out: Path,
    t: float,
    format: LoraFormat = "diffusers",
    precision: LoraPrecision = "fp16",
) -> Path:
    """The file `out` holding Psi(photos, t) (in `format` and `precision` for a LoRA field), written atomically."""
    out = Path(out)
    if out.is_dir():
        raise UserError(
            f"output '{out}' is a folder; give the path of the {SUFFIX} file to write, "
            "or export a folder of photos into it"
        )
    origin = lora_origin(record)
    writable_folder(out.parent)
    return write_prediction(field, record, photos, t, out, format, precision, origin)


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
    """The files written into folder `out`, one per subject under `folder` (a sub-folder, or a photo beside them),
    named by the sub-folder's name or the photo's path there; `on_file(done, total)` after each."""
    out, folder = Path(out), Path(folder)
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' is a file; a folder of photos is exported into a folder, one file per photo")
    origin = lora_origin(record)
    subjects = group_subjects(folder, scan_image_folder(folder, warn=warn).records, warn)
    targets: dict[Path, Subject] = {}
    for subject in subjects:
        name = out / (Path(subject.name).with_suffix(SUFFIX) if subject.loose else f"{subject.name}{SUFFIX}")
        if name in targets:
            raise UserError(
                f"subjects '{targets[name].name}' and '{subject.name}' of '{folder}' would both be exported to "
                f"'{name}'; rename one of them"
            )
        targets[name] = subject
    writable_folder(out)
    written = []
    for name, subject in targets.items():
        photos = read_photos([photo.path for photo in subject.records], record.resolution)
        written.append(write_prediction(field, record, photos, t, name, format, precision, origin))
        if on_file is not None:
            on_file(len(written), len(targets))
    return written
