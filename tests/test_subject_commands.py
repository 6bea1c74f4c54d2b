"""Commands on several photos of one subject: --image repeated, --subject DIR, export --images over subject folders,
and what the files record."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.field.io import load_field
from hyperfields.generate import cached_lora_file
from hyperfields.predict import predicted_weights, read_photos
from tests.conftest import clean_exit
from tests.tiny_field import TinyField, tiny_field

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TinyField:
    return tiny_field(tmp_path_factory)


def export(trained: TinyField, out: Path, *extra: str):
    return runner.invoke(app, ["export", "--field", str(trained.field), "--output", str(out), *extra])


def header_and_tensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as file:
        return file.metadata(), {name: file.get_tensor(name) for name in file.keys()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_from_several_photos_records_them_and_is_the_same_from_a_subject_folder(trained, tmp_path):
    photos = [trained.photos / f"p{i}.png" for i in (2, 0, 1)]
    subject = tmp_path / "subject"
    subject.mkdir()
    for photo in photos:
        shutil.copy(photo, subject / photo.name)
    repeated = export(trained, tmp_path / "a.safetensors", *(arg for p in photos for arg in ("--image", str(p))))
    assert repeated.exit_code == 0, repeated.output
    from_folder = export(trained, tmp_path / "b.safetensors", "--subject", str(subject))
    assert from_folder.exit_code == 0, from_folder.output
    header, tensors = header_and_tensors(tmp_path / "a.safetensors")
    assert header["hyperfields.photos"] == "3"
    assert header["hyperfields.photo_sha256"] == ",".join(sorted(sha256(p) for p in photos))
    folder_header, folder_tensors = header_and_tensors(tmp_path / "b.safetensors")
    ours = [key for key in header if key.startswith("hyperfields.")]
    assert {key: folder_header[key] for key in ours} == {key: header[key] for key in ours}
    for name, tensor in tensors.items():  # the photos in another order: the same set
        torch.testing.assert_close(folder_tensors[name], tensor, rtol=1e-3, atol=1e-6)
    one = export(trained, tmp_path / "one.safetensors", "--image", str(photos[0]))
    assert one.exit_code == 0, one.output
    one_header, one_tensors = header_and_tensors(tmp_path / "one.safetensors")
    assert one_header["hyperfields.photos"] == "1" and one_header["hyperfields.photo_sha256"] == sha256(photos[0])
    assert any(not torch.equal(one_tensors[name], tensor) for name, tensor in tensors.items())


def test_one_photo_predicts_as_a_set_of_one(trained):
    field, record = load_field(trained.field)
    photos = read_photos([trained.photo], record.resolution)
    weights = predicted_weights(field, photos, 6.0)
    with torch.no_grad():
        single = field(t=6.0, images=photos.photos[0].pixels.unsqueeze(0))
    assert all(torch.equal(weights[name], single[name][0]) for name in weights)


def test_export_images_writes_one_file_per_subject_folder(trained, tmp_path):
    data = tmp_path / "data"
    for subject, names in {"anna": ["p0.png", "p1.png"], "ben": ["p2.png"]}.items():
        (data / subject).mkdir(parents=True)
        for name in names:
            shutil.copy(trained.photos / name, data / subject / name)
    shutil.copy(trained.photos / "p3.png", data / "loose.png")
    result = export(trained, tmp_path / "out", "--images", str(data))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "anna.safetensors",
        "ben.safetensors",
        "loose.safetensors",
    ]
    assert header_and_tensors(tmp_path / "out" / "anna.safetensors")[0]["hyperfields.photos"] == "2"
    assert "1 photo(s) beside 2 sub-folder(s)" in result.stderr


def test_a_set_of_photos_has_its_own_cached_lora_whatever_their_order(trained, tmp_path):
    field, record = load_field(trained.field)
    a, b = trained.photos / "p0.png", trained.photos / "p1.png"
    pair = cached_lora_file(field, record, read_photos([a, b], 64), 6.0, tmp_path)
    assert cached_lora_file(field, record, read_photos([b, a], 64), 6.0, tmp_path) == pair
    assert cached_lora_file(field, record, read_photos([a], 64), 6.0, tmp_path) != pair


def test_inspect_reads_a_subject_folder(trained, tmp_path):
    result = runner.invoke(app, ["inspect", "--field", str(trained.field), "--subject", str(trained.photos)])
    assert result.exit_code == 0, result.output
    assert "and 3 more photo(s)" in " ".join(result.output.split())


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--image", "{photo}", "--subject", "{photos}"], "give --image PHOTO (repeatable) or --subject DIR, not both"),
        (["--subject", "{photo}"], "is not a folder of photos"),
        ([], "missing option --image (or --subject DIR)"),
    ],
)
def test_bad_photo_options_are_one_line(trained, tmp_path, args, expected):
    args = [a.format(photo=trained.photo, photos=trained.photos) for a in args]
    result = runner.invoke(
        app, ["generate", "--field", str(trained.field), "--output", str(tmp_path / "g"), "--prompt", "x", *args]
    )
    assert result.exit_code == 2 and clean_exit(result), result.output
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert expected in result.stderr
    assert not (tmp_path / "g").exists()
