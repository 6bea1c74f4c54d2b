"""Subjects: the photos of one person, pet or object. In a data folder of sub-folders each sub-folder is one subject;
in a flat folder every photo is its own subject."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hyperfields.data import ImageRecord


@dataclass
class Subject:
    name: str  # the sub-folder's name, or the photo's path relative to the data folder
    records: list[ImageRecord]  # its photos, in scan order
    loose: bool = False  # a photo lying directly in the data folder, its own subject


def group_subjects(
    folder: Path, records: Sequence[ImageRecord], warn: Callable[[str], None] | None = None
) -> list[Subject]:
    """The subjects of a scanned folder in scan order: one per top-level sub-folder holding a usable photo (photos
    nested deeper belong to it), one per photo lying directly in `folder`.

    A folder holding both photos and sub-folders of photos, and a sub-folder without a usable photo, are one warning
    line each (on stderr unless `warn` is given).
    """
    warn = warn or (lambda message: print(message, file=sys.stderr))
    folder = Path(folder)
    by_name: dict[str, Subject] = {}
    loose = 0
    for record in records:
        parts = record.path.relative_to(folder).parts
        name = parts[0] if len(parts) > 1 else Path(*parts).as_posix()
        loose += len(parts) == 1
        by_name.setdefault(name, Subject(name, [], loose=len(parts) == 1)).records.append(record)
    folders = len(by_name) - loose
    if loose and folders:
        warn(
            f"warning: '{folder}' holds {loose} photo(s) beside {folders} sub-folder(s) of photos; each sub-folder is "
            f"one subject and each photo beside them its own"
        )
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    empty = [name for name in subdirs if name not in by_name]
    if empty:
        warn(
            f"warning: {len(empty)} sub-folder(s) of '{folder}' hold no usable photo and are ignored (e.g. {empty[0]})"
        )
    return list(by_name.values())
