"""Time one gradient-matching step against one plain DreamBooth-LoRA step (peft) on the same UNet and batch.

Prints a table and writes JSON: gm_step_s, lora_step_s, ratio, samples_per_s, peak_mem_gb, predict_ms.
Usage: python scripts/bench_speed.py --preset tiny [--device cpu|cuda] [--batch 4] [--iters 10] --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import inject_adapter_in_model  # noqa: E402

from hyperfields.config import LoraConfig, ObjectiveConfig  # noqa: E402
from hyperfields.field.encoder import ImageEncoder  # noqa: E402
from hyperfields.field.model import HyperField  # noqa: E402
from hyperfields.matching import gradient_matching_loss  # noqa: E402
from hyperfields.models import load_encoder, load_pipeline_components  # noqa: E402
from hyperfields.tasks.lora_diffusion import LoraDiffusionTask  # noqa: E402

PRESETS = {"tiny": {"base_model": "tiny", "encoder": "tiny", "resolution": 64}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, iters: int, device: torch.device) -> float:
    """Median seconds of `step()` over `iters` runs after two warm-up runs."""
    for _ in range(2):
        step()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    preset, device = PRESETS[args.preset], torch.device(args.device)
    torch.manual_seed(0)

    parts = load_pipeline_components(preset["base_model"])
    plain_unet = copy.deepcopy(parts.unet).to(device)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.to(device)
    lora = LoraConfig(rank=args.rank, alpha=args.rank)
    task = LoraDiffusionTask(parts, lora)
    encoder_model, norm = load_encoder(preset["encoder"])
    field = HyperField(ImageEncoder(encoder_model, norm), task.layout(), task.initial_weights(), task.init_std(),
                       steps=50, width=128, depth=2, heads=4, output_gain=0.1).to(device)
    field_optimizer = torch.optim.AdamW([p for p in field.parameters() if p.requires_grad], lr=1e-4)
    objective = ObjectiveConfig(steps=50, step_size=0.05, update="normalized", rollout=1, noise_draws=1)

    images = torch.rand(args.batch, 3, preset["resolution"], preset["resolution"], device=device) * 2 - 1
    captions = ["a photo of sks"] * args.batch
    generator = torch.Generator(device=device).manual_seed(0)

    def gm_step() -> None:
        inputs = task.prepare(images, captions)
        with torch.no_grad():
            tokens = field.encoder(images)
        t = torch.randint(0, objective.steps, (args.batch,), generator=generator, device=device)
        stats = gradient_matching_loss(field, task, {"encoder_tokens": tokens}, inputs, t, objective, generator)
        stats.loss.backward()
        field_optimizer.step()
        field_optimizer.zero_grad(set_to_none=True)

    # The reference: one shared LoRA trained with peft on the same UNet, batch and noise draws.
    inject_adapter_in_model(PeftLoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(lora.targets)), plain_unet)
    lora_parameters = [p for n, p in plain_unet.named_parameters() if "lora_" in n]
    lora_optimizer = torch.optim.AdamW(lora_parameters, lr=1e-4)
    scheduler = parts.noise_scheduler

    def lora_step() -> None:
        inputs = task.prepare(images, captions)
        noise = torch.randn(inputs.latents.shape, generator=generator, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=generator, device=device)
        noisy = scheduler.add_noise(inputs.latents, noise, timesteps)
        prediction = plain_unet(noisy, timesteps, inputs.text_embeddings).sample
        torch.nn.functional.mse_loss(prediction, noise).backward()
        lora_optimizer.step()
        lora_optimizer.zero_grad(set_to_none=True)

    def predict() -> None:
        with torch.no_grad():
            field(t=objective.steps, images=images[:1])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    lora_s = timed(lora_step, args.iters, device)
    gm_s = timed(gm_step, args.iters, device)
    predict_s = timed(predict, args.iters, device)
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:  # max resident set size of this process (kilobytes on Linux)
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    figures = {
        "preset": args.preset, "device": str(device), "batch": args.batch, "rank": args.rank,
        "gm_step_s": gm_s, "lora_step_s": lora_s, "ratio": gm_s / lora_s, "samples_per_s": args.batch / gm_s,
        "peak_mem_gb": peak_gb, "predict_ms": predict_s * 1000, "torch_threads": torch.get_num_threads(),
    }
    for key, value in figures.items():
        print(f"{key:>14}: {value:.4f}" if isinstance(value, float) else f"{key:>14}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
