"""FLUX.1 LoRAs in the original (Black Forest Labs) model's layout, the kohya names sd-scripts, ComfyUI and Forge load.

The original model fuses what diffusers keeps apart: a double block's image q, k, v are one `img_attn.qkv` layer
(its text q, k, v one `txt_attn.qkv`), and a single block's q, k, v and MLP input are one `linear1`. A LoRA of the
separate layers becomes one LoRA of the fused layer with the same weight update: the down factors stacked, the up
factors placed block-diagonally (each part's rows take only its own rank block), alpha times the number of stacked
LoRAs so that alpha / rank, the scale, is unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from hyperfields.errors import UserError

KOHYA_FLUX_PREFIX = "lora_unet_"
# FLUX.1's single blocks: the MLP input (proj_mlp) is 4 x the width, the last part of linear1.
_MLP_RATIO = 4
# diffusers name in a block -> (original layer, index of the part in it or None when not fused)
_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_add_out": ("txt_attn.proj", None),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
}
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def original_name(target: str) -> tuple[str, int | None]:
    """The original model's layer holding diffusers FLUX module `target`, and which part of it (None: the whole)."""
    match = _BLOCK.fullmatch(target)
    table = _DOUBLE if match and match.group(1) == "transformer_blocks" else _SINGLE
    if match is None or match.group(3) not in table:
        known = ", ".join(sorted({*_DOUBLE, *_SINGLE}))
        raise UserError(f"LoRA target {target!r} has no FLUX.1 kohya name: only {known} of the blocks map")
    layer, part = table[match.group(3)]
    blocks = "double_blocks" if match.group(1) == "transformer_blocks" else "single_blocks"
    return f"{blocks}.{match.group(2)}.{layer}", part


def _part_widths(layer: str, width: int) -> list[int]:
    # Output rows of each part of a fused layer: q, k, v of `width` each, and a single block's MLP input.
    return [width] * 3 + ([_MLP_RATIO * width] if layer.endswith("linear1") else [])


def flux_kohya_modules(
    tensors: Mapping[str, torch.Tensor], targets: list[str], alpha: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{kohya module name: (lora_down (R, in), lora_up (out, R), alpha)} of a diffusers FLUX LoRA with factors
    `tensors` ("<target>.lora_A" (r, in), "<target>.lora_B" (out, r)) and `alpha`, with the same weight updates."""
    layers: dict[str, dict[int | None, tuple[torch.Tensor, torch.Tensor]]] = {}
    for target in targets:
        layer, part = original_name(target)
        layers.setdefault(layer, {})[part] = (tensors[f"{target}.lora_A"].float(), tensors[f"{target}.lora_B"].float())
    modules = {}
    for layer, parts in layers.items():
        name = KOHYA_FLUX_PREFIX + layer.replace(".", "_")
        if None in parts:  # a layer the original keeps whole
            down, up = parts[None]
            modules[name] = (down, up, float(alpha))
            continue
        order = sorted(parts)  # q, k, v, mlp: the order of the fused layer's rows
        width = parts[order[0]][1].shape[0] if order[0] < 3 else parts[order[0]][1].shape[0] // _MLP_RATIO
        widths = _part_widths(layer, width)
        down = torch.cat([parts[p][0] for p in order])  # (n r, in)
        rank = parts[order[0]][0].shape[0]
        up = torch.zeros(sum(widths), len(order) * rank)
        for block, p in enumerate(order):
            row = sum(widths[:p])
            up[row : row + widths[p], block * rank : (block + 1) * rank] = parts[p][1]
        modules[name] = (down, up, float(alpha) * len(order))
    return modules
