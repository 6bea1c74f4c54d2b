"""Nothing lost, nothing crashes: killed runs resume exactly, hostile folders, non-finite values, bad files."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load, load_file, save_file
from typer.testing import CliRunner

from hyperfields import objectives
from hyperfields.cli.main import app
from hyperfields.errors import UserError
from hyperfields.field.io import load_field
from hyperfields.field.model import HyperField
from hyperfields.tasks.lora_diffusion import LoraDiffusionTask
from tests.conftest import FAST, clean_exit

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def train_args(photos: Path, output: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--data",
        str(photos),
        "--output",
        str(output),
        *FAST,
        *extra,
    ]


def field_tensors(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "field" / "model.safetensors"))


# Run as `python -c KILLED_WHILE_CHECKPOINTING train ...`: the process SIGKILLs itself once checkpoint-6's files are
# staged but before they are renamed into place, the moment a kill during a checkpoint write can leave behind.
KILLED_WHILE_CHECKPOINTING = """
import os, signal
from hyperfields.training import checkpoints
from hyperfields.cli.main import app

replace_folder = checkpoints.replace_folder

def die_before_the_rename(staging, final):
    if staging.name == ".tmp-checkpoint-6":
        os.kill(os.getpid(), signal.SIGKILL)
    return replace_folder(staging, final)

checkpoints.replace_folder = die_before_the_rename
app()
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume_gives_the_uninterrupted_field(photos, tmp_path):
    steps = ["--max-steps", "8", "--checkpoint-every", "2"]
    assert runner.invoke(app, train_args(photos, tmp_path / "clean", *steps)).exit_code == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # same thread count as this process: same float sums
    process = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_CHECKPOINTING, *train_args(photos, killed, *steps)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=600,
    )
    assert process.returncode == -signal.SIGKILL
    checkpoints = killed / "checkpoints"
    assert (checkpoints / ".tmp-checkpoint-6" / "model.safetensors").is_file(), (
        "killed half-way through writing checkpoint-6"
    )
    assert not (checkpoints / "checkpoint-6").exists() and not (killed / "field").exists()

    result = runner.invoke(app, train_args(photos, killed, *steps, "--resume", "latest"))
    assert result.exit_code == 0, result.output
    assert f"resumed from '{checkpoints / 'checkpoint-4'}' at step 4" in result.output
    assert json.loads((killed / "field" / "config.json").read_text())["trained_steps"] == 8
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
    (folder / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
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
    assert "10 usable images" in result.output and f"{len(bad)} skipped" in result.output
    assert "not valid UTF-8" in result.output
    assert (tmp_path / "run" / "field" / "model.safetensors").is_file()


def poison_step_3(monkeypatch, owner: object, name: str, poison) -> None:
    """Replace `owner.name` so that its third call, made in training step 3, returns poison(its result)."""
    original, calls = getattr(owner, name), [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        result = original(*args, **kwargs)
        return poison(result) if calls[0] == 3 else result

    monkeypatch.setattr(owner, name, poisoned)


NONFINITE = {
    "task loss": (LoraDiffusionTask, "loss", lambda loss: loss * float("nan"), "non-finite task loss"),
    "field output": (
        HyperField,
        "forward",
        lambda weights: {k: w * float("inf") for k, w in weights.items()},
        "non-finite field output",
    ),
    # sqrt'(0) * 0 = inf * 0: the loss stays finite, its gradient is NaN.
    "field gradient": (
        objectives,
        "gradient_matching_loss",
        lambda stats: replace(stats, loss=stats.loss + (stats.loss * 0).sqrt()),
        "non-finite gradient of the field",
    ),
}


@pytest.mark.parametrize("where", list(NONFINITE))
def test_nonfinite_value_stops_with_the_step_and_the_last_checkpoint(photos, tmp_path, monkeypatch, where):
    owner, name, poison, expected = NONFINITE[where]
    poison_step_3(monkeypatch, owner, name, poison)
    result = runner.invoke(app, train_args(photos, tmp_path / "stop", "--max-steps", "4", "--checkpoint-every", "2"))
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "stopped at step 3" in error[0] and expected in error[0], result.output
    assert str(tmp_path / "stop" / "checkpoints" / "checkpoint-2") in error[0]
    assert not (tmp_path / "stop" / "field").exists()


def test_skip_nonfinite_skips_the_step_and_says_so(photos, tmp_path, monkeypatch):
    owner, name, poison, _ = NONFINITE["task loss"]
    poison_step_3(monkeypatch, owner, name, poison)
    result = runner.invoke(app, train_args(photos, tmp_path / "skip", "--max-steps", "4", "--skip-nonfinite", "1"))
    assert result.exit_code == 0, result.output
    assert (
        "step 3: non-finite task loss" in result.output and "skipped 1 step(s) with non-finite values" in result.output
    )
    assert (tmp_path / "skip" / "field" / "model.safetensors").is_file()


def test_truncated_or_tampered_field_weights_are_a_clear_error(photos, tmp_path):
    assert runner.invoke(app, train_args(photos, tmp_path / "run", "--max-steps", "1")).exit_code == 0
    weights = tmp_path / "run" / "field" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or not safetensors"):
        load_field(tmp_path / "run" / "field")
    weights.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": [1, 2, 3]}')
    with pytest.raises(UserError, match="model.safetensors"):
        load_field(tmp_path / "run" / "field")
    tampered = load(data)  # well-formed safetensors, one tensor of another shape
    name = next(iter(tampered))
    tampered[name] = torch.zeros(3, 3)
    save_file(tampered, str(weights))
    with pytest.raises(UserError, match=rf"does not match.*\b{re.escape(name)}\b"):
        load_field(tmp_path / "run" / "field")


def test_edited_field_config_or_missing_field_path_is_a_clear_error(photos, tmp_path):
    assert runner.invoke(app, train_args(photos, tmp_path / "run", "--max-steps", "1")).exit_code == 0
    config = tmp_path / "run" / "field" / "config.json"
    record = json.loads(config.read_text())
    saved_layout = record.pop("layout")
    config.write_text(json.dumps(record))
    with pytest.raises(UserError, match="no valid 'layout'"):
        load_field(tmp_path / "run" / "field")
    record["layout"], record["steps"] = {}, "fifty"
    config.write_text(json.dumps(record))
    with pytest.raises(UserError, match="no valid 'steps' \\(int expected\\)"):
        load_field(tmp_path / "run" / "field")
    record["layout"], record["steps"], record["field"]["from_the_future"] = saved_layout, 10, 1
    config.write_text(json.dumps(record))
    with pytest.raises(UserError, match="does not know.*upgrade hyperfields"):
        load_field(tmp_path / "run" / "field")
    # A path that is not a hub id ('owner/name') is not looked up on the hub.
    result = runner.invoke(
        app,
        [
            "export",
            "--field",
            str(tmp_path / "no" / "field"),
            "--image",
            str(next(photos.iterdir())),
            "--format",
            "kohya",
            "--out",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert result.exit_code == 2 and "no such folder" in result.output and "hub" not in result.output, result.output


class Payload:
    """Unpickling it creates `marker`: proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_truncated_or_pickle_planted_checkpoint_is_a_clear_error_on_resume(photos, tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, train_args(photos, run, "--max-steps", "2", "--checkpoint-every", "1")).exit_code == 0
    model = run / "checkpoints" / "checkpoint-2" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    result = runner.invoke(
        app, train_args(photos, run, "--max-steps", "3", "--resume", str(run / "checkpoints" / "checkpoint-2"))
    )
    assert result.exit_code == 2 and "checkpoint-2" in result.output and clean_exit(result)

    # A checkpoint that keeps its optimiser state as accelerate's pickle is refused, its pickle never loaded.
    marker = tmp_path / "code-ran"
    torch.save({"state": Payload(marker)}, run / "checkpoints" / "checkpoint-1" / "optimizer.bin")
    result = runner.invoke(
        app, train_args(photos, run, "--max-steps", "3", "--resume", str(run / "checkpoints" / "checkpoint-1"))
    )
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "checkpoint-1" in errors[0], result.output
    assert "optimizer.bin" in errors[0] and "train again from the start" in errors[0]
    assert not marker.exists()


def test_a_pickle_planted_under_any_name_of_a_checkpoint_is_never_loaded(photos, tmp_path):
    run, ema = tmp_path / "run", ("--set", "train.ema_decay=0.9")
    trained = runner.invoke(app, train_args(photos, run, "--max-steps", "1", *ema))
    assert trained.exit_code == 0, trained.output
    checkpoint = run / "checkpoints" / "checkpoint-1"
    marker = tmp_path / "code-ran"
    for path in sorted(checkpoint.iterdir()):
        kept = path.read_bytes()
        torch.save({"state": Payload(marker)}, path)
        result = runner.invoke(app, train_args(photos, run, "--max-steps", "2", *ema, "--resume", str(checkpoint)))
        assert result.exit_code == 2 and "checkpoint-1" in result.output and clean_exit(result), (path, result.output)
        assert not marker.exists(), path
        path.write_bytes(kept)


def test_unwritable_output_is_exit_code_2(photos, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = runner.invoke(app, train_args(photos, blocker / "run", "--max-steps", "1"))
    assert result.exit_code == 2 and "cannot be written" in result.output


def test_disk_full_while_writing_the_field_leaves_nothing_under_its_name(photos, tmp_path, monkeypatch):
    import hyperfields.files as files

    real_save = files.save_file

    def disk_full_in_the_field(tensors, path, **kwargs):  # checkpoints are written, the field is not
        if Path(path).parent.name.startswith(".field"):
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, **kwargs)

    monkeypatch.setattr(files, "save_file", disk_full_in_the_field)
    result = runner.invoke(app, train_args(photos, tmp_path / "run", "--max-steps", "1"))
    assert result.exit_code == 2 and "No space left" in result.output
    assert not (tmp_path / "run" / "field").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".field")]


def test_disk_full_while_writing_a_checkpoint_stops_with_one_line_and_no_checkpoint_under_its_name(
    photos, tmp_path, monkeypatch
):
    import hyperfields.files as files

    real_save = files.save_file

    def disk_full_after_the_model(tensors, path, **kwargs):  # model.safetensors is staged, the optimiser fails
        if not Path(path).name.startswith(".model.safetensors."):
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, **kwargs)

    monkeypatch.setattr(files, "save_file", disk_full_after_the_model)
    result = runner.invoke(app, train_args(photos, tmp_path / "run", "--max-steps", "2", "--checkpoint-every", "1"))
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert (
        result.exit_code == 1 and len(errors) == 1 and "No space left" in errors[0] and "checkpoint-1" in errors[0]
    ), result.output
    assert not list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))


@pytest.fixture(scope="module")
def run_with_ema(photos, tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint at every step and an EMA copy: every kind of file a run writes."""
    run = tmp_path_factory.mktemp("pickle") / "run"
    result = runner.invoke(
        app, train_args(photos, run, "--max-steps", "2", "--checkpoint-every", "1", "--set", "train.ema_decay=0.9")
    )
    assert result.exit_code == 0, result.output
    assert (run / "checkpoints" / "checkpoint-2" / "ema.safetensors").is_file()
    return run


def unpickles(path: Path) -> bool:
    """Whether `path` loads as a pickle, plain or through torch.load with arbitrary objects allowed."""
    for load_pickle in (pickle.load, lambda f: torch.load(f, weights_only=False)):
        with path.open("rb") as f:
            try:
                load_pickle(f)
                return True
            except Exception:  # not a pickle: many error types
                pass
    return False


def safetensors_or_json(path: Path) -> bool:
    try:
        if path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        else:
            return False
    except Exception:
        return False
    return True


def pickled_files(folder: Path) -> list[str]:
    """The files under `folder` that are not safetensors or JSON and load as a pickle."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != "README.md"]
    assert files
    return sorted(str(p.relative_to(folder)) for p in files if not safetensors_or_json(p) and unpickles(p))


def test_no_file_of_a_field_unpickles(run_with_ema):
    assert pickled_files(run_with_ema / "field") == []
    assert {p.name for p in (run_with_ema / "field").iterdir()} == {"model.safetensors", "config.json", "README.md"}


def test_no_file_of_a_checkpoint_unpickles(run_with_ema):
    files = [p for p in (run_with_ema / "checkpoints").rglob("*") if p.is_file()]
    assert {p.parent.name for p in files} == {"checkpoint-1", "checkpoint-2"}
    assert [str(p) for p in files if unpickles(p) or not safetensors_or_json(p)] == []
    assert {p.name for p in (run_with_ema / "checkpoints" / "checkpoint-2").iterdir()} == {
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "random_states_0.safetensors",
        "ema.safetensors",
        "trainer_state.json",
    }
