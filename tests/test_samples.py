"""Samples while training: grids of the field's images for the held-out photos, on disk and in tensorboard, at
the steps asked for; off without prompts; bad settings refused before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from hyperfields.cli.main import app
from tests.conftest import FAST, clean_exit

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def train(photos: Path, output: Path, *extra: str):
    config = str(ROOT / "configs" / "tiny.yaml")
    return runner.invoke(
        app, ["train", "--config", config, "--images", str(photos), "--output", str(output), *FAST, *extra]
    )


def test_samples_are_written_every_n_steps_and_at_the_end_and_logged(photos: Path, tmp_path: Path) -> None:
    result = train(
        photos,
        tmp_path / "run",
        *("--max-steps", "2", "--set", "train.validation_every=1", "--set", "train.validation_images=2"),
        *("--set", "train.validation_prompts=['a photo of {token}', '{token} on a beach']"),
    )
    assert result.exit_code == 0, result.output
    samples = tmp_path / "run" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-1", "step-2"]
    (grid,) = (samples / "step-2").glob("*.png")  # FAST holds one photo out
    with Image.open(grid) as image:
        assert image.width > 2 * 64 and 2 * 64 < image.height < 3 * 64  # 2 images a row, a row per prompt
    events = EventAccumulator(str(tmp_path / "run" / "logs" / "hyperfields"), size_guidance={"images": 0})
    events.Reload()
    (tag,) = events.Tags()["images"]
    assert [event.step for event in events.Images(tag)] == [1, 2]


def test_no_prompts_no_samples(photos: Path, tmp_path: Path) -> None:
    result = train(photos, tmp_path / "run", "--max-steps", "1", "--set", "train.validation_every=1")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "run" / "samples").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["train.validation_prompts=['a {token} {class}']", "train.validation_every=1"], "only {token} may be used"),
        (["train.validation_prompts=['a photo of {token}']", "train.heldout=0"], "set train.heldout > 0"),
        (["train.validation_images=0"], "must be positive"),
    ],
)
def test_bad_sample_settings_are_one_line_before_training(photos: Path, tmp_path: Path, extra, expected) -> None:
    result = train(photos, tmp_path / "run", *[a for override in extra for a in ("--set", override)])
    assert result.exit_code == 2 and clean_exit(result), result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert not (tmp_path / "run" / "samples").exists()
