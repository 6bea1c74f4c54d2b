"""LoRA files from a field: one photo to one file, or a folder of photos to a folder of files (one per photo)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hyperfields.data import scan_image_folder
from hyperfields.errors import UserError
from hyperfields.field.model import HyperField
from hyperfields.files import writable_folder
from hyperfields.predict import predict_lora, read_photo
from hyperfields.lora import LoraFormat
from hyperfields.lora.formats import write_lora

SUFFIX = ".safetensors"


def export_photo(field: HyperField, photo_path: Path, out: Path, t: float, format: LoraFormat) -> Path:
    """The LoRA file `out` holding Psi(photo, t) in `format`, written atomically."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder; give the path of the {SUFFIX} file to write (or use --images DIR)")
    photo = read_photo(photo_path, field.record["resolution"])
    writable_folder(out.parent)
    return write_lora(predict_lora(field, photo, t), out, format)


def export_folder(field: HyperField, folder: Path, out: Path, t: float, format: LoraFormat,
                  warn: Callable[[str], None] | None = None) -> list[Path]:
    """The LoRA files written into folder `out`, one per usable photo under `folder`, named by the photo's path there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; --images writes one LoRA per photo into a folder")
    records = scan_image_folder(Path(folder), warn=warn).records
    targets: dict[Path, Path] = {}
    for record in records:
        name = out / record.path.relative_to(folder).with_suffix(SUFFIX)
        if name in targets.values():
            other = next(photo for photo, target in targets.items() if target == name)
            raise UserError(f"photos '{other}' and '{record.path}' would both be exported to '{name}'; rename one of them")
        targets[record.path] = name
    writable_folder(out)
    return [write_lora(predict_lora(field, read_photo(photo, field.record["resolution"]), t), name, format)
            for photo, name in targets.items()]
