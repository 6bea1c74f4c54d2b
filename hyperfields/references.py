"""The held-out reference of a run folder: real optimisation of the held-out photos, computed once, shared by ranks.

Scoring the field on held-out photos is cheap; the reference it is scored against (T real updates per photo) is
not. It is kept in one safetensors file beside the scan manifest: per photo, theta_T and the task losses of
theta_0 and theta_T on the fixed evaluation draws, under a key naming everything they depend on (each photo's
bytes and caption, the task and its models, the objective's trajectory settings, the evaluation draws, the
number of processes, the device type). A resumed or extended run reads it; a different key means it is stale and
is computed again. Process p of P computes the photos i with i % P == p and writes its part; after a barrier the
first process merges the parts into the store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import hyperfields
from hyperfields.config import ObjectiveConfig
from hyperfields.evaluation import HeldoutReference
from hyperfields.files import atomic_write

REFERENCE_NAME = "heldout_reference.safetensors"
FORMAT = "hyperfields-heldout-reference"
VERSION = 1
# What `real_trajectory` reads of the objective: any other objective key leaves the reference as it is.
TRAJECTORY_SETTINGS = ("steps", "step_size", "update", "momentum", "noise_draws", "max_step_norm")

Losses = tuple[torch.Tensor, torch.Tensor]  # (loss of theta_0, loss of theta_T), each (N,) in photo order


def _encode(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


def photo_digest(path: Path, caption: str) -> str:
    """A hash of a photo's bytes and its caption: what its reference depends on among the data."""
    digest = hashlib.sha256(f"{caption}\0".encode())
    digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def reference_key(
    photos: Sequence[str],
    task: dict[str, Any],
    objective: ObjectiveConfig,
    draws: int,
    seed: int,
    processes: int,
    device: str,
) -> dict[str, Any]:
    """Everything a stored reference depends on: photo digests in order, the task's identity, the trajectory's
    settings, the evaluation's draws and seed, and the processes and device type that decide its random streams.

    As JSON reads it back (tuples become lists), so a key compares equal to the one stored with it.
    """
    key = {
        "format": FORMAT,
        "version": VERSION,
        "hyperfields": hyperfields.__version__,
        "photos": list(photos),
        "task": task,
        "objective": {name: getattr(objective, name) for name in TRAJECTORY_SETTINGS},
        "draws": draws,
        "seed": seed,
        "processes": processes,
        "device": device,
    }
    return json.loads(_encode(key))


def heldout_group(count: int, process: int, processes: int) -> list[int]:
    """The held-out photos process `process` of `processes` computes and scores: i % processes == process."""
    return list(range(process, count, processes))


def part_path(store: Path, process: int, processes: int) -> Path:
    return store.with_name(f"{store.stem}.part-{process}-of-{processes}.safetensors")


def _write(path: Path, key: dict[str, Any], theta_T: dict[str, torch.Tensor], losses: Losses) -> None:
    tensors = {f"theta_T.{name}": w.detach().to("cpu", torch.float32).contiguous() for name, w in theta_T.items()}
    tensors["loss_theta0"], tensors["loss_real"] = (x.detach().to("cpu", torch.float32).contiguous() for x in losses)
    atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata={"key": _encode(key)}))


def read_reference(store: Path, key: dict[str, Any], note: Callable[[str], None]) -> Losses | None:
    """The per-photo losses in `store` if it was made under `key`, else None (with one note when it exists)."""
    if not store.is_file():
        return None
    try:
        with safe_open(str(store), framework="pt") as entry:
            stored = json.loads((entry.metadata() or {})["key"])
            if stored == key:
                losses = entry.get_tensor("loss_theta0"), entry.get_tensor("loss_real")
                if all(x.shape == (len(key["photos"]),) for x in losses):
                    return losses
                raise ValueError("its losses do not have one value per photo")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
        reason = f"{type(error).__name__}: {' '.join(str(error).split())[:120]}"
        note(f"note: held-out reference '{store}' is unreadable ({reason}); computing it again")
        return None
    changed = [name for name in key if stored.get(name) != key[name]] if isinstance(stored, dict) else ["format"]
    note(f"note: held-out reference '{store}' was made under other settings ({', '.join(changed)}); computing it again")
    return None


def write_part(store: Path, key: dict[str, Any], process: int, reference: HeldoutReference) -> Path:
    """Process `process`'s part of the store: the reference of its photos, in the order of `heldout_group`."""
    path = part_path(store, process, key["processes"])
    _write(path, key, reference.theta_T, (reference.loss_theta0, reference.loss_real))
    return path


def merge_parts(store: Path, key: dict[str, Any]) -> None:
    """Write `store` from the parts every process with photos wrote under `key`, then remove the parts."""
    count, processes = len(key["photos"]), key["processes"]
    parts = [part_path(store, process, processes) for process in range(min(count, processes))]
    merged: dict[str, torch.Tensor] = {}
    for process, path in enumerate(parts):
        with safe_open(str(path), framework="pt") as entry:
            if json.loads(entry.metadata()["key"]) != key:
                raise ValueError(f"held-out reference part '{path}' was written under another key")
        rows = heldout_group(count, process, processes)
        for name, tensor in load_file(str(path)).items():
            if name not in merged:
                merged[name] = torch.empty(count, *tensor.shape[1:], dtype=tensor.dtype)
            merged[name][rows] = tensor
    theta_T = {name.removeprefix("theta_T."): w for name, w in merged.items() if name.startswith("theta_T.")}
    _write(store, key, theta_T, (merged["loss_theta0"], merged["loss_real"]))
    for path in parts:
        path.unlink(missing_ok=True)


def shared_reference(
    store: Path,
    key: dict[str, Any],
    process: int,
    compute: Callable[[list[int]], HeldoutReference],
    barrier: Callable[[], None],
    note: Callable[[str], None],
) -> tuple[Losses, bool]:
    """Every held-out photo's losses of theta_0 and theta_T, and whether they were read from `store`.

    Run by each of key["processes"] processes, each calling `barrier` the same number of times. When `store`
    does not hold them under `key`, each process runs `compute` on its photos (`heldout_group`) and writes its
    part, and process 0 merges the parts into `store`; every process then reads the store.
    """
    stored = read_reference(store, key, note)
    if stored is not None:
        return stored, True
    count, processes = len(key["photos"]), key["processes"]
    steps = key["objective"]["steps"]
    note(
        f"held-out: real optimisation of {count} images for T={steps} steps on {processes} process(es), into '{store}'"
    )
    mine = heldout_group(count, process, processes)
    if mine:
        write_part(store, key, process, compute(mine))
    barrier()
    if process == 0:
        merge_parts(store, key)
    barrier()
    stored = read_reference(store, key, note)
    if stored is None:
        raise RuntimeError(f"the held-out reference '{store}' was not written")
    return stored, False
