"""Held-out evaluation of a run: the reference read from the run folder or computed across the processes, the field
scored by each process on its share of the held-out subjects (each photo its own in a flat folder; in a folder of
subjects, the loss over all of a subject's photos, the field shown up to data.field_photos of them and, apart, only
its first), and R reported by the main process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather_object
from rich.progress import Progress

from hyperfields.evaluation import HeldoutReference, HeldoutReport, field_losses, heldout_reference
from hyperfields.references import REFERENCE_NAME, heldout_group, photo_digest, reference_key, shared_reference
from hyperfields.tasks.subject import PhotoSets
from hyperfields.training.build import TrainingRun, warn_on_main
from hyperfields.training.logs import print0


@dataclass
class HeldoutShare:
    """This process's share of the held-out photos, prepared once, and every held-out photo's reference losses."""

    rows: list[int]  # which held-out subjects: heldout_group of this process
    images: torch.Tensor | None  # (n, 3, H, W), or (n, P, 3, H, W) for subjects of P photos; None for no share
    photo_mask: torch.Tensor | None  # (n, P): the photos the field is shown, up to data.field_photos of each subject
    inputs: Any  # the task's prepared inputs of `images` (PhotoSets for subjects of several photos)
    loss_theta0: torch.Tensor  # (N,) of every held-out subject, in subject order
    loss_real: torch.Tensor  # (N,)


def run_reference_key(run: TrainingRun) -> dict[str, Any]:
    """The key the run folder's reference is stored under for this run."""
    config, accelerator = run.config, run.accelerator
    identity = {
        "kind": config.model.task,
        "settings": run.task.record(),
        "resolution": config.model.resolution,
        "dtype": config.train.frozen_dtype,
    }
    digests = [photo_digest(record.path, record.caption) for record in run.heldout.records]
    return reference_key(
        ["+".join(digests[i] for i in photos) for photos in run.heldout_subjects],
        identity,
        config.objective,
        config.train.eval_draws,
        config.train.seed + 99,
        accelerator.num_processes,
        accelerator.device.type,
    )


def subject_conditions(run: TrainingRun, subjects: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, PhotoSets]:
    """Held-out subjects of several photos as the field and the task see them: every photo of each, (n, P, 3, H, W)
    with the mask of present photos, and the loss over as many photos as the largest subject has, a smaller one's
    photos taken in turn."""
    device, largest = run.accelerator.device, max(len(photos) for photos in subjects)
    items = {i: run.heldout[i] for photos in subjects for i in photos}
    pixels = {i: item["pixel_values"].to(device) for i, item in items.items()}
    images = torch.stack([torch.stack([pixels[p[k % len(p)]] for k in range(largest)]) for p in subjects])
    mask = torch.tensor([[k < len(p) for k in range(largest)] for p in subjects], device=device)
    rows = [p[k % len(p)] for p in subjects for k in range(largest)]
    inputs = run.task.prepare(images.flatten(0, 1), [items[i]["caption"] for i in rows])
    return images, mask, PhotoSets(inputs, largest)


def heldout_share(run: TrainingRun, bars: Progress) -> HeldoutShare:
    """This process's held-out photos, prepared, and the reference losses of all, read or computed (see
    hyperfields.references) with a bar among `bars`."""
    accelerator, config = run.accelerator, run.config
    process = accelerator.process_index
    subjects = run.heldout_subjects
    rows = heldout_group(len(subjects), process, accelerator.num_processes)
    images, mask, inputs = None, None, None
    if rows and max(len(photos) for photos in subjects) == 1:  # one photo per subject: scored as it always was
        items = [run.heldout[subjects[i][0]] for i in rows]
        images = torch.stack([item["pixel_values"] for item in items]).to(accelerator.device)
        inputs = run.task.prepare(images, [item["caption"] for item in items])
    elif rows:
        images, mask, inputs = subject_conditions(run, [subjects[i] for i in rows])
        mask = mask & (torch.arange(mask.shape[1], device=mask.device) < config.data.field_photos)

    def compute(_: list[int]) -> HeldoutReference:  # this process's rows, as above
        draws, seed = config.train.eval_draws, config.train.seed + 99
        bar = bars.add_task("held-out", total=config.objective.steps, info="real optimisation (once)")

        def advance(k: int) -> None:
            bars.update(bar, completed=k + 1)

        return heldout_reference(run.task, images, inputs, config.objective, draws, seed, process, advance)

    store = run.output / REFERENCE_NAME
    (loss_theta0, loss_real), reused = shared_reference(
        store, run_reference_key(run), process, compute, accelerator.wait_for_everyone, warn_on_main(accelerator)
    )
    if reused:
        print0(accelerator, f"held-out: reference of {len(subjects)} subjects read from '{store}'")
    return HeldoutShare(rows, images, mask, inputs, loss_theta0, loss_real)


class HeldoutEvaluation:
    """`evaluate(step)`: held-out R of the run's field, printed and logged; None when nothing is held out, and on
    every process but the main one. Every process calls it at the same steps."""

    def __init__(self, run: TrainingRun, bars: Progress) -> None:
        self.run = run
        self.bars = bars  # the run's progress bars: the reference's real optimisation gets one
        self.share: HeldoutShare | None = None  # prepared on the first evaluation

    def __call__(self, step: int) -> float | None:
        run = self.run
        accelerator, config = run.accelerator, run.config
        if not run.heldout_subjects:
            return None
        if self.share is None:
            self.share = heldout_share(run, self.bars)
        share = self.share
        # Subjects of several photos: the field is scored shown up to data.field_photos of each and, apart, its first.
        several = max(len(photos) for photos in run.heldout_subjects) > 1
        mine: list[tuple[int, torch.Tensor]] = []
        if share.rows:
            field = accelerator.unwrap_model(run.field)
            field.eval()
            shown = [(share.images, share.photo_mask)] + ([(share.images[:, :1], None)] if several else [])
            losses = torch.stack(
                [
                    field_losses(
                        run.task,
                        field,
                        images,
                        share.inputs,
                        config.train.eval_draws,
                        config.train.seed + 99,
                        config.objective.steps,
                        group=accelerator.process_index,
                        photo_mask=mask,
                    )
                    for images, mask in shown
                ],
                dim=1,
            )  # (n, views)
            field.train()
            mine = list(zip(share.rows, losses.cpu()))
        scored = dict(gather_object(mine))  # every held-out subject's losses at the field, by subject
        recovered = None
        if accelerator.is_main_process:
            at_field = torch.stack([scored[row] for row in range(len(run.heldout_subjects))])  # (N, views)
            reports = [
                HeldoutReport.from_losses(run.task, share.loss_theta0, share.loss_real, losses)
                for losses in at_field.unbind(1)
            ]
            recovered = reports[0].recovered
            metrics = reports[0].metrics()
            line = f"step {step}: {reports[0].summary()}"
            if several:
                one = reports[1].recovered
                metrics["heldout/R_one_photo"] = one
                line += f"; shown 1 photo of each subject instead of up to {config.data.field_photos}: R = {one:.3f}"
            print0(accelerator, line)
            accelerator.log(metrics, step=step)
        accelerator.wait_for_everyone()
        return recovered
