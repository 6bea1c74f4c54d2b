"""`hyperfields train` end to end on the tiny models: field folder, checkpoints, resume, bad input."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.config import load_config
from hyperfields.field.io import load_field
from tests.conftest import FAST, clean_exit

runner = CliRunner()


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
    return runner.invoke(
        app, ["train", "--config", "configs/tiny.yaml", "--data", str(photos), "--output", str(output), *FAST, *extra]
    )


def error_lines(result) -> list[str]:
    """What a failed run printed besides notes: one error line, nothing else."""
    return [line for line in result.stderr.splitlines() if not line.startswith("note:")]


def field_tensors(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "field" / "model.safetensors"))


def test_train_writes_a_loadable_field_and_checkpoints(photos, tmp_path):
    result = run_train(photos, tmp_path / "run", "--max-steps", "4", "--checkpoint-every", "2")
    assert result.exit_code == 0, result.output
    assert "skipping" in result.output and "broken.jpg" in result.output
    assert "recovered fraction R" in result.output and "shown 1 photo" not in result.output  # a flat folder: as before
    assert re.search(r"held-out .* 6/6 real optimisation \(once\)", result.stderr), result.stderr
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


@pytest.mark.slow
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


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--set", "train.nonsense=1"], "unknown config key 'train.nonsense'"),
        (["--set", "objective.update=adam"], "objective.update"),
        (["--set", "train.batch_size=zero"], "train.batch_size"),
        (["--set", "train.batch_size=0"], "must be positive"),
        (["--resume", "latest"], "no complete checkpoint"),
    ],
)
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


def test_a_bare_no_in_a_yaml_file_is_the_value_no(tmp_path):
    # YAML 1.1 reads `no` as false: `mixed_precision: no` is how accelerate's own config files spell it.
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  mixed_precision: no\n")
    assert load_config(config).train.mixed_precision == "no"


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "train" in result.output and "tiny" in result.output
    result = runner.invoke(app, ["train", "--help"])
    assert "--resume" in result.output and "--checkpoint-every" in result.output


@pytest.fixture(scope="module")
def reference_field(photos, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The field of a 2-step run with the defaults, to compare each option's run against."""
    output = tmp_path_factory.mktemp("reference") / "run"
    result = run_train(photos, output, "--max-steps", "2")
    assert result.exit_code == 0, result.output
    return field_tensors(output)


def differs(field: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(field[name], reference[name]) for name in reference)


def test_bf16_frozen_models_keep_the_field_fp32_and_the_former_key_trains_the_same(photos, tmp_path, reference_field):
    result = run_train(photos, tmp_path / "run", "--max-steps", "2", "--set", "train.frozen_dtype=bf16")
    assert result.exit_code == 0, result.output
    field = field_tensors(tmp_path / "run")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in field.values())
    assert differs(field, reference_field), "bf16 frozen models give other gradients than fp32"
    assert max((field[k] - reference_field[k]).abs().max().item() for k in field) < 0.05
    # A config written when train.mixed_precision named the frozen models' dtype trains as it did, with a note.
    former = run_train(photos, tmp_path / "former", "--max-steps", "2", "--set", "train.mixed_precision=bf16")
    assert former.exit_code == 0, former.output
    notes = [line for line in former.stderr.splitlines() if line.startswith("note: train.mixed_precision")]
    assert len(notes) == 1 and "use train.frozen_dtype=bf16" in notes[0]
    assert not differs(field_tensors(tmp_path / "former"), field)


def test_bf16_autocast_of_the_field_keeps_its_weights_fp32(photos, tmp_path, reference_field):
    result = run_train(
        photos,
        tmp_path / "run",
        "--max-steps",
        "2",
        "--set",
        "train.mixed_precision=bf16",
        "--set",
        "train.frozen_dtype=fp32",
    )
    assert result.exit_code == 0, result.output
    assert "note: train.mixed_precision" not in result.stderr
    field = field_tensors(tmp_path / "run")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in field.values())
    assert differs(field, reference_field), "the field's forward under bf16 autocast gives other updates than fp32"
    assert max((field[k] - reference_field[k]).abs().max().item() for k in field) < 0.05
    record = json.loads((tmp_path / "run" / "field" / "config.json").read_text())["config"]["train"]
    assert (record["mixed_precision"], record["frozen_dtype"]) == ("bf16", "fp32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast runs on a GPU")
def test_fp16_autocast_without_a_gpu_is_a_one_line_error(photos, tmp_path):
    autocast = ["--set", "train.mixed_precision=fp16", "--set", "train.frozen_dtype=fp32"]
    result = run_train(photos, tmp_path / "run", "--max-steps", "1", *autocast)
    assert result.exit_code == 2 and clean_exit(result), result.output
    assert error_lines(result) == [
        "error: config key 'train.mixed_precision': fp16 autocast needs a GPU and none is visible; use bf16 or no"
    ]


def test_report_to_none_writes_no_tracker_files(photos, tmp_path):
    result = run_train(photos, tmp_path / "run", "--max-steps", "1", "--set", "train.report_to=none")
    assert result.exit_code == 0, result.output
    assert "recovered fraction R" in result.output and (tmp_path / "run" / "field" / "config.json").is_file()
    assert not list((tmp_path / "run").rglob("*tfevents*")) and not (tmp_path / "run" / "logs").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_report_to_wandb_without_wandb_names_the_package(photos, tmp_path):
    result = run_train(photos, tmp_path / "run", "--max-steps", "1", "--set", "train.report_to=wandb")
    assert result.exit_code == 2 and clean_exit(result), result.output
    assert error_lines(result) == [
        "error: config key 'train.report_to': wandb is not installed (pip install wandb), or use tensorboard"
    ]


@pytest.mark.parametrize("option", ["objective.rollout=2", "objective.update=sign", "objective.loss=relative_mse"])
def test_objective_options_change_what_is_trained(photos, tmp_path, reference_field, option):
    result = run_train(photos, tmp_path / "run", "--max-steps", "2", "--set", option)
    assert result.exit_code == 0, result.output
    field = field_tensors(tmp_path / "run")
    assert all(torch.isfinite(w).all() for w in field.values())
    assert differs(field, reference_field), f"{option} left the trained field as it is without it"


def test_momentum_changes_what_is_trained_and_needs_the_squared_error(photos, tmp_path):
    plain = run_train(photos, tmp_path / "plain", "--max-steps", "2", "--set", "objective.loss=relative_mse")
    averaged = run_train(
        photos,
        tmp_path / "momentum",
        "--max-steps",
        "2",
        "--set",
        "objective.loss=relative_mse",
        "--set",
        "objective.momentum=0.9",
    )
    assert plain.exit_code == 0 and averaged.exit_code == 0, averaged.output
    assert differs(field_tensors(tmp_path / "momentum"), field_tensors(tmp_path / "plain"))
    refused = run_train(photos, tmp_path / "refused", "--max-steps", "2", "--set", "objective.momentum=0.9")
    assert refused.exit_code == 2 and "objective.loss=relative_mse" in refused.output


def test_ema_field_is_the_moving_average_not_the_last_weights(photos, tmp_path):
    decay = 0.5
    run = tmp_path / "run"
    result = run_train(
        photos,
        run,
        "--max-steps",
        "2",
        "--checkpoint-every",
        "1",
        "--set",
        "train.checkpoints_limit=0",
        "--set",
        f"train.ema_decay={decay}",
    )
    assert result.exit_code == 0, result.output
    field, _ = load_field(run / "field")
    trained = [name for name, p in field.named_parameters() if p.requires_grad]  # the EMA's order
    saved = field_tensors(run)
    checkpoints = run / "checkpoints"
    raw = {step: load_file(str(checkpoints / f"checkpoint-{step}" / "model.safetensors")) for step in (1, 2)}
    ema = {step: load_file(str(checkpoints / f"checkpoint-{step}" / "ema.safetensors")) for step in (1, 2)}
    assert len(ema[2]) == len(trained)
    moved = [name for name in trained if not torch.equal(raw[1][name], raw[2][name])]
    assert moved, "step 2 changed the raw weights"
    for i, name in enumerate(trained):
        assert torch.equal(saved[name], ema[2][str(i)]), f"the saved field is the EMA copy: {name}"
        expected = decay * ema[1][str(i)] + (1 - decay) * raw[2][name]
        assert torch.allclose(ema[2][str(i)], expected, atol=1e-6), f"EMA update of {name}"
    assert all(not torch.equal(saved[name], raw[2][name]) for name in moved), "the saved field is not the raw weights"


def test_two_accumulated_micro_batches_of_2_make_the_update_of_one_batch_of_4(tmp_path, monkeypatch, one_thread):
    from hyperfields.training import step as training_step

    rng = np.random.default_rng(3)
    crops = tmp_path / "crops"
    crops.mkdir()
    for i in range(4):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(crops / f"c{i}.png")

    # The same conditions and step t either way: images 0-3 in order, t = 3; the inr loss with every pixel has
    # no noise. Only the accumulation differs.
    def draws_in_order(seed, step, process, micro, images, batch, last_t, shards=1):
        return list(range(micro * batch, (micro + 1) * batch)), torch.full((batch,), 3)

    monkeypatch.setattr(training_step, "training_draws", draws_in_order)
    fields = {}
    for batch, accumulation in ((4, 1), (2, 2)):
        output = tmp_path / f"run-{batch}x{accumulation}"
        result = runner.invoke(
            app,
            [
                "train",
                "--config",
                "configs/inr.yaml",
                "--data",
                str(crops),
                "--output",
                str(output),
                "--max-steps",
                "2",
                "--checkpoint-every",
                "1",
                "--set",
                "train.heldout=0",
                "--set",
                "objective.steps=10",
                "--set",
                "objective.end_weight=0",
                "--set",
                "objective.loss=relative_mse",
                "--set",
                "field.width=32",
                "--set",
                "field.depth=1",
                "--set",
                "train.warmup_steps=1",
                "--set",
                f"train.batch_size={batch}",
                "--set",
                f"train.gradient_accumulation={accumulation}",
            ],
        )
        assert result.exit_code == 0, result.output
        fields[accumulation] = field_tensors(output)
    checkpoints = tmp_path / "run-4x1" / "checkpoints"
    first, second = (load_file(str(checkpoints / f"checkpoint-{step}" / "model.safetensors")) for step in (1, 2))
    assert differs(second, first), "the second step moved the field"
    for name, w in fields[1].items():
        assert torch.allclose(w, fields[2][name], atol=1e-5), name


def test_trained_encoder_is_saved_with_the_field(photos, tmp_path):
    result = run_train(
        photos,
        tmp_path / "run",
        "--max-steps",
        "2",
        "--set",
        "model.train_encoder=true",
        "--set",
        "train.learning_rate=0.01",
    )
    assert result.exit_code == 0, result.output
    saved = field_tensors(tmp_path / "run")
    encoder_keys = [k for k in saved if k.startswith("encoder.")]
    assert encoder_keys
    field, _ = load_field(tmp_path / "run" / "field")
    from hyperfields.models import load_encoder

    original, _ = load_encoder("tiny")
    trained = dict(field.encoder.model.named_parameters())
    assert any(not torch.equal(p, trained[name]) for name, p in original.named_parameters())
