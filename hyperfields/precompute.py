"""The two-phase baseline's first phase: real per-subject optimisation theta_T of every training image, on disk.

A precomputed folder holds `theta_T.safetensors` (each adapter tensor stacked over images, (M, *shape), plus
theta_0 under `theta_0/<name>`) and `index.json` (image path relative to the data folder -> row, and how the
weights were made). `objective.kind=supervised` regresses Psi(c, T) on these rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from hyperfields.config import Config
from hyperfields.data import ImageRecord, scan_image_folder
from hyperfields.dataset import ImageCaptionDataset, split_heldout
from hyperfields.devices import resolve_device
from hyperfields.errors import UserError, error_line
from hyperfields.files import write_folder, write_safetensors, write_text
from hyperfields.streams import stream
from hyperfields.subjects import group_subjects
from hyperfields.tasks import build_task
from hyperfields.tasks.base import Task, Weights
from hyperfields.trajectory import real_trajectory

FORMAT = "hyperfields-precomputed"
INDEX_NAME = "index.json"
WEIGHTS_NAME = "theta_T.safetensors"
THETA0_PREFIX = "theta_0/"


def _relative(path: Path, data_dir: Path) -> str:
    return Path(path).resolve().relative_to(Path(data_dir).resolve()).as_posix()


def optimise_images(
    task: Task,
    dataset: ImageCaptionDataset,
    config: Config,
    device: torch.device,
    on_step: Callable[[int, int], None] | None = None,
) -> Weights:
    """theta_T by name, (M, *shape) on the CPU: T real updates from theta_0 for every image, train.batch_size at a
    time (the batch a training step computes task gradients for, so one that fits in training fits here).

    `on_step(done, total)` follows the real updates of all batches together.
    """
    objective = config.objective
    batch_size = config.train.batch_size
    theta0 = task.initial_weights()
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in theta0}
    total, updates = -(-len(dataset) // batch_size) * objective.steps, 0

    def counted(_: int) -> None:
        nonlocal updates
        updates += 1
        if on_step is not None:
            on_step(updates, total)

    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([item["pixel_values"] for item in items]).to(device)
        inputs = task.prepare(images, [item["caption"] for item in items])
        batch_theta0 = {name: w.to(device).expand(len(items), *w.shape) for name, w in theta0.items()}
        # Seeded by the batch's first row: the same folder and config give the same weights.
        generator = stream(config.train.seed, "precompute", index=start, device=device)
        trajectory, _ = real_trajectory(task, batch_theta0, inputs, objective, generator, objective.steps, counted)
        for name in rows:
            rows[name].append(trajectory[-1][name].detach().cpu())
    return {name: torch.cat(chunks) for name, chunks in rows.items()}


def write_precomputed(
    output: Path, theta_T: Weights, theta0: Weights, images: Sequence[str], record: dict[str, Any]
) -> Path:
    """Write the folder atomically: a temporary sibling renamed into place once complete."""
    tensors = {name: w.contiguous() for name, w in theta_T.items()}
    tensors.update({THETA0_PREFIX + name: w.detach().float().cpu().contiguous() for name, w in theta0.items()})
    index = {"format": FORMAT, "format_version": 1, **record, "images": {path: row for row, path in enumerate(images)}}

    def write(staging: Path) -> None:
        write_safetensors(staging / WEIGHTS_NAME, tensors, metadata={"format": FORMAT})
        write_text(staging / INDEX_NAME, json.dumps(index, indent=2) + "\n")

    return write_folder(output, write)


def precompute(
    config: Config,
    data_dir: Path,
    output: Path,
    device: torch.device | None = None,
    on_step: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Optimise every training image of `data_dir` (the same held-out split as `train`) on `device` (default: the
    GPU when there is one) and write the folder; `on_step(done, total)` follows the real updates."""
    device = device if device is not None else resolve_device("auto")
    report = scan_image_folder(
        Path(data_dir), config.data.caption_template, config.data.token, config.model.resolution, warn
    )
    # The held-out split is by subject, as train makes it.
    subjects = group_subjects(Path(data_dir), report.records, warn)
    subjects, _ = split_heldout(subjects, config.train.heldout, config.train.seed)
    records = [record for subject in subjects for record in subject.records]
    task = build_task(config, device, torch.float32)
    theta_T = optimise_images(task, ImageCaptionDataset(records, config.model.resolution), config, device, on_step)
    objective = config.objective
    record = {
        "task": config.model.task,
        "steps": objective.steps,
        "step_size": objective.step_size,
        "update": objective.update,
        "noise_draws": objective.noise_draws,
        "layout": {name: list(shape) for name, shape in task.layout().items()},
        "config": config.to_dict(),
    }
    return write_precomputed(
        output, theta_T, task.initial_weights(), [_relative(r.path, data_dir) for r in records], record
    )


def load_precomputed(folder: Path, task: Task, records: Sequence[ImageRecord], data_dir: Path, steps: int) -> Weights:
    """theta_T by name, (len(records), *shape) in the order of `records`, checked against the task and T."""
    folder = Path(folder)
    try:
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / WEIGHTS_NAME))
    except FileNotFoundError as error:
        raise UserError(
            f"objective.precomputed '{folder}': no {Path(error.filename).name} "
            "(is it a folder written by 'hyperfields precompute'?)"
        ) from None
    except (ValueError, RecursionError, SafetensorError, OSError) as error:  # JSON, UTF-8, digits, nesting, truncation
        raise UserError(f"objective.precomputed '{folder}': unreadable ({error_line(error)})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"objective.precomputed '{folder}': {INDEX_NAME} is not a hyperfields precomputed index")
    layout = task.layout()
    if index.get("layout") != {name: list(shape) for name, shape in layout.items()}:
        raise UserError(
            f"objective.precomputed '{folder}': its weights have another layout than this config's "
            f"{index.get('task')!r} task; run 'hyperfields precompute' with the same config"
        )
    if index.get("steps") != steps:
        raise UserError(
            f"objective.precomputed '{folder}': made with T={index.get('steps')} steps, "
            f"but objective.steps={steps}; the field's T must match"
        )
    images = index.get("images")
    if not (
        isinstance(images, dict)
        and all(type(row) is int for row in images.values())
        and sorted(images.values()) == list(range(len(images)))
    ):
        raise UserError(
            f"objective.precomputed '{folder}': {INDEX_NAME} has no valid \"images\" map (image path -> row 0..M-1); "
            "run 'hyperfields precompute' again"
        )
    wanted = {
        **{name: (len(images), *shape) for name, shape in layout.items()},
        **{THETA0_PREFIX + name: tuple(shape) for name, shape in layout.items()},
    }
    for key, shape in wanted.items():
        found = tuple(tensors[key].shape) if key in tensors else "no such tensor"
        if found != shape:
            raise UserError(
                f"objective.precomputed '{folder}': {WEIGHTS_NAME} tensor '{key}' should have shape {shape}, "
                f"found {found}; run 'hyperfields precompute' again"
            )
        if not tensors[key].is_floating_point() or not torch.isfinite(tensors[key]).all():
            problem = "NaN or infinite values" if tensors[key].is_floating_point() else f"dtype {tensors[key].dtype}"
            raise UserError(
                f"objective.precomputed '{folder}': {WEIGHTS_NAME} tensor '{key}' has {problem}, "
                "not finite floating-point weights; run 'hyperfields precompute' again"
            )
    for name, w in task.initial_weights().items():
        if not torch.equal(tensors[THETA0_PREFIX + name], w.float().cpu()):
            raise UserError(
                f"objective.precomputed '{folder}': its theta_0 differs from this config's ('{name}'); "
                "the init seed or model changed since it was written"
            )
    rows = []
    for record in records:
        key = _relative(record.path, data_dir)
        if key not in images:
            raise UserError(
                f"objective.precomputed '{folder}': no weights for training image '{key}'; "
                "run 'hyperfields precompute' on this data folder with the same train.heldout and train.seed"
            )
        rows.append(images[key])
    picks = torch.tensor(rows, dtype=torch.long)
    return {name: tensors[name][picks] for name in layout}
