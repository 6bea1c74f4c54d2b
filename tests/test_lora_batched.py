"""Tests for per-sample batched LoRA: equality with peft, gradient isolation, repeat semantics, targets."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import Tensor, nn

from hyperfields.errors import UserError
from hyperfields.lora import DEFAULT_TARGETS
from hyperfields.lora.batched import BatchedLora, BatchedLoraLinear
from hyperfields.lora.targets import find_lora_targets, lora_layout

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

RANK, ALPHA, N_SAMPLES = 4, 8, 3


def _tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return unet.eval()


@pytest.fixture(scope="module")
def base_unet() -> nn.Module:
    return _tiny_unet()


@pytest.fixture()
def unet(base_unet: nn.Module) -> nn.Module:
    # Each test mutates its model (attach / requires_grad), so hand out a fresh copy.
    return copy.deepcopy(base_unet)


def _inputs(seed: int, n: int = N_SAMPLES) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 16, 16, generator=g)
    timesteps = torch.tensor([10, 500, 900][:n] + [250] * max(0, n - 3))
    text = torch.randn(n, 5, 32, generator=g)
    return latents, timesteps, text


def _random_weights(layout: dict[str, tuple[int, ...]], n: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    # B non-zero on purpose: with B = 0 (the usual LoRA init) the check would pass for any A.
    return {k: 0.2 * torch.randn(n, *shape, generator=g) for k, shape in layout.items()}


def _run(model: nn.Module, latents: Tensor, timesteps: Tensor, text: Tensor) -> Tensor:
    return model(latents, timesteps, encoder_hidden_states=text).sample


def test_find_targets_default_patterns(base_unet: nn.Module) -> None:
    targets = find_lora_targets(base_unet, DEFAULT_TARGETS)
    assert targets
    assert all(isinstance(base_unet.get_submodule(t), nn.Linear) for t in targets)
    assert any(t.endswith("attn1.to_q") for t in targets)
    assert any(t.endswith("attn2.to_k") for t in targets)
    assert any(t.endswith("attn2.to_out.0") for t in targets)
    module_order = [name for name, _ in base_unet.named_modules() if name in set(targets)]
    assert targets == module_order
    # Dot boundary: "q" alone is not a whole name part of "to_q".
    with pytest.raises(UserError, match="no_such_layer"):
        find_lora_targets(base_unet, ["no_such_layer"])
    with pytest.raises(UserError, match=r"\['q'\]"):
        find_lora_targets(base_unet, ["q"])
    regex = find_lora_targets(base_unet, [r"re:.*attn2\.to_(k|v)"])
    assert regex and all(t.endswith(("attn2.to_k", "attn2.to_v")) for t in regex)


def test_lora_layout_shapes(base_unet: nn.Module) -> None:
    targets = find_lora_targets(base_unet, ["to_k"])
    layout = lora_layout(base_unet, targets, RANK)
    assert list(layout) == [f"{t}.lora_{ab}" for t in targets for ab in "AB"]
    cross_k = next(t for t in targets if t.endswith("attn2.to_k"))
    lin = base_unet.get_submodule(cross_k)
    assert layout[f"{cross_k}.lora_A"] == (RANK, 32)  # cross-attention reads the 32-dim text states
    assert layout[f"{cross_k}.lora_B"] == (lin.out_features, RANK)


def test_matches_peft_per_sample(unet: nn.Module) -> None:
    reference = copy.deepcopy(unet)
    targets = find_lora_targets(unet, DEFAULT_TARGETS)
    weights = _random_weights(lora_layout(unet, targets, RANK), N_SAMPLES, seed=1)
    latents, timesteps, text = _inputs(seed=2)

    lora = BatchedLora.attach(unet, targets, scale=ALPHA / RANK)
    lora.set_weights(weights)
    with torch.no_grad():
        batched = _run(unet, latents, timesteps, text)
        base = _run(reference, latents, timesteps, text)
    assert (batched - base).abs().max() > 1e-2, "LoRA had no visible effect; the comparison would be vacuous"

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(DEFAULT_TARGETS), init_lora_weights=False)
    for i in range(N_SAMPLES):
        model = peft.inject_adapter_in_model(config, copy.deepcopy(reference))
        with torch.no_grad():
            for t in targets:
                layer = model.get_submodule(t)
                layer.lora_A["default"].weight.copy_(weights[f"{t}.lora_A"][i])
                layer.lora_B["default"].weight.copy_(weights[f"{t}.lora_B"][i])
            expected = _run(model, latents[i : i + 1], timesteps[i : i + 1], text[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], expected, atol=1e-5, rtol=0)


def test_gradients_are_per_sample(unet: nn.Module) -> None:
    targets = find_lora_targets(unet, ["to_q", "to_v"])
    weights = {k: v.requires_grad_() for k, v in _random_weights(lora_layout(unet, targets, RANK), 3, 3).items()}
    lora = BatchedLora.attach(unet, targets, scale=ALPHA / RANK)
    lora.set_weights(weights)

    def grads(latents: Tensor, timesteps: Tensor, text: Tensor) -> dict[str, Tensor]:
        out = _run(unet, latents, timesteps, text)
        loss = sum((out[i] ** 2).mean() for i in range(out.shape[0]))
        return dict(zip(weights, torch.autograd.grad(loss, list(weights.values()))))

    latents, timesteps, text = _inputs(seed=4)
    first = grads(latents, timesteps, text)
    assert all(g[i].abs().sum() > 0 for g in first.values() for i in range(3))
    frozen = [p for layer in lora.layers.values() for p in layer.base_layer.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen), "wrapped base layers should be frozen"

    # Change only sample 2: samples 0 and 1 must keep their gradients, sample 2's must move.
    latents2, text2 = latents.clone(), text.clone()
    latents2[2] += 1.0
    text2[2] += 1.0
    second = grads(latents2, timesteps, text2)
    for key in weights:
        torch.testing.assert_close(second[key][:2], first[key][:2], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(second[key][2], first[key][2])


def test_repeat_semantics_match_repeat_interleave() -> None:
    torch.manual_seed(5)
    n, k, rank = 3, 2, 4
    layer = BatchedLoraLinear(nn.Linear(6, 7), scale=1.5)
    twin = BatchedLoraLinear(copy.deepcopy(layer.base_layer), scale=1.5)
    a, b = torch.randn(n, rank, 6), torch.randn(n, 7, rank)
    x = torch.randn(n * k, 5, 6)
    layer.lora_A, layer.lora_B = a, b
    twin.lora_A, twin.lora_B = a.repeat_interleave(k, dim=0), b.repeat_interleave(k, dim=0)
    torch.testing.assert_close(layer(x), twin(x))
    # And each row j really uses sample j // k's weights.
    for j in range(n * k):
        i = j // k
        manual = layer.base_layer(x[j]) + 1.5 * x[j] @ a[i].T @ b[i].T
        torch.testing.assert_close(layer(x)[j], manual, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        layer(torch.randn(4, 6))


def test_set_weights_checks_keys_and_shapes(unet: nn.Module) -> None:
    targets = find_lora_targets(unet, ["to_q"])
    weights = _random_weights(lora_layout(unet, targets, RANK), 2, 6)
    lora = BatchedLora.attach(unet, targets, scale=1.0)
    missing = dict(weights)
    key = f"{targets[0]}.lora_B"
    del missing[key]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        lora.set_weights(missing)
    bad = dict(weights)
    bad[key] = weights[key][:, :-1]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        lora.set_weights(bad)
    with pytest.raises(ValueError, match="unexpected"):
        lora.set_weights({**weights, "nope.lora_A": weights[key]})
    with pytest.raises(UserError, match="not nn.Linear"):
        BatchedLora.attach(unet, ["conv_in"], scale=1.0)


def test_clear_and_detach_restore_base(unet: nn.Module) -> None:
    latents, timesteps, text = _inputs(seed=7)
    targets = find_lora_targets(unet, DEFAULT_TARGETS)
    originals = {t: unet.get_submodule(t) for t in targets}
    with torch.no_grad():
        base = _run(unet, latents, timesteps, text)
        with BatchedLora.attach(unet, targets, scale=2.0) as lora:
            assert all(isinstance(unet.get_submodule(t), BatchedLoraLinear) for t in targets)
            lora.set_weights(_random_weights(lora_layout(unet, targets, RANK), N_SAMPLES, 8))
            assert not torch.allclose(_run(unet, latents, timesteps, text), base)
            lora.clear()
            assert torch.equal(_run(unet, latents, timesteps, text), base)
            lora.set_weights(_random_weights(lora_layout(unet, targets, RANK), N_SAMPLES, 9))
        # Leaving the context detached it: the very same Linear objects are back, outputs exact.
        assert all(unet.get_submodule(t) is originals[t] for t in targets)
        assert torch.equal(_run(unet, latents, timesteps, text), base)
    assert all(p.requires_grad for p in unet.parameters())
