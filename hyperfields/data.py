"""Image folders in, validated and captioned image records out (hyperfields.dataset turns them into tensors).

Personalisation folders come straight from users' phones and downloads, so
every image is decoded once up front and anything unreadable is skipped with
one warning line instead of crashing a training run hours later.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

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


def one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextmanager
def decoding() -> Iterator[None]:
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
        with _BOMB_LOCK, decoding():
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with im, decoding():
            width, height = im.size
            if width * height > MAX_PIXELS:
                return f"too large ({width}×{height} pixels)", (0, 0)
            if width < 1 or height < 1:
                return f"empty image ({width}×{height} pixels)", (0, 0)
            # verify() only checks some formats' checksums; a full decode is the
            # only thing that catches truncated JPEG/WebP data.
            im.load()
    except Image.DecompressionBombError as exc:
        reason = f"too large ({one_line(exc)})"
    except PermissionError:
        reason = "permission denied"
    except UnidentifiedImageError:
        reason = "not an image Pillow can read"
    except OSError as exc:
        reason = f"unreadable or corrupt ({one_line(exc) or type(exc).__name__})"
    except Exception as exc:  # SyntaxError, ValueError, struct.error, ... from plugins
        reason = f"cannot decode ({type(exc).__name__}: {one_line(exc)})"
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
        warn(f"warning: cannot read {jsonl} ({one_line(exc)}); ignoring it")
        return captions
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError) as exc:  # not JSON, thousands of digits, nesting beyond the stack
            reason = getattr(exc, "msg", None) or one_line(str(exc).split(";")[0])
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
            f"bad caption template {caption_template!r} ({one_line(exc)}); only {{token}} may be used"
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
                warn(f"warning: cannot read caption {sidecar} ({one_line(exc)}); using the template")
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
