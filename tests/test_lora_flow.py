"""The flow-matching task on the tiny FLUX.1 and SD3.5 models: the DreamBooth-LoRA scripts' loss with peft's LoRA,
sample by sample, equals the batched per-sample loss; theta_0 is the base model; checkpointing keeps the gradients."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig

from hyperfields.config import LoraConfig
from hyperfields.models import load_transformer_pipeline
from hyperfields.tasks.lora_flow import FLUX_GUIDANCE, TRANSFORMER_TARGETS, LoraFlowTask
from hyperfields.trajectory import task_gradients

FAMILIES = ["tiny-flux", "tiny-sd3"]
CAPTIONS = ["a photo of sks dog", "a photo of sks cat on the grass"]


def perturbed(task: LoraFlowTask, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """n samples of weights near theta_0, each different, with B != 0 so the LoRA changes the output."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: w.expand(n, *w.shape) + 0.2 * torch.randn(n, *w.shape, generator=generator)
        for name, w in task.initial_weights().items()
    }


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(n)) * 2 - 1


def script_loss(base_model: str, task: LoraFlowTask, weights, inputs, draws: int, seed: int) -> torch.Tensor:
    """The family's DreamBooth-LoRA script step, written out, on a peft-LoRA copy of the transformer, one sample at
    a time: (N,) losses averaged over `draws`."""
    from diffusers import FluxPipeline

    pipeline = load_transformer_pipeline(base_model)
    transformer = pipeline.transformer
    transformer.add_adapter(
        PeftLoraConfig(r=task.config.rank, lora_alpha=task.config.alpha, target_modules=task.targets)
    )
    scheduler = task.scheduler
    latents = inputs.latents.repeat_interleave(draws, dim=0)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    if task.family == "flux":  # weighting_scheme "none": uniform
        u = torch.rand(latents.shape[0], generator=generator)
    else:  # "logit_normal"
        u = torch.sigmoid(torch.normal(0.0, 1.0, size=(latents.shape[0],), generator=generator))
    timesteps = scheduler.timesteps[(u * 1000).long()]
    sigmas = torch.stack([scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()] for t in timesteps])
    sigmas = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - sigmas) * latents + sigmas * noise
    losses = []
    for row in range(latents.shape[0]):
        sample = row // draws
        modules = dict(transformer.named_modules())
        for target in task.targets:
            modules[target].lora_A["default"].weight.data = weights[f"{target}.lora_A"][sample].clone()
            modules[target].lora_B["default"].weight.data = weights[f"{target}.lora_B"][sample].clone()
        x, text = noisy[row : row + 1], inputs.text_embeddings[sample : sample + 1]
        pooled = inputs.pooled_text_embeddings[sample : sample + 1]
        with torch.no_grad():
            if task.family == "flux":
                packed = FluxPipeline._pack_latents(x, 1, 16, 16, 16)
                prediction = transformer(
                    hidden_states=packed,
                    timestep=timesteps[row : row + 1] / 1000,
                    guidance=torch.tensor([FLUX_GUIDANCE]),
                    pooled_projections=pooled,
                    encoder_hidden_states=text,
                    txt_ids=torch.zeros(text.shape[1], 3),
                    img_ids=FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32),
                    return_dict=False,
                )[0]
                prediction = FluxPipeline._unpack_latents(prediction, 64, 64, 4)
                target = noise[row : row + 1] - latents[row : row + 1]
            else:  # precondition_outputs: compare the predicted clean latents with the latents
                prediction = transformer(
                    hidden_states=x,
                    timestep=timesteps[row : row + 1],
                    encoder_hidden_states=text,
                    pooled_projections=pooled,
                    return_dict=False,
                )[0]
                prediction = prediction * -sigmas[row] + x
                target = latents[row : row + 1]
        losses.append((prediction - target).pow(2).mean())
    return torch.stack(losses).view(-1, draws).mean(dim=1)


@pytest.fixture(scope="module", params=FAMILIES)
def task(request) -> LoraFlowTask:
    return LoraFlowTask(load_transformer_pipeline(request.param), LoraConfig(rank=4, alpha=8), name=request.param)


def test_default_targets_are_the_attention_projections_of_both_streams(task):
    suffixes = {target.split(".", 2)[-1] for target in task.targets}
    assert suffixes <= set(TRANSFORMER_TARGETS)
    assert {"attn.to_q", "attn.add_q_proj", "attn.to_add_out"} <= suffixes
    assert not any(".attn2." in target or ".ff" in target for target in task.targets)
    assert task.record()["component"] == "transformer"


def test_batched_loss_equals_the_scripts_loss_with_peft_sample_by_sample(task, one_thread):
    inputs = task.prepare(images(2), CAPTIONS)
    weights = perturbed(task, 2)
    with torch.no_grad():
        batched = task.loss(weights, inputs, 2, torch.Generator().manual_seed(3))
    reference = script_loss(task.name, task, weights, inputs, 2, seed=3)
    assert torch.allclose(batched, reference, rtol=1e-5, atol=1e-6), (batched, reference)
    # The reference is sensitive to the weights: another sample's LoRA gives another loss.
    swapped = {name: w.flip(0) for name, w in weights.items()}
    with torch.no_grad():
        assert not torch.allclose(task.loss(swapped, inputs, 2, torch.Generator().manual_seed(3)), batched)


def test_theta0_is_exactly_the_base_model(task):
    inputs = task.prepare(images(2), CAPTIONS)
    theta0 = {name: w.expand(2, *w.shape) for name, w in task.initial_weights().items()}
    assert all(w.abs().sum() > 0 for name, w in theta0.items() if name.endswith("lora_A"))
    zero = {name: torch.zeros_like(w) for name, w in theta0.items()}  # a LoRA that adds exactly nothing
    with torch.no_grad():
        with_theta0 = task.loss(theta0, inputs, 1, torch.Generator().manual_seed(0))
        without = task.loss(zero, inputs, 1, torch.Generator().manual_seed(0))
    assert torch.equal(with_theta0, without)


def test_gradient_checkpointing_keeps_each_samples_gradients(task):
    inputs = task.prepare(images(2), CAPTIONS)
    weights = perturbed(task, 2, seed=1)
    grads, losses = task_gradients(task, weights, inputs, 1, torch.Generator().manual_seed(0))
    task.transformer.enable_gradient_checkpointing(task.lora.checkpoint)
    try:
        grads_ckpt, losses_ckpt = task_gradients(task, weights, inputs, 1, torch.Generator().manual_seed(0))
    finally:
        task.transformer.disable_gradient_checkpointing()
    assert torch.allclose(losses, losses_ckpt, atol=1e-6)
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=1e-4, atol=1e-7), name
    # Every sample's LoRA gets a gradient, except where the script's targets include a dead layer: SD3's last block
    # discards its text stream, so its text queries (attn.add_q_proj) reach no output.
    dead = [name for name, g in grads.items() if g.flatten(1).norm(dim=1).min() == 0]
    assert all(".add_q_proj." in name for name in dead) and len(dead) <= 2, dead
