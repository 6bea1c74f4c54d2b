"""Held-out R of a field conditioned on a set of photos, seeing 1, 2 or 4 of a subject's 4 photos, against real
optimisation on all 4; next to today's single-photo field trained at the same budget.

Subjects are synthetic: each is one region of a photo that scikit-image or matplotlib ships (nothing is
downloaded), and its 4 photos are 4 views of that region, as a user's photos of one subject show it from several
sides: crops of about 60% of its side from its four corners (with some jitter), so two photos share about a fifth
to a third of their area and together they cover all of it, each with a small colour change. Real optimisation on
all 4 photos then learns what no single photo shows, and a field shown one photo has to guess the rest. (Crops of
70-90% of one region overlap by most of their area: real optimisation on any one of them already recovers most of
what it learns from all 4, and no field can gain from seeing more.) Training subjects come from one set of photos,
held-out ones from photos of other kinds (bench_quality.py's lists).

Arms, at the same budget of task evaluations (per step, the loss of one photo once counts one):
- `set`: subject folders, the real update over data.photos_per_subject of a subject's 4 photos (all 4 by default,
  drawn anew for every task gradient when fewer), the field shown 1..4 of them; 4 x --batch-size / that many
  subjects per step.
- `single`: the same photos in a flat folder, each its own subject as before; 4 x --batch-size per step.

Every arm is scored on each held-out subject's 4 photos on fixed draws: R = (L(theta_0) - L(Psi(c, T))) /
(L(theta_0) - L(theta_T)) where theta_T is T real updates on the loss over all 4 photos and c is 1 photo (each
of the 4 in turn), 2 (two disjoint pairs) or all 4; the jackknife standard error over subjects. Two references
bound what a field can show: real optimisation on only the photos shown (scored on all 4 likewise), which no field
shown those photos is expected to beat, and theta_T of another held-out subject, which tells how much of theta_T
depends on the subject at all (near 1: nothing a photo shows matters, and more photos cannot help).

Usage: python scripts/bench_subjects.py --steps 300 --json subjects.json
       python scripts/bench_subjects.py --config configs/inr.yaml --steps 2000 --train-subjects 256 \
           --heldout-subjects 32 --json subjects_inr.json
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
VIEW = 0.6  # a photo's side, as a fraction of its region's
SHOWN = {1: [[0], [1], [2], [3]], 2: [[0, 1], [2, 3]], 4: [[0, 1, 2, 3]]}  # which photos the field sees


def write_subjects(folder: Path, names: tuple[str, ...], count: int, size: int, seed: int) -> list[Path]:
    """`count` subject folders of PHOTOS photos each: views of one region of a photo from its four corners, each a
    crop of about VIEW of the region's side with a small shift and a colour change."""
    rng = np.random.default_rng(seed)
    pictures = {name: photo(name) for name in names}
    subjects = []
    for i in range(count):
        pixels = pictures[names[i % len(names)]]
        height, width = pixels.shape[:2]
        side = int(rng.integers(min(height, width) // 3, min(height, width) * 2 // 3 + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        subject = folder / f"subject{i:03d}"
        subject.mkdir(parents=True, exist_ok=True)
        for k in range(PHOTOS):
            crop_side = int(side * rng.uniform(VIEW - 0.05, VIEW + 0.05))
            span, jitter = side - crop_side, (side - crop_side) // 8
            corner = ((k // 2) * span, (k % 2) * span)  # top-left, top-right, bottom-left, bottom-right
            dy, dx = (min(max(c + int(rng.integers(-jitter, jitter + 1)), 0), span) for c in corner)
            crop = pixels[top + dy : top + dy + crop_side, left + dx : left + dx + crop_side].astype(np.float32)
            crop = np.clip(crop * rng.uniform(0.85, 1.15, size=3) + rng.uniform(-12, 12), 0, 255).astype(np.uint8)
            Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS).save(subject / f"{k}.png")
        subjects.append(subject)
    return subjects


def difference(
    theta0: torch.Tensor, real: torch.Tensor, more: torch.Tensor, fewer: torch.Tensor
) -> tuple[float, float]:
    """R(more) - R(fewer) over the same subjects (losses (N,) each), and its jackknife standard error."""

    def ratio(keep: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        return (theta0[keep].mean() - field[keep].mean()) / (theta0[keep].mean() - real[keep].mean())

    n = len(theta0)
    whole = ratio(torch.ones(n, dtype=torch.bool), more) - ratio(torch.ones(n, dtype=torch.bool), fewer)
    out = torch.stack([ratio(torch.arange(n) != i, more) - ratio(torch.arange(n) != i, fewer) for i in range(n)])
    return float(whole), float(((n - 1) / n * (out - out.mean()).pow(2).sum()).sqrt())


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
    parser.add_argument(
        "--batch-size", type=int, default=4, help="4 x this photo losses a step for every arm (subjects of the set arm)"
    )
    parser.add_argument("--train-subjects", type=int, default=32)
    parser.add_argument("--heldout-subjects", type=int, default=8)
    parser.add_argument("--draws", type=int, default=16, help="fixed noise draws per photo in the scores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default="set,single", help="which fields to train, comma-separated")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config key=value")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    base = [f"train.max_steps={args.steps}", "train.heldout=0", "train.eval_every=0", "train.checkpoint_every=0"]
    # Every arm spends PHOTOS x --batch-size photo losses a step: the set arm takes that many subjects over the number
    # of photos each of its task gradients takes (data.photos_per_subject).
    budget = PHOTOS * args.batch_size
    per_subject = min(load_config(args.config, args.overrides).data.photos_per_subject, PHOTOS)
    set_config = load_config(args.config, [*base, f"train.batch_size={budget // per_subject}", *args.overrides])
    single_config = load_config(args.config, [*base, f"train.batch_size={budget}", *args.overrides])
    size = set_config.model.resolution
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        train_subjects = write_subjects(root / "train", TRAIN_PHOTOS, args.train_subjects, size, args.seed)
        heldout = write_subjects(root / "heldout", HELDOUT_PHOTOS, args.heldout_subjects, size, args.seed + 1)
        fields, seconds = {}, {}
        if "set" in args.arms.split(","):
            fields["set"], seconds["set"] = train_arm(set_config, root / "train", root / "set")
        if "single" in args.arms.split(","):
            flat = flatten(train_subjects, root / "flat")
            fields["single"], seconds["single"] = train_arm(single_config, flat, root / "single")

        # Held-out: each subject's 4 photos, rows ordered (subject, photo); theta_T on the loss over all 4.
        task = SubjectTask(build_task(set_config, torch.device("cpu"), torch.float32))
        pixels = torch.stack([torch.stack([load_image(p, size) for p in sorted(s.iterdir())]) for s in heldout])
        caption = set_config.data.caption_template.format(token=set_config.data.token)

        def photo_sets(shown: torch.Tensor) -> PhotoSets:  # (N, P, 3, H, W): the loss over each subject's P photos
            return PhotoSets(task.prepare(shown.flatten(0, 1), [caption] * shown.shape[:2].numel()), shown.shape[1])

        inputs, objective = photo_sets(pixels), set_config.objective
        theta0 = {n: w.unsqueeze(0).expand(len(heldout), *w.shape) for n, w in task.initial_weights().items()}

        def optimised(sets: PhotoSets) -> dict[str, torch.Tensor]:  # theta_T of real optimisation on `sets`
            return real_trajectory(task, theta0, sets, objective, stream(args.seed, "reference"), objective.steps)[0][
                -1
            ]

        def score(weights: dict[str, torch.Tensor]) -> torch.Tensor:
            return heldout_losses(task, weights, inputs, args.draws, args.seed)

        theta_T = optimised(inputs)
        loss_theta0, loss_real = score(theta0), score(theta_T)
        shown_R, shown_losses = {}, {}  # by arm, then by the number of photos shown: R and its error; (subjects,)
        predictors = {arm: load_field(field_dir)[0] for arm, field_dir in fields.items()}
        for arm, predict in [
            *(
                (arm, lambda shown, field=field: field(t=float(objective.steps), images=shown))
                for arm, field in predictors.items()
            ),
            ("real", lambda shown: theta_T if shown.shape[1] == PHOTOS else optimised(photo_sets(shown))),
        ]:
            shown_R[arm] = {}
            for shown, choices in SHOWN.items():
                with torch.no_grad():  # (subjects,): each subject's loss averaged over which photos were shown
                    losses = torch.stack([score(predict(pixels[:, choice])) for choice in choices]).mean(dim=0)
                shown_R[arm][shown] = recovered(loss_theta0, loss_real, losses)
                shown_losses.setdefault(arm, {})[shown] = losses
        # R from 4 photos minus R from 1, with its jackknife error: both on the same subjects, so paired.
        gains = {arm: difference(loss_theta0, loss_real, by[PHOTOS], by[1]) for arm, by in shown_losses.items()}
        another = {name: w.roll(1, dims=0) for name, w in theta_T.items()}  # subject i gets subject i - 1's theta_T
        another_R = recovered(loss_theta0, loss_real, score(another))
    total = time.perf_counter() - started
    command = " ".join(["python", *sys.argv])
    print(f"$ {command}")
    print(f"held-out: {len(heldout)} subjects x {PHOTOS} photos; R against real optimisation on all {PHOTOS} photos")
    print("| field | trained on | seconds | R, 1 photo | R, 2 photos | R, 4 photos | R, 4 photos - 1 |")
    print("|---|---|---|---|---|---|---|")
    trained_on = {"set": "subject folders", "single": "flat folder (each photo a subject)", "real": ""}
    for arm, rows in shown_R.items():
        cells = " | ".join(f"{value:.3f} ± {error:.3f}" for value, error in rows.values())
        name = "real optimisation on the photos shown" if arm == "real" else arm
        spent = f"{seconds[arm]:.0f}" if arm in seconds else ""
        gain = f"{gains[arm][0]:+.3f} ± {gains[arm][1]:.3f}"
        print(f"| {name} | {trained_on[arm]} | {spent} | {cells} | {gain} |")
    print(f"| theta_T of another subject | | | | | {another_R[0]:.3f} ± {another_R[1]:.3f} | |")
    print(f"total {total:.0f} s")
    if args.json:
        result = {
            "command": command,
            "seconds": {**seconds, "total": total},
            "R": {arm: {str(k): v for k, v in rows.items()} for arm, rows in shown_R.items()},
            "R_4_minus_1": gains,
            "R_another_subject": another_R,
            "losses": {arm: {str(k): v.tolist() for k, v in by.items()} for arm, by in shown_losses.items()},
            "loss_theta0": float(loss_theta0.mean()),
            "loss_real": float(loss_real.mean()),
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
