"""Random streams: the training draws are independent across purposes, and compared losses share their draws."""

from __future__ import annotations

import pytest
import torch

from hyperfields.config import ObjectiveConfig
from hyperfields.field.model import HyperField
from hyperfields.objectives import direct_loss, end_loss, hinge_loss
from hyperfields.streams import stream, stream_seed, training_draws
from tests.conftest import QuadraticTask, tiny_vit_encoder
from tests.test_matching import colour_images


def test_every_training_image_meets_many_steps_t():
    # 30 images, T = 50, 4 per step for 1000 steps: ~133 draws per image over 50 values of t. Independent draws
    # meet almost every t; draws from one stream seeded twice tie each image to a handful of t.
    images, last_t = 30, 49
    seen: dict[int, set[int]] = {i: set() for i in range(images)}
    for step in range(1000):
        picks, t = training_draws(0, step, 0, 0, images, 4, last_t)
        for image, value in zip(picks, t.tolist()):
            seen[image].add(value)
    fewest = min(len(values) for values in seen.values())
    assert fewest >= 40, f"an image met only {fewest} of {last_t + 1} steps t"


def test_pairs_are_spread_as_independent_draws_would_be():
    # Over the (image, t) grid, counts follow a multinomial: a chi-square far above its degrees of freedom means
    # the image fixes t (or the reverse).
    images, last_t, steps = 8, 9, 2000
    counts = torch.zeros(images, last_t + 1)
    for step in range(steps):
        picks, t = training_draws(3, step, 1, 2, images, 4, last_t)
        for image, value in zip(picks, t.tolist()):
            counts[image, value] += 1
    expected = counts.sum() / counts.numel()
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 2 * counts.numel(), chi_square


def draws_before_shards(seed, step, process, micro, images, batch, last_t):
    """`training_draws` as it was before shard sampling existed: global sampling must still draw exactly this."""
    picks = torch.randint(0, images, (batch,), generator=stream(seed, "picks", step, process, micro)).tolist()
    t = torch.randint(0, last_t + 1, (batch,), generator=stream(seed, "steps", step, process, micro))
    return picks, t


def test_global_sampling_draws_what_it_always_drew():
    # A changed draw would change every trained field and break resuming a run started before the change.
    for seed, step, process, micro in ((0, 0, 0, 0), (7, 123, 3, 1), (2**40, 99_999, 15, 7)):
        expected_picks, expected_t = draws_before_shards(seed, step, process, micro, 100_000, 8, 49)
        picks, t = training_draws(seed, step, process, micro, 100_000, 8, 49)
        assert picks == expected_picks and torch.equal(t, expected_t)
    assert training_draws(0, 0, 0, 0, 10, 6, 9)[0] == [8, 6, 1, 5, 9, 1]  # recorded from the implementation above


def test_shard_sampling_keeps_each_process_in_its_shard_and_covers_the_dataset():
    images = 11  # not a multiple of the process counts: shards of unequal size
    for processes in (1, 2, 3, 4):
        drawn: set[int] = set()
        for process in range(processes):
            mine = set()
            for step in range(200):
                picks, t = training_draws(5, step, process, 0, images, 4, 9, shards=processes)
                mine.update(picks)
                assert t.shape == (4,)
            assert all(i % processes == process for i in mine), (processes, process, sorted(mine))
            assert mine == set(range(process, images, processes))  # every image of the shard is drawn
            drawn |= mine
        assert drawn == set(range(images))


def test_one_shard_is_global_sampling():
    assert training_draws(3, 4, 0, 1, 50, 8, 9, shards=1)[0] == draws_before_shards(3, 4, 0, 1, 50, 8, 9)[0]


def test_a_process_without_a_shard_image_is_an_error():
    with pytest.raises(ValueError, match="holds none"):
        training_draws(0, 0, 3, 0, 3, 2, 9, shards=4)


def test_streams_depend_on_every_number_and_on_nothing_else():
    base = stream_seed(0, "noise", step=5, process=1, index=2)
    assert base == stream_seed(0, "noise", step=5, process=1, index=2)  # a resumed run draws the same
    others = {
        stream_seed(1, "noise", 5, 1, 2),
        stream_seed(0, "steps", 5, 1, 2),
        stream_seed(0, "noise", 6, 1, 2),
        stream_seed(0, "noise", 5, 0, 2),
        stream_seed(0, "noise", 5, 1, 3),
        stream_seed(0, "noise", 2, 1, 5),
    }
    assert base not in others and len(others) == 6
    assert torch.equal(torch.rand(5, generator=stream(0, "picks")), torch.rand(5, generator=stream(0, "picks")))


class NoisyQuadraticTask(QuadraticTask):
    """The quadratic loss times a factor drawn per sample over four orders of magnitude, as a diffusion loss varies
    with its timestep."""

    def loss(self, weights, inputs, draws, generator) -> torch.Tensor:
        clean = super().loss(weights, inputs, draws, generator)
        factor = torch.exp(3 * torch.randn(draws, clean.shape[0], generator=generator)).mean(dim=0)
        return clean * factor


def test_end_loss_scores_theta0_and_psi_on_the_same_draws():
    task = NoisyQuadraticTask()
    images = colour_images(3, seed=0)
    inputs = task.prepare(images, [""] * 3)
    objective = ObjectiveConfig(steps=10, noise_draws=1)
    theta0 = {name: w.expand(3, *w.shape) for name, w in task.initial_weights().items()}
    assert end_loss(task, theta0, inputs, objective, torch.Generator().manual_seed(0)).item() == 1.0
    # With one draw the noise factor cancels: the ratio is the clean losses' ratio, whatever the draws.
    moved = {name: w + 0.3 for name, w in theta0.items()}
    clean = QuadraticTask.loss(task, moved, inputs, 1, None) / QuadraticTask.loss(task, theta0, inputs, 1, None)
    for seed in range(3):
        torch.testing.assert_close(
            end_loss(task, moved, inputs, objective, torch.Generator().manual_seed(seed)), clean.mean()
        )


def test_direct_objective_trains_psi_at_T_end_to_end():
    task = QuadraticTask()
    images = colour_images(4, seed=1)
    inputs = task.prepare(images, [""] * 4)
    objective = ObjectiveConfig(kind="direct", steps=10, noise_draws=1)
    torch.manual_seed(0)
    field = HyperField(
        tiny_vit_encoder(), task.layout(), task.initial_weights(), task.init_std(), steps=10, width=32, depth=1, heads=4
    )
    tokens = field.encoder(images).detach()
    with torch.no_grad():
        at_T = task.loss(field(t=10, encoder_tokens=tokens), inputs, 1, None).mean()
    loss = direct_loss(field, task, {"encoder_tokens": tokens}, inputs, objective, torch.Generator())
    torch.testing.assert_close(loss.detach(), at_T)
    optimiser = torch.optim.Adam([p for p in field.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(300):
        loss = direct_loss(field, task, {"encoder_tokens": tokens}, inputs, objective, torch.Generator())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.05 * at_T.item()


def test_hinge_is_zero_when_the_field_step_is_as_good_as_the_real_one():
    task = NoisyQuadraticTask()
    inputs = task.prepare(colour_images(3, seed=0), [""] * 3)
    objective = ObjectiveConfig(steps=10, noise_draws=1)
    target = {name: w.expand(3, *w.shape) + 0.1 for name, w in task.initial_weights().items()}
    assert hinge_loss(task, target, target, inputs, objective, torch.Generator().manual_seed(0)).item() == 0.0
    # Worse than the real update: the excess in log loss, whatever the noise factor of the draws.
    worse = {name: inputs[name] + 2 * (w - inputs[name]) for name, w in target.items()}
    clean = QuadraticTask.loss(task, worse, inputs, 1, None) / QuadraticTask.loss(task, target, inputs, 1, None)
    torch.testing.assert_close(
        hinge_loss(task, worse, target, inputs, objective, torch.Generator().manual_seed(1)), clean.log().mean()
    )
