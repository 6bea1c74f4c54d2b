"""The image-fitting task: batched per-sample MLPs, a real trajectory that fits, PSNR in the held-out report."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hyperfields.config import InrConfig, ObjectiveConfig
from hyperfields.evaluation import HeldoutReport, heldout_reference, psnr_db
from hyperfields.tasks.base import ImageFittingTask
from hyperfields.tasks.inr import InrTask
from hyperfields.trajectory import real_trajectory


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)


def random_weights(task: InrTask, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, *shape, generator=g) * 0.3 for name, shape in task.layout().items()}


def looped_render(task: InrTask, weights: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """The reference: one sample at a time through torch's own linear layers."""
    rows = []
    for i in range(next(iter(weights.values())).shape[0]):
        h = features[i] if features.ndim == 3 else features
        for layer in range(task.config.layers):
            h = F.relu(F.linear(h, weights[f"hidden{layer}.weight"][i], weights[f"hidden{layer}.bias"][i]))
        rows.append(F.linear(h, weights["output.weight"][i], weights["output.bias"][i]))
    return torch.stack(rows)


def test_batched_forward_equals_a_per_sample_loop():
    task = InrTask(InrConfig(hidden=8, layers=2, frequencies=4), resolution=6)
    weights = random_weights(task, 3, seed=0)
    assert torch.allclose(task.render(weights), looped_render(task, weights, task.features), atol=1e-5)
    # Per-sample pixel subsets, as the sampled training loss uses them.
    subset = task.features[torch.randint(0, 36, (3, 10), generator=torch.Generator().manual_seed(1))]
    assert torch.allclose(task.render(weights, subset), looped_render(task, weights, subset), atol=1e-5)


def test_layout_init_and_theta0_are_the_classical_mlp():
    task = InrTask(InrConfig(hidden=16, layers=2, frequencies=8), resolution=8)
    layout = task.layout()
    assert layout == {
        "hidden0.weight": (16, 16),
        "hidden0.bias": (16,),
        "hidden1.weight": (16, 16),
        "hidden1.bias": (16,),
        "output.weight": (3, 16),
        "output.bias": (3,),
    }
    theta0 = task.initial_weights()
    again = InrTask(InrConfig(hidden=16, layers=2, frequencies=8), resolution=8).initial_weights()
    assert all(torch.equal(theta0[name], again[name]) for name in layout), "theta_0 is fixed by the seed"
    for name, w in theta0.items():
        assert w.abs().max() <= 16**-0.5  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert abs(task.init_std()[name] - (3 * 16) ** -0.5) < 1e-9
    assert isinstance(task, ImageFittingTask)


def test_loss_decreases_along_a_real_trajectory():
    task = InrTask(InrConfig(), resolution=16)
    images = smooth_images(4, 16, seed=0)
    inputs = task.prepare(images, [""] * 4)
    theta0 = {name: w.expand(4, *w.shape) for name, w in task.initial_weights().items()}
    objective = ObjectiveConfig(steps=60, step_size=0.3, update="sgd", noise_draws=1)
    trajectory, start = real_trajectory(task, theta0, inputs, objective, torch.Generator().manual_seed(0), 60)
    losses = torch.stack([start] + [task.reconstruction_error(w, inputs) for w in trajectory[9::10]])  # (7, N)
    assert (losses[1:] < losses[:-1]).all(), losses
    assert (psnr_db(losses[-1]) > psnr_db(losses[0]) + 3).all()


def test_sampled_pixels_average_to_the_full_loss_and_follow_the_generator():
    task = InrTask(InrConfig(pixels=64), resolution=16)
    images = smooth_images(2, 16, seed=1)
    inputs = task.prepare(images, ["", ""])
    weights = random_weights(task, 2, seed=2)
    draw = lambda seed, draws: task.loss(weights, inputs, draws, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(0, 2), draw(0, 2)) and not torch.equal(draw(0, 2), draw(1, 2))
    full = task.reconstruction_error(weights, inputs)
    assert torch.allclose(draw(3, 200), full, rtol=0.05)


def test_heldout_reference_reports_psnr():
    task = InrTask(InrConfig(), resolution=16)
    images = smooth_images(3, 16, seed=2)
    objective = ObjectiveConfig(steps=60, step_size=0.3, update="sgd", noise_draws=1)
    reference = heldout_reference(task, images, task.prepare(images, [""] * 3), objective, draws=1, seed=0)
    report = HeldoutReport.from_losses(task, reference.loss_theta0, reference.loss_real, reference.loss_real)
    assert report.psnr_real > report.psnr_theta0 + 3
    assert abs(report.psnr_theta0 - float(psnr_db(reference.loss_theta0.mean()))) < 3  # mean of PSNRs vs PSNR of mean


def test_train_command_fits_crops_with_the_inr_config(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from hyperfields.cli.main import app
    from hyperfields.dataset import load_image
    from hyperfields.field.io import load_field

    for i, image in enumerate(smooth_images(6, 16, seed=4)):
        pixels = ((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(tmp_path / f"crop{i}.png")
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            "configs/inr.yaml",
            "--data",
            str(tmp_path),
            "--output",
            str(tmp_path / "run"),
            "--max-steps",
            "120",
            "--set",
            "train.heldout=1",
            "--set",
            "objective.steps=10",
            "--set",
            "train.warmup_steps=1",
            "--set",
            "train.learning_rate=0.003",
            "--set",
            "train.batch_size=4",
            "--set",
            "field.width=32",
            "--set",
            "field.depth=1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "held-out PSNR" in result.output
    field, record = load_field(tmp_path / "run" / "field")
    task = InrTask(InrConfig(**record.config["inr"]), 16)
    assert record.task == "inr" and set(record.layout) == set(task.layout())
    images = torch.stack([load_image(path, 16) for path in sorted(tmp_path.glob("crop*.png"))])
    inputs = task.prepare(images, [""] * len(images))
    with torch.no_grad():
        at_0, at_T = (task.reconstruction_error(field(t=t, images=images), inputs) for t in (0, 10))
    theta0 = {name: w.expand(len(images), *w.shape) for name, w in task.initial_weights().items()}
    assert torch.allclose(at_0, task.reconstruction_error(theta0, inputs)), "Psi(c, 0) is theta_0"
    gain = psnr_db(at_T) - psnr_db(at_0)  # dB per crop, 5 trained and 1 held out
    assert (gain > 5).sum() >= 4, f"120 steps fit most training crops by more than 5 dB at T, got {gain.tolist()}"
