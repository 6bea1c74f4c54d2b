"""Real-scale features on tiny models: SDXL conditioning, gradient checkpointing, cached conditions, kohya names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.config import LoraConfig
from hyperfields.lora.formats import kohya_name_sdxl
from hyperfields.lora.targets import find_lora_targets
from hyperfields.models import load_pipeline_components
from hyperfields.models.architectures import build_unet
from hyperfields.models.tiny import TINY_XL
from hyperfields.objectives import step_loss
from hyperfields.tasks.lora_diffusion import LoraDiffusionTask
from hyperfields.training.cache import ConditionCache
from hyperfields.trajectory import task_gradients, update_direction


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models: with several OpenMP threads on a busy machine the barrier waits dominate.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def xl_task() -> LoraDiffusionTask:
    return LoraDiffusionTask(load_pipeline_components(TINY_XL), LoraConfig(rank=2, alpha=2))


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def perturbed_theta0(task: LoraDiffusionTask, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        name: w.expand(n, *w.shape) + 0.01 * torch.randn(n, *w.shape, generator=g)
        for name, w in task.initial_weights().items()
    }


def test_sdxl_conditioning_matches_the_diffusers_sdxl_pipeline(xl_task):
    from diffusers import StableDiffusionXLPipeline

    parts = xl_task.parts
    assert parts.is_sdxl
    inputs = xl_task.prepare(images(2), ["a photo of sks dog", "a photo of sks cat"])
    pipe = StableDiffusionXLPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2,
        unet=parts.unet,
        scheduler=parts.noise_scheduler,
    )
    text, _, pooled, _ = pipe.encode_prompt(
        ["a photo of sks dog", "a photo of sks cat"], device="cpu", do_classifier_free_guidance=False
    )
    torch.testing.assert_close(inputs.text_embeddings, text)
    torch.testing.assert_close(inputs.pooled_text_embeddings, pooled)
    time_ids = pipe._get_add_time_ids(
        (64, 64), (0, 0), (64, 64), torch.float32, parts.text_encoder_2.config.projection_dim
    )
    torch.testing.assert_close(inputs.time_ids, time_ids.expand(2, 6))


def test_tiny_sdxl_task_loss_is_finite_with_non_zero_gradients(xl_task):
    inputs = xl_task.prepare(images(2), ["a photo of sks"] * 2)
    grads, losses = task_gradients(xl_task, perturbed_theta0(xl_task, 2), inputs, 2, torch.Generator().manual_seed(0))
    assert torch.isfinite(losses).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for name, g in grads.items() if name.endswith("lora_B"))


@pytest.mark.parametrize("base_model", ["tiny", TINY_XL])
def test_gradient_checkpointing_gives_the_same_task_gradients(base_model):
    lora = LoraConfig(rank=2, alpha=2)
    plain = LoraDiffusionTask(load_pipeline_components(base_model), lora)
    checkpointed = LoraDiffusionTask(load_pipeline_components(base_model), lora, gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.parts.unet.modules())
    inputs = plain.prepare(images(2), ["a photo of sks"] * 2)
    weights = perturbed_theta0(plain, 2)
    expected, losses = task_gradients(plain, weights, inputs, 2, torch.Generator().manual_seed(0))
    got, losses_checkpointed = task_gradients(checkpointed, weights, inputs, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(losses_checkpointed, losses, rtol=0, atol=1e-6)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5, msg=name)
    # diffusers' own checkpointing recomputes blocks after the weights are cleared, which is why the task has its own.
    checkpointed.parts.unet.enable_gradient_checkpointing()
    with pytest.raises(Exception, match="[Cc]heckpoint|different number"):
        task_gradients(checkpointed, weights, inputs, 2, torch.Generator().manual_seed(0))


def test_cached_conditions_give_the_same_loss_as_computing_them(xl_task):
    pictures, captions = images(3, seed=2), ["a photo of sks dog", "a photo of sks cat", "a photo of sks"]
    calls = []

    def compute(picks: list[int]):
        calls.append(list(picks))
        return {"pixels_mean": pictures[picks].mean(dim=(1, 2, 3))}, xl_task.prepare(
            pictures[picks], [captions[i] for i in picks]
        )

    cache = ConditionCache(compute, torch.device("cpu"))
    picks = [2, 0, 2]
    field_inputs, cached = cache.get(picks)
    assert calls == [[0, 2]] and len(cache) == 2  # each image once, however often drawn
    direct_field_inputs, direct = compute(picks)
    weights = perturbed_theta0(xl_task, 3)
    losses = [xl_task.loss(weights, inputs, 2, torch.Generator().manual_seed(5)) for inputs in (cached, direct)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(field_inputs["pixels_mean"], direct_field_inputs["pixels_mean"])
    cache.get([0, 2])
    assert len(calls) == 2  # the direct call above; nothing recomputed


def test_grouped_matching_maths_equals_the_per_tensor_definition():
    g = torch.Generator().manual_seed(0)
    shapes = {"a.lora_A": (4, 8), "b.lora_A": (4, 8), "a.lora_B": (6, 4), "c.lora_B": (6, 4), "bias": (5,)}
    real = {name: torch.randn(3, *shape, generator=g) for name, shape in shapes.items()}
    predicted = {name: w + 0.3 * torch.randn(w.shape, generator=g) for name, w in real.items()}
    directions = update_direction(real, "normalized")
    assert list(directions) == list(real)
    for name, w in real.items():
        torch.testing.assert_close(directions[name], w / w.flatten(1).norm(dim=1).view(-1, *([1] * (w.ndim - 1))))
    r_sq = {name: w.flatten(1).pow(2).sum(1) for name, w in real.items()}
    floor = 0.01 * torch.stack([v.mean() for v in r_sq.values()]).mean()
    reference = torch.stack(
        [(predicted[n] - real[n]).flatten(1).pow(2).sum(1) / torch.maximum(r_sq[n], floor) for n in real]
    ).mean()
    torch.testing.assert_close(step_loss(predicted, real, "relative_mse"), reference)


def test_sdxl_kohya_names_load_back_into_diffusers_for_every_linear_layer_of_the_real_unet():
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet = build_unet("sdxl", on_meta=True)
    patterns = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "time_emb_proj",
        r"re:(time|add)_embedding\.linear_\d",
    ]
    targets = find_lora_targets(unet, patterns)
    assert len(targets) == 743  # 70 transformer blocks x 10 linear layers, 20 proj_in/out, 19 resnets, 4 embeddings
    state = {}
    for target in targets:
        name = kohya_name_sdxl(target)
        state |= {
            f"{name}.lora_down.weight": torch.zeros(1, 1),
            f"{name}.lora_up.weight": torch.zeros(1, 1),
            f"{name}.alpha": torch.ones(()),
        }
    assert (
        kohya_name_sdxl("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    loaded, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    back = {
        k.removeprefix("unet.").removesuffix(".lora_A.weight")
        for k in convert_unet_state_dict_to_peft(loaded)
        if k.endswith(".lora_A.weight")
    }
    assert back == set(targets)


def test_tiny_sdxl_field_trains_two_steps_through_the_cli(tmp_path: Path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(photos / f"p{i}.png")
    settings = [
        "train.batch_size=2",
        "objective.steps=4",
        "train.heldout=0",
        "field.width=32",
        "field.depth=1",
        "train.warmup_steps=1",
        "train.cache_latents=true",
        "train.gradient_checkpointing=true",
    ]
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            "configs/tiny.yaml",
            "--data",
            str(photos),
            "--output",
            str(tmp_path / "run"),
            "--base-model",
            TINY_XL,
            "--max-steps",
            "2",
            *[a for s in settings for a in ("--set", s)],
        ],
    )
    assert result.exit_code == 0, result.output  # a NaN/Inf loss or gradient would stop the run with exit code 1
    record = json.loads((tmp_path / "run" / "field" / "config.json").read_text())
    assert record["base_model"] == TINY_XL and record["trained_steps"] == 2
    # Cross-attention keys read both text encoders' states side by side (32 + 32 wide in the tiny SDXL).
    assert record["layout"]["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A"] == [4, 64]
