"""The device a command runs its models on, by the names torch users know: auto, cpu, cuda, cuda:N, mps."""

from __future__ import annotations

import re

import torch

from hyperfields.errors import UserError

DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device `name` stands for (auto = cuda if there is a GPU, else mps, else cpu); a UserError when it is
    not a device name or this machine does not have it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("device 'mps' is not available on this machine (no Apple GPU that torch can use)")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise UserError(f"unknown device '{name}'; give {DEVICE_NAMES}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"device '{name}' is not available: torch sees no CUDA GPU on this machine")
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise UserError(f"device '{name}' is not available: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device(name)
