"""Reading configuration values: preset names, YAML text, and values coerced to a config key's type.

Errors are one line naming the file, the override or the key, and what would be right.
"""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import yaml

from hyperfields.errors import UserError, error_line

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PRESETS_PACKAGE = "hyperfields.configs"


def _preset_folder() -> Traversable:
    try:
        return importlib.resources.files(PRESETS_PACKAGE)
    except ModuleNotFoundError:  # a source checkout run without installing: the presets are its configs/ folder
        return Path(__file__).resolve().parents[1] / "configs"


def presets() -> dict[str, Traversable]:
    """The shipped preset YAML files by name ('tiny', 'inr', 'sd15', 'sdxl')."""
    found = {
        entry.name.removesuffix(".yaml"): entry for entry in _preset_folder().iterdir() if entry.name.endswith(".yaml")
    }
    return dict(sorted(found.items()))


def resolve_config(name: str | Path) -> Path | Traversable:
    """The YAML file `name` stands for: a path as given, or the shipped preset of a bare name such as 'sd15'.

    A bare name has no path separator and no suffix; an existing file of that name still wins over a preset.
    """
    text = str(name)
    if Path(text).name != text or Path(text).suffix or Path(text).is_file():
        return Path(name)
    found = presets()
    if text not in found:
        raise UserError(f"config '{text}' is neither a file nor a preset; presets are {', '.join(found)}")
    return found[text]


def parse_yaml(text: str, where: str) -> Any:
    """The value of YAML `text`; when it is not YAML, a one-line UserError naming `where` and the problem's place."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        place = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        # In double quotes YAML reads a backslash as an escape: regexes (\d, \.) belong in single quotes.
        hint = "; write text with backslashes in 'single quotes'" if "escape" in str(error.problem) else ""
        raise UserError(f"{where} is not valid YAML: {error.problem or error.context}{place}{hint}") from None
    except yaml.YAMLError as error:
        raise UserError(f"{where} is not valid YAML ({error_line(error)})") from None
    except (ValueError, RecursionError) as error:  # an integer of thousands of digits; nesting beyond the stack
        raise UserError(f"{where} is not usable YAML ({error_line(error)})") from None


def read_config_file(name: str | Path) -> tuple[dict[str, Any], str]:
    """The sections of config file or preset `name` ({} for an empty file), and the file's name for messages."""
    source = resolve_config(name)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file '{source}' does not exist") from None
    except UnicodeDecodeError as error:
        raise UserError(
            f"config file '{source}' is not valid YAML: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    except OSError as error:  # a folder, no permission
        raise UserError(f"config file '{source}' cannot be read ({error.strerror or error})") from None
    values = parse_yaml(text, f"config file '{source}'")
    if values is None:  # an empty file or only comments: the defaults
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"config file '{source}' must hold a mapping of sections, got {type(values).__name__}")
    return values, str(source)


def _shown(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters: an error line stays readable whatever was typed."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """The value converted to the annotated type, or a UserError naming the key."""
    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        if value is False and "no" in choices:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in choices:
            raise UserError(f"config key '{key}': {_shown(value)} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}': expected a list, got {_shown(value)}")
        (item_type,) = get_args(annotation)
        return [coerce(v, item_type, key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"config key '{key}': expected true or false, got {_shown(value)}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise UserError(f"config key '{key}': expected a number, got {_shown(value)}")
        expected = "an integer" if annotation is int else "a number"
        try:
            number = float(value) if annotation is float else value if isinstance(value, int) else int(str(value), 10)
        except (ValueError, TypeError, OverflowError):  # text, a list or null; an integer beyond any float
            raise UserError(f"config key '{key}': expected {expected}, got {_shown(value)}") from None
        if isinstance(number, float) and (annotation is int or not math.isfinite(number)):
            raise UserError(f"config key '{key}': expected a finite {expected.split()[-1]}, got {_shown(value)}")
        if annotation is int and abs(number) >= 2**63:  # seeds and counts reach torch as 64-bit integers
            raise UserError(f"config key '{key}': {number} does not fit in 64 bits")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise UserError(f"config key '{key}': expected text, got {_shown(value)}")
        return str(value)
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")
