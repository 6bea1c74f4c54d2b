"""One evaluation: for every subject (its photos) and arm, a LoRA, images of every prompt with the same seeds, their
scores, and a contact sheet per subject (rows = arms, columns = prompts, the first image of each; a last row of the
subject's photos)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from hyperfields.data import scan_image_folder
from hyperfields.errors import UserError
from hyperfields.evaluate.arms import Arm, Personaliser
from hyperfields.evaluate.metrics import Scorers
from hyperfields.evaluate.prompts import Prompt
from hyperfields.files import atomic_write
from hyperfields.image_files import labelled_sheet
from hyperfields.predict import Photo, PhotoSet
from hyperfields.sampling import Sampling, sample_with_lora
from hyperfields.subjects import group_subjects

SHEET_CELL = 256  # pixels: the largest side of an image on a contact sheet
SHEET_PHOTOS = 4  # a subject's photos shown on its contact sheet, at most


@dataclass
class Plan:
    """What to evaluate: subjects, prompts, arms and how images are sampled."""

    subjects: dict[str, PhotoSet]  # each subject's photos by its name (of its images' folder and its sheet)
    prompts: list[Prompt]
    token: str  # the field's identifier token
    class_noun: str  # what the subjects are ("person", "dog"): fills {class}, and replaces the token for CLIP-T
    arms: list[Arm]
    sampling: Sampling


@dataclass
class ScoredImage:
    """One generated image: where it is, how it was made, and its scores."""

    path: str  # relative to the output folder
    arm: str  # the arm's kind
    label: str  # the arm's row name (the kind, with the step for field rows before T)
    subject: str  # the subject's name
    prompt: str  # the text the base model was sampled with
    scored_prompt: str  # the text CLIP-T was computed on
    seed: int
    t: float
    scores: dict[str, float]  # dino, clip_i, clip_t (and face)


@dataclass
class Evaluation:
    """Every scored image, and per arm the seconds each subject took to personalise and to sample."""

    images: list[ScoredImage] = field(default_factory=list)
    seconds: dict[str, list[float]] = field(default_factory=dict)  # by arm label, one entry per subject
    sampling_seconds: dict[str, list[float]] = field(default_factory=dict)


def subject_photos(folder: Path, warn: Callable[[str], None] | None = None) -> dict[str, list[Path]]:
    """The photos of each subject under `folder` as training groups them, by name: a sub-folder is one subject named
    after it, a photo beside sub-folders (or in a flat folder) its own, named by its number and stem ("000-photo") so
    that two photos with one file name never collide. Warnings go to `warn` (stderr if None)."""
    subjects: dict[str, list[Path]] = {}
    for index, subject in enumerate(group_subjects(folder, scan_image_folder(folder, warn=warn).records, warn)):
        name = f"{index:03d}-{Path(subject.name).stem}" if subject.loose else subject.name
        if name in subjects:
            raise UserError(
                f"two subjects of '{folder}' would both be named '{name}' (a sub-folder and a numbered photo beside "
                f"it); rename one of them"
            )
        subjects[name] = [record.path for record in subject.records]
    return subjects


def _reference_image(photo: Photo) -> Image.Image:
    with Image.open(photo.path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def _photos_row(photos: list[Image.Image], size: tuple[int, int]) -> tuple[str, list[list[Image.Image]]]:
    # The first photos, centre-cropped to the cells' size as the field crops them, under a label saying how many.
    shown = [ImageOps.fit(photo, size) for photo in photos[:SHEET_PHOTOS]]
    label = "photos" if len(shown) == len(photos) else f"photos ({len(shown)} of {len(photos)})"
    return label, [[photo] for photo in shown]


def _thumbnail(image: Image.Image) -> Image.Image:
    # Sheets of 25 prompts and five arms at 1024 px would be 25600 px wide; 256 px shows enough of each image.
    image = image.copy()
    image.thumbnail((SHEET_CELL, SHEET_CELL))
    return image


def _save_png(path: Path, image: Image.Image) -> None:
    atomic_write(path, lambda temporary: image.save(temporary, format="PNG"))


def run_evaluation(
    plan: Plan,
    personaliser: Personaliser,
    pipeline: Any,
    scorers: Scorers,
    folder: Path,
    on_arm: Callable[[], None] | None = None,
) -> Evaluation:
    """Every subject's images under `folder`/images and contact sheets under `folder`/sheets, and their scores."""
    evaluation = Evaluation()
    texts = [prompt.text(plan.token, plan.class_noun) for prompt in plan.prompts]
    scored_texts = [prompt.scored_text(plan.class_noun) for prompt in plan.prompts]
    for s, (name, photo_set) in enumerate(plan.subjects.items()):
        photos = [_reference_image(photo) for photo in photo_set.photos]
        reference = scorers.reference(photos)
        sheet_rows = []
        for arm in plan.arms:
            weights, seconds = personaliser.weights(arm, photo_set, s)
            started = time.perf_counter()
            rows = sample_with_lora(pipeline, personaliser.task.lora, weights, texts, plan.sampling)
            if pipeline.device.type == "cuda":
                torch.cuda.synchronize(pipeline.device)
            evaluation.seconds.setdefault(arm.label, []).append(seconds)
            evaluation.sampling_seconds.setdefault(arm.label, []).append(time.perf_counter() - started)
            for p, images in enumerate(rows):
                scores = scorers.score(images, reference, [scored_texts[p]] * len(images))
                for i, (image, image_scores) in enumerate(zip(images, scores)):
                    path = Path("images") / name / arm.label.replace(" t=", "-t") / f"prompt{p:02d}_image{i:02d}.png"
                    _save_png(folder / path, image)
                    evaluation.images.append(
                        ScoredImage(
                            path=path.as_posix(),
                            arm=arm.kind,
                            label=arm.label,
                            subject=name,
                            prompt=texts[p],
                            scored_prompt=scored_texts[p],
                            seed=plan.sampling.seed + i,
                            t=arm.t,
                            scores=image_scores,
                        )
                    )
            sheet_rows.append([[_thumbnail(images[0])] for images in rows])  # the first image of each prompt
            if on_arm is not None:
                on_arm()
        photos_label, photos_row = _photos_row(photos, sheet_rows[0][0][0].size)
        sheet = labelled_sheet(
            [*sheet_rows, photos_row],
            [*(arm.label for arm in plan.arms), photos_label],
            [f"p{p:02d}" for p in range(len(texts))],
        )
        _save_png(folder / "sheets" / f"{name}.png", sheet)
    return evaluation
