"""Nothing lost, nothing crashes: killed runs resume exactly, hostile folders, non-finite values, bad files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.errors import UserError
from hyperfields.field.io import load_field
from hyperfields.tasks.lora_diffusion import LoraDiffusionTask

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAST = ["--set", "train.batch_size=2", "--set", "objective.steps=6", "--set", "train.heldout=1",
        "--set", "train.eval_draws=2", "--set", "field.width=32", "--set", "field.depth=1", "--set", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def train_args(photos: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data", str(photos), "--output", str(output), *FAST, *extra]


def field_tensors(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "field" / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_field(photos, tmp_path):
    steps = ["--max-steps", "8", "--checkpoint-every", "2"]
    assert runner.invoke(app, train_args(photos, tmp_path / "clean", *steps)).exit_code == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # same thread count as this process: same float sums
    process = subprocess.Popen([sys.executable, "-m", "hyperfields", *train_args(photos, killed, *steps)],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists():
        assert process.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "field").exists()

    # A checkpoint write cut off by the kill leaves a staging folder: it must never be resumed from.
    (killed / "checkpoints" / ".tmp-checkpoint-99").mkdir()
    (killed / "checkpoints" / ".tmp-checkpoint-99" / "model.safetensors").write_bytes(b"\0" * 10)
    result = runner.invoke(app, train_args(photos, killed, *steps, "--resume", "latest"))
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and ".tmp-checkpoint-99" not in result.output
    clean, resumed = field_tensors(tmp_path / "clean"), field_tensors(killed)
    assert max((clean[k] - resumed[k]).abs().max().item() for k in clean) <= 1e-6


def make_hostile_corpus(folder: Path) -> dict[str, str]:
    """Write every kind of file a user's folder may hold; returns the bad ones' names and a reason word."""
    rng = np.random.default_rng(1)
    rgb = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
    folder.mkdir()
    Image.fromarray(rgb).save(folder / "good one.png")
    Image.fromarray(rgb).save(folder / "Zürich café.jpg")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.random((30, 30)) * 65535).astype(np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png", transparency=0)
    Image.fromarray(np.dstack([rgb, np.full((40, 40), 128, np.uint8)])).save(folder / "rgba.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "tiny.bmp")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(rgb).save(folder / "webp.webp")
    (folder / "good one.txt").write_text("")  # empty caption: the template is used
    (folder / "palette.txt").write_bytes(b"caf\xe9 \xff\xfe")  # not UTF-8
    (folder / "nested").mkdir()
    Image.fromarray(rgb).save(folder / "nested" / "deep.png")
    os.symlink(folder, folder / "nested" / "loop")  # a symlink loop must not hang the scan
    bad = {"zero.png": "empty", "random.jpg": "", "text.png": "", "truncated.jpg": ""}
    (folder / "zero.png").write_bytes(b"")
    (folder / "random.jpg").write_bytes(rng.bytes(2000))
    (folder / "text.png").write_text("this is not a picture")
    full = folder / "full.jpg"
    Image.fromarray(rgb).save(full)
    (folder / "truncated.jpg").write_bytes(full.read_bytes()[:300])
    full.unlink()
    # A 30000 x 30000 decompression bomb: a valid header, a few bytes of data.
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    bad["bomb.png"] = "too large"
    return bad


def test_hostile_folder_trains_and_names_every_skipped_file(tmp_path):
    folder = tmp_path / "hostile"
    bad = make_hostile_corpus(folder)
    result = runner.invoke(app, train_args(folder, tmp_path / "run", "--max-steps", "2"))
    assert result.exit_code == 0, result.output
    for name, word in bad.items():
        lines = [line for line in result.output.splitlines() if name in line and "skipping" in line]
        assert len(lines) == 1, f"{name}: {lines}"
        assert word in lines[0]
    assert f"10 usable images" in result.output and f"{len(bad)} skipped" in result.output
    assert "not valid UTF-8" in result.output
    assert (tmp_path / "run" / "field" / "model.safetensors").is_file()


def test_nonfinite_loss_stops_with_the_step_and_last_checkpoint_or_is_skipped(photos, tmp_path, monkeypatch):
    original = LoraDiffusionTask.loss
    calls = {"n": 0}

    def poisoned(self, weights, inputs, draws, generator):
        calls["n"] += 1
        loss = original(self, weights, inputs, draws, generator)
        return loss * float("nan") if calls["n"] == 3 else loss  # the third task gradient: step 3

    monkeypatch.setattr(LoraDiffusionTask, "loss", poisoned)
    result = runner.invoke(app, train_args(photos, tmp_path / "stop", "--max-steps", "4", "--checkpoint-every", "2"))
    assert result.exit_code == 1
    assert "stopped at step 3" in result.output and "checkpoint-2" in result.output and "Traceback" not in result.output

    calls["n"] = 0
    result = runner.invoke(app, train_args(photos, tmp_path / "skip", "--max-steps", "4", "--skip-nonfinite", "1"))
    assert result.exit_code == 0, result.output
    assert "skipped 1 step" in result.output
    assert (tmp_path / "skip" / "field" / "model.safetensors").is_file()


def test_truncated_or_tampered_field_weights_are_a_clear_error(photos, tmp_path):
    assert runner.invoke(app, train_args(photos, tmp_path / "run", "--max-steps", "1")).exit_code == 0
    weights = tmp_path / "run" / "field" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or not safetensors"):
        load_field(tmp_path / "run" / "field")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2, 3]}")
    with pytest.raises(UserError, match="model.safetensors"):
        load_field(tmp_path / "run" / "field")


def test_truncated_checkpoint_is_a_clear_error_on_resume(photos, tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, train_args(photos, run, "--max-steps", "2", "--checkpoint-every", "1")).exit_code == 0
    model = run / "checkpoints" / "checkpoint-2" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    result = runner.invoke(app, train_args(photos, run, "--max-steps", "3", "--resume", str(run / "checkpoints" / "checkpoint-2")))
    assert result.exit_code == 2 and "checkpoint-2" in result.output and "Traceback" not in result.output


def test_unwritable_output_is_exit_code_2(photos, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = runner.invoke(app, train_args(photos, blocker / "run", "--max-steps", "1"))
    assert result.exit_code == 2 and "cannot be written" in result.output


def test_disk_full_while_writing_the_field_leaves_nothing_under_its_name(photos, tmp_path, monkeypatch):
    import hyperfields.field.io as field_io

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(field_io, "save_file", disk_full)
    result = runner.invoke(app, train_args(photos, tmp_path / "run", "--max-steps", "1"))
    assert result.exit_code == 2 and "No space left" in result.output
    assert not (tmp_path / "run" / "field").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".field")]


def test_no_pickle_in_checkpoints_and_fields(photos, tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, train_args(photos, run, "--max-steps", "2", "--checkpoint-every", "1", "--set", "train.ema_decay=0.9")).exit_code == 0
    files = [p for p in run.rglob("*") if p.is_file() and "logs" not in p.parts]
    suffixes = {p.suffix for p in files}
    # accelerate's optimizer/scheduler/RNG .bin/.pkl files are tensors loaded with weights_only=True;
    # everything of ours is safetensors or JSON.
    assert not [p for p in files if p.suffix == ".pkl" and "random_states" not in p.name], suffixes
    assert (run / "checkpoints" / "checkpoint-2" / "ema.safetensors").is_file()
