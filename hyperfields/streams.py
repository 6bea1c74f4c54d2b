"""Independent random streams: one torch.Generator per purpose, derived from (seed, step, process, purpose, index).

Every draw of a run (which images, which steps t, which noise) comes from its own stream, and a stream depends only
on these numbers: a resumed run draws exactly what an uninterrupted one would, without restoring any global RNG
state. The numbers are hashed, not added: two generators seeded with the same integer return the same draws, and
with additive seeds the picks of one micro-batch and the steps t of another landed on the same seed, which tied
every training image to one t.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

# What a stream is for; a new purpose gets a new name, never a number reused from another.
PURPOSES = (
    "picks",
    "steps",
    "noise",
    "lags",
    "reference",
    "evaluation",
    "precompute",
    "refine",
    "optimise",
    "dreambooth",
    "photos",
)


def stream_seed(seed: int, purpose: str, step: int = 0, process: int = 0, index: int = 0) -> int:
    """A 63-bit seed, unrelated for any two distinct (seed, purpose, step, process, index)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random stream purpose {purpose!r}; expected one of {', '.join(PURPOSES)}")
    key = f"{seed}/{purpose}/{step}/{process}/{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def stream(
    seed: int, purpose: str, step: int = 0, process: int = 0, index: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator on `device` seeded by `stream_seed` of these numbers."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, purpose, step, process, index))


def training_draws(
    seed: int,
    step: int,
    process: int,
    micro: int,
    images: int,
    batch: int,
    last_t: int,
    shards: int = 1,
) -> tuple[list[int], torch.Tensor]:
    """Which of `images` training images a micro-batch trains on, and each one's step t in [0, last_t]: two
    independent streams, so every image meets every t.

    With `shards` > 1 the images are dealt into that many shards and `process` draws only from its own, the
    images i with i % shards == process; with 1 (the default) every process draws from all of them.
    """
    if shards > 1 and not 0 <= process < shards:
        raise ValueError(f"process {process} has no shard among {shards}")
    members = range(process if shards > 1 else 0, images, shards)
    if not members:
        raise ValueError(f"shard {process} of {shards} holds none of the {images} training images")
    drawn = torch.randint(0, len(members), (batch,), generator=stream(seed, "picks", step, process, micro))
    picks = [members[i] for i in drawn.tolist()]
    t = torch.randint(0, last_t + 1, (batch,), generator=stream(seed, "steps", step, process, micro))
    return picks, t


def photo_draws(
    seed: int, step: int, process: int, micro: int, sizes: Sequence[int], task_photos: int, field_photos: int
) -> tuple[list[list[int]], list[list[int]]]:
    """For subjects of `sizes` photos (one per sample of a micro-batch): the `task_photos` of each that the task's
    loss is taken over, and the 1..min(size, field_photos) of them the field sees, as positions within each subject.

    The task's photos go through a subject in a random order, so each comes once before any comes twice.
    """
    generator = stream(seed, "photos", step, process, micro)
    task_rows, field_rows = [], []
    for size in sizes:
        order = torch.randperm(size, generator=generator).tolist()
        task_rows.append([order[k % size] for k in range(task_photos)])
        shown = int(torch.randint(1, min(size, field_photos) + 1, (1,), generator=generator))
        field_rows.append(torch.randperm(size, generator=generator)[:shown].tolist())
    return task_rows, field_rows
