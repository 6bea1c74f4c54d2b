"""`hyperfields refine` lowers the task loss of the prediction; `--rank` via SVD; `hyperfields inspect`."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.config import LoraConfig
from hyperfields.field.io import load_field
from hyperfields.inspection import inspect_lora_field
from hyperfields.lora.formats import LoraWeights
from hyperfields.lora.rank import with_rank
from hyperfields.models import load_pipeline_components
from hyperfields.predict import read_photo
from hyperfields.tasks.lora_diffusion import LoraDiffusionTask
from tests.conftest import clean_exit
from tests.tiny_field import TinyField, tiny_field

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TinyField:
    return tiny_field(tmp_path_factory)


def task_loss(trained: TinyField, lora_file, draws: int = 32) -> float:
    """The per-subject task loss of a diffusers LoRA file on the field's photo, on fixed draws this test chooses."""
    tensors = {
        key.removeprefix("unet.").removesuffix(".weight"): value for key, value in load_file(str(lora_file)).items()
    }
    rank = next(value for key, value in tensors.items() if key.endswith("lora_A")).shape[0]
    targets = sorted({key.rsplit(".", 1)[0] for key in tensors})
    # Every file here keeps scale alpha / r = 2 (the field's 8 / 4), so one task scores them all.
    task = LoraDiffusionTask(load_pipeline_components("tiny"), LoraConfig(targets=targets, rank=rank, alpha=2.0 * rank))
    inputs = task.prepare(read_photo(trained.photo, 64).pixels.unsqueeze(0), ["a photo of sks"])
    with torch.no_grad():
        loss = task.loss(
            {k: v.unsqueeze(0) for k, v in tensors.items()}, inputs, draws, torch.Generator().manual_seed(1234)
        )
    return float(loss.mean())


def test_refine_lowers_the_task_loss_of_the_prediction(trained, tmp_path):
    field, photo = str(trained.field), str(trained.photo)
    assert (
        runner.invoke(
            app, ["export", "--field", field, "--image", photo, "--out", str(tmp_path / "predicted.safetensors")]
        ).exit_code
        == 0
    )
    result = runner.invoke(
        app,
        ["refine", "--field", field, "--image", photo, "--steps", "10", "--out", str(tmp_path / "refined.safetensors")],
    )
    assert result.exit_code == 0, result.output
    assert "predicted" in result.output and "refined" in result.output
    assert task_loss(trained, tmp_path / "refined.safetensors") < task_loss(trained, tmp_path / "predicted.safetensors")


def test_refine_at_another_rank_writes_that_rank(trained, tmp_path):
    result = runner.invoke(
        app,
        [
            "refine",
            "--field",
            str(trained.field),
            "--image",
            str(trained.photo),
            "--steps",
            "2",
            "--rank",
            "6",
            "--format",
            "kohya",
            "--out",
            str(tmp_path / "r6.safetensors"),
        ],
    )
    assert result.exit_code == 0, result.output
    tensors = load_file(str(tmp_path / "r6.safetensors"))
    downs = [v for k, v in tensors.items() if k.endswith("lora_down.weight")]
    assert len(downs) == 48 and all(v.shape[0] == 6 for v in downs)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {12.0}  # scale 2 kept: alpha = 2 * 6


def header(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return file.metadata()


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_a_refined_file_says_which_base_model_it_is_for_as_an_exported_one(trained, tmp_path, format):
    common = ["--field", str(trained.field), "--image", str(trained.photo), "--format", format]
    exported, refined = tmp_path / "exported.safetensors", tmp_path / "refined.safetensors"
    assert runner.invoke(app, ["export", *common, "--output", str(exported)]).exit_code == 0
    assert runner.invoke(app, ["refine", *common, "--updates", "1", "--output", str(refined)]).exit_code == 0
    exported, refined = header(exported), header(refined)
    assert set(exported) <= set(refined) and refined["hyperfields.refine_steps"] == "1"
    naming = {"modelspec.date", "modelspec.title", "ss_output_name"}  # when and under which file name
    family = [key for key in exported if key.startswith(("ss_", "modelspec.")) and key not in naming]
    assert {key: refined[key] for key in family} == {key: exported[key] for key in family}
    if format == "kohya":
        assert refined["ss_base_model_version"] == "sd_v1" and refined["ss_output_name"] == "refined"
    assert refined["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_with_rank_is_exact_above_the_rank_and_the_best_fit_below():
    g = torch.Generator().manual_seed(0)
    lora = LoraWeights(
        {"m.lora_A": torch.randn(4, 24, generator=g), "m.lora_B": torch.randn(16, 4, generator=g)}, alpha=8.0
    )
    wider = with_rank(lora, 7)
    assert wider.tensors["m.lora_A"].shape == (7, 24) and wider.scale == lora.scale
    assert torch.allclose(wider.delta("m"), lora.delta("m"), atol=1e-5)
    assert torch.count_nonzero(wider.tensors["m.lora_B"][:, 4:].abs() > 1e-5) == 0  # new directions start at B = 0
    narrower = with_rank(lora, 2)
    singular = torch.linalg.svdvals(lora.delta("m"))
    assert torch.isclose((narrower.delta("m") - lora.delta("m")).norm(), singular[2:].norm(), rtol=1e-4)


def test_inspect_reports_every_target_with_zero_update_at_t0(trained):
    result = runner.invoke(app, ["inspect", "--field", str(trained.field), "--image", str(trained.photo)])
    assert result.exit_code == 0, result.output
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in result.output and "hyperfan" in result.output
    field, record = load_field(trained.field)
    unet = load_pipeline_components("tiny").unet
    reports = inspect_lora_field(field, record, unet, read_photo(trained.photo, 64).pixels.unsqueeze(0))
    assert len(reports) == 48
    for report in reports:
        assert report.relative_update[0.0] == 0.0 < report.relative_update[3.0] < report.relative_update[6.0]
        # One training step leaves the hyperfan init in place: generated stds near their targets.
        assert 0.5 < report.std_a / report.hyperfan_a < 2 and 0.5 < report.std_b / report.hyperfan_b < 2, report.target


@pytest.mark.parametrize("case", ["missing base model", "unreadable photo", "out is a folder"])
def test_refine_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, case):
    (tmp_path / "not-a-photo.png").write_text("hello")
    (tmp_path / "folder").mkdir()
    photo, out, extra, expected = {
        "missing base model": (
            trained.photo,
            tmp_path / "new" / "x.safetensors",
            ["--base-model", str(tmp_path / "missing")],
            "error: base model",
        ),
        "unreadable photo": (tmp_path / "not-a-photo.png", tmp_path / "new" / "x.safetensors", [], "error: photo"),
        "out is a folder": (trained.photo, tmp_path / "folder", [], "error: --out"),
    }[case]
    result = runner.invoke(
        app, ["refine", "--field", str(trained.field), "--image", str(photo), *extra, "--out", str(out)]
    )
    assert result.exit_code == 2 and clean_exit(result)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), result.output
    assert not any((tmp_path / "new").glob("*")) and not any((tmp_path / "folder").iterdir())
    if case != "missing base model":  # caught before the output folder is made
        assert not (tmp_path / "new").exists()
