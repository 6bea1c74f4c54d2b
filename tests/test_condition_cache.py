"""train.cache: the same field with no cache, the memory cache and the disk cache; disk entries reused, never stale."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from hyperfields import data
from hyperfields.cli.main import app
from hyperfields.config import Config, load_config
from hyperfields.data import ImageRecord
from hyperfields.tasks.lora_diffusion import DiffusionInputs, LoraDiffusionTask
from hyperfields.training.cache import ConditionCache, DiskRows, condition_identity

runner = CliRunner()
FAST = [
    "train.batch_size=2",
    "objective.steps=6",
    "train.heldout=0",
    "field.width=32",
    "field.depth=1",
    "train.warmup_steps=1",
    "train.checkpoint_every=0",
    "train.max_steps=3",
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def invoke(command: str, photos: Path, output: Path, *settings: str):
    options = [a for s in (*FAST, *settings) for a in ("--set", s)]
    return runner.invoke(
        app,
        [*command.split(), "--config", "configs/tiny.yaml", "--data", str(photos), "--output", str(output), *options],
    )


def field_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "field" / "model.safetensors"))


def test_no_cache_memory_cache_and_disk_cache_train_the_same_field(photos, tmp_path, one_thread):
    fields = train_three_ways(photos, tmp_path)
    assert 0 < len(list((tmp_path / "disk" / "cache").rglob("*.safetensors"))) <= 5  # one per image drawn
    for kind in ("memory", "disk"):
        for name, tensor in fields["none"].items():
            torch.testing.assert_close(fields[kind][name], tensor, rtol=0, atol=1e-6, msg=f"{kind}: {name}")


def train_three_ways(photos: Path, tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    fields = {}
    arms = (("none", "train.cache=none"), ("memory", "train.cache_latents=true"), ("disk", "train.cache=disk"))
    for kind, setting in arms:
        result = invoke("train", photos, tmp_path / kind, setting)
        assert result.exit_code == 0, result.output
        fields[kind] = field_weights(tmp_path / kind)
        if kind == "memory":  # the old key still works, with one note
            assert "train.cache_latents is deprecated" in result.output
    return fields


def test_cache_build_fills_the_cache_that_training_then_only_reads(photos, tmp_path, monkeypatch):
    result = invoke("cache build", photos, tmp_path / "run", "train.cache_dir=" + str(tmp_path / "shared"))
    assert result.exit_code == 0, result.output
    assert "all 5 training images" in result.output and "5/5 images of this process" in result.stderr
    entries = sorted((tmp_path / "shared").rglob("*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in entries]
    assert len(entries) == 5

    def no_encoding(self, images, captions):
        raise AssertionError("a cached condition was computed again")

    def no_decoding(path):
        raise AssertionError(f"{path} was decoded again")

    monkeypatch.setattr(LoraDiffusionTask, "prepare", no_encoding)
    monkeypatch.setattr(data, "check_image", no_decoding)  # the build's scan manifest is in the run folder
    result = invoke("train", photos, tmp_path / "run", "train.cache=disk", f"train.cache_dir={tmp_path / 'shared'}")
    assert result.exit_code == 0, result.output
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "shared").rglob("*.safetensors"))] == stamps


def test_cache_latents_with_cache_disk_is_a_one_line_error(photos, tmp_path):
    result = invoke("train", photos, tmp_path / "run", "train.cache_latents=true", "train.cache=disk")
    assert result.exit_code == 2 and "train.cache_latents" in result.output and "Traceback" not in result.output


def rows_of(records: list[ImageRecord], calls: list[list[int]]):
    def compute(indices: list[int]) -> tuple[dict[str, torch.Tensor], DiffusionInputs]:
        calls.append(indices)
        values = torch.tensor([float(len(records[i].caption)) for i in indices])
        return (
            {"encoder_tokens": values.view(-1, 1, 1).expand(-1, 2, 3).clone()},
            DiffusionInputs(latents=values.view(-1, 1, 1, 1) * 2, text_embeddings=values.view(-1, 1, 1) + 1),
        )

    return compute


def test_disk_entries_are_reused_across_caches_and_never_for_another_model(photos, tmp_path):
    records = [ImageRecord(photos / f"p{i}.png", "a photo of sks" + "!" * i) for i in range(3)]
    identity = condition_identity(Config())
    calls: list[list[int]] = []
    first = ConditionCache(rows_of(records, calls), torch.device("cpu"), DiskRows(tmp_path, records, identity))
    field_inputs, inputs = first.get([2, 0, 2])
    assert calls == [[0, 2]]
    assert inputs.pooled_text_embeddings is None and inputs.latents.shape == (3, 1, 1, 1)
    torch.testing.assert_close(inputs.text_embeddings.flatten(), torch.tensor([17.0, 15.0, 17.0]))

    again = ConditionCache(rows_of(records, calls), torch.device("cpu"), DiskRows(tmp_path, records, identity))
    reread, reread_inputs = again.get([2, 0, 2])
    assert calls == [[0, 2]]  # a later run computes nothing it finds on disk
    torch.testing.assert_close(reread["encoder_tokens"], field_inputs["encoder_tokens"])
    assert dataclasses.asdict(reread_inputs).keys() == dataclasses.asdict(inputs).keys()

    other_model = condition_identity(load_config(None, ["model.resolution=128"]))
    other_caption = [dataclasses.replace(records[0], caption="another caption"), *records[1:]]
    for changed_records, changed_identity in ((records, other_model), (other_caption, identity)):
        ConditionCache(
            rows_of(changed_records, calls), torch.device("cpu"), DiskRows(tmp_path, changed_records, changed_identity)
        ).get([0])
    assert calls == [[0, 2], [0], [0]]


@pytest.mark.parametrize("key", ["base_model=other", "encoder=other", "resolution=32", "task=inr"])
def test_every_frozen_model_setting_changes_the_identity(key):
    assert condition_identity(load_config(None, [f"model.{key}"])) != condition_identity(Config())
    assert condition_identity(load_config(None, ["train.frozen_dtype=bf16"])) != condition_identity(Config())


def test_a_damaged_entry_is_computed_again(photos, tmp_path):
    records = [ImageRecord(photos / "p0.png", "a photo of sks")]
    calls: list[list[int]] = []
    rows = DiskRows(tmp_path, records, condition_identity(Config()))
    expected = ConditionCache(rows_of(records, calls), torch.device("cpu"), rows).get([0])
    entry = rows.path(0)
    entry.write_bytes(entry.read_bytes()[:40])
    _, inputs = ConditionCache(rows_of(records, calls), torch.device("cpu"), rows).get([0])
    assert calls == [[0], [0]]
    torch.testing.assert_close(inputs.latents, expected[1].latents)
    assert len(load_file(str(entry))) == 3  # replaced by a complete entry


@pytest.mark.slow
def test_cache_build_under_torchrun_splits_the_images_across_processes(photos, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(29500 + (os.getpid() + 7) % 1000),
        "-m",
        "hyperfields",
        "cache",
        "build",
        "--config",
        "configs/tiny.yaml",
        "--data",
        str(photos),
        "--output",
        str(tmp_path / "run"),
        "--batch-size",
        "2",
        *[a for s in FAST for a in ("--set", s)],
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3/3 images of this process" in result.stderr  # rank 0's share: images 0, 2 and 4 of 5
    assert result.stderr.count("images of this process") == 1  # one bar, from the process that reports
    assert result.stdout.count("holds the conditions of all 5 training images (built by 2 process(es))") == 1
    assert len(list((tmp_path / "run" / "cache").rglob("*.safetensors"))) == 5


def test_with_a_condition_cache_decoded_pixels_are_not_kept(photos, tmp_path):
    from hyperfields.dataset import ImageCaptionDataset
    from hyperfields.errors import UserError

    photo = tmp_path / "photo.png"
    photo.write_bytes((photos / "p0.png").read_bytes())
    dataset = ImageCaptionDataset([ImageRecord(photo, "a photo of sks")], 16, keep_decoded=False)
    assert dataset[0]["pixel_values"].shape == (3, 16, 16)
    photo.unlink()
    with pytest.raises(UserError, match="photo.png"):
        dataset[0]  # decoded again, so memory does not grow with the folder
