"""Resumable checkpoints of a run: written by every process into a staging folder, renamed into place when
complete, rotated, and found again by `resolve_resume`."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from hyperfields.errors import TrainingError, UserError, error_line
from hyperfields.files import replace_folder, write_text
from hyperfields.training.ema import EMA

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
EMA_NAME = "ema.safetensors"


@dataclass
class LoopState:
    """What the loop counts, saved in every checkpoint."""

    step: int = 0  # optimiser steps done, skipped ones included
    skipped_nonfinite: int = 0  # steps skipped for NaN/Inf values


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete ones are temporary names and never listed)."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("checkpoint-") and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(output: Path, resume: str) -> Path:
    """The checkpoint to resume from: 'latest' in the output folder, or a given checkpoint folder."""
    if resume == "latest":
        found = checkpoint_dirs(output)
        if not found:
            raise UserError(f"resume='latest': no complete checkpoint in '{output / CHECKPOINTS}'")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise UserError(
            f"resume='{resume}': not a checkpoint folder (no {STATE_NAME}); use 'latest' or a checkpoint-N folder"
        )
    return path


def last_checkpoint_text(output: Path) -> str:
    """Where a stopped run can resume from, for its error message."""
    found = checkpoint_dirs(output)
    return f"last good checkpoint: '{found[-1]}'" if found else "no checkpoint was written yet"


def save_checkpoint(
    accelerator: Accelerator, output: Path, state: LoopState, config: dict[str, Any], ema: EMA | None, limit: int
) -> Path:
    """`output/checkpoints/checkpoint-<step>`, complete; only the newest `limit` checkpoints are kept (0: all).

    accelerate's save_state writes from every process into one folder, so the staging folder has a name every
    process knows (not files.write_folder's private temporary one); it is renamed into place when complete.
    """
    root = output / CHECKPOINTS
    final = root / f"checkpoint-{state.step}"
    staging = root / f".tmp-checkpoint-{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            values = {"step": state.step, "skipped_nonfinite": state.skipped_nonfinite, "config": config}
            if ema is not None:
                ema.save(staging / EMA_NAME)
            # The state file is written last: a folder without it is never taken for a checkpoint.
            write_text(staging / STATE_NAME, json.dumps(values, indent=2) + "\n")
            replace_folder(staging, final)
    except OSError as error:  # disk full, quota: nothing under the final name, the last good checkpoint kept
        shutil.rmtree(staging, ignore_errors=True)
        raise TrainingError(
            f"stopped at step {state.step}: cannot write checkpoint '{final}' "
            f"({error.strerror or error}); {last_checkpoint_text(output)}"
        ) from None
    if accelerator.is_main_process:
        for old in checkpoint_dirs(output)[:-limit] if limit else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, ema: EMA | None) -> LoopState:
    """The loop's state at checkpoint `path`, after restoring the model, optimiser, schedule, RNG and EMA from it."""
    try:
        accelerator.load_state(str(path))
        values = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
        if ema is not None:
            ema.load(path / EMA_NAME)
    except Exception as error:  # truncated or tampered files: say which checkpoint, not a traceback
        raise UserError(
            f"checkpoint '{path}' cannot be loaded ({error_line(error)}); resume from another checkpoint folder"
        ) from None
    return LoopState(step=int(values["step"]), skipped_nonfinite=int(values.get("skipped_nonfinite", 0)))
