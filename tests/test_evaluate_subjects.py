"""`hyperfields evaluate` on a folder of subject folders: every arm makes one LoRA per subject from all its photos,
the scores and sheets are per subject, and a mixed or empty layout is a warning, not a failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.config import config_from_dict
from hyperfields.evaluate.arms import Arm, Personaliser, field_lora
from hyperfields.field.io import load_field
from hyperfields.predict import PhotoSet, predicted_weights, read_photo
from hyperfields.refine import refine
from hyperfields.tasks import build_lora_task
from tests.tiny_field import TinyField, tiny_field

runner = CliRunner()
QUICK = ["--num-inference-steps", "2", "--dino-model", "tiny", "--clip-model", "tiny", "--num-images", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TinyField:
    return tiny_field(tmp_path_factory)


def subject_folder(root: Path, trained: TinyField, layout: dict[str, str]) -> Path:
    """`root` holding the tiny field's photos p0 ... p3 at the paths `layout` gives them."""
    for name, path in layout.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes((trained.photos / name).read_bytes())
    return root


def evaluate(trained: TinyField, images: Path, output: Path, arms: str) -> tuple[dict, str]:
    prompts = output.parent / "prompts.txt"
    prompts.write_text("a photo of {token} {class}\n", encoding="utf-8")
    result = runner.invoke(
        app,
        [
            "evaluate",
            *("--field", str(trained.field), "--images", str(images), "--output", str(output)),
            *("--prompts", str(prompts), "--arms", arms, "--refine-updates", "1", "--dreambooth-steps", "1", *QUICK),
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads((output / "metrics.json").read_text(encoding="utf-8")), result.stderr


@pytest.fixture(scope="module")
def two_subjects(trained: TinyField, tmp_path_factory) -> Path:
    layout = {"p0.png": "anna/a.png", "p1.png": "anna/b.png", "p2.png": "ben/a.png", "p3.png": "ben/b.png"}
    return subject_folder(tmp_path_factory.mktemp("subjects"), trained, layout)


def test_each_sub_folder_is_one_subject_and_every_arm_gets_all_its_photos(
    trained: TinyField, two_subjects: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given: list[tuple[str, int, list[str]]] = []
    weights = Personaliser.weights

    def recording(self, arm, photos, subject):
        given.append((arm.kind, subject, sorted(photo.path.name for photo in photos.photos)))
        return weights(self, arm, photos, subject)

    monkeypatch.setattr(Personaliser, "weights", recording)
    arms = "base,field,refine,optimise,dreambooth"
    metrics, stderr = evaluate(trained, two_subjects, tmp_path / "out", arms)
    assert not [line for line in stderr.splitlines() if line.startswith("warning:")], stderr
    kinds = arms.split(",")
    assert given == [(kind, s, ["a.png", "b.png"]) for s in (0, 1) for kind in kinds]
    subjects = [(s["name"], s["photo_count"], [Path(p).parent.name for p in s["photos"]]) for s in metrics["subjects"]]
    assert subjects == [("anna", 2, ["anna", "anna"]), ("ben", 2, ["ben", "ben"])]
    for row in metrics["arms"].values():
        assert row["images"] == 2  # subjects x prompts x images
    assert sorted(image["subject"] for image in metrics["images"] if image["arm"] == "field") == ["anna", "ben"]
    assert sorted(path.name for path in (tmp_path / "out" / "sheets").iterdir()) == ["anna.png", "ben.png"]
    with Image.open(tmp_path / "out" / "sheets" / "anna.png") as sheet:
        # One prompt, but two columns: below a row per arm, the subject's two photos as the field crops them.
        assert (len(kinds) + 1) * 64 < sheet.height < (len(kinds) + 2) * 64
        last_cell = np.asarray(
            sheet.convert("RGB").crop((sheet.width - 66, sheet.height - 66, sheet.width - 2, sheet.height - 2))
        )
    with Image.open(two_subjects / "anna" / "b.png") as photo:
        assert np.array_equal(last_cell, np.asarray(ImageOps.fit(photo.convert("RGB"), (64, 64))))


def test_the_field_arm_predicts_from_all_photos_and_refine_takes_the_loss_over_them(trained: TinyField) -> None:
    field, record = load_field(str(trained.field))
    photos = PhotoSet([read_photo(trained.photos / name, record.resolution) for name in ("p0.png", "p1.png")])
    objective = config_from_dict(record.config).objective
    task = build_lora_task("tiny", field_lora(record), torch.device("cpu"))
    personaliser = Personaliser(field, record, task, objective, seed=0)
    predicted, _ = personaliser.weights(Arm("field", float(record.steps), "field"), photos, subject=0)
    expected = predicted_weights(field, photos, float(record.steps))
    alone = predicted_weights(field, PhotoSet(photos.photos[:1]), float(record.steps))
    assert all(torch.equal(predicted[name], w) for name, w in expected.items())
    assert not all(torch.equal(predicted[name], w) for name, w in alone.items())
    refined, _ = personaliser.weights(Arm("refine", record.steps + 2.0, "refine"), photos, subject=0)
    expected = refine(field, record, photos, 2, "tiny", seed=0).lora.tensors
    assert all(torch.equal(refined[name], w) for name, w in expected.items())
    first_only = refine(field, record, PhotoSet(photos.photos[:1]), 2, "tiny", seed=0).lora.tensors
    assert not all(torch.equal(refined[name], w) for name, w in first_only.items())


def test_photos_beside_sub_folders_and_empty_sub_folders_warn_and_still_evaluate(
    trained: TinyField, tmp_path: Path
) -> None:
    images = subject_folder(tmp_path / "images", trained, {"p0.png": "anna/a.png", "p1.png": "anna/b.png"})
    subject_folder(images, trained, {"p2.png": "loose.png"})
    (images / "empty").mkdir()
    metrics, stderr = evaluate(trained, images, tmp_path / "out", "base,field")
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, stderr
    assert "1 photo(s) beside 1 sub-folder(s)" in warnings[0] and "empty" in warnings[1]
    assert [(s["name"], s["photo_count"]) for s in metrics["subjects"]] == [("anna", 2), ("001-loose", 1)]
    assert sorted(path.name for path in (tmp_path / "out" / "sheets").iterdir()) == ["001-loose.png", "anna.png"]
