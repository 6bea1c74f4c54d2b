"""Typed run configuration: YAML files plus dotted `key=value` overrides; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Literal

from hyperfields.config_checks import validate
from hyperfields.config_values import coerce, parse_yaml, read_config_file
from hyperfields.errors import UserError
from hyperfields.lora import DEFAULT_TARGETS


@dataclass
class ModelConfig:
    # What the field predicts: "lora" = a LoRA of the base model's UNet or transformer; "inr" = a coordinate MLP.
    task: Literal["lora", "inr"] = "lora"
    base_model: str = "tiny"  # diffusers SD, SDXL, FLUX.1 or SD 3.x folder or hub id; "tiny*" = built-in test models
    encoder: str = "tiny"  # transformers vision model folder or hub id (ViT, CLIP-vision, DINOv2)
    train_encoder: bool = False  # fine-tune the image encoder together with the field
    resolution: int = 64  # training image size in pixels (square, centre-cropped)


@dataclass
class LoraConfig:
    targets: list[str] = dc_field(default_factory=lambda: list(DEFAULT_TARGETS))  # module name suffixes, or re:<regex>
    rank: int = 4  # LoRA rank r
    alpha: float = 4.0  # LoRA scale is alpha / rank
    init_seed: int = 0  # seed of the fixed non-zero A_0 (theta_0); B_0 = 0


@dataclass
class InrConfig:
    hidden: int = 32  # width of the coordinate MLP's hidden layers
    layers: int = 2  # hidden layers
    frequencies: int = 16  # Fourier features: sin and cos of this many seeded random projections of (x, y)
    frequency_scale: float = 2.0  # std of those projections, in cycles across the image
    pixels: int = 0  # pixels sampled per draw of the training loss; 0 = every pixel (draws are then identical)
    init_seed: int = 0  # seed of theta_0 and of the Fourier projections


@dataclass
class FieldConfig:
    width: int = 128  # transformer width of the weight tokens
    depth: int = 2  # number of DiT blocks
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0
    # Multiplies every head's hyperfan output scale: the size of Delta(c, t) at init, against the distance a trajectory
    # of normalised steps goes (eta x T); the tiny LoRA benchmark's field is best from 0.5 up, image fitting's at 0.3.
    output_gain: float = 0.5
    # Features per image token that reach the step condition flattened, so it sees where things are in the image,
    # not only the tokens' mean; 0 = the mean alone (fields written before this setting existed).
    spatial_rank: int = 16
    # Time constants tau (in steps) of components of the path that move early and settle, (1 - e^(-t/tau)) normalised
    # to 1 at T, beside the straight t/T: real optimisation bends, fast at first; [] = t/T alone (older fields).
    time_constants: list[float] = dc_field(default_factory=list)
    # One output head per tensor in place of one per shape: width x the adapter's size in parameters, so for small
    # layouts (image fitting, the tiny models); same-shape tensors otherwise share a head's output subspace.
    tensor_heads: bool = False


@dataclass
class ObjectiveConfig:
    # "matching" = gradient matching along the trajectory; "direct" = end-to-end training of Psi(c, T) on the task
    # loss alone (no trajectory before T); "supervised" = two-phase regression of Psi(c, T) on precomputed weights.
    kind: Literal["matching", "direct", "supervised"] = "matching"
    steps: int = 50  # T: length of the per-subject optimisation the field models
    step_size: float = 0.05  # eta of the per-subject update
    update: Literal["sgd", "normalized", "sign"] = "normalized"  # update rule u
    rollout: int = 1  # K: real updates per target (K-step matching)
    noise_draws: int = 2  # noise/timestep draws averaged per task gradient
    # Step loss, normalised per tensor: the relative MSE, or the step's direction and length compared apart.
    loss: Literal["relative_mse", "cosine_norm"] = "cosine_norm"
    # What is fitted: "position" = Psi(c, t+k) to stopgrad(Psi(c, t) + k real steps), the method's target;
    # "difference" = Psi(t+k) - Psi(t) with the gradient through both ends.
    match: Literal["position", "difference"] = "position"
    max_step_norm: float = 0.0  # cap on each tensor's real step norm; 0 = no cap
    # beta of a running average of the update directions, bias-corrected as Adam's first moment: real optimisation
    # with a smooth path (normalised steps of a fixed size zig-zag late in the trajectory) that goes further in T steps.
    # Gradient matching then fits each step to the direction at one of the field's own earlier points, drawn with
    # weight beta^lag; 0 = no average.
    momentum: float = 0.0
    # Adds end_weight x the task loss at Psi(c, T), relative to theta_0's, to gradient matching: better weights at T,
    # at the price of following the trajectory less closely before T; one more task gradient per condition.
    end_weight: float = 0.0
    # Adds hinge_weight x relu(log L(Psi(c, t+1)) - log L(real update from Psi(c, t))), on the same draws: every step
    # of the field must do at least as well on the task as the real update from its own start. Two more task
    # evaluations per condition (a gradient and a forward pass).
    hinge_weight: float = 0.0
    precomputed: str = ""  # kind=supervised: folder written by `hyperfields precompute` (theta_T per training image)


@dataclass
class TrainConfig:
    max_steps: int = 500
    batch_size: int = 4  # conditions per step on each process; also the images `precompute` optimises together
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10  # linear warm-up, then cosine decay to zero at max_steps
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0  # clip the field's gradient norm; 0 = off
    # dtype of the frozen models (UNet, VAE, text encoders, a frozen image encoder); the field stays fp32.
    frozen_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    # Autocast of the field's forward pass (accelerate's mixed precision); its weights and optimiser state stay fp32.
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False  # recompute UNet activations during backward: far less memory, ~25% more time
    # Where each training image's conditions (VAE latents, text embeddings, the frozen encoder's tokens) are kept once
    # computed: "none" = computed at every step; "memory" = in each process's CPU memory (grows with the images drawn);
    # "disk" = one safetensors file per image under cache_dir, shared by every process and by later runs, read
    # memory-mapped so memory does not grow with the dataset. Same losses with all three.
    cache: Literal["none", "memory", "disk"] = "none"
    # cache=disk: the folder; "" = OUTPUT/cache. Entries are named by a hash of the image bytes, the caption and the
    # frozen models (base_model, encoder, resolution, frozen_dtype, hyperfields version), so a changed model or
    # photo never reuses one; `hyperfields cache build` fills it before training.
    cache_dir: str = ""
    cache_latents: bool = False  # deprecated alias of cache=memory, accepted for one release
    # Which training images each process draws from: "global" = all of them; "shard" = only the images i with
    # i % processes == process, so each process reads (and caches) 1/processes of the folder.
    sampling: Literal["global", "shard"] = "global"
    ema_decay: float = 0.0  # 0 = no EMA; else the final field is the EMA copy
    seed: int = 0
    checkpoint_every: int = 100  # 0 = only at the end
    checkpoints_limit: int = 2  # keep this many checkpoints; 0 = keep all
    eval_every: int = 0  # held-out evaluation period; 0 = only at the end
    heldout: int = 2  # subjects kept out of training for the held-out evaluation
    eval_draws: int = 16  # fixed noise draws per held-out image in the evaluation
    log_every: int = 10
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"  # the tracker training scalars go to
    skip_nonfinite: int = 0  # steps with non-finite values to skip before stopping
    # Samples while training (LoRA fields): images of Psi(c, T) for each held-out photo and each of these prompts
    # ({token} = data.token), one PNG grid per photo under OUTPUT/samples/step-N/ and in tensorboard; [] = off.
    validation_prompts: list[str] = dc_field(default_factory=list)
    validation_every: int = 0  # steps between samples; 0 = only at the end
    validation_images: int = 2  # images per prompt and photo


@dataclass
class DataConfig:
    caption_template: str = "a photo of {token}"
    token: str = "sks"  # the identifier token of the personalised subject
    # A subject is a sub-folder of the data folder (a flat folder: one photo each). The real update at every step
    # takes the task's loss over this many of the subject's photos (fewer when no subject has as many), drawn anew at
    # each step: with 1, stochastic DreamBooth over all of them, and 4 times the subjects a step of 4 at one budget.
    photos_per_subject: int = 1
    field_photos: int = 4  # the field sees 1..this many of a subject's photos per step, drawn at random


@dataclass
class Config:
    model: ModelConfig = dc_field(default_factory=ModelConfig)
    lora: LoraConfig = dc_field(default_factory=LoraConfig)
    inr: InrConfig = dc_field(default_factory=InrConfig)
    field: FieldConfig = dc_field(default_factory=FieldConfig)
    objective: ObjectiveConfig = dc_field(default_factory=ObjectiveConfig)
    train: TrainConfig = dc_field(default_factory=TrainConfig)
    data: DataConfig = dc_field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in (f.name for f in dataclasses.fields(Config))}


def _set(config: Config, key: str, value: Any) -> None:
    section_name, _, name = key.partition(".")
    sections = _sections()
    if section_name not in sections or not name:
        raise UserError(f"unknown config key '{key}'; sections are {', '.join(sections)}")
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise UserError(f"unknown config key '{key}'; '{section_name}' has {', '.join(hints)}")
    setattr(section, name, coerce(value, hints[name], key))


def _flatten(mapping: dict[str, Any], where: str) -> dict[str, Any]:
    flat = {}
    for section, values in mapping.items():
        if not isinstance(values, dict):
            raise UserError(f"{where}: '{section}' must be a mapping of keys (e.g. {section}:\\n  key: value)")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def _read_former_precision(config: Config, given: set[str], note: Callable[[str], None] | None) -> None:
    """train.mixed_precision without train.frozen_dtype keeps its former meaning, the frozen models' dtype, for one
    release: a config written for it trains as it did."""
    train = config.train
    if train.mixed_precision == "no" or "train.frozen_dtype" in given:
        return
    value = train.mixed_precision
    if note is not None:
        note(
            f"note: train.mixed_precision={value} as the frozen models' dtype is deprecated; use "
            f"train.frozen_dtype={value} (train.mixed_precision, set beside it, autocasts the field)"
        )
    train.frozen_dtype, train.mixed_precision = value, "no"


def _config(items: list[tuple[str, Any]], note: Callable[[str], None] | None) -> Config:
    """A validated Config from `section.key` values applied in order."""
    config = Config()
    for key, value in items:
        _set(config, key, value)
    _read_former_precision(config, {key for key, _ in items}, note)
    validate(config)
    return config


def config_from_dict(
    values: dict[str, Any], where: str = "config", note: Callable[[str], None] | None = None
) -> Config:
    """A validated Config from a nested {section: {key: value}} mapping; `note` gets a line per former meaning."""
    return _config(list(_flatten(values, where).items()), note)


def load_config(
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    note: Callable[[str], None] | None = None,
) -> Config:
    """The Config from a YAML file or preset name (defaults where absent) with `section.key=value` overrides applied.

    `note` gets a one-line note for each key read with a former meaning.
    """
    values, where = read_config_file(path) if path is not None else ({}, "config")
    items = list(_flatten(values, where).items())
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep:
            raise UserError(f"override '{override}': expected key=value, e.g. train.max_steps=100")
        value = parse_yaml(raw, f"override '{key.strip()}=...': the value") if raw.strip() else ""
        items.append((key.strip(), value))
    return _config(items, note)
