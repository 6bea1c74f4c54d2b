"""Samplers by the names users know: a short table of diffusers schedulers, built from a pipeline's own config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hyperfields.errors import UserError


@dataclass(frozen=True)
class Sampler:
    scheduler: str  # the diffusers scheduler class
    label: str  # A1111's name of the same sampler, written into the images' parameters
    options: dict[str, Any] = field(default_factory=dict)  # set over the pipeline's scheduler config


SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler("DDIMScheduler", "DDIM"),
    "ddpm": Sampler("DDPMScheduler", "DDPM"),
    # As Stable Diffusion ships PNDM, and as PLMS runs: without the Runge-Kutta warm-up, which fails below 4 steps.
    "pndm": Sampler("PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
    "lms": Sampler("LMSDiscreteScheduler", "LMS"),
    "euler": Sampler("EulerDiscreteScheduler", "Euler"),
    "euler-a": Sampler("EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": Sampler("HeunDiscreteScheduler", "Heun"),
    "dpm++": Sampler("DPMSolverMultistepScheduler", "DPM++ 2M"),  # dpmsolver++ of order 2, diffusers' default
    "dpmsolver-multistep": Sampler("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "unipc": Sampler("UniPCMultistepScheduler", "UniPC"),
}


def check_sampler(name: str | None) -> None:
    """Nothing when `name` is None (the pipeline's own scheduler) or in SAMPLERS; else a one-line UserError."""
    if name is not None and name not in SAMPLERS:
        raise UserError(f"unknown scheduler '{name}'; known: {', '.join(SAMPLERS)}")


def use_sampler(pipeline: Any, name: str | None) -> str:
    """A1111's label of the sampler `pipeline` now uses: `name`'s scheduler built from the pipeline's scheduler
    config, or the pipeline's own scheduler when `name` is None (its class name when the table does not know it)."""
    import diffusers

    check_sampler(name)
    if name is not None:
        sampler = SAMPLERS[name]
        pipeline.scheduler = getattr(diffusers, sampler.scheduler).from_config(
            pipeline.scheduler.config, **sampler.options
        )
    own = type(pipeline.scheduler).__name__
    return next((sampler.label for sampler in SAMPLERS.values() if sampler.scheduler == own), own)
