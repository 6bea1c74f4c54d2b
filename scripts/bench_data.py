"""Data pipeline at scale on a synthetic folder of N photos: scan, condition cache, memory and step time.

Measures, on the tiny models (configs/tiny.yaml with a small field):
  scan_first_s / scan_resumed_s  the folder scan into a fresh run folder, then again with its manifest
  build_s / cache_mb             `hyperfields cache build` (train.cache=disk) and the cache's size on disk
  rss_mb / peak_rss_mb           a training process after it has read every training image's conditions once (an
                                 epoch) and trained --steps steps, with train.cache=memory (its rows copied from the
                                 built cache rather than computed again) and with train.cache=disk
  step_ms                        median time of those training steps; the disk process then also alternates
                                 disk-cache and memory-cache steps, the fair comparison on a busy machine
The memory and disk arms run in fresh processes, one at a time, so each reports only its own memory.
Targets at scale: disk-cache RSS within 10% from N=2k to 20k, resumed scan < 10% of the first, disk steps within
10% of memory steps.
Usage: python scripts/bench_data.py --images 2000 [--work /tmp/bench] [--json data.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [
    "train.batch_size=4",
    "objective.steps=6",
    "train.heldout=0",
    "field.width=32",
    "field.depth=1",
    "train.warmup_steps=1",
    "train.checkpoint_every=0",
    "train.eval_every=0",
]


def write_photos(folder: Path, n: int, size: int) -> None:
    """N JPEG photos of `size` px (smooth colour gradients plus noise: they compress like photos), once per folder."""
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for i in range(n):
        colour = rng.random((2, 3), dtype=np.float32)
        pixels = ramp[:, None, None] * colour[0] + ramp[None, :, None] * colour[1]
        pixels = np.clip(pixels * 127 + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def memory_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def config(cache: str, cache_dir: Path, steps: int):
    from hyperfields.config import load_config

    return load_config(
        ROOT / "configs" / "tiny.yaml",
        [*SETTINGS, f"train.cache={cache}", f"train.cache_dir={cache_dir}", f"train.max_steps={steps}"],
    )


def timed_step(run, step: int) -> float:
    from hyperfields.training.step import train_step

    started = time.perf_counter()
    train_step(run, step)
    return time.perf_counter() - started


def train_worker(cache: str, photos: Path, run: Path, cache_dir: Path, steps: int) -> dict[str, float]:
    """One training process: read every image's conditions once, as an epoch does, then time `steps` steps.

    The disk arm then also times disk and memory steps alternately in this one process (the memory rows copied
    from the disk), so load from other programs on the machine falls on both alike.
    """
    from hyperfields.training.build import build_run
    from hyperfields.training.cache import ConditionCache, DiskRows, condition_identity

    training = build_run(config(cache, cache_dir, steps), photos, run)
    if cache == "memory":  # the rows an epoch would compute, read from the built cache instead of computed again
        built = DiskRows(cache_dir, training.dataset.records, condition_identity(training.config))
        for index in range(len(training.dataset)):
            training.cache.store.keep(index, built.load(index))
    for start in range(0, len(training.dataset), 64):
        training.cache.get(list(range(start, min(start + 64, len(training.dataset)))))
    times = [timed_step(training, step) for step in range(steps)]
    rss, peak = memory_mb()
    figures = {"rss_mb": rss, "peak_rss_mb": peak, "step_ms": 1000 * statistics.median(times[1:])}
    if cache == "disk":
        disk = training.cache
        memory = ConditionCache(disk.compute, disk.device)
        for index in range(len(training.dataset)):
            memory.store.keep(index, disk.store.load(index))
        paired: dict[str, list[float]] = {"disk": [], "memory": []}
        for step in range(steps, 2 * steps):
            for kind, kept in (("disk", disk), ("memory", memory)):
                training.cache = kept
                paired[kind].append(timed_step(training, step))
        figures |= {f"paired_{kind}_step_ms": 1000 * statistics.median(values) for kind, values in paired.items()}
    return figures


def run_worker(*arguments: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, __file__, "--worker", *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise SystemExit(f"worker {arguments} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def scan_times(photos: Path, run: Path) -> tuple[float, float]:
    from hyperfields.manifest import MANIFEST_NAME, scan_with_manifest

    times = []
    for _ in range(2):
        started = time.perf_counter()
        scan_with_manifest(photos, run / MANIFEST_NAME, "a photo of {token}", "sks", 64, lambda message: None)
        times.append(time.perf_counter() - started)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="photos in the synthetic folder")
    parser.add_argument("--size", type=int, default=256, help="side of each photo in pixels")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per cache kind")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hyperfields-bench-data"), help="scratch folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        cache, photos, run, cache_dir, steps = args.worker
        print(json.dumps(train_worker(cache, Path(photos), Path(run), Path(cache_dir), int(steps))))
        return

    work = args.work / f"n{args.images}"
    photos = work / "photos"
    write_photos(photos, args.images, args.size)
    for stale in ("scan", "build", "cache"):
        shutil.rmtree(work / stale, ignore_errors=True)
    scan_first, scan_resumed = scan_times(photos, work / "scan")

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "hyperfields",
        "cache",
        "build",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--images",
        str(photos),
        "--output",
        str(work / "build"),
        "--batch-size",
        "64",
        *[a for s in (*SETTINGS, f"train.cache_dir={work / 'cache'}") for a in ("--set", s)],
    ]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    build = time.perf_counter() - started
    cache_mb = sum(p.stat().st_size for p in (work / "cache").rglob("*.safetensors")) / 2**20

    # The build's run folder: the workers reuse its scan manifest instead of decoding the folder again.
    memory = run_worker("memory", str(photos), str(work / "build"), str(work / "cache"), str(args.steps))
    disk = run_worker("disk", str(photos), str(work / "build"), str(work / "cache"), str(args.steps))
    figures = {
        "images": args.images,
        "scan_first_s": scan_first,
        "scan_resumed_s": scan_resumed,
        "resumed_fraction": scan_resumed / scan_first,
        "build_s": build,
        "cache_mb": cache_mb,
        "memory": memory,
        "disk": disk,
        "disk_step_ratio": disk["paired_disk_step_ms"] / disk["paired_memory_step_ms"],
    }
    alternated = (
        f"{disk['paired_memory_step_ms']:.1f} / {disk['paired_disk_step_ms']:.1f} ms "
        f"({figures['disk_step_ratio']:.2f}x)"
    )
    rows = [
        ("images", f"{args.images}"),
        ("scan, first run", f"{scan_first:.2f} s"),
        ("scan, resumed run", f"{scan_resumed:.2f} s ({100 * figures['resumed_fraction']:.1f}% of the first)"),
        ("cache build (cache=disk)", f"{build:.1f} s"),
        ("cache size on disk", f"{cache_mb:.1f} MB"),
        ("RSS, memory cache", f"{memory['rss_mb']:.0f} MB (peak {memory['peak_rss_mb']:.0f})"),
        ("RSS, disk cache", f"{disk['rss_mb']:.0f} MB (peak {disk['peak_rss_mb']:.0f})"),
        ("step, memory cache (own process)", f"{memory['step_ms']:.1f} ms"),
        ("step, disk cache (own process)", f"{disk['step_ms']:.1f} ms"),
        ("step, memory / disk alternated", alternated),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
