"""Time one gradient-matching step against one plain LoRA training step (peft) on the same denoiser, batch and
precision.

Presets:
  tiny   the built-in tiny pipeline (configs/tiny.yaml); latents and text embeddings from its VAE and text encoder
  sd15   the SD 1.5 UNet and a DINOv2-base encoder built from their public configs with random weights, 512 px
  sdxl   the SDXL base UNet likewise, 1024 px; pooled text and size ids as added conditions
  flux   the FLUX.1-dev transformer likewise (configs/flux-dev.yaml), 512 px; the flow-matching task's loss
  sd35   the SD 3.5 Medium transformer likewise (configs/sd35-medium.yaml), 1024 px
For the real models the field, LoRA and training settings come from the preset's config (--set overrides them) and
random latents and text embeddings stand in for the VAE and text encoders: both steps run on cached inputs, as
`train.cache` makes training do, so the frozen image encoder is not in the step either (its cost per image
is reported as encoder_ms). Both steps see one noise draw per sample (--draws changes the field's), the same
gradient checkpointing setting and the optimiser step; the two are timed alternately and the medians compared.

--quick: a reduced size for CPUs (sd15, flux and sd35 at 128 px, sdxl at 256 px, batch 1, 3 timed steps, one CPU
thread; FLUX with 2 double- and 4 single-stream blocks of 6 heads, SD 3.5 with 4 blocks of 12 heads); under 2
minutes for sd15.
JSON keys: gm_step_s, lora_step_s, ratio, samples_per_s, peak_mem_gb, predict_ms, and their settings.
Usage: python scripts/bench_speed.py --preset sd15 --quick --device cpu --json speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import inject_adapter_in_model  # noqa: E402

from hyperfields.config import load_config  # noqa: E402
from hyperfields.field.encoder import ImageEncoder  # noqa: E402
from hyperfields.field.model import HyperField  # noqa: E402
from hyperfields.objectives import gradient_matching_loss  # noqa: E402
from hyperfields.training.build import field_optimizer as make_field_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_models import TRANSFORMER_PRESETS, build_bench  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("tiny", "sd15", "sdxl", "flux", "sd35")
QUICK_RESOLUTION = {"tiny": 64, "sd15": 128, "sdxl": 256, "flux": 128, "sd35": 128}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, or this process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="reduced resolution and batch, 3 timed steps")
    parser.add_argument(
        "--batch", type=int, help="conditions per step (default: the preset's train.batch_size; 1 with --quick)"
    )
    parser.add_argument("--resolution", type=int, help="pixels (default: the preset's model.resolution)")
    parser.add_argument(
        "--precision",
        choices=sorted(_DTYPES),
        help="frozen models' dtype (default: the preset's train.frozen_dtype on a GPU, fp32 on a CPU)",
    )
    parser.add_argument("--draws", type=int, default=1, help="noise draws per task gradient in the matching step")
    parser.add_argument("--iters", type=int, help="timed steps of each kind (default 10; 3 with --quick)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads (default: 1 with --quick on a CPU, else torch's default)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="config override, e.g. train.gradient_checkpointing=false",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    config = load_config(CONFIGS / f"{TRANSFORMER_PRESETS.get(args.preset, args.preset)}.yaml", args.overrides)
    batch = args.batch or (1 if args.quick else config.train.batch_size)
    resolution = args.resolution or (QUICK_RESOLUTION[args.preset] if args.quick else config.model.resolution)
    precision = args.precision or (config.train.frozen_dtype if device.type == "cuda" else "fp32")
    iters = args.iters or (3 if args.quick else 10)
    # One thread for the quick CPU run: on a shared machine, other processes stall multi-threaded small ops at
    # OpenMP barriers, which inflates the field's many small ops far more than the UNet's large ones.
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    dtype = _DTYPES[precision]
    checkpointing = config.train.gradient_checkpointing
    torch.manual_seed(0)

    started = time.perf_counter()
    bench = build_bench(args.preset, config, batch, resolution, dtype, device, args.quick)
    task, inputs, images, (encoder_model, norm) = bench.task, bench.inputs, bench.images, bench.encoder
    field = HyperField(
        ImageEncoder(encoder_model, norm),
        task.layout(),
        task.initial_weights(),
        task.init_std(),
        steps=config.objective.steps,
        **dataclasses.asdict(config.field),
    ).to(device)
    field_parameters = [p for p in field.parameters() if p.requires_grad]
    field_optimizer = make_field_optimizer(field_parameters, config.train, device)  # the one training builds
    objective = dataclasses.replace(config.objective, noise_draws=args.draws)
    with torch.no_grad():
        tokens = field.encoder(images)  # cached once, as train.cache does
    generator = torch.Generator(device=device).manual_seed(0)

    def gm_step() -> None:
        t = torch.randint(0, objective.steps - objective.rollout + 1, (batch,), generator=generator, device=device)
        stats = gradient_matching_loss(field, task, {"encoder_tokens": tokens}, inputs, t, objective, generator)
        stats.loss.backward()
        torch.nn.utils.clip_grad_norm_(field_parameters, config.train.max_grad_norm)
        field_optimizer.step()
        field_optimizer.zero_grad(set_to_none=True)

    # The reference: one shared LoRA on the same layers, trained with peft as diffusers' LoRA scripts do
    # (fp32 LoRA weights under autocast when the frozen denoiser is in half precision).
    lora = config.lora
    inject_adapter_in_model(
        PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=task.targets), bench.plain
    )
    lora_parameters = [p for n, p in bench.plain.named_parameters() if "lora_" in n]
    for p in lora_parameters:
        p.data = p.data.float()
    if checkpointing:
        bench.plain.enable_gradient_checkpointing()
    lora_optimizer = torch.optim.AdamW(lora_parameters, lr=config.train.learning_rate)

    def lora_step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = bench.plain_loss(generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_parameters, config.train.max_grad_norm)
        lora_optimizer.step()
        lora_optimizer.zero_grad(set_to_none=True)

    def predict() -> None:
        with torch.no_grad():
            field(t=objective.steps, images=images[:1])

    def encode() -> None:
        with torch.no_grad():
            field.encoder(images[:1])

    build_s = time.perf_counter() - started
    peaks = {}
    for name, step in (("lora", lora_step), ("gm", gm_step)):  # warm-up, and each step's own peak memory
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(1 if args.quick else 2):
            step()
        peaks[name] = peak_memory_gb(device)
    times: dict[str, list[float]] = {"lora": [], "gm": []}
    for _ in range(iters):  # alternated, so a busy machine slows both alike
        times["lora"].append(timed(lora_step, device))
        times["gm"].append(timed(gm_step, device))
    predict()
    predict_s = median([timed(predict, device) for _ in range(iters)])
    encoder_s = median([timed(encode, device) for _ in range(iters)])
    gm_s, lora_s = median(times["gm"]), median(times["lora"])
    figures: dict[str, Any] = {
        "preset": args.preset,
        "quick": args.quick,
        "device": str(device),
        "precision": precision,
        "batch": batch,
        "resolution": resolution,
        "gradient_checkpointing": checkpointing,
        "noise_draws": objective.noise_draws,
        "lora_targets": len(task.targets),
        "rank": lora.rank,
        "field_params_m": sum(p.numel() for p in field_parameters) / 1e6,
        "gm_step_s": gm_s,
        "lora_step_s": lora_s,
        "ratio": gm_s / lora_s,
        "samples_per_s": batch / gm_s,
        "peak_mem_gb": peaks["gm"],
        "lora_peak_mem_gb": peaks["lora"],
        "predict_ms": predict_s * 1000,
        "encoder_ms": encoder_s * 1000,
        "iters": iters,
        "torch_threads": torch.get_num_threads(),
        "build_s": build_s,
    }
    for key, value in figures.items():
        print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
