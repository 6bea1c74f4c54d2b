"""Training objectives of the field: gradient matching along the trajectory, end-to-end training at T, and
supervised regression on precomputed weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hyperfields.config import ObjectiveConfig
from hyperfields.tasks.base import Task, Weights
from hyperfields.trajectory import (
    EPS,
    NonFiniteError,
    all_finite,
    real_trajectory,
    shape_groups,
    stack_by_shape,
    tensor_norms,
    unstack_by_shape,
)


def step_loss(predicted_step: Weights, real_step: Weights, kind: str) -> torch.Tensor:
    """Mean over tensors and samples of the predicted step's error against the real step, per-tensor normalised."""
    groups = shape_groups(real_step)
    return _stacked_step_loss(stack_by_shape(predicted_step, groups), stack_by_shape(real_step, groups), kind)


def _stacked_step_loss(predicted: list[torch.Tensor], real: list[torch.Tensor], kind: str) -> torch.Tensor:
    pairs = [
        (p.reshape(*p.shape[:2], -1), r.reshape(*r.shape[:2], -1)) for p, r in zip(predicted, real)
    ]  # (N, n, numel)
    r_sq = torch.cat([r.pow(2).sum(dim=2) for _, r in pairs], dim=1)  # (N, tensors)
    # A tensor can have a zero real step (LoRA A while B = 0): floor its normaliser at 1% of the mean step.
    floor = 0.01 * r_sq.mean() + EPS
    if kind == "relative_mse":
        # Normalising by the real step's size keeps tiny per-step targets from shrinking predictions to zero.
        error = torch.cat([(p - r).pow(2).sum(dim=2) for p, r in pairs], dim=1)
        return (error / torch.maximum(r_sq, floor)).mean()
    if kind == "cosine_norm":
        cosine = torch.cat([torch.nn.functional.cosine_similarity(p, r, dim=2, eps=1e-8) for p, r in pairs], dim=1)
        p_sq = torch.cat([p.pow(2).sum(dim=2) for p, _ in pairs], dim=1)
        ratio = 0.5 * torch.log((p_sq + floor) / (r_sq + floor))
        return (1 - cosine + ratio.pow(2)).mean()
    raise ValueError(f"unknown step loss {kind!r}")


@dataclass
class MatchingStats:
    loss: torch.Tensor  # the objective, with grad
    task_loss: float  # mean task loss at the field's own prediction theta_hat
    step_norm: float  # mean real step norm per tensor


def gradient_matching_loss(
    field: Callable[..., Weights],
    task: Task,
    field_inputs: dict[str, torch.Tensor],
    inputs: Any,
    t: torch.Tensor,
    objective: ObjectiveConfig,
    generator: torch.Generator,
    lags: torch.Generator | None = None,
) -> MatchingStats:
    """K-step gradient matching: Psi(c, t+k) against k real updates from theta_hat = stopgrad Psi(c, t).

    `lags` draws, with momentum, which earlier point's direction stands for the running average (default: `generator`).
    """
    n, rollout = t.shape[0], objective.rollout
    # One field call for t, t+1 ... t+K (and T with end_weight, an earlier step with momentum) of each sample, its image
    # side computed once.
    steps = t.unsqueeze(1) + torch.arange(rollout + 1, device=t.device)  # (N, K+1)
    if objective.end_weight > 0:
        steps = torch.cat([steps, torch.full((n, 1), objective.steps, dtype=steps.dtype, device=t.device)], dim=1)
    if objective.momentum > 0:
        steps = torch.cat([steps, (t - lag_draws(t, objective.momentum, lags or generator)).unsqueeze(1)], dim=1)
    psi = field(t=steps, **field_inputs)  # each (N, M, *shape)
    at_T = {name: w[:, rollout + 1] for name, w in psi.items()} if objective.end_weight > 0 else None
    earlier = {name: w[:, -1].detach() for name, w in psi.items()} if objective.momentum > 0 else None
    psi = {name: w[:, : rollout + 1].reshape(-1, *w.shape[2:]) for name, w in psi.items()}  # rows ordered (sample, k)
    groups = shape_groups(psi)
    stacks = [s.view(n, rollout + 1, *s.shape[1:]) for s in stack_by_shape(psi, groups)]  # each (N, K+1, n, *shape)
    theta_hat = [s[:, 0].detach() for s in stacks]
    if not all_finite(theta_hat):
        raise NonFiniteError("non-finite field output")
    if earlier is None:
        targets, task_losses = real_trajectory(
            task, unstack_by_shape(theta_hat, groups, psi), inputs, objective, generator, rollout
        )
        real_steps = [[r - h for r, h in zip(stack_by_shape(target, groups), theta_hat)] for target in targets]
    else:
        # Momentum: the step from t is eta times the bias-corrected running average of the directions at the field's
        # own points 0 ... t, weighted beta^(t - k). The direction at one point k drawn with that weight is an unbiased
        # target for it: the field learns the average, grounded in real gradients, with no optimiser state to carry.
        plain = dataclasses.replace(objective, momentum=0.0)
        targets, task_losses = real_trajectory(task, earlier, inputs, plain, generator, 1)
        real_steps = [[r - e for r, e in zip(stack_by_shape(targets[0], groups), stack_by_shape(earlier, groups))]]
    # "position" (docs/design.md): only Psi(c, t+k) is fitted, to stopgrad(theta_hat + k real steps), so the field's own
    # start is corrected by the real gradient there and errors do not accumulate along t. "difference" keeps the
    # gradient through both ends and fits Psi(t+k) - Psi(t) as a whole.
    start = [s[:, 0].detach() if objective.match == "position" else s[:, 0] for s in stacks]
    predicted_steps = [[s[:, k + 1] - s0 for s, s0 in zip(stacks, start)] for k in range(rollout)]
    loss = torch.stack(
        [_stacked_step_loss(predicted_steps[k], real_steps[k], objective.loss) for k in range(rollout)]
    ).mean()
    if objective.hinge_weight > 0:
        psi_next = unstack_by_shape([s[:, 1] for s in stacks], groups, psi)
        loss = loss + objective.hinge_weight * hinge_loss(task, psi_next, targets[0], inputs, objective, generator)
    if objective.end_weight > 0:
        loss = loss + objective.end_weight * end_loss(task, at_T, inputs, objective, generator)
    step_norm = torch.cat([tensor_norms(r).reshape(n, -1) for r in real_steps[0]], dim=1).mean()
    return MatchingStats(loss=loss, task_loss=float(task_losses.mean()), step_norm=float(step_norm))


def lag_draws(t: torch.Tensor, beta: float, generator: torch.Generator) -> torch.Tensor:
    """Per sample, j in 0 ... t drawn with probability proportional to beta^j: how far back the direction that stands
    for the running average at t is taken."""
    j = torch.arange(int(t.max()) + 1, device=generator.device, dtype=torch.float32)
    weights = (beta**j).unsqueeze(0) * (j.unsqueeze(0) <= t.to(generator.device).unsqueeze(1))  # (N, t_max + 1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1).to(t.device)


def hinge_loss(
    task: Task, predicted: Weights, target: Weights, inputs: Any, objective: ObjectiveConfig, generator: torch.Generator
) -> torch.Tensor:
    """Mean over samples of relu(log L(Psi(c, t+1)) - log L(target)): the field's step must do at least as well on the
    task as the real update from its own start, in dB of the loss; both scored on the same draws."""
    state = generator.get_state()
    with torch.no_grad():
        floor = task.loss(target, inputs, objective.noise_draws, generator)
    generator.set_state(state)
    reached = task.loss(predicted, inputs, objective.noise_draws, generator)
    return torch.relu(torch.log(reached.clamp_min(EPS)) - torch.log(floor.clamp_min(EPS))).mean()


def end_loss(
    task: Task, at_T: Weights, inputs: Any, objective: ObjectiveConfig, generator: torch.Generator
) -> torch.Tensor:
    """Mean over samples of the task loss at Psi(c, T) (`at_T`, with grad) over theta_0's, on the same draws."""
    first = next(iter(at_T.values()))
    theta0 = {name: w.to(first.device).expand(first.shape[0], *w.shape) for name, w in task.initial_weights().items()}
    # Common random numbers: a diffusion loss varies by orders of magnitude with its noise and timestep draws, so
    # the normaliser is theta_0's loss on the very draws Psi(c, T) is scored on, not on draws of its own.
    state = generator.get_state()
    with torch.no_grad():
        start = task.loss(theta0, inputs, objective.noise_draws, generator)
    generator.set_state(state)
    return (task.loss(at_T, inputs, objective.noise_draws, generator) / start.clamp_min(EPS)).mean()


def direct_loss(
    field: Callable[..., Weights],
    task: Task,
    field_inputs: dict[str, torch.Tensor],
    inputs: Any,
    objective: ObjectiveConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """End-to-end training at T: the mean task loss at Psi(c, T), with the gradient through the task into the field."""
    return task.loss(field(t=objective.steps, **field_inputs), inputs, objective.noise_draws, generator).mean()


def supervised_loss(
    field: Callable[..., Weights], field_inputs: dict[str, torch.Tensor], theta_T: Weights, steps: int, theta0: Weights
) -> torch.Tensor:
    """Two-phase baseline: ||Psi(c, T) - theta_T||, normalised per tensor by ||theta_T - theta_0||."""
    n = next(iter(theta_T.values())).shape[0]
    t = torch.full((n,), float(steps), device=next(iter(theta_T.values())).device)
    predicted = field(t=t, **field_inputs)
    return step_loss(
        {name: w - theta0[name] for name, w in predicted.items()},
        {name: w - theta0[name] for name, w in theta_T.items()},
        "relative_mse",
    )


@dataclass
class MicroBatch:
    """One micro-batch as every objective takes it."""

    field_inputs: dict[str, torch.Tensor]  # the field's image side: images, or a frozen encoder's tokens
    inputs: Any  # the task's prepared inputs for the same images
    t: torch.Tensor  # (N,) steps t of gradient matching
    generator: torch.Generator  # the task's noise draws
    theta_T: Weights | None = None  # supervised: the precomputed theta_T of these images
    theta0: Weights | None = None  # supervised: the field's theta_0
    lags: torch.Generator | None = None  # matching with momentum: which earlier point stands for the running average


Objective = Callable[[Callable[..., Weights], Task, MicroBatch, ObjectiveConfig], tuple[torch.Tensor, dict[str, float]]]


def _matching(
    field: Callable[..., Weights],
    task: Task,
    batch: MicroBatch,
    objective: ObjectiveConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    stats = gradient_matching_loss(
        field, task, batch.field_inputs, batch.inputs, batch.t, objective, batch.generator, batch.lags
    )
    return stats.loss, {"task_loss": stats.task_loss, "step_norm": stats.step_norm}


def _direct(
    field: Callable[..., Weights],
    task: Task,
    batch: MicroBatch,
    objective: ObjectiveConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    loss = direct_loss(field, task, batch.field_inputs, batch.inputs, objective, batch.generator)
    return loss, {"task_loss": float(loss.detach())}


def _supervised(
    field: Callable[..., Weights],
    task: Task,
    batch: MicroBatch,
    objective: ObjectiveConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    if batch.theta_T is None or batch.theta0 is None:
        raise ValueError("objective.kind=supervised needs the micro-batch's precomputed theta_T and theta_0")
    return supervised_loss(field, batch.field_inputs, batch.theta_T, objective.steps, batch.theta0), {}


OBJECTIVES: dict[str, Objective] = {"matching": _matching, "direct": _direct, "supervised": _supervised}


def objective_loss(
    field: Callable[..., Weights],
    task: Task,
    batch: MicroBatch,
    objective: ObjectiveConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of `objective.kind` on one micro-batch, with grad, and the mean values to log beside it."""
    return OBJECTIVES[objective.kind](field, task, batch, objective)
