"""PNGs that say how they were made, as A1111 writes them, and the contact sheets and generation.json beside them.

Every PNG carries hyperfields' own record as JSON in a `hyperfields` text chunk; a sampled image also carries
A1111's `parameters` text (prompt, `Negative prompt:` line, then `Key: value` pairs), which A1111's PNG Info tab,
ComfyUI's import, Civitai and image browsers read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from hyperfields.files import atomic_write

PARAMETERS_KEY = "parameters"  # A1111's text chunk
RECORD_KEY = "hyperfields"  # hyperfields' own, JSON
GAP = 2  # pixels between the images of a labelled sheet
PAD = 4  # pixels around a label


def a1111_quote(value: Any) -> str:
    """A value as A1111 writes it in `Key: value` pairs: as is, or as a JSON string when it holds , : or a newline."""
    text = str(value)
    if not any(mark in text for mark in (",", ":", "\n")):
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_parameters(prompt: str, negative_prompt: str, settings: dict[str, Any]) -> str:
    """A1111's infotext: the prompt, a `Negative prompt:` line when there is one, then `Key: value, ...`."""
    pairs = ", ".join(f"{key}: {a1111_quote(value)}" for key, value in settings.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{pairs}".strip()


def write_png(image: Image.Image, path: Path, record: dict[str, Any], parameters: str | None = None) -> Path:
    """`path`, the PNG of `image` with `record` as JSON and A1111's `parameters` text when given; written atomically."""
    info = PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, parameters)  # Pillow writes an iTXt chunk when the text is not Latin-1
    info.add_text(RECORD_KEY, json.dumps(record, sort_keys=True))
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def contact_sheet(rows: list[list[Image.Image]], gap: int = 2) -> Image.Image:
    """One image holding all `rows` (one per prompt) side by side, on a white background."""
    width, height = rows[0][0].size
    columns = max(len(row) for row in rows)
    sheet = Image.new(
        "RGB", (columns * width + (columns - 1) * gap, len(rows) * height + (len(rows) - 1) * gap), "white"
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image, (c * (width + gap), r * (height + gap)))
    return sheet


def labelled_sheet(
    rows: list[list[list[Image.Image]]], row_labels: list[str], group_labels: list[str], gap: int = GAP
) -> Image.Image:
    """One image of `rows` (each a list of groups, each group a list of images of one size) with `row_labels` at the
    left and `group_labels` above the first image of each group."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width, height = rows[0][0][0].size
    text_height = max(draw.textbbox((0, 0), label, font=font)[3] for label in [*row_labels, *group_labels, "Ag"])
    left = max(int(draw.textlength(label, font=font)) for label in row_labels) + 2 * PAD
    top = text_height + 2 * PAD
    columns = max(sum(len(group) for group in row) for row in rows)
    sheet = Image.new("RGB", (left + columns * (width + gap), top + len(rows) * (height + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    x = left
    for label, group in zip(group_labels, rows[0]):
        draw.text((x, PAD), label, fill="black", font=font)
        x += len(group) * (width + gap)
    for r, (label, row) in enumerate(zip(row_labels, rows)):
        y = top + r * (height + gap)
        draw.text((PAD, y + (height - text_height) // 2), label, fill="black", font=font)
        images = [image for group in row for image in group]
        for c, image in enumerate(images):
            sheet.paste(image.convert("RGB"), (left + c * (width + gap), y))
    return sheet


def write_details(folder: Path, details: dict[str, Any]) -> Path:
    """generation.json in `folder`: how its images were made."""
    text = json.dumps(details, indent=2) + "\n"
    return atomic_write(Path(folder) / "generation.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
