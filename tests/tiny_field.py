"""One tiny field trained once per test session (in pytest's base temp folder), for the commands that use a field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from hyperfields.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
# alpha = 8 with rank 4: a loader that assumed alpha = r would give a different image and different fused weights.
OVERRIDES = [
    "--set",
    "train.batch_size=2",
    "--set",
    "objective.steps=6",
    "--set",
    "train.heldout=0",
    "--set",
    "field.width=32",
    "--set",
    "field.depth=1",
    "--set",
    "train.warmup_steps=1",
    "--set",
    "lora.rank=4",
    "--set",
    "lora.alpha=8",
    "--max-steps",
    "1",
]


@dataclass
class TinyField:
    field: Path  # the field folder
    photos: Path  # the folder it was trained on
    photo: Path  # one photo of it


def write_random_photos(folder: Path) -> Path:
    """Four seeded random 48 x 56 photos p0.png ... p3.png in `folder` (made if absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((48, 56, 3)) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def tiny_field(tmp_path_factory) -> TinyField:
    """The shared tiny field, trained for one step on four random photos the first time a test asks for it."""
    root = tmp_path_factory.getbasetemp() / "tiny-field"
    photos = root / "photos"
    trained = TinyField(field=root / "run" / "field", photos=photos, photo=photos / "p0.png")
    if (trained.field / "config.json").is_file():
        return trained
    write_random_photos(photos)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--images",
            str(photos),
            "--output",
            str(root / "run"),
            *OVERRIDES,
        ],
    )
    assert result.exit_code == 0, result.output
    return trained
