"""An SDXL field's kohya file uses the SGM module names sd-scripts writes, diffusers fuses it like the diffusers file,
and both say they are for SDXL the way A1111 and ComfyUI read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.models import resolve_model_path
from hyperfields.models.tiny import TINY_XL
from tests.test_metadata import a1111_sd_version

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def fused_unet_weights(lora_file: Path | None) -> dict[str, torch.Tensor]:
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_model_path(TINY_XL, "pipeline"))
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return {
        name: p.detach().clone()
        for name, p in pipe.unet.named_parameters()
        if "attn" in name and name.endswith("weight")
    }


def test_sdxl_kohya_export_uses_sgm_names_and_fuses_like_diffusers(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
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
            str(tmp_path / "run"),
            "--base-model",
            TINY_XL,
            "--max-steps",
            "1",
            "--set",
            "train.heldout=0",
            "--set",
            "train.batch_size=2",
            "--set",
            "objective.steps=6",
            "--set",
            "field.width=32",
            "--set",
            "field.depth=1",
            "--set",
            "lora.alpha=8",
            "--set",
            "train.warmup_steps=1",
        ],
    )
    assert result.exit_code == 0, result.output
    files = {}
    for fmt in ("diffusers", "kohya"):
        files[fmt] = tmp_path / f"{fmt}.safetensors"
        exported = runner.invoke(
            app,
            [
                "export",
                "--field",
                str(tmp_path / "run" / "field"),
                "--image",
                str(photos / "p0.png"),
                "--format",
                fmt,
                "--out",
                str(files[fmt]),
            ],
        )
        assert exported.exit_code == 0, exported.output
    with safe_open(str(files["kohya"]), "pt") as file:
        keys = list(file.keys())
        header = file.metadata()
    assert a1111_sd_version(header) == "SDXL"
    assert header["ss_base_model_version"] == "sdxl_base_v1-0" and header["ss_v2"] == "False"
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert header["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"  # SGM names
    with safe_open(str(files["diffusers"]), "pt") as file:
        header = file.metadata()
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert header["modelspec.implementation"] == "diffusers"
    assert keys and all(
        k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for k in keys
    )
    base, from_diffusers, from_kohya = (fused_unet_weights(f) for f in (None, files["diffusers"], files["kohya"]))
    changed = 0
    for name in base:
        scale = base[name].norm()
        assert (from_kohya[name] - from_diffusers[name]).norm() / scale <= 1e-4, name
        changed += int((from_diffusers[name] - base[name]).norm() / scale > 1e-4)
    assert changed > 0 and changed == sum(1 for k in keys if k.endswith(".alpha"))
