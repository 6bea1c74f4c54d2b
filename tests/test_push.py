"""`hyperfields push` against a local stand-in for the Hugging Face Hub: the real huggingface_hub client speaks HTTP
to a server that implements the endpoints a push uses (create a repository, a branch, validate the card's metadata,
pre-upload, commit) and keeps what arrives."""

from __future__ import annotations

import base64
import json
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import constants
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.field.card import model_card
from hyperfields.field.io import load_field, read_record
from tests.conftest import clean_exit
from tests.test_cli_vocabulary import commands, visible_options
from tests.tiny_field import TinyField, tiny_field

runner = CliRunner()
REPO = "me/tiny-field"


@dataclass
class HubState:
    """What the stand-in hub was asked and holds: requests in order, repositories, branches, files per revision."""

    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    authorizations: set[str] = field(default_factory=set)
    repos: dict[str, str] = field(default_factory=dict)  # repo id -> visibility
    branches: set[tuple[str, str]] = field(default_factory=set)
    files: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)  # (repo id, revision) -> files


def hub_handler(state: HubState, endpoint: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: pytest shows failures, not the server's log
            pass

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            path = self.path.split("?")[0]
            state.requests.append(("POST", path))
            state.authorizations.add(self.headers.get("Authorization", ""))
            if path == "/api/repos/create":
                values = json.loads(body)
                repo = f"{values['organization']}/{values['name']}"
                url = f"{endpoint[0]}/{repo}"
                if repo in state.repos:  # as the hub answers: a conflict that still names the repository
                    return self.reply(409, {"error": "You already created this model repo", "url": url})
                state.repos[repo] = values.get("visibility", "public")
                return self.reply(200, {"url": url})
            if path == "/api/validate-yaml":
                return self.reply(200, {"errors": [], "warnings": []})
            found = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/([^/]+)", path)
            if found is None or found[1] not in state.repos:
                return self.reply(404, {"error": "Repository not found"})
            repo, action, revision = found.groups()
            if action == "branch":
                state.branches.add((repo, revision))
                return self.reply(200, {})
            if revision != "main" and (repo, revision) not in state.branches:
                return self.reply(404, {"error": f"Invalid rev id: {revision}"})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self.reply(
                    200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                )
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            received = state.files.setdefault((repo, revision), {})
            for line in lines:
                if line["key"] == "file":
                    received[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            return self.reply(200, {"commitUrl": f"{endpoint[0]}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})

    return Handler


@pytest.fixture
def hub(monkeypatch) -> Iterator[HubState]:
    """A stand-in hub on a free local port, which huggingface_hub's HfApi talks to for the test."""
    state, endpoint = HubState(), [""]
    server = ThreadingHTTPServer(("127.0.0.1", 0), hub_handler(state, endpoint))
    endpoint[0] = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", endpoint[0])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline; this server is local
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TinyField:
    return tiny_field(tmp_path_factory)


def push(*args: str):
    return runner.invoke(app, ["push", *args, "--token", "hf_test"])


def test_push_uploads_the_field_files_and_a_card_for_its_repo(trained: TinyField, hub: HubState) -> None:
    result = push("--field", str(trained.field), "--repo-id", REPO, "--private")
    assert result.exit_code == 0, result.output
    assert hub.repos == {REPO: "private"} and hub.authorizations == {"Bearer hf_test"}
    received = hub.files[(REPO, "main")]
    assert set(received) == {"config.json", "model.safetensors", "README.md"}
    for name in ("config.json", "model.safetensors"):
        assert received[name] == (trained.field / name).read_bytes(), name
    card = received["README.md"].decode()
    assert card == model_card(read_record(trained.field), REPO)
    assert f"hyperfields generate --field {REPO} --image photo.jpg" in card and "`tiny`" in card
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "hyperfields" and "base_model" not in metadata  # `tiny` is no hub model
    assert f"{REPO}" in result.stdout and "commit" in result.stdout
    # Pushed again to a new branch of the same repository: the repository is reused, the branch created.
    again = push("--field", str(trained.field), "--repo-id", REPO, "--revision", "v2")
    assert again.exit_code == 0, again.output
    assert hub.branches == {(REPO, "v2")} and hub.files[(REPO, "v2")] == received


def test_a_pushed_field_loads_back_by_its_hub_id(trained: TinyField, hub: HubState, tmp_path: Path) -> None:
    assert push("--field", str(trained.field), "--repo-id", REPO).exit_code == 0
    # What the hub then serves for the id: the received files, as a snapshot in a local hub cache.
    commit = "0" * 40
    snapshot = tmp_path / "hub" / "models--me--tiny-field" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in hub.files[(REPO, "main")].items():
        (snapshot / name).write_bytes(data)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    copy, _ = load_field(REPO, cache_dir=tmp_path / "hub", local_files_only=True)
    field, _ = load_field(trained.field)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    first, second = field(t=6, images=images), copy(t=6, images=images)
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("case", ["no folder", "no weights", "edited record", "bad repo id"])
def test_a_bad_field_or_repo_id_is_one_line_before_anything_is_sent(
    trained: TinyField, hub: HubState, tmp_path: Path, case: str
) -> None:
    folder, repo = tmp_path / "field", REPO
    if case != "no folder":
        shutil.copytree(trained.field, folder)
    if case == "no weights":
        (folder / "model.safetensors").unlink()
    if case == "edited record":
        record = json.loads((folder / "config.json").read_text())
        record["field"]["width"] *= 2
        (folder / "config.json").write_text(json.dumps(record))
    if case == "bad repo id":
        repo = "not a repo id"
    result = push("--field", str(folder), "--repo-id", repo)
    assert result.exit_code == 2 and clean_exit(result), result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert (str(folder) if case != "bad repo id" else repo) in result.stderr
    assert hub.requests == []


def test_an_unreachable_hub_is_one_line(trained: TinyField, hub: HubState, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = push("--field", str(trained.field), "--repo-id", REPO)
    assert result.exit_code == 2 and clean_exit(result), result.output
    assert result.stderr.startswith(f"error: cannot push to hub repo '{REPO}'") and "offline" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_card_commands_use_the_current_option_names(trained: TinyField) -> None:
    card = model_card(read_record(trained.field), REPO)
    lines = [line.split() for line in card.splitlines() if line.startswith("hyperfields ")]
    assert {words[1] for words in lines} == {"generate", "export"}
    for words in lines:
        valid = {o for opts in visible_options(commands()[words[1]]).values() for o in opts}
        assert {w for w in words if w.startswith("-")} <= valid, words
