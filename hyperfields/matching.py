"""Training objectives of the field: gradient matching along the trajectory, and supervised regression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from hyperfields.config import ObjectiveConfig
from hyperfields.tasks.base import Task, Weights

EPS = 1e-12


class NonFiniteError(RuntimeError):
    """A loss, gradient or field output held NaN or Inf."""


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))  # (N, 1, ...)


def update_direction(grads: Weights, rule: str) -> Weights:
    """u(g) per tensor and sample: the gradient (sgd), its sign, or the gradient of unit norm."""
    if rule == "sgd":
        return grads
    if rule == "sign":
        return {name: g.sign() for name, g in grads.items()}
    if rule == "normalized":
        return {name: g / (_per_sample_norm(g) + EPS) for name, g in grads.items()}
    raise ValueError(f"unknown update rule {rule!r}")


def task_gradients(task: Task, weights: Weights, inputs: Any, draws: int, generator: torch.Generator) -> tuple[Weights, torch.Tensor]:
    """Per-sample gradients of the task loss at `weights`, and the per-sample losses (N,)."""
    leaves = {name: w.detach().requires_grad_(True) for name, w in weights.items()}
    with torch.enable_grad():
        losses = task.loss(leaves, inputs, draws, generator)
        # Each sample's loss depends only on its own weights, so one backward gives every per-sample gradient.
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
    return dict(zip(leaves, grads)), losses.detach()


def real_trajectory(
    task: Task, start: Weights, inputs: Any, objective: ObjectiveConfig, generator: torch.Generator, steps: int,
    on_step: Callable[[int], None] | None = None,
) -> tuple[list[Weights], torch.Tensor]:
    """The weights after each of `steps` real updates from `start` (theta_{k+1} = theta_k - eta * u(grad)),
    and the per-sample task loss (N,) at `start`."""
    theta = {name: w.detach() for name, w in start.items()}
    trajectory, start_losses = [], None
    for k in range(steps):
        grads, losses = task_gradients(task, theta, inputs, objective.noise_draws, generator)
        if not torch.isfinite(losses).all() or not all(torch.isfinite(g).all() for g in grads.values()):
            raise NonFiniteError("non-finite task loss or gradient in a real update")
        start_losses = losses if start_losses is None else start_losses
        step = update_direction(grads, objective.update)
        theta = {name: theta[name] - objective.step_size * _cap(step[name], objective.max_step_norm / objective.step_size) for name in theta}
        trajectory.append(theta)
        if on_step is not None:
            on_step(k)
    return trajectory, start_losses


def _cap(step: torch.Tensor, max_norm: float) -> torch.Tensor:
    # Positive feedback guard: larger weights give larger gradients; bound each tensor's step.
    if max_norm <= 0:
        return step
    return step * (max_norm / (_per_sample_norm(step) + EPS)).clamp(max=1.0)


def step_loss(predicted_step: Weights, real_step: Weights, kind: str) -> torch.Tensor:
    """Mean over tensors and samples of the predicted step's error against the real step, per-tensor normalised."""
    pairs = [(predicted_step[name].flatten(1), real_step[name].flatten(1)) for name in real_step]
    # A tensor can have a zero real step (LoRA A while B = 0): floor its normaliser at 1% of the mean step.
    floor = 0.01 * torch.stack([r.pow(2).sum(dim=1).mean() for _, r in pairs]).mean() + EPS
    losses = []
    for p, r in pairs:
        r_sq = r.pow(2).sum(dim=1)
        if kind == "relative_mse":
            # Normalising by the real step's size keeps tiny per-step targets from shrinking predictions to zero.
            losses.append((p - r).pow(2).sum(dim=1) / torch.maximum(r_sq, floor))
        elif kind == "cosine_norm":
            cosine = torch.nn.functional.cosine_similarity(p, r, dim=1, eps=1e-8)
            ratio = 0.5 * torch.log((p.pow(2).sum(dim=1) + floor) / (r_sq + floor))
            losses.append(1 - cosine + ratio.pow(2))
        else:
            raise ValueError(f"unknown step loss {kind!r}")
    return torch.stack(losses).mean()


@dataclass
class MatchingStats:
    loss: torch.Tensor  # the objective, with grad
    task_loss: float  # mean task loss at the field's own prediction theta_hat
    step_norm: float  # mean real step norm per tensor


def gradient_matching_loss(
    field: Callable[..., Weights], task: Task, field_inputs: dict[str, torch.Tensor], inputs: Any,
    t: torch.Tensor, objective: ObjectiveConfig, generator: torch.Generator,
) -> MatchingStats:
    """K-step gradient matching: Psi(c, t+k) - Psi(c, t) against k real updates from stopgrad Psi(c, t)."""
    n, rollout = t.shape[0], objective.rollout
    # One field call for t, t+1 ... t+K: rows ordered (sample, k).
    all_t = (t.unsqueeze(1) + torch.arange(rollout + 1, device=t.device)).reshape(-1)
    repeated = {key: value.repeat_interleave(rollout + 1, dim=0) for key, value in field_inputs.items()}
    psi = {name: w.view(n, rollout + 1, *w.shape[1:]) for name, w in field(t=all_t, **repeated).items()}
    theta_hat = {name: w[:, 0].detach() for name, w in psi.items()}
    if not all(torch.isfinite(w).all() for w in theta_hat.values()):
        raise NonFiniteError("non-finite field output")
    targets, task_losses = real_trajectory(task, theta_hat, inputs, objective, generator, rollout)
    # The predicted step keeps the gradient through both ends: the field learns the difference
    # Psi(t+k) - Psi(t) directly instead of chasing a start point that moves with every update.
    loss = torch.stack([
        step_loss(
            {name: w[:, k + 1] - w[:, 0] for name, w in psi.items()},
            {name: targets[k][name] - theta_hat[name] for name in theta_hat},
            objective.loss,
        )
        for k in range(rollout)
    ]).mean()
    step_norm = torch.stack([(targets[0][name] - theta_hat[name]).flatten(1).norm(dim=1).mean() for name in theta_hat]).mean()
    return MatchingStats(loss=loss, task_loss=float(task_losses.mean()), step_norm=float(step_norm))


def supervised_loss(field: Callable[..., Weights], field_inputs: dict[str, torch.Tensor], theta_T: Weights, steps: int, theta0: Weights) -> torch.Tensor:
    """Two-phase baseline: ||Psi(c, T) - theta_T||, normalised per tensor by ||theta_T - theta_0||."""
    n = next(iter(theta_T.values())).shape[0]
    t = torch.full((n,), float(steps), device=next(iter(theta_T.values())).device)
    predicted = field(t=t, **field_inputs)
    return step_loss(
        {name: w - theta0[name] for name, w in predicted.items()},
        {name: w - theta0[name] for name, w in theta_T.items()},
        "relative_mse",
    )
