"""The model card of a field (its folder's README.md, what the hub shows): what it is and how to use it, from its
record."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hyperfields.field.record import FieldRecord

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A hypernetwork field ([HyperNet Fields](https://arxiv.org/abs/2412.17040)) made with hyperfields: given one photo
and a step `t`, it predicts in one forward pass {{ what }} that `t` steps of per-subject optimisation would
produce; `t = T` is the end of that optimisation.

| | |
|---|---|
{% for name, value in facts %}| {{ name }} | {{ value }} |
{% endfor %}
## Use

With hyperfields installed:

```bash
{{ usage }}
```

In Python, `hyperfields.field.io.load_field("{{ repo }}")` gives the field and its record.
"""
WHAT = {
    "lora": "the LoRA weights of `{base_model}`",
    "inr": "the weights of a small coordinate MLP that reproduces the photo",
}
USAGE = {
    "lora": 'hyperfields generate --field {repo} --image photo.jpg --prompt "{prompt}" --output images/\n'
    "hyperfields export --field {repo} --image photo.jpg --format kohya --output photo_lora.safetensors",
    "inr": "hyperfields generate --field {repo} --image photo.jpg --height 512 --width 512 --output images/\n"
    "hyperfields export --field {repo} --image photo.jpg --output photo_weights.safetensors",
}


def _hub_model(name: str) -> str | None:
    """`name` when it is a hub model id (owner/name) rather than a local folder or a built-in model, else None."""
    if "/" not in name or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _facts(record: FieldRecord) -> list[tuple[str, str]]:
    settings = record.task_settings
    facts = []
    if record.task == "lora":
        layers = f"{len(settings.get('targets', []))} UNet layers"
        patterns = record.config.get("lora", {}).get("targets")  # what was asked for, not every layer it matched
        if isinstance(patterns, list):
            layers += " matching " + ", ".join(f"`{pattern}`" for pattern in patterns)
        facts += [
            ("base model", f"`{settings['base_model']}`"),
            ("LoRA", f"rank {settings.get('rank')}, alpha {settings['alpha']:g}, on {layers}"),
            ("trigger", f"`{record.caption_template.replace('{token}', record.token)}`"),
        ]
    else:
        facts.append(("task", f"`{record.task}`: " + ", ".join(f"{k} {v}" for k, v in settings.get("inr", {}).items())))
    encoder = f"`{record.encoder}`" + (", trained with the field" if record.train_encoder else ", frozen")
    facts += [("image encoder", encoder), ("photo size", f"{record.resolution} px")]
    trajectory = f"T = {record.steps} steps"
    if record.update is not None and record.step_size is not None:
        trajectory += f" of `{record.update}` updates, step size {record.step_size:g}"
    facts.append(("trajectory", trajectory))
    if record.trained_steps is not None:
        trained = f"{record.trained_steps} optimiser steps"
        if record.heldout_recovered is not None:
            trained += f"; held-out R = {record.heldout_recovered:.3f} (1 = as good as real optimisation)"
        facts.append(("trained", trained))
    return facts


def model_card(record: FieldRecord, repo: str = "<this repo>") -> str:
    """The README.md of a field: what it predicts, for which base model, how it was made and how to use it; `repo` is
    where it is published (its hub id) when that is known."""
    base_model = str(record.task_settings.get("base_model", ""))
    if record.task == "lora":
        tags, pipeline = ["lora", "stable-diffusion", "text-to-image"], "text-to-image"
        title = f"hyperfields field: one-photo LoRAs for {base_model}"
    else:
        tags, pipeline, title = ["implicit-neural-representation"], None, f"hyperfields field: {record.task}"
    data = ModelCardData(
        library_name="hyperfields",
        tags=["hypernetwork", *tags],
        base_model=_hub_model(base_model),
        pipeline_tag=pipeline,
    )
    prompt = record.caption_template.replace("{token}", record.token)
    card = ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        title=title,
        what=WHAT[record.task].format(base_model=base_model),
        facts=_facts(record),
        usage=USAGE[record.task].format(repo=repo, prompt=prompt),
        repo=repo,
    )
    return str(card)
