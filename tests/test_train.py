"""`hyperfields train` end to end on the tiny models: field folder, checkpoints, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.field.io import load_field
from tests.conftest import clean_exit

runner = CliRunner()
FAST = ["--set", "train.batch_size=2", "--set", "objective.steps=6", "--set", "train.heldout=1",
        "--set", "train.eval_draws=2", "--set", "field.width=32", "--set", "field.depth=1", "--set", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = (rng.random((40 + i, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def run_train(photos: Path, output: Path, *extra: str):
    return runner.invoke(app, ["train", "--config", "configs/tiny.yaml", "--data", str(photos), "--output", str(output), *FAST, *extra])


def field_tensors(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "field" / "model.safetensors"))


def test_train_writes_a_loadable_field_and_checkpoints(photos, tmp_path):
    result = run_train(photos, tmp_path / "run", "--max-steps", "4", "--checkpoint-every", "2")
    assert result.exit_code == 0, result.output
    assert "skipping" in result.output and "broken.jpg" in result.output
    assert "recovered fraction R" in result.output
    record = json.loads((tmp_path / "run" / "field" / "config.json").read_text())
    assert record["trained_steps"] == 4 and record["steps"] == 6 and record["rank"] == 4
    assert record["base_model"] == "tiny" and "torch" in record["versions"]
    assert any(name.endswith("to_q.lora_A") for name in record["layout"])
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    field, _ = load_field(tmp_path / "run" / "field")
    out = field(t=6, images=torch.zeros(1, 3, 64, 64))
    assert set(out) == set(record["layout"])
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents*")), "tensorboard logs are written"


def test_resume_after_a_crash_restores_the_step_counter_and_matches_an_uninterrupted_run(photos, tmp_path):
    run = tmp_path / "run"
    assert run_train(photos, run, "--max-steps", "4", "--checkpoint-every", "2").exit_code == 0
    uninterrupted = field_tensors(run)
    # A crash just after step 2's checkpoint: only checkpoint-2 survives.
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "field")
    resumed = run_train(photos, run, "--max-steps", "4", "--checkpoint-every", "2", "--resume", "latest")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.output and "at step 2" in resumed.output
    assert json.loads((run / "field" / "config.json").read_text())["trained_steps"] == 4
    after = field_tensors(run)
    for name in uninterrupted:
        assert torch.allclose(uninterrupted[name], after[name], atol=1e-6), name


@pytest.mark.parametrize("extra, expected", [
    (["--set", "train.nonsense=1"], "unknown config key 'train.nonsense'"),
    (["--set", "objective.update=adam"], "objective.update"),
    (["--set", "train.batch_size=zero"], "train.batch_size"),
    (["--set", "train.batch_size=0"], "must be positive"),
    (["--resume", "latest"], "no complete checkpoint"),
])
def test_bad_configuration_is_one_line_and_exit_code_2(photos, tmp_path, extra, expected):
    result = run_train(photos, tmp_path / "run", "--max-steps", "1", *extra)
    assert result.exit_code == 2
    assert expected in result.output and clean_exit(result)
    assert len(result.output.strip().splitlines()) <= 3


def test_missing_or_empty_data_folder_is_exit_code_2(tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "nope" in result.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no usable image" in result.output and clean_exit(result)


def test_unknown_key_in_yaml_file_is_reported_with_the_file(tmp_path, photos):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 3\n")
    result = runner.invoke(app, ["train", "--config", str(bad), "--data", str(photos), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "train.max_step" in result.output


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "train" in result.output and "tiny" in result.output
    result = runner.invoke(app, ["train", "--help"])
    assert "--resume" in result.output and "--checkpoint-every" in result.output


@pytest.mark.parametrize("options", [
    ["--set", "train.mixed_precision=bf16"],
    ["--set", "train.gradient_accumulation=2", "--set", "train.ema_decay=0.5"],
    ["--set", "objective.rollout=2", "--set", "objective.update=sign", "--set", "objective.loss=cosine_norm"],
])
def test_training_options_run_end_to_end(photos, tmp_path, options):
    result = run_train(photos, tmp_path / "run", "--max-steps", "2", *options)
    assert result.exit_code == 0, result.output
    field, record = load_field(tmp_path / "run" / "field")
    assert record.trained_steps == 2
    assert all(torch.isfinite(p).all() for p in field.parameters())


def test_trained_encoder_is_saved_with_the_field(photos, tmp_path):
    result = run_train(photos, tmp_path / "run", "--max-steps", "2", "--set", "model.train_encoder=true", "--set", "train.learning_rate=0.01")
    assert result.exit_code == 0, result.output
    saved = field_tensors(tmp_path / "run")
    encoder_keys = [k for k in saved if k.startswith("encoder.")]
    assert encoder_keys
    field, _ = load_field(tmp_path / "run" / "field")
    from hyperfields.models import load_encoder

    original, _ = load_encoder("tiny")
    trained = dict(field.encoder.model.named_parameters())
    assert any(not torch.equal(p, trained[name]) for name, p in original.named_parameters())
