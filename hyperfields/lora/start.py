"""theta_0 of a per-sample LoRA, and the hyperfan scale of each of its tensors, whatever model the LoRA is on."""

from __future__ import annotations

import torch


def initial_lora_weights(layout: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """A_0 as peft initialises lora_A (kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), fixed by `seed`;
    non-zero so the B gradient is non-zero at t = 0. B_0 = 0 so theta_0 is exactly the base model."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in layout.items():
        if name.endswith(".lora_A"):
            weights[name] = (torch.rand(shape, generator=generator) * 2 - 1) * shape[1] ** -0.5
        else:
            weights[name] = torch.zeros(shape)
    return weights


def lora_init_std(layout: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Hyperfan: the std of the classical init of each tensor seen as a linear map of its fan-in (in for A, r for B);
    FieldConfig.output_gain scales it to the size of a trajectory."""
    return {name: (3 * shape[1]) ** -0.5 for name, shape in layout.items()}
