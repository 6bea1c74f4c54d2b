"""The image-fitting task: a coordinate MLP on Fourier features fits one image; its weights are the trajectory."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from hyperfields.config import InrConfig
from hyperfields.errors import UserError
from hyperfields.tasks.base import Weights


@dataclass
class InrInputs:
    """What the loss needs from a batch of conditions: the colours to fit."""

    pixels: torch.Tensor  # (N, P, 3) in [-1, 1], pixels in row-major order


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # One matmul for every sample's own layer: x (P, in) shared or (N, P, in), weight (N, out, in).
    return torch.matmul(x, weight.transpose(1, 2)) + bias.unsqueeze(1)  # (N, P, out)


class InrTask:
    """Fit an R x R image with a ReLU MLP from (x, y) to RGB; theta_0 = seeded classical (PyTorch Linear) init."""

    def __init__(self, config: InrConfig, resolution: int, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.resolution = resolution
        generator = torch.Generator().manual_seed(config.init_seed)
        self.projection = torch.randn(2, config.frequencies, generator=generator) * config.frequency_scale  # (2, F)
        self.features = self.pixel_features(resolution, resolution).to(device)  # (P, 2F)
        widths = [2 * config.frequencies] + [config.hidden] * config.layers + [3]
        names = [f"hidden{i}" for i in range(config.layers)] + ["output"]
        self._layout: dict[str, tuple[int, ...]] = {}
        self._fan_in: dict[str, int] = {}
        for name, fan_in, fan_out in zip(names, widths[:-1], widths[1:]):
            self._layout[f"{name}.weight"], self._fan_in[f"{name}.weight"] = (fan_out, fan_in), fan_in
            self._layout[f"{name}.bias"], self._fan_in[f"{name}.bias"] = (fan_out,), fan_in
        # torch.nn.Linear's own init, U(+-1/sqrt(fan_in)) for weight and bias, drawn after the projection.
        self._theta0 = {
            name: (torch.rand(shape, generator=generator) * 2 - 1) * self._fan_in[name] ** -0.5
            for name, shape in self._layout.items()
        }

    @property
    def device(self) -> torch.device:
        return self.features.device

    def record(self) -> dict[str, Any]:
        """The coordinate MLP's settings, which rendering its predicted weights needs."""
        return {"inr": dataclasses.asdict(self.config)}

    def layout(self) -> dict[str, tuple[int, ...]]:
        return dict(self._layout)

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return {name: w.clone() for name, w in self._theta0.items()}

    def init_std(self) -> dict[str, float]:
        # Hyperfan: the std of the classical init, U(+-1/sqrt(fan_in)) has std 1/sqrt(3 fan_in).
        return {name: (3 * fan_in) ** -0.5 for name, fan_in in self._fan_in.items()}

    def prepare(self, images: torch.Tensor, captions: list[str]) -> InrInputs:
        if images.shape[-2:] != (self.resolution, self.resolution):
            raise UserError(
                f"inr task: images are {tuple(images.shape[-2:])} pixels, expected model.resolution={self.resolution}"
            )
        pixels = images.to(self.device).float().permute(0, 2, 3, 1).reshape(images.shape[0], -1, 3)
        return InrInputs(pixels=pixels)

    def pixel_features(self, height: int, width: int) -> torch.Tensor:
        """Fourier features (P, 2F) of a height x width grid over the image, pixels in row-major order.

        The grid spans [-1, 1] on both axes at any size, so one MLP renders its image at any resolution.
        """
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        coords = torch.stack([xs, ys], dim=-1).reshape(-1, 2)  # (P, 2)
        # Coordinates span 2, so pi * (coords @ projection) runs through `projection` cycles across the image.
        angles = math.pi * coords @ self.projection
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    def image(self, weights: Weights, height: int, width: int) -> torch.Tensor:
        """Each sample's image (N, 3, height, width), colours in [-1, 1]."""
        colours = self.render(weights, self.pixel_features(height, width).to(self.device))  # (N, P, 3)
        return colours.transpose(1, 2).reshape(colours.shape[0], 3, height, width)

    def render(self, weights: Weights, features: torch.Tensor | None = None) -> torch.Tensor:
        """Colours (N, P, 3) of each sample's MLP, at every pixel or at the given features ((P, 2F) or (N, P, 2F))."""
        h = self.features if features is None else features
        for i in range(self.config.layers):
            h = torch.relu(_linear(h, weights[f"hidden{i}.weight"], weights[f"hidden{i}.bias"]))
        return _linear(h, weights["output.weight"], weights["output.bias"])

    def reconstruction_error(self, weights: Weights, inputs: InrInputs) -> torch.Tensor:
        """Per-sample MSE (N,) over every pixel, colours in [-1, 1]: deterministic, the basis of PSNR."""
        return (self.render(weights) - inputs.pixels).pow(2).mean(dim=(1, 2))

    def loss(self, weights: Weights, inputs: InrInputs, draws: int, generator: torch.Generator) -> torch.Tensor:
        n, p = inputs.pixels.shape[:2]
        sampled = self.config.pixels
        if not sampled or sampled >= p:
            return self.reconstruction_error(weights, inputs)
        # Each draw fits its own random subset of pixels; rows ordered (sample, draw).
        scores = torch.rand(n * draws, p, generator=generator, device=generator.device)
        index = scores.argsort(dim=1)[:, :sampled].to(self.device)  # (N*D, S)
        target = inputs.pixels.repeat_interleave(draws, dim=0).gather(1, index.unsqueeze(-1).expand(-1, -1, 3))
        repeated = {name: w.repeat_interleave(draws, dim=0) for name, w in weights.items()}
        per_row = (self.render(repeated, self.features[index]) - target).pow(2).mean(dim=(1, 2))
        return per_row.view(n, draws).mean(dim=1)  # (N,)
