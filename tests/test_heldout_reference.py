"""The held-out reference is computed once per run folder, split across processes, and scores R as before."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.config import InrConfig, ObjectiveConfig, load_config
from hyperfields.data import scan_image_folder
from hyperfields.dataset import ImageCaptionDataset, split_heldout
from hyperfields.evaluation import heldout_reference
from hyperfields.field.io import load_field
from hyperfields.references import REFERENCE_NAME, reference_key, shared_reference
from hyperfields.streams import stream
from hyperfields.tasks import build_task
from hyperfields.tasks.inr import InrTask
from hyperfields.trajectory import real_trajectory
from tests.conftest import FAST, QuadraticTask
from tests.test_matching import colour_images

SGD = ObjectiveConfig(steps=5, step_size=0.1, update="sgd", noise_draws=1)


class CountingTask(QuadraticTask):
    """The quadratic task, counting the rows its loss is evaluated on (a task gradient is one such evaluation)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0
        self.lock = threading.Lock()

    def loss(self, weights, inputs, draws, generator) -> torch.Tensor:
        with self.lock:
            self.rows += next(iter(weights.values())).shape[0]
        return super().loss(weights, inputs, draws, generator)


def key(count: int, processes: int, objective: ObjectiveConfig = SGD) -> dict:
    return reference_key([f"photo-{i}" for i in range(count)], {"kind": "test"}, objective, 1, 0, processes, "cpu")


def run_processes(store: Path, task, images: torch.Tensor, processes: int, objective=SGD, notes=None):
    """`shared_reference` on `processes` simulated processes (threads meeting at a real barrier): each one's
    result, and which photos each computed."""
    barrier = threading.Barrier(processes, timeout=60)
    computed: dict[int, list[int]] = {}

    def process(p: int):
        def compute(rows: list[int]):
            computed[p] = rows
            mine = images[rows]
            return heldout_reference(task, mine, task.prepare(mine, [""] * len(rows)), objective, 1, 0, group=p)

        note = notes.append if notes is not None else print
        return shared_reference(store, key(len(images), processes, objective), p, compute, barrier.wait, note)

    with ThreadPoolExecutor(processes) as pool:
        results = [future.result() for future in [pool.submit(process, p) for p in range(processes)]]
    return results, computed


def one_process(store: Path, task, images: torch.Tensor, objective=SGD, notes=None):
    """`shared_reference` run by a single process: (losses of theta_0 and theta_T, whether they were read)."""
    return run_processes(store, task, images, 1, objective, notes)[0][0]


def stored_key(store: Path) -> dict:
    with safe_open(str(store), framework="pt") as entry:
        return json.loads(entry.metadata()["key"])


def test_each_process_computes_its_photos_and_the_store_holds_every_one(tmp_path):
    task, images, store = QuadraticTask(), colour_images(7, seed=0), tmp_path / REFERENCE_NAME
    results, computed = run_processes(store, task, images, 3)
    assert computed == {0: [0, 3, 6], 1: [1, 4], 2: [2, 5]}
    # Every process gets every photo's losses, in photo order, freshly computed.
    (theta0_losses, real_losses), reused = results[0]
    assert not reused
    for (other_theta0, other_real), other_reused in results[1:]:
        assert torch.equal(other_theta0, theta0_losses) and torch.equal(other_real, real_losses) and not other_reused
    # The store holds each photo's theta_T at its place: the closed-form trajectory of that photo.
    stored = load_file(str(store))
    inputs = task.prepare(images, [""] * 7)
    expected = task.trajectory(inputs, SGD.step_size, SGD.steps)
    for name, w in expected.items():
        torch.testing.assert_close(stored[f"theta_T.{name}"], w)
    theta0 = {name: w.expand(7, *w.shape) for name, w in task.initial_weights().items()}
    torch.testing.assert_close(theta0_losses, task.loss(theta0, inputs, 1, None))
    torch.testing.assert_close(real_losses, task.loss(expected, inputs, 1, None))
    assert sorted(p.name for p in tmp_path.iterdir()) == [REFERENCE_NAME], "the parts are removed once merged"


def test_more_processes_than_photos(tmp_path):
    results, computed = run_processes(tmp_path / REFERENCE_NAME, QuadraticTask(), colour_images(2, 1), 3)
    assert computed == {0: [0], 1: [1]}
    assert all(losses[0].shape == (2,) for losses, _ in results)


def test_a_second_evaluation_reads_the_store_and_a_changed_objective_recomputes(tmp_path):
    task, images, store = CountingTask(), colour_images(3, seed=2), tmp_path / REFERENCE_NAME
    notes: list[str] = []
    (first, _), reused = one_process(store, task, images, notes=notes)
    assert not reused and task.rows > 0
    before, written = store.stat().st_mtime_ns, store.read_bytes()
    task.rows = 0
    (again, _), reused = one_process(store, task, images, notes=notes)
    assert reused and task.rows == 0, "no task gradient when the store holds the reference"
    assert torch.equal(again, first)
    assert store.stat().st_mtime_ns == before and store.read_bytes() == written
    assert not [note for note in notes if note.startswith("note:")]
    longer = ObjectiveConfig(steps=7, step_size=0.1, update="sgd", noise_draws=1)
    _, reused = one_process(store, task, images, longer, notes)
    assert not reused and task.rows > 0
    assert any("other settings (objective)" in note for note in notes), notes
    assert stored_key(store)["objective"]["steps"] == 7 and load_file(str(store))["theta_T.layer.bias"].shape == (3, 5)


def test_a_damaged_store_is_computed_again(tmp_path):
    store, notes = tmp_path / REFERENCE_NAME, []
    store.write_bytes(b"not safetensors")
    _, reused = one_process(store, QuadraticTask(), colour_images(2, 3), notes=notes)
    assert not reused and any("unreadable" in note for note in notes), notes
    assert load_file(str(store))["loss_real"].shape == (2,)


def test_one_process_stores_what_one_batch_of_every_photo_scores(tmp_path):
    # The reference as it was computed before it was stored or split: real optimisation of all held-out photos in
    # one batch on the "reference" stream (sampled pixels: the stream decides theta_T), scored on every pixel.
    task = InrTask(InrConfig(pixels=20), resolution=16)
    images = colour_images(3, seed=4) + 0.2 * torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    objective = ObjectiveConfig(steps=4, step_size=0.05, noise_draws=2)
    inputs = task.prepare(images, [""] * 3)
    theta0 = {name: w.unsqueeze(0).expand(3, *w.shape) for name, w in task.initial_weights().items()}
    trajectory, _ = real_trajectory(task, theta0, inputs, objective, stream(0, "reference"), objective.steps)
    (theta0_losses, real_losses), _ = one_process(tmp_path / REFERENCE_NAME, task, images, objective)
    assert torch.equal(theta0_losses, task.reconstruction_error(theta0, inputs))
    assert torch.equal(real_losses, task.reconstruction_error(trajectory[-1], inputs))
    stored = load_file(str(tmp_path / REFERENCE_NAME))
    for name, w in trajectory[-1].items():
        assert torch.equal(stored[f"theta_T.{name}"], w), name


def recovered_as_before(config, data: Path, field) -> float:
    """Held-out R of `field` computed as training computed it before the reference was stored: every held-out
    photo in one batch, real optimisation on the "reference" stream, all three scored on the "evaluation" stream."""
    records = scan_image_folder(data, config.data.caption_template, config.data.token, config.model.resolution)
    _, held = split_heldout(records.records, config.train.heldout, config.train.seed)
    heldout = ImageCaptionDataset(held, config.model.resolution)
    task, seed, draws = (
        build_task(config, torch.device("cpu"), torch.float32),
        config.train.seed + 99,
        config.train.eval_draws,
    )
    images = torch.stack([heldout[i]["pixel_values"] for i in range(len(heldout))])
    inputs = task.prepare(images, [heldout[i]["caption"] for i in range(len(heldout))])
    n = images.shape[0]
    theta0 = {name: w.unsqueeze(0).expand(n, *w.shape) for name, w in task.initial_weights().items()}
    trajectory, _ = real_trajectory(
        task, theta0, inputs, config.objective, stream(seed, "reference"), config.objective.steps
    )
    with torch.no_grad():
        predicted = field(t=torch.full((n,), float(config.objective.steps)), images=images)
        theta0_loss, real_loss, field_loss = (
            float(task.loss(weights, inputs, draws, stream(seed, "evaluation")).mean())
            for weights in (theta0, trajectory[-1], predicted)
        )
    return (theta0_loss - field_loss) / (theta0_loss - real_loss)


def test_training_scores_r_as_before_and_an_extended_run_reuses_the_reference(tmp_path, one_thread):
    data, run = tmp_path / "photos", tmp_path / "run"
    data.mkdir()
    rng = np.random.default_rng(5)
    for i in range(8):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(data / f"p{i}.png")
    overrides = [*FAST, "--set", "train.heldout=2"]
    train = ["train", "--config", "configs/tiny.yaml", "--data", str(data), "--output", str(run), *overrides]
    result = CliRunner().invoke(app, [*train, "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    assert "held-out: real optimisation of 2 images" in result.output
    field, record = load_field(run / "field")
    config = load_config("configs/tiny.yaml", [value for value in overrides if value != "--set"])
    assert record.heldout_recovered == recovered_as_before(config, data, field.eval())

    store = run / REFERENCE_NAME
    before, written = store.stat().st_mtime_ns, store.read_bytes()
    result = CliRunner().invoke(app, [*train, "--max-steps", "3", "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert "real optimisation" not in result.output and f"read from '{store}'" in result.output
    assert store.stat().st_mtime_ns == before and store.read_bytes() == written
