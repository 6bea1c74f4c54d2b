"""The arms of an evaluation: how a subject's LoRA is made, from nothing (the base model) to real optimisation.

- base: no LoRA, the floor every other arm is measured from;
- field: the field's prediction Psi(c, t) at T, and at any other step t asked for (the strength sweep);
- refine: Psi(c, T) continued by N real updates of the field's own rule, as `hyperfields refine` does;
- optimise: real per-subject optimisation from theta_0 for T steps of that rule: what the field imitates;
- dreambooth: plain DreamBooth-LoRA training from theta_0 with AdamW for a given number of steps, the usual baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from hyperfields.config import LoraConfig, ObjectiveConfig
from hyperfields.errors import UserError
from hyperfields.field.model import HyperField
from hyperfields.field.record import FieldRecord
from hyperfields.predict import PhotoSet, predicted_weights
from hyperfields.refine import optimised, subject_inputs
from hyperfields.streams import stream
from hyperfields.tasks.lora_diffusion import LoraDiffusionTask
from hyperfields.tasks.lora_flow import LoraFlowTask
from hyperfields.tasks.subject import SubjectTask

ARMS = ("base", "field", "refine", "optimise", "dreambooth")


@dataclass(frozen=True)
class Arm:
    """One row of an evaluation: an arm and the trajectory step its weights stand for."""

    kind: str  # one of ARMS
    t: float  # base: 0; field: the step asked for; refine: T + updates; optimise: T; dreambooth: its AdamW steps
    label: str  # its name in tables and on contact sheets: the kind, and the step of field rows before T


def parse_arms(text: str) -> list[str]:
    """The arm kinds in a comma-separated list, in the order given; a UserError naming an unknown or repeated one."""
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    if not kinds:
        raise UserError(f"no arm given; the arms are {', '.join(ARMS)}")
    for kind in kinds:
        if kind not in ARMS:
            raise UserError(f"unknown arm {kind!r}; the arms are {', '.join(ARMS)}")
    if len(set(kinds)) != len(kinds):
        raise UserError(f"arms {text!r} name one arm twice")
    return kinds


def arm_rows(
    kinds: list[str], steps: int, field_steps: list[float], refine_updates: int, dreambooth_steps: int
) -> list[Arm]:
    """The rows of an evaluation: one per arm, the field's at T and then at each of `field_steps` (in [0, T])."""
    for t in field_steps:
        if not 0.0 <= t <= steps:
            raise UserError(f"step {t:g} is outside [0, {steps}] (the field was trained for T = {steps} steps)")
    rows = []
    for kind in kinds:
        if kind == "field":
            rows.append(Arm("field", float(steps), "field"))
            rows += [Arm("field", float(t), f"field t={t:g}") for t in sorted(set(field_steps)) if t != steps]
        else:
            t = {"base": 0, "refine": steps + refine_updates, "optimise": steps, "dreambooth": dreambooth_steps}[kind]
            rows.append(Arm(kind, float(t), kind))
    return rows


def field_lora(record: FieldRecord) -> LoraConfig:
    """The LoRA a field predicts, as a task's settings: its targets, rank, alpha and A_0 seed."""
    first_a = next(name for name in record.layout if name.endswith(".lora_A"))
    return LoraConfig(
        targets=[name.removesuffix(".lora_A") for name in record.layout if name.endswith(".lora_A")],
        rank=record.layout[first_a][0],
        alpha=float(record.task_settings["alpha"]),
        init_seed=int(record.task_settings.get("init_seed", 0)),
    )


class Personaliser:
    """The LoRA each arm makes for a subject, on the frozen models of `task` (a UNet's or a FLUX.1 / SD 3.x
    transformer's LoRA task of `field_lora(record)`, on the field's device)."""

    def __init__(
        self,
        field: HyperField,
        record: FieldRecord,
        task: LoraDiffusionTask | LoraFlowTask,
        objective: ObjectiveConfig,
        seed: int,
        dreambooth_lr: float = 1e-4,
    ) -> None:
        self.field, self.objective, self.seed, self.dreambooth_lr = field, objective, seed, dreambooth_lr
        self.task = SubjectTask(task)
        self.caption = record.caption_template.format(token=record.token)

    def weights(self, arm: Arm, photos: PhotoSet, subject: int) -> tuple[dict[str, torch.Tensor] | None, float]:
        """The arm's LoRA tensors for the subject of `photos` (None for the base model), and the seconds they took to
        make."""
        started = time.perf_counter()
        if arm.kind == "base":
            return None, 0.0
        steps = self.field.steps
        if arm.kind == "field":
            weights = predicted_weights(self.field, photos, arm.t)
        else:
            inputs = subject_inputs(self.task, photos, self.caption)
            # Each subject and arm draws its own noise, the same on every run.
            generator = stream(self.seed, arm.kind, index=subject, device=self.task.device)
            if arm.kind == "refine":
                start = predicted_weights(self.field, photos, float(steps))
                weights = optimised(self.task, start, inputs, self.objective, int(arm.t) - steps, generator)
            elif arm.kind == "optimise":
                weights = optimised(self.task, self.task.initial_weights(), inputs, self.objective, steps, generator)
            else:
                weights = self._adamw(inputs, int(arm.t), generator)
        if self.task.device.type == "cuda":
            torch.cuda.synchronize(self.task.device)
        return weights, time.perf_counter() - started

    def _adamw(self, inputs: Any, steps: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        # DreamBooth-LoRA as diffusers' scripts train it: AdamW (weight decay 1e-2) on the base's own loss (noise
        # prediction, or FLUX.1's / SD 3.x's flow matching),
        # from peft's init (theta_0), drawing the field's noise_draws noises and timesteps per step.
        device = self.task.device
        weights = {name: w[None].to(device).clone().requires_grad_() for name, w in self.task.initial_weights().items()}
        optimizer = torch.optim.AdamW(list(weights.values()), lr=self.dreambooth_lr, weight_decay=1e-2)
        for _ in range(steps):
            with torch.enable_grad():
                loss = self.task.loss(weights, inputs, self.objective.noise_draws, generator).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
        return {name: w[0].detach().cpu() for name, w in weights.items()}
