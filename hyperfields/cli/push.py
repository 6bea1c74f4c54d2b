"""`hyperfields push`: a trained field folder published on the Hugging Face Hub, with a model card from its record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hyperfields.cli.common import reports_errors


@reports_errors
def push_command(
    field: Annotated[
        Path, typer.Option("--field", "-f", help="Field folder to upload (the field/ written by 'hyperfields train').")
    ],
    repo_id: Annotated[
        str, typer.Option("--repo-id", help="Hub model id to upload to, e.g. your-name/my-field; created if absent.")
    ],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repository private (an existing one keeps its visibility).")
    ] = False,
    token: Annotated[
        str | None,
        typer.Option("--token", help="Hub token with write access; default the saved login or HF_TOKEN."),
    ] = None,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to commit to, created if absent; default main.")
    ] = None,
) -> None:
    """Upload a field folder (weights, record and a generated model card) to a Hugging Face Hub model repository."""
    from hyperfields.push import push_field  # heavy imports only once the arguments are known to be good

    pushed = push_field(field, repo_id, private=private or None, token=token, revision=revision)
    typer.echo(f"pushed field '{field}' to {pushed.repo_url} ({pushed.revision}): {pushed.commit_url}")
    typer.echo(f"use it with: hyperfields generate --field {repo_id} --image photo.jpg --output images/")
