"""The FLUX.1-dev and SD 3.5 Medium presets on the real architectures (built on the meta device, nothing
downloaded): their LoRA targets and the sizes docs/training.md computes the memory from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


# Each architecture cut to a few small blocks of every kind, for a CPU.
SMALL = {
    "flux-dev": dict(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        axes_dims_rope=[4, 6, 6],
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
    ),
    "sd35-medium": dict(
        num_layers=2,
        dual_attention_layers=[0],
        attention_head_dim=16,
        num_attention_heads=2,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        pos_embed_max_size=16,
    ),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_built_pipeline_trains_with_the_preset_lora_and_its_plain_loss_is_the_tasks(name: str) -> None:
    """What scripts/bench_speed.py times: the flow task on the transformer-only pipeline, and the same loss of the
    transformer with no LoRA, which theta_0 (B = 0) leaves unchanged."""
    from hyperfields.models.architectures import build_transformer_pipeline
    from hyperfields.tasks.lora_flow import FlowInputs, LoraFlowTask, flow_matching_loss

    config = load_config(ROOT / "configs" / f"{name}.yaml")
    torch.manual_seed(0)
    pipeline = build_transformer_pipeline(name, **SMALL[name])
    task = LoraFlowTask(pipeline, config.lora)
    per_block = {"flux-dev": 8 + 3, "sd35-medium": 8 + 7}[name]  # FLUX: double + single; SD3: full + last block
    assert len(task.targets) == per_block
    inputs = FlowInputs(torch.randn(1, 16, 8, 8), torch.randn(1, 6, 32), torch.randn(1, 16))
    theta0 = {key: w.unsqueeze(0).requires_grad_() for key, w in task.initial_weights().items()}
    loss = task.loss(theta0, inputs, 2, torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(loss.sum(), [theta0[f"{task.targets[0]}.lora_B"]])
    assert loss.shape == (1,) and torch.isfinite(loss).all() and grad.norm() > 0
    with torch.no_grad():
        plain = flow_matching_loss(
            pipeline.transformer, task.family, task.scheduler, inputs, 2, torch.Generator().manual_seed(1), 8
        )
    torch.testing.assert_close(plain, loss.detach())
