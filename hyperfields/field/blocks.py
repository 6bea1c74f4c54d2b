"""DiT-style transformer pieces: step embedding, adaLN-Zero blocks with cross-attention to image tokens."""

from __future__ import annotations

import math

import torch
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PhaseEmbedder(nn.Module):
    """Embedding (N, D) of the bounded phase t/T in [0, 1]: sinusoidal features then an MLP."""

    def __init__(self, width: int, frequencies: int = 64) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(2 * frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, phase: torch.Tensor) -> torch.Tensor:
        # Periods from 4 down to ~1/1000 of the unit interval: smooth in t yet able to tell t from t+1.
        exponents = torch.arange(self.frequencies, device=phase.device, dtype=torch.float32) / self.frequencies
        angles = phase.float().unsqueeze(1) * (math.pi / 2) * (2000.0**exponents).unsqueeze(0)  # (N, F)
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1))


class Mlp(nn.Sequential):
    def __init__(self, width: int, ratio: float) -> None:
        hidden = int(width * ratio)
        super().__init__(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


class FieldBlock(nn.Module):
    """Self-attention over weight tokens, cross-attention to image tokens, MLP; each adaLN-Zero gated."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 9 * width))

    def forward(
        self, x: torch.Tensor, image_tokens: torch.Tensor, cond: torch.Tensor, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (N * M, W, D): weight tokens of M steps per image, rows ordered (image, step); image_tokens (N, S, D),
        the tokens of all of a subject's photos side by side; padding (N, S) true at tokens of absent photos."""
        s1, c1, g1, s2, c2, g2, s3, c3, g3 = self.adaLN_modulation(cond).chunk(9, dim=1)
        h = modulate(self.norm1(x), s1, c1)
        x = x + g1.unsqueeze(1) * self.self_attn(h, h, h, need_weights=False)[0]
        h = modulate(self.norm2(x), s2, c2)
        # Each query attends to the image on its own, so the M steps of an image can share one query sequence:
        # the image's keys and values are projected once, not once per step.
        n = image_tokens.shape[0]
        queries = h.reshape(n, -1, h.shape[-1])  # (N, M * W, D)
        attended = self.cross_attn(queries, image_tokens, image_tokens, key_padding_mask=padding, need_weights=False)[0]
        attended = attended.reshape(h.shape)
        x = x + g2.unsqueeze(1) * attended
        return x + g3.unsqueeze(1) * self.mlp(modulate(self.norm3(x), s3, c3))  # (N * M, W, D)


class FinalLayer(nn.Module):
    """Last norm with adaLN shift/scale; the heads read its output."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)
