"""Real per-subject optimisation: task gradients, update rules and the trajectory theta_0 ... theta_T they make.

Per-tensor maths runs on stacks of the tensors that share a shape: a UNet LoRA has hundreds to a thousand tensors in
a handful of shapes, and a few ops per shape instead of per tensor keeps the step's op count (kernel launches on a
GPU) independent of the number of LoRA layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from hyperfields.config import ObjectiveConfig
from hyperfields.tasks.base import Task, Weights

EPS = 1e-12


class NonFiniteError(RuntimeError):
    """A loss, gradient or field output held NaN or Inf."""


def shape_groups(weights: Weights) -> list[list[str]]:
    """The names of `weights` grouped by per-sample shape, in order of first appearance."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, w in weights.items():
        groups.setdefault(tuple(w.shape[1:]), []).append(name)
    return list(groups.values())


def stack_by_shape(weights: Weights, groups: list[list[str]]) -> list[torch.Tensor]:
    return [torch.stack([weights[name] for name in names], dim=1) for names in groups]  # each (N, n, *shape)


def unstack_by_shape(stacks: list[torch.Tensor], groups: list[list[str]], order: Iterable[str]) -> Weights:
    """The tensors of the stacks by name, in `order`."""
    found = {name: w for names, stack in zip(groups, stacks) for name, w in zip(names, stack.unbind(1))}
    return {name: found[name] for name in order}


def tensor_norms(stack: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-tensor norms of a stack (N, n, *shape), shaped (N, n, 1, ...) to broadcast against it."""
    return stack.reshape(*stack.shape[:2], -1).norm(dim=2).view(*stack.shape[:2], *([1] * (stack.ndim - 2)))


def all_finite(tensors: list[torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())  # one device sync, not one per tensor


def _direction(stack: torch.Tensor, rule: str) -> torch.Tensor:
    if rule == "sgd":
        return stack
    if rule == "sign":
        return stack.sign()
    if rule == "normalized":
        return stack / (tensor_norms(stack) + EPS)
    raise ValueError(f"unknown update rule {rule!r}")


def update_direction(grads: Weights, rule: str) -> Weights:
    """u(g) per tensor and sample: the gradient (sgd), its sign, or the gradient of unit norm."""
    groups = shape_groups(grads)
    return unstack_by_shape([_direction(g, rule) for g in stack_by_shape(grads, groups)], groups, grads)


def task_gradients(
    task: Task, weights: Weights, inputs: Any, draws: int, generator: torch.Generator
) -> tuple[Weights, torch.Tensor]:
    """Per-sample gradients of the task loss at `weights`, and the per-sample losses (N,)."""
    leaves = {name: w.detach().requires_grad_(True) for name, w in weights.items()}
    with torch.enable_grad():
        losses = task.loss(leaves, inputs, draws, generator)
        # Each sample's loss depends only on its own weights, so one backward gives every per-sample gradient.
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
    return dict(zip(leaves, grads)), losses.detach()


def real_trajectory(
    task: Task,
    start: Weights,
    inputs: Any,
    objective: ObjectiveConfig,
    generator: torch.Generator,
    steps: int,
    on_step: Callable[[int], None] | None = None,
    velocity: Weights | None = None,
    first: torch.Tensor | int = 0,
) -> tuple[list[Weights], torch.Tensor]:
    """The weights after each of `steps` real updates from `start`, and the per-sample task loss (N,) at `start`.

    Without momentum, theta_{k+1} = theta_k - eta u(grad). With objective.momentum = beta, the directions are averaged
    as Adam averages gradients, bias-corrected: m_{k+1} = beta m_k + (1 - beta) u(grad), theta_{k+1} = theta_k -
    eta m_{k+1} / (1 - beta^(k+1)); `velocity` is m at `start` (zero when None) and `first` the number of updates
    that led to `start` (per sample (N,) or one for all).
    """
    theta = {name: w.detach() for name, w in start.items()}
    groups = shape_groups(theta)
    beta = objective.momentum
    if beta > 0:
        count = torch.as_tensor(first, dtype=torch.float32)
        average = (
            [torch.zeros_like(w) for w in stack_by_shape(theta, groups)]
            if velocity is None
            else [v.detach() for v in stack_by_shape(velocity, groups)]
        )
    trajectory, start_losses = [], None
    for k in range(steps):
        grads, losses = task_gradients(task, theta, inputs, objective.noise_draws, generator)
        stacked = stack_by_shape(grads, groups)
        if not all_finite([losses, *stacked]):
            raise NonFiniteError("non-finite task loss or gradient in a real update")
        start_losses = losses if start_losses is None else start_losses
        max_norm = objective.max_step_norm / objective.step_size
        directions = [_cap(_direction(g, objective.update), max_norm) for g in stacked]
        if beta > 0:
            average = [beta * m + (1 - beta) * u for m, u in zip(average, directions)]
            count = count + 1
            correction = (1 - beta**count).to(stacked[0].device)
            directions = [m / correction.view(-1, *([1] * (m.ndim - 1))) for m in average]
        updated = [w - objective.step_size * u for w, u in zip(stack_by_shape(theta, groups), directions)]
        theta = unstack_by_shape(updated, groups, start)
        trajectory.append(theta)
        if on_step is not None:
            on_step(k)
    return trajectory, start_losses


def _cap(step: torch.Tensor, max_norm: float) -> torch.Tensor:
    # Positive feedback guard: larger weights give larger gradients; bound each tensor's step.
    if max_norm <= 0:
        return step
    return step * (max_norm / (tensor_norms(step) + EPS)).clamp(max=1.0)
