"""Resumable checkpoints of a run: written by every process into a staging folder, renamed into place when
complete, rotated, and found again by `resolve_resume`. Every file is safetensors or JSON (state_io.py)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from hyperfields.errors import TrainingError, UserError, error_line
from hyperfields.files import replace_folder, write_safetensors, write_text
from hyperfields.training.build import TrainingRun
from hyperfields.training.state_io import (
    load_optimizer,
    load_random_states,
    load_schedule,
    save_optimizer,
    save_random_states,
    save_schedule,
)

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
EMA_NAME = "ema.safetensors"
MODEL_NAME = "model.safetensors"  # the field's state_dict, frozen encoder included
PICKLED_OPTIMIZER = "optimizer.bin"  # how accelerate's save_state kept the optimiser state


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


def save_checkpoint(run: TrainingRun, state: LoopState) -> Path:
    """`output/checkpoints/checkpoint-<step>`, complete; only the newest train.checkpoints_limit are kept (0: all).

    Every process writes its random states into one folder, so the staging folder has a name every process knows
    (not files.write_folder's private temporary one); it is renamed into place when complete.
    """
    accelerator, output = run.accelerator, run.output
    root = output / CHECKPOINTS
    final = root / f"checkpoint-{state.step}"
    staging = root / f".tmp-checkpoint-{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        weights = accelerator.get_state_dict(run.field)  # on every process: accelerate gathers sharded models here
        if accelerator.is_main_process:
            write_safetensors(staging / MODEL_NAME, {name: w.cpu().contiguous() for name, w in weights.items()})
            save_optimizer(run.optimizer, staging)
            save_schedule(run.schedule, staging)
        save_random_states(staging, accelerator.process_index)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            values = {"step": state.step, "skipped_nonfinite": state.skipped_nonfinite, "config": run.config.to_dict()}
            if run.ema is not None:
                run.ema.save(staging / EMA_NAME)
            # The state file is written last: a folder without it is never taken for a checkpoint.
            write_text(staging / STATE_NAME, json.dumps(values, indent=2) + "\n")
            replace_folder(staging, final)
    except OSError as error:  # disk full, quota: nothing under the final name, the last good checkpoint kept
        shutil.rmtree(staging, ignore_errors=True)
        raise TrainingError(
            f"stopped at step {state.step}: cannot write checkpoint '{final}' "
            f"({error.strerror or error}); {last_checkpoint_text(output)}"
        ) from None
    limit = run.config.train.checkpoints_limit
    if accelerator.is_main_process:
        for old in checkpoint_dirs(output)[:-limit] if limit else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(run: TrainingRun, path: Path) -> LoopState:
    """The loop's state at checkpoint `path`, after restoring the field, optimiser, schedule, RNG and EMA from it."""
    if (path / PICKLED_OPTIMIZER).exists():
        raise UserError(
            f"checkpoint '{path}' keeps its optimiser state in a pickle ({PICKLED_OPTIMIZER}), which is never loaded; "
            "train again from the start, or finish this run with the hyperfields version that wrote it"
        )
    try:
        run.accelerator.unwrap_model(run.field).load_state_dict(load_file(str(path / MODEL_NAME)))
        load_optimizer(run.optimizer, path)
        load_schedule(run.schedule, path)
        load_random_states(path, run.accelerator.process_index)
        values = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
        if run.ema is not None:
            run.ema.load(path / EMA_NAME)
    except Exception as error:  # truncated or tampered files: say which checkpoint, not a traceback
        raise UserError(
            f"checkpoint '{path}' cannot be loaded ({error_line(error)}); resume from another checkpoint folder"
        ) from None
    return LoopState(step=int(values["step"]), skipped_nonfinite=int(values.get("skipped_nonfinite", 0)))
