"""A folder scanned once: each image's decode check kept in a JSON manifest, reused while the file is unchanged.

Decoding every photo is what makes a scan slow (tens of minutes for 100k photos), and every process of a run and
every resumed run would otherwise repeat it. The manifest records, per image, its size and modification time and
what the decode found; a later scan decodes only files whose size or modification time differ. Captions are
read again on every scan, since a caption file can change without its image changing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hyperfields import data
from hyperfields.data import ScanReport, scan_image_folder
from hyperfields.files import atomic_write

MANIFEST_NAME = "scan_manifest.json"
FORMAT = "hyperfields-scan"
VERSION = 1

Check = Callable[[Path], tuple[str | None, tuple[int, int]]]


class ImageChecks:
    """`check(path)` answered from a previous scan's entries while the file is unchanged, else by decoding it."""

    def __init__(self, folder: Path, known: dict[str, dict[str, Any]], decode: Check | None = None) -> None:
        self.folder = folder
        self.known = known
        self.decode = decode
        self.entries: dict[str, dict[str, Any]] = {}
        self.decoded = 0

    def check(self, path: Path) -> tuple[str | None, tuple[int, int]]:
        name = path.relative_to(self.folder).as_posix()
        decode = self.decode or data.check_image  # looked up per call, so a replaced check_image is used
        try:
            status = path.stat()
        except OSError:  # a dangling link: decoding says why, nothing to remember
            return decode(path)
        entry = self.known.get(name)
        if entry is None or entry["size"] != status.st_size or entry["mtime_ns"] != status.st_mtime_ns:
            self.decoded += 1
            reason, (width, height) = decode(path)
            entry = {
                "size": status.st_size,
                "mtime_ns": status.st_mtime_ns,
                "width": width,
                "height": height,
                "skipped": reason,
            }
        self.entries[name] = entry
        return entry["skipped"], (entry["width"], entry["height"])


def read_manifest(path: Path, folder: Path, note: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The per-image entries of the manifest at `path` if it is a readable one for `folder`, else {} after one note."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        problem = None
        if not isinstance(content, dict) or content.get("format") != FORMAT:
            problem = "not a scan manifest"
        elif content.get("version") != VERSION:
            problem = f"version {content.get('version')!r}, expected {VERSION}"
        elif content.get("folder") != str(folder.resolve()):
            problem = f"written for another folder ({content.get('folder')!r})"
        else:
            images = content["images"]
            for entry in images.values():
                # Every field the checks read, with its type: a hand-edited entry must not be trusted.
                if not (
                    isinstance(entry["size"], int)
                    and isinstance(entry["mtime_ns"], int)
                    and isinstance(entry["width"], int)
                    and isinstance(entry["height"], int)
                    and isinstance(entry["skipped"], (str, type(None)))
                ):
                    raise TypeError("an entry has a field of the wrong type")
            return images
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        problem = f"unreadable ({type(error).__name__}: {' '.join(str(error).split())[:120]})"
    note(f"note: scan manifest '{path}' is {problem}; decoding every image again and rebuilding it")
    return {}


def manifest_images(folder: Path, report: ScanReport, entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The manifest's per-image entries: the checks of every image seen, with the caption each usable one got."""
    captions = {record.path.relative_to(folder).as_posix(): record.caption for record in report.records}
    return {name: {**entry, "caption": captions.get(name)} for name, entry in entries.items()}


def write_manifest(path: Path, folder: Path, images: dict[str, dict[str, Any]]) -> None:
    """Write the manifest of `folder` atomically."""
    content = {"format": FORMAT, "version": VERSION, "folder": str(folder.resolve()), "images": images}
    atomic_write(path, lambda temporary: temporary.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8"))


def scan_with_manifest(
    folder: Path,
    manifest: Path,
    caption_template: str,
    token: str,
    resolution: int | None,
    warn: Callable[[str], None],
    writer: bool = True,
    barrier: Callable[[], None] = lambda: None,
    decode: Check | None = None,
) -> tuple[ScanReport, ImageChecks]:
    """`scan_image_folder`'s report, decoding only images the manifest does not know unchanged, and the checks made.

    Across processes, `writer` (one process) scans and writes the manifest while the others wait at `barrier`
    and then scan with it, decoding nothing the writer decoded. Every process calls `barrier` exactly once.
    """
    folder = Path(folder)
    if not writer:
        barrier()
    try:
        checks = ImageChecks(folder, read_manifest(manifest, folder, warn), decode)
        report = scan_image_folder(folder, caption_template, token, resolution, warn, check=checks.check)
        images = manifest_images(folder, report, checks.entries)
        if writer and images != checks.known:  # also when nothing was decoded: a caption may have changed
            write_manifest(manifest, folder, images)
    finally:  # also when the scan fails, so the waiting processes go on and report the same error
        if writer:
            barrier()
    return report, checks
