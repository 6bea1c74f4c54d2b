"""`hyperfields generate` and field folders: exported files reproduce generate's images; hub folders; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.field.io import load_field, save_field
from hyperfields.field.record import FieldRecord
from hyperfields.generate import cached_lora_file
from hyperfields.models import load_encoder
from hyperfields.models.tiny import tiny_models_dir
from hyperfields.predict import read_photos
from tests.conftest import clean_exit
from tests.tiny_field import TinyField, tiny_field

runner = CliRunner()
PROMPT = "a photo of sks"
SAMPLING = ["--num-inference-steps", "3", "--seed", "7", "--guidance-scale", "5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TinyField:
    return tiny_field(tmp_path_factory)


def generate(trained: TinyField, out: Path, cache: Path, *extra: str, photo: Path | None = None):
    return runner.invoke(
        app,
        [
            "generate",
            "--field",
            str(trained.field),
            "--image",
            str(photo or trained.photo),
            "--prompt",
            PROMPT,
            *SAMPLING,
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            *extra,
        ],
    )


def reference_images(
    lora_file: Path | None, num_images: int = 1, scheduler: str | None = None, options: dict | None = None, **call
) -> np.ndarray:
    """What a user's own fresh tiny pipeline draws for PROMPT with SAMPLING (image i from seed 7 + i), `lora_file`
    loaded (None: base model), with diffusers' `scheduler` class (`options` set) and pipeline arguments `call`."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models_dir() / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **(options or {}))
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
    return pipe(
        PROMPT,
        num_images_per_prompt=num_images,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(7 + i) for i in range(num_images)],
        output_type="np",
        **call,
    ).images


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255


def test_an_exported_diffusers_file_reproduces_the_generated_image(trained, tmp_path):
    result = generate(trained, tmp_path / "images", tmp_path / "cache", "--prompt", "sks on a beach")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == ["contact_sheet.png", "generation.json", "prompt00_image00.png", "prompt01_image00.png"]
    assert Image.open(tmp_path / "images" / "contact_sheet.png").size == (64, 2 * 64 + 2)  # a row per prompt, 2 px gap
    assert json.loads((tmp_path / "images" / "generation.json").read_text())["prompts"] == [PROMPT, "sks on a beach"]

    assert (
        runner.invoke(
            app,
            [
                "export",
                "--field",
                str(trained.field),
                "--image",
                str(trained.photo),
                "--out",
                str(tmp_path / "lora.safetensors"),
            ],
        ).exit_code
        == 0
    )
    generated = png(tmp_path / "images" / "prompt00_image00.png")
    assert np.abs(reference_images(tmp_path / "lora.safetensors")[0] - generated).max() <= 1 / 255
    assert np.abs(reference_images(None)[0] - generated).max() > 2 / 255, "the LoRA must change the image"


def test_strength_zero_is_the_base_model(trained, tmp_path):
    assert (
        generate(trained, tmp_path / "base", tmp_path / "cache", "--strength", "0", "--num-images", "2").exit_code == 0
    )
    for i, expected in enumerate(reference_images(None, num_images=2)):
        assert np.abs(expected - png(tmp_path / "base" / f"prompt00_image{i:02d}.png")).max() <= 1 / 255


def test_predicted_loras_are_cached_per_field_photo_and_step(trained, tmp_path):
    field, record = load_field(trained.field)
    photo = read_photos([trained.photo], 64)
    first = cached_lora_file(field, record, photo, 6.0, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cached_lora_file(field, record, photo, 6.0, tmp_path) == first and first.stat().st_mtime_ns == stamp
    other_step = cached_lora_file(field, record, photo, 3.0, tmp_path)
    other_photo = cached_lora_file(field, record, read_photos([trained.photos / "p1.png"], 64), 6.0, tmp_path)
    with torch.no_grad():
        next(iter(field.heads.values())).bias.add_(1.0)  # a retrained field
    retrained = cached_lora_file(field, record, photo, 6.0, tmp_path)
    assert len({first, other_step, other_photo, retrained}) == 4
    assert sorted(tmp_path.iterdir()) == sorted([first, other_step, other_photo, retrained])


def test_field_folders_round_trip_through_save_field(trained, tmp_path):
    field, record = load_field(trained.field)
    save_field(field, tmp_path / "copy", record)
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "hyperfields" in (tmp_path / "copy" / "README.md").read_text()
    copy, copied = load_field(tmp_path / "copy")
    assert copied == record
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    first, second = field(t=6, images=images), copy(t=6, images=images)
    assert all(torch.equal(first[name], second[name]) for name in first)
    # The frozen encoder is not in the folder: it must come back as the pretrained model, not freshly initialised.
    pretrained, _ = load_encoder("tiny")
    for name, value in pretrained.state_dict().items():
        assert torch.equal(copy.encoder.model.state_dict()[name], value), name


# The keys of a LoRA field's config.json, as field folders have them (older ones lack base_family and still load).
RECORD_KEYS = {
    "format",
    "format_version",
    "base_model",
    "encoder",
    "train_encoder",
    "layout",
    "task",
    "targets",
    "sdxl_layers_per_block",
    "rank",
    "alpha",
    "init_seed",
    "steps",
    "step_size",
    "update",
    "resolution",
    "caption_template",
    "token",
    "field",
    "trained_steps",
    "heldout_recovered",
    "config",
    "versions",
    "base_family",
}


def test_a_lora_field_record_keeps_its_keys_and_reads_back_unchanged(trained):
    values = json.loads((trained.field / "config.json").read_text())
    assert set(values) == RECORD_KEYS
    record = FieldRecord.from_json(values, "config.json")
    assert record.to_json() == values and record.task_settings["alpha"] == 8 and record.resolution == 64
    del values["task"]  # the oldest folders, from before there were other tasks, predict LoRAs
    assert FieldRecord.from_json(values, "config.json").task == "lora"


def test_a_field_folder_from_before_spatial_rank_loads_with_the_mean_condition_alone(trained, tmp_path):
    # Fields written before field.spatial_rank existed have neither the setting nor its tensors.
    old = tmp_path / "old"
    shutil.copytree(trained.field, old)
    record = json.loads((old / "config.json").read_text())
    assert record["field"].pop("spatial_rank") > 0
    (old / "config.json").write_text(json.dumps(record))
    state = load_file(old / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("spatial_")}, old / "model.safetensors")
    field, _ = load_field(old)
    assert field.spatial_rank == 0
    kept = field.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in state.items() if not k.startswith("spatial_"))


def other_base_model(folder: Path) -> Path:
    """A copy of the tiny pipeline whose UNet cross-attends to 16-wide text: every attn2.to_k/to_v has another shape."""
    shutil.copytree(tiny_models_dir() / "pipeline", folder)
    config = UNet2DConditionModel.load_config(folder / "unet")
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel.from_config({**config, "cross_attention_dim": 16}).save_pretrained(folder / "unet")
    return folder


@pytest.mark.parametrize(
    "case",
    [
        "another base model",
        "step and strength",
        "strength above 1",
        "step above T",
        "height not a multiple of 8",
        "unreadable photo",
        "unwritable output",
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(trained, tmp_path, case):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not-a-photo.png").write_text("hello")
    extra, out, expected = {
        "another base model": (["--base-model", str(tmp_path / "other")], tmp_path / "out", "does not fit base model"),
        "step and strength": (["--step", "2", "--strength", "0.5"], tmp_path / "out", "not both"),
        "strength above 1": (["--strength", "1.5"], tmp_path / "out", "outside [0, 1]"),
        "step above T": (["--step", "7"], tmp_path / "out", "outside [0, 6]"),
        "height not a multiple of 8": (["--height", "60"], tmp_path / "out", "image height 60 pixels"),
        "unreadable photo": ([], tmp_path / "out", "cannot be read as an image"),
        "unwritable output": ([], tmp_path / "a-file" / "out", "cannot be written"),
    }[case]
    if case == "another base model":
        other_base_model(tmp_path / "other")
    photo = tmp_path / "not-a-photo.png" if case == "unreadable photo" else None
    result = generate(trained, out, tmp_path / "cache", *extra, photo=photo)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and clean_exit(result)
    if case == "another base model":
        assert "attn2.to_k" in errors[0] and "'tiny'" in errors[0]
        assert not any(out.glob("*.png"))
    else:  # caught before the output folder is made
        assert not (tmp_path / "out").exists()
