"""Exported LoRA files say which Stable Diffusion they are for, the way A1111, ComfyUI and LoRA managers read it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from transformers import CLIPTextModel
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.lora.formats import BaseModelFamily
from hyperfields.models.tiny import tiny_models_dir
from tests.conftest import clean_exit
from tests.tiny_field import OVERRIDES, ROOT, TinyField, tiny_field

runner = CliRunner()


def a1111_sd_version(header: dict[str, str]) -> str:
    """The base model A1111 files a LoRA under.

    The rule of AUTOMATIC1111/stable-diffusion-webui, extensions-builtin/Lora/network.py, NetworkOnDisk.detect_version:
    ss_base_model_version starting with "sdxl_" is SDXL, else ss_v2 == "True" is SD 2.x, else any metadata is SD 1.x.
    """
    if str(header.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(header.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if header else "Unknown"


def read_header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return file.metadata()


def export(field: Path, photo: Path, out: Path, *extra: str):
    return runner.invoke(app, ["export", "--field", str(field), "--image", str(photo), "--out", str(out), *extra])


def modelspec(header: dict[str, str]) -> dict[str, str]:
    """The ModelSpec keys that describe the base model and the subject (not the file's own name, date or key names)."""
    own = {"modelspec.title", "modelspec.date", "modelspec.implementation"}
    return {k: v for k, v in header.items() if k.startswith("modelspec.") and k not in own}


# The UNet and scheduler config values that tell the published bases apart (their unet/config.json and
# scheduler/scheduler_config.json on the hub), and what sd-scripts calls each.
PUBLISHED_BASES = {
    "runwayml/stable-diffusion-v1-5": ({"cross_attention_dim": 768}, "epsilon", "sd_v1", "stable-diffusion-v1/lora"),
    "stabilityai/stable-diffusion-2-1-base": (
        {"cross_attention_dim": 1024},
        "epsilon",
        "sd_v2",
        "stable-diffusion-v2-512/lora",
    ),
    "stabilityai/stable-diffusion-2-1": (
        {"cross_attention_dim": 1024},
        "v_prediction",
        "sd_v2_v",
        "stable-diffusion-v2-768-v/lora",
    ),
    "stabilityai/stable-diffusion-xl-base-1.0": (
        {"cross_attention_dim": 2048, "addition_embed_type": "text_time"},
        "epsilon",
        "sdxl_base_v1-0",
        "stable-diffusion-xl-v1-base/lora",
    ),
}


@pytest.mark.parametrize("base", list(PUBLISHED_BASES))
def test_each_published_base_gets_the_version_and_architecture_sd_scripts_writes_for_it(base):
    unet_config, prediction_type, version, architecture = PUBLISHED_BASES[base]
    family = BaseModelFamily.from_configs(unet_config, {"prediction_type": prediction_type})
    assert (family.base_model_version, family.architecture) == (version, architecture)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> TinyField:
    return tiny_field(tmp_path_factory)


def write_tiny_sd2(folder: Path) -> None:
    """The tiny pipeline remade the way SD 2.x 768-v differs from SD 1.x: its UNet reads 1024-wide text embeddings
    (OpenCLIP ViT-H's width, where SD 1.x's CLIP is 768) and its scheduler predicts v."""
    import torch

    tiny = StableDiffusionPipeline.from_pretrained(tiny_models_dir() / "pipeline")
    torch.manual_seed(0)
    text_config = tiny.text_encoder.config
    text_config.hidden_size = 1024
    sd2 = StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tiny.tokenizer,
        unet=UNet2DConditionModel.from_config(tiny.unet.config, cross_attention_dim=1024),
        scheduler=DDPMScheduler.from_config(tiny.scheduler.config, prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd2.save_pretrained(folder)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory) -> TinyField:
    """A tiny field trained for one step on the tiny SD 2.x 768-v pipeline."""
    root = tmp_path_factory.mktemp("sd2")
    write_tiny_sd2(root / "base")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(photos / f"p{i}.png")
    result = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--data",
            str(photos),
            "--output",
            str(root / "run"),
            "--base-model",
            str(root / "base"),
            *OVERRIDES,
        ],
    )
    assert result.exit_code == 0, result.output
    return TinyField(field=root / "run" / "field", photos=photos, photo=photos / "p0.png")


def test_an_sd1_kohya_file_carries_what_sd_scripts_writes_and_a1111_files_it_under_sd1(sd1, tmp_path):
    result = export(sd1.field, sd1.photo, tmp_path / "subject.safetensors", "--format", "kohya")
    assert result.exit_code == 0, result.output
    header = read_header(tmp_path / "subject.safetensors")
    assert a1111_sd_version(header) == "SD1"
    assert header["ss_base_model_version"] == "sd_v1" and header["ss_v2"] == "False"
    assert header["ss_network_module"] == "networks.lora"
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8.0"
    assert header["ss_output_name"] == "subject" and header["modelspec.title"] == "subject"
    assert header["ss_resolution"] == "(64, 64)" and header["modelspec.resolution"] == "64x64"
    assert header["ss_sd_model_name"] == "tiny"
    # The DreamBooth folder sd-scripts would have trained one photo from: "<repeats>_<token>", the token as its tag.
    assert json.loads(header["ss_tag_frequency"]) == {"1_sks": {"sks": 1}}
    assert header["modelspec.sai_model_spec"] == "1.0.0"
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert header["modelspec.implementation"] == "diffusers"  # SD 1.x kohya names are diffusers module paths
    assert header["modelspec.prediction_type"] == "epsilon" and header["modelspec.trigger_phrase"] == "sks"
    assert header["modelspec.date"].startswith("20") and "T" in header["modelspec.date"]
    assert header["hyperfields.base_model"] == "tiny" and header["hyperfields.step"] == "6"
    assert header["hyperfields.version"] and header["hyperfields.photo_sha256"]


def test_the_diffusers_file_carries_the_same_modelspec_keys(sd1, tmp_path):
    assert export(sd1.field, sd1.photo, tmp_path / "k.safetensors", "--format", "kohya").exit_code == 0
    assert export(sd1.field, sd1.photo, tmp_path / "d.safetensors", "--format", "diffusers").exit_code == 0
    kohya, diffusers = read_header(tmp_path / "k.safetensors"), read_header(tmp_path / "d.safetensors")
    assert modelspec(diffusers) == modelspec(kohya) and len(modelspec(diffusers)) == 5
    assert diffusers["modelspec.implementation"] == "diffusers" and diffusers["modelspec.title"] == "d"


def test_an_sd2_768_v_field_gives_files_a1111_files_under_sd2_with_v_prediction(sd2, tmp_path):
    record = json.loads((sd2.field / "config.json").read_text())
    assert record["base_family"] == {"sdxl": False, "v2": True, "v_prediction": True, "transformer": ""}
    assert export(sd2.field, sd2.photo, tmp_path / "k.safetensors", "--format", "kohya").exit_code == 0
    header = read_header(tmp_path / "k.safetensors")
    assert a1111_sd_version(header) == "SD2"
    assert header["ss_base_model_version"] == "sd_v2_v" and header["ss_v2"] == "True"
    assert header["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert header["modelspec.prediction_type"] == "v"
    assert header["ss_sd_model_name"] == "base"  # a local folder by its name, as sd-scripts names it


def test_a_field_whose_record_predates_the_family_reads_it_from_the_base_model(sd2, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(sd2.field, old)
    record = json.loads((old / "config.json").read_text())
    del record["base_family"]
    (old / "config.json").write_text(json.dumps(record))
    assert export(old, sd2.photo, tmp_path / "k.safetensors", "--format", "kohya").exit_code == 0
    assert read_header(tmp_path / "k.safetensors")["ss_base_model_version"] == "sd_v2_v"

    record["base_model"] = str(tmp_path / "moved-away")
    (old / "config.json").write_text(json.dumps(record))
    result = export(old, sd2.photo, tmp_path / "out" / "k.safetensors", "--format", "kohya")
    assert result.exit_code == 2 and clean_exit(result), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "moved-away" in errors[0] and "cannot be read" in errors[0], result.output
    assert not (tmp_path / "out").exists()
