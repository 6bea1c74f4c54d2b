"""Two real CPU processes (torchrun + gloo): identical fields on both ranks, one checkpoint, loadable, resumable; the
held-out reference split between them, and shard sampling keeping each to its own images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hyperfields.field.io import load_field

ROOT = Path(__file__).resolve().parents[1]


def torchrun(photos: Path, output: Path, overrides: list[str], resume: Path | None = None) -> str:
    """Train on two CPU processes with distributed_worker.py, from checkpoint `resume` if given; their output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["RESUME"] = str(resume or "")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(29500 + os.getpid() % 1000),
        str(ROOT / "tests" / "distributed_worker.py"),
        str(photos),
        str(output),
        *overrides,
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 0 of 2 done" in result.stdout and "rank 1 of 2 done" in result.stdout
    return result.stdout + result.stderr


def write_photos(folder: Path, count: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


SMALL = [
    "train.max_steps=3",
    "train.checkpoint_every=2",
    "train.batch_size=2",
    "objective.steps=6",
    "train.eval_draws=2",
    "field.width=32",
    "field.depth=1",
    "train.warmup_steps=1",
]


@pytest.mark.slow
def test_two_processes_train_the_same_field_and_resume_it(tmp_path):
    photos = write_photos(tmp_path / "photos", 8)
    output = tmp_path / "run"
    overrides = [*SMALL, "train.heldout=2"]
    printed = torchrun(photos, output, overrides)
    # Each process optimised one of the two held-out photos; the first merged them into the run folder's store.
    assert "real optimisation of 2 images for T=6 steps on 2 process(es)" in printed
    reference = load_file(str(output / "heldout_reference.safetensors"))
    assert reference["loss_real"].shape == (2,) and not list(output.glob("*.part-*"))
    rank0 = load_file(str(output / "params-rank0.safetensors"))
    rank1 = load_file(str(output / "params-rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # The zero-initialised adaLN weights moved, so the equality above is about synchronised training.
    assert rank0["blocks.0.adaLN_modulation.1.weight"].abs().sum() > 0
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-3"]
    assert len(list((output / "checkpoints" / "checkpoint-2").glob("model*.safetensors"))) == 1
    random_states = {p.name for p in (output / "checkpoints" / "checkpoint-2").glob("random_states_*")}
    assert random_states == {"random_states_0.safetensors", "random_states_1.safetensors"}, "one file per process"
    field, record = load_field(output / "field")
    assert record.trained_steps == 3 and record.heldout_recovered is not None
    for name, value in rank0.items():
        assert torch.equal(dict(field.named_parameters())[name].detach(), value), name

    # Both processes resume from checkpoint-2 (the field, the optimiser on each, each its random states) and end
    # where the uninterrupted run did.
    resumed = tmp_path / "resumed"
    shutil.copytree(output / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    torchrun(photos, resumed, overrides, resume=resumed / "checkpoints" / "checkpoint-2")
    for rank in (0, 1):
        after = load_file(str(resumed / f"params-rank{rank}.safetensors"))
        for name, value in rank0.items():
            assert torch.allclose(after[name], value, atol=1e-6), (rank, name)


@pytest.mark.slow
def test_shard_sampling_keeps_each_process_to_its_own_images(tmp_path):
    output = tmp_path / "run"
    overrides = [*SMALL, "train.heldout=0", "train.sampling=shard", "train.cache=memory", "train.max_steps=6"]
    torchrun(write_photos(tmp_path / "photos", 8), output, overrides)
    for rank in (0, 1):
        cached = json.loads((output / f"cached-rank{rank}.json").read_text())
        assert cached and all(i % 2 == rank for i in cached), (rank, cached)
    rank0, rank1 = (load_file(str(output / f"params-rank{rank}.safetensors")) for rank in (0, 1))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0), "one field, trained on both shards"
