"""Write a folder of demo photos: crops of the photographs that scikit-image ships (nothing is downloaded)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="folder to write the crops into")
    parser.add_argument("--per-photo", type=int, default=4, help="crops taken from each photo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    count = 0
    for name in PHOTOS:
        photo = getattr(data, name)()
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        height, width = photo.shape[:2]
        for index in range(args.per_photo):
            side = int(rng.integers(min(height, width) // 3, min(height, width) // 1.5))
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            crop = Image.fromarray(photo[top : top + side, left : left + side, :3])
            crop.save(args.out / f"{name}_{index}.png")
            (args.out / f"{name}_{index}.txt").write_text(f"a photo of sks {name}\n", encoding="utf-8")
            count += 1
    print(f"wrote {count} demo photos to {args.out}")


if __name__ == "__main__":
    main()
