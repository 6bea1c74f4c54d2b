"""A task over subjects of several photos: the loss of a subject's weights is the mean of the task's loss over its
photos, so the real update at every step is DreamBooth's on all of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hyperfields.tasks.base import Task, Weights


@dataclass
class PhotoSets:
    """A task's prepared inputs for N subjects of `photos` photos each, rows ordered (subject, photo)."""

    inputs: Any
    photos: int


class SubjectTask:
    """`task` whose loss also takes PhotoSets: one weight set per subject, its loss the mean over the subject's photos.

    Everything else (layout, prepare, record, ...) is the task's own; plain inputs are one photo per sample as before.
    """

    def __init__(self, task: Task) -> None:
        self.task = task

    def __getattr__(self, name: str) -> Any:
        if name == "task":  # not set yet (a copy being made): never look it up on itself
            raise AttributeError(name)
        value = getattr(self.task, name)
        if name == "reconstruction_error":  # an image-fitting task's error of a subject: the mean over its photos too
            return lambda weights, inputs: _over_photos(value, weights, inputs)
        return value

    def loss(self, weights: Weights, inputs: Any, draws: int, generator: torch.Generator) -> torch.Tensor:
        return _over_photos(lambda w, x: self.task.loss(w, x, draws, generator), weights, inputs)


def _over_photos(score: Callable[[Weights, Any], torch.Tensor], weights: Weights, inputs: Any) -> torch.Tensor:
    """score(weights, inputs) (N,), for PhotoSets the mean of each subject's weights' scores over its photos."""
    if not isinstance(inputs, PhotoSets):
        return score(weights, inputs)
    repeated = {name: w.repeat_interleave(inputs.photos, dim=0) for name, w in weights.items()}
    return score(repeated, inputs.inputs).view(-1, inputs.photos).mean(dim=1)  # (N,)


def base_task(task: Task) -> Task:
    """The task a SubjectTask wraps, or `task` itself: what code asking for a task's kind should look at."""
    return task.task if isinstance(task, SubjectTask) else task
