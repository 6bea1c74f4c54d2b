"""The evaluation's scores: DINO and CLIP-I are 1 for identical images, CLIP-T is CLIP's own image-text cosine,
and the shipped prompt lists and prompt files hold what the scores need."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, ViTModel

from hyperfields.errors import UserError
from hyperfields.evaluate.metrics import load_scorers
from hyperfields.evaluate.prompts import SHIPPED, load_prompts
from hyperfields.models import resolve_model_path


def random_images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def scorers():
    return load_scorers("tiny", "tiny", "tiny", torch.device("cpu"))


def test_identical_images_score_one_and_different_ones_less(scorers) -> None:
    photo, other = random_images(2, seed=0)
    scores = scorers.score([photo, other], scorers.reference([photo]), ["a photo of a dog"] * 2)
    same, different = scores
    for name in ("dino", "clip_i", "face"):
        assert same[name] == pytest.approx(1.0, abs=1e-5), name
        assert different[name] < 1.0 - 1e-4, name


def test_identity_scores_against_several_photos_are_the_mean_over_the_photos(scorers) -> None:
    first, second, image = random_images(3, seed=2)
    both = scorers.score([image], scorers.reference([first, second]), ["a dog"])[0]
    each = [scorers.score([image], scorers.reference([photo]), ["a dog"])[0] for photo in (first, second)]
    for name in ("dino", "clip_i", "face"):
        assert both[name] == pytest.approx((each[0][name] + each[1][name]) / 2, abs=1e-6), name
        assert abs(each[0][name] - each[1][name]) > 1e-4, name  # the two photos score differently
    assert both["clip_t"] == each[0]["clip_t"]


def test_clip_t_is_clips_own_image_text_cosine(scorers) -> None:
    images = random_images(3, seed=1)
    texts = ["a photo of a dog", "an oil painting of a person", "a red backpack"]
    scores = scorers.score(images, scorers.reference(images[:1]), texts)
    path = resolve_model_path("tiny", "clip")
    model, processor = CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        outputs = model(**processor(text=texts, images=images, return_tensors="pt", padding=True))
    expected = (outputs.image_embeds * outputs.text_embeds).sum(dim=-1)  # both unit-norm in CLIPOutput
    assert [s["clip_t"] for s in scores] == pytest.approx(expected.tolist(), abs=1e-5)


def test_tiny_writes_clip_and_dino_that_transformers_loads(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hyperfields.cli.main import app

    result = CliRunner().invoke(app, ["tiny", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    CLIPModel.from_pretrained(tmp_path / "clip")
    CLIPProcessor.from_pretrained(tmp_path / "clip")
    ViTModel.from_pretrained(tmp_path / "dino")
    scorers = load_scorers(str(tmp_path / "dino"), str(tmp_path / "clip"), None, torch.device("cpu"))
    assert scorers.checkpoints() == {"dino": str(tmp_path / "dino"), "clip": str(tmp_path / "clip"), "face": None}


def test_a_model_that_cannot_be_loaded_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="DINO model .*cannot be loaded"):
        load_scorers(str(tmp_path), "tiny", None, torch.device("cpu"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_prompt_lists_show_the_subject_in_every_prompt(name: str) -> None:
    prompts = load_prompts(name)
    assert 20 <= len(prompts) <= 30
    for prompt in prompts:
        text, scored = prompt.text("sks", "dog"), prompt.scored_text("dog")
        assert "sks" in text.split() and "sks" not in scored.split() and "dog" in scored.split()


def test_a_prompt_file_is_checked_line_by_line(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("# comment\n\na photo of {token} {class} at the beach\n{token} on a table\n", encoding="utf-8")
    prompts = load_prompts(good)
    assert [p.scored_text("cat") for p in prompts] == ["a photo of cat at the beach", "cat on a table"]
    assert prompts[1].text("sks", "cat") == "sks on a table"
    for text, message in [
        ("a photo of {token}\na photo of a {class}\n", "line 2: the prompt has no {token}"),
        ("a photo of {token} {colour}\n", "line 1: unknown placeholder {colour}"),
        ("# only a comment\n", "holds no prompts"),
    ]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(UserError, match=message.replace("{", r"\{").replace("}", r"\}")):
            load_prompts(bad)
    with pytest.raises(UserError, match="neither a file nor a shipped list"):
        load_prompts(tmp_path / "missing.txt")
