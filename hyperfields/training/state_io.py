"""The optimiser, learning-rate schedule and random-number states of a checkpoint, in safetensors and JSON.

torch.save and accelerate's save_state write these with pickle; here a checkpoint holds no pickle, so loading one
never runs code from it, whatever its files were replaced with.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hyperfields.files import write_safetensors, write_text

OPTIMIZER_TENSORS = "optimizer.safetensors"  # per-parameter state "<index>.<name>" (AdamW: step, exp_avg, exp_avg_sq)
OPTIMIZER_GROUPS = "optimizer.json"  # param_groups: the hyperparameters and the parameter indices of each group
SCHEDULE_NAME = "scheduler.json"


def random_states_name(process: int) -> str:
    """The file of process `process`'s random-number states: each process draws from its own."""
    return f"random_states_{process}.safetensors"


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """`optimizer.state_dict()` as OPTIMIZER_TENSORS and OPTIMIZER_GROUPS in `folder`."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, values in state["state"].items()
        for name, value in values.items()
    }
    write_safetensors(folder / OPTIMIZER_TENSORS, tensors)
    write_text(folder / OPTIMIZER_GROUPS, json.dumps(state["param_groups"], indent=2) + "\n")


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore `optimizer` from `save_optimizer`'s files; its load_state_dict moves the state to the parameters."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(folder / OPTIMIZER_TENSORS)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    saved = json.loads((folder / OPTIMIZER_GROUPS).read_text(encoding="utf-8"))
    if not isinstance(saved, list) or len(saved) != len(optimizer.param_groups):
        raise ValueError(f"{OPTIMIZER_GROUPS}: expected a list of {len(optimizer.param_groups)} parameter groups")
    # JSON has no tuples: AdamW's betas come back as the tuple it was built with.
    groups = [
        {key: tuple(value) if isinstance(current.get(key), tuple) else value for key, value in group.items()}
        for group, current in zip(saved, optimizer.param_groups)
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_schedule(schedule: torch.optim.lr_scheduler.LRScheduler, folder: Path) -> None:
    """The schedule's state_dict as SCHEDULE_NAME: LambdaLR's is plain numbers (its lr_lambdas are functions,
    saved as null and rebuilt from the config)."""
    write_text(folder / SCHEDULE_NAME, json.dumps(schedule.state_dict(), indent=2) + "\n")


def load_schedule(schedule: torch.optim.lr_scheduler.LRScheduler, folder: Path) -> None:
    """Restore `schedule` from SCHEDULE_NAME."""
    schedule.load_state_dict(json.loads((folder / SCHEDULE_NAME).read_text(encoding="utf-8")))


def save_random_states(folder: Path, process: int) -> None:
    """This process's torch (CPU and every CUDA device), numpy and Python random states in `folder`.

    The torch states are byte tensors; Python's and numpy's Mersenne Twister states are integers, kept as JSON in
    the file's metadata.
    """
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    metadata = {
        "python": json.dumps([version, list(internal), gauss_next]),
        "numpy": json.dumps([kind, keys.tolist(), position, has_gauss, cached_gaussian]),
    }
    write_safetensors(folder / random_states_name(process), tensors, metadata)


def load_random_states(folder: Path, process: int) -> None:
    """Restore this process's random states from `save_random_states`'s file (CUDA devices it has and this
    machine has)."""
    with safe_open(str(folder / random_states_name(process)), framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
        metadata: dict[str, Any] = file.metadata() or {}
    version, internal, gauss_next = json.loads(metadata["python"])
    kind, keys, position, has_gauss, cached_gaussian = json.loads(metadata["numpy"])
    random.setstate((version, tuple(internal), gauss_next))
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(tensors["torch"])
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        if f"cuda.{i}" in tensors:
            torch.cuda.set_rng_state(tensors[f"cuda.{i}"], i)
