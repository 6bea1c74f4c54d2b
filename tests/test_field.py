"""The field: exact boundary at t = 0, hyperfan init, gradients reach every head."""

from __future__ import annotations

import math

import pytest
import torch

from hyperfields.config import ObjectiveConfig
from hyperfields.field.model import HyperField
from hyperfields.objectives import gradient_matching_loss
from tests.conftest import QuadraticTask, tiny_vit_encoder

PATHS = [{}, {"time_constants": (3.0, 10.0)}, {"tensor_heads": True}]


def big_layout_field(**options) -> tuple[HyperField, dict]:
    layout = {f"block{i}.lora_A": (4, 64) for i in range(3)} | {f"block{i}.lora_B": (96, 4) for i in range(3)}
    theta0 = {name: torch.randn(shape) if name.endswith("A") else torch.zeros(shape) for name, shape in layout.items()}
    init_std = {name: (3 * shape[1]) ** -0.5 for name, shape in layout.items()}
    torch.manual_seed(0)
    field = HyperField(tiny_vit_encoder(), layout, theta0, init_std, steps=50, width=64, depth=2, heads=4, **options)
    return field, theta0


@pytest.mark.parametrize("options", PATHS)
def test_field_at_step_zero_is_exactly_theta0(options):
    field, theta0 = big_layout_field(**options)
    out = field(t=0, images=torch.rand(3, 3, 16, 16) * 2 - 1)
    for name, weights in out.items():
        assert weights.shape == (3, *theta0[name].shape)
        assert torch.equal(weights, theta0[name].expand_as(weights))


def test_path_components_move_early_and_settle():
    # b(t) = (1 - e^(-t/tau)) / (1 - e^(-T/tau)): 0 at t = 0, 1 at T, and past half way within a few tau.
    field, _ = big_layout_field(time_constants=(3.0, 10.0))
    b = field._path_coefficients(torch.tensor([0.0, 3.0, 50.0]) / 50) * 3**0.5  # undo the 1/sqrt(J) share
    torch.testing.assert_close(b[:, 0].flatten(), torch.zeros(3))
    torch.testing.assert_close(b[:, 2].flatten(), torch.ones(3))
    at_3 = [3 / 50] + [(1 - math.exp(-3 / tau)) / (1 - math.exp(-50 / tau)) for tau in (3.0, 10.0)]
    torch.testing.assert_close(b[:, 1].flatten(), torch.tensor(at_3))
    assert at_3[1] > 0.6 and at_3[0] < 0.1


def test_tensor_heads_give_same_shape_tensors_their_own_outputs():
    # With one head per shape, same-shape tensors are read from one subspace; with their own heads, a gradient that
    # asks one tensor to change leaves the others' heads untouched.
    field, theta0 = big_layout_field(tensor_heads=True)
    assert len(field.heads) == 6
    out = field(t=50, images=torch.rand(2, 3, 16, 16) * 2 - 1)
    out["block1.lora_B"].sum().backward()
    touched = {
        key for key, head in field.heads.items() if head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    }
    assert touched == {"96x4_4"}


@pytest.mark.parametrize("options", PATHS)
def test_generated_variance_at_init_matches_hyperfan_target(options):
    field, theta0 = big_layout_field(**options)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    out = field(t=field.steps, images=images)
    for name, target_std in field.init_std().items():
        delta = out[name] - theta0[name]
        ratio = delta.var().item() / target_std**2
        assert 0.75 <= ratio <= 1.25, f"{name}: variance ratio {ratio:.2f}"


def test_every_head_gets_a_gradient_at_the_first_step():
    task = QuadraticTask()
    torch.manual_seed(0)
    field = HyperField(
        tiny_vit_encoder(), task.layout(), task.initial_weights(), task.init_std(), steps=20, width=32, depth=1, heads=4
    )
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    objective = ObjectiveConfig(steps=20, step_size=0.1, update="sgd", rollout=1)
    stats = gradient_matching_loss(
        field,
        task,
        {"images": images},
        task.prepare(images, [""] * 4),
        torch.tensor([0, 3, 7, 12]),
        objective,
        torch.Generator().manual_seed(0),
    )
    stats.loss.backward()
    for key, head in field.heads.items():
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0, key
    assert field.tokens.grad.abs().sum() > 0


def _randomised(spatial_rank: int) -> HyperField:
    # Random weights everywhere, so that the step condition reaches the output (at init adaLN-Zero hides it).
    torch.manual_seed(0)
    field = HyperField(
        tiny_vit_encoder(),
        {"w": (6, 5)},
        {"w": torch.zeros(6, 5)},
        {"w": 0.1},
        steps=10,
        width=32,
        depth=1,
        heads=4,
        spatial_rank=spatial_rank,
    )
    with torch.no_grad():
        for name, parameter in field.named_parameters():
            if not name.startswith("encoder."):
                parameter.normal_(std=0.2)
    return field


def test_spatial_condition_tells_apart_images_whose_tokens_differ_only_in_order():
    # Cross-attention and the mean of the tokens are blind to token order; with spatial_rank > 0 the field sees where.
    tokens = torch.randn(1, 17, 32)
    swapped = tokens[:, torch.randperm(17, generator=torch.Generator().manual_seed(0))]
    blind, seeing = _randomised(0), _randomised(8)
    with torch.no_grad():
        torch.testing.assert_close(blind(t=10, encoder_tokens=tokens)["w"], blind(t=10, encoder_tokens=swapped)["w"])
        difference = seeing(t=10, encoder_tokens=tokens)["w"] - seeing(t=10, encoder_tokens=swapped)["w"]
    assert difference.abs().max() > 1e-3
    assert seeing.spatial_up.in_features == 17 * 8  # the tiny ViT: 16 patches and CLS


def test_several_steps_per_image_give_the_same_weights_as_one_call_per_step():
    # Gradient matching asks for t, t+1 and T of every image in one call, computing the image side once.
    field = _randomised(8)
    tokens = torch.randn(3, 17, 32)
    steps = torch.tensor([[0.0, 4.0, 10.0], [2.0, 3.0, 10.0], [7.0, 8.0, 10.0]])
    with torch.no_grad():
        together = field(t=steps, encoder_tokens=tokens)["w"]
        apart = torch.stack([field(t=steps[:, m], encoder_tokens=tokens)["w"] for m in range(3)], dim=1)
    assert together.shape == (3, 3, 6, 5)
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-6)
