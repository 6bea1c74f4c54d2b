"""Samples while training, as diffusers' DreamBooth scripts show them: images of the field's prediction Psi(c, T)
for each held-out photo and validation prompt, one PNG grid per photo under OUTPUT/samples/step-N/ and in
tensorboard. Only the main process samples; the others wait."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hyperfields.files import atomic_write
from hyperfields.image_files import labelled_sheet
from hyperfields.sampling import Sampling, sample_with_lora, task_pipeline
from hyperfields.tasks.subject import base_task
from hyperfields.training.build import TrainingRun
from hyperfields.training.logs import print0

INFERENCE_STEPS = 25  # the DreamBooth scripts' validation default
GUIDANCE_SCALE = 7.5
LABEL_CHARACTERS = 48  # a prompt longer than this is cut in its grid's row label


def samples_wanted(run: TrainingRun) -> bool:
    """True when validation prompts are set and photos are held out to sample for."""
    return bool(run.config.train.validation_prompts) and len(run.heldout) > 0


def write_samples(run: TrainingRun, step: int) -> Path | None:
    """OUTPUT/samples/step-N: a grid per held-out photo (a row per prompt), also logged to tensorboard; None when
    samples are off."""
    if not samples_wanted(run):
        return None
    accelerator, config = run.accelerator, run.config
    folder = run.output / "samples" / f"step-{step}"
    if accelerator.is_main_process:
        field = accelerator.unwrap_model(run.field)
        field.eval()
        prompts = [prompt.replace("{token}", config.data.token) for prompt in config.train.validation_prompts]
        labels = [
            prompt if len(prompt) <= LABEL_CHARACTERS else prompt[: LABEL_CHARACTERS - 3] + "..." for prompt in prompts
        ]
        sampling = Sampling(config.train.validation_images, config.train.seed, INFERENCE_STEPS, GUIDANCE_SCALE)
        pipeline = task_pipeline(base_task(run.task), sampling.scheduler)
        trackers = [tracker for tracker in accelerator.trackers if tracker.name == "tensorboard"]
        for i in range(len(run.heldout)):
            item = run.heldout[i]
            with torch.no_grad():
                predicted = field(t=float(field.steps), images=item["pixel_values"].unsqueeze(0).to(accelerator.device))
            weights = {name: w[0].float() for name, w in predicted.items()}
            rows = sample_with_lora(pipeline, run.task.lora, weights, prompts, sampling)
            name = Path(item["path"]).stem
            sheet = labelled_sheet([[row] for row in rows], labels, [name])
            atomic_write(
                folder / f"{i:02d}-{name}.png", lambda temporary, sheet=sheet: sheet.save(temporary, format="PNG")
            )
            for tracker in trackers:
                tracker.writer.add_image(f"samples/{i:02d}-{name}", np.asarray(sheet), step, dataformats="HWC")
        field.train()
        print0(accelerator, f"step {step}: samples of {len(run.heldout)} held-out photo(s) in '{folder}'")
    accelerator.wait_for_everyone()
    return folder
