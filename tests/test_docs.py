"""The documentation matches the code: every config key documented with its default, links that resolve,
and the README's Python example runs."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hyperfields.config import Config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = ROOT / "docs" / "config.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ROW = re.compile(r"^\| `(?P<key>[a-z_]+\.[a-z_]+)` \| `(?P<default>[^`]*)` \|", re.MULTILINE)


def config_defaults() -> dict[str, object]:
    """Every key of Config as `section.key`, with its built-in default."""
    return {
        f"{section}.{key}": value for section, values in Config().to_dict().items() for key, value in values.items()
    }


def documented_defaults() -> dict[str, object]:
    rows = ROW.findall(CONFIG_DOC.read_text(encoding="utf-8"))
    keys = [key for key, _ in rows]
    assert len(keys) == len(set(keys)), "a key is documented twice"
    return {key: yaml.safe_load(default) for key, default in rows}


def test_every_config_key_is_documented_with_its_default():
    documented, actual = documented_defaults(), config_defaults()
    missing, unknown = sorted(actual.keys() - documented.keys()), sorted(documented.keys() - actual.keys())
    assert not missing, f"keys missing from docs/config.md: {missing}"
    assert not unknown, f"docs/config.md documents keys hyperfields/config.py does not have: {unknown}"
    wrong = {key: (documented[key], value) for key, value in actual.items() if documented[key] != value}
    assert not wrong, f"docs/config.md defaults differ from hyperfields/config.py (documented, actual): {wrong}"


def test_config_doc_sections_are_the_config_sections():
    headings = re.findall(r"^## (\w+)$", CONFIG_DOC.read_text(encoding="utf-8"), re.MULTILINE)
    assert headings == [f.name for f in dataclasses.fields(Config)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_inside_the_repository(doc):
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name}: link to '{target}' does not resolve"
    # Paths that climb out of the repository, linked or not, point at nothing a reader of it has.
    climb = r"(?<![\w.])\.\./[\w-]+" if doc.parent == ROOT else r"(?<![\w.])\.\./\.\./"
    outside = re.findall(climb, text)
    assert not outside, f"{doc.name} refers to files outside the repository: {outside}"


def python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        image = Image.effect_mandelbrot((48, 40), (-2.0 + 0.1 * i, -1.5, 1.0, 1.5), 50)
        image.convert("RGB").save(photos / f"p{i}.png")
    Image.effect_noise((64, 64), 60).convert("RGB").save(tmp_path / "me.jpg")
    result = subprocess.run(
        [sys.executable, "-c", python_example()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "me.safetensors").is_file()
