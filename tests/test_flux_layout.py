"""FLUX.1 kohya files in the original model's fused layout: diffusers' own reader of such files gives back every
module's weight update, on the real FLUX.1-dev layer shapes (random factors, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from hyperfields.errors import UserError
from hyperfields.lora.flux_layout import original_name
from hyperfields.lora.formats import LoraWeights, kohya_state_dict
from hyperfields.lora.targets import find_lora_targets, lora_layout
from hyperfields.models.architectures import build_transformer
from hyperfields.tasks.lora_flow import TRANSFORMER_TARGETS


def random_flux_lora(rank: int, alpha: float) -> LoraWeights:
    transformer = build_transformer("flux-dev", on_meta=True)
    targets = find_lora_targets(transformer, [*TRANSFORMER_TARGETS, r"re:single_transformer_blocks\.\d+\.proj_out"])
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.randn(shape, generator=generator) for name, shape in lora_layout(transformer, targets, rank).items()
    }
    return LoraWeights(tensors=tensors, alpha=alpha, component="transformer")


def test_original_names_of_double_and_single_block_layers():
    assert original_name("transformer_blocks.3.attn.add_k_proj") == ("double_blocks.3.txt_attn.qkv", 1)
    assert original_name("transformer_blocks.0.attn.to_out.0") == ("double_blocks.0.img_attn.proj", None)
    assert original_name("single_transformer_blocks.37.attn.to_v") == ("single_blocks.37.linear1", 2)
    with pytest.raises(UserError, match="has no FLUX.1 kohya name"):
        original_name("transformer_blocks.0.ff.net.2")


def test_diffusers_reads_the_fused_file_back_to_every_modules_update():
    from diffusers import FluxPipeline

    lora = random_flux_lora(rank=2, alpha=3.0)  # scale 1.5: a reader that assumed alpha = rank would differ
    tensors, header = kohya_state_dict(lora, flux=True)
    assert header["ss_network_module"] == "networks.lora_flux"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in tensors
    assert "lora_unet_single_blocks_37_linear1.lora_up.weight" in tensors
    assert not any("to_q" in key for key in tensors)
    state = FluxPipeline.lora_state_dict(dict(tensors))
    state = state[0] if isinstance(state, tuple) else state
    read = {key.removeprefix("transformer.") for key in state if key.endswith(".lora_A.weight")}
    targets = set(lora.targets)
    assert {key.removesuffix(".lora_A.weight") for key in read} - targets <= {
        f"single_transformer_blocks.{i}.proj_mlp" for i in range(38)
    }
    # Updates are up to (3072, 15360): compared as linear maps on random directions, which any difference would show.
    probes = {width: torch.randn(width, 8, generator=torch.Generator().manual_seed(width)) for width in (3072, 15360)}
    for target in lora.targets:
        a, b = state[f"transformer.{target}.lora_A.weight"], state[f"transformer.{target}.lora_B.weight"]
        probe = probes[a.shape[1]]
        # diffusers folds alpha / rank into the factors it returns.
        read_back = b.float() @ (a.float() @ probe)
        expected = lora.scale * lora.tensors[f"{target}.lora_B"] @ (lora.tensors[f"{target}.lora_A"] @ probe)
        assert (read_back - expected).norm() <= 1e-5 * expected.norm(), target
    for i in range(38):  # linear1's MLP rows carry no update
        key = f"transformer.single_transformer_blocks.{i}.proj_mlp"
        if f"{key}.lora_A.weight" in state:
            assert not (state[f"{key}.lora_B.weight"] @ (state[f"{key}.lora_A.weight"] @ probes[3072])).any()
