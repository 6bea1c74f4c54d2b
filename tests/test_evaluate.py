"""`hyperfields evaluate`: every arm's images, scored as the command says, one subject per sub-folder (all its
photos) or per photo of a flat folder, and bad input refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.config import config_from_dict
from hyperfields.evaluate.arms import Arm, Personaliser, field_lora
from hyperfields.field.io import load_field
from hyperfields.models import resolve_model_path
from hyperfields.predict import PhotoSet, predicted_weights, read_photo
from hyperfields.refine import refine
from hyperfields.tasks import build_lora_task
from tests.conftest import clean_exit
from tests.tiny_field import TinyField, tiny_field

runner = CliRunner()
QUICK = ["--num-inference-steps", "2", "--dino-model", "tiny", "--clip-model", "tiny"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TinyField:
    return tiny_field(tmp_path_factory)


@pytest.fixture(scope="module")
def two_photos(trained: TinyField, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("subjects")
    for name in ("p0.png", "p1.png"):
        (folder / name).write_bytes((trained.photos / name).read_bytes())
    return folder


def write_prompts(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def evaluated(trained: TinyField, two_photos: Path, tmp_path_factory) -> Path:
    """Two photos x two prompts x every arm, the field also at t = 0 and t = 3: the evaluation folder."""
    root = tmp_path_factory.mktemp("evaluation")
    prompts = write_prompts(root / "prompts.txt", "a photo of {token} {class}", "{token} {class} on a beach")
    output = root / "out"
    result = runner.invoke(
        app,
        [
            "evaluate",
            *("--field", str(trained.field), "--images", str(two_photos), "--output", str(output)),
            *("--prompts", str(prompts), "--class-noun", "dog", "--num-images", "2", "--refine-updates", "2"),
            *("--step", "0", "--step", "3", "--face-model", "tiny", *QUICK),
            *("--arms", "base,field,refine,optimise,dreambooth", "--dreambooth-steps", "2"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| field t=3 |" in result.stdout
    return output


def test_evaluate_writes_metrics_table_sheets_and_images(evaluated: Path) -> None:
    metrics = json.loads((evaluated / "metrics.json").read_text(encoding="utf-8"))
    labels = ["base", "field", "field t=0", "field t=3", "refine", "optimise", "dreambooth"]
    assert list(metrics["arms"]) == labels
    assert metrics["checkpoints"] == {"dino": "tiny", "clip": "tiny", "face": "tiny"}
    assert {row["t"] for row in metrics["arms"].values()} == {0.0, 2.0, 3.0, 6.0, 8.0}
    for row in metrics["arms"].values():
        assert row["images"] == 2 * 2 * 2  # photos x prompts x images
        for score in ("dino", "clip_i", "clip_t", "face"):
            assert -1.0 <= row[score]["mean"] <= 1.0 and row[score]["std"] >= 0.0
    assert len(metrics["images"]) == len(labels) * 8
    assert [(s["name"], s["photo_count"]) for s in metrics["subjects"]] == [("000-p0", 1), ("001-p1", 1)]
    assert {image["subject"] for image in metrics["images"]} == {"000-p0", "001-p1"}
    for image in metrics["images"]:
        assert (evaluated / image["path"]).is_file()
        assert image["scored_prompt"] in ("a photo of dog", "dog on a beach")
        assert image["prompt"] == image["scored_prompt"].replace("dog", "sks dog")
    assert {image["seed"] for image in metrics["images"]} == {0, 1}
    table = (evaluated / "metrics.md").read_text(encoding="utf-8")
    assert all(f"| {label} |" in table for label in labels) and "| DINO | CLIP-I | CLIP-T | face |" in table
    for sheet in ("000-p0.png", "001-p1.png"):
        with Image.open(evaluated / "sheets" / sheet) as image:
            # A column per prompt (its first image), a row per arm and one of the subject's photo, and the labels.
            rows = len(labels) + 1
            assert 2 * 64 < image.width < 3 * 64 + 100 and rows * 64 < image.height < (rows + 1) * 64


def test_the_field_at_t0_is_the_base_model_and_the_trained_arms_are_not(evaluated: Path) -> None:
    metrics = json.loads((evaluated / "metrics.json").read_text(encoding="utf-8"))

    def pixels(label: str) -> list[np.ndarray]:
        paths = [image["path"] for image in metrics["images"] if image["label"] == label]
        return [np.asarray(Image.open(evaluated / path)) for path in paths]

    base = pixels("base")
    assert all(np.array_equal(a, b) for a, b in zip(base, pixels("field t=0")))
    for label in ("refine", "optimise", "dreambooth"):
        assert not all(np.array_equal(a, b) for a, b in zip(base, pixels(label))), label


def test_clip_t_is_clips_own_cosine_of_the_written_png_and_its_scored_prompt(evaluated: Path) -> None:
    metrics = json.loads((evaluated / "metrics.json").read_text(encoding="utf-8"))
    images = metrics["images"][:6]
    path = resolve_model_path("tiny", "clip")
    model, processor = CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    pngs = [Image.open(evaluated / image["path"]) for image in images]
    texts = [image["scored_prompt"] for image in images]
    with torch.no_grad():
        outputs = model(**processor(text=texts, images=pngs, return_tensors="pt", padding=True))
    expected = (outputs.image_embeds * outputs.text_embeds).sum(dim=-1)
    assert [image["clip_t"] for image in images] == pytest.approx(expected.tolist(), abs=1e-4)


@pytest.mark.parametrize(
    "case",
    ["no photos", "prompt without token", "unknown arm", "step past T", "bad DINO model", "folder of other files"],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, trained: TinyField, two_photos: Path, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    output = tmp_path / "out"
    args = {"--images": str(two_photos), "--arms": "base,field", **dict(zip(QUICK[::2], QUICK[1::2]))}
    expected = {
        "no photos": ("--images", str(empty), "no usable image"),
        "prompt without token": (
            "--prompts",
            str(write_prompts(tmp_path / "p.txt", "a photo of a {class}")),
            "line 1: the prompt has no {token}",
        ),
        "unknown arm": ("--arms", "base,lora", "unknown arm 'lora'"),
        "step past T": ("--step", "7", "step 7 is outside [0, 6]"),
        "bad DINO model": ("--dino-model", str(empty), "DINO model"),
        "folder of other files": ("--output", str(tmp_path), "holds other files"),
    }
    option, value, message = expected[case]
    args[option] = value
    before = sorted(tmp_path.rglob("*"))
    result = runner.invoke(
        app,
        ["evaluate", "--field", str(trained.field), "--output", str(output), *[a for kv in args.items() for a in kv]],
    )
    assert result.exit_code == 2 and clean_exit(result), result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert sorted(tmp_path.rglob("*")) == before  # no output folder, no staging folder left behind


def tiny_task(record):
    return build_lora_task("tiny", field_lora(record), torch.device("cpu"))


def test_refine_arm_is_hyperfields_refine_and_optimise_starts_at_the_fields_theta0(trained: TinyField) -> None:
    field, record = load_field(str(trained.field))
    photo = read_photo(trained.photo, record.resolution)
    objective = config_from_dict(record.config).objective
    personaliser = Personaliser(field, record, tiny_task(record), objective, seed=0)
    refined, _ = personaliser.weights(Arm("refine", record.steps + 2.0, "refine"), PhotoSet([photo]), subject=0)
    expected = refine(field, record, PhotoSet([photo]), 2, "tiny", seed=0).lora.tensors
    assert refined.keys() == expected.keys()
    assert all(torch.equal(refined[name], expected[name]) for name in expected)
    theta0 = personaliser.task.initial_weights()
    assert all(torch.equal(theta0[name], w) for name, w in predicted_weights(field, PhotoSet([photo]), 0.0).items())


def test_the_dreambooth_arm_lowers_the_task_loss_from_theta0(trained: TinyField) -> None:
    field, record = load_field(str(trained.field))
    photo = read_photo(trained.photo, record.resolution)
    objective = config_from_dict(record.config).objective
    personaliser = Personaliser(field, record, tiny_task(record), objective, seed=0, dreambooth_lr=1e-2)
    trained_lora, _ = personaliser.weights(Arm("dreambooth", 8.0, "dreambooth"), PhotoSet([photo]), subject=0)
    task = personaliser.task
    inputs = task.prepare(photo.pixels.unsqueeze(0), ["a photo of sks"])

    def loss(weights: dict[str, torch.Tensor]) -> float:
        batched = {name: w.unsqueeze(0) for name, w in weights.items()}
        with torch.no_grad():
            return float(task.loss(batched, inputs, 16, torch.Generator().manual_seed(1234)).mean())

    assert loss(trained_lora) < loss(task.initial_weights())
