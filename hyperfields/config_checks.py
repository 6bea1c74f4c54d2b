"""The checks of a run configuration once every value is set: ranges, and settings that contradict each other."""

from __future__ import annotations

from typing import Any

from hyperfields.errors import UserError

# The checks read a hyperfields.config.Config; they do not import it, so config.py can import them.
Config = Any

_POSITIVE = {
    "model.resolution",
    "lora.rank",
    "lora.alpha",
    "inr.hidden",
    "inr.layers",
    "inr.frequencies",
    "inr.frequency_scale",
    "field.width",
    "field.depth",
    "field.heads",
    "field.mlp_ratio",
    "objective.steps",
    "objective.step_size",
    "objective.rollout",
    "objective.noise_draws",
    "train.max_steps",
    "train.batch_size",
    "train.learning_rate",
    "train.gradient_accumulation",
    "train.eval_draws",
    "train.log_every",
    "train.validation_images",
    "data.photos_per_subject",
    "data.field_photos",
}


def validate(config: Config) -> None:
    """Raise a one-line UserError for the first value out of range or settings that contradict each other; resolve
    the former train.cache_latents into train.cache."""
    for key in _POSITIVE:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value <= 0:
            raise UserError(f"config key '{key}': must be positive, got {value}")
    if config.field.width % config.field.heads:
        raise UserError(
            f"config key 'field.width': {config.field.width} is not divisible by field.heads={config.field.heads}"
        )
    objective = config.objective
    if objective.momentum > 0 and (
        objective.rollout > 1 or objective.hinge_weight > 0 or objective.loss != "relative_mse"
    ):
        # Each step is fitted to the direction at one earlier point drawn at random: an unbiased target for the
        # running average under a squared error, not under a loss that normalises each target's length.
        raise UserError(
            "config key 'objective.momentum': gradient matching with momentum needs objective.loss=relative_mse, "
            "objective.rollout=1 and objective.hinge_weight=0"
        )
    if config.objective.rollout >= config.objective.steps:
        rollout, steps = config.objective.rollout, config.objective.steps
        raise UserError(f"config key 'objective.rollout': {rollout} must be below objective.steps={steps}")
    for key, value in (("train.ema_decay", config.train.ema_decay), ("objective.momentum", config.objective.momentum)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"config key '{key}': must be in [0, 1), got {value}")
    for key in (
        "train.warmup_steps",
        "train.checkpoint_every",
        "train.checkpoints_limit",
        "train.eval_every",
        "train.heldout",
        "train.skip_nonfinite",
        "train.validation_every",
        "train.weight_decay",
        "train.max_grad_norm",
        "objective.max_step_norm",
        "objective.end_weight",
        "objective.hinge_weight",
        "inr.pixels",
        "field.spatial_rank",
    ):
        section, name = key.split(".")
        if getattr(getattr(config, section), name) < 0:
            raise UserError(f"config key '{key}': must not be negative")
    if config.train.cache_latents:
        if config.train.cache == "disk":
            raise UserError(
                "config key 'train.cache_latents': it is the old name of train.cache=memory and "
                "contradicts train.cache=disk; remove train.cache_latents"
            )
        config.train.cache = "memory"  # the alias resolved once, so only train.cache is ever read
    _validate_samples(config)
    for tau in config.field.time_constants:
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0 < tau < float("inf"):
            raise UserError(f"config key 'field.time_constants': each must be a positive number of steps, got {tau!r}")
    if "{token}" not in config.data.caption_template and config.data.caption_template.count("{") > 0:
        template = config.data.caption_template
        raise UserError(
            f"config key 'data.caption_template': only the {{token}} placeholder is allowed, got {template!r}"
        )


def _validate_samples(config: Config) -> None:
    train = config.train
    if not train.validation_prompts:
        return
    if config.model.task != "lora":
        raise UserError("config key 'train.validation_prompts': samples need a LoRA field (model.task=lora)")
    if train.heldout == 0:
        raise UserError("config key 'train.validation_prompts': samples are of held-out photos; set train.heldout > 0")
    for prompt in train.validation_prompts:
        if "{" in prompt.replace("{token}", "") or "}" in prompt.replace("{token}", ""):
            raise UserError(f"config key 'train.validation_prompts': only {{token}} may be used, got {prompt!r}")
