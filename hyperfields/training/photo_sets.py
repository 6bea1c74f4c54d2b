"""The conditions of a micro-batch of subjects with several photos: the photos the field sees as one set per subject,
and the photos the task's loss is taken over."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from hyperfields.tasks.subject import PhotoSets
from hyperfields.training.cache import map_tensors

Conditions = Callable[[list[int]], tuple[dict[str, torch.Tensor], Any]]


def photo_set_conditions(
    conditions: Conditions,
    subjects: Sequence[Sequence[int]],
    picks: Sequence[int],
    task_rows: Sequence[Sequence[int]],
    field_rows: Sequence[Sequence[int]],
) -> tuple[dict[str, torch.Tensor], PhotoSets]:
    """The field's inputs, each (N, P, ...) with "photo_mask" (N, P), and the task's PhotoSets for subjects `picks`.

    `conditions` gives (field inputs, task inputs) of a list of training images, each image's conditions computed
    (or read from the cache) once however often the micro-batch uses it. `task_rows` and `field_rows` are photo
    positions within each picked subject (`photo_draws`); a subject shown fewer than P photos is padded with copies
    of its first, masked out.
    """
    task_images = [subjects[pick][k] for pick, rows in zip(picks, task_rows) for k in rows]  # (N * K,)
    shown = [[subjects[pick][k] for k in rows] for pick, rows in zip(picks, field_rows)]
    unique = list(dict.fromkeys(task_images + [image for row in shown for image in row]))
    row_of = {image: row for row, image in enumerate(unique)}
    field_inputs, inputs = conditions(unique)
    device = next(iter(field_inputs.values())).device
    task_index = torch.tensor([row_of[image] for image in task_images], device=device)
    photos = max(len(row) for row in shown)
    field_index = torch.tensor([[row_of[row[j if j < len(row) else 0]] for j in range(photos)] for row in shown])
    mask = torch.tensor([[j < len(row) for j in range(photos)] for row in shown], device=device)
    sets = {key: value[field_index.to(value.device)] for key, value in field_inputs.items()}  # (N, P, ...)
    task_inputs = map_tensors(lambda tensor: tensor[task_index.to(tensor.device)], inputs)
    return {**sets, "photo_mask": mask}, PhotoSets(task_inputs, len(task_rows[0]))
