"""`hyperfields generate` as diffusers users expect: a negative prompt, a scheduler by name, the LoRA's scale, one
seed per image, and every PNG saying how it was made as A1111 writes it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.models.tiny import tiny_models_dir
from hyperfields.schedulers import SAMPLERS
from tests.conftest import clean_exit
from tests.test_generate import PROMPT, generate, png, reference_images
from tests.tiny_field import TinyField, tiny_field

runner = CliRunner()
# A1111's own pattern for the `Key: value` pairs of its infotext (modules/infotext_utils.py, re_param).
A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TinyField:
    return tiny_field(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    """The field's LoRA for the photo as `export` writes it for diffusers, in fp32."""
    path = tmp_path_factory.mktemp("export") / "lora.safetensors"
    result = runner.invoke(
        app,
        ["export", "-f", str(trained.field), "-i", str(trained.photo), "--precision", "fp32", "-o", str(path)],
    )
    assert result.exit_code == 0, result.output
    return path


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) <= 1 / 255


def a1111_fields(path: Path) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) of a PNG's `parameters` text, read as A1111 reads it."""
    lines = Image.open(path).text["parameters"].split("\n")
    pairs = {key: json.loads(value) if value.startswith('"') else value for key, value in A1111_PAIR.findall(lines[-1])}
    body = "\n".join(lines[:-1])
    prompt, _, negative = body.partition("\nNegative prompt: ")
    return prompt, negative, pairs


def test_a_negative_prompt_steers_the_image_as_in_diffusers(trained, exported, tmp_path):
    result = generate(trained, tmp_path / "out", tmp_path / "cache", "--negative-prompt", "blurry")
    assert result.exit_code == 0, result.output
    image = png(tmp_path / "out" / "prompt00_image00.png")
    assert close(image, reference_images(exported, negative_prompt="blurry")[0])
    assert not close(image, reference_images(exported)[0]), "the negative prompt must change the image"


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_scheduler_name_samples_as_its_diffusers_class(trained, exported, tmp_path, name):
    sampler = SAMPLERS[name]
    result = generate(trained, tmp_path / "out", tmp_path / "cache", "--scheduler", name)
    assert result.exit_code == 0, result.output
    image = png(tmp_path / "out" / "prompt00_image00.png")
    assert close(image, reference_images(exported, scheduler=sampler.scheduler, options=sampler.options)[0])
    # DDPM is the tiny pipeline's own; Euler a draws the same noise from the same seed and lands within a level of it.
    if sampler.label not in ("DDPM", "Euler a"):
        assert not close(image, reference_images(exported)[0]), "another scheduler must change the image"
    record = json.loads(Image.open(tmp_path / "out" / "prompt00_image00.png").text["hyperfields"])
    assert record["scheduler"] == sampler.scheduler
    assert a1111_fields(tmp_path / "out" / "prompt00_image00.png")[2]["Sampler"] == sampler.label


def test_lora_scale_zero_is_the_base_model_and_s_is_diffusers_own_scaling(trained, exported, tmp_path):
    assert generate(trained, tmp_path / "zero", tmp_path / "cache", "--lora-scale", "0").exit_code == 0
    assert close(png(tmp_path / "zero" / "prompt00_image00.png"), reference_images(None)[0])
    assert generate(trained, tmp_path / "half", tmp_path / "cache", "--lora-scale", "0.5").exit_code == 0
    half = png(tmp_path / "half" / "prompt00_image00.png")
    assert close(half, reference_images(exported, cross_attention_kwargs={"scale": 0.5})[0])
    assert not close(half, reference_images(exported)[0]) and not close(half, reference_images(None)[0])


def test_each_png_records_its_prompt_and_seed_and_that_seed_makes_it_again(trained, tmp_path):
    options = ["--negative-prompt", "blurry, dark", "--num-images", "2", "--seed", "11", "--device", "cpu"]
    result = generate(trained, tmp_path / "two", tmp_path / "cache", *options)
    assert result.exit_code == 0, result.output
    assert "3/3" in result.stderr, "the pipeline shows its progress bar"
    seeds = []
    for i in range(2):
        path = tmp_path / "two" / f"prompt00_image{i:02d}.png"
        prompt, negative, pairs = a1111_fields(path)
        assert (prompt, negative) == (PROMPT, "blurry, dark")
        assert {key: pairs[key] for key in ("Steps", "Sampler", "CFG scale", "Size", "Model", "Lora scale")} == {
            "Steps": "3",
            "Sampler": "DDPM",
            "CFG scale": "5.0",
            "Size": "64x64",
            "Model": "tiny",
            "Lora scale": "1.0",
        }
        record = json.loads(Image.open(path).text["hyperfields"])
        assert record["prompt"] == PROMPT and record["negative_prompt"] == "blurry, dark"
        assert record["seed"] == int(pairs["Seed"]) and record["field"] == str(trained.field)
        assert (record["num_inference_steps"], record["guidance_scale"], record["lora_scale"]) == (3, 5.0, 1.0)
        assert (record["step"], record["steps"], record["base_model"]) == (6, 6, "tiny")
        seeds.append(record["seed"])
    assert seeds == [11, 12]
    listed = json.loads((tmp_path / "two" / "generation.json").read_text())["images"]
    assert [(image["file"], image["seed"]) for image in listed] == [
        ("prompt00_image00.png", 11),
        ("prompt00_image01.png", 12),
    ]
    second = png(tmp_path / "two" / "prompt00_image01.png")
    assert not close(png(tmp_path / "two" / "prompt00_image00.png"), second)

    again = generate(
        trained, tmp_path / "again", tmp_path / "cache", "--negative-prompt", "blurry, dark", "--seed", "12"
    )
    assert again.exit_code == 0, again.output
    assert close(png(tmp_path / "again" / "prompt00_image00.png"), second)


def test_an_unknown_scheduler_is_one_line_listing_the_known_ones(trained, tmp_path):
    result = generate(trained, tmp_path / "out", tmp_path / "cache", "--scheduler", "k-diffusion")
    assert result.exit_code == 2 and clean_exit(result), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: unknown scheduler 'k-diffusion'; known: {', '.join(SAMPLERS)}"]
    assert not (tmp_path / "out").exists()


def test_an_sdxl_field_samples_as_diffusers_at_its_scale_with_the_scheduler_named(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(photos / f"p{i}.png")
    fast = [
        "--set",
        "train.heldout=0",
        "--set",
        "objective.steps=6",
        "--set",
        "field.width=32",
        "--set",
        "field.depth=1",
    ]
    train = ["train", "--images", str(photos), "-o", str(tmp_path / "run"), "--base-model", "tiny-xl"]
    assert runner.invoke(app, [*train, "--max-steps", "1", *fast]).exit_code == 0
    field, photo, lora = tmp_path / "run" / "field", photos / "p0.png", tmp_path / "lora.safetensors"
    assert (
        runner.invoke(
            app, ["export", "-f", str(field), "-i", str(photo), "--precision", "fp32", "-o", str(lora)]
        ).exit_code
        == 0
    )
    sampling = ["--num-inference-steps", "3", "--guidance-scale", "5", "--seed", "7", "--negative-prompt", "blurry"]
    options = ["--scheduler", "euler-a", "--lora-scale", "0.5", "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(
        app,
        [
            "generate",
            "-f",
            str(field),
            "-i",
            str(photo),
            "-p",
            PROMPT,
            *sampling,
            *options,
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models_dir() / "pipeline-xl")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora))

    def draw(scale: float) -> np.ndarray:
        return pipe(
            PROMPT,
            negative_prompt="blurry",
            num_inference_steps=3,
            guidance_scale=5.0,
            generator=[torch.Generator().manual_seed(7)],
            cross_attention_kwargs={"scale": scale},
            output_type="np",
        ).images[0]

    generated = png(tmp_path / "out" / "prompt00_image00.png")
    assert close(generated, draw(0.5)) and not close(generated, draw(0.0))
