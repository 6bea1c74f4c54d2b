"""One training step: the micro-batches' draws and conditions, the objective, backward, clipping, the update."""

from __future__ import annotations

import torch

from hyperfields.objectives import MicroBatch, objective_loss
from hyperfields.streams import photo_draws, stream, training_draws
from hyperfields.training.build import TrainingRun
from hyperfields.training.photo_sets import photo_set_conditions
from hyperfields.trajectory import NonFiniteError


def micro_batch(run: TrainingRun, step: int, micro: int) -> MicroBatch:
    """Micro-batch `micro` of `step` on this process: its subjects' conditions, steps t, noise and theta_T."""
    config, accelerator = run.config, run.accelerator
    seed, process = config.train.seed, accelerator.process_index
    picks, t = training_draws(
        seed,
        step,
        process,
        micro,
        len(run.subjects),
        config.train.batch_size,
        config.objective.steps - config.objective.rollout,
        shards=accelerator.num_processes if config.train.sampling == "shard" else 1,
    )
    noise = stream(seed, "noise", step, process, micro, accelerator.device)
    conditions = run.cache.get if run.cache is not None else run.conditions
    largest = max(len(photos) for photos in run.subjects)
    if largest == 1:  # one photo per subject: each pick is a training image
        field_inputs, inputs = conditions([run.subjects[pick][0] for pick in picks])
    else:
        sizes = [len(run.subjects[pick]) for pick in picks]
        photos = min(config.data.photos_per_subject, largest)
        task_rows, field_rows = photo_draws(seed, step, process, micro, sizes, photos, config.data.field_photos)
        field_inputs, inputs = photo_set_conditions(conditions, run.subjects, picks, task_rows, field_rows)
    if run.theta_T is None:
        lags = stream(seed, "lags", step, process, micro) if config.objective.momentum > 0 else None
        return MicroBatch(field_inputs, inputs, t.to(accelerator.device), noise, lags=lags)
    theta_T = {name: w[picks].to(accelerator.device) for name, w in run.theta_T.items()}
    theta0 = accelerator.unwrap_model(run.field).theta0()
    return MicroBatch(field_inputs, inputs, t.to(accelerator.device), noise, theta_T, theta0)


def gradient_norm(run: TrainingRun) -> torch.Tensor:
    """The field's gradient norm before clipping to train.max_grad_norm (when > 0); raises NonFiniteError on NaN/Inf
    (unless fp16's loss scaler will skip the update)."""
    norm = None  # accelerate's clipping returns None where it cannot tell the norm
    if run.config.train.max_grad_norm > 0:
        norm = run.accelerator.clip_grad_norm_(run.field.parameters(), run.config.train.max_grad_norm)
    if norm is None:
        grads = [p.grad for p in run.field.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    # Under fp16 autocast an overflowing gradient is the loss scaler's to handle: it skips the update, lowers the scale.
    if not torch.isfinite(norm) and run.accelerator.scaler is None:
        raise NonFiniteError("non-finite gradient of the field")
    return norm


def train_step(run: TrainingRun, step: int) -> dict[str, float]:
    """The mean log values of one optimiser update (train.gradient_accumulation micro-batches); raises
    NonFiniteError on NaN/Inf."""
    accelerator, config = run.accelerator, run.config
    accumulation = config.train.gradient_accumulation
    scale = 1 / accumulation
    logs: dict[str, float] = {"loss": 0.0}
    for micro in range(accumulation):
        batch = micro_batch(run, step, micro)
        with accelerator.accumulate(run.field):
            loss, values = objective_loss(run.field, run.task, batch, config.objective)
            if not torch.isfinite(loss):
                raise NonFiniteError(f"non-finite {config.objective.kind} loss")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                logs["grad_norm"] = float(gradient_norm(run))
            run.optimizer.step()
            run.schedule.step()
            run.optimizer.zero_grad(set_to_none=True)
        logs["loss"] += float(loss.detach()) * scale
        for key, value in values.items():
            logs[key] = logs.get(key, 0.0) + value * scale
    if run.ema is not None:
        run.ema.update()
    logs["lr"] = run.schedule.get_last_lr()[0]
    return logs
