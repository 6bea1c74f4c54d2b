"""Exponential moving average of the field's trainable parameters."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from hyperfields.files import write_safetensors


class EMA:
    """Exponential moving average of the trainable parameters, checkpointed with the rest."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float) -> None:
        self.parameters = parameters
        self.decay = decay
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.parameters], 1 - self.decay)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        for shadow, p in zip(self.shadow, self.parameters):
            p.copy_(shadow)

    def save(self, path: Path) -> None:
        # safetensors, not accelerate's custom-object pickle: a checkpoint never needs unpickling.
        write_safetensors(path, {str(i): s.detach().contiguous().cpu() for i, s in enumerate(self.shadow)})

    def load(self, path: Path) -> None:
        tensors = load_file(str(path))
        self.shadow = [tensors[str(i)].to(p.device) for i, p in enumerate(self.parameters)]
