"""Subjects of several photos: folders into subjects, the split by subject, the photo draws, the task's loss over a
subject's photos, and the field conditioned on a set of photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.config import InrConfig
from hyperfields.data import scan_image_folder
from hyperfields.dataset import split_heldout
from hyperfields.evaluation import heldout_losses
from hyperfields.field.model import HyperField
from hyperfields.manifest import scan_with_manifest
from hyperfields.streams import photo_draws
from hyperfields.subjects import group_subjects
from hyperfields.tasks.base import ImageFittingTask
from hyperfields.tasks.inr import InrTask
from hyperfields.tasks.subject import PhotoSets, SubjectTask
from hyperfields.training.photo_sets import photo_set_conditions
from tests.conftest import FAST, tiny_vit_encoder


def _photo(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((20, 24, 3)) * 255).astype(np.uint8)).save(path)


def _subjects(folder: Path) -> tuple[dict[str, list[str]], list[str]]:
    warnings: list[str] = []
    records = scan_image_folder(folder, warn=warnings.append).records
    subjects = group_subjects(folder, records, warnings.append)
    return {s.name: [r.path.relative_to(folder).as_posix() for r in s.records] for s in subjects}, warnings


def test_each_sub_folder_is_a_subject_and_a_flat_folder_one_per_photo(tmp_path: Path) -> None:
    for name in ("anna/1.png", "anna/2.jpg", "anna/more/3.png", "ben/1.png"):
        _photo(tmp_path / "folders" / name)
    subjects, warnings = _subjects(tmp_path / "folders")
    assert subjects == {"anna": ["anna/1.png", "anna/2.jpg", "anna/more/3.png"], "ben": ["ben/1.png"]}
    assert warnings == []
    for name in ("a.png", "b.png"):
        _photo(tmp_path / "flat" / name)
    subjects, warnings = _subjects(tmp_path / "flat")
    assert subjects == {"a.png": ["a.png"], "b.png": ["b.png"]}
    assert warnings == []


def test_mixed_layout_and_empty_sub_folders_are_one_warning_line_each(tmp_path: Path) -> None:
    _photo(tmp_path / "anna" / "1.png")
    _photo(tmp_path / "loose.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no photos here")
    subjects, warnings = _subjects(tmp_path)
    assert subjects == {"anna": ["anna/1.png"], "loose.png": ["loose.png"]}
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert "1 photo(s) beside 1 sub-folder(s)" in warnings[0]
    assert "2 sub-folder(s)" in warnings[1] and "empty" in warnings[1]


def test_subjects_survive_the_scan_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    for i, name in enumerate(("a/1.png", "a/2.png", "b/1.png", "c/1.png")):
        _photo(folder / name, seed=i)
    found = []
    for _ in range(2):  # the second scan answers every check from the manifest
        report, checks = scan_with_manifest(folder, tmp_path / "manifest.json", "a photo of {token}", "sks", 16, print)
        found.append([(s.name, [r.path for r in s.records]) for s in group_subjects(folder, report.records)])
    assert checks.decoded == 0
    assert found[0] == found[1] and [name for name, _ in found[0]] == ["a", "b", "c"]


def test_the_heldout_split_keeps_a_subjects_photos_together(tmp_path: Path) -> None:
    for s in range(8):
        for k in range(3):
            _photo(tmp_path / f"s{s}" / f"{k}.png", seed=10 * s + k)
    subjects = group_subjects(tmp_path, scan_image_folder(tmp_path, warn=lambda _: None).records)
    train, heldout = split_heldout(subjects, 2, seed=0)
    assert len(heldout) == 2 and len(train) == 6
    assert {s.name for s in train}.isdisjoint(s.name for s in heldout)
    assert all(len(s.records) == 3 for s in heldout)


def test_photo_draws_are_seeded_cover_small_subjects_and_show_one_to_n_photos() -> None:
    sizes = [1, 2, 3, 6]
    first = photo_draws(0, 5, 0, 0, sizes, task_photos=4, field_photos=4)
    assert first == photo_draws(0, 5, 0, 0, sizes, task_photos=4, field_photos=4)
    assert first != photo_draws(0, 6, 0, 0, sizes, task_photos=4, field_photos=4)
    shown_counts = set()
    for step in range(40):
        task_rows, field_rows = photo_draws(0, step, 0, 0, sizes, task_photos=4, field_photos=4)
        for size, task, shown in zip(sizes, task_rows, field_rows):
            # A subject of up to 4 photos has every photo in the loss; a larger one 4 different photos.
            assert len(task) == 4 and len(set(task)) == min(size, 4) and set(task) <= set(range(size))
            assert 1 <= len(shown) <= min(size, 4) and len(set(shown)) == len(shown)
            if size == 6:
                shown_counts.add(len(shown))
    assert shown_counts == {1, 2, 3, 4}


def test_the_loss_of_a_subject_is_the_mean_over_its_photos(quadratic_task) -> None:
    task = SubjectTask(quadratic_task)
    images = torch.rand(6, 3, 8, 8) * 2 - 1  # two subjects of three photos, rows ordered (subject, photo)
    inputs = task.prepare(images, [""] * 6)
    weights = {n: torch.randn(2, *s, requires_grad=True) for n, s in task.layout().items()}
    loss = task.loss(weights, PhotoSets(inputs, 3), 1, torch.Generator())
    per_photo = quadratic_task.loss({n: w.repeat_interleave(3, 0) for n, w in weights.items()}, inputs, 1, None)
    torch.testing.assert_close(loss, per_photo.view(2, 3).mean(1), rtol=0, atol=0)
    # Plain inputs are one photo per sample, as the task's own loss.
    single = {n: w[:1] for n, w in weights.items()}
    torch.testing.assert_close(
        task.loss(single, {n: v[:1] for n, v in inputs.items()}, 1, None),
        quadratic_task.loss(single, {n: v[:1] for n, v in inputs.items()}, 1, None),
    )
    assert task.layout() == quadratic_task.layout()


def test_the_error_of_an_image_fitting_subject_is_the_mean_over_its_photos(quadratic_task) -> None:
    inr = InrTask(InrConfig(hidden=8, layers=1, frequencies=4), 8, torch.device("cpu"))
    task = SubjectTask(inr)
    inputs = task.prepare(torch.rand(6, 3, 8, 8) * 2 - 1, [""] * 6)  # two subjects of three photos
    weights = {n: w.expand(2, *w.shape) + 0.1 * torch.randn(2, *w.shape) for n, w in inr.initial_weights().items()}
    per_photo = inr.reconstruction_error({n: w.repeat_interleave(3, 0) for n, w in weights.items()}, inputs)
    assert isinstance(task, ImageFittingTask) and not isinstance(SubjectTask(quadratic_task), ImageFittingTask)
    scored = heldout_losses(task, weights, PhotoSets(inputs, 3), draws=1, seed=0)
    torch.testing.assert_close(scored, per_photo.view(2, 3).mean(1), rtol=0, atol=0)


def _trained_looking_field(seed: int = 0) -> HyperField:
    """A tiny field whose every weight is random: at init adaLN-Zero would hide the condition entirely."""
    layout = {"a.lora_A": (2, 8), "a.lora_B": (8, 2), "b.lora_A": (2, 8)}
    field = HyperField(
        tiny_vit_encoder(),
        layout,
        {n: torch.zeros(s) for n, s in layout.items()},
        {n: 0.1 for n in layout},
        steps=6,
        width=32,
        depth=2,
        spatial_rank=2,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in field.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return field.eval()


@torch.no_grad()
def test_one_photo_as_a_set_gives_exactly_the_single_photo_field() -> None:
    field = _trained_looking_field()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    t = torch.tensor([[0.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    single = field(t=t, images=images)
    as_set = field(t=t, images=images.unsqueeze(1))
    tokens = field.encoder(images)
    from_tokens = field(t=t, encoder_tokens=tokens.unsqueeze(1))
    for name in single:
        assert torch.equal(single[name], as_set[name]) and torch.equal(single[name], from_tokens[name])


@torch.no_grad()
def test_the_field_reads_a_set_whatever_the_order_and_ignores_padding() -> None:
    field = _trained_looking_field()
    tokens = field.encoder(torch.rand(2 * 3, 3, 16, 16) * 2 - 1).unflatten(0, (2, 3))  # (N, P, S, D)
    t = torch.tensor([6.0, 3.0])
    reference = field(t=t, encoder_tokens=tokens)
    shuffled = field(t=t, encoder_tokens=tokens[:, [2, 0, 1]])
    everyone = torch.ones(2, 3, dtype=torch.bool)
    masked_all_present = field(t=t, encoder_tokens=tokens, photo_mask=everyone)
    # Subject 1 shown its first two photos only: the third is padding, whatever it holds.
    mask = torch.tensor([[True, True, True], [True, True, False]])
    padded = field(t=t, encoder_tokens=torch.cat([tokens[:, :2], torch.randn_like(tokens[:, 2:])], 1), photo_mask=mask)
    two = field(t=t[1:], encoder_tokens=tokens[1:, :2])
    one = field(t=t, encoder_tokens=tokens[:, 0])
    for name in reference:
        torch.testing.assert_close(shuffled[name], reference[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(masked_all_present[name], reference[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(padded[name][1], two[name][0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(reference[name], one[name])  # more photos change the prediction


def test_no_gradient_reaches_a_padding_photo() -> None:
    field = _trained_looking_field().train()
    with torch.no_grad():
        tokens = field.encoder(torch.rand(2 * 3, 3, 16, 16) * 2 - 1).unflatten(0, (2, 3))
    tokens.requires_grad_(True)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    weights = field(t=torch.tensor([[1.0, 2.0], [3.0, 4.0]]), encoder_tokens=tokens, photo_mask=mask)
    sum(w.pow(2).sum() for w in weights.values()).backward()
    assert torch.count_nonzero(tokens.grad[0, 1:]) == 0
    assert torch.count_nonzero(tokens.grad[0, 0]) > 0 and torch.count_nonzero(tokens.grad[1, 2]) > 0


def test_a_micro_batch_conditions_on_the_drawn_photos_of_each_subject() -> None:
    subjects = [[0, 1, 2], [3], [4, 5]]
    asked: list[list[int]] = []

    def conditions(images: list[int]):  # image i's tokens are all i, its task input is 10 * i
        asked.append(images)
        index = torch.tensor(images, dtype=torch.float32)
        return {"encoder_tokens": index.view(-1, 1, 1).expand(-1, 2, 3)}, {"x": 10 * index}

    picks, task_rows, field_rows = [2, 0], [[1, 0], [2, 2]], [[1], [0, 2]]
    field_inputs, sets = photo_set_conditions(conditions, subjects, picks, task_rows, field_rows)
    assert len(asked) == 1 and sorted(asked[0]) == [0, 2, 4, 5]  # each image once
    assert sets.photos == 2 and sets.inputs["x"].tolist() == [50.0, 40.0, 20.0, 20.0]
    assert field_inputs["encoder_tokens"].shape == (2, 2, 2, 3)
    assert field_inputs["encoder_tokens"][:, :, 0, 0].tolist() == [[5.0, 5.0], [0.0, 2.0]]
    assert field_inputs["photo_mask"].tolist() == [[True, False], [True, True]]


@pytest.mark.slow  # ~20 s on two shared cores
def test_train_on_subject_folders(tmp_path: Path) -> None:
    for s in range(4):
        for k in range(2):
            _photo(tmp_path / "photos" / f"subject{s}" / f"{k}.png", seed=10 * s + k)
    (tmp_path / "photos" / "empty").mkdir()
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            "configs/tiny.yaml",
            "--images",
            str(tmp_path / "photos"),
            "--output",
            str(tmp_path / "run"),
            *FAST,
            "--max-steps",
            "2",
            "--set",
            "data.photos_per_subject=2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "8 usable images of 4 subjects" in result.output
    assert "hold no usable photo" in result.output and "empty" in result.output
    assert "recovered fraction R" in result.output
    # The field is scored shown every photo of a held-out subject (up to data.field_photos) and shown only one.
    assert "shown 1 photo of each subject instead of up to 4: R = " in result.output
