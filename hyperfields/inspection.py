"""What a field generates, per LoRA target: tensor statistics against the hyperfan target, and update size along t."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperfields.field.model import HyperField
from hyperfields.lora.formats import LoraWeights


@dataclass
class TargetReport:
    """One LoRA target: the generated tensors' std at t = T next to the hyperfan std they were initialised to."""

    target: str
    std_a: float  # std of the generated Delta_A(c, T) = Psi_A(c, T) - A_0
    std_b: float
    hyperfan_a: float  # the std the hyperfan init gives Delta_A (field.init_std())
    hyperfan_b: float
    relative_update: dict[float, float]  # t -> ||scale * B_t @ A_t|| / ||W||, W the base weight


def inspection_steps(steps: int) -> list[float]:
    """The steps inspected: t = 0 (exactly the base model), T / 2 and T."""
    return [0.0, steps / 2, float(steps)]


@torch.no_grad()
def inspect_field(field: HyperField, unet: torch.nn.Module, pixels: torch.Tensor) -> list[TargetReport]:
    """One report per LoRA target for the condition image `pixels` (3, H, W) in [-1, 1], against `unet`'s base weights."""
    device = next(field.parameters()).device
    steps = inspection_steps(field.steps)
    outputs = field(t=torch.tensor(steps, device=device), images=pixels.unsqueeze(0).expand(len(steps), -1, -1, -1).to(device))
    loras = [LoraWeights({name: w[i].float().cpu() for name, w in outputs.items()}, alpha=float(field.record["alpha"]))
             for i in range(len(steps))]
    theta0, hyperfan = field.theta0(), field.init_std()
    reports = []
    for target in loras[-1].targets:
        key_a, key_b = f"{target}.lora_A", f"{target}.lora_B"
        base = unet.get_submodule(target).weight.detach().float().cpu()
        reports.append(TargetReport(
            target=target,
            std_a=float((loras[-1].tensors[key_a] - theta0[key_a].cpu()).std()),
            std_b=float((loras[-1].tensors[key_b] - theta0[key_b].cpu()).std()),
            hyperfan_a=hyperfan[key_a], hyperfan_b=hyperfan[key_b],
            relative_update={t: float(lora.delta(target).norm() / base.norm()) for t, lora in zip(steps, loras)},
        ))
    return reports
