"""The record of a field: how it was made, as its folder's config.json holds it, checked when it is read."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from dataclasses import field as dc_field
from importlib import metadata
from typing import Any

from hyperfields.data import MAX_PIXELS
from hyperfields.errors import UserError

FORMAT = "hyperfields-field"
FORMAT_VERSION = 1
# What every record must hold, and its JSON type; then what each task's own keys must hold.
REQUIRED_RECORD: dict[str, tuple[type, ...]] = {
    "encoder": (str,),
    "train_encoder": (bool,),
    "layout": (dict,),
    "steps": (int,),
    "field": (dict,),
    "resolution": (int,),
}
REQUIRED_TASK_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "lora": {"base_model": (str,), "alpha": (int, float)},
    "inr": {"inr": (dict,)},
}


@dataclass
class FieldRecord:
    """How a field was made, as its config.json holds it: what loading, prediction and the hub card read."""

    task: str  # what the field predicts: "lora" (a diffusion LoRA) or "inr" (a coordinate MLP's weights)
    encoder: str  # image encoder (hub id, folder or "tiny"); a frozen one is loaded by this name, not saved
    train_encoder: bool  # the encoder was trained too, so its weights are in model.safetensors
    layout: dict[str, tuple[int, ...]]  # {name: shape} of every predicted tensor
    steps: int  # T, the trajectory length the field models
    field: dict[str, Any]  # HyperField's settings (width, depth, ...)
    resolution: int  # condition photos are centre-cropped to this many pixels
    # The task's own keys (Task.record()): LoRA targets, rank, alpha, init seed, base model; the inr settings.
    task_settings: dict[str, Any]
    step_size: float | None = None  # eta of the per-subject update
    update: str | None = None  # the update rule u
    caption_template: str = "a photo of {token}"
    token: str = "sks"
    trained_steps: int | None = None  # optimiser steps the field was trained for
    heldout_recovered: float | None = None  # held-out R at the end of training, when images were held out
    config: dict[str, Any] = dc_field(default_factory=dict)  # the whole run configuration
    versions: dict[str, str] = dc_field(default_factory=dict)  # the packages that shaped its numbers

    def to_json(self) -> dict[str, Any]:
        """config.json's content: the task's own keys sit beside the common ones, as every field folder has them."""
        common = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("task_settings", "versions")}
        common["layout"] = {name: list(shape) for name, shape in self.layout.items()}
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": self.task,
            **self.task_settings,
            **common,
            "versions": self.versions,
        }

    @classmethod
    def from_json(cls, values: Any, where: str) -> FieldRecord:
        """The record in config.json's `values`; a UserError naming `where` and the key when one is missing or wrong."""
        if not isinstance(values, dict) or values.get("format") != FORMAT:
            raise UserError(f"{where} is not a hyperfields field record")
        task = values.get("task", "lora")  # fields written before there were other tasks predict LoRAs
        if task not in REQUIRED_TASK_KEYS:
            known = ", ".join(REQUIRED_TASK_KEYS)
            raise UserError(f"{where}: task {task!r} is not one this hyperfields knows ({known}); upgrade hyperfields")
        names = {f.name for f in fields(cls)} - {"task_settings"}
        settings = {k: v for k, v in values.items() if k not in names and k not in ("format", "format_version")}
        if task == "inr" and "inr" not in settings:
            # inr fields written before tasks recorded their own keys hold LoRA keys instead, and the inr settings
            # only in the run configuration.
            settings = {"inr": values.get("config", {}).get("inr", {})}
        for key, kind in {**REQUIRED_RECORD, **REQUIRED_TASK_KEYS[task]}.items():
            value = {**values, **settings}.get(key)
            if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kind):
                raise UserError(
                    f"{where} has no valid '{key}' ({' or '.join(t.__name__ for t in kind)} expected); "
                    "it was edited or is damaged, write it again with 'hyperfields train'"
                )
        shapes_valid = all(
            isinstance(shape, list) and shape and all(type(n) is int and n > 0 for n in shape)
            for shape in values["layout"].values()
        )
        # T divides t as a 64-bit tensor; photos are cropped to resolution^2 pixels, within the limit for any photo.
        side = math.isqrt(MAX_PIXELS)
        checks = (
            ("steps", 0 < values["steps"] < 2**63, "from 1 to 2**63 - 1"),
            ("resolution", 0 < values["resolution"] <= side, f"from 1 to {side}"),
            ("layout", shapes_valid, "a list of positive integers per tensor"),
        )
        for key, valid, expected in checks:
            if not valid:
                raise UserError(
                    f"{where} has no valid '{key}' ({expected} expected); "
                    "it was edited or is damaged, write it again with 'hyperfields train'"
                )
        common = {name: values[name] for name in names if name in values}
        common["layout"] = {name: tuple(shape) for name, shape in values["layout"].items()}
        return cls(**{**common, "task": task}, task_settings=settings)


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a field's numbers, for its record."""
    versions = {}
    for package in ("hyperfields", "torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
