"""The accelerate training loop of a hypernetwork field: once-in-a-while blocks, then one training step."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from rich.console import Console
from safetensors.torch import load_file
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hyperfields.config import Config
from hyperfields.data import ImageCaptionDataset, split_heldout
from hyperfields.errors import TrainingError, UserError
from hyperfields.evaluation import HeldoutReference, evaluate_field, heldout_reference
from hyperfields.field.encoder import ImageEncoder
from hyperfields.field.io import FieldRecord, save_field
from hyperfields.field.model import HyperField
from hyperfields.files import replace_folder, writable_folder, write_safetensors, write_text
from hyperfields.manifest import MANIFEST_NAME, scan_with_manifest
from hyperfields.matching import NonFiniteError, direct_loss, gradient_matching_loss, supervised_loss
from hyperfields.models import load_encoder
from hyperfields.precompute import load_precomputed
from hyperfields.streams import stream
from hyperfields.tasks import build_task
from hyperfields.tasks.cache import condition_cache

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
EMA_NAME = "ema.safetensors"
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    field_dir: Path
    steps: int
    recovered: float | None  # held-out R at the end, when images were held out


class EMA:
    """Exponential moving average of the trainable parameters, checkpointed with the rest."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float) -> None:
        self.parameters = parameters
        self.decay = decay
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.parameters], 1 - self.decay)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        for shadow, p in zip(self.shadow, self.parameters):
            p.copy_(shadow)

    def save(self, path: Path) -> None:
        # safetensors, not accelerate's custom-object pickle: a checkpoint never needs unpickling.
        write_safetensors(path, {str(i): s.detach().contiguous().cpu() for i, s in enumerate(self.shadow)})

    def load(self, path: Path) -> None:
        tensors = load_file(str(path))
        self.shadow = [tensors[str(i)].to(p.device) for i, p in enumerate(self.parameters)]


CONSOLE = Console(stderr=True, highlight=False, soft_wrap=True)  # soft wrap: one message stays one line


def print0(accelerator: Accelerator, *args: Any, markup: bool = True) -> None:
    if accelerator.is_main_process:
        CONSOLE.print(*args, markup=markup)


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


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
            raise UserError(f"--resume latest: no complete checkpoint in '{output / CHECKPOINTS}'")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise UserError(f"--resume '{resume}': not a checkpoint folder (no {STATE_NAME}); use 'latest' or a checkpoint-N folder")
    return path


def training_draws(seed: int, step: int, process: int, micro: int, images: int, batch: int, last_t: int,
                   ) -> tuple[list[int], torch.Tensor]:
    """Which of `images` training images a micro-batch trains on, and each one's step t in [0, last_t]: two
    independent streams, so every image meets every t."""
    picks = torch.randint(0, images, (batch,), generator=stream(seed, "picks", step, process, micro)).tolist()
    t = torch.randint(0, last_t + 1, (batch,), generator=stream(seed, "steps", step, process, micro))
    return picks, t


class Trainer:
    """Builds the task, the field and the accelerate objects from a Config, then trains."""

    def __init__(self, config: Config, data_dir: Path, output: Path, resume: str | None = None) -> None:
        self.config = config
        self.output = Path(output)
        writable_folder(self.output)
        self.resume_from = resolve_resume(self.output, resume) if resume else None
        train = config.train
        self.accelerator = Accelerator(
            gradient_accumulation_steps=train.gradient_accumulation,
            # train.mixed_precision only sets the frozen models' dtype: the field stays fp32 without autocast,
            # because its steps Psi(t+1) - Psi(t) are ~1/T of its outputs and bf16 would round them away.
            mixed_precision="no",
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.output), logging_dir=str(self.output / "logs")),
            cpu=not torch.cuda.is_available(),
        )
        acc = self.accelerator
        warn = (lambda message: print0(acc, message, markup=False)) if acc.is_main_process else (lambda message: None)
        # Decoded once by the main process into the run folder's manifest; the others and resumed runs reuse it.
        report, _ = scan_with_manifest(Path(data_dir), self.output / MANIFEST_NAME, config.data.caption_template, config.data.token,
                                       config.model.resolution, warn, acc.is_main_process, acc.wait_for_everyone)
        print0(acc, f"data: {len(report.records)} usable images in '{data_dir}', {len(report.skipped)} skipped")
        self.train_records, self.heldout_records = split_heldout(report.records, train.heldout, train.seed)
        # A condition cache reads each training image once: keeping its pixels too would grow with the folder.
        self.dataset = ImageCaptionDataset(self.train_records, config.model.resolution, keep_decoded=train.cache == "none")
        self.heldout = ImageCaptionDataset(self.heldout_records, config.model.resolution)

        # Frozen models in the compute precision, the field and its optimiser in fp32.
        self.task = build_task(config, acc.device, _DTYPES[train.mixed_precision])
        encoder_model, norm = load_encoder(config.model.encoder, torch.float32 if config.model.train_encoder else _DTYPES[train.mixed_precision])
        encoder = ImageEncoder(encoder_model, norm, trainable=config.model.train_encoder)
        torch.manual_seed(train.seed)  # the same init on every process
        field = HyperField(
            encoder, self.task.layout(), self.task.initial_weights(), self.task.init_std(), steps=config.objective.steps,
            **dataclasses.asdict(config.field),
        )
        parameters = [p for p in field.parameters() if p.requires_grad]
        # The fused kernel: on CPU a step of a small field takes a quarter of the per-tensor loop's time.
        fused = {"fused": True} if acc.device.type in ("cpu", "cuda") else {}
        optimizer = torch.optim.AdamW(parameters, lr=train.learning_rate, weight_decay=train.weight_decay, **fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(train.warmup_steps, train.max_steps))
        self.field, self.optimizer, self.schedule = acc.prepare(field, optimizer, schedule)
        self.ema = EMA(parameters, train.ema_decay) if train.ema_decay > 0 else None
        self.cache = condition_cache(config, self._conditions, acc.device, self.train_records, self.output, warn)
        # Two-phase baseline: theta_T of every training image, row i for self.dataset[i].
        self.theta_T = None
        if config.objective.kind == "supervised":
            if not config.objective.precomputed:
                raise UserError("config key 'objective.precomputed': objective.kind=supervised needs the folder written by "
                                "'hyperfields precompute', e.g. --set objective.precomputed=runs/precomputed")
            self.theta_T = load_precomputed(Path(config.objective.precomputed), self.task, self.train_records, Path(data_dir),
                                            config.objective.steps)

        if config.objective.kind != "matching" and config.objective.end_weight > 0:
            print0(acc, f"note: objective.end_weight={config.objective.end_weight:g} is part of gradient matching; "
                        f"objective.kind={config.objective.kind} does not use it")
        self.step = 0
        self.skipped_nonfinite = 0
        self.reference: HeldoutReference | None = None
        n_params = sum(p.numel() for p in parameters)
        print0(acc, f"field: {n_params / 1e6:.2f}M trainable parameters predicting {len(self.task.layout())} tensors "
                    f"on {acc.num_processes} process(es), device {acc.device}")

    # ------------------------------------------------------------------------------------------- state

    def save_checkpoint(self) -> Path:
        """save_state into a temporary folder on every process, renamed into place when complete."""
        acc = self.accelerator
        root = self.output / CHECKPOINTS
        final = root / f"checkpoint-{self.step}"
        staging = root / f".tmp-checkpoint-{self.step}"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(staging), safe_serialization=True)
            acc.wait_for_everyone()
            if acc.is_main_process:
                state = {"step": self.step, "skipped_nonfinite": self.skipped_nonfinite, "config": self.config.to_dict()}
                if self.ema is not None:
                    self.ema.save(staging / EMA_NAME)
                # The state file is written last: a folder without it is never taken for a checkpoint.
                write_text(staging / STATE_NAME, json.dumps(state, indent=2) + "\n")
                replace_folder(staging, final)
        except OSError as error:  # disk full, quota: nothing under the final name, the last good checkpoint kept
            shutil.rmtree(staging, ignore_errors=True)
            raise TrainingError(f"stopped at step {self.step}: cannot write checkpoint '{final}' ({error.strerror or error}); "
                                f"{self.last_checkpoint_text()}") from None
        if acc.is_main_process:
            limit = self.config.train.checkpoints_limit
            for old in checkpoint_dirs(self.output)[:-limit] if limit else []:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        try:
            self.accelerator.load_state(str(path))
            state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
            if self.ema is not None:
                self.ema.load(path / EMA_NAME)
        except Exception as error:  # truncated or tampered files: say which checkpoint, not a traceback
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise UserError(f"checkpoint '{path}' cannot be loaded ({reason}); resume from another checkpoint folder") from None
        self.step = int(state["step"])
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        print0(self.accelerator, f"resumed from '{path}' at step {self.step}")

    def last_checkpoint_text(self) -> str:
        found = checkpoint_dirs(self.output)
        return f"last good checkpoint: '{found[-1]}'" if found else "no checkpoint was written yet"

    # ------------------------------------------------------------------------------------------- pieces

    def _draws(self, micro: int) -> tuple[list[int], torch.Tensor, torch.Generator]:
        """This micro-batch's training images, their steps t and the task's noise generator."""
        config, acc = self.config, self.accelerator
        picks, t = training_draws(config.train.seed, self.step, acc.process_index, micro, len(self.dataset),
                                  config.train.batch_size, config.objective.steps - config.objective.rollout)
        noise = stream(config.train.seed, "noise", self.step, acc.process_index, micro, acc.device)
        return picks, t.to(acc.device), noise

    def _conditions(self, picks: list[int]) -> tuple[dict[str, torch.Tensor], Any]:
        """The field's inputs and the task's prepared inputs for these training images."""
        items = [self.dataset[i] for i in picks]
        images = torch.stack([item["pixel_values"] for item in items]).to(self.accelerator.device)
        return self._field_inputs(images), self.task.prepare(images, [item["caption"] for item in items])

    def _field_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.config.model.train_encoder:
            return {"images": images}
        with torch.no_grad():  # a frozen encoder runs once per step, outside the field's graph
            return {"encoder_tokens": self.accelerator.unwrap_model(self.field).encoder(images)}

    def train_step(self) -> dict[str, float]:
        """One optimiser update (gradient_accumulation micro-batches); raises NonFiniteError on NaN/Inf."""
        acc, objective = self.accelerator, self.config.objective
        logs: dict[str, float] = {"loss": 0.0}
        for micro in range(self.config.train.gradient_accumulation):
            picks, t, generator = self._draws(micro)
            field_inputs, inputs = self.cache.get(picks) if self.cache is not None else self._conditions(picks)
            with acc.accumulate(self.field):
                if self.theta_T is not None:
                    theta_T = {name: w[picks].to(acc.device) for name, w in self.theta_T.items()}
                    loss = supervised_loss(self.field, field_inputs, theta_T, objective.steps, acc.unwrap_model(self.field).theta0())
                    values = {}
                elif objective.kind == "direct":
                    loss = direct_loss(self.field, self.task, field_inputs, inputs, objective, generator)
                    values = {"task_loss": float(loss.detach())}
                else:
                    stats = gradient_matching_loss(self.field, self.task, field_inputs, inputs, t, objective, generator)
                    loss, values = stats.loss, {"task_loss": stats.task_loss, "step_norm": stats.step_norm}
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"non-finite {objective.kind} loss")
                acc.backward(loss)
                if acc.sync_gradients:
                    norm = None  # the norm before clipping; non-finite gradients are dropped below
                    if self.config.train.max_grad_norm > 0:
                        norm = acc.clip_grad_norm_(self.field.parameters(), self.config.train.max_grad_norm)
                    if norm is None:
                        grads = [p.grad for p in self.field.parameters() if p.grad is not None]
                        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
                    if not torch.isfinite(norm):
                        raise NonFiniteError("non-finite gradient of the field")
                    logs["grad_norm"] = float(norm)
                self.optimizer.step()
                self.schedule.step()
                self.optimizer.zero_grad(set_to_none=True)
            scale = 1 / self.config.train.gradient_accumulation
            logs["loss"] += float(loss.detach()) * scale
            for key, value in values.items():
                logs[key] = logs.get(key, 0.0) + value * scale
        if self.ema is not None:
            self.ema.update()
        logs["lr"] = self.schedule.get_last_lr()[0]
        return logs

    def evaluate(self) -> float | None:
        """Held-out R on the main process, printed and logged; None when nothing is held out."""
        acc = self.accelerator
        if not len(self.heldout):
            return None
        recovered = None
        if acc.is_main_process:
            images = torch.stack([self.heldout[i]["pixel_values"] for i in range(len(self.heldout))]).to(acc.device)
            captions = [self.heldout[i]["caption"] for i in range(len(self.heldout))]
            if self.reference is None:
                print0(acc, f"held-out: real optimisation of {len(self.heldout)} images for T={self.config.objective.steps} steps (once)")
                self.reference = heldout_reference(self.task, images, captions, self.config.objective,
                                                   self.config.train.eval_draws, self.config.train.seed + 99)
            field = acc.unwrap_model(self.field)
            field.eval()
            report = evaluate_field(self.task, field, images, self.reference, self.config.objective.steps)
            field.train()
            recovered = report.recovered
            print0(acc, f"step {self.step}: {report.summary()}")
            acc.log(report.metrics(), step=self.step)
        acc.wait_for_everyone()
        return recovered

    def record(self, recovered: float | None) -> FieldRecord:
        """How the field was made, for its folder: the run's settings, the task's own keys, and how training went."""
        config = self.config
        return FieldRecord(
            task=config.model.task, encoder=config.model.encoder, train_encoder=config.model.train_encoder,
            layout=self.task.layout(), steps=config.objective.steps, field=dataclasses.asdict(config.field),
            resolution=config.model.resolution, task_settings=self.task.record(), step_size=config.objective.step_size,
            update=config.objective.update, caption_template=config.data.caption_template, token=config.data.token,
            trained_steps=self.step, heldout_recovered=recovered, config=config.to_dict(),
        )

    # ------------------------------------------------------------------------------------------- loop

    def train(self) -> TrainResult:
        acc, train = self.accelerator, self.config.train
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        if acc.is_main_process:
            acc.init_trackers("hyperfields", config={k: v for k, v in _flat(self.config.to_dict()).items()})
        progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} step/s"),
                            TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=CONSOLE,
                            disable=not acc.is_main_process, transient=False)
        bar = progress.add_task("train", total=train.max_steps, completed=self.step, rate="-", loss="-")
        started, started_step = time.perf_counter(), self.step
        with progress:
            while self.step < train.max_steps:
                try:
                    logs = self.train_step()
                except NonFiniteError as error:
                    self.optimizer.zero_grad(set_to_none=True)
                    self.skipped_nonfinite += 1
                    if self.skipped_nonfinite > train.skip_nonfinite:
                        raise TrainingError(f"stopped at step {self.step + 1}: {error}; {self.last_checkpoint_text()} "
                                            f"(--skip-nonfinite N skips up to N such steps)") from None
                    print0(acc, f"[yellow]warning:[/] step {self.step + 1}: {error}; skipped "
                                f"({self.skipped_nonfinite} of {train.skip_nonfinite} allowed)")
                    self.step += 1
                    continue
                self.step += 1
                rate = (self.step - started_step) / (time.perf_counter() - started)
                progress.update(bar, completed=self.step, rate=f"{rate:.2f}", loss=f"{logs['loss']:.4f}")
                if self.step % train.log_every == 0 or self.step == train.max_steps:
                    acc.log({f"train/{k}": v for k, v in logs.items()}, step=self.step)
                if train.checkpoint_every and self.step % train.checkpoint_every == 0 and self.step < train.max_steps:
                    self.save_checkpoint()
                if train.eval_every and self.step % train.eval_every == 0 and self.step < train.max_steps:
                    self.evaluate()
        self.save_checkpoint()
        if self.ema is not None:
            self.ema.copy_to_parameters()
        recovered = self.evaluate()
        field_dir = self.output / "field"
        if acc.is_main_process:
            save_field(acc.unwrap_model(self.field), field_dir, self.record(recovered))
            if self.skipped_nonfinite:
                print0(acc, f"skipped {self.skipped_nonfinite} step(s) with non-finite values")
            print0(acc, f"field written to '{field_dir}'")
        acc.wait_for_everyone()
        acc.end_training()
        return TrainResult(field_dir=field_dir, steps=self.step, recovered=recovered)


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:  # tensorboard's hparams take scalars and text only
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def train(config: Config, data_dir: Path, output: Path, resume: str | None = None) -> TrainResult:
    """Train a field on an image folder and write it to `output/field`; checkpoints under `output/checkpoints`."""
    return Trainer(config, data_dir, output, resume).train()
