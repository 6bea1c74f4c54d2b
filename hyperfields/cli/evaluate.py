"""`hyperfields evaluate`: images of each subject from the base model, the field, refinement and real optimisation,
scored for identity (DINO, CLIP-I, face) and prompt fidelity (CLIP-T)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hyperfields.cli.common import (
    BaseModelOption,
    DeviceOption,
    FieldOption,
    HeightOption,
    WidthOption,
    reports_errors,
)
from hyperfields.errors import UserError


@reports_errors
def evaluate_command(
    field: FieldOption,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            help="Folder of subject photos: each sub-folder one subject (all its photos used together), or a flat "
            "folder with each photo its own subject. Required.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Folder to write: metrics.json, metrics.md, sheets/ (one per subject), images/. Required.",
        ),
    ] = None,
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts",
            help="Text file of prompts, one a line, with {token} and {class}; or a shipped list: living, objects.",
        ),
    ] = "living",
    class_noun: Annotated[
        str, typer.Option("--class-noun", help="What the subjects are (person, dog, backpack): fills {class}.")
    ] = "person",
    arms: Annotated[
        str, typer.Option("--arms", help="Comma-separated arms: base, field, refine, optimise, dreambooth.")
    ] = "base,field,refine,optimise",
    step: Annotated[
        list[float] | None,
        typer.Option("--step", help="Another trajectory step t of the field arm, beside T; repeatable."),
    ] = None,
    refine_updates: Annotated[
        int, typer.Option("--refine-updates", min=1, help="Real updates the refine arm continues the prediction by.")
    ] = 40,
    dreambooth_steps: Annotated[
        int, typer.Option("--dreambooth-steps", min=1, help="AdamW steps of the dreambooth arm (DreamBooth-LoRA).")
    ] = 500,
    dreambooth_lr: Annotated[
        float, typer.Option("--dreambooth-lr", min=0.0, help="Learning rate of the dreambooth arm's AdamW.")
    ] = 1e-4,
    num_images: Annotated[int, typer.Option("--num-images", min=1, help="Images per prompt and arm.")] = 4,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            help="Image i of every prompt and arm is sampled from seed + i; seeds refine's and optimise's noise.",
        ),
    ] = 0,
    num_inference_steps: Annotated[int, typer.Option("--num-inference-steps", min=1, help="Sampler steps.")] = 30,
    guidance_scale: Annotated[
        float,
        typer.Option(
            "--guidance-scale", min=0.0, help="Classifier-free guidance scale; FLUX.1-dev's distilled guidance."
        ),
    ] = 7.5,
    height: HeightOption = None,
    width: WidthOption = None,
    base_model: BaseModelOption = None,
    dino_model: Annotated[
        str,
        typer.Option("--dino-model", help="DINO checkpoint for the DINO score: hub id or folder; 'tiny' = built-in."),
    ] = "facebook/dino-vits16",
    clip_model: Annotated[
        str,
        typer.Option("--clip-model", help="CLIP checkpoint for CLIP-I and CLIP-T, e.g. openai/clip-vit-base-patch32."),
    ] = "openai/clip-vit-large-patch14",
    face_model: Annotated[
        str | None,
        typer.Option("--face-model", help="Image model whose pooled output embeds a face, for a face score."),
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """Score the base model, the field, refinement and real optimisation on subject photos and prompts."""

    from hyperfields.devices import resolve_device
    from hyperfields.evaluate.arms import arm_rows, parse_arms
    from hyperfields.evaluate.folder import check_output_folder, write_evaluation
    from hyperfields.evaluate.metrics import load_scorers
    from hyperfields.evaluate.prompts import load_prompts
    from hyperfields.evaluate.report import markdown_table
    from hyperfields.evaluate.run import Plan, subject_photos
    from hyperfields.field.io import load_field
    from hyperfields.predict import read_photos, require_task
    from hyperfields.sampling import Sampling

    # The quick checks first, so bad input fails in a second and leaves nothing behind.
    for name, value in (("--images", images), ("--output", output)):
        if value is None:
            raise UserError(f"missing option {name}")
    check_output_folder(output)
    kinds = parse_arms(arms)
    prompt_list = load_prompts(prompts)
    if not images.is_dir():
        raise UserError(f"--images '{images}' is not a folder of photos")
    found = subject_photos(images, warn=lambda message: typer.echo(message, err=True))
    torch_device = resolve_device(device)
    loaded, record = load_field(field, device=torch_device)
    require_task(record, "lora", "evaluate")
    rows = arm_rows(kinds, record.steps, step or [], refine_updates, dreambooth_steps)
    subjects = {name: read_photos(paths, record.resolution) for name, paths in found.items()}
    scorers = load_scorers(dino_model, clip_model, face_model, torch_device)
    plan = Plan(
        subjects=subjects,
        prompts=prompt_list,
        token=record.token,
        class_noun=class_noun,
        arms=rows,
        sampling=Sampling(num_images, seed, num_inference_steps, guidance_scale, height, width),
    )
    base = base_model or record.task_settings["base_model"]
    details = {
        "field": field,
        "prompts": prompts,
        "refine_updates": refine_updates if "refine" in kinds else None,
        "dreambooth": {"steps": dreambooth_steps, "learning_rate": dreambooth_lr} if "dreambooth" in kinds else None,
    }
    label = f"evaluating {len(subjects)} subject(s) x {len(rows)} arm(s)"
    with typer.progressbar(length=len(subjects) * len(rows), label=label) as bar:
        summary = write_evaluation(
            loaded, record, plan, base, scorers, output, seed, details, lambda: bar.update(1), dreambooth_lr
        )
    typer.echo(markdown_table(summary, scorers.checkpoints()))
    typer.echo(f"wrote metrics.json, metrics.md, {len(subjects)} contact sheet(s) and the images to '{output}'")
