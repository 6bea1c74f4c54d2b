"""How much generated images look like their subject and follow their prompt: DINO, CLIP-I, CLIP-T and face scores.

Every score is a cosine similarity of two embeddings (at most 1; in practice between 0 and 1), as personalisation
papers report them: DINO (the CLS token of a self-supervised ViT) and CLIP-I (CLIP's projected image embedding)
between a generated image and the subject's photos (the mean over its photos), CLIP-T between a generated image
and its prompt, and face between the pooled outputs of a face model (also the mean over the photos). Images are
preprocessed by each model's own image processor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from hyperfields.errors import UserError, error_line
from hyperfields.models import resolve_model_path

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
SCALE = "cosine similarity of two embeddings: 1 = the same, 0 = unrelated"


def _dino_features(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).last_hidden_state[:, 0]  # the CLS token, as DreamBench scores DINO


def _clip_image_features(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def _pooled_features(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    outputs = model(pixel_values=pixels)
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is None:
        pooled = getattr(outputs, "image_embeds", None)
    if pooled is None:
        raise UserError(f"face model {type(model).__name__}: its output has no pooled embedding (pooler_output)")
    return pooled.flatten(1)  # convolutional models pool to (N, C, 1, 1)


@dataclass
class ImageEmbedder:
    """A named image model and its processor, giving unit-norm embeddings of PIL images."""

    name: str
    model: Any
    processor: Any  # the model's image processor
    features: Callable[[Any, torch.Tensor], torch.Tensor]  # (model, pixel values) -> (N, D)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """The (N, D) unit-norm embeddings of `images`."""
        device = next(self.model.parameters()).device
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        features = self.features(self.model, pixels["pixel_values"].to(device))
        return F.normalize(features.float(), dim=-1)


@dataclass
class TextEmbedder:
    """CLIP's text tower and tokenizer, giving unit-norm embeddings of prompts."""

    model: Any  # the CLIPModel whose image embeddings the text is compared with
    tokenizer: Any

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        """The (N, D) unit-norm embeddings of `texts`, cut to the tokenizer's length as CLIP was trained."""
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(self.model.text_projection(pooled.pooler_output).float(), dim=-1)


@dataclass
class Scorers:
    """The models that score generated images: DINO, CLIP (image and text) and, when given, a face model."""

    dino: ImageEmbedder
    clip: ImageEmbedder
    clip_text: TextEmbedder
    face: ImageEmbedder | None = None

    def checkpoints(self) -> dict[str, str | None]:
        """Which checkpoint computed each score."""
        return {
            "dino": self.dino.name,
            "clip": self.clip.name,
            "face": self.face.name if self.face is not None else None,
        }

    def reference(self, photos: list[Image.Image]) -> dict[str, torch.Tensor]:
        """What generated images are compared with, by score name: the mean of the unit-norm embeddings of the
        subject's `photos`, so an image's score is the mean of its cosines with each photo."""
        embedders = {"dino": self.dino, "clip_i": self.clip, "face": self.face}
        return {name: embed(photos).mean(dim=0) for name, embed in embedders.items() if embed is not None}

    def score(
        self, images: list[Image.Image], reference: dict[str, torch.Tensor], texts: list[str]
    ) -> list[dict[str, float]]:
        """Per image: its cosines to the subject's `reference` embeddings and (CLIP-T) to its text in `texts`."""
        clip = self.clip(images)
        scores = {
            "dino": self.dino(images) @ reference["dino"],
            "clip_i": clip @ reference["clip_i"],
            "clip_t": (clip * self.clip_text(texts)).sum(dim=-1),
        }
        if self.face is not None:
            scores["face"] = self.face(images) @ reference["face"]
        return [{name: float(values[i]) for name, values in scores.items()} for i in range(len(images))]


def _load(name: str, kind: str, what: str, load: Callable[[str], Any]) -> Any:
    path = resolve_model_path(name, kind)  # type: ignore[arg-type]
    try:
        return load(path)
    except Exception as error:
        where = "a local folder" if Path(path).is_dir() else "not a local folder or a reachable hub id"
        raise UserError(f"{what} {name!r}: cannot be loaded ({where}; {error_line(error)})") from None


def _image_model(name: str, kind: str, what: str, device: torch.device) -> tuple[Any, Any]:
    from transformers import AutoImageProcessor, AutoModel

    model = _load(name, kind, what, AutoModel.from_pretrained)
    vision = getattr(model, "vision_model", None)
    if isinstance(vision, torch.nn.Module):  # a text-image model: only its vision tower is wanted
        model = vision
    processor = _load(name, kind, f"{what} image processor", AutoImageProcessor.from_pretrained)
    return model.to(device).eval(), processor


def load_scorers(dino: str, clip: str, face: str | None, device: torch.device) -> Scorers:
    """The scoring models by hub id or local folder ('tiny' = the built-in tiny ones), on `device`, in fp32."""
    from transformers import AutoProcessor, CLIPModel

    dino_model, dino_processor = _image_model(dino, "dino", "DINO model", device)
    clip_model = _load(clip, "clip", "CLIP model", CLIPModel.from_pretrained).to(device).eval()
    clip_processor = _load(clip, "clip", "CLIP model's processor", AutoProcessor.from_pretrained)
    face_embedder = None
    if face is not None:
        face_model, face_processor = _image_model(face, "encoder", "face model", device)
        face_embedder = ImageEmbedder(face, face_model, face_processor, _pooled_features)
    return Scorers(
        dino=ImageEmbedder(dino, dino_model, dino_processor, _dino_features),
        clip=ImageEmbedder(clip, clip_model, clip_processor.image_processor, _clip_image_features),
        clip_text=TextEmbedder(clip_model, clip_processor.tokenizer),
        face=face_embedder,
    )
