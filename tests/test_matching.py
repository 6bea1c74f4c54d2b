"""Gradient matching reproduces a trajectory known in closed form; update rules and step losses."""

from __future__ import annotations

import pytest
import torch

from hyperfields.config import ObjectiveConfig
from hyperfields.field.model import HyperField
from hyperfields.objectives import gradient_matching_loss, step_loss
from hyperfields.trajectory import NonFiniteError, update_direction
from tests.conftest import QuadraticTask, tiny_vit_encoder


def colour_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    return colours.expand(n, 3, 16, 16) + 0.05 * torch.randn(n, 3, 16, 16, generator=g)


def train_on_quadratic(
    task: QuadraticTask, images: torch.Tensor, objective: ObjectiveConfig, iterations: int
) -> HyperField:
    torch.manual_seed(0)
    field = HyperField(
        tiny_vit_encoder(),
        task.layout(),
        task.initial_weights(),
        task.init_std(),
        steps=objective.steps,
        width=64,
        depth=2,
        heads=4,
    )
    optimiser = torch.optim.AdamW([p for p in field.parameters() if p.requires_grad], lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=iterations, pct_start=0.1)
    inputs = task.prepare(images, [""] * len(images))
    generator = torch.Generator().manual_seed(0)
    tokens = field.encoder(images)
    for _ in range(iterations):
        t = torch.randint(0, objective.steps - objective.rollout + 1, (len(images),), generator=generator)
        stats = gradient_matching_loss(field, task, {"encoder_tokens": tokens}, inputs, t, objective, generator)
        optimiser.zero_grad()
        stats.loss.backward()
        torch.nn.utils.clip_grad_norm_(field.parameters(), 1.0)
        optimiser.step()
        schedule.step()
    return field


# "position" bootstraps forward from theta_0, one step per update, so on this toy it is exact at T
# but still converging at small t after the same number of iterations.
@pytest.mark.slow
@pytest.mark.parametrize("match, along_t, at_T", [("difference", 0.05, 0.05), ("position", 0.2, 0.02)])
def test_matching_reproduces_the_closed_form_trajectory(quadratic_task, match, along_t, at_T):
    objective = ObjectiveConfig(steps=20, step_size=0.1, update="sgd", rollout=1, noise_draws=1, match=match)
    images = colour_images(4, seed=1)
    field = train_on_quadratic(quadratic_task, images, objective, iterations=1500)
    inputs = quadratic_task.prepare(images, [""] * 4)
    worst = 0.0
    with torch.no_grad():
        tokens = field.encoder(images)
        for t in range(objective.steps + 1):
            predicted = field(t=t, encoder_tokens=tokens)
            exact = quadratic_task.trajectory(inputs, objective.step_size, t)
            error = torch.cat([(predicted[n] - exact[n]).flatten(1) for n in exact], 1).norm(dim=1)
            size = torch.cat([exact[n].flatten(1) for n in exact], 1).norm(dim=1)
            worst = max(worst, (error / size).max().item())
    assert worst < along_t, f"worst relative error along t: {worst:.3f}"
    assert (error / size).max().item() < at_T, f"relative error at T: {(error / size).max().item():.3f}"


def test_update_rules():
    g = {"w": torch.tensor([[3.0, -4.0], [0.0, 2.0]])}
    assert torch.equal(update_direction(g, "sgd")["w"], g["w"])
    assert torch.equal(update_direction(g, "sign")["w"], torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
    normalised = update_direction(g, "normalized")["w"]
    assert torch.allclose(normalised.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("kind", ["relative_mse", "cosine_norm"])
def test_step_loss_is_zero_only_for_the_real_step_and_scale_free(kind):
    real = {"a": torch.randn(2, 5) * 1e-4, "b": torch.randn(2, 3) * 1e-4}
    assert step_loss(real, real, kind).item() < 1e-6
    # A predicted step of zero costs the same whatever the size of the real step.
    zero = {n: torch.zeros_like(v) for n, v in real.items()}
    small = step_loss(zero, real, kind)
    large = step_loss(zero, {n: v * 1e4 for n, v in real.items()}, kind)
    assert small.item() > 0.5 and abs(small.item() - large.item()) < 1e-2 * small.item()


def test_step_loss_survives_a_tensor_with_zero_real_step():
    real = {"lora_A": torch.zeros(2, 6), "lora_B": torch.randn(2, 6)}
    predicted = {"lora_A": torch.full((2, 6), 1e-3), "lora_B": real["lora_B"].clone()}
    assert 0 < step_loss(predicted, real, "relative_mse").item() < 1.0


def test_nonfinite_task_gradient_stops_with_an_error(quadratic_task):
    objective = ObjectiveConfig(steps=20, step_size=0.1, update="sgd")
    images = colour_images(2, seed=0)
    field = HyperField(
        tiny_vit_encoder(),
        quadratic_task.layout(),
        quadratic_task.initial_weights(),
        quadratic_task.init_std(),
        steps=20,
        width=32,
        depth=1,
        heads=4,
    )
    inputs = quadratic_task.prepare(images, ["", ""])
    inputs["layer.bias"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        gradient_matching_loss(
            field, quadratic_task, {"images": images}, inputs, torch.tensor([1, 2]), objective, torch.Generator()
        )


def test_end_weight_adds_the_task_loss_at_T_relative_to_theta0(quadratic_task):
    images = colour_images(3, seed=2)
    inputs = quadratic_task.prepare(images, [""] * 3)
    torch.manual_seed(0)
    field = HyperField(
        tiny_vit_encoder(),
        quadratic_task.layout(),
        quadratic_task.initial_weights(),
        quadratic_task.init_std(),
        steps=10,
        width=32,
        depth=1,
        heads=4,
    )
    t = torch.tensor([0, 4, 8])
    losses = {}
    for weight in (0.0, 2.0):
        objective = ObjectiveConfig(steps=10, step_size=0.1, update="sgd", noise_draws=1, end_weight=weight)
        losses[weight] = gradient_matching_loss(
            field, quadratic_task, {"images": images}, inputs, t, objective, torch.Generator().manual_seed(0)
        ).loss
    with torch.no_grad():
        at_T = field(t=10, images=images)
        theta0 = {name: w.expand(3, *w.shape) for name, w in quadratic_task.initial_weights().items()}
        relative = quadratic_task.loss(at_T, inputs, 1, None) / quadratic_task.loss(theta0, inputs, 1, None)
    torch.testing.assert_close(losses[2.0] - losses[0.0], 2.0 * relative.mean())


def test_momentum_updates_are_adams_bias_corrected_running_average_of_directions(quadratic_task):
    from hyperfields.trajectory import real_trajectory

    objective = ObjectiveConfig(steps=6, step_size=0.1, update="sgd", momentum=0.8, noise_draws=1)
    images = colour_images(3, seed=2)
    inputs = quadratic_task.prepare(images, [""] * 3)
    theta0 = {n: w.expand(3, *w.shape) for n, w in quadratic_task.initial_weights().items()}
    path, _ = real_trajectory(quadratic_task, theta0, inputs, objective, torch.Generator(), 6)
    theta, average = dict(theta0), {n: torch.zeros_like(w) for n, w in theta0.items()}
    for k in range(6):
        grad = {n: quadratic_task.h[n] * (theta[n] - inputs[n]) for n in theta}  # dL/dtheta of the quadratic
        average = {n: 0.8 * average[n] + 0.2 * grad[n] for n in theta}
        theta = {n: theta[n] - 0.1 * average[n] / (1 - 0.8 ** (k + 1)) for n in theta}
        for n in theta:
            torch.testing.assert_close(path[k][n], theta[n])
    # The path is smoother than plain steps: on this quadratic, with a large step size, plain updates overshoot
    # and alternate in sign where the averaged ones do not.
    objective.step_size, objective.momentum = 1.8, 0.0
    plain, _ = real_trajectory(quadratic_task, theta0, inputs, objective, torch.Generator(), 6)
    second, first = plain[1]["layer.bias"] - plain[0]["layer.bias"], plain[0]["layer.bias"] - theta0["layer.bias"]
    assert (second * first).lt(0).any()


def test_lag_draws_weigh_earlier_steps_by_powers_of_beta():
    from hyperfields.objectives import lag_draws

    t = torch.tensor([0, 3, 50] * 4000)
    lags = lag_draws(t, 0.8, torch.Generator().manual_seed(0))
    assert torch.all(lags <= t) and torch.all(lags[t == 0] == 0)
    far = lags[t == 50].float()
    assert abs(far.mean().item() - 0.8 / 0.2) < 0.15  # the geometric distribution's mean beta / (1 - beta)
    near = lags[t == 3]
    expected = torch.tensor([0.8**j for j in range(4)])
    observed = torch.bincount(near, minlength=4).float()
    torch.testing.assert_close(observed / observed.sum(), expected / expected.sum(), atol=0.02, rtol=0)


def _relative_errors(task, field, images, objective, path) -> list[float]:
    theta0 = {n: w.expand(len(images), *w.shape) for n, w in task.initial_weights().items()}
    errors = []
    with torch.no_grad():
        tokens = field.encoder(images)
        for t in range(1, objective.steps + 1):
            predicted = field(t=t, encoder_tokens=tokens)
            error = torch.cat([(predicted[n] - path[t - 1][n]).flatten(1) for n in predicted], 1).norm(dim=1)
            size = torch.cat([(path[t - 1][n] - theta0[n]).flatten(1) for n in predicted], 1).norm(dim=1)
            errors.append(float((error / size).mean()))
    return errors


@pytest.mark.slow
def test_matching_with_momentum_follows_the_momentum_path_not_the_plain_one(quadratic_task):
    # With momentum the target of each step is the direction at one of the field's own earlier points, drawn with
    # weight beta^lag: unbiased for the running average, so the field learns the momentum path itself.
    from hyperfields.trajectory import real_trajectory

    images = colour_images(4, seed=1)
    inputs = quadratic_task.prepare(images, [""] * 4)
    theta0 = {n: w.expand(4, *w.shape) for n, w in quadratic_task.initial_weights().items()}
    objective = ObjectiveConfig(
        steps=20, step_size=0.3, update="normalized", momentum=0.9, noise_draws=1, loss="relative_mse"
    )
    momentum_path, _ = real_trajectory(quadratic_task, theta0, inputs, objective, torch.Generator(), 20)
    plain = ObjectiveConfig(steps=20, step_size=0.3, update="normalized", noise_draws=1, loss="relative_mse")
    plain_path, _ = real_trajectory(quadratic_task, theta0, inputs, plain, torch.Generator(), 20)
    with_momentum = train_on_quadratic(quadratic_task, images, objective, iterations=600)
    without = train_on_quadratic(quadratic_task, images, plain, iterations=600)

    def error(field, path) -> float:
        return sum(_relative_errors(quadratic_task, field, images, objective, path)) / objective.steps

    assert error(with_momentum, momentum_path) < 0.2
    assert error(with_momentum, momentum_path) < 0.85 * error(with_momentum, plain_path)
    assert error(without, plain_path) < 0.85 * error(without, momentum_path)
