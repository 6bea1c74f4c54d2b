"""Held-out quality of the gradient-matching field against real optimisation and the two-phase baseline.

Both fields get the same budget of task-gradient evaluations (one per sample and real update, whatever
objective.noise_draws): gradient matching spends K = objective.rollout per sampled condition and optimiser step,
K + 1 with objective.end_weight > 0, so at the full budget it trains train.max_steps steps on batches of
budget / (steps * that) conditions, and at a fraction f of it f * train.max_steps steps on batches of the same size
(a shorter run, not a noisier one). The supervised baseline spends T per training image in `precompute`
(f * budget / T images) and nothing while it regresses Psi(c, T) on them for the same number of optimiser steps
on batches of the same size. Both are then scored on held-out photos next to theta_0 and real optimisation:
PSNR in dB for --task inr, the task loss on fixed draws and the recovered fraction R for --task lora.

Without --train / --heldout the photos come from scikit-image (nothing is downloaded): training crops from one
set of photos, held-out crops from others.

Usage: python scripts/bench_quality.py --task inr --budget 128000 --json quality.json --plot quality.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hyperfields.config import Config, load_config  # noqa: E402
from hyperfields.data import ImageCaptionDataset, scan_image_folder  # noqa: E402
from hyperfields.evaluation import heldout_losses, psnr_db  # noqa: E402
from hyperfields.field.io import load_field  # noqa: E402
from hyperfields.matching import real_trajectory  # noqa: E402
from hyperfields.precompute import precompute  # noqa: E402
from hyperfields.tasks import build_task  # noqa: E402
from hyperfields.tasks.base import ImageFittingTask, Task, Weights  # noqa: E402
from hyperfields.trainer import Trainer  # noqa: E402

TRAIN_PHOTOS = ("astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera",
                "coins", "moon", "brick", "grass", "page", "text", "cell")
HELDOUT_PHOTOS = ("coffee", "clock", "gravel", "colorwheel")
DEFAULTS = {  # config, training crops, held-out crops
    "inr": ("configs/inr.yaml", 20000, 32),
    "lora": ("configs/tiny.yaml", 32, 4),
}


def photo(name: str) -> np.ndarray:
    from skimage import data

    pixels = getattr(data, name)()
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return pixels[..., :3]


def write_crops(folder: Path, names: tuple[str, ...], count: int, size: int, seed: int, augment: bool) -> Path:
    """`count` random square crops of the photos, resized to `size` px; flips, rotations and channel orders if `augment`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = {name: photo(name) for name in names}
    for i in range(count):
        pixels = photos[names[i % len(names)]]
        height, width = pixels.shape[:2]
        side = int(rng.integers(min(2 * size, min(height, width) // 4), min(height, width) // 3 + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = pixels[top:top + side, left:left + side]
        if augment:
            crop = np.rot90(crop, int(rng.integers(0, 4)))
            crop = crop[:, ::-1] if rng.random() < 0.5 else crop
            crop = crop[..., rng.permutation(3)]
        image = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.LANCZOS)
        image.save(folder / f"crop{i:05d}.png")
    return folder


def write_pixel_encoder(folder: Path, size: int) -> Path:
    """A seeded random ViT over `size` px images in 4 px patches whose tokens keep the pixels.

    The built-in tiny encoder squeezes 8 x 8 x 3 patches of a 32 px image into 32 normalised features: a linear
    read-out recovers its input only to ~23 dB, below what real optimisation of a 16 px crop reaches. Here 48
    pixel values go to 64 features and a LayerNorm with eps 100 (gain 10) is near-linear, so tokens keep the crop
    (~35 dB linear read-out); a pretrained encoder plays this part in real use.
    """
    from transformers import ViTConfig, ViTModel

    try:  # transformers 5 needs torchvision for ViTImageProcessor
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor

    torch.manual_seed(0)
    config = ViTConfig(image_size=size, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=1,
                       num_attention_heads=4, intermediate_size=128, layer_norm_eps=100.0)
    model = ViTModel(config)
    with torch.no_grad():
        model.layernorm.weight.fill_(10.0)
    model.save_pretrained(folder)
    Processor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def load_images(folder: Path, config: Config) -> tuple[torch.Tensor, list[str], list[Path]]:
    records = scan_image_folder(folder, config.data.caption_template, config.data.token, config.model.resolution,
                                warn=lambda message: None).records
    dataset = ImageCaptionDataset(records, config.model.resolution)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([item["pixel_values"] for item in items]), [item["caption"] for item in items], [r.path for r in records]


@dataclass
class Scorer:
    """Quality of weights on the held-out images: PSNR (higher is better) or the task loss on fixed draws (lower)."""

    task: Task
    inputs: object
    draws: int
    seed: int

    @property
    def name(self) -> str:
        return "PSNR dB" if isinstance(self.task, ImageFittingTask) else "loss"

    def __call__(self, weights: Weights) -> float:
        losses = heldout_losses(self.task, weights, self.inputs, self.draws, self.seed)
        return float(psnr_db(losses).mean() if isinstance(self.task, ImageFittingTask) else losses.mean())


def train_field(config: Config, data: Path, output: Path) -> tuple[Path, float]:
    started = time.perf_counter()
    result = Trainer(config, data, output).train()
    return result.field_dir, time.perf_counter() - started


def field_scores(field_dir: Path, images: torch.Tensor, score: Scorer, steps: list[int]) -> list[float]:
    field, _ = load_field(field_dir)
    with torch.no_grad():
        tokens = field.encoder(images)
        return [score(field(t=t, encoder_tokens=tokens)) for t in steps]


def parse_fractions(parser: argparse.ArgumentParser, option: str, text: str) -> list[float]:
    """Comma-separated fractions of the budget, each in (0, 1]; a one-line usage error otherwise."""
    try:
        fractions = [float(f) for f in text.split(",")]
    except ValueError:
        parser.error(f"{option} {text}: expected numbers separated by commas, e.g. 0.25,1")
    if not all(0 < f <= 1 for f in fractions):
        parser.error(f"{option} {text}: each fraction of the budget must be in (0, 1]")
    return fractions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(DEFAULTS), required=True)
    parser.add_argument("--budget", type=int, required=True, help="task-gradient evaluations each field may spend")
    parser.add_argument("--config", type=Path, help="default configs/inr.yaml (inr) or configs/tiny.yaml (lora)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="config override key=value; repeatable")
    parser.add_argument("--train", type=Path, help="folder of training images; default crops of scikit-image photos")
    parser.add_argument("--heldout", type=Path, help="folder of held-out images; default crops of other scikit-image photos")
    parser.add_argument("--fractions", default="0.25,1", help="budget fractions to train at, comma-separated")
    parser.add_argument("--baseline-fractions", help="of those, the ones the supervised baseline trains at too; default all "
                        "(it must include the largest: the targets compare against the baseline at full budget)")
    parser.add_argument("--work", type=Path, help="folder for crops, precomputed weights and runs; default a temporary one")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    fractions = parse_fractions(parser, "--fractions", args.fractions)
    baseline_fractions = parse_fractions(parser, "--baseline-fractions", args.baseline_fractions) if args.baseline_fractions else fractions
    if args.budget <= 0:
        parser.error(f"--budget {args.budget}: must be positive")
    if max(fractions) not in baseline_fractions or not set(baseline_fractions) <= set(fractions):
        parser.error(f"--baseline-fractions {args.baseline_fractions}: must be among --fractions {args.fractions} and include the largest")
    started = time.perf_counter()
    torch.manual_seed(0)
    config_path, n_train, n_heldout = DEFAULTS[args.task]
    fixed = ["train.heldout=0", "train.eval_every=0", "train.checkpoint_every=0", "train.cache_latents=true"]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    config = load_config(args.config or Path(config_path), [*args.overrides, *fixed])
    if config.model.task == "inr" and config.model.encoder == "tiny":
        fixed.append(f"model.encoder={write_pixel_encoder(work / 'encoder', config.model.resolution)}")
        config = load_config(args.config or Path(config_path), [*args.overrides, *fixed])
    objective, steps = config.objective, config.train.max_steps
    size = config.model.resolution
    train_dir = args.train or write_crops(work / "train", TRAIN_PHOTOS, n_train, size, seed=0, augment=True)
    heldout_dir = args.heldout or write_crops(work / "heldout", HELDOUT_PHOTOS, n_heldout, size, seed=1, augment=False)
    train_images = scan_image_folder(train_dir, config.data.caption_template, config.data.token, warn=lambda m: None).records

    # Real optimisation of every held-out image from theta_0, scored along t.
    images, captions, _ = load_images(heldout_dir, config)
    task = build_task(config, torch.device("cpu"), torch.float32)
    score = Scorer(task, task.prepare(images, captions), config.train.eval_draws, config.train.seed + 99)
    theta0 = {name: w.expand(len(images), *w.shape) for name, w in task.initial_weights().items()}
    trajectory, _ = real_trajectory(task, theta0, score.inputs, objective, torch.Generator().manual_seed(config.train.seed + 100),
                                    objective.steps)
    grid = sorted(set(np.linspace(0, objective.steps, min(objective.steps, 20) + 1).round().astype(int).tolist()))
    real_along_t = [score(theta0 if t == 0 else trajectory[t - 1]) for t in grid]
    print(f"held-out: {len(images)} images, real optimisation {score.name} {real_along_t[0]:.4g} -> {real_along_t[-1]:.4g} "
          f"in T={objective.steps} steps", flush=True)

    per_condition = objective.rollout + (1 if objective.end_weight > 0 else 0)  # task gradients per condition
    batch = max(1, args.budget // (steps * per_condition))
    runs = []
    for fraction in fractions:
        budget = int(args.budget * fraction)
        run_steps = max(1, round(steps * fraction))
        shape = [f"train.batch_size={batch}", f"train.max_steps={run_steps}"]
        matching = load_config(args.config or Path(config_path), [*args.overrides, *fixed, *shape])
        field_dir, matching_seconds = train_field(matching, train_dir, work / f"matching-{fraction:g}")
        field_along_t = field_scores(field_dir, images, score, grid)
        run = {"fraction": fraction, "budget": budget, "field_T": field_along_t[-1], "supervised_T": None,
               "matching": {"batch": batch, "steps": run_steps, "gradients": batch * run_steps * per_condition, "seconds": matching_seconds},
               "supervised": None, "field_along_t": field_along_t}
        runs.append(run)
        if fraction not in baseline_fractions:
            print(f"budget {budget}: field {run['field_T']:.4g} ({score.name})", flush=True)
            continue
        n_images = min(len(train_images), budget // objective.steps)
        subset = work / f"supervised-{fraction:g}" / "data"
        shutil.rmtree(subset, ignore_errors=True)
        subset.mkdir(parents=True)
        for record in train_images[:n_images]:
            shutil.copy(record.path, subset / record.path.name)
        precomputed = work / f"supervised-{fraction:g}" / "precomputed"
        precompute_started = time.perf_counter()
        precompute(config, subset, precomputed, batch_size=256 if args.task == "inr" else 8)
        precompute_seconds = time.perf_counter() - precompute_started
        supervised = load_config(args.config or Path(config_path), [
            *args.overrides, *fixed, "objective.kind=supervised", f"objective.precomputed={precomputed}",
            f"train.batch_size={min(batch, n_images)}", f"train.max_steps={run_steps}"])
        supervised_dir, supervised_seconds = train_field(supervised, subset, work / f"supervised-{fraction:g}" / "run")
        run["supervised_T"] = field_scores(supervised_dir, images, score, [objective.steps])[0]
        run["supervised"] = {"images": n_images, "steps": run_steps, "gradients": n_images * objective.steps,
                             "seconds": precompute_seconds + supervised_seconds, "precompute_seconds": precompute_seconds}
        print(f"budget {budget}: field {runs[-1]['field_T']:.4g}, supervised {runs[-1]['supervised_T']:.4g} ({score.name})", flush=True)

    full = max(runs, key=lambda run: run["budget"])
    result = {
        "task": args.task, "metric": score.name, "budget": args.budget, "T": objective.steps,
        "theta0": real_along_t[0], "real_T": real_along_t[-1], "field_T": full["field_T"], "supervised_T": full["supervised_T"],
        "runs": runs, "t": grid, "real_along_t": real_along_t, "heldout_images": len(images), "train_images": len(train_images),
        "config": config.to_dict(), "seconds": time.perf_counter() - started,
    }
    if args.task == "lora":
        gain = result["theta0"] - result["real_T"]
        result["R_field"] = (result["theta0"] - result["field_T"]) / gain
        result["R_supervised"] = (result["theta0"] - result["supervised_T"]) / gain
    report(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(result, args.plot)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def report(result: dict) -> None:
    metric, T = result["metric"], result["T"]
    print(f"\n{result['task']}: held-out {metric} on {result['heldout_images']} images, T={T}, budget {result['budget']} task gradients")
    print(f"{'':34s}{metric:>10s}{'gradients':>12s}{'seconds':>10s}")
    print(f"{'theta_0':34s}{result['theta0']:10.4g}")
    print(f"{'real optimisation at T':34s}{result['real_T']:10.4g}")
    for run in result["runs"]:
        matching, supervised = run["matching"], run["supervised"]
        share = f"{run['fraction']:g} budget"
        print(f"{'field at T, ' + share:34s}{run['field_T']:10.4g}{matching['gradients']:12d}{matching['seconds']:10.0f}")
        if supervised is not None:
            print(f"{f'supervised at T, {share}':34s}{run['supervised_T']:10.4g}{supervised['gradients']:12d}{supervised['seconds']:10.0f}")
    if "R_field" in result:
        print(f"R_field {result['R_field']:.3f}, R_supervised {result['R_supervised']:.3f}")
    print(f"total {result['seconds']:.0f} s")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["metric"]
    figure, (along, budget) = plt.subplots(1, 2, figsize=(10, 4))
    along.plot(result["t"], result["real_along_t"], "k-", label="real optimisation")
    for run in result["runs"]:
        along.plot(result["t"], run["field_along_t"], "-", label=f"field, budget x{run['fraction']:g}")
    along.plot([result["T"]], [result["supervised_T"]], "s", label="supervised at T (full budget)")
    along.set_xlabel("step t")
    along.set_ylabel(f"held-out {metric}")
    along.legend()
    budgets = [run["budget"] for run in result["runs"]]
    budget.plot(budgets, [run["field_T"] for run in result["runs"]], "o-", label="field (gradient matching)")
    baseline = [run for run in result["runs"] if run["supervised"] is not None]
    budget.plot([run["budget"] for run in baseline], [run["supervised_T"] for run in baseline], "s-", label="supervised (two-phase)")
    budget.axhline(result["real_T"], color="k", linestyle="--", label="real optimisation at T")
    budget.set_xscale("log")
    budget.set_xlabel("task-gradient evaluations")
    budget.set_ylabel(f"held-out {metric} at T")
    budget.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
