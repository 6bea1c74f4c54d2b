"""A folder is decoded once: the scan manifest answers for unchanged files, and a bad manifest is never trusted."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hyperfields import data
from hyperfields.manifest import MANIFEST_NAME, scan_with_manifest


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files the scan decodes, in order."""
    seen: list[str] = []
    real = data.check_image

    def counting(path: Path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(data, "check_image", counting)
    return seen


def photos(folder: Path, n: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "p1.txt").write_text("a photo of sks on a beach")
    return folder


def scan(folder: Path, output: Path, notes: list[str] | None = None):
    warn = notes.append if notes is not None else lambda message: None
    return scan_with_manifest(folder, output / MANIFEST_NAME, "a photo of {token}", "sks", None, warn)[0]


def test_a_second_scan_of_an_unchanged_folder_decodes_nothing(tmp_path: Path, decodes: list[str]) -> None:
    folder = photos(tmp_path / "photos", 3)
    first = scan(folder, tmp_path / "run")
    assert sorted(decodes) == ["broken.png", "p0.png", "p1.png", "p2.png"]
    decodes.clear()
    notes: list[str] = []
    again = scan(folder, tmp_path / "run", notes)
    assert decodes == []
    assert again.records == first.records and again.skipped == first.skipped
    assert notes == [f"skipping {folder / 'broken.png'}: {first.skipped[0][1]}"]  # still reported, not decoded
    written = json.loads((tmp_path / "run" / MANIFEST_NAME).read_text())
    assert written["images"]["p1.png"]["caption"] == "a photo of sks on a beach"
    assert written["images"]["broken.png"]["skipped"] == first.skipped[0][1]


def test_changed_and_new_files_are_decoded_again(tmp_path: Path, decodes: list[str]) -> None:
    folder = photos(tmp_path / "photos", 3)
    scan(folder, tmp_path / "run")
    decodes.clear()
    (folder / "p1.png").write_bytes(b"truncated")  # another size
    status = (folder / "p2.png").stat()
    os.utime(folder / "p2.png", ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))  # same size, touched
    Image.new("RGB", (8, 8)).save(folder / "p3.png")
    (folder / "p1.txt").write_text("a new caption")  # captions are read again without decoding the image
    (folder / "p0.png").unlink()
    report = scan(folder, tmp_path / "run")
    assert sorted(decodes) == ["p1.png", "p2.png", "p3.png"]
    assert [r.path.name for r in report.records] == ["p2.png", "p3.png"]
    assert {p.name for p, _ in report.skipped} == {"broken.png", "p1.png"}
    written = json.loads((tmp_path / "run" / MANIFEST_NAME).read_text())
    assert sorted(written["images"]) == ["broken.png", "p1.png", "p2.png", "p3.png"]


def test_a_caption_edit_is_recorded_without_decoding(tmp_path: Path, decodes: list[str]) -> None:
    folder = photos(tmp_path / "photos", 2)
    scan(folder, tmp_path / "run")
    manifest = tmp_path / "run" / MANIFEST_NAME
    stamp = manifest.stat().st_mtime_ns
    scan(folder, tmp_path / "run")
    assert manifest.stat().st_mtime_ns == stamp  # nothing changed, nothing written
    decodes.clear()
    (folder / "p1.txt").write_text("a photo of sks in the snow")
    report = scan(folder, tmp_path / "run")
    assert decodes == [] and report.records[1].caption == "a photo of sks in the snow"
    assert json.loads(manifest.read_text())["images"]["p1.png"]["caption"] == "a photo of sks in the snow"


@pytest.mark.parametrize("damage", ["truncated", "version", "folder"])
def test_a_bad_manifest_is_rebuilt_with_one_note(tmp_path: Path, decodes: list[str], damage: str) -> None:
    folder = photos(tmp_path / "photos", 2)
    scan(folder, tmp_path / "run")
    manifest = tmp_path / "run" / MANIFEST_NAME
    text = manifest.read_text()
    if damage == "truncated":
        manifest.write_text(text[: len(text) // 2])
    elif damage == "version":
        manifest.write_text(text.replace('"version": 1', '"version": 99'))
    else:  # the same names in another folder must not vouch for these files
        other = photos(tmp_path / "other", 2)
        manifest.write_text(text.replace(json.dumps(str(folder.resolve())), json.dumps(str(other.resolve()))))
    decodes.clear()
    notes: list[str] = []
    scan(folder, tmp_path / "run", notes)
    assert sorted(decodes) == ["broken.png", "p0.png", "p1.png"]
    rebuilt = [n for n in notes if n.startswith("note:")]
    assert len(rebuilt) == 1 and str(manifest) in rebuilt[0] and "\n" not in rebuilt[0]
    decodes.clear()
    scan(folder, tmp_path / "run")
    assert decodes == []  # the rebuilt manifest is good again


def test_a_wrongly_typed_entry_is_not_trusted(tmp_path: Path, decodes: list[str]) -> None:
    folder = photos(tmp_path / "photos", 1)
    scan(folder, tmp_path / "run")
    manifest = tmp_path / "run" / MANIFEST_NAME
    content = json.loads(manifest.read_text())
    content["images"]["p0.png"]["width"] = "8"
    manifest.write_text(json.dumps(content))
    decodes.clear()
    notes: list[str] = []
    scan(folder, tmp_path / "run", notes)
    assert sorted(decodes) == ["broken.png", "p0.png"] and any("unreadable" in n for n in notes)


def test_other_processes_read_what_the_writer_decoded(tmp_path: Path, decodes: list[str]) -> None:
    folder = photos(tmp_path / "photos", 3)
    barrier = threading.Barrier(2, timeout=30)
    reports: dict[str, object] = {}

    def process(writer: bool) -> None:
        reports[str(writer)] = scan_with_manifest(
            folder,
            tmp_path / "run" / MANIFEST_NAME,
            "a photo of {token}",
            "sks",
            None,
            lambda message: None,
            writer=writer,
            barrier=barrier.wait,
        )

    reader = threading.Thread(target=process, args=(False,))
    reader.start()
    process(True)
    reader.join()
    (written, writer_checks), (read, reader_checks) = reports["True"], reports["False"]
    assert writer_checks.decoded == 4 and reader_checks.decoded == 0
    assert read.records == written.records
