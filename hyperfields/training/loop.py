"""The accelerate training loop of a hypernetwork field: one training step, then once-in-a-while blocks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from hyperfields.config import Config
from hyperfields.errors import TrainingError
from hyperfields.field.io import save_field
from hyperfields.files import writable_folder
from hyperfields.training.build import TrainingRun, build_run, field_record
from hyperfields.training.checkpoints import (
    LoopState,
    last_checkpoint_text,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from hyperfields.training.heldout import HeldoutEvaluation
from hyperfields.training.logs import hparams, print0, progress_bar
from hyperfields.training.samples import samples_wanted, write_samples
from hyperfields.training.step import train_step
from hyperfields.trajectory import NonFiniteError


@dataclass
class TrainResult:
    """What a finished run gives back: its field folder, the steps trained and the held-out R."""

    field_dir: Path
    steps: int
    recovered: float | None  # held-out R at the end, when images were held out


def write_field(run: TrainingRun, trained_steps: int, recovered: float | None) -> Path:
    """`output/field`, written by the main process once every process got here: the field and its record."""
    field_dir = run.output / "field"
    if run.accelerator.is_main_process:
        record = field_record(run.config, run.task, trained_steps, recovered)
        save_field(run.accelerator.unwrap_model(run.field), field_dir, record)
    run.accelerator.wait_for_everyone()
    return field_dir


def skip_nonfinite(run: TrainingRun, state: LoopState, error: NonFiniteError) -> None:
    """Drop the step with NaN/Inf values and count it, or stop once train.skip_nonfinite steps were skipped."""
    run.optimizer.zero_grad(set_to_none=True)
    state.skipped_nonfinite += 1
    allowed = run.config.train.skip_nonfinite
    if state.skipped_nonfinite > allowed:
        raise TrainingError(
            f"stopped at step {state.step + 1}: {error}; {last_checkpoint_text(run.output)} "
            f"(train.skip_nonfinite=N skips up to N such steps)"
        ) from None
    print0(
        run.accelerator,
        f"[yellow]warning:[/] step {state.step + 1}: {error}; skipped ({state.skipped_nonfinite} of {allowed} allowed)",
    )


def fit(run: TrainingRun, resume_from: Path | None = None) -> TrainResult:
    """Train `run` to train.max_steps, from checkpoint `resume_from` if given, and write its field to `output/field`."""
    accelerator, config, train = run.accelerator, run.config, run.config.train
    state = LoopState()
    if resume_from is not None:
        state = load_checkpoint(run, resume_from)
        print0(accelerator, f"resumed from '{resume_from}' at step {state.step}")
    accelerator.init_trackers("hyperfields", config=hparams(config.to_dict()))  # on the main process only
    bars = progress_bar(accelerator)
    bar = bars.add_task("training", total=train.max_steps, completed=state.step, info="")
    evaluate = HeldoutEvaluation(run, bars)
    if train.validation_prompts and not samples_wanted(run):
        print0(accelerator, "[yellow]warning:[/] train.validation_prompts: no photo is held out, so no samples")
    started, started_step = time.perf_counter(), state.step
    with bars:
        while state.step < train.max_steps:
            try:
                logs = train_step(run, state.step)
            except NonFiniteError as error:
                skip_nonfinite(run, state, error)
                state.step += 1
                continue
            state.step += 1
            rate = (state.step - started_step) / (time.perf_counter() - started)
            bars.update(bar, completed=state.step, info=f"{rate:.2f} step/s loss {logs['loss']:.4f}")
            # Once in a while: logs, a checkpoint, a held-out score, samples (the last step's follow the loop).
            if state.step % train.log_every == 0 or state.step == train.max_steps:
                accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=state.step)
            if train.checkpoint_every and state.step % train.checkpoint_every == 0 and state.step < train.max_steps:
                save_checkpoint(run, state)
            if train.eval_every and state.step % train.eval_every == 0 and state.step < train.max_steps:
                evaluate(state.step)
            if train.validation_every and state.step % train.validation_every == 0 and state.step < train.max_steps:
                write_samples(run, state.step)
        save_checkpoint(run, state)
        if run.ema is not None:
            run.ema.copy_to_parameters()
        recovered = evaluate(state.step)
        write_samples(run, state.step)
    field_dir = write_field(run, state.step, recovered)
    if state.skipped_nonfinite:
        print0(accelerator, f"skipped {state.skipped_nonfinite} step(s) with non-finite values")
    print0(accelerator, f"field written to '{field_dir}'")
    accelerator.end_training()
    return TrainResult(field_dir=field_dir, steps=state.step, recovered=recovered)


def train(config: Config, data_dir: Path, output: Path, resume: str | None = None) -> TrainResult:
    """Train a field on an image folder and write it to `output/field`; checkpoints under `output/checkpoints`.

    `resume` is 'latest' (the newest complete checkpoint under `output`) or a checkpoint folder.
    """
    output = writable_folder(Path(output))
    resume_from = resolve_resume(output, resume) if resume else None
    return fit(build_run(config, Path(data_dir), output), resume_from)
