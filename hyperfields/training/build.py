"""Everything a run trains with, built from a Config: the accelerator, the images, the task, the field, its
optimiser, EMA and condition cache, and the record a trained field is saved with."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration

from hyperfields.config import Config, TrainConfig
from hyperfields.dataset import ImageCaptionDataset, split_heldout
from hyperfields.errors import UserError
from hyperfields.field.encoder import ImageEncoder
from hyperfields.field.model import HyperField
from hyperfields.field.record import FieldRecord
from hyperfields.manifest import MANIFEST_NAME, scan_with_manifest
from hyperfields.models import load_encoder
from hyperfields.precompute import load_precomputed
from hyperfields.subjects import Subject, group_subjects
from hyperfields.tasks import build_task
from hyperfields.tasks.base import Task, Weights
from hyperfields.tasks.subject import SubjectTask
from hyperfields.training.cache import ConditionCache, condition_cache
from hyperfields.training.ema import EMA
from hyperfields.training.logs import print0

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Conditions = Callable[[list[int]], tuple[dict[str, torch.Tensor], Any]]


@dataclass
class TrainingRun:
    """What one run trains with, built from its Config; the loop keeps its own step counter."""

    config: Config
    output: Path  # the run folder: checkpoints/, logs/, field/
    accelerator: Accelerator
    task: Task
    field: torch.nn.Module  # as accelerate prepared it (wrapped for several processes)
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None  # train.ema_decay > 0
    dataset: ImageCaptionDataset  # the training images
    subjects: list[list[int]]  # each training subject's images, as indices into dataset
    heldout: ImageCaptionDataset  # the held-out images, scored by evaluation
    heldout_subjects: list[list[int]]  # each held-out subject's images, as indices into heldout
    conditions: Conditions  # training image indices -> (field inputs, task inputs), computed
    cache: ConditionCache | None  # the same, kept per image in memory or on disk (train.cache); None: "none"
    theta_T: Weights | None  # objective.kind=supervised: precomputed theta_T, row i for dataset[i]


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warmup to 1, then a cosine down to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_accelerator(config: Config, output: Path) -> Accelerator:
    """The run's Accelerator: gradient accumulation, the field's autocast, the tracker writing under `output/logs`,
    the GPU when there is one."""
    train = config.train
    cpu = not torch.cuda.is_available()
    if train.mixed_precision == "fp16" and cpu:  # accelerate would run fp32 without a word
        raise UserError(
            "config key 'train.mixed_precision': fp16 autocast needs a GPU and none is visible; use bf16 or no"
        )
    if train.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError("config key 'train.report_to': wandb is not installed (pip install wandb), or use tensorboard")
    if AcceleratorState._shared_state.get("_mixed_precision", train.mixed_precision) != train.mixed_precision:
        # accelerate keeps one precision per process; a run before this one in the process chose another.
        AcceleratorState._reset_state()
    return Accelerator(
        gradient_accumulation_steps=train.gradient_accumulation,
        mixed_precision=train.mixed_precision,  # the field's forward only: frozen models run in train.frozen_dtype
        log_with=None if train.report_to == "none" else train.report_to,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
        cpu=cpu,
    )


def warn_on_main(accelerator: Accelerator) -> Callable[[str], None]:
    """A warning function printing on the main process only, as written (no markup)."""
    return lambda message: print0(accelerator, message, markup=False)


def load_images(
    config: Config,
    data_dir: Path,
    output: Path,
    accelerator: Accelerator,
) -> tuple[ImageCaptionDataset, list[list[int]], ImageCaptionDataset, list[list[int]]]:
    """The training images of `data_dir` and each training subject's indices among them; the same for the held-out
    subjects. Each skipped file is named once."""
    # Decoded once by the main process into the run folder's manifest; the others and resumed runs reuse it.
    report, _ = scan_with_manifest(
        data_dir,
        output / MANIFEST_NAME,
        config.data.caption_template,
        config.data.token,
        config.model.resolution,
        warn_on_main(accelerator),
        accelerator.is_main_process,
        accelerator.wait_for_everyone,
    )
    subjects = group_subjects(data_dir, report.records, warn_on_main(accelerator))
    of_subjects = "" if len(subjects) == len(report.records) else f" of {len(subjects)} subjects"
    print0(
        accelerator,
        f"data: {len(report.records)} usable images{of_subjects} in '{data_dir}', {len(report.skipped)} skipped",
    )
    train_subjects, heldout_subjects = split_heldout(subjects, config.train.heldout, config.train.seed)
    # A condition cache reads each training image once: keeping its pixels too would grow with the folder.
    keep_decoded = config.train.cache == "none"
    return (
        *_images_of(train_subjects, config.model.resolution, keep_decoded),
        *_images_of(heldout_subjects, config.model.resolution, True),
    )


def _images_of(
    subjects: list[Subject], resolution: int, keep_decoded: bool
) -> tuple[ImageCaptionDataset, list[list[int]]]:
    """The photos of `subjects` one after another, and each subject's indices among them."""
    dataset = ImageCaptionDataset([r for s in subjects for r in s.records], resolution, keep_decoded=keep_decoded)
    starts = itertools.accumulate((len(subject.records) for subject in subjects), initial=0)
    return dataset, [list(range(start, start + len(subject.records))) for start, subject in zip(starts, subjects)]


def build_field(config: Config, task: Task) -> HyperField:
    """A new field for `task`'s layout, its encoder loaded, initialised from train.seed."""
    train = config.train
    dtype = torch.float32 if config.model.train_encoder else DTYPES[train.frozen_dtype]
    encoder_model, norm = load_encoder(config.model.encoder, dtype)
    encoder = ImageEncoder(encoder_model, norm, trainable=config.model.train_encoder)
    torch.manual_seed(train.seed)  # the same init on every process
    return HyperField(
        encoder,
        task.layout(),
        task.initial_weights(),
        task.init_std(),
        steps=config.objective.steps,
        **dataclasses.asdict(config.field),
    )


def field_optimizer(
    parameters: list[torch.nn.Parameter], train: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """The field's AdamW at `train`'s learning rate and weight decay."""
    # The fused kernel: on CPU a step of a small field takes a quarter of the per-tensor loop's time.
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.AdamW(parameters, lr=train.learning_rate, weight_decay=train.weight_decay, **fused)


def condition_reader(
    dataset: ImageCaptionDataset, task: Task, field: torch.nn.Module, train_encoder: bool, device: torch.device
) -> Conditions:
    """A function giving the field's inputs and the task's prepared inputs for a list of training image indices."""

    def conditions(picks: list[int]) -> tuple[dict[str, torch.Tensor], Any]:
        items = [dataset[i] for i in picks]
        images = torch.stack([item["pixel_values"] for item in items]).to(device)
        if train_encoder:
            field_inputs = {"images": images}
        else:
            with torch.no_grad():  # a frozen encoder runs once per step, outside the field's graph
                field_inputs = {"encoder_tokens": field.encoder(images)}
        return field_inputs, task.prepare(images, [item["caption"] for item in items])

    return conditions


def build_run(config: Config, data_dir: Path, output: Path) -> TrainingRun:
    """The accelerator, images, task, field, optimiser, schedule, EMA and conditions of a run writing to `output`."""
    train, objective = config.train, config.objective
    accelerator = make_accelerator(config, output)
    dataset, subjects, heldout, heldout_subjects = load_images(config, data_dir, output, accelerator)
    if train.sampling == "shard" and len(subjects) < accelerator.num_processes:
        raise UserError(
            f"config key 'train.sampling': shard sampling needs a training subject per process, and there are "
            f"{len(subjects)} for {accelerator.num_processes} processes; use train.sampling=global"
        )
    several = max(len(photos) for photos in subjects + heldout_subjects) > 1
    if several and objective.kind == "supervised":
        raise UserError(
            f"config key 'objective.kind': supervised regression learns one photo's precomputed weights, and "
            f"'{data_dir}' holds subjects of several photos; use objective.kind=matching"
        )
    # Frozen models in train.frozen_dtype, the field and its optimiser in fp32.
    task = build_task(config, accelerator.device, DTYPES[train.frozen_dtype])
    if several:
        task = SubjectTask(task)
    field = build_field(config, task)
    parameters = [p for p in field.parameters() if p.requires_grad]
    optimizer = field_optimizer(parameters, train, accelerator.device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(train.warmup_steps, train.max_steps))
    prepared, optimizer, schedule = accelerator.prepare(field, optimizer, schedule)
    ema = EMA(parameters, train.ema_decay) if train.ema_decay > 0 else None
    conditions = condition_reader(
        dataset, task, accelerator.unwrap_model(prepared), config.model.train_encoder, accelerator.device
    )
    cache = condition_cache(config, conditions, accelerator.device, dataset.records, output, warn_on_main(accelerator))
    theta_T = None
    if objective.kind == "supervised":
        if not objective.precomputed:
            raise UserError(
                "config key 'objective.precomputed': objective.kind=supervised needs the folder written by "
                "'hyperfields precompute', e.g. objective.precomputed=runs/precomputed"
            )
        theta_T = load_precomputed(Path(objective.precomputed), task, dataset.records, data_dir, objective.steps)
    if objective.kind != "matching" and objective.end_weight > 0:
        print0(
            accelerator,
            f"note: objective.end_weight={objective.end_weight:g} is part of gradient matching; "
            f"objective.kind={objective.kind} does not use it",
        )
    print0(
        accelerator,
        f"field: {sum(p.numel() for p in parameters) / 1e6:.2f}M trainable parameters predicting "
        f"{len(task.layout())} tensors on {accelerator.num_processes} process(es), "
        f"device {accelerator.device}",
    )
    return TrainingRun(
        config,
        output,
        accelerator,
        task,
        prepared,
        optimizer,
        schedule,
        ema,
        dataset,
        subjects,
        heldout,
        heldout_subjects,
        conditions,
        cache,
        theta_T,
    )


def field_record(config: Config, task: Task, trained_steps: int, recovered: float | None) -> FieldRecord:
    """How the field was made, for its folder: the run's settings, the task's own keys, and how training went."""
    return FieldRecord(
        task=config.model.task,
        encoder=config.model.encoder,
        train_encoder=config.model.train_encoder,
        layout=task.layout(),
        steps=config.objective.steps,
        field=dataclasses.asdict(config.field),
        resolution=config.model.resolution,
        task_settings=task.record(),
        step_size=config.objective.step_size,
        update=config.objective.update,
        caption_template=config.data.caption_template,
        token=config.data.token,
        trained_steps=trained_steps,
        heldout_recovered=recovered,
        config=config.to_dict(),
    )
