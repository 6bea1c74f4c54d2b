"""What a run shows and logs: messages and the progress bar on the main process only, tensorboard's hparams."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

CONSOLE = Console(stderr=True, highlight=False, soft_wrap=True)  # soft wrap: one message stays one line


def print0(accelerator: Accelerator, *args: Any, markup: bool = True) -> None:
    """Print on the main process; the other processes stay silent."""
    if accelerator.is_main_process:
        CONSOLE.print(*args, markup=markup)


def progress_bar(accelerator: Accelerator) -> Progress:
    """A progress bar of training steps with their rate and loss, shown by the main process only."""
    return Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} step/s"),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        console=CONSOLE,
        disable=not accelerator.is_main_process,
        transient=False,
    )


def hparams(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as flat `section.key` hparams, each a scalar or text as tensorboard takes them."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
