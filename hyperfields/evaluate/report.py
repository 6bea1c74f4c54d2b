"""The results of an evaluation as files: metrics.json (per arm and per image) and metrics.md (the table)."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hyperfields.evaluate.arms import Arm
from hyperfields.evaluate.metrics import SCALE
from hyperfields.evaluate.run import Evaluation
from hyperfields.files import atomic_write

FORMAT = "hyperfields-evaluation"
SCORES = ("dino", "clip_i", "clip_t", "face")
HEADINGS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "face": "face"}
MODELS = {"dino": "DINO", "clip": "CLIP", "face": "face"}


def _mean_std(values: list[float]) -> dict[str, float]:
    # The sample standard deviation over images (0 for a single image).
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(evaluation: Evaluation, arms: list[Arm]) -> dict[str, dict[str, Any]]:
    """Per arm (by label): its kind and step, image count, mean and std of each score, and seconds per subject."""
    summary = {}
    for arm in arms:
        images = [image for image in evaluation.images if image.label == arm.label]
        scores = {
            name: _mean_std([image.scores[name] for image in images]) for name in SCORES if name in images[0].scores
        }
        summary[arm.label] = {
            "arm": arm.kind,
            "t": arm.t,
            "images": len(images),
            **scores,
            "seconds_per_subject": statistics.fmean(evaluation.seconds[arm.label]),
            "sampling_seconds_per_subject": statistics.fmean(evaluation.sampling_seconds[arm.label]),
        }
    return summary


def markdown_table(summary: dict[str, dict[str, Any]], checkpoints: dict[str, str | None]) -> str:
    """metrics.md: one row per arm, mean ± std of every score and the seconds a subject took to personalise."""
    names = [name for name in SCORES if name in next(iter(summary.values()))]
    lines = [
        "| arm | t | " + " | ".join(HEADINGS[name] for name in names) + " | s / subject |",
        "|---|---:|" + "---:|" * len(names) + "---:|",
    ]
    for label, row in summary.items():
        cells = [f"{row[name]['mean']:.3f} ± {row[name]['std']:.3f}" for name in names]
        lines.append(f"| {label} | {row['t']:g} | " + " | ".join(cells) + f" | {row['seconds_per_subject']:.1f} |")
    models = ", ".join(f"{MODELS[kind]} `{name}`" for kind, name in checkpoints.items() if name)
    lines += [
        "",
        f"Scores: {SCALE}; mean ± sample standard deviation over images.",
        f"Checkpoints: {models}. CLIP-T is computed on each prompt with its identifier token replaced by the class.",
        "s / subject: seconds to make a subject's LoRA, sampling not included.",
    ]
    return "\n".join(lines) + "\n"


def write_report(folder: Path, evaluation: Evaluation, arms: list[Arm], details: dict[str, Any]) -> dict[str, Any]:
    """metrics.json and metrics.md in `folder`; the per-arm summary."""
    summary = summarise(evaluation, arms)
    checkpoints = details["checkpoints"]
    images = []
    for image in evaluation.images:
        record = asdict(image)
        record.update(record.pop("scores"))
        images.append(record)
    metrics = {"format": FORMAT, "format_version": 2, "scale": SCALE, **details, "arms": summary, "images": images}
    text = json.dumps(metrics, indent=2) + "\n"
    atomic_write(Path(folder) / "metrics.json", lambda temporary: temporary.write_text(text, encoding="utf-8"))
    table = markdown_table(summary, checkpoints)
    atomic_write(Path(folder) / "metrics.md", lambda temporary: temporary.write_text(table, encoding="utf-8"))
    return summary
