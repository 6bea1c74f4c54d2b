"""One option vocabulary across the commands, the former names kept for one release, --version and `config`."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

import hyperfields
from hyperfields.cli.main import app
from hyperfields.config import load_config
from hyperfields.config_values import presets
from tests.conftest import clean_exit
from tests.tiny_field import TinyField, tiny_field

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
# The commands that write somewhere, and those that read a folder of photos.
WRITERS = ["train", "precompute", "cache build", "generate", "export", "refine", "tiny", "evaluate"]
PHOTO_FOLDER_READERS = ["train", "precompute", "cache build", "export", "evaluate"]
FORMER_NAMES = {"--out", "--data", "-d", "--steps"}


def commands() -> dict[str, click.Command]:
    """Every command by its full name ('cache build'), walked from the root group."""
    found: dict[str, click.Command] = {}

    def walk(command: click.Command, name: str) -> None:
        if hasattr(command, "commands"):
            for sub_name, sub in command.commands.items():
                walk(sub, f"{name} {sub_name}".strip())
        else:
            found[name] = command

    walk(typer.main.get_command(app), "")
    return found


def visible_options(command: click.Command) -> dict[str, list[str]]:
    """The option strings of each option --help shows, by its first (long) name."""
    return {
        p.opts[0]: sorted(p.opts + p.secondary_opts)
        for p in command.params
        if p.param_type_name == "option" and not p.hidden
    }


def test_every_command_is_walked() -> None:
    assert set(WRITERS) | {"inspect", "config", "push"} == set(commands())


def test_one_name_for_one_thing_across_commands() -> None:
    options = {name: visible_options(command) for name, command in commands().items()}
    for name in WRITERS:
        assert options[name].get("--output") == ["--output", "-o"], name
    for name in PHOTO_FOLDER_READERS:
        assert "--images" in options[name], name
    # An option string means one option everywhere: the same long name carries the same short name.
    spellings: dict[str, set[tuple[str, ...]]] = {}
    for by_long in options.values():
        for long, opts in by_long.items():
            spellings.setdefault(long, set()).add(tuple(opts))
            assert not FORMER_NAMES & set(opts), (long, opts)
    assert {long: s for long, s in spellings.items() if len(s) > 1} == {}


@pytest.mark.parametrize("name", sorted(set(WRITERS) | {"inspect", "config", "push"}))
def test_help_shows_only_the_current_names(name: str) -> None:
    result = runner.invoke(app, [*name.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    shown = set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", result.output))
    assert not FORMER_NAMES & shown, FORMER_NAMES & shown
    assert name not in WRITERS or "--output" in shown


def notes(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("note:")]


@pytest.mark.parametrize("name", ["train", "precompute", "cache build"])
def test_data_still_names_the_photo_folder_with_one_note(name: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    result = runner.invoke(app, [*name.split(), "--data", str(missing), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and clean_exit(result), result.output
    assert notes(result) == ["note: --data is deprecated; use --images"]
    assert f"--images '{missing}' is not a folder of images" in result.stderr


def test_a_new_and_a_former_name_together_are_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--images", str(tmp_path), "--data", str(tmp_path), "-o", str(tmp_path)])
    assert result.exit_code == 2 and clean_exit(result)
    assert "error: give --images, not both --images and its former name --data" in result.stderr


def test_a_missing_output_is_a_one_line_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tiny"])
    assert result.exit_code == 2 and clean_exit(result)
    assert result.stderr.strip() == "error: missing option --output"


def test_tiny_takes_output_and_still_its_positional_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tiny", "--output", str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    assert notes(result) == [] and (tmp_path / "new" / "pipeline" / "model_index.json").is_file()
    for folder in ("pipeline-xl", "pipeline-flux", "pipeline-sd3"):
        assert (tmp_path / "new" / folder / "model_index.json").is_file(), folder
    result = runner.invoke(app, ["tiny", str(tmp_path / "old")])
    assert result.exit_code == 0, result.output
    assert notes(result) == ["note: DIR is deprecated; use --output"]
    assert (tmp_path / "old" / "encoder").is_dir()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TinyField:
    return tiny_field(tmp_path_factory)


def test_out_still_names_the_output_of_generate_and_export(trained: TinyField, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet"
    result = runner.invoke(
        app,
        [
            "generate",
            "-f",
            str(trained.field),
            "-i",
            str(trained.photo),
            "--out",
            str(sheet),
            "-p",
            "a photo of sks",
            "--num-inference-steps",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert notes(result) == ["note: --out is deprecated; use --output"] and (sheet / "contact_sheet.png").is_file()
    lora = tmp_path / "lora.safetensors"
    result = runner.invoke(app, ["export", "-f", str(trained.field), "-i", str(trained.photo), "--out", str(lora)])
    assert result.exit_code == 0, result.output
    assert notes(result) == ["note: --out is deprecated; use --output"] and lora.is_file()


def test_refine_counts_updates_and_keeps_steps_and_out(trained: TinyField, tmp_path: Path) -> None:
    base = ["refine", "-f", str(trained.field), "-i", str(trained.photo)]
    result = runner.invoke(app, [*base, "--output", str(tmp_path / "a.safetensors"), "--updates", "2"])
    assert result.exit_code == 0, result.output
    assert notes(result) == [] and "refining" in result.output
    result = runner.invoke(app, [*base, "--output", str(tmp_path / "b.safetensors"), "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert notes(result) == ["note: --steps is deprecated; use --updates"]
    # The former name is resolved before anything is loaded: its value is the one checked.
    result = runner.invoke(app, [*base, "--out", str(tmp_path)])
    assert result.exit_code == 2 and clean_exit(result)
    assert notes(result) == ["note: --out is deprecated; use --output"]
    assert f"--output '{tmp_path}' is a folder" in result.stderr


def test_version_prints_the_package_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"hyperfields {hyperfields.__version__}\n"


@pytest.mark.parametrize("preset", sorted(presets()))
def test_config_prints_yaml_that_loads_back_to_the_same_config(preset: str, tmp_path: Path) -> None:
    # A regex target (backslash) and a token that YAML would read as a boolean: both must come back as text.
    overrides = ["train.max_steps=7", r"lora.targets=['re:.*\.to_q', to_v]", "data.token='yes'"]
    args = ["config", "--config", preset]
    for override in overrides:
        args += ["--set", override]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = tmp_path / "printed.yaml"
    printed.write_text(result.stdout, encoding="utf-8")
    expected = load_config(preset, overrides)
    assert load_config(printed) == expected
    assert expected != load_config(preset)  # the overrides are in what was printed


def test_config_reports_a_bad_key_as_a_user_error() -> None:
    result = runner.invoke(app, ["config", "--set", "train.no_such_key=1"])
    assert result.exit_code == 2 and clean_exit(result)
    assert result.stderr.startswith("error: ") and "no_such_key" in result.stderr


def documented_invocations() -> list[tuple[str, str, list[str]]]:
    """(doc, command, option strings) of every `hyperfields COMMAND ...` line in the README's and docs' code blocks."""
    found = []
    known = commands()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", doc.read_text(encoding="utf-8"), re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                words = line.split("#")[0].split()
                if "hyperfields" not in words:
                    continue
                rest = words[words.index("hyperfields") + 1 :]
                name = next(
                    (n for n in sorted(known, key=len, reverse=True) if rest[: len(n.split())] == n.split()), ""
                )
                found.append((doc.name, name, [w.split("=")[0] for w in rest if w.startswith("-")]))
    return found


def test_docs_use_the_current_option_names() -> None:
    invocations = documented_invocations()
    assert {"train", "generate", "export", "refine", "config"} <= {name for _, name, _ in invocations}
    root_options = {"--version", "--help"}
    for doc, name, used in invocations:
        valid = {o for opts in visible_options(commands()[name]).values() for o in opts} if name else root_options
        assert set(used) <= valid, (doc, name, set(used) - valid)
