"""Held-out quality (docs/design.md, how quality is measured): the recovered fraction R of the loss drop that
real optimisation achieves, and PSNR for image-fitting tasks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hyperfields.config import ObjectiveConfig
from hyperfields.streams import stream
from hyperfields.tasks.base import ImageFittingTask, Task, Weights
from hyperfields.trajectory import real_trajectory


def psnr_db(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of colours in [-1, 1] (peak-to-peak 2) from their mean squared error."""
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def heldout_losses(task: Task, weights: Weights, inputs: Any, draws: int, seed: int, group: int = 0) -> torch.Tensor:
    """Per-sample loss (N,) on fixed, seeded evaluation draws; every pixel, no draws, for image-fitting tasks.

    Conditions scored together as `group` share one evaluation stream: a condition's draws depend on the group it
    is scored in, so every weight scored on it (theta_0, theta_T, the field's) is scored in the same group.
    """
    with torch.no_grad():
        if isinstance(task, ImageFittingTask):
            return task.reconstruction_error(weights, inputs)
        device = next(iter(weights.values())).device
        return task.loss(weights, inputs, draws, stream(seed, "evaluation", process=group, device=device))


@dataclass
class HeldoutReference:
    """Real optimisation of held-out conditions, per condition: its scores do not change as the field trains."""

    theta_T: Weights  # name -> (N, *shape): the weights after T real updates
    loss_theta0: torch.Tensor  # (N,) task loss of theta_0 on the fixed evaluation draws
    loss_real: torch.Tensor  # (N,) ... of theta_T


@dataclass
class HeldoutReport:
    loss_theta0: float
    loss_real: float
    loss_field: float
    psnr_theta0: float | None = None
    psnr_real: float | None = None
    psnr_field: float | None = None

    @classmethod
    def from_losses(cls, task: Task, theta0: torch.Tensor, real: torch.Tensor, field: torch.Tensor) -> HeldoutReport:
        """The report of per-condition losses (N,) of theta_0, real theta_T and the field: means over conditions,
        and mean per-condition PSNRs for image-fitting tasks."""
        psnr = [
            float(psnr_db(losses).mean()) if isinstance(task, ImageFittingTask) else None
            for losses in (theta0, real, field)
        ]
        return cls(float(theta0.mean()), float(real.mean()), float(field.mean()), *psnr)

    @property
    def recovered(self) -> float:
        """R = (L(theta_0) - L(Psi)) / (L(theta_0) - L(theta_T)): 1 means as good as real optimisation."""
        gain = self.loss_theta0 - self.loss_real
        return (self.loss_theta0 - self.loss_field) / gain if gain > 0 else float("nan")

    def summary(self) -> str:
        """One line: theta_0, real theta_T and the field at T, in PSNR where the task has it, and R."""
        if self.psnr_field is not None:
            return (
                f"held-out PSNR theta_0 {self.psnr_theta0:.2f} dB, real theta_T {self.psnr_real:.2f} dB, "
                f"field Psi(c,T) {self.psnr_field:.2f} dB (recovered fraction R = {self.recovered:.3f})"
            )
        return (
            f"held-out loss theta_0 {self.loss_theta0:.4f}, real theta_T {self.loss_real:.4f}, "
            f"field Psi(c,T) {self.loss_field:.4f} -> recovered fraction R = {self.recovered:.3f}"
        )

    def metrics(self) -> dict[str, float]:
        """The report as tracker scalars under heldout/."""
        values = {
            "R": self.recovered,
            "loss_field": self.loss_field,
            "loss_real": self.loss_real,
            "loss_theta0": self.loss_theta0,
            "psnr_field": self.psnr_field,
            "psnr_real": self.psnr_real,
            "psnr_theta0": self.psnr_theta0,
        }
        return {f"heldout/{key}": value for key, value in values.items() if value is not None}


def heldout_reference(
    task: Task,
    images: torch.Tensor,
    inputs: Any,
    objective: ObjectiveConfig,
    draws: int,
    seed: int,
    group: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> HeldoutReference:
    """Run the real per-subject optimisation for T steps on held-out conditions (`images`, prepared as `inputs`)
    and score theta_0 and theta_T; conditions computed together as `group` share its random streams."""
    n = images.shape[0]
    theta0 = {name: w.to(images.device).unsqueeze(0).expand(n, *w.shape) for name, w in task.initial_weights().items()}
    generator = stream(seed, "reference", process=group, device=images.device)
    trajectory, _ = real_trajectory(task, theta0, inputs, objective, generator, objective.steps, on_step)
    theta_T = trajectory[-1]
    return HeldoutReference(
        theta_T,
        heldout_losses(task, theta0, inputs, draws, seed, group),
        heldout_losses(task, theta_T, inputs, draws, seed, group),
    )


def field_losses(
    task: Task,
    field: Callable[..., Weights],
    images: torch.Tensor,
    inputs: Any,
    draws: int,
    seed: int,
    steps: int,
    group: int = 0,
    photo_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-condition loss (N,) of the field's Psi(c, T), on the draws `heldout_reference` scored `group` on; the
    conditions are images (N, 3, H, W) or subjects of P photos (N, P, 3, H, W) with `photo_mask` (N, P)."""
    with torch.no_grad():
        t = torch.full((images.shape[0],), float(steps), device=images.device)
        predicted = field(t=t, images=images, photo_mask=photo_mask)
    return heldout_losses(task, predicted, inputs, draws, seed, group)
