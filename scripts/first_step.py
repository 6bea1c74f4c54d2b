"""Can the field learn real optimisation's first step? Gradient matching at t = 0 alone, then the cosine of the
field's first step Psi(c, 1) - theta_0 with the real one on held-out photos, tensor by tensor.

At t = 0 the real update of image fitting is a nearly linear, low-rank function of the pixels. A field that learns
it here to a high cosine but whose steps, trained over every t, point elsewhere (scripts/step_agreement.py) lacks
not capacity but a path that can bend (docs/design.md, failure mode 10).

    python scripts/first_step.py --config configs/inr.yaml --train TRAIN_CROPS --heldout HELDOUT_CROPS [--steps 2000]

The crops can be bench_quality.py's (`--work DIR` keeps them in DIR/train and DIR/heldout).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hyperfields.config import load_config  # noqa: E402
from hyperfields.data import scan_image_folder  # noqa: E402
from hyperfields.dataset import ImageCaptionDataset  # noqa: E402
from hyperfields.objectives import gradient_matching_loss  # noqa: E402
from hyperfields.streams import stream  # noqa: E402
from hyperfields.tasks import build_task  # noqa: E402
from hyperfields.training.build import build_field  # noqa: E402
from hyperfields.trajectory import task_gradients, update_direction  # noqa: E402


def images(folder: Path, resolution: int, limit: int) -> torch.Tensor:
    records = scan_image_folder(folder, "", "", resolution, warn=lambda message: None).records[:limit]
    dataset = ImageCaptionDataset(records, resolution)
    return torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/inr.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--train", type=Path, required=True, help="folder of training photos")
    parser.add_argument("--heldout", type=Path, required=True, help="folder of held-out photos")
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    config = load_config(args.config, [*args.overrides, "objective.end_weight=0", "objective.hinge_weight=0"])
    torch.manual_seed(config.train.seed)
    task = build_task(config, torch.device("cpu"), torch.float32)
    field = build_field(config, task)
    train, heldout = (
        images(args.train, config.model.resolution, 20000),
        images(args.heldout, config.model.resolution, 64),
    )
    parameters = [p for p in field.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=config.train.learning_rate)
    for step in range(args.steps):
        picks = torch.randint(0, len(train), (args.batch_size,), generator=stream(0, "picks", step))
        batch = task.prepare(train[picks], [""] * len(picks))
        stats = gradient_matching_loss(
            field,
            task,
            {"images": train[picks]},
            batch,
            torch.zeros(len(picks), dtype=torch.long),
            config.objective,
            stream(0, "noise", step),
        )
        optimiser.zero_grad()
        stats.loss.backward()
        optimiser.step()
    held = task.prepare(heldout, [""] * len(heldout))
    n = len(heldout)
    theta0 = {name: w.expand(n, *w.shape) for name, w in task.initial_weights().items()}
    grads, _ = task_gradients(task, theta0, held, config.objective.noise_draws, stream(0, "evaluation", 0))
    real = update_direction(grads, config.objective.update)
    with torch.no_grad():
        first = field(t=1, images=heldout)
    print(f"{n} held-out photos, {args.steps} steps x {args.batch_size} at t = 0: cosine of the first step, per tensor")
    for name in task.layout():
        step = (first[name] - theta0[name]).reshape(n, -1)
        cosine = torch.nn.functional.cosine_similarity(step, -real[name].reshape(n, -1), dim=1).mean()
        print(f"  {name:20s} {float(cosine):.2f}")


if __name__ == "__main__":
    main()
