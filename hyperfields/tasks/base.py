"""The Task protocol: what the field learns to predict and the loss that defines the trajectory."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

Weights = dict[str, torch.Tensor]  # name -> (N, *shape): one set of adapter weights per sample


@runtime_checkable
class Task(Protocol):
    """A per-subject optimisation problem: adapter layout, fixed start theta_0, per-sample loss."""

    def layout(self) -> dict[str, tuple[int, ...]]:
        """{name: shape} of every adapter tensor, in a fixed order."""

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """theta_0 by name, without batch dimension; fixed by a seed."""

    def init_std(self) -> dict[str, float]:
        """The std each generated tensor should have at init (hyperfan target)."""

    def record(self) -> dict[str, Any]:
        """The task's own keys for a field's record (config.json): what using its predictions needs."""

    def prepare(self, images: torch.Tensor, captions: list[str]) -> Any:
        """Everything the loss needs from a batch of conditions that does not depend on the weights."""

    def loss(self, weights: Weights, inputs: Any, draws: int, generator: torch.Generator) -> torch.Tensor:
        """Per-sample task loss (N,), averaged over `draws` random draws taken from `generator`."""


@runtime_checkable
class ImageFittingTask(Task, Protocol):
    """A task whose loss is a reconstruction of the condition image: quality is reported as PSNR."""

    def reconstruction_error(self, weights: Weights, inputs: Any) -> torch.Tensor:
        """Per-sample MSE (N,) over every pixel, colours in [-1, 1]: deterministic, no draws."""
