"""Change a LoRA's rank by SVD of its update B @ A, keeping its scale, so refinement can run at another rank."""

from __future__ import annotations

import torch

from hyperfields.errors import UserError
from hyperfields.lora.formats import LoraWeights


def with_rank(lora: LoraWeights, rank: int) -> LoraWeights:
    """`lora` re-factorised to `rank` with the same scale: exact when rank >= its rank, the best rank-R fit below.

    B @ A = U S V^T gives B' = U_R S_R and A' = V_R^T. A' keeps orthonormal rows, so directions added above the
    old rank start with B' = 0 and A' != 0, like a fresh LoRA: their B gradient is not zero.
    """
    if rank < 1:
        raise UserError(f"rank must be at least 1, got {rank}")
    tensors = {}
    for target in lora.targets:
        a, b = lora.tensors[f"{target}.lora_A"].float(), lora.tensors[f"{target}.lora_B"].float()
        if rank > min(b.shape[0], a.shape[1]):
            raise UserError(
                f"rank {rank} is above what LoRA target {target} (out, in) = ({b.shape[0]}, {a.shape[1]}) can hold"
            )
        u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)  # (out, k), (k,), (k, in) with k = min(out, in)
        tensors[f"{target}.lora_A"] = vh[:rank].contiguous()
        tensors[f"{target}.lora_B"] = (u[:, :rank] * s[:rank]).contiguous()
    return LoraWeights(
        tensors=tensors,
        alpha=lora.scale * rank,
        metadata=dict(lora.metadata),
        sdxl_layers_per_block=lora.sdxl_layers_per_block,
        component=lora.component,
    )
