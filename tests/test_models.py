"""Tests for hyperfields.models: the seeded tiny models and the loaders that turn names into modules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even if the caller forgot

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hyperfields.errors import UserError
from hyperfields.models import ImageNorm, encoder_width, load_encoder, load_pipeline_components, resolve_model_path
from hyperfields.models.tiny import tiny_models_dir, write_tiny_models


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The tiny models' ops are microseconds of work; with several OpenMP threads on a busy machine
    # the barrier waits dominate and a 2-step generation goes from ~0.4 s to ~9 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    write_tiny_models(directory)
    return directory


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(directory.rglob("*.safetensors")):
        for key, tensor in load_file(str(file)).items():
            found[f"{file.relative_to(directory)}:{key}"] = tensor
    return found


def test_same_seed_writes_identical_weights(tiny: Path, tmp_path: Path) -> None:
    write_tiny_models(tmp_path)
    first, second = _tensors(tiny), _tensors(tmp_path)
    assert first.keys() == second.keys()
    assert any(key.startswith("pipeline/unet") for key in first)
    assert any(key.startswith("encoder") for key in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_rewrite_replaces_folders_and_leaves_no_staging(tiny: Path, tmp_path: Path) -> None:
    write_tiny_models(tmp_path, seed=1)
    write_tiny_models(tmp_path, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "clip",
        "dino",
        "encoder",
        "pipeline",
        "pipeline-flux",
        "pipeline-sd3",
        "pipeline-xl",
    ]
    key = "unet/diffusion_pytorch_model.safetensors"
    assert torch.equal(
        load_file(str(tmp_path / "pipeline" / key))["conv_in.weight"],
        load_file(str(tiny / "pipeline" / key))["conv_in.weight"],
    )


def test_failed_write_leaves_no_half_written_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hyperfields.models.tiny as tiny_factory

    def crash(directory: Path, seed: int) -> None:
        (directory / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as if the run were killed mid-write

    monkeypatch.setattr(tiny_factory, "_save_encoder", crash)
    with pytest.raises(KeyboardInterrupt):
        write_tiny_models(tmp_path)
    # The finished part is in place; the interrupted one is absent, not partial.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline", "pipeline-flux", "pipeline-sd3", "pipeline-xl"]


def test_pipeline_generates_a_finite_64px_image(tiny: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    image = result.images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()


def test_tokenizer_round_trips_any_prompt_without_unknown_tokens(tiny: Path) -> None:
    parts = load_pipeline_components(str(tiny / "pipeline"))
    tokenizer = parts.tokenizer
    prompt = "a photo of sks dog, Zürich"
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    assert len(ids) == 77
    content = tokenizer(prompt).input_ids[1:-1]
    # The unknown token is <|endoftext|>, as in CLIP, so it must not occur inside the prompt.
    assert tokenizer.unk_token_id not in content
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    # CLIP lower-cases and splits punctuation off words; everything else survives.
    assert decoded.replace(" ", "") == prompt.lower().replace(" ", "")


def test_pipeline_components_are_frozen_and_fit_together(tiny: Path) -> None:
    parts = load_pipeline_components(str(tiny / "pipeline"))
    for module in (parts.unet, parts.vae, parts.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert parts.noise_scheduler.config.num_train_timesteps == 1000
    assert parts.noise_scheduler.config.prediction_type == "epsilon"
    ids = parts.tokenizer(["a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = parts.text_encoder(ids).last_hidden_state
        latents = parts.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        noise = parts.unet(latents, torch.tensor([10]), encoder_hidden_states=text).sample
    assert latents.shape == (1, 4, 16, 16)
    assert noise.shape == latents.shape
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    lora_targets = [name for name, _ in parts.unet.named_modules() if name.endswith(targets)]
    assert len(lora_targets) >= 8


def test_encoder_gives_patch_tokens_and_its_normalisation(tiny: Path) -> None:
    model, norm = load_encoder(str(tiny / "encoder"))
    assert norm == ImageNorm(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert encoder_width(model) == 32
    with torch.no_grad():
        hidden = model(pixel_values=torch.randn(2, 3, 32, 32)).last_hidden_state
    assert hidden.shape == (2, 17, 32)


def test_full_clip_model_gives_its_vision_tower_and_crop_size(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4},
        vision_config={
            "hidden_size": 48,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path)
    # Resize to 40 then center-crop to 32: the model sees 32 px.
    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model, norm = load_encoder(str(tmp_path))
    assert encoder_width(model) == 48
    assert norm.size == 32
    assert norm.mean[0] == pytest.approx(0.4815, abs=1e-3)  # CLIP's own statistics, not the 0.5 fallback
    with torch.no_grad():
        hidden = model(pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state
    assert hidden.shape == (1, 17, 48)


def test_missing_base_model_is_a_user_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError) as caught:
        load_pipeline_components(str(missing))
    message = str(caught.value)
    assert str(missing) in message
    assert "\n" not in message


def test_folder_without_unet_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no unet/config.json"):
        load_pipeline_components(str(tmp_path))


def test_missing_encoder_is_a_user_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no-such-encoder"):
        load_encoder(str(tmp_path / "no-such-encoder"))


def test_tiny_resolves_to_a_cache_written_once(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPERFIELDS_CACHE", str(tmp_path))
    pipeline = Path(resolve_model_path("tiny", "pipeline"))
    assert pipeline == tmp_path / "tiny-v5" / "pipeline"
    assert (pipeline / "model_index.json").is_file()
    for kind in ("encoder", "clip", "dino"):
        assert Path(resolve_model_path("tiny", kind)) == tmp_path / "tiny-v5" / kind
    # Only the final folder is left: staging copies are renamed into place or removed.
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-v5"]
    stamp = (pipeline / "model_index.json").stat().st_mtime_ns
    assert tiny_models_dir() == tmp_path / "tiny-v5"
    assert (pipeline / "model_index.json").stat().st_mtime_ns == stamp


def test_other_names_resolve_to_themselves(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path), "pipeline") == str(tmp_path)
    assert resolve_model_path("some-org/some-model", "encoder") == "some-org/some-model"
