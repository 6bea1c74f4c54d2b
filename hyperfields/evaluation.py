"""Held-out quality: the recovered fraction R of the loss drop that real optimisation achieves (DESIGN.md 6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from hyperfields.config import ObjectiveConfig
from hyperfields.matching import real_trajectory
from hyperfields.tasks.base import Task, Weights


@dataclass
class HeldoutReference:
    """Real optimisation on held-out conditions, computed once: its losses do not change as the field trains."""

    inputs: Any
    loss_theta0: float  # mean task loss of theta_0 on the fixed evaluation draws
    loss_real: float  # ... of real optimisation after T steps
    draws: int
    seed: int


@dataclass
class HeldoutReport:
    loss_theta0: float
    loss_real: float
    loss_field: float

    @property
    def recovered(self) -> float:
        """R = (L(theta_0) - L(Psi)) / (L(theta_0) - L(theta_T)): 1 means as good as real optimisation."""
        gain = self.loss_theta0 - self.loss_real
        return (self.loss_theta0 - self.loss_field) / gain if gain > 0 else float("nan")


def _eval_loss(task: Task, weights: Weights, reference: HeldoutReference) -> float:
    device = next(iter(weights.values())).device
    generator = torch.Generator(device=device).manual_seed(reference.seed)
    with torch.no_grad():
        return float(task.loss(weights, reference.inputs, reference.draws, generator).mean())


def heldout_reference(
    task: Task, images: torch.Tensor, captions: list[str], objective: ObjectiveConfig, draws: int, seed: int,
    on_step: Callable[[int], None] | None = None,
) -> HeldoutReference:
    """Run the real per-subject optimisation for T steps on each held-out condition and score theta_0 and theta_T."""
    inputs = task.prepare(images, captions)
    n = images.shape[0]
    theta0 = {name: w.to(images.device).unsqueeze(0).expand(n, *w.shape) for name, w in task.initial_weights().items()}
    generator = torch.Generator(device=images.device).manual_seed(seed + 1)
    trajectory, _ = real_trajectory(task, theta0, inputs, objective, generator, objective.steps, on_step)
    reference = HeldoutReference(inputs=inputs, loss_theta0=0.0, loss_real=0.0, draws=draws, seed=seed)
    reference.loss_theta0 = _eval_loss(task, theta0, reference)
    reference.loss_real = _eval_loss(task, trajectory[-1], reference)
    return reference


def evaluate_field(task: Task, field: Callable[..., Weights], images: torch.Tensor, reference: HeldoutReference, steps: int) -> HeldoutReport:
    """Score the field's prediction Psi(c, T) on the held-out conditions against theta_0 and real optimisation."""
    with torch.no_grad():
        predicted = field(t=torch.full((images.shape[0],), float(steps), device=images.device), images=images)
    return HeldoutReport(reference.loss_theta0, reference.loss_real, _eval_loss(task, predicted, reference))
