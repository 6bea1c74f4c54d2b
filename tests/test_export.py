"""`hyperfields export`: diffusers and kohya files diffusers loads with the trained alpha, provenance, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.lora.formats import ADAPTER_METADATA_KEY
from hyperfields.models.tiny import tiny_models_dir
from tests.conftest import clean_exit
from tests.tiny_field import TinyField, tiny_field

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TinyField:
    return tiny_field(tmp_path_factory)


def export(trained: TinyField, out: Path, *extra: str):
    return runner.invoke(app, ["export", "--field", str(trained.field), "--out", str(out), *extra])


def fused_unet_weights(lora_file: Path | None) -> dict[str, torch.Tensor]:
    """Attention weights of a fresh tiny pipeline's UNet after diffusers loads and fuses `lora_file` (None: base)."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models_dir() / "pipeline")
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    return {
        name: p.detach().clone()
        for name, p in pipe.unet.named_parameters()
        if "attn" in name and name.endswith("weight")
    }


def test_our_header_key_is_the_one_diffusers_reads():
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    assert ADAPTER_METADATA_KEY == LORA_ADAPTER_METADATA_KEY


def test_kohya_and_diffusers_files_fuse_to_the_same_weights_with_the_trained_alpha(trained, tmp_path):
    assert (
        export(trained, tmp_path / "d.safetensors", "--image", str(trained.photo), "--format", "diffusers").exit_code
        == 0
    )
    assert (
        export(trained, tmp_path / "k.safetensors", "--image", str(trained.photo), "--format", "kohya").exit_code == 0
    )
    base, from_diffusers, from_kohya = (
        fused_unet_weights(f) for f in (None, tmp_path / "d.safetensors", tmp_path / "k.safetensors")
    )
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as file:
        key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        a, b = (file.get_tensor(f"unet.{key}.lora_{factor}.weight").float() for factor in "AB")
    # alpha 8 at rank 4: diffusers must apply scale 2, not the alpha = r default of 1.
    assert torch.allclose(from_diffusers[f"{key}.weight"] - base[f"{key}.weight"], 2.0 * b @ a, atol=1e-6)
    changed = 0
    for name in base:
        scale = base[name].norm()
        assert (from_kohya[name] - from_diffusers[name]).norm() / scale <= 1e-4, name
        changed += int((from_diffusers[name] - base[name]).norm() / scale > 1e-3)
    assert changed == 48  # every to_q/to_k/to_v/to_out.0 of the 12 attention modules got its LoRA


def test_files_carry_provenance_and_kohya_alpha(trained, tmp_path):
    result = export(
        trained, tmp_path / "k.safetensors", "--image", str(trained.photo), "--format", "kohya", "--step", "3"
    )
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as file:
        header = file.metadata()
        alphas = {float(file.get_tensor(k)) for k in file.keys() if k.endswith(".alpha")}
        keys = set(file.keys())
    # The names sd-scripts writes for SD 1.x: the diffusers UNet module path with dots as underscores.
    kohya = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert {f"{kohya}.lora_down.weight", f"{kohya}.lora_up.weight", f"{kohya}.alpha"} <= keys
    assert all(
        k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys
    )
    assert alphas == {8.0}
    assert header["hyperfields.photo_sha256"] == hashlib.sha256(trained.photo.read_bytes()).hexdigest()
    assert (
        header["hyperfields.step"] == "3"
        and header["hyperfields.base_model"] == "tiny"
        and header["hyperfields.version"]
    )
    export(trained, tmp_path / "d.safetensors", "--image", str(trained.photo))
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as file:
        config = json.loads(file.metadata()[ADAPTER_METADATA_KEY])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8 and len(config["unet.target_modules"]) == 48


def tensor_bytes(path: Path) -> int:
    """The bytes of a safetensors file after its header: the tensors' data alone."""
    with path.open("rb") as file:
        header_length = int.from_bytes(file.read(8), "little")  # the format's 8-byte little-endian header size
    return path.stat().st_size - 8 - header_length


def test_fp16_is_the_default_half_the_size_and_fuses_within_fp16_rounding_of_fp32(trained, tmp_path):
    files = {precision: tmp_path / f"{precision}.safetensors" for precision in ("default", "fp16", "bf16", "fp32")}
    for precision, path in files.items():
        extra = [] if precision == "default" else ["--precision", precision]
        result = export(trained, path, "--image", str(trained.photo), *extra)
        assert result.exit_code == 0, result.output
    with safe_open(str(files["default"]), "pt") as file:
        assert {file.get_tensor(k).dtype for k in file.keys()} == {torch.float16}
    assert tensor_bytes(files["fp16"]) * 2 == tensor_bytes(files["fp32"]) == tensor_bytes(files["bf16"]) * 2
    assert files["fp16"].stat().st_size < 0.7 * files["fp32"].stat().st_size  # the tiny LoRA's header is a third of it
    base = fused_unet_weights(None)
    fused = {precision: fused_unet_weights(files[precision]) for precision in ("fp16", "bf16", "fp32")}
    # fp16 keeps 11 significant bits, bf16 8: each factor is off by at most 2^-11 (2^-8) of itself, their product
    # by about twice that.
    for precision, bound in (("fp16", 2e-3), ("bf16", 1.6e-2)):
        for name in base:
            exact = fused["fp32"][name] - base[name]
            assert (fused[precision][name] - base[name] - exact).norm() <= bound * exact.norm(), (precision, name)


def test_an_fp16_file_gives_the_images_of_the_fp32_file(trained, tmp_path):
    def images(lora_file: Path | None) -> np.ndarray:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_models_dir() / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        if lora_file is not None:
            pipe.load_lora_weights(str(lora_file))
        generator = torch.Generator().manual_seed(0)
        return pipe("a photo of sks", num_inference_steps=4, generator=generator, output_type="np").images

    for precision in ("fp16", "fp32"):
        export(trained, tmp_path / f"{precision}.safetensors", "--image", str(trained.photo), "--precision", precision)
    base, fp16, fp32 = images(None), images(tmp_path / "fp16.safetensors"), images(tmp_path / "fp32.safetensors")
    lora_effect = np.abs(fp32 - base).max()
    assert lora_effect > 1e-3  # the LoRA visibly changes the image, so the comparison below means something
    assert np.abs(fp16 - fp32).max() <= 0.01 * lora_effect


def test_a_folder_of_photos_gives_one_file_per_usable_photo(trained, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(trained.photos, photos)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    result = export(trained, tmp_path / "loras", "--images", str(photos), "--format", "kohya")
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output and "4/4 photos" in result.stderr
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == [f"p{i}.safetensors" for i in range(4)]


def test_a_failed_write_leaves_nothing_behind(trained, tmp_path, monkeypatch):
    import hyperfields.lora.formats as formats

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(formats, "save_file", disk_full)
    result = export(trained, tmp_path / "out" / "d.safetensors", "--image", str(trained.photo))
    assert result.exit_code == 2 and "No space left" in result.output and clean_exit(result)
    assert list((tmp_path / "out").iterdir()) == []


def bad_inputs(trained: TinyField, tmp: Path) -> dict[str, tuple[list[str], str]]:
    corrupt = tmp / "corrupt"
    shutil.copytree(trained.field, corrupt)
    (corrupt / "model.safetensors").write_bytes((corrupt / "model.safetensors").read_bytes()[:100])
    (tmp / "not-a-photo.png").write_text("hello")
    (tmp / "a-file").write_text("x")
    photo = ["--image", str(trained.photo)]
    return {
        "missing field": (["--field", str(tmp / "nope"), *photo], "no such folder"),
        "corrupt field": (["--field", str(corrupt), *photo], "truncated or not safetensors"),
        "unreadable photo": (
            ["--field", str(trained.field), "--image", str(tmp / "not-a-photo.png")],
            "cannot be read as an image",
        ),
        "missing photo": (["--field", str(trained.field), "--image", str(tmp / "gone.png")], "does not exist"),
        "step above T": (["--field", str(trained.field), *photo, "--step", "7"], "outside [0, 6]"),
        "negative step": (["--field", str(trained.field), *photo, "--step", "-1"], "outside [0, 6]"),
        "unwritable output": (
            ["--field", str(trained.field), *photo, "--out", str(tmp / "a-file" / "x.safetensors")],
            "cannot be written",
        ),
        "photo and folder": (
            ["--field", str(trained.field), *photo, "--images", str(trained.photos)],
            "exactly one of",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing field",
        "corrupt field",
        "unreadable photo",
        "missing photo",
        "step above T",
        "negative step",
        "unwritable output",
        "photo and folder",
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(trained, tmp_path, case):
    args, expected = bad_inputs(trained, tmp_path)[case]
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "out" / "x.safetensors")]
    result = runner.invoke(app, ["export", *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert clean_exit(result)
    assert not (tmp_path / "out").exists()
