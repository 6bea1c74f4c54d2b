"""`train` and `export` on the tiny FLUX.1 and SD3.5 bases: the diffusers file loads into the family's pipeline with
every key, and its fused weights are the field's prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.field.io import load_field
from hyperfields.models import resolve_model_path
from hyperfields.predict import predict_lora, read_photos
from tests.conftest import clean_exit
from tests.tiny_field import OVERRIDES, ROOT, write_random_photos

runner = CliRunner()
ARCHITECTURES = {"tiny-flux": "flux-1-dev/lora", "tiny-sd3": "stable-diffusion-3-5-medium/lora"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_random_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def trained(request, photos, tmp_path_factory) -> tuple[str, Path]:
    """(base model, field folder) of a field trained for two steps on the tiny base."""
    output = tmp_path_factory.mktemp(request.param) / "run"
    overrides = [*OVERRIDES[:-1], "2", "--set", "train.heldout=1", "--set", "train.eval_draws=2"]
    result = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--images",
            str(photos),
            "--output",
            str(output),
            "--set",
            f"model.base_model={request.param}",
            *overrides,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "recovered fraction R" in result.output
    return request.param, output / "field"


def export(field: Path, photo: Path, out: Path, *extra: str):
    return runner.invoke(
        app, ["export", "--field", str(field), "--image", str(photo), "--output", str(out), "--device", "cpu", *extra]
    )


def linear_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach().clone()
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def test_the_record_names_the_transformer_and_its_family(trained):
    base_model, field = trained
    record = json.loads((field / "config.json").read_text())
    assert record["base_model"] == base_model and record["component"] == "transformer"
    assert f"{record['base_family']['transformer']}/lora" == ARCHITECTURES[base_model]
    assert all(".attn." in target for target in record["targets"])


def test_diffusers_file_loads_into_the_pipeline_and_fuses_to_the_prediction(trained, photos, tmp_path, one_thread):
    from diffusers import DiffusionPipeline

    base_model, field = trained
    out = tmp_path / "lora.safetensors"
    result = export(field, photos / "p0.png", out, "--precision", "fp32")
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as file:
        keys, header = list(file.keys()), file.metadata()
    assert keys and all(key.startswith("transformer.") for key in keys)
    assert header["modelspec.architecture"] == ARCHITECTURES[base_model]

    loaded, record = load_field(field)
    lora = predict_lora(loaded, record, read_photos([photos / "p0.png"], record.resolution), float(record.steps))
    pipeline = DiffusionPipeline.from_pretrained(resolve_model_path(base_model, "pipeline"))
    base = linear_weights(pipeline.transformer)
    pipeline.load_lora_weights(str(out))
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    fused = linear_weights(pipeline.transformer)
    assert fused.keys() == base.keys()
    for name in base:
        delta = fused[name] - base[name]
        if name in lora.targets:
            expected = lora.delta(name)  # alpha / r * B @ A, with the trained alpha (8 at rank 4)
            assert expected.norm() > 0, name
            assert (delta - expected).norm() <= 1e-4 * expected.norm(), name
        else:
            assert not delta.any(), name


def test_kohya_is_the_original_flux_layout_and_a_one_line_error_for_sd3(trained, photos, tmp_path):
    from safetensors.torch import load_file

    from hyperfields.lora.flux_layout import original_name

    base_model, field = trained
    out = tmp_path / "k.safetensors"
    result = export(field, photos / "p0.png", out, "--format", "kohya", "--precision", "fp32")
    if base_model == "tiny-sd3":
        assert result.exit_code == 2 and clean_exit(result)
        assert "kohya files are written for UNet and FLUX.1 LoRAs" in result.output
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    tensors = load_file(str(out))
    loaded, record = load_field(field)
    lora = predict_lora(loaded, record, read_photos([photos / "p0.png"], record.resolution), float(record.steps))
    # Each fused layer's update, row block by row block, is the update of the diffusers module it holds.
    for target in lora.targets:
        layer, part = original_name(target)
        name = "lora_unet_" + layer.replace(".", "_")
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        update = float(tensors[f"{name}.alpha"]) / down.shape[0] * up @ down
        width = lora.delta(target).shape[0]
        rows = update if part is None else update[part * width : (part + 1) * width]
        assert (rows - lora.delta(target)).norm() <= 1e-5 * lora.delta(target).norm(), target
    single = tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert not single[3 * 16 :].any()  # the MLP input rows of linear1 (4 x 16) get no update
    with safe_open(str(out), "pt") as file:
        header = file.metadata()
    assert header["ss_base_model_version"] == "flux1" and header["ss_network_module"] == "networks.lora_flux"
    assert header["modelspec.architecture"] == "flux-1-dev/lora"


def test_generate_draws_what_the_exported_file_draws_in_the_familys_pipeline(trained, photos, tmp_path, one_thread):
    from diffusers import DiffusionPipeline

    base_model, field = trained
    # A field two steps into training predicts a small LoRA: at weight 8 it visibly changes the image.
    sampling = [*("--num-inference-steps", "3", "--seed", "7", "--guidance-scale", "3.5", "--lora-scale", "8")]
    sampling += ["--height", "64", "--width", "64"]
    result = runner.invoke(
        app,
        [
            "generate",
            *("--field", str(field), "--image", str(photos / "p0.png"), "--prompt", "a photo of sks"),
            *sampling,
            *("--out", str(tmp_path / "images"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"),
        ],
    )
    assert result.exit_code == 0, result.output
    generated = np.asarray(Image.open(tmp_path / "images" / "prompt00_image00.png").convert("RGB"), np.float32) / 255
    assert export(field, photos / "p0.png", tmp_path / "lora.safetensors").exit_code == 0

    def reference(lora_file: Path | None) -> np.ndarray:
        """What a user's own fresh pipeline draws with the same settings, `lora_file` loaded (None: the base)."""
        pipeline = DiffusionPipeline.from_pretrained(resolve_model_path(base_model, "pipeline"))
        pipeline.set_progress_bar_config(disable=True)
        if lora_file is not None:
            pipeline.load_lora_weights(str(lora_file), adapter_name="subject")
            pipeline.set_adapters(["subject"], adapter_weights=[8.0])
        return pipeline(
            "a photo of sks",
            num_inference_steps=3,
            guidance_scale=3.5,
            height=64,
            width=64,
            generator=[torch.Generator().manual_seed(7)],
            output_type="np",
        ).images[0]

    assert np.abs(reference(tmp_path / "lora.safetensors") - generated).max() <= 1 / 255
    assert np.abs(reference(None) - generated).max() > 2 / 255, "the LoRA must change the image"


def test_a_unet_sampler_is_a_one_line_error_on_a_transformer_base(trained, photos, tmp_path):
    _, field = trained
    result = runner.invoke(
        app,
        [
            "generate",
            *("--field", str(field), "--image", str(photos / "p0.png"), "--prompt", "a photo of sks"),
            *("--scheduler", "ddim", "--out", str(tmp_path / "images"), "--device", "cpu"),
        ],
    )
    assert result.exit_code == 2 and clean_exit(result)
    assert "scheduler 'ddim' is for UNet bases" in result.output


def test_refine_and_inspect_run_on_the_transformer(trained, photos, tmp_path):
    base_model, field = trained
    out = tmp_path / "refined.safetensors"
    result = runner.invoke(
        app,
        [
            "refine",
            *("--field", str(field), "--image", str(photos / "p0.png"), "--steps", "2", "--output", str(out)),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "-> refined" in result.output
    with safe_open(str(out), "pt") as file:
        assert all(key.startswith("transformer.") for key in file.keys())
    result = runner.invoke(app, ["inspect", "--field", str(field), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "attn.to_q" in result.output


def test_a_transformer_field_on_a_unet_base_is_a_one_line_error(trained, photos, tmp_path):
    base_model, field = trained
    photo = str(photos / "p0.png")
    for command in (
        ["refine", "--steps", "1", "--output", str(tmp_path / "r.safetensors"), "--image", photo],
        ["inspect"],
        ["generate", "--prompt", "sks", "--out", str(tmp_path / "images"), "--image", photo],
    ):
        result = runner.invoke(app, [*command, "--field", str(field), "--base-model", "tiny", "--device", "cpu"])
        assert result.exit_code == 2 and clean_exit(result), command
        assert f"trained for base model '{base_model}', a LoRA of its transformer, and does not fit" in result.output


@pytest.mark.parametrize("base_model", sorted(ARCHITECTURES))
def test_training_samples_and_evaluate_every_arm(base_model, photos, tmp_path):
    output = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            *("--config", str(ROOT / "configs" / "tiny.yaml"), "--images", str(photos), "--output", str(output)),
            *("--set", f"model.base_model={base_model}", *OVERRIDES[:-1], "1", "--set", "train.heldout=1"),
            *("--set", "train.validation_prompts=['a photo of {token}']", "--set", "train.validation_images=1"),
        ],
    )
    assert result.exit_code == 0, result.output
    (grid,) = (output / "samples" / "step-1").glob("*.png")
    assert Image.open(grid).width > 0
    subjects = tmp_path / "subjects"
    subjects.mkdir()
    (subjects / "p0.png").write_bytes((photos / "p0.png").read_bytes())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token} {class}\n{token} {class} on a beach\n", encoding="utf-8")
    evaluation = tmp_path / "e"
    result = runner.invoke(
        app,
        [
            *("evaluate", "--field", str(output / "field"), "--images", str(subjects), "--output", str(evaluation)),
            *("--prompts", str(prompts), "--class-noun", "dog", "--arms", "base,field,refine,optimise,dreambooth"),
            *("--step", "0", "--refine-updates", "2", "--dreambooth-steps", "2", "--dreambooth-lr", "1e-2"),
            *(
                "--num-images",
                "1",
                "--num-inference-steps",
                "2",
                "--guidance-scale",
                "3.5",
                "--height",
                "64",
                "--width",
                "64",
            ),
            *("--dino-model", "tiny", "--clip-model", "tiny", "--face-model", "tiny", "--device", "cpu"),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((evaluation / "metrics.json").read_text(encoding="utf-8"))
    labels = ["base", "field", "field t=0", "refine", "optimise", "dreambooth"]
    assert list(metrics["arms"]) == labels and all(f"| {label} |" in result.stdout for label in labels)
    assert metrics["base_model"] == base_model
    assert metrics["sampling"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    for row in metrics["arms"].values():
        assert row["images"] == 2  # one photo x two prompts x one image
        for score in ("dino", "clip_i", "clip_t", "face"):
            assert -1.0 <= row[score]["mean"] <= 1.0
    assert (evaluation / "metrics.md").is_file() and (evaluation / "sheets" / "000-p0.png").is_file()

    def pixels(label: str) -> list[np.ndarray]:
        paths = [image["path"] for image in metrics["images"] if image["label"] == label]
        return [np.asarray(Image.open(evaluation / path)) for path in paths]

    base = pixels("base")
    assert all(image.shape == (64, 64, 3) for image in base)
    assert all(np.array_equal(a, b) for a, b in zip(base, pixels("field t=0")))  # Psi(c, 0) = theta_0: B = 0
    for label in ("optimise", "dreambooth"):
        assert not all(np.array_equal(a, b) for a, b in zip(base, pixels(label))), label
