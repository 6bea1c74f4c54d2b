"""The tiny FLUX.1 and SD3.5 pipelines: seeded, loadable by name, and runnable by their diffusers pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hyperfields.errors import UserError
from hyperfields.models import load_transformer_pipeline, pipeline_family, resolve_model_path
from hyperfields.models.tiny import tiny_models_dir

PROMPT = "a photo of sks dog, Zürich"


@pytest.mark.parametrize(
    ("name", "folder", "family"),
    [
        ("tiny", "pipeline", "unet"),
        ("tiny-xl", "pipeline-xl", "unet"),
        ("tiny-flux", "pipeline-flux", "flux"),
        ("tiny-sd3", "pipeline-sd3", "sd3"),
    ],
)
def test_tiny_names_resolve_to_their_folders_and_family(name: str, folder: str, family: str) -> None:
    assert Path(resolve_model_path(name, "pipeline")) == tiny_models_dir() / folder
    assert pipeline_family(name) == family
    assert pipeline_family(str(tiny_models_dir() / folder)) == family


def test_a_folder_that_is_no_pipeline_is_a_user_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        pipeline_family(str(tmp_path))


def test_flux_is_a_dev_like_pipeline_that_generates(one_thread) -> None:
    from diffusers import FluxPipeline

    pipeline = load_transformer_pipeline("tiny-flux")
    assert isinstance(pipeline, FluxPipeline)
    assert pipeline.transformer.config.guidance_embeds  # FLUX.1-dev's distilled guidance
    assert pipeline.vae.config.latent_channels == 16 and pipeline.vae.config.shift_factor is not None
    assert pipeline.scheduler.config.use_dynamic_shifting
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            assert not component.training and not any(p.requires_grad for p in component.parameters())
    # T5 tokenizes without sentencepiece; a prompt of known characters has no unknown token.
    t5 = pipeline.tokenizer_2
    assert t5.unk_token_id not in t5("a photo of sks dog, Zurich").input_ids
    assert t5(PROMPT).input_ids[-1] == t5.eos_token_id
    image = pipeline(PROMPT, height=64, width=64, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_sd3_is_an_sd35_medium_like_pipeline_that_generates(one_thread) -> None:
    from diffusers import StableDiffusion3Pipeline

    pipeline = load_transformer_pipeline("tiny-sd3")
    assert isinstance(pipeline, StableDiffusion3Pipeline)
    config = pipeline.transformer.config
    assert config.qk_norm == "rms_norm" and list(config.dual_attention_layers) == [0]
    assert pipeline.vae.config.latent_channels == 16
    image = pipeline(PROMPT, height=64, width=64, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_dit_pipelines_are_seeded_and_deterministic(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from hyperfields.models.tiny_dit import save_flux_pipeline, save_sd3_pipeline

    for save in (save_flux_pipeline, save_sd3_pipeline):
        first, second, other = tmp_path / f"{save.__name__}-a", tmp_path / f"{save.__name__}-b", tmp_path / "c"
        save(first, 0)
        save(second, 0)
        save(other, 1)
        files = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
        assert len(files) >= 4  # transformer, VAE and the text encoders
        for file in files:
            a, b, c = (load_file(str(root / file)) for root in (first, second, other))
            assert all(torch.equal(a[key], b[key]) for key in a), file
            assert any(not torch.equal(a[key], c[key]) for key in a if a[key].numel() > 1), file
