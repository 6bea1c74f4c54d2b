"""Field folders: config.json (the field's record: how it was made) + model.safetensors + README.md (the hub's card)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file

from hyperfields.errors import UserError, error_line
from hyperfields.field.card import model_card
from hyperfields.field.encoder import ImageEncoder
from hyperfields.field.model import HyperField
from hyperfields.field.record import FORMAT, FieldRecord, package_versions
from hyperfields.files import write_folder, write_safetensors, write_text
from hyperfields.models import load_encoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"


def field_state_dict(field: HyperField) -> dict[str, torch.Tensor]:
    """The field's tensors to save; a frozen encoder is left out (the record names it, it is loaded by name)."""
    state = field.state_dict()
    if not field.encoder.trainable:
        state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_field_files(field: HyperField, record: FieldRecord, folder: Path) -> None:
    """model.safetensors, config.json and README.md of `field` in the existing `folder`."""
    folder = Path(folder)
    write_safetensors(folder / WEIGHTS_NAME, field_state_dict(field), metadata={"format": FORMAT})
    write_text(folder / CONFIG_NAME, json.dumps(record.to_json(), indent=2) + "\n")
    write_text(folder / CARD_NAME, model_card(record))


def save_field(field: HyperField, folder: Path, record: FieldRecord) -> Path:
    """The field folder, written into a temporary sibling renamed into place once complete; versions recorded."""
    record = replace(record, versions=package_versions())
    return write_folder(Path(folder), lambda staging: write_field_files(field, record, staging))


def resolve_field_folder(
    name: str | Path,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local folder of field `name`: the folder itself, or the downloaded snapshot of a hub model id."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    try:
        validate_repo_id(str(name))
    except HFValidationError:  # a path, not a hub id ('owner/name'): no point asking the hub
        raise UserError(f"field '{name}': no such folder") from None
    try:
        snapshot = snapshot_download(
            str(name),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME],
        )
    except Exception as error:  # offline, unknown repo, malformed id: all mean the same thing to the user
        raise UserError(
            f"field '{name}': no such folder, and not a hub model id that can be downloaded ({error_line(error)})"
        ) from None
    return Path(snapshot)


def read_record(folder: Path) -> FieldRecord:
    """The field folder's config.json, checked to be a hyperfields field record."""
    path = Path(folder) / CONFIG_NAME
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"field folder '{folder}': no {CONFIG_NAME} (is it a folder written by 'hyperfields train'?)"
        ) from None
    except (ValueError, RecursionError) as error:  # not JSON or UTF-8, thousands of digits, nesting beyond the stack
        raise UserError(f"field folder '{folder}': {CONFIG_NAME} is not valid JSON ({error_line(error)})") from None
    except OSError as error:  # a folder, no permission
        raise UserError(f"field folder '{folder}': {CONFIG_NAME} cannot be read ({error.strerror or error})") from None
    return FieldRecord.from_json(values, f"field folder '{folder}': {CONFIG_NAME}")


def _size_mismatch(record: FieldRecord, state: dict[str, torch.Tensor]) -> str | None:
    """The first field size in the record that its weights contradict, or None.

    Checked before the field is built: an edited width, depth or shape would otherwise ask for terabytes or hours.
    """
    for i, (name, shape) in enumerate(record.layout.items()):  # the field keeps theta_0 of tensor i as theta0_i
        saved = tuple(state[f"theta0_{i}"].shape) if f"theta0_{i}" in state else "no such tensor"
        if tuple(shape) != saved:
            return f"layout '{name}' {list(shape)} (the weights' theta0_{i}: {saved})"
    field = record.field
    blocks = {key.split(".")[1] for key in state if key.startswith("blocks.")}
    found = {
        "width": state["tokens"].shape[-1] if "tokens" in state else None,
        "depth": len(blocks),
        "spatial_rank": state["spatial_down.weight"].shape[0] if "spatial_down.weight" in state else 0,
        "mlp_hidden": state["blocks.0.mlp.0.weight"].shape[0] if "blocks.0.mlp.0.weight" in state else None,
    }
    claimed = {key: field[key] for key in ("width", "depth", "spatial_rank") if key in field}
    if isinstance(field.get("width"), int) and isinstance(field.get("mlp_ratio"), (int, float)) and blocks:
        claimed["mlp_hidden"] = int(field["width"] * field["mlp_ratio"]) if math.isfinite(field["mlp_ratio"]) else None
    for key, value in claimed.items():
        if value != found[key]:
            return f"{key} {value} (the weights have {found[key]})"
    return None


def read_field_files(folder: Path) -> tuple[FieldRecord, dict[str, torch.Tensor]]:
    """The record and the saved tensors of a local field folder, checked to agree and to be finite, without building
    the field or loading its encoder."""
    record = read_record(folder)
    try:
        state = load_file(str(folder / WEIGHTS_NAME), device="cpu")
    except FileNotFoundError:
        raise UserError(f"field folder '{folder}': no {WEIGHTS_NAME}") from None
    except (SafetensorError, OSError) as error:
        raise UserError(f"field folder '{folder}': {WEIGHTS_NAME} is truncated or not safetensors ({error})") from None
    mismatch = _size_mismatch(record, state)
    if mismatch is not None:
        raise UserError(
            f"field folder '{folder}': {CONFIG_NAME} does not match {WEIGHTS_NAME}: {mismatch}; "
            "it was edited or is damaged, write it again with 'hyperfields train'"
        )
    damaged = next(
        (name for name, tensor in state.items() if not tensor.is_floating_point() or not torch.isfinite(tensor).all()),
        None,
    )
    if damaged is not None:
        raise UserError(
            f"field folder '{folder}': {WEIGHTS_NAME} tensor '{damaged}' is "
            f"{'not floating point' if not state[damaged].is_floating_point() else 'NaN or infinite'}; "
            "the file is damaged, write it again with 'hyperfields train'"
        )
    return record, state


def load_field(name: str | Path, device: str | torch.device = "cpu", **hub: Any) -> tuple[HyperField, FieldRecord]:
    """The trained field, in eval mode on `device`, and its record, from a field folder or a hub model id.

    `hub` goes to the download of a hub id: revision, cache_dir, force_download, local_files_only, token.
    """
    folder = resolve_field_folder(name, **hub)
    record, state = read_field_files(folder)
    model, norm = load_encoder(record.encoder)
    encoder = ImageEncoder(model, norm, trainable=record.train_encoder)
    zeros = {name: torch.zeros(shape) for name, shape in record.layout.items()}
    ones = {name: 1.0 for name in record.layout}
    try:
        field = HyperField(encoder, record.layout, zeros, ones, steps=record.steps, **record.field)
    except TypeError as error:  # a field setting this version does not know: written by a newer hyperfields
        raise UserError(
            f"field folder '{folder}': {CONFIG_NAME} has field settings this hyperfields "
            f"({package_versions()['hyperfields']}) does not know ({error_line(error)}); "
            "upgrade hyperfields"
        ) from None
    except (ValueError, RuntimeError, AssertionError, ZeroDivisionError) as error:  # sizes that build no field (heads)
        raise UserError(
            f"field folder '{folder}': {CONFIG_NAME} has field settings that build no field "
            f"({error_line(error)}); it was edited or is damaged, write it again with 'hyperfields train'"
        ) from None
    expected = field.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith("encoder.")]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} wrongly shaped tensors"
        raise UserError(
            f"field folder '{folder}': {WEIGHTS_NAME} does not match its config ({counts}, "
            f"e.g. {(missing + unexpected + reshaped)[0]})"
        )
    field.load_state_dict(state, strict=False)
    return field.to(device).eval(), record
