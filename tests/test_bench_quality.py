"""scripts/bench_quality.py end to end on a few crops: the report, the JSON keys, the plot, the budget rule."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _crops(folder: Path, count: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        # Smooth colour ramps, so a coordinate MLP has something to fit.
        ramp = np.linspace(0, 1, 16)
        pixels = np.stack(
            [
                np.outer(ramp, np.ones(16)) * rng.random(),
                np.outer(np.ones(16), ramp) * rng.random(),
                np.full((16, 16), rng.random()),
            ],
            axis=-1,
        )
        Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"crop{i}.png")
    return folder


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_quality.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.slow
def test_inr_benchmark_writes_the_table_json_and_plot(tmp_path: Path) -> None:
    train, heldout = _crops(tmp_path / "train", 12, 0), _crops(tmp_path / "heldout", 3, 1)
    out = tmp_path / "q.json"
    result = _bench(
        tmp_path,
        "--task",
        "inr",
        "--budget",
        "480",
        "--train",
        str(train),
        "--heldout",
        str(heldout),
        "--set",
        "objective.steps=20",
        "--set",
        "objective.end_weight=10",
        "--set",
        "train.max_steps=8",
        "--set",
        "field.depth=1",
        "--set",
        "field.width=64",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "q.png"),
        "--work",
        str(tmp_path / "work"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "field, budget x1" in result.stdout and "supervised, budget x0.25" in result.stdout
    report = json.loads(out.read_text())
    for key in ("theta0", "real_T", "field_T", "supervised_T", "direct_T", "budget", "seconds"):
        assert isinstance(report[key], (int, float)) and math.isfinite(report[key]), key
    assert report["budget"] == 480 and report["real_T"] > report["theta0"]  # real optimisation improves the fit
    # Quality along t for every arm at T/4, T/2, 3T/4 and T, each with its standard error over the held-out photos.
    for key in ("trajectory", "stderr"):
        assert set(report[key]) == {"real", "field", "supervised", "direct"}
        for arm, values in report[key].items():
            assert list(values) == ["5", "10", "15", "20"], (key, arm)
            assert all(math.isfinite(v) for v in values.values())
    assert report["trajectory"]["field"]["20"] == report["field_T"]  # inr: the mean PSNR at T
    assert all(e > 0 for e in report["stderr"]["real"].values())
    full_field = report["runs"][1]["arms"]["field"]
    gap = {t: full_field["trajectory"][t] - report["trajectory"]["real"][t] for t in full_field["trajectory"]}
    assert all(math.isclose(full_field["gap"][t], gap[t], abs_tol=1e-4) for t in gap)  # photo by photo, same mean
    assert all(e >= 0 for e in full_field["gap_stderr"].values())
    quarter, full = report["runs"]
    # A budget fraction is a shorter run on batches of the same size. Matching with the end term spends 1 + 2 task
    # evaluations per condition and step: 480 / (8 steps x 3) = batch 20; direct spends 1: batch 60. The baseline
    # trains as many steps on budget / T images.
    assert (quarter["arms"]["field"]["steps"], full["arms"]["field"]["steps"]) == (2, 8)
    assert quarter["arms"]["field"]["batch"] == full["arms"]["field"]["batch"] == 20
    assert (quarter["arms"]["field"]["gradients"], full["arms"]["field"]["gradients"]) == (120, 480)
    assert (full["arms"]["direct"]["batch"], full["arms"]["direct"]["gradients"]) == (60, 480)
    assert (quarter["arms"]["supervised"]["steps"], quarter["arms"]["supervised"]["images"]) == (2, 120 // 20)
    # 480 / T = 24 images wanted, 12 in the folder.
    assert (full["arms"]["supervised"]["steps"], full["arms"]["supervised"]["images"]) == (8, 12)
    assert (tmp_path / "q.png").stat().st_size > 0


def test_lora_recovered_fraction_and_its_error():
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_quality import recovered

    theta0, real = torch.tensor([2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0])
    value, error = recovered(theta0, real, field=real.clone())
    assert value == 1.0 and error == 0.0  # as good as real optimisation on every photo
    value, error = recovered(theta0, real, field=torch.tensor([1.2, 2.5, 3.8]))
    assert value == 0.5 and error > 0


def test_bad_fractions_are_one_line_errors(tmp_path: Path) -> None:
    result = _bench(
        tmp_path, "--task", "inr", "--budget", "100", "--fractions", "0.5,2", "--json", str(tmp_path / "q.json")
    )
    assert result.returncode == 2
    assert "--fractions 0.5,2: each fraction of the budget must be in (0, 1]" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "q.json").exists()
