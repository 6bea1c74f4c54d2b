"""Shared fixtures: tiny in-memory encoders and a task with a closed-form trajectory."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Generated input sweeps: `ci` (the default) runs a fixed, small set of cases, the same on every run;
# HYPOTHESIS_PROFILE=deep searches far more cases with fresh randomness.
_SLOW_INPUTS = [HealthCheck.too_slow, HealthCheck.data_too_large]
# No explain phase in CI: it reruns a failing case ~100 times (minutes for a CLI case) to list lines it covered.
settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW_INPUTS,
    phases=[p for p in Phase if p is not Phase.explain],
)
settings.register_profile("deep", max_examples=1000, deadline=None, suppress_health_check=_SLOW_INPUTS, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from transformers import ViTConfig, ViTModel  # noqa: E402

from hyperfields.field.encoder import ImageEncoder  # noqa: E402
from hyperfields.models import ImageNorm  # noqa: E402


def tiny_vit_encoder(seed: int = 0) -> ImageEncoder:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
    )
    return ImageEncoder(
        ViTModel(config, add_pooling_layer=False), ImageNorm(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    )


class QuadraticTask:
    """L(theta; c) = 1/2 sum h (theta - m(c))^2 with m(c) a fixed linear map of the image's mean colour.

    With SGD the trajectory is closed-form: theta_k = m + (1 - eta h)^k (theta_0 - m).
    """

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.shapes = {"layer.weight": (3, 4), "layer.bias": (5,)}
        self.h = {name: 0.5 + torch.rand(shape, generator=g) for name, shape in self.shapes.items()}
        self.mix = {name: torch.randn(*shape, 3, generator=g) for name, shape in self.shapes.items()}
        self.theta0 = {name: 0.1 * torch.randn(shape, generator=g) for name, shape in self.shapes.items()}

    def layout(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return dict(self.theta0)

    def init_std(self) -> dict[str, float]:
        return {name: 0.1 for name in self.shapes}

    def prepare(self, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        colour = images.mean(dim=(2, 3))  # (N, 3)
        return {name: torch.einsum("...c,nc->n...", self.mix[name], colour) for name in self.shapes}

    def loss(self, weights, inputs, draws, generator) -> torch.Tensor:
        return sum(0.5 * (self.h[n] * (weights[n] - inputs[n]).pow(2)).flatten(1).sum(1) for n in self.shapes)

    def trajectory(self, inputs, eta: float, t: int) -> dict[str, torch.Tensor]:
        return {n: inputs[n] + (1 - eta * self.h[n]) ** t * (self.theta0[n] - inputs[n]) for n in self.shapes}


@pytest.fixture
def quadratic_task() -> QuadraticTask:
    return QuadraticTask()


@pytest.fixture
def one_thread():
    """torch on one thread for the test: a multithreaded kernel sums in an order that depends on the batch it is
    given, so two ways of computing the same update agree to the last bit only on one thread; Adam's first steps
    turn last-bit differences into 1e-5 ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A few seconds of training on the tiny models: the CLI tests' shared overrides.
FAST = [
    *("--set", "train.batch_size=2"),
    *("--set", "objective.steps=6"),
    *("--set", "train.heldout=1"),
    *("--set", "train.eval_draws=2"),
    *("--set", "field.width=32"),
    *("--set", "field.depth=1"),
    *("--set", "train.warmup_steps=1"),
]


def clean_exit(result) -> bool:
    """True when a CliRunner command ended through its own exit code, not an uncaught exception.

    CliRunner swallows exceptions, so a traceback never shows in `result.output`; outside it, one would.
    """
    return result.exception is None or isinstance(result.exception, SystemExit)
