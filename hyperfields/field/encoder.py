"""Image encoder wrapper: any transformers vision model as a source of patch tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hyperfields.models import ImageNorm, encoder_width


class ImageEncoder(nn.Module):
    """Patch tokens (N, P, D) from images in [-1, 1] of any size, frozen unless trained."""

    def __init__(self, model: nn.Module, norm: ImageNorm, trainable: bool = False) -> None:
        super().__init__()
        self.model = model
        self.norm = norm
        self.trainable = trainable
        self.width = encoder_width(model)
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1), persistent=False)
        model.requires_grad_(trainable)
        if not trainable:
            model.eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        # A frozen encoder stays in eval mode so dropout never makes the condition noisy.
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    def num_tokens(self) -> int:
        """How many tokens every image gives (each is resized to the encoder's input size): one forward pass."""
        parameter = next(self.model.parameters())
        with torch.no_grad():
            return int(self(torch.zeros(1, 3, self.norm.size, self.norm.size, device=parameter.device)).shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images + 1) / 2  # (N, 3, H, W) in [0, 1]
        if pixels.shape[-1] != self.norm.size or pixels.shape[-2] != self.norm.size:
            pixels = F.interpolate(
                pixels, size=(self.norm.size, self.norm.size), mode="bicubic", align_corners=False, antialias=True
            )
        pixels = ((pixels - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            tokens = self.model(pixel_values=pixels).last_hidden_state  # (N, P, D)
        return tokens.float()
