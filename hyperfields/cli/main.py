"""The `hyperfields` command: wires one file per command, nothing else."""

from __future__ import annotations

import typer

from hyperfields.cli.tiny import tiny_command
from hyperfields.cli.train import train_command

app = typer.Typer(
    name="hyperfields",
    help="Hypernetwork fields: predict a diffusion LoRA from one photo, trained by gradient matching.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("train")(train_command)
app.command("tiny")(tiny_command)


def main() -> None:
    app()
