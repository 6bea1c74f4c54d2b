"""An evaluation folder: checked before anything slow runs, then written whole (images, sheets, metrics) into a
staging folder renamed into place, so a failed or interrupted evaluation leaves nothing half-written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hyperfields
from hyperfields.config import config_from_dict
from hyperfields.errors import UserError
from hyperfields.evaluate.arms import Personaliser, field_lora
from hyperfields.evaluate.metrics import Scorers
from hyperfields.evaluate.report import write_report
from hyperfields.evaluate.run import Plan, run_evaluation
from hyperfields.field.model import HyperField
from hyperfields.field.record import FieldRecord
from hyperfields.files import write_folder
from hyperfields.predict import check_base_model, lora_component
from hyperfields.sampling import task_pipeline
from hyperfields.tasks import build_lora_task

METRICS_NAME = "metrics.json"


def check_output_folder(folder: Path) -> None:
    """Nothing when `folder` is absent, empty or an earlier evaluation (which is replaced); else a UserError, so an
    evaluation never replaces a folder of other files."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output '{folder}' is a file; give a folder to write the evaluation into")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / METRICS_NAME).is_file():
        raise UserError(f"output folder '{folder}' holds other files; give a new folder or an earlier evaluation's")


def write_evaluation(
    field: HyperField,
    record: FieldRecord,
    plan: Plan,
    base_model: str,
    scorers: Scorers,
    output: Path,
    seed: int = 0,
    details: dict[str, Any] | None = None,
    on_arm: Callable[[], None] | None = None,
    dreambooth_lr: float = 1e-4,
) -> dict[str, Any]:
    """The per-arm summary, after writing the evaluation of `plan` to `output`: images/, sheets/, metrics.json and
    metrics.md. `details` (e.g. where the field and prompts came from) go into metrics.json as they are."""
    check_output_folder(output)
    objective = config_from_dict(record.config, where="the field's config.json").objective
    lora_component(record, base_model)
    # One copy of the base model in fp32, shared by every arm: a UNet's pipeline sampling with DPM-Solver++, or the
    # FLUX.1 / SD 3.x pipeline with its own flow-matching scheduler.
    task = build_lora_task(base_model, field_lora(record), next(field.parameters()).device)
    check_base_model(field, record, task.denoiser, base_model)
    personaliser = Personaliser(field, record, task, objective, seed, dreambooth_lr)
    pipeline = task_pipeline(task, plan.sampling.scheduler)
    recorded = {
        **(details or {}),
        "base_model": base_model,
        "steps": record.steps,
        "token": plan.token,
        "class_noun": plan.class_noun,
        "sampling": {**asdict(plan.sampling), "scheduler": type(pipeline.scheduler).__name__},
        "seed": seed,
        "checkpoints": scorers.checkpoints(),
        "photos": [str(photo.path) for photos in plan.subjects.values() for photo in photos.photos],
        "subjects": [
            {"name": name, "photo_count": len(photos.photos), "photos": [str(photo.path) for photo in photos.photos]}
            for name, photos in plan.subjects.items()
        ],
        "hyperfields_version": hyperfields.__version__,
    }
    summary: dict[str, Any] = {}

    def write(staging: Path) -> None:
        evaluation = run_evaluation(plan, personaliser, pipeline, scorers, staging, on_arm)
        summary.update(write_report(staging, evaluation, plan.arms, recorded))

    write_folder(Path(output), write)
    return summary
