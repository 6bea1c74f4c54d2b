"""The FLUX.1-dev and SD 3.5 Medium presets on the real architectures (built on the meta device, nothing
downloaded): their LoRA targets and the sizes docs/training.md computes the memory from."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperfields.config import load_config
from hyperfields.lora.families import BaseModelFamily
from hyperfields.lora.targets import find_lora_targets, lora_layout
from hyperfields.models.architectures import TRANSFORMERS, build_transformer
from hyperfields.tasks.lora_flow import TRANSFORMER_TARGETS

ROOT = Path(__file__).resolve().parents[1]
# name: (preset, hub id, LoRA layers, transformer parameters in billions, ModelSpec architecture)
PRESETS = {
    "flux-dev": ("black-forest-labs/FLUX.1-dev", 266, 11.90, "flux-1-dev/lora"),
    "sd35-medium": ("stabilityai/stable-diffusion-3.5-medium", 191, 2.24, "stable-diffusion-3-5-medium/lora"),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_targets_the_attention_projections_of_the_real_transformer(name: str) -> None:
    hub_id, layers, billions, architecture = PRESETS[name]
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    assert config.model.base_model == hub_id
    assert config.train.frozen_dtype == "bf16" and config.train.gradient_checkpointing
    assert config.train.cache == "memory"
    assert list(config.lora.targets) == list(TRANSFORMER_TARGETS)
    transformer = build_transformer(name, on_meta=True)
    targets = find_lora_targets(transformer, config.lora.targets)
    assert len(targets) == layers
    assert len(lora_layout(transformer, targets, config.lora.rank)) == 2 * layers
    assert sum(p.numel() for p in transformer.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
    family = "flux" if TRANSFORMERS[name][0].startswith("Flux") else "sd3"
    assert BaseModelFamily.from_transformer(family, transformer.config).architecture == architecture
