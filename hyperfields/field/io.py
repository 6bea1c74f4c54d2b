"""Field folders: config.json (a readable record of how the field was made) + model.safetensors (+ README.md for the hub)."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hyperfields.errors import UserError, error_line
from hyperfields.field.encoder import ImageEncoder
from hyperfields.field.model import HyperField
from hyperfields.files import write_folder
from hyperfields.models import load_encoder

FORMAT = "hyperfields-field"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# What load_field reads from config.json, and its JSON type.
REQUIRED_RECORD: dict[str, tuple[type, ...]] = {
    "encoder": (str,), "train_encoder": (bool,), "layout": (dict,), "steps": (int,), "field": (dict,),
    "base_model": (str,), "resolution": (int,), "alpha": (int, float),
}


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a field's numbers, for its record."""
    versions = {}
    for package in ("hyperfields", "torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def field_state_dict(field: HyperField) -> dict[str, torch.Tensor]:
    """The field's tensors to save; a frozen encoder is left out (the record names it, it is loaded by name)."""
    state = field.state_dict()
    if not field.encoder.trainable:
        state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_field_files(field: HyperField, folder: Path) -> None:
    """Write model.safetensors and config.json (the field's record) into an existing folder; HyperField.save_pretrained."""
    if not field.record:
        raise ValueError("the field has no record of how it was made; write it with save_field(field, folder, record)")
    save_file(field_state_dict(field), str(Path(folder) / WEIGHTS_NAME), metadata={"format": FORMAT})
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(field.record, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_field(field: HyperField, folder: Path, record: dict[str, Any]) -> Path:
    """The field folder, written atomically by save_pretrained into a temporary sibling renamed into place once complete."""
    field.record = {"format": FORMAT, "format_version": 1, **record, "versions": package_versions()}
    return write_folder(Path(folder), field.save_pretrained)


def resolve_field_folder(name: str | Path, revision: str | None = None, cache_dir: str | Path | None = None,
                         force_download: bool = False, local_files_only: bool = False, token: str | bool | None = None) -> Path:
    """The local folder of field `name`: the folder itself, or the downloaded snapshot of a hub model id."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    try:
        validate_repo_id(str(name))
    except HFValidationError:  # a path, not a hub id ('owner/name'): no point asking the hub
        raise UserError(f"field '{name}': no such folder") from None
    try:
        snapshot = snapshot_download(str(name), revision=revision, cache_dir=cache_dir, force_download=force_download,
                                     local_files_only=local_files_only, token=token, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"])
    except Exception as error:  # offline, unknown repo, malformed id: all mean the same thing to the user
        raise UserError(f"field '{name}': no such folder, and not a hub model id that can be downloaded ({error_line(error)})") from None
    return Path(snapshot)


def read_record(folder: Path) -> dict[str, Any]:
    """The field folder's config.json, checked to be a hyperfields field."""
    path = Path(folder) / CONFIG_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"field folder '{folder}': no {CONFIG_NAME} (is it a folder written by 'hyperfields train'?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"field folder '{folder}': {CONFIG_NAME} is not valid JSON ({error})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"field folder '{folder}': {CONFIG_NAME} is not a hyperfields field record")
    for key, kind in REQUIRED_RECORD.items():
        if not isinstance(record.get(key), kind):
            raise UserError(f"field folder '{folder}': {CONFIG_NAME} has no valid '{key}' "
                            f"({' or '.join(t.__name__ for t in kind)} expected); "
                            "it was edited or is damaged, write it again with 'hyperfields train'")
    return record


def load_field(folder: Path, device: str | torch.device = "cpu") -> tuple[HyperField, dict[str, Any]]:
    """The trained field and its record from a field folder."""
    record = read_record(folder)
    try:
        state = load_file(str(Path(folder) / WEIGHTS_NAME), device="cpu")
    except FileNotFoundError:
        raise UserError(f"field folder '{folder}': no {WEIGHTS_NAME}") from None
    except (SafetensorError, OSError) as error:
        raise UserError(f"field folder '{folder}': {WEIGHTS_NAME} is truncated or not safetensors ({error})") from None
    model, norm = load_encoder(record["encoder"])
    encoder = ImageEncoder(model, norm, trainable=record["train_encoder"])
    layout = {name: tuple(shape) for name, shape in record["layout"].items()}
    zeros = {name: torch.zeros(shape) for name, shape in layout.items()}
    ones = {name: 1.0 for name in layout}
    try:
        field = HyperField(encoder, layout, zeros, ones, steps=record["steps"], **record["field"])
    except TypeError as error:  # a field setting this version does not know: written by a newer hyperfields
        raise UserError(f"field folder '{folder}': {CONFIG_NAME} has field settings this hyperfields "
                        f"({package_versions()['hyperfields']}) does not know ({error}); upgrade hyperfields") from None
    field.record = record
    expected = field.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith("encoder.")]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        raise UserError(f"field folder '{folder}': {WEIGHTS_NAME} does not match its config ({len(missing)} missing, {len(unexpected)} unexpected, "
                        f"{len(reshaped)} wrongly shaped tensors, e.g. {(missing + unexpected + reshaped)[0]})")
    field.load_state_dict(state, strict=False)
    return field.to(device).eval(), record
