"""HyperField: (condition image, step t) -> adapter weights by name, with Psi(c, 0) = theta_0 exactly."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hyperfields.field.blocks import FieldBlock, FinalLayer, PhaseEmbedder
from hyperfields.field.encoder import ImageEncoder


def _shape_key(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _mean_over_photos(x: torch.Tensor, photo_mask: torch.Tensor | None) -> torch.Tensor:
    """(N, *rest) mean of x (N, P, *rest) over each subject's present photos."""
    if photo_mask is None:
        return x.mean(dim=1)
    present = photo_mask.to(x.dtype).view(*photo_mask.shape, *([1] * (x.ndim - 2)))
    return (x * present).sum(dim=1) / present.sum(dim=1)


class HyperField(nn.Module):
    """Psi(c, t) = theta_0 + sum_j b_j(t) Delta_j(c, t), b_0 = t/T, tokens per published tensor and component, one head
    per shape (or per tensor).

    Field folders (and the record of how a field was made) are read and written by field/io.py.
    """

    def __init__(
        self,
        encoder: ImageEncoder,
        layout: Mapping[str, tuple[int, ...]],
        theta0: Mapping[str, torch.Tensor],
        init_std: Mapping[str, float],
        steps: int,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        output_gain: float = 1.0,
        spatial_rank: int = 0,
        time_constants: Sequence[float] = (),
        tensor_heads: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.names = list(layout)
        self.shapes = {name: tuple(layout[name]) for name in self.names}
        self.steps = steps
        self.image_proj = nn.Linear(encoder.width, width)
        self.pool_proj = nn.Linear(width, width)
        # The mean of the image tokens says what is in the image, not where. A learned projection of every token
        # to `spatial_rank` features, flattened in token order, adds where; cross-attention alone reads only a few
        # weighted averages of the tokens. The encoder resizes every image to one size, so the token count is fixed.
        self.spatial_rank = spatial_rank
        if spatial_rank > 0:
            self.spatial_down = nn.Linear(width, spatial_rank)
            self.spatial_up = nn.Linear(encoder.num_tokens() * spatial_rank, width)
        self.phase_embed = PhaseEmbedder(width)
        # Psi(c, t) - theta_0 = sum_j b_j(t) Delta_j(c, t): b_0 = t/T, and per time constant tau a component
        # b(t) = (1 - e^(-t/tau)) / (1 - e^(-T/tau)) that moves early and settles, as optimisation does along each of
        # its directions. Every component has its own weight tokens, so the path can bend without the transformer
        # having to make its output turn with t.
        self.time_constants = [float(tau) for tau in time_constants]
        self.tokens = nn.Parameter(torch.zeros((1 + len(self.time_constants)) * len(self.names), width))
        self.blocks = nn.ModuleList(FieldBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(width)
        # Tensors of one shape share a head (with tensor_heads, each tensor has its own: width x its size parameters,
        # for small layouts); a fixed per-tensor scale gives each its own init variance.
        self.tensor_heads = tensor_heads
        self.groups: dict[str, list[int]] = {}
        for index, name in enumerate(self.names):
            key = _shape_key(self.shapes[name]) + (f"_{index}" if tensor_heads else "")
            self.groups.setdefault(key, []).append(index)
        self.heads = nn.ModuleDict({key: nn.Linear(width, self._numel(key)) for key in self.groups})
        for key, indices in self.groups.items():
            scale = torch.tensor([output_gain * init_std[self.names[i]] for i in indices]).view(1, -1, 1)
            self.register_buffer(f"scale_{key}", scale)
        for index, name in enumerate(self.names):
            self.register_buffer(f"theta0_{index}", theta0[name].detach().float().clone().reshape(self.shapes[name]))
        self.initialize_weights()

    @staticmethod
    def _numel(key: str) -> int:
        return int(torch.tensor([int(s) for s in key.split("_")[0].split("x")]).prod())

    def initialize_weights(self) -> None:
        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        # The encoder is pretrained (and, when frozen, not saved with the field): only the field's own layers
        # are initialised, else every load would give it new random weights.
        for child in self.children():
            if child is not self.encoder:
                child.apply(xavier)
        # Learned token (layer) embeddings: small and distinct, so every tensor starts with its own Delta.
        nn.init.normal_(self.tokens, std=0.02)
        nn.init.normal_(self.phase_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.phase_embed.mlp[2].weight, std=0.02)
        # Zero-out adaLN modulation: every block starts as the identity (DiT's adaLN-Zero).
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[-1].bias)
        # Hyperfan: the final LayerNorm gives unit-variance inputs, so weight variance 1/width makes
        # each head's output unit-variance; the per-tensor scale buffers then give the target std.
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=head.in_features**-0.5)
            nn.init.zeros_(head.bias)

    def theta0(self) -> dict[str, torch.Tensor]:
        """The fixed start weights theta_0 by name (no batch dimension)."""
        return {name: getattr(self, f"theta0_{i}") for i, name in enumerate(self.names)}

    def init_std(self) -> dict[str, float]:
        """The hyperfan target std of each generated tensor at init."""
        stds = {}
        for key, indices in self.groups.items():
            scale = getattr(self, f"scale_{key}").flatten()
            stds.update({self.names[i]: float(scale[j]) for j, i in enumerate(indices)})
        return stds

    def _displacements(
        self, image_tokens: torch.Tensor, photo_mask: torch.Tensor | None, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Psi(c, t) - theta_0 of each group of tensors, by its key: (N * M, n_key, *shape) for t (N, M) and the tokens
        (N, P, S, D) of P photos per subject."""
        phase = t.float().reshape(-1) / self.steps  # bounded phase t/T, never raw t; rows ordered (image, step)
        # A subject's photos are a set: the condition is the mean over its photos and cross-attention reads all their
        # tokens side by side, with nothing telling the photos apart, so their order cannot matter.
        image_cond = self.pool_proj(_mean_over_photos(image_tokens.mean(dim=2), photo_mask))  # (N, D), whatever M
        if self.spatial_rank > 0:
            spatial = self.spatial_up(self.spatial_down(image_tokens).flatten(2))  # (N, P, D)
            image_cond = image_cond + _mean_over_photos(spatial, photo_mask)
        cond = self.phase_embed(phase) + image_cond.repeat_interleave(t.shape[1], dim=0)  # (N * M, D)
        n, photos, per_photo = image_tokens.shape[:3]
        padding = None if photo_mask is None else ~photo_mask.repeat_interleave(per_photo, dim=1)  # (N, P * S)
        x = self.tokens.unsqueeze(0).expand(phase.shape[0], -1, -1)  # (N * M, W, D)
        for block in self.blocks:
            x = block(x, image_tokens.view(n, photos * per_photo, -1), cond, padding)
        x = self.final(x, cond)  # (N * M, J * W, D)
        coefficients = self._path_coefficients(phase)  # (J, N * M, 1, 1)
        count, out = len(self.names), {}
        for key, indices in self.groups.items():
            shape = self.shapes[self.names[indices[0]]]
            if len(coefficients) == 1:
                components = x[:, indices].unsqueeze(0)  # (1, N * M, n_key, D)
            else:
                components = torch.stack([x[:, [j * count + i for i in indices]] for j in range(len(coefficients))])
            generated = self.heads[key](components) * getattr(self, f"scale_{key}")  # (J, N * M, n_key, numel)
            displacement = (coefficients * generated).sum(dim=0)
            out[key] = displacement.view(*displacement.shape[:2], *shape)
        return out

    def _path_coefficients(self, phase: torch.Tensor) -> torch.Tensor:
        """b_j(t) of every component, (J, N * M, 1, 1) for the phases t/T (N * M,); each component's share of the
        init variance is 1/J, so Psi(c, T) starts as far from theta_0 whatever J."""
        coefficients = [phase]
        for tau in self.time_constants:
            ratio = self.steps / tau
            coefficients.append(-torch.expm1(-phase * ratio) / -math.expm1(-ratio))
        stacked = torch.stack(coefficients).view(len(coefficients), -1, 1, 1)
        return stacked if len(coefficients) == 1 else stacked / len(coefficients) ** 0.5

    def _by_name(self, by_shape: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # unbind, not one index per tensor: its backward is one stack, where per-tensor selects would each
        # write a zero-filled copy of their whole group (quadratic in the group size).
        out = {}
        for key, indices in self.groups.items():
            out.update({self.names[i]: tensor for i, tensor in zip(indices, by_shape[key].unbind(1))})
        return {name: out[name] for name in self.names}

    def forward(
        self,
        t: torch.Tensor | int | float,
        images: torch.Tensor | None = None,
        encoder_tokens: torch.Tensor | None = None,
        photo_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Psi(c, t) by name, from images or from a frozen encoder's tokens computed once.

        The condition of each of N subjects is one photo, `images` (N, 3, H, W) or `encoder_tokens` (N, S, D), or
        P photos, (N, P, 3, H, W) or (N, P, S, D), with `photo_mask` (N, P) true where a photo is present (None:
        all are). `t` is one step for all N, one per subject (N,), each (N, *shape); or M steps per subject (N, M),
        each (N, M, *shape), at the cost of one pass through the image side for all M.
        """
        if encoder_tokens is None:
            if images is None:
                raise ValueError("HyperField needs images or encoder_tokens")
            encoder_tokens = (
                self.encoder(images.flatten(0, 1)).unflatten(0, images.shape[:2])
                if images.ndim == 5
                else self.encoder(images)
            )
        if encoder_tokens.ndim == 3:
            encoder_tokens = encoder_tokens.unsqueeze(1)  # one photo per subject
        image_tokens = self.image_proj(encoder_tokens)  # (N, P, S, D)
        n = image_tokens.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=image_tokens.device)
        several = t.ndim == 2
        t = t if several else t.reshape(-1).expand(n).reshape(n, 1)  # (N, M)
        theta0 = self.theta0()
        psi = {}
        # Per shape group, not per tensor: a few ops whatever the number of LoRA layers.
        for key, displacement in self._displacements(image_tokens, photo_mask, t).items():
            start = torch.stack([theta0[self.names[i]] for i in self.groups[key]])  # (n_key, *shape)
            psi[key] = start + displacement
        by_name = self._by_name(psi)  # each (N * M, *shape)
        return {name: w.view(n, t.shape[1], *w.shape[1:]) for name, w in by_name.items()} if several else by_name
