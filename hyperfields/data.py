"""Image folders in, captioned records and [-1, 1] training tensors out.

Personalisation folders come straight from users' phones and downloads, so
every image is decoded once up front and anything unreadable is skipped with
one warning line instead of crashing a training run hours later.
"""

from __future__ import annotations

import json
import os
import random
import stat
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from hyperfields.errors import UserError, printable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METADATA_NAME = "metadata.jsonl"
# Pillow's own default: larger images are refused rather than decoded, because
# a 30000x30000 PNG is ~100 KB on disk but ~2.7 GB once decoded to RGB.
MAX_PIXELS = 89_478_485

_EXPECTED = "/".join(IMAGE_SUFFIXES)
# Image.MAX_IMAGE_PIXELS is a process-wide global; the lock keeps two scanning
# threads from restoring each other's value.
_BOMB_LOCK = threading.Lock()


@dataclass
class ImageRecord:
    path: Path
    caption: str


@dataclass
class ScanReport:
    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _stderr_warn(message: str) -> None:
    print(message, file=sys.stderr)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextmanager
def _decoding() -> Iterator[None]:
    """A block in which Pillow's warnings are silenced and a decompression bomb is an error.

    Pillow warns about corrupt EXIF and the like (lines of their own on stderr; the photo is still used), and only
    warns below twice its pixel limit before decoding gigabytes: such a photo is refused instead.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def check_image(path: Path) -> tuple[str | None, tuple[int, int]]:
    """Return (None, size) if `path` decodes fully, else (one-line reason it cannot be used, (0, 0))."""
    try:
        status = path.stat()
        if not stat.S_ISREG(status.st_mode):  # a FIFO would block the open below forever
            return "not a regular file (a pipe, socket or device)", (0, 0)
        if status.st_size == 0:
            return "empty file (0 bytes)", (0, 0)
        # Header-only open with Pillow's guard off, so we can report the real
        # W×H ourselves; Pillow's error for >2x the limit carries only a count.
        with _BOMB_LOCK, _decoding():
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with im, _decoding():
            width, height = im.size
            if width * height > MAX_PIXELS:
                return f"too large ({width}×{height} pixels)", (0, 0)
            if width < 1 or height < 1:
                return f"empty image ({width}×{height} pixels)", (0, 0)
            # verify() only checks some formats' checksums; a full decode is the
            # only thing that catches truncated JPEG/WebP data.
            im.load()
    except Image.DecompressionBombError as exc:
        reason = f"too large ({_one_line(exc)})"
    except PermissionError:
        reason = "permission denied"
    except UnidentifiedImageError:
        reason = "not an image Pillow can read"
    except OSError as exc:
        reason = f"unreadable or corrupt ({_one_line(exc) or type(exc).__name__})"
    except Exception as exc:  # SyntaxError, ValueError, struct.error, ... from plugins
        reason = f"cannot decode ({type(exc).__name__}: {_one_line(exc)})"
    else:
        return None, (width, height)
    return reason, (0, 0)


def _read_text(path: Path, warn: Callable[[str], None]) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        warn(f"warning: {path} is not valid UTF-8; undecodable bytes replaced")
        return raw.decode("utf-8", errors="replace")


def _load_metadata(jsonl: Path, warn: Callable[[str], None]) -> dict[str, str]:
    """Return {posix file_name relative to the jsonl's folder: text} for one metadata.jsonl."""
    captions: dict[str, str] = {}
    try:
        text = _read_text(jsonl, warn)
    except OSError as exc:
        warn(f"warning: cannot read {jsonl} ({_one_line(exc)}); ignoring it")
        return captions
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError) as exc:  # not JSON, thousands of digits, nesting beyond the stack
            reason = getattr(exc, "msg", None) or _one_line(str(exc).split(";")[0])
            warn(f"warning: {jsonl}:{lineno}: bad JSON ({reason}); line skipped")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            warn(f'warning: {jsonl}:{lineno}: no "file_name" string; line skipped')
            continue
        caption = entry.get("text")
        name = PurePosixPath(entry["file_name"].replace("\\", "/")).as_posix()
        captions[name.removeprefix("./")] = caption.strip() if isinstance(caption, str) else ""
    return captions


def scan_image_folder(
    folder: Path,
    caption_template: str = "a photo of {token}",
    token: str = "sks",
    resolution: int | None = None,
    warn: Callable[[str], None] | None = None,
    check: Callable[[Path], tuple[str | None, tuple[int, int]]] | None = None,
) -> ScanReport:
    """Return every decodable image under `folder` with its caption, plus what was skipped and why.

    Caption precedence: `<stem>.txt` beside the image, then the nearest
    `metadata.jsonl` (Hugging Face imagefolder layout) listing it, then
    `caption_template.format(token=token)`. `resolution`, if given, only
    adds one warning about images that will be upscaled. `check` stands in for
    `check_image` (a scan manifest answers for files it already decoded).
    Raises UserError if the folder is missing or holds no usable image.
    """
    emit = warn or _stderr_warn
    check = check or check_image

    def warn(message: str) -> None:  # a file name with a line break must not split a warning
        emit(printable(message))

    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"image folder '{folder}' does not exist")
    if not folder.is_dir():
        raise UserError(f"'{folder}' is not a directory; expected a folder of images")
    try:
        default_caption = caption_template.format(token=token).strip()
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(
            f"bad caption template {caption_template!r} ({_one_line(exc)}); only {{token}} may be used"
        ) from None

    candidates: list[Path] = []
    n_files = 0
    # followlinks=False: a symlinked directory pointing at an ancestor would
    # otherwise recurse forever. Symlinked files still show up in `files`.
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            n_files += 1
            if name.lower().endswith(IMAGE_SUFFIXES):
                candidates.append(Path(root) / name)
    # Sort by path components so the order is the same on every filesystem.
    candidates.sort(key=lambda p: p.relative_to(folder).parts)

    metadata_cache: dict[Path, dict[str, str]] = {}

    def metadata_caption(image: Path) -> str | None:
        directory = image.parent
        while True:
            if directory not in metadata_cache:
                jsonl = directory / METADATA_NAME
                metadata_cache[directory] = _load_metadata(jsonl, warn) if jsonl.is_file() else {}
            key = image.relative_to(directory).as_posix()
            if key in metadata_cache[directory]:
                return metadata_cache[directory][key]
            if directory == folder or directory.parent == directory:
                return None
            directory = directory.parent

    report = ScanReport()
    small: list[Path] = []
    for path in candidates:
        reason, size = check(path)
        if reason is not None:
            warn(f"skipping {path}: {reason}")
            report.skipped.append((path, reason))
            continue

        caption: str | None = None
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            try:
                caption = _read_text(sidecar, warn).strip()
            except OSError as exc:
                warn(f"warning: cannot read caption {sidecar} ({_one_line(exc)}); using the template")
            if caption == "":
                warn(f"warning: caption {sidecar} is empty; using {default_caption!r}")
        else:
            caption = metadata_caption(path)
            if caption == "":
                warn(f'warning: {path} has an empty "text" in {METADATA_NAME}; using {default_caption!r}')
        report.records.append(ImageRecord(path=path, caption=caption or default_caption))

        if resolution is not None and min(size) < resolution:
            small.append(path)

    if small:
        warn(
            f"warning: {len(small)} image(s) smaller than {resolution} px on the short side "
            f"will be upscaled (e.g. {small[0]})"
        )
    if not report.records:
        plural = "" if n_files == 1 else "s"
        raise UserError(
            f"no usable image in '{folder}' (found {n_files} file{plural}, "
            f"{len(report.skipped)} skipped; expected {_EXPECTED})"
        )
    return report


def _to_rgb(im: Image.Image) -> Image.Image:
    """Return an 8-bit RGB copy of any Pillow mode, with transparency flattened onto white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own convert("L") clips these at 255, so mid-grey 16-bit
        # would come out saturated white; rescale explicitly instead.
        arr = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        elif im.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Return float32 (3, resolution, resolution) in [-1, 1]: upright, short side resized, centre-cropped."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    with _decoding():
        im = Image.open(path)
    with im, _decoding():
        # Lets JPEG decode at 1/2..1/8 scale when the photo is much bigger than needed.
        im.draft(None, (resolution, resolution))
        im.load()
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:  # malformed EXIF should not cost the user an image
            upright = im.copy()
        rgb = _to_rgb(upright)
    # fit() crops to a square first and then resizes, equivalent to
    # "short side to resolution, centre-crop" but resampling fewer pixels.
    square = ImageOps.fit(rgb, (resolution, resolution), method=Image.Resampling.LANCZOS)
    arr = np.asarray(square, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Items are {"pixel_values": (3, R, R) float tensor in [-1, 1], "caption": str, "path": str}.

    With `keep_decoded`, decoded tensors are kept in memory after first use:
    personalisation folders are tens of images, and decoding dominates a step
    otherwise. Each DataLoader worker process keeps its own cache. Don't modify
    returned tensors in place. Without it (a condition cache reads each image
    once), memory does not grow with the folder.
    """

    def __init__(self, records: Sequence[ImageRecord], resolution: int, keep_decoded: bool = True) -> None:
        self.records = list(records)
        self.resolution = resolution
        self.keep_decoded = keep_decoded
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        record = self.records[index]
        pixels = self._cache.get(index)
        if pixels is None:
            try:
                pixels = load_image(record.path, self.resolution)
            except Exception as exc:
                # It decoded during the scan, so the file changed underneath us.
                raise UserError(
                    f"cannot read image '{record.path}' ({_one_line(exc)}); it was readable when the folder was scanned"
                ) from exc
            if self.keep_decoded:
                self._cache[index] = pixels
        return {"pixel_values": pixels, "caption": record.caption, "path": str(record.path)}


def split_heldout(
    records: Sequence[ImageRecord], n_heldout: int, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Return (train, heldout): min(n_heldout, len(records) // 4) records held out by a seeded shuffle.

    Capping at a quarter keeps most of a tiny folder for training; both lists
    keep the input order so logs and checkpoints are stable.
    """
    if n_heldout < 0:
        raise ValueError(f"n_heldout must be >= 0, got {n_heldout}")
    records = list(records)
    n = min(n_heldout, len(records) // 4)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    train = [r for i, r in enumerate(records) if i not in held]
    heldout = [r for i, r in enumerate(records) if i in held]
    return train, heldout
