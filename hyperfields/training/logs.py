"""What a run shows and logs: messages and progress bars on the main process only, the trackers' hparams."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from rich.progress import Progress

from hyperfields.progress import CONSOLE, progress_bars


def print0(accelerator: Accelerator, *args: Any, markup: bool = True) -> None:
    """Print on the main process; the other processes stay silent."""
    if accelerator.is_main_process:
        CONSOLE.print(*args, markup=markup)


def progress_bar(accelerator: Accelerator) -> Progress:
    """The run's progress bars (training steps, the held-out reference), shown by the main process only."""
    return progress_bars(disable=not accelerator.is_main_process)


def hparams(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as flat `section.key` hparams, each a scalar or text as tensorboard takes them."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
