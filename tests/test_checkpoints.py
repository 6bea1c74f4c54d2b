"""The optimiser, schedule and random states of a checkpoint: written without pickle, restored exactly."""

from __future__ import annotations

import random

import numpy as np
import torch

from hyperfields.training.build import warmup_cosine
from hyperfields.training.state_io import (
    load_optimizer,
    load_random_states,
    load_schedule,
    save_optimizer,
    save_random_states,
    save_schedule,
)


def adamw_run(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """A small model with the optimiser and schedule `build_run` gives a field."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, 10))


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_a_restored_optimizer_and_schedule_continue_exactly_as_the_uninterrupted_ones(tmp_path):
    model, optimizer, schedule = adamw_run()
    train(model, optimizer, schedule, range(3))
    save_optimizer(optimizer, tmp_path)
    save_schedule(schedule, tmp_path)
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    uninterrupted = train(model, optimizer, schedule, range(3, 8))

    resumed_model, resumed_optimizer, resumed_schedule = adamw_run(seed=1)
    resumed_model.load_state_dict(weights)
    load_optimizer(resumed_optimizer, tmp_path)
    load_schedule(resumed_schedule, tmp_path)
    assert resumed_optimizer.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert resumed_schedule.last_epoch == 3
    assert train(resumed_model, resumed_optimizer, resumed_schedule, range(3, 8)) == uninterrupted
    for name, value in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name


def draws() -> tuple[float, float, float, float, torch.Tensor]:
    return random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(), torch.rand(3)


def test_restored_random_states_repeat_the_same_draws(tmp_path):
    random.gauss(0, 1)  # both Gaussian samplers hold a cached second value: part of the state
    np.random.standard_normal()
    save_random_states(tmp_path, process=3)
    expected = draws()
    draws()
    load_random_states(tmp_path, process=3)
    python_uniform, python_gauss, numpy_uniform, numpy_gauss, torch_uniform = draws()
    assert (python_uniform, python_gauss, numpy_uniform, numpy_gauss) == expected[:4]
    assert torch.equal(torch_uniform, expected[4])
    assert (tmp_path / "random_states_3.safetensors").is_file()
