"""The LoRA-diffusion task on the tiny pipeline: theta_0 is the base model, no dead init, v-prediction."""

from __future__ import annotations

import pytest
import torch

from hyperfields.config import LoraConfig, ObjectiveConfig
from hyperfields.field.encoder import ImageEncoder
from hyperfields.field.model import HyperField
from hyperfields.models import load_encoder, load_pipeline_components
from hyperfields.objectives import gradient_matching_loss
from hyperfields.tasks.lora_diffusion import LoraDiffusionTask
from hyperfields.trajectory import task_gradients


@pytest.fixture(scope="module")
def task() -> LoraDiffusionTask:
    return LoraDiffusionTask(load_pipeline_components("tiny"), LoraConfig(rank=4, alpha=8))


def batch(n: int = 3) -> tuple[torch.Tensor, list[str]]:
    images = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(n)) * 2 - 1
    return images, ["a photo of sks dog"] * n


def expand(weights: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {name: w.unsqueeze(0).expand(n, *w.shape) for name, w in weights.items()}


def test_theta0_is_exactly_the_base_model_and_a0_is_seeded_non_zero(task):
    theta0 = task.initial_weights()
    assert all(w.abs().sum() > 0 for name, w in theta0.items() if name.endswith("lora_A"))
    assert all(not w.any() for name, w in theta0.items() if name.endswith("lora_B"))
    again = task.initial_weights()
    assert all(torch.equal(theta0[name], again[name]) for name in theta0)
    unet = task.parts.unet
    latents, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    task.lora.set_weights(expand(theta0, 2))
    with_lora = unet(latents, t, text).sample
    task.lora.clear()
    assert torch.equal(with_lora, unet(latents, t, text).sample)
    assert not any(p.requires_grad for p in unet.parameters())
    assert not unet.training and not task.parts.vae.training and not task.parts.text_encoder.training


def test_each_sample_loss_and_gradient_depend_only_on_its_own_weights(task):
    images, captions = batch(3)
    inputs = task.prepare(images, captions)
    noise = torch.Generator().manual_seed(0)  # not the global generator: no dependence on the tests before
    weights = {
        name: w + 0.01 * torch.randn(w.shape, generator=noise) for name, w in expand(task.initial_weights(), 3).items()
    }
    grads, losses = task_gradients(task, weights, inputs, 2, torch.Generator().manual_seed(0))
    changed = {name: w.clone() for name, w in weights.items()}
    for w in changed.values():
        w[2] += 0.5 * torch.randn(w[2].shape, generator=noise)
    grads2, losses2 = task_gradients(task, changed, inputs, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(losses[:2], losses2[:2], atol=1e-6) and not torch.allclose(losses[2], losses2[2])
    for name in grads:
        assert torch.allclose(grads[name][:2], grads2[name][:2], atol=1e-6), name
    # At theta_0-like weights every sample's B gets a gradient (A is not zero).
    assert all(g.flatten(1).norm(dim=1).min() > 0 for name, g in grads.items() if name.endswith("lora_B"))


def test_no_dead_init_every_head_gets_a_gradient_at_t0(task):
    encoder_model, norm = load_encoder("tiny")
    torch.manual_seed(0)
    field = HyperField(
        ImageEncoder(encoder_model, norm),
        task.layout(),
        task.initial_weights(),
        task.init_std(),
        steps=10,
        width=32,
        depth=1,
        heads=4,
        output_gain=0.1,
    )
    images, captions = batch(2)
    objective = ObjectiveConfig(steps=10, step_size=0.05, update="normalized", noise_draws=1)
    stats = gradient_matching_loss(
        field,
        task,
        {"images": images},
        task.prepare(images, captions),
        torch.zeros(2, dtype=torch.long),
        objective,
        torch.Generator().manual_seed(0),
    )
    stats.loss.backward()
    assert stats.step_norm > 0
    for key, head in field.heads.items():
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0, key


def test_v_prediction_loss_matches_a_hand_computed_reference():
    parts = load_pipeline_components("tiny")
    parts.noise_scheduler = type(parts.noise_scheduler).from_config(
        parts.noise_scheduler.config, prediction_type="v_prediction"
    )
    v_task = LoraDiffusionTask(parts, LoraConfig())
    images, captions = batch(2)
    inputs = v_task.prepare(images, captions)
    loss = v_task.loss(expand(v_task.initial_weights(), 2), inputs, 1, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(inputs.latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (2,), generator=generator)
    scheduler = parts.noise_scheduler
    with torch.no_grad():  # theta_0 is the base model, so the plain UNet gives the reference prediction
        v_task.lora.clear()
        prediction = parts.unet(
            scheduler.add_noise(inputs.latents, noise, timesteps), timesteps, inputs.text_embeddings
        ).sample
    target = scheduler.get_velocity(inputs.latents, noise, timesteps)
    reference = (prediction - target).pow(2).flatten(1).mean(dim=1)
    assert torch.allclose(loss, reference, atol=1e-6)
    assert not torch.allclose(loss, (prediction - noise).pow(2).flatten(1).mean(dim=1))
