"""Tests for hyperfields.data against a hostile image corpus built in tmp_path."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hyperfields.data import ImageRecord, scan_image_folder
from hyperfields.dataset import ImageCaptionDataset, load_image, split_heldout
from hyperfields.errors import UserError


def _png(path: Path, size: tuple[int, int] = (16, 16), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _scan(folder: Path, **kwargs):
    warnings: list[str] = []
    report = scan_image_folder(folder, warn=warnings.append, **kwargs)
    return report, warnings


def _bomb_png(path: Path, width: int = 30000, height: int = 30000) -> None:
    """Write a PNG whose header claims width x height; only the header is ever read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# --- captions -------------------------------------------------------------


def test_caption_sources(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a dog on a beach \n", encoding="utf-8")
    _png(tmp_path / "b.png")  # no caption anywhere -> template
    _png(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("   \n", encoding="utf-8")  # empty sidecar -> template + warning
    _png(tmp_path / "sub" / "d.png")
    _png(tmp_path / "sub" / "deeper" / "e.png")
    (tmp_path / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "d.png", "text": "caption from jsonl"})
        + "\n"
        + "{not json\n"
        + json.dumps({"file_name": "deeper/e.png", "text": " nested jsonl caption "})
        + "\n",
        encoding="utf-8",
    )
    _png(tmp_path / "f.png")
    (tmp_path / "f.txt").write_bytes(b"caf\xe9 photo")  # latin-1, not UTF-8

    report, warnings = _scan(tmp_path, caption_template="a photo of {token} dog", token="zwx")
    captions = {r.path.relative_to(tmp_path).as_posix(): r.caption for r in report.records}
    assert captions == {
        "a.png": "a dog on a beach",
        "b.png": "a photo of zwx dog",
        "c.png": "a photo of zwx dog",
        "f.png": "caf\ufffd photo",
        "sub/d.png": "caption from jsonl",
        "sub/deeper/e.png": "nested jsonl caption",
    }
    assert report.skipped == []
    assert any("c.txt" in w and "empty" in w for w in warnings)
    assert any("metadata.jsonl:2" in w for w in warnings)
    assert any("f.txt" in w and "UTF-8" in w for w in warnings)


def test_sidecar_beats_metadata(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sidecar", encoding="utf-8")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "jsonl"}))
    report, _ = _scan(tmp_path)
    assert [r.caption for r in report.records] == ["sidecar"]


def test_bad_caption_template_is_user_error(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    with pytest.raises(UserError, match="template"):
        _scan(tmp_path, caption_template="a photo of {name}")


# --- walking --------------------------------------------------------------


def test_recursive_sorted_hidden_ignored_and_symlink_loop(tmp_path: Path) -> None:
    _png(tmp_path / "z.png")
    _png(tmp_path / "A" / "b" / "deep.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "A" / "UPPER.JPEG", format="JPEG")
    _png(tmp_path / ".hidden.png")
    _png(tmp_path / ".cache" / "x.png")
    (tmp_path / "notes.md").write_text("not an image")
    os.symlink(tmp_path, tmp_path / "A" / "loop")  # directory loop back to the root
    os.symlink(tmp_path / "z.png", tmp_path / "A" / "link.png")  # symlinked files are fine

    report, warnings = _scan(tmp_path)
    names = [r.path.relative_to(tmp_path).as_posix() for r in report.records]
    assert names == ["A/UPPER.JPEG", "A/b/deep.png", "A/link.png", "z.png"]
    assert warnings == []
    assert _scan(tmp_path)[0] == report  # deterministic


def test_non_ascii_names_with_spaces(tmp_path: Path) -> None:
    img = _png(tmp_path / "café crème" / "ünï cødé photo 😀.png")
    img.with_suffix(".txt").write_text("légende", encoding="utf-8")
    report, _ = _scan(tmp_path)
    assert [(r.path, r.caption) for r in report.records] == [(img, "légende")]
    assert load_image(img, 8).shape == (3, 8, 8)


# --- hostile files --------------------------------------------------------


def test_bad_files_are_skipped_with_one_warning_each(tmp_path: Path) -> None:
    good = _png(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a jpeg\n")
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "full.jpg").unlink()
    buf = tmp_path / "truncpng.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf)
    buf.write_bytes(buf.read_bytes()[:300])
    os.symlink(tmp_path / "missing.png", tmp_path / "dangling.png")
    _bomb_png(tmp_path / "bomb.png")
    bad = {"empty.jpg", "text.jpg", "noise.png", "truncated.jpg", "truncpng.png", "dangling.png", "bomb.png"}
    if hasattr(os, "mkfifo"):  # opening a named pipe would block the scan forever
        os.mkfifo(tmp_path / "pipe.png")
        bad.add("pipe.png")

    report, warnings = _scan(tmp_path)
    assert [r.path for r in report.records] == [good]
    assert {p.name for p, _ in report.skipped} == bad
    assert len(warnings) == len(bad)
    for path, reason in report.skipped:
        assert "\n" not in reason
        assert sum(str(path) in w for w in warnings) == 1
        assert f"skipping {path}: {reason}" in warnings
    reasons = {p.name: r for p, r in report.skipped}
    assert reasons["bomb.png"] == "too large (30000×30000 pixels)"
    assert "0 bytes" in reasons["empty.jpg"]
    assert "pipe.png" not in bad or reasons["pipe.png"].startswith("not a regular file")


def test_unreadable_file_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _png(tmp_path / "ok.png")
    locked = _png(tmp_path / "locked.png")
    locked.chmod(0)
    if not hasattr(os, "geteuid") or os.geteuid() == 0:  # root reads mode-000 files; fake the error
        real_open = Image.open

        def deny(fp, *args, **kwargs):
            if Path(fp) == locked:
                raise PermissionError(13, "Permission denied", str(fp))
            return real_open(fp, *args, **kwargs)

        monkeypatch.setattr(Image, "open", deny)
    try:
        report, warnings = _scan(tmp_path)
    finally:
        locked.chmod(0o644)
    assert report.skipped == [(locked, "permission denied")]
    assert warnings == [f"skipping {locked}: permission denied"]


def test_only_bad_files_raises_user_error_naming_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my pics"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    (folder / "b.png").write_text("nope")
    (folder / "readme.txt").write_text("hello")
    with pytest.raises(UserError) as info:
        _scan(folder)
    message = str(info.value)
    assert "\n" not in message
    assert str(folder) in message
    assert "found 3 files, 2 skipped" in message
    assert ".jpg" in message


def test_missing_and_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    file = _png(tmp_path / "x.png")
    with pytest.raises(UserError, match="not a directory"):
        scan_image_folder(file)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="found 0 files"):
        scan_image_folder(tmp_path / "empty")


def test_small_image_is_kept_and_upscale_warned(tmp_path: Path) -> None:
    _png(tmp_path / "tiny.png", size=(1, 1))
    report, warnings = _scan(tmp_path, resolution=64)
    assert len(report.records) == 1 and report.skipped == []
    assert len(warnings) == 1 and "upscaled" in warnings[0]
    pixels = load_image(report.records[0].path, 64)
    assert pixels.shape == (3, 64, 64)
    expected = torch.tensor([200, 30, 30], dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(pixels[:, 32, 32], expected, atol=0.02)


# --- decoding -------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (32, 32), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 10))  # red marker top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=95)
    pixels = load_image(path, 32)
    red = lambda y, x: pixels[0, y, x] > 0.5 and pixels[2, y, x] < -0.5  # noqa: E731
    assert red(3, 28), "marker should move to the top-right"
    assert not red(3, 3)


def test_rgba_transparency_goes_white(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 4), dtype=np.uint8)
    arr[:, :4] = (255, 0, 0, 255)  # opaque red left half, transparent black right half
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
    pixels = load_image(tmp_path / "a.png", 8)
    assert torch.allclose(pixels[:, 4, 6], torch.ones(3))
    assert torch.allclose(pixels[:, 4, 1], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)


def test_palette_with_transparency_and_la(tmp_path: Path) -> None:
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (0, 0, 4, 8))
    p.save(tmp_path / "p.png", transparency=0)
    pixels = load_image(tmp_path / "p.png", 8)
    assert pixels.shape == (3, 8, 8)
    assert torch.allclose(pixels[:, 4, 6], torch.ones(3))  # transparent index -> white
    assert torch.allclose(pixels[:, 4, 1], torch.tensor([-1.0, 1.0, -1.0]), atol=0.05)
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")
    assert torch.allclose(load_image(tmp_path / "la.png", 8), torch.ones(3, 8, 8))


def test_16bit_greyscale_keeps_brightness(tmp_path: Path) -> None:
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    pixels = load_image(tmp_path / "g16.png", 16)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 16, 16)
    assert pixels.abs().max() < 0.02


def test_other_modes_become_three_channels(tmp_path: Path) -> None:
    Image.new("CMYK", (10, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    blue = Image.new("RGB", (10, 6), (0, 0, 255))
    blue.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "pal.png")
    Image.new("L", (10, 6), 0).save(tmp_path / "l.png")
    Image.new("1", (10, 6), 1).save(tmp_path / "one.bmp")
    Image.new("RGB", (10, 6), (0, 128, 0)).save(tmp_path / "w.webp", lossless=True)
    out = {p.name: load_image(p, 6) for p in sorted(tmp_path.iterdir())}
    assert all(t.shape == (3, 6, 6) and t.dtype == torch.float32 for t in out.values())
    assert all(t.min() >= -1 and t.max() <= 1 for t in out.values())
    cmyk = out["cmyk.jpg"][:, 3, 3]
    assert cmyk[0] > 0.8 and cmyk[1] < -0.8 and cmyk[2] < -0.8  # C=0 M=Y=255 is red
    assert out["pal.png"][2, 3, 3] > 0.9 and out["pal.png"][0, 3, 3] < -0.9
    assert torch.allclose(out["l.png"], -torch.ones(3, 6, 6))
    assert torch.allclose(out["one.bmp"], torch.ones(3, 6, 6))


def test_resize_short_side_and_centre_crop(tmp_path: Path) -> None:
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:40] = (0, 255, 0)
    arr[:, 40:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    pixels = load_image(tmp_path / "wide.png", 10)
    assert pixels.shape == (3, 10, 10)
    green = torch.tensor([-1.0, 1.0, -1.0])
    assert torch.allclose(pixels[:, 5, 5], green, atol=0.05)  # only the green middle survives


# --- dataset and split ----------------------------------------------------


def test_dataset_items_and_cache(tmp_path: Path) -> None:
    records = [ImageRecord(_png(tmp_path / f"{i}.png", size=(20, 12)), f"cap {i}") for i in range(3)]
    ds = ImageCaptionDataset(records, resolution=8)
    assert len(ds) == 3
    item = ds[1]
    assert item["caption"] == "cap 1" and item["path"] == str(records[1].path)
    assert item["pixel_values"].shape == (3, 8, 8)
    records[1].path.unlink()  # served from the cache now
    assert ds[1]["pixel_values"] is item["pixel_values"]
    records[2].path.write_bytes(b"gone bad")
    with pytest.raises(UserError, match="2.png"):
        ds[2]
    batch = next(iter(torch.utils.data.DataLoader(ImageCaptionDataset(records[:1], 8), batch_size=1)))
    assert batch["pixel_values"].shape == (1, 3, 8, 8) and batch["caption"] == ["cap 0"]


def test_split_heldout_deterministic_and_disjoint() -> None:
    records = [ImageRecord(Path(f"{i}.png"), str(i)) for i in range(20)]
    train, held = split_heldout(records, n_heldout=3, seed=7)
    assert (train, held) == split_heldout(records, n_heldout=3, seed=7)
    assert len(held) == 3 and len(train) == 17
    assert not {id(r) for r in train} & {id(r) for r in held}
    assert sorted(train + held, key=lambda r: int(r.caption)) == records
    assert [int(r.caption) for r in train] == sorted(int(r.caption) for r in train)  # input order kept
    others = {tuple(r.caption for r in split_heldout(records, 3, seed)[1]) for seed in range(10)}
    assert len(others) > 1  # the seed matters
    # tiny folders keep most images for training
    assert [len(x) for x in split_heldout(records[:3], 5, 0)] == [3, 0]
    assert [len(x) for x in split_heldout(records[:8], 5, 0)] == [6, 2]
    assert split_heldout([], 2, 0) == ([], [])
