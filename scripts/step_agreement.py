"""How closely a trained field's own steps follow real optimisation, along t.

For photos of a folder, at every `--every`-th t, the field's step Psi(c, t + 1) - Psi(c, t) is compared, tensor by
tensor, with the real update from the field's own point, -eta u(grad L(Psi(c, t))) (what gradient matching fits):
the mean cosine of the two and the ratio of their lengths, with the task loss at Psi(c, t) (PSNR for image fitting).
A cosine near 1 means the field has learnt real optimisation's direction at that t; a field whose steps have a low
cosine makes less progress per step than real optimisation and falls behind it along t.

    python scripts/step_agreement.py --field RUN/field --images PHOTOS [--limit 64] [--every 5]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hyperfields.config import config_from_dict  # noqa: E402
from hyperfields.data import scan_image_folder  # noqa: E402
from hyperfields.dataset import ImageCaptionDataset  # noqa: E402
from hyperfields.evaluation import psnr_db  # noqa: E402
from hyperfields.field.io import load_field  # noqa: E402
from hyperfields.streams import stream  # noqa: E402
from hyperfields.tasks import build_task  # noqa: E402
from hyperfields.tasks.base import ImageFittingTask  # noqa: E402
from hyperfields.trajectory import task_gradients, update_direction  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--field", type=Path, required=True, help="a field folder written by hyperfields train")
    parser.add_argument("--images", type=Path, required=True, help="a folder of photos (held-out ones, usually)")
    parser.add_argument("--limit", type=int, default=64, help="photos used, the first in name order")
    parser.add_argument("--every", type=int, default=5, help="score every n-th t")
    args = parser.parse_args()
    field, record = load_field(args.field)
    config = config_from_dict(record.config, where=f"{args.field}/config.json")
    task = build_task(config, torch.device("cpu"), torch.float32)
    records = scan_image_folder(
        args.images, config.data.caption_template, config.data.token, config.model.resolution, warn=lambda m: None
    ).records[: args.limit]
    dataset = ImageCaptionDataset(records, config.model.resolution)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item["pixel_values"] for item in items])
    inputs = task.prepare(images, [item["caption"] for item in items])
    objective, n = config.objective, len(items)
    with torch.no_grad():
        tokens = field.encoder(images)
    names = list(task.layout())
    print(f"{n} photos, T = {objective.steps}, eta = {objective.step_size}, update {objective.update}")
    print("cosine of the field's step with the real update from its own point, then length ratio, per tensor:")
    print("  " + ", ".join(names))
    for t in range(0, objective.steps, args.every):
        with torch.no_grad():
            psi = field(t=torch.tensor([[t, t + 1]] * n, dtype=torch.float32), encoder_tokens=tokens)
        here, there = {k: v[:, 0] for k, v in psi.items()}, {k: v[:, 1] for k, v in psi.items()}
        grads, losses = task_gradients(task, here, inputs, objective.noise_draws, stream(0, "evaluation", t))
        real = update_direction(grads, objective.update)
        cosines, ratios = [], []
        for name in names:
            field_step = (there[name] - here[name]).reshape(n, -1)
            real_step = (-objective.step_size * real[name]).reshape(n, -1)
            cosines.append(float(torch.nn.functional.cosine_similarity(field_step, real_step, dim=1).mean()))
            ratios.append(float((field_step.norm(dim=1) / real_step.norm(dim=1).clamp_min(1e-12)).mean()))
        if isinstance(task, ImageFittingTask):
            with torch.no_grad():
                score = f"PSNR {float(psnr_db(task.reconstruction_error(here, inputs)).mean()):6.2f} dB"
        else:
            score = f"loss {float(losses.mean()):.4g}"
        print(
            f"t = {t:4d}  {score}  cos "
            + " ".join(f"{c:5.2f}" for c in cosines)
            + "  length "
            + " ".join(f"{r:5.2f}" for r in ratios),
            flush=True,
        )


if __name__ == "__main__":
    main()
