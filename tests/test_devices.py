"""`--device` on every command that runs models outside accelerate: auto picks what the machine has; a name that is
not a device, or a device the machine lacks, is one line and exit code 2 before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.devices import resolve_device
from tests.conftest import clean_exit
from tests.tiny_field import TinyField, tiny_field

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TinyField:
    return tiny_field(tmp_path_factory)


def test_auto_is_cuda_then_mps_then_cpu():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def arguments(command: str, trained: TinyField, tmp_path: Path) -> list[str]:
    field = ["--field", str(trained.field), "--image", str(trained.photo)]
    return {
        "generate": [*field, "--prompt", "a photo of sks", "--output", str(tmp_path / "out")],
        "export": [*field, "--output", str(tmp_path / "out" / "x.safetensors")],
        "refine": [*field, "--output", str(tmp_path / "out" / "x.safetensors")],
        "inspect": field,
        "precompute": ["--images", str(trained.photos), "--output", str(tmp_path / "out")],
    }[command]


@pytest.mark.parametrize("command", ["generate", "export", "refine", "inspect", "precompute"])
@pytest.mark.parametrize(
    "device, expected", [("tpu", "unknown device 'tpu'"), ("cuda:99", "'cuda:99' is not available")]
)
def test_a_bad_device_is_one_line_and_exit_code_2(trained, tmp_path, command, device, expected):
    result = runner.invoke(app, [command, *arguments(command, trained, tmp_path), "--device", device])
    assert result.exit_code == 2 and clean_exit(result), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert not (tmp_path / "out").exists()


def test_train_has_no_device_option_accelerate_decides():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--device" not in result.output
