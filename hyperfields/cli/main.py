"""The `hyperfields` command: wires one file per command, nothing else."""

from __future__ import annotations

import typer

from hyperfields.cli.cache import cache_app
from hyperfields.cli.common import VersionOption
from hyperfields.cli.config import config_command
from hyperfields.cli.evaluate import evaluate_command
from hyperfields.cli.export import export_command
from hyperfields.cli.generate import generate_command
from hyperfields.cli.inspect import inspect_command
from hyperfields.cli.precompute import precompute_command
from hyperfields.cli.push import push_command
from hyperfields.cli.refine import refine_command
from hyperfields.cli.tiny import tiny_command
from hyperfields.cli.train import train_command

app = typer.Typer(
    name="hyperfields",
    help="Hypernetwork fields: predict a diffusion LoRA from one photo, trained by gradient matching.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def root(version: VersionOption = False) -> None:
    """Options that come before the command: --version."""


app.command("train")(train_command)
app.command("tiny")(tiny_command)
app.command("generate")(generate_command)
app.command("export")(export_command)
app.command("refine")(refine_command)
app.command("inspect")(inspect_command)
app.command("evaluate")(evaluate_command)
app.command("precompute")(precompute_command)
app.command("push")(push_command)
app.command("config")(config_command)
app.add_typer(cache_app, name="cache")


def main() -> None:
    app()
