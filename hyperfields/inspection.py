"""What a field generates: tensor statistics against the hyperfan target, and the size of the update along t.

For a LoRA field, per LoRA target, the update is ||scale B_t A_t|| / ||W|| against the base weight W; for a field of
any other task, per tensor, it is ||Psi(c, t) - theta_0|| / ||theta_0||.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperfields.field.model import HyperField
from hyperfields.field.record import FieldRecord
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


@dataclass
class TensorReport:
    """One generated tensor: its std at t = T next to the hyperfan std, and how far it moved from theta_0 along t."""

    name: str
    std: float  # std of the generated Delta(c, T) = Psi(c, T) - theta_0
    hyperfan: float
    relative_update: dict[float, float]  # t -> ||Psi(c, t) - theta_0|| / ||theta_0||


def inspection_steps(steps: int) -> list[float]:
    """The steps inspected: t = 0 (exactly theta_0, the base model for a LoRA), T / 2 and T."""
    return [0.0, steps / 2, float(steps)]


@torch.no_grad()
def _outputs(field: HyperField, pixels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Psi(c, t) by name, fp32 on the CPU, at each inspected step t for the condition photos `pixels`."""
    device = next(field.parameters()).device
    steps = inspection_steps(field.steps)
    images = pixels.unsqueeze(0).expand(len(steps), -1, -1, -1, -1).to(device)  # (S, P, 3, H, W), one per step
    outputs = field(t=torch.tensor(steps, device=device), images=images)
    return [{name: w[i].float().cpu() for name, w in outputs.items()} for i in range(len(steps))]


def inspect_tensors(field: HyperField, pixels: torch.Tensor) -> list[TensorReport]:
    """One report per generated tensor for the condition photos `pixels` (P, 3, H, W) in [-1, 1]: a subject's."""
    outputs, steps = _outputs(field, pixels), inspection_steps(field.steps)
    theta0, hyperfan = {name: w.float().cpu() for name, w in field.theta0().items()}, field.init_std()
    return [
        TensorReport(
            name=name,
            std=float((outputs[-1][name] - theta0[name]).std()),
            hyperfan=hyperfan[name],
            relative_update={
                t: float((out[name] - theta0[name]).norm() / theta0[name].norm()) for t, out in zip(steps, outputs)
            },
        )
        for name in field.names
    ]


def inspect_lora_field(
    field: HyperField, record: FieldRecord, denoiser: torch.nn.Module, pixels: torch.Tensor
) -> list[TargetReport]:
    """One report per LoRA target for the condition photos `pixels` (P, 3, H, W) in [-1, 1], against the base
    weights."""
    steps = inspection_steps(field.steps)
    loras = [LoraWeights(out, alpha=float(record.task_settings["alpha"])) for out in _outputs(field, pixels)]
    theta0, hyperfan = field.theta0(), field.init_std()
    reports = []
    for target in loras[-1].targets:
        key_a, key_b = f"{target}.lora_A", f"{target}.lora_B"
        base = denoiser.get_submodule(target).weight.detach().float().cpu()
        reports.append(
            TargetReport(
                target=target,
                std_a=float((loras[-1].tensors[key_a] - theta0[key_a].cpu()).std()),
                std_b=float((loras[-1].tensors[key_b] - theta0[key_b].cpu()).std()),
                hyperfan_a=hyperfan[key_a],
                hyperfan_b=hyperfan[key_b],
                relative_update={t: float(lora.delta(target).norm() / base.norm()) for t, lora in zip(steps, loras)},
            )
        )
    return reports
