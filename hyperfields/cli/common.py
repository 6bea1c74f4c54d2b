"""What every command shares: option aliases defined once, the former option names kept for one release, and user
errors as one line with exit code 2."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

import hyperfields
from hyperfields.config_values import presets
from hyperfields.errors import TrainingError, UserError, printable
from hyperfields.lora import LoraFormat

F = TypeVar("F", bound=Callable[..., Any])

ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help=(
            f"YAML config file, or the name of a shipped preset ({', '.join(presets())}); "
            "built-in defaults where a key is absent."
        ),
    ),
]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override one config key, e.g. --set train.max_steps=500. Repeatable.")
]
BaseModelOption = Annotated[
    str | None,
    typer.Option(
        "--base-model",
        help=(
            "diffusers pipeline folder or hub id (SD 1.x/2.x, SDXL, FLUX.1, SD 3.x); 'tiny', 'tiny-xl', 'tiny-flux', "
            "'tiny-sd3' = built-in test models."
        ),
    ),
]
EncoderOption = Annotated[
    str | None,
    typer.Option(
        "--encoder", help="transformers vision model folder or hub id (ViT, CLIP, DINOv2); 'tiny' = built-in."
    ),
]
FieldOption = Annotated[
    str, typer.Option("--field", "-f", help="Field folder (the field/ written by 'hyperfields train') or hub model id.")
]
PhotoOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--image", "-i", help="A photo of the subject (jpg, png, webp, bmp); repeat it for several photos of one."
    ),
]
SubjectOption = Annotated[
    Path | None,
    typer.Option("--subject", help="A folder of one subject's photos (searched recursively): all of them are used."),
]
StepOption = Annotated[
    float | None,
    typer.Option("--step", help="Trajectory step t in [0, T] to predict; default T, the end of the trajectory."),
]
LoraFormatOption = Annotated[
    LoraFormat,
    typer.Option("--format", help="LoRA file format: diffusers (pipe.load_lora_weights) or kohya (A1111, ComfyUI)."),
]
DeviceOption = Annotated[
    str,
    typer.Option("--device", help="Where the models run: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps."),
]
TrainingImagesOption = Annotated[
    Path | None,
    typer.Option(
        "--images",
        help=(
            "Folder of training photos (searched recursively; captions from <name>.txt or metadata.jsonl). Required."
        ),
    ),
]

# Former names, accepted for one release: hidden from --help, resolved by `renamed`, which prints the note.
HeightOption = Annotated[int | None, typer.Option("--height", min=1, help="Image height; default the model's own.")]
WidthOption = Annotated[int | None, typer.Option("--width", min=1, help="Image width; default the model's own.")]
FormerOutOption = Annotated[Path | None, typer.Option("--out", hidden=True)]
FormerDataOption = Annotated[Path | None, typer.Option("--data", "-d", hidden=True)]


def renamed(ctx: typer.Context, new: str, former: str, required: bool = True) -> Any:
    """The value of parameter `new`, or of its former name `former` (with a one-line note on stderr) if that was given.

    A UserError when both are given, or when neither is and the parameter is `required`.
    """
    by_name = {parameter.name: parameter for parameter in ctx.command.params}
    new_name, former_name = (_shown_name(by_name[name]) for name in (new, former))
    new_given, former_given = (_given(ctx, name) for name in (new, former))
    if new_given and former_given:
        raise UserError(f"give {new_name}, not both {new_name} and its former name {former_name}")
    if former_given:
        typer.echo(f"note: {former_name} is deprecated; use {new_name}", err=True)
        return ctx.params[former]
    if required and ctx.params[new] is None:
        raise UserError(f"missing option {new_name}")
    return ctx.params[new]


def former_flag_as_key(ctx: typer.Context, former: str, key: str, overrides: list[str]) -> list[str]:
    """`overrides` (the --set values), with `key=<value>` added when the former flag for config key `key` was given,
    and a one-line note on stderr; a UserError when `--set key=...` was given too."""
    if not _given(ctx, former):
        return overrides
    by_name = {parameter.name: parameter for parameter in ctx.command.params}
    new_name, former_name = f"--set {key}={ctx.params[former]}", _shown_name(by_name[former])
    if any(override.split("=", 1)[0].strip() == key for override in overrides):
        raise UserError(f"give --set {key}=..., not both that and its former name {former_name}")
    typer.echo(f"note: {former_name} is deprecated; use {new_name}", err=True)
    return [*overrides, f"{key}={ctx.params[former]}"]


def note(line: str) -> None:
    """Print a one-line note (a former name or meaning, a skipped file) on stderr."""
    typer.echo(line, err=True)


def training_photos(ctx: typer.Context) -> Path:
    """The folder of training photos given as --images (or its former name --data); a UserError if not a folder."""
    images: Path = renamed(ctx, "images", "data")
    if not images.is_dir():
        raise UserError(f"--images '{images}' is not a folder of images")
    return images


def check_photo_options(images: list[Path] | None, subject: Path | None, required: bool = True) -> None:
    """Nothing when --image (repeated) or --subject names a subject's photos, or neither and none is `required`; else
    a UserError, before any model is loaded."""
    if images and subject is not None:
        raise UserError("give --image PHOTO (repeatable) or --subject DIR, not both")
    if subject is not None and not subject.is_dir():
        raise UserError(f"--subject '{subject}' is not a folder of photos")
    if required and not images and subject is None:
        raise UserError("missing option --image (or --subject DIR)")


def subject_photos(images: list[Path] | None, subject: Path | None, resolution: int) -> Any:
    """The PhotoSet of --image (repeated) or of the folder --subject (checked by `check_photo_options`); else None."""
    from hyperfields.predict import read_photos, read_subject

    if subject is not None:
        return read_subject(subject, resolution, warn=lambda message: typer.echo(message, err=True))
    return read_photos(images, resolution) if images else None


def _shown_name(parameter: Any) -> str:
    # An option by its long name, a positional argument by its metavar (DIR).
    return parameter.opts[0] if parameter.param_type_name == "option" else (parameter.metavar or parameter.name.upper())


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    # By name: typer ships its own copy of click, whose ParameterSource is not click's.
    return source is not None and source.name != "DEFAULT"


def show_version(value: bool) -> None:
    """Print `hyperfields X.Y.Z` and stop, when --version was given."""
    if value:
        typer.echo(f"hyperfields {hyperfields.__version__}")
        raise typer.Exit()


VersionOption = Annotated[
    bool, typer.Option("--version", callback=show_version, is_eager=True, help="Print the version and exit.")
]


def refuse_lora_options(ctx: typer.Context, task: str, names: list[str]) -> None:
    """Nothing for a LoRA field; else a UserError naming the first LoRA-only option of `names` the user gave."""
    if task == "lora":
        return
    for parameter in ctx.command.params:
        if parameter.name in names and _given(ctx, parameter.name):
            raise UserError(f"{parameter.opts[0]} applies to LoRA fields; this field was trained on task '{task}'")


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {printable(message)}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def reports_errors(command: F) -> F:
    """Turn UserError into 'error: ...' with exit code 2 and TrainingError into exit code 1; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            return command(*args, **kwargs)
        except UserError as error:
            raise fail(str(error), 2) from None
        except TrainingError as error:
            raise fail(str(error), 1) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper  # type: ignore[return-value]
