"""scripts/bench_quality.py end to end on a few crops: the report, the JSON the issue names, the plot, the budget rule."""

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
        pixels = np.stack([np.outer(ramp, np.ones(16)) * rng.random(), np.outer(np.ones(16), ramp) * rng.random(),
                           np.full((16, 16), rng.random())], axis=-1)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"crop{i}.png")
    return folder


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quality.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_inr_benchmark_writes_the_table_json_and_plot(tmp_path: Path) -> None:
    train, heldout = _crops(tmp_path / "train", 12, 0), _crops(tmp_path / "heldout", 3, 1)
    out = tmp_path / "q.json"
    result = _bench(tmp_path, "--task", "inr", "--budget", "480", "--train", str(train), "--heldout", str(heldout),
                    "--set", "objective.steps=20", "--set", "train.max_steps=8", "--set", "field.depth=1", "--set", "field.width=64",
                    "--json", str(out), "--plot", str(tmp_path / "q.png"), "--work", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "field at T, 1 budget" in result.stdout and "supervised at T, 0.25 budget" in result.stdout
    report = json.loads(out.read_text())
    for key in ("theta0", "real_T", "field_T", "supervised_T", "budget", "seconds"):
        assert isinstance(report[key], (int, float)) and math.isfinite(report[key]), key
    assert report["budget"] == 480 and report["real_T"] > report["theta0"]  # real optimisation improves the fit
    quarter, full = report["runs"]
    # A budget fraction is a shorter run on batches of the same size: 480 / (8 steps x 2 gradients per condition,
    # end_weight > 0 in configs/inr.yaml) = batch 30. The baseline trains as many steps on budget / T images.
    assert (quarter["matching"]["steps"], full["matching"]["steps"]) == (2, 8)
    assert quarter["matching"]["batch"] == full["matching"]["batch"] == 30
    assert (quarter["matching"]["gradients"], full["matching"]["gradients"]) == (120, 480)
    assert (quarter["supervised"]["steps"], quarter["supervised"]["images"]) == (2, 120 // 20)
    assert (full["supervised"]["steps"], full["supervised"]["images"]) == (8, 12)  # 480 / T = 24 wanted, 12 in the folder
    assert (tmp_path / "q.png").stat().st_size > 0


def test_bad_fractions_are_one_line_errors(tmp_path: Path) -> None:
    result = _bench(tmp_path, "--task", "inr", "--budget", "100", "--fractions", "0.5,2", "--json", str(tmp_path / "q.json"))
    assert result.returncode == 2
    assert "--fractions 0.5,2: each fraction of the budget must be in (0, 1]" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "q.json").exists()
