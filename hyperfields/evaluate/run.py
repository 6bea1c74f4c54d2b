"""One evaluation: for every subject photo and arm, a LoRA, images of every prompt with the same seeds, their
scores, and a contact sheet per subject (rows = arms, columns = prompts, the first image of each)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from hyperfields.evaluate.arms import Arm, Personaliser
from hyperfields.evaluate.metrics import Scorers
from hyperfields.evaluate.prompts import Prompt
from hyperfields.files import atomic_write
from hyperfields.image_files import labelled_sheet
from hyperfields.predict import Photo
from hyperfields.sampling import Sampling, sample_with_lora

SHEET_CELL = 256  # pixels: the largest side of an image on a contact sheet


@dataclass
class Plan:
    """What to evaluate: subjects (one photo each), prompts, arms and how images are sampled."""

    photos: list[Photo]
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
    photo: str
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


def subject_name(index: int, photo: Photo) -> str:
    """The subject's folder and sheet name: numbered, so two photos with one file name never collide."""
    return f"{index:03d}-{photo.path.stem}"


def _reference_image(photo: Photo) -> Image.Image:
    with Image.open(photo.path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


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
    for s, photo in enumerate(plan.photos):
        name = subject_name(s, photo)
        reference = scorers.reference(_reference_image(photo))
        sheet_rows = []
        for arm in plan.arms:
            weights, seconds = personaliser.weights(arm, photo, s)
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
                            photo=str(photo.path),
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
        sheet = labelled_sheet(sheet_rows, [arm.label for arm in plan.arms], [f"p{p:02d}" for p in range(len(texts))])
        _save_png(folder / "sheets" / f"{name}.png", sheet)
    return evaluation
