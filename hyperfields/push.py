"""Publishing a trained field folder on the Hugging Face Hub: its weights and record, and a model card made from the
record, in one commit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hyperfields.errors import UserError, error_line
from hyperfields.field.card import model_card
from hyperfields.field.io import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, read_field_files


@dataclass
class Pushed:
    """Where a field went: its repository's page and the commit that holds it."""

    repo_url: str
    commit_url: str
    revision: str


def field_commit(folder: Path, repo_id: str) -> list[CommitOperationAdd]:
    """The files of a field folder as the hub commit that publishes it, its card written for `repo_id`; a UserError
    naming the folder when it is not a complete, readable field."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"field folder '{folder}' does not exist")
    record, _ = read_field_files(folder)
    return [
        CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=folder / CONFIG_NAME),
        CommitOperationAdd(path_in_repo=WEIGHTS_NAME, path_or_fileobj=folder / WEIGHTS_NAME),
        CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=model_card(record, repo_id).encode("utf-8")),
    ]


def push_field(
    folder: Path,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
) -> Pushed:
    """Upload the field folder to hub model `repo_id` (created if absent, `private` then) on branch `revision`
    (created if absent; default main). The folder is checked before anything is sent."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"repo id '{repo_id}' is not a hub model id such as 'your-name/my-field'") from None
    operations = field_commit(folder, repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(
            repo.repo_id,
            operations,
            commit_message="Upload hyperfields field",
            revision=revision,
        )
    except Exception as error:  # offline, no or a read-only token, no rights on the namespace: the user's to fix
        raise UserError(f"cannot push to hub repo '{repo_id}' ({error_line(error)})") from None
    return Pushed(repo_url=str(repo), commit_url=commit.commit_url, revision=revision or "main")
