"""Every command on a field of the inr task: inspect, generate renders its image, export writes its weights, LoRA-only
options are one-line errors; and inr fields written before tasks recorded their own keys still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.config import InrConfig
from hyperfields.field.io import load_field
from hyperfields.tasks.inr import InrTask
from tests.conftest import clean_exit

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def inr_field(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny inr field trained for three steps on four 16 px crops, and one of the crops."""
    root = tmp_path_factory.mktemp("inr")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(root / f"crop{i}.png")
    result = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(ROOT / "configs" / "inr.yaml"),
            "--data",
            str(root),
            "--output",
            str(root / "run"),
            "--max-steps",
            "3",
            "--set",
            "train.heldout=0",
            "--set",
            "objective.steps=10",
            "--set",
            "field.width=32",
            "--set",
            "field.depth=1",
        ],
    )
    assert result.exit_code == 0, result.output
    return root / "run" / "field", root / "crop0.png"


def render(weights: dict[str, torch.Tensor], height: int, width: int) -> np.ndarray:
    """The reference: the record's coordinate MLP with `weights`, as 8-bit RGB (height, width, 3)."""
    colours = InrTask(InrConfig(), 16).image({name: w.unsqueeze(0) for name, w in weights.items()}, height, width)[0]
    return ((colours.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_a_new_inr_record_holds_its_inr_settings_and_no_lora_keys(inr_field):
    record = json.loads((inr_field[0] / "config.json").read_text())
    assert record["task"] == "inr" and record["inr"] == {**InrConfig().__dict__}
    assert not {"base_model", "targets", "rank", "alpha", "sdxl_layers_per_block"} & set(record)


def test_inspect_reports_every_tensor_with_zero_update_at_t0(inr_field):
    field, photo = inr_field
    result = runner.invoke(app, ["inspect", "--field", str(field), "--image", str(photo)])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if "│ hidden" in line or "│ output" in line]
    names = [row[1] for row in rows]
    assert names == list(InrTask(InrConfig(), 16).layout())
    assert all(row[7] == "0" for row in rows), result.output  # t = 0 is theta_0 exactly


def test_export_writes_the_predicted_weights_by_name_and_generate_renders_them(inr_field, tmp_path):
    field, photo = inr_field
    result = runner.invoke(
        app, ["export", "--field", str(field), "--image", str(photo), "--out", str(tmp_path / "w.safetensors")]
    )
    assert result.exit_code == 0, result.output
    weights = load_file(tmp_path / "w.safetensors")
    layout = InrTask(InrConfig(), 16).layout()
    assert {name: tuple(w.shape) for name, w in weights.items()} == layout
    with safe_open(tmp_path / "w.safetensors", "pt") as file:
        assert file.metadata()["hyperfields.step"] == "10" and file.metadata()["hyperfields.task"] == "inr"

    result = runner.invoke(
        app,
        [
            "generate",
            "--field",
            str(field),
            "--image",
            str(photo),
            "--height",
            "24",
            "--width",
            "40",
            "--out",
            str(tmp_path / "images"),
        ],
    )
    assert result.exit_code == 0, result.output
    image = png(tmp_path / "images" / "image.png")
    assert image.shape == (24, 40, 3)
    assert np.abs(image - render(weights, 24, 40)).max() <= 1
    assert json.loads((tmp_path / "images" / "generation.json").read_text())["height"] == 24
    recorded = json.loads(Image.open(tmp_path / "images" / "image.png").text["hyperfields"])
    assert recorded["step"] == 10 and recorded["field"] == str(field) and recorded["width"] == 40


def test_generate_at_step_zero_renders_theta0_at_the_field_resolution(inr_field, tmp_path):
    field, photo = inr_field
    result = runner.invoke(
        app, ["generate", "--field", str(field), "--image", str(photo), "--step", "0", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    theta0 = InrTask(InrConfig(), 16).initial_weights()
    assert np.abs(png(tmp_path / "image.png") - render(theta0, 16, 16)).max() <= 1


@pytest.mark.parametrize(
    "args, flag",
    [
        (["export", "--format", "kohya", "--out", "{tmp}/x.safetensors"], "--format"),
        (["export", "--precision", "fp32", "--out", "{tmp}/x.safetensors"], "--precision"),
        (["generate", "--prompt", "a photo of sks", "--out", "{tmp}/images"], "--prompt"),
        (["generate", "--base-model", "tiny", "--out", "{tmp}/images"], "--base-model"),
        (["generate", "--guidance-scale", "3", "--out", "{tmp}/images"], "--guidance-scale"),
        (["generate", "--negative-prompt", "blurry", "--out", "{tmp}/images"], "--negative-prompt"),
        (["generate", "--scheduler", "ddim", "--out", "{tmp}/images"], "--scheduler"),
        (["generate", "--lora-scale", "0.5", "--out", "{tmp}/images"], "--lora-scale"),
        (["inspect", "--base-model", "tiny"], "--base-model"),
        (["refine", "--out", "{tmp}/x.safetensors"], "refine needs a field of task 'lora'"),
    ],
)
def test_lora_only_options_on_an_inr_field_are_one_line_errors(inr_field, tmp_path, args, flag):
    field, photo = inr_field
    command, *rest = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    result = runner.invoke(app, [command, "--field", str(field), "--image", str(photo), *rest])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and flag in errors[0] and "inr" in errors[0], result.output
    assert clean_exit(result) and list(tmp_path.iterdir()) == []


def test_an_inr_field_written_before_tasks_recorded_their_own_keys_still_loads(inr_field, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(inr_field[0], old)
    values = json.loads((old / "config.json").read_text())
    # What the earlier writer put in config.json: the LoRA keys of the run configuration, no inr settings.
    del values["inr"]
    values.update(base_model="tiny", targets=None, sdxl_layers_per_block=None, rank=4, alpha=4.0, init_seed=0)
    (old / "config.json").write_text(json.dumps(values))
    field, record = load_field(old)
    assert record.task_settings == {"inr": values["config"]["inr"]}
    result = runner.invoke(
        app, ["generate", "--field", str(old), "--image", str(inr_field[1]), "--out", str(tmp_path / "images")]
    )
    assert result.exit_code == 0, result.output
