"""Time predicting one LoRA from a photo (encoder + field forward) and writing it as a diffusers and a kohya file.

Prints the median of --runs timed runs after two warm-up runs, on the tiny models unless --field names a trained field.
Usage: python scripts/bench_export.py [--field DIR] [--runs 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hyperfields.config import load_config  # noqa: E402
from hyperfields.field.encoder import ImageEncoder  # noqa: E402
from hyperfields.field.io import load_field  # noqa: E402
from hyperfields.field.model import HyperField  # noqa: E402
from hyperfields.field.record import FieldRecord  # noqa: E402
from hyperfields.lora.formats import write_lora  # noqa: E402
from hyperfields.models import load_encoder  # noqa: E402
from hyperfields.predict import predict_lora, read_photos  # noqa: E402
from hyperfields.tasks import build_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(run: Callable[[], object], runs: int, device: torch.device) -> float:
    """Median wall time of `run()` over `runs` calls, after two warm-up calls."""
    for _ in range(2):
        run()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def tiny_field(device: torch.device) -> tuple[HyperField, FieldRecord]:
    """An untrained field of configs/tiny.yaml's size and its record: it predicts as fast as a trained one."""
    config = load_config(ROOT / "configs" / "tiny.yaml")
    task = build_task(config, torch.device("cpu"), torch.float32)
    model, norm = load_encoder(config.model.encoder)
    field = HyperField(
        ImageEncoder(model, norm),
        task.layout(),
        task.initial_weights(),
        task.init_std(),
        steps=config.objective.steps,
        **dataclasses.asdict(config.field),
    )
    record = FieldRecord(
        task=config.model.task,
        encoder=config.model.encoder,
        train_encoder=False,
        layout=task.layout(),
        steps=config.objective.steps,
        field=dataclasses.asdict(config.field),
        resolution=config.model.resolution,
        task_settings=task.record(),
    )
    return field.to(device).eval(), record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--field", help="A trained field folder or hub id; default an untrained field on the tiny models."
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    field, record = load_field(args.field, device=device) if args.field else tiny_field(device)

    with tempfile.TemporaryDirectory() as scratch:
        photo_path = Path(scratch) / "photo.png"
        Image.fromarray((np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)).save(photo_path)
        photo = read_photos([photo_path], record.resolution)
        lora = predict_lora(field, record, photo, float(field.steps))
        timings = {
            "read photo": median_seconds(lambda: read_photos([photo_path], record.resolution), args.runs, device),
            "predict LoRA": median_seconds(
                lambda: predict_lora(field, record, photo, float(field.steps)), args.runs, device
            ),
            "write diffusers": median_seconds(
                lambda: write_lora(lora, Path(scratch) / "d.safetensors", "diffusers"), args.runs, device
            ),
            "write kohya": median_seconds(
                lambda: write_lora(lora, Path(scratch) / "k.safetensors", "kohya"), args.runs, device
            ),
        }
    parameters = sum(t.numel() for t in lora.tensors.values())
    print(
        f"field: {len(lora.targets)} LoRA targets, rank {lora.rank}, {parameters / 1e3:.1f}k LoRA parameters; "
        f"device {device}, torch threads {torch.get_num_threads()}, median of {args.runs} runs"
    )
    for name, seconds in timings.items():
        print(f"  {name:<16} {seconds * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
