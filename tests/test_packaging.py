"""What a user installs: the wheel holds every module, the presets and prompt lists; `--config NAME` finds a preset."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hyperfields.cli.train as train_cli
from hyperfields.cli.main import app
from hyperfields.config import Config, load_config
from hyperfields.config_values import presets
from hyperfields.errors import UserError
from hyperfields.evaluate.prompts import SHIPPED
from tests.conftest import clean_exit

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["flux-dev", "inr", "sd15", "sd35-medium", "sdxl", "tiny"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources, so that no build folder is left in the checkout."""
    source = tmp_path_factory.mktemp("source")
    for name in ("hyperfields", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            str(source),
            "-w",
            str(out),
        ],
        check=True,
        cwd=source,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("hyperfields-*.whl")
    return built


def test_wheel_holds_every_module_the_presets_and_the_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "hyperfields").rglob("*.py")}
    assert not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"
    assert {f"hyperfields/configs/{name}.yaml" for name in PRESETS} <= names
    assert {f"hyperfields/evaluate/prompts/{name}.txt" for name in SHIPPED} <= names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)


def test_installed_wheel_resolves_a_preset_by_name_from_the_package(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel installs by unpacking
    script = (
        "from hyperfields.config import load_config; from hyperfields.config_values import resolve_config; "
        "print(resolve_config('sd15')); "
        "print(load_config('sd15').model.resolution)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    path, resolution = result.stdout.split()
    assert Path(path) == site / "hyperfields" / "configs" / "sd15.yaml" and resolution == "512"


def test_presets_are_the_configs_folder():
    assert list(presets()) == PRESETS
    for name in PRESETS:
        assert load_config(name) == load_config(ROOT / "configs" / f"{name}.yaml"), name
    assert load_config("tiny") != Config()


@pytest.fixture
def config_given_to_train(monkeypatch) -> list[Config]:
    """The Config `hyperfields train` loads, captured before anything is trained."""
    loaded: list[Config] = []

    def load_then_stop(config, overrides, note=None):
        loaded.append(load_config(config, overrides, note))
        raise UserError("stop before training")

    monkeypatch.setattr(train_cli, "load_config", load_then_stop)
    return loaded


def test_config_option_takes_a_preset_name_or_a_path(config_given_to_train, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for config in ("tiny", "configs/tiny.yaml"):
        result = CliRunner().invoke(
            app, ["train", "--config", config, "--data", str(tmp_path), "--output", str(tmp_path)]
        )
        assert result.exit_code == 2 and "stop before training" in result.output, result.output
    by_name, by_path = config_given_to_train
    assert by_name == by_path


def test_unknown_preset_name_is_one_line_listing_the_presets(tmp_path):
    result = CliRunner().invoke(
        app, ["train", "--config", "sd16", "--images", str(tmp_path), "--output", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and clean_exit(result)
    assert result.output.strip().splitlines() == [
        "error: config 'sd16' is neither a file nor a preset; presets are flux-dev, inr, sd15, sd35-medium, sdxl, tiny"
    ]
    result = CliRunner().invoke(
        app, ["train", "--config", "nope.yaml", "--images", str(tmp_path), "--output", str(tmp_path)]
    )
    assert result.exit_code == 2 and "config file 'nope.yaml' does not exist" in result.output


def test_a_file_named_like_a_preset_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("tiny").write_text("train:\n  max_steps: 7\n")
    assert load_config("tiny").train.max_steps == 7
