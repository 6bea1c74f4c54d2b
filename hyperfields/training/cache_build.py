"""The on-disk condition cache filled before training, the training images split across processes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hyperfields.config import Config
from hyperfields.files import writable_folder
from hyperfields.training.build import build_run
from hyperfields.training.cache import DiskRows


@dataclass
class CacheBuild:
    folder: Path
    images: int  # training images whose conditions are now on disk
    processes: int
    main_process: bool  # whether this is the process that reports


def build_cache(
    config: Config, data_dir: Path, output: Path, batch_size: int, on_batch: Callable[[int, int], None] | None = None
) -> CacheBuild:
    """Every training image's conditions in the disk cache that `train` with this config and output reads.

    Built by the training run itself, so the entries are exactly those a training step would compute; under torchrun
    each process computes every num_processes-th image. Entries already on disk are kept.
    """
    if config.train.cache != "disk":
        raise ValueError("build_cache needs train.cache=disk")
    run = build_run(config, Path(data_dir), writable_folder(Path(output)))
    acc, cache = run.accelerator, run.cache
    mine = list(range(acc.process_index, len(run.dataset), acc.num_processes))
    for start in range(0, len(mine), batch_size):
        cache.get(mine[start : start + batch_size])
        if on_batch is not None and acc.is_main_process:
            on_batch(min(start + batch_size, len(mine)), len(mine))
    acc.wait_for_everyone()
    acc.end_training()
    assert isinstance(cache.store, DiskRows)
    return CacheBuild(
        folder=cache.store.folder,
        images=len(run.dataset),
        processes=acc.num_processes,
        main_process=acc.is_main_process,
    )
