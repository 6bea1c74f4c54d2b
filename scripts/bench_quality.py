"""Held-out quality along the trajectory of three fields trained at the same budget, against real optimisation.

The arms: `field` (gradient matching, objective.kind=matching, with the config's terms), `direct` (end-to-end
training of Psi(c, T) on the task loss, objective.kind=direct) and `supervised` (the two-phase baseline: precompute
theta_T, then regress Psi(c, T) on it). Every arm gets the same budget of task evaluations (one per sample and
forward/backward pass, whatever objective.noise_draws; a forward pass without backward counts as one too):
matching spends K = objective.rollout per sampled condition and optimiser step, K + 2 with objective.end_weight > 0
(the gradient at Psi(c, T) and theta_0's loss on the same draws), 2 more with objective.hinge_weight > 0 (the
gradient at Psi(c, t+1) and the loss of the real update on the same draws); direct spends 1. At the full budget
each trains train.max_steps steps on batches of budget / (steps * that) conditions, and at a fraction f of it
f * train.max_steps steps on batches of the same size (a shorter run, not a noisier one). The supervised baseline
spends T per training image in `precompute` (f * budget / T images) and nothing while it regresses for the same
number of steps.

Each arm is scored on held-out photos at t = T/4, T/2, 3T/4 and T next to real optimisation at the same t: the mean
PSNR in dB for --task inr, R_t = (L(theta_0) - L(Psi(c, t))) / (L(theta_0) - L(theta_t)) on fixed draws for
--task lora, each with its standard error over the held-out photos (JSON keys `trajectory` and `stderr`); for inr
also each arm's gap to real optimisation photo by photo, with its paired standard error (`gap`, `gap_stderr`).

Without --train / --heldout the photos come from scikit-image and matplotlib (nothing is downloaded): training crops
from one set of photos, held-out crops from photos of other kinds.

Usage: python scripts/bench_quality.py --task inr --budget 128000 --json quality.json --plot quality.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hyperfields.config import Config, load_config  # noqa: E402
from hyperfields.data import scan_image_folder  # noqa: E402
from hyperfields.dataset import ImageCaptionDataset  # noqa: E402
from hyperfields.evaluation import heldout_losses, psnr_db  # noqa: E402
from hyperfields.field.io import load_field  # noqa: E402
from hyperfields.precompute import precompute  # noqa: E402
from hyperfields.streams import stream  # noqa: E402
from hyperfields.tasks import build_task  # noqa: E402
from hyperfields.tasks.base import ImageFittingTask, Task, Weights  # noqa: E402
from hyperfields.training import train  # noqa: E402
from hyperfields.trajectory import real_trajectory  # noqa: E402

TRAIN_PHOTOS = (
    "astronaut",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "page",
    "text",
    "cell",
)
# Photos of other kinds than the training ones (food, objects, gravel, a synthetic colour wheel, a vehicle, a portrait,
# a still life, a grey medical image), so the held-out figure measures how the field generalises, not how it fits
# the training photos' statistics.
HELDOUT_PHOTOS = ("coffee", "clock", "gravel", "colorwheel", "motorcycle", "grace_hopper", "present", "microaneurysms")
MATPLOTLIB_PHOTOS = {"grace_hopper": "grace_hopper.jpg", "present": "Minduka_Present_Blue_Pack.png"}
ARMS = ("field", "direct", "supervised")
DEFAULTS = {  # config, training crops, held-out crops
    "inr": ("configs/inr.yaml", 20000, 64),
    "lora": ("configs/tiny.yaml", 32, 8),
}


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photo that scikit-image or matplotlib ships (nothing is downloaded)."""
    if name in MATPLOTLIB_PHOTOS:
        from matplotlib import cbook

        with cbook.get_sample_data(MATPLOTLIB_PHOTOS[name]) as file:
            pixels = np.asarray(Image.open(file).convert("RGB"))
    else:
        from skimage import data

        pixels = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return pixels[..., :3]


def write_crops(folder: Path, names: tuple[str, ...], count: int, size: int, seed: int, augment: bool) -> Path:
    """`count` random square crops of the photos, resized to `size` px; flips, rotations, channel orders to augment."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = {name: photo(name) for name in names}
    for i in range(count):
        pixels = photos[names[i % len(names)]]
        height, width = pixels.shape[:2]
        side = int(rng.integers(min(2 * size, min(height, width) // 4), min(height, width) // 3 + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = pixels[top : top + side, left : left + side]
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
    config = ViTConfig(
        image_size=size,
        patch_size=4,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        layer_norm_eps=100.0,
    )
    model = ViTModel(config)
    with torch.no_grad():
        model.layernorm.weight.fill_(10.0)
    model.save_pretrained(folder)
    Processor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def load_images(folder: Path, config: Config) -> tuple[torch.Tensor, list[str], list[Path]]:
    records = scan_image_folder(
        folder, config.data.caption_template, config.data.token, config.model.resolution, warn=lambda message: None
    ).records
    dataset = ImageCaptionDataset(records, config.model.resolution)
    items = [dataset[i] for i in range(len(dataset))]
    return (
        torch.stack([item["pixel_values"] for item in items]),
        [item["caption"] for item in items],
        [r.path for r in records],
    )


@dataclass
class Scorer:
    """Per-condition quality of weights on the held-out images: PSNR dB (inr), the task loss on fixed draws (lora)."""

    task: Task
    inputs: object
    draws: int
    seed: int

    @property
    def psnr(self) -> bool:
        return isinstance(self.task, ImageFittingTask)

    @property
    def name(self) -> str:
        return "PSNR dB" if self.psnr else "loss"

    def __call__(self, weights: Weights) -> torch.Tensor:
        losses = heldout_losses(self.task, weights, self.inputs, self.draws, self.seed)
        return psnr_db(losses) if self.psnr else losses  # (N,)


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / len(values) ** 0.5) if len(values) > 1 else 0.0


def recovered(theta0: torch.Tensor, real: torch.Tensor, field: torch.Tensor) -> tuple[float, float]:
    """R = (L(theta_0) - L(Psi)) / (L(theta_0) - L(theta_t)) on the mean losses, and its jackknife standard error
    over the conditions (a per-condition ratio is unstable where a condition's real gain is small)."""

    def ratio(keep: torch.Tensor) -> float:
        return float((theta0[keep].mean() - field[keep].mean()) / (theta0[keep].mean() - real[keep].mean()))

    n = len(theta0)
    whole = ratio(torch.ones(n, dtype=torch.bool))
    if n < 2:
        return whole, 0.0
    leave_one_out = torch.tensor([ratio(torch.arange(n) != i) for i in range(n)])
    return whole, float(((n - 1) / n * (leave_one_out - leave_one_out.mean()).pow(2).sum()).sqrt())


def train_field(config: Config, data: Path, output: Path) -> tuple[Path, float]:
    started = time.perf_counter()
    result = train(config, data, output)
    return result.field_dir, time.perf_counter() - started


def field_scores(field_dir: Path, images: torch.Tensor, score: Scorer, steps: list[int]) -> list[torch.Tensor]:
    """The per-condition scores of Psi(c, t) at each of `steps`."""
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


def quarter_steps(steps: int) -> list[int]:
    """T/4, T/2, 3T/4 and T, rounded to whole steps."""
    return sorted({max(1, round(steps * k / 4)) for k in range(1, 5)})


def arm_summary(
    score: Scorer, at_t: list[torch.Tensor], theta0: torch.Tensor, real: list[torch.Tensor], quarters: list[int]
) -> tuple[dict[int, float], dict[int, float]]:
    """{t: value} and {t: standard error}: mean PSNR for inr, R_t for lora."""
    values, errors = {}, {}
    for t, field, real_t in zip(quarters, at_t, real):
        values[t], errors[t] = mean_and_stderr(field) if score.psnr else recovered(theta0, real_t, field)
    return values, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(DEFAULTS), required=True)
    parser.add_argument("--budget", type=int, required=True, help="task evaluations each field may spend")
    parser.add_argument("--config", type=Path, help="default configs/inr.yaml (inr) or configs/tiny.yaml (lora)")
    parser.add_argument(
        "--set", action="append", default=[], dest="overrides", help="config override key=value; repeatable"
    )
    parser.add_argument("--train", type=Path, help="folder of training images; default crops of scikit-image photos")
    parser.add_argument("--heldout", type=Path, help="folder of held-out images; default crops of other photos")
    parser.add_argument("--fractions", default="0.25,1", help="budget fractions to train at, comma-separated")
    parser.add_argument(
        "--baseline-fractions",
        help="of those, the ones the supervised and direct arms train at too; "
        "default all (it must include the largest: the targets compare the arms at full budget)",
    )
    parser.add_argument(
        "--arms",
        default="field,direct,supervised",
        help="arms to train, comma-separated, from field (gradient matching), direct, supervised",
    )
    parser.add_argument(
        "--work", type=Path, help="folder for crops, precomputed weights and runs; default a temporary one"
    )
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    fractions = parse_fractions(parser, "--fractions", args.fractions)
    baseline_fractions = (
        parse_fractions(parser, "--baseline-fractions", args.baseline_fractions)
        if args.baseline_fractions
        else fractions
    )
    chosen = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    if not chosen or not set(chosen) <= set(ARMS):
        parser.error(f"--arms {args.arms}: expected some of {', '.join(ARMS)}, comma-separated")
    if args.budget <= 0:
        parser.error(f"--budget {args.budget}: must be positive")
    if max(fractions) not in baseline_fractions or not set(baseline_fractions) <= set(fractions):
        parser.error(
            f"--baseline-fractions {args.baseline_fractions}: must be among --fractions {args.fractions} "
            "and include the largest"
        )
    started = time.perf_counter()
    torch.manual_seed(0)
    config_path, n_train, n_heldout = DEFAULTS[args.task]
    fixed = ["train.heldout=0", "train.eval_every=0", "train.checkpoint_every=0", "train.cache=memory"]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    config = load_config(args.config or Path(config_path), [*args.overrides, *fixed])
    if config.model.task == "inr" and config.model.encoder == "tiny":
        fixed.append(f"model.encoder={write_pixel_encoder(work / 'encoder', config.model.resolution)}")
        config = load_config(args.config or Path(config_path), [*args.overrides, *fixed])
    objective, steps = config.objective, config.train.max_steps
    size = config.model.resolution
    train_dir = args.train or write_crops(work / "train", TRAIN_PHOTOS, n_train, size, seed=0, augment=True)
    heldout_dir = args.heldout or write_crops(work / "heldout", HELDOUT_PHOTOS, n_heldout, size, seed=1, augment=False)
    train_images = scan_image_folder(
        train_dir, config.data.caption_template, config.data.token, warn=lambda m: None
    ).records

    # Real optimisation of every held-out image from theta_0, scored along t.
    images, captions, _ = load_images(heldout_dir, config)
    task = build_task(config, torch.device("cpu"), torch.float32)
    score = Scorer(task, task.prepare(images, captions), config.train.eval_draws, config.train.seed + 99)
    theta0 = {name: w.expand(len(images), *w.shape) for name, w in task.initial_weights().items()}
    path, _ = real_trajectory(
        task, theta0, score.inputs, objective, stream(config.train.seed, "reference"), objective.steps
    )
    grid = sorted(set(np.linspace(0, objective.steps, min(objective.steps, 20) + 1).round().astype(int).tolist()))
    quarters = quarter_steps(objective.steps)
    at_theta0 = score(theta0)
    real = [score(path[t - 1]) for t in quarters]
    real_along_t = [float(score(theta0 if t == 0 else path[t - 1]).mean()) for t in grid]
    print(
        f"held-out: {len(images)} images, real optimisation {score.name} {real_along_t[0]:.4g} -> "
        f"{real_along_t[-1]:.4g} in T={objective.steps} steps",
        flush=True,
    )
    if score.psnr:
        trajectory = {"real": dict(zip(quarters, (mean_and_stderr(r)[0] for r in real)))}
        stderr = {"real": dict(zip(quarters, (mean_and_stderr(r)[1] for r in real)))}
    else:
        trajectory, stderr = {"real": {t: 1.0 for t in quarters}}, {"real": {t: 0.0 for t in quarters}}

    # Task evaluations per condition and optimiser step: each real update is one task gradient; the end term adds
    # the gradient at Psi(c, T) and theta_0's loss on the same draws (a forward pass, counted as a whole evaluation).
    per_condition = {
        "field": objective.rollout + (2 if objective.end_weight > 0 else 0) + (2 if objective.hinge_weight > 0 else 0),
        "direct": 1,
    }
    batch = {arm: max(1, args.budget // (steps * cost)) for arm, cost in per_condition.items()}
    runs = []
    for fraction in fractions:
        budget = int(args.budget * fraction)
        run_steps = max(1, round(steps * fraction))
        run: dict = {"fraction": fraction, "budget": budget, "arms": {}}
        runs.append(run)
        arms = [arm for arm in ARMS if arm in chosen and (arm == "field" or fraction in baseline_fractions)]
        for arm in arms:
            if arm == "supervised":
                n_images = min(len(train_images), budget // objective.steps)
                field_dir, seconds, precompute_seconds = train_supervised(
                    config,
                    args,
                    fixed,
                    train_images,
                    n_images,
                    run_steps,
                    batch["field"],
                    work / f"supervised-{fraction:g}",
                )
                cost = {
                    "images": n_images,
                    "steps": run_steps,
                    "gradients": n_images * objective.steps,
                    "precompute_seconds": precompute_seconds,
                }
            else:
                kind = "matching" if arm == "field" else "direct"
                shape = [f"objective.kind={kind}", f"train.batch_size={batch[arm]}", f"train.max_steps={run_steps}"]
                arm_config = load_config(args.config or Path(config_path), [*args.overrides, *fixed, *shape])
                field_dir, seconds = train_field(arm_config, train_dir, work / f"{arm}-{fraction:g}")
                cost = {
                    "batch": batch[arm],
                    "steps": run_steps,
                    "gradients": batch[arm] * run_steps * per_condition[arm],
                }
            at_t = field_scores(field_dir, images, score, quarters)
            values, errors = arm_summary(score, at_t, at_theta0, real, quarters)
            run["arms"][arm] = {
                **cost,
                "seconds": seconds,
                "trajectory": values,
                "stderr": errors,
                "score_T": float(at_t[-1].mean()),
                "along_t": [float(v.mean()) for v in field_scores(field_dir, images, score, grid)],
            }
            if score.psnr:  # the gap to real optimisation photo by photo: its error is far below either score's spread
                gaps = [mean_and_stderr(field - real_t) for field, real_t in zip(at_t, real)]
                run["arms"][arm]["gap"] = {t: gap for t, (gap, _) in zip(quarters, gaps)}
                run["arms"][arm]["gap_stderr"] = {t: error for t, (_, error) in zip(quarters, gaps)}
            print(
                f"budget {budget}: {arm} at T {values[quarters[-1]]:.4g} +- {errors[quarters[-1]]:.2g} "
                f"({'PSNR dB' if score.psnr else 'R'}, {seconds:.0f} s)",
                flush=True,
            )

    full = max(runs, key=lambda run: run["budget"])
    for arm, summary in full["arms"].items():
        trajectory[arm], stderr[arm] = summary["trajectory"], summary["stderr"]
    T = objective.steps
    result = {
        "task": args.task,
        "metric": score.name,
        "budget": args.budget,
        "T": T,
        "theta0": float(at_theta0.mean()),
        "real_T": float(real[-1].mean()),
        "trajectory": trajectory,
        "stderr": stderr,
        "runs": runs,
        "t": grid,
        "real_along_t": real_along_t,
        "heldout_images": len(images),
        "train_images": len(train_images),
        "config": config.to_dict(),
    }
    for arm, summary in full["arms"].items():
        result[f"{arm}_T"] = summary["score_T"]  # PSNR (inr) or mean held-out loss (lora), as theta0 and real_T
        if not score.psnr:
            result[f"R_{arm}"] = summary["trajectory"][T]
    result["seconds"] = time.perf_counter() - started
    report(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(result, args.plot)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def train_supervised(
    config: Config,
    args: argparse.Namespace,
    fixed: list[str],
    train_images: list,
    n_images: int,
    run_steps: int,
    batch: int,
    folder: Path,
) -> tuple[Path, float, float]:
    """The two-phase baseline on the first `n_images` training images: precompute theta_T, then regress on it."""
    subset = folder / "data"
    shutil.rmtree(subset, ignore_errors=True)
    subset.mkdir(parents=True)
    for record in train_images[:n_images]:
        shutil.copy(record.path, subset / record.path.name)
    precomputed = folder / "precomputed"
    started = time.perf_counter()
    batched = replace(config, train=replace(config.train, batch_size=256 if args.task == "inr" else 8))
    precompute(batched, subset, precomputed)
    precompute_seconds = time.perf_counter() - started
    supervised = load_config(
        args.config or Path(DEFAULTS[args.task][0]),
        [
            *args.overrides,
            *fixed,
            "objective.kind=supervised",
            f"objective.precomputed={precomputed}",
            f"train.batch_size={min(batch, n_images)}",
            f"train.max_steps={run_steps}",
        ],
    )
    field_dir, seconds = train_field(supervised, subset, folder / "run")
    return field_dir, precompute_seconds + seconds, precompute_seconds


def report(result: dict) -> None:
    metric, T = result["metric"], result["T"]
    value = "PSNR dB" if result["task"] == "inr" else "R_t"
    quarters = list(result["trajectory"]["real"])
    print(
        f"\n{result['task']}: held-out {metric} on {result['heldout_images']} images, T={T}, "
        f"budget {result['budget']} task evaluations; theta_0 {result['theta0']:.4g}, "
        f"real theta_T {result['real_T']:.4g}"
    )
    print(f"{value + ' at t':28s}" + "".join(f"{t:>14d}" for t in quarters) + f"{'evaluations':>13s}{'seconds':>9s}")
    print(f"{'real optimisation':28s}" + "".join(f"{result['trajectory']['real'][t]:>14.4g}" for t in quarters))
    for run in result["runs"]:
        for arm, summary in run["arms"].items():
            cells = "".join(f"{summary['trajectory'][t]:>8.4g} ±{summary['stderr'][t]:<4.2g}" for t in quarters)
            label = f"{arm}, budget x{run['fraction']:g}"
            print(f"{label:28s}{cells}{summary['gradients']:>13d}{summary['seconds']:>9.0f}")
    print(f"total {result['seconds']:.0f} s")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["metric"]
    figure, (along, budget) = plt.subplots(1, 2, figsize=(10, 4))
    along.plot(result["t"], result["real_along_t"], "k-", label="real optimisation")
    for run in result["runs"]:
        for arm, summary in run["arms"].items():
            along.plot(result["t"], summary["along_t"], "-", label=f"{arm}, budget x{run['fraction']:g}")
    along.set_xlabel("step t")
    along.set_ylabel(f"held-out {metric}")
    along.legend(fontsize=7)
    T = result["T"]
    for arm, marker in zip(ARMS, ("o-", "^-", "s-")):
        runs = [run for run in result["runs"] if arm in run["arms"]]
        if not runs:
            continue
        budget.errorbar(
            [run["budget"] for run in runs],
            [run["arms"][arm]["trajectory"][T] for run in runs],
            yerr=[run["arms"][arm]["stderr"][T] for run in runs],
            fmt=marker,
            label=arm,
            capsize=3,
        )
    if result["task"] == "inr":
        budget.axhline(result["real_T"], color="k", linestyle="--", label="real optimisation at T")
    budget.set_xscale("log")
    budget.set_xlabel("task evaluations")
    budget.set_ylabel("held-out PSNR dB at T" if result["task"] == "inr" else "R at T")
    budget.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
