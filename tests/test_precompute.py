"""`hyperfields precompute` and the supervised two-phase baseline, end to end through the command line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.config import load_config
from hyperfields.dataset import load_image
from hyperfields.field.io import load_field
from hyperfields.objectives import supervised_loss
from hyperfields.tasks import build_task
from hyperfields.trajectory import real_trajectory
from tests.conftest import clean_exit

runner = CliRunner()
SMALL = ["--set", "objective.steps=20", "--set", "train.heldout=1", "--set", "field.width=64", "--set", "field.depth=1"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    for i in range(6):
        coarse = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8))
        coarse.resize((24, 24), Image.Resampling.BILINEAR).save(folder / f"c{i}.png")
    return folder


@pytest.fixture(scope="module")
def precomputed(photos, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("run") / "precomputed"
    result = runner.invoke(
        app,
        [
            "precompute",
            "--config",
            "configs/inr.yaml",
            "--data",
            str(photos),
            "--output",
            str(output),
            "--set",
            "train.batch_size=2",
            *SMALL,
        ],
    )
    assert result.exit_code == 0, result.output
    # One bar over every real update: 3 batches of train.batch_size = 2 of the 5 training images, T = 20 each.
    assert re.search(r"precompute .* 60/60 real updates", result.stderr), result.stderr
    return output


def test_precompute_writes_theta_T_of_every_training_image(photos, precomputed):
    index = json.loads((precomputed / "index.json").read_text())
    tensors = load_file(str(precomputed / "theta_T.safetensors"))
    config = load_config(Path("configs/inr.yaml"), SMALL[1::2])
    task = build_task(config, torch.device("cpu"), torch.float32)
    assert index["steps"] == 20 and index["task"] == "inr"
    assert len(index["images"]) == 5, "the held-out image is not optimised"
    assert sorted(index["images"].values()) == list(range(5))
    for name, shape in task.layout().items():
        assert tensors[name].shape == (5, *shape)
        assert torch.equal(tensors[f"theta_0/{name}"], task.initial_weights()[name])
    # Each row is the real trajectory's end for its image.
    path, row = next(iter(index["images"].items()))
    image = load_image(photos / path, config.model.resolution).unsqueeze(0)
    theta0 = {name: w.unsqueeze(0) for name, w in task.initial_weights().items()}
    trajectory, _ = real_trajectory(task, theta0, task.prepare(image, [""]), config.objective, torch.Generator(), 20)
    for name in task.layout():
        assert torch.allclose(tensors[name][row], trajectory[-1][name][0], atol=1e-5)


def test_batch_size_still_names_the_batch_with_one_note(photos, precomputed, tmp_path):
    arguments = ["precompute", "--config", "configs/inr.yaml", "--images", str(photos), *SMALL]
    result = runner.invoke(app, [*arguments, "--output", str(tmp_path / "former"), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("note:")] == [
        "note: --batch-size is deprecated; use --set train.batch_size=2"
    ]
    former = load_file(str(tmp_path / "former" / "theta_T.safetensors"))
    assert all(
        torch.equal(value, former[name]) for name, value in load_file(str(precomputed / "theta_T.safetensors")).items()
    )
    both = ["--output", str(tmp_path / "both"), "--batch-size", "2", "--set", "train.batch_size=3"]
    result = runner.invoke(app, [*arguments, *both])
    assert result.exit_code == 2 and clean_exit(result), result.output
    assert "error: give --set train.batch_size=..., not both that and its former name --batch-size" in result.stderr
    assert not (tmp_path / "both").exists()


def test_supervised_training_through_the_cli_fits_theta_T(photos, precomputed, tmp_path):
    output = tmp_path / "supervised"
    result = runner.invoke(
        app,
        [
            "train",
            "--config",
            "configs/inr.yaml",
            "--data",
            str(photos),
            "--output",
            str(output),
            "--max-steps",
            "100",
            *SMALL,
            "--set",
            "train.batch_size=5",
            "--set",
            "train.warmup_steps=5",
            "--set",
            "objective.kind=supervised",
            "--set",
            f"objective.precomputed={precomputed}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "PSNR" in result.output
    assert "objective.end_weight=300 is part of gradient matching" in " ".join(
        result.output.split()
    )  # not silently dropped
    field, record = load_field(output / "field")
    index = json.loads((precomputed / "index.json").read_text())
    tensors = load_file(str(precomputed / "theta_T.safetensors"))
    paths = sorted(index["images"], key=index["images"].get)
    images = torch.stack([load_image(photos / p, 16) for p in paths])
    theta_T = {name: tensors[name] for name in record.layout}
    with torch.no_grad():
        loss = supervised_loss(field, {"images": images}, theta_T, 20, field.theta0())
    # Predicting theta_0 itself scores 1.0: the trained field has moved most of the way to theta_T.
    assert loss.item() < 0.5, loss.item()


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], "objective.precomputed"),
        (["--set", "objective.precomputed={folder}", "--set", "objective.steps=30"], "T=20"),
        (["--set", "objective.precomputed={folder}", "--set", "inr.init_seed=1"], "theta_0"),
    ],
)
def test_supervised_training_with_missing_or_mismatched_weights_is_exit_code_2(
    photos, precomputed, tmp_path, extra, expected
):
    extra = [value.format(folder=precomputed) for value in extra]
    result = train_supervised_one_step(photos, tmp_path / "o", *extra)
    assert result.exit_code == 2, result.output
    assert expected in result.output and clean_exit(result)


def train_supervised_one_step(photos: Path, output: Path, *extra: str):
    """`hyperfields train` of the supervised baseline for one step on the small inr config."""
    arguments = ["train", "--config", "configs/inr.yaml", "--data", str(photos), "--output", str(output)]
    return runner.invoke(app, [*arguments, "--max-steps", "1", *SMALL, "--set", "objective.kind=supervised", *extra])


def drop_one_tensor(folder: Path) -> None:
    tensors = load_file(str(folder / "theta_T.safetensors"))
    tensors.pop(next(name for name in tensors if not name.startswith("theta_0/")))
    save_file(tensors, str(folder / "theta_T.safetensors"))


def point_a_row_past_the_end(folder: Path) -> None:
    index = json.loads((folder / "index.json").read_text())
    index["images"][next(iter(index["images"]))] = 999
    (folder / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "tamper, expected", [(drop_one_tensor, "should have shape"), (point_a_row_past_the_end, '"images" map')]
)
def test_tampered_precomputed_weights_are_exit_code_2(photos, precomputed, tmp_path, tamper, expected):
    tampered = tmp_path / "tampered"
    shutil.copytree(precomputed, tampered)
    tamper(tampered)
    result = train_supervised_one_step(photos, tmp_path / "o", "--set", f"objective.precomputed={tampered}")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and str(tampered) in errors[0], result.output
