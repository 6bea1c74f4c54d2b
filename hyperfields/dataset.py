"""Training tensors from scanned image records: decoding, the dataset the trainer draws from, the held-out split."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

from hyperfields.data import ImageRecord, decoding, one_line
from hyperfields.errors import UserError

T = TypeVar("T")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Return an 8-bit RGB copy of any Pillow mode, with transparency flattened onto white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own convert("L") clips these at 255, so mid-grey 16-bit
        # would come out saturated white; rescale explicitly instead.
        arr = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        elif im.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Return float32 (3, resolution, resolution) in [-1, 1]: upright, short side resized, centre-cropped."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    with decoding():
        im = Image.open(path)
    with im, decoding():
        # Lets JPEG decode at 1/2..1/8 scale when the photo is much bigger than needed.
        im.draft(None, (resolution, resolution))
        im.load()
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:  # malformed EXIF should not cost the user an image
            upright = im.copy()
        rgb = _to_rgb(upright)
    # fit() crops to a square first and then resizes, equivalent to
    # "short side to resolution, centre-crop" but resampling fewer pixels.
    square = ImageOps.fit(rgb, (resolution, resolution), method=Image.Resampling.LANCZOS)
    arr = np.asarray(square, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Items are {"pixel_values": (3, R, R) float tensor in [-1, 1], "caption": str, "path": str}.

    With `keep_decoded`, decoded tensors are kept in memory after first use:
    personalisation folders are tens of images, and decoding dominates a step
    otherwise. Each DataLoader worker process keeps its own cache. Don't modify
    returned tensors in place. Without it (a condition cache reads each image
    once), memory does not grow with the folder.
    """

    def __init__(self, records: Sequence[ImageRecord], resolution: int, keep_decoded: bool = True) -> None:
        self.records = list(records)
        self.resolution = resolution
        self.keep_decoded = keep_decoded
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        record = self.records[index]
        pixels = self._cache.get(index)
        if pixels is None:
            try:
                pixels = load_image(record.path, self.resolution)
            except Exception as exc:
                # It decoded during the scan, so the file changed underneath us.
                raise UserError(
                    f"cannot read image '{record.path}' ({one_line(exc)}); it was readable when the folder was scanned"
                ) from exc
            if self.keep_decoded:
                self._cache[index] = pixels
        return {"pixel_values": pixels, "caption": record.caption, "path": str(record.path)}


def split_heldout(items: Sequence[T], n_heldout: int, seed: int) -> tuple[list[T], list[T]]:
    """Return (train, heldout): min(n_heldout, len(items) // 4) items (subjects, or records) held out by a seeded
    shuffle.

    Capping at a quarter keeps most of a tiny folder for training; both lists
    keep the input order so logs and checkpoints are stable.
    """
    if n_heldout < 0:
        raise ValueError(f"n_heldout must be >= 0, got {n_heldout}")
    items = list(items)
    n = min(n_heldout, len(items) // 4)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    train = [r for i, r in enumerate(items) if i not in held]
    heldout = [r for i, r in enumerate(items) if i in held]
    return train, heldout
