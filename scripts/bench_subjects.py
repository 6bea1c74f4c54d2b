"""Held-out R of a field conditioned on a set of photos, seeing 1, 2 or 4 of a subject's 4 photos, against real
optimisation on all 4; next to today's single-photo field trained at the same budget.

Subjects are synthetic: each is one region of a photo that scikit-image or matplotlib ships (nothing is
downloaded), and its 4 photos are different crops of that region with a small colour change, so the photos of a
subject show the same thing and differ as a user's photos do. Training subjects come from one set of photos,
held-out ones from photos of other kinds (bench_quality.py's lists).

Arms, at the same budget of task evaluations (per step, the loss of one photo once counts one):
- `set`: subject folders, data.photos_per_subject = 4 (the real update over all 4 photos), the field shown 1..4
  of them; train.batch_size subjects per step.
- `single`: the same photos in a flat folder, each its own subject as before; 4 x train.batch_size per step.

Every arm is scored on each held-out subject's 4 photos on fixed draws: R = (L(theta_0) - L(Psi(c, T))) /
(L(theta_0) - L(theta_T)) where theta_T is T real updates on the loss over all 4 photos and c is 1 photo (each
of the 4 in turn), 2 (two disjoint pairs) or all 4; the jackknife standard error over subjects.

Usage: python scripts/bench_subjects.py --steps 300 --json subjects.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import HELDOUT_PHOTOS, TRAIN_PHOTOS, photo, recovered  # noqa: E402

from hyperfields.config import Config, load_config  # noqa: E402
from hyperfields.dataset import load_image  # noqa: E402
from hyperfields.evaluation import heldout_losses  # noqa: E402
from hyperfields.field.io import load_field  # noqa: E402
from hyperfields.streams import stream  # noqa: E402
from hyperfields.tasks import build_task  # noqa: E402
from hyperfields.tasks.subject import PhotoSets, SubjectTask  # noqa: E402
from hyperfields.training import train  # noqa: E402
from hyperfields.trajectory import real_trajectory  # noqa: E402

PHOTOS = 4  # per subject
SHOWN = {1: [[0], [1], [2], [3]], 2: [[0, 1], [2, 3]], 4: [[0, 1, 2, 3]]}  # which photos the field sees


def write_subjects(folder: Path, names: tuple[str, ...], count: int, size: int, seed: int) -> list[Path]:
    """`count` subject folders of PHOTOS photos each: crops of one region of a photo, each with a colour change."""
    rng = np.random.default_rng(seed)
    pictures = {name: photo(name) for name in names}
    subjects = []
    for i in range(count):
        pixels = pictures[names[i % len(names)]]
        height, width = pixels.shape[:2]
        side = int(rng.integers(min(height, width) // 4, min(height, width) // 2 + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        subject = folder / f"subject{i:03d}"
        subject.mkdir(parents=True, exist_ok=True)
        for k in range(PHOTOS):
            crop_side = int(side * rng.uniform(0.7, 0.9))
            dy, dx = (int(rng.integers(0, side - crop_side + 1)) for _ in range(2))
            crop = pixels[top + dy : top + dy + crop_side, left + dx : left + dx + crop_side].astype(np.float32)
            crop = np.clip(crop * rng.uniform(0.85, 1.15, size=3) + rng.uniform(-12, 12), 0, 255).astype(np.uint8)
            Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS).save(subject / f"{k}.png")
        subjects.append(subject)
    return subjects


def flatten(subjects: list[Path], folder: Path) -> Path:
    """The same photos in one flat folder: each its own subject."""
    folder.mkdir(parents=True, exist_ok=True)
    for subject in subjects:
        for image in sorted(subject.iterdir()):
            shutil.copy(image, folder / f"{subject.name}_{image.name}")
    return folder


def train_arm(config: Config, data: Path, output: Path) -> tuple[Path, float]:
    started = time.perf_counter()
    result = train(config, data, output)
    return result.field_dir, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each arm")
    parser.add_argument("--batch-size", type=int, default=4, help="subjects per step of the set arm")
    parser.add_argument("--train-subjects", type=int, default=32)
    parser.add_argument("--heldout-subjects", type=int, default=8)
    parser.add_argument("--draws", type=int, default=16, help="fixed noise draws per photo in the scores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config key=value")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    base = [f"train.max_steps={args.steps}", "train.heldout=0", "train.eval_every=0", "train.checkpoint_every=0"]
    set_config = load_config(args.config, [*base, f"train.batch_size={args.batch_size}", *args.overrides])
    single_config = load_config(args.config, [*base, f"train.batch_size={PHOTOS * args.batch_size}", *args.overrides])
    size = set_config.model.resolution
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        train_subjects = write_subjects(root / "train", TRAIN_PHOTOS, args.train_subjects, size, args.seed)
        heldout = write_subjects(root / "heldout", HELDOUT_PHOTOS, args.heldout_subjects, size, args.seed + 1)
        fields, seconds = {}, {}
        fields["set"], seconds["set"] = train_arm(set_config, root / "train", root / "set")
        flat = flatten(train_subjects, root / "flat")
        fields["single"], seconds["single"] = train_arm(single_config, flat, root / "single")

        # Held-out: each subject's 4 photos, rows ordered (subject, photo); theta_T on the loss over all 4.
        task = SubjectTask(build_task(set_config, torch.device("cpu"), torch.float32))
        pixels = torch.stack([torch.stack([load_image(p, size) for p in sorted(s.iterdir())]) for s in heldout])
        caption = set_config.data.caption_template.format(token=set_config.data.token)
        inputs = PhotoSets(task.prepare(pixels.flatten(0, 1), [caption] * (len(heldout) * PHOTOS)), PHOTOS)
        objective = set_config.objective
        theta0 = {n: w.unsqueeze(0).expand(len(heldout), *w.shape) for n, w in task.initial_weights().items()}
        generator = stream(args.seed, "reference")
        trajectory, _ = real_trajectory(task, theta0, inputs, objective, generator, objective.steps)

        def score(weights: dict[str, torch.Tensor]) -> torch.Tensor:
            return heldout_losses(task, weights, inputs, args.draws, args.seed)

        loss_theta0, loss_real = score(theta0), score(trajectory[-1])
        table: dict[str, dict[int, tuple[float, float]]] = {}
        for arm, field_dir in fields.items():
            field, _ = load_field(field_dir)
            table[arm] = {}
            for shown, choices in SHOWN.items():
                with torch.no_grad():
                    losses = torch.stack(
                        [score(field(t=float(objective.steps), images=pixels[:, choice])) for choice in choices]
                    ).mean(dim=0)  # (subjects,): each subject's loss averaged over which photos were shown
                table[arm][shown] = recovered(loss_theta0, loss_real, losses)
    total = time.perf_counter() - started
    command = " ".join(["python", *sys.argv])
    print(f"$ {command}")
    print(f"held-out: {len(heldout)} subjects x {PHOTOS} photos; R against real optimisation on all {PHOTOS} photos")
    print("| field | trained on | seconds | R, 1 photo | R, 2 photos | R, 4 photos |")
    print("|---|---|---|---|---|---|")
    for arm, rows in table.items():
        trained_on = "subject folders" if arm == "set" else "flat folder (each photo a subject)"
        cells = " | ".join(f"{value:.3f} ± {error:.3f}" for value, error in rows.values())
        print(f"| {arm} | {trained_on} | {seconds[arm]:.0f} | {cells} |")
    print(f"total {total:.0f} s")
    if args.json:
        result = {
            "command": command,
            "seconds": {**seconds, "total": total},
            "R": {arm: {str(k): v for k, v in rows.items()} for arm, rows in table.items()},
            "loss_theta0": float(loss_theta0.mean()),
            "loss_real": float(loss_real.mean()),
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
