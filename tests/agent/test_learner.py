"""Local learning honours the strategy's options: FedProx's proximal term, client-side clipping."""

from __future__ import annotations

import numpy as np
import pytest

from agent import learner
from hw.synthetic import SyntheticModel, synthetic_data
from protocol import schemas

SHAPES = {"w": (10,), "b": (3,)}


def run(options: dict, epochs: int = 3):
    model = SyntheticModel(SHAPES, seed=1)
    base = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    task = schemas.Task("train", "d", schemas.TrainConfig(epochs=epochs, lr=0.3, options=options), "f32")
    outcome = learner.train(model, base, synthetic_data(64), task, np.random.default_rng(0))
    delta, metrics = schemas.decode_update(outcome.attachment)
    return np.concatenate([v.ravel() for v in delta.values()]), metrics


def test_the_proximal_term_keeps_the_update_closer_to_the_base():
    free, _ = run({})
    anchored, _ = run({"proximal-mu": 1.0})
    assert np.linalg.norm(anchored) < 0.8 * np.linalg.norm(free)


def test_clipping_bounds_the_update_norm_and_reports_it():
    free, metrics = run({})
    assert "norm_bit" not in metrics
    clipped, metrics = run({"clipping_norm": 0.25})
    assert np.linalg.norm(free) > 0.25
    assert np.linalg.norm(clipped) == pytest.approx(0.25, rel=1e-5)
    assert metrics["norm_bit"] == 1.0
    np.testing.assert_allclose(clipped / np.linalg.norm(clipped), free / np.linalg.norm(free), atol=1e-5)


def test_an_update_already_within_the_norm_is_left_alone():
    _, metrics = run({"clipping_norm": 1e6})
    assert metrics["norm_bit"] == 0.0


@pytest.mark.parametrize("options", [{"proximal-mu": -1.0}, {"clipping_norm": "wide"}, {"proximal-mu": True}])
def test_an_option_the_device_cannot_honour_refuses_the_task(options):
    with pytest.raises(learner.BadOption):
        run(options)


class NumpyProx:
    """The same TFLite model with its in-graph anchor hidden: FedProx falls back to the numpy step."""

    supports_proximal = False

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def train_step(self, x, y, lr):
        return self._model.train_step(x, y, lr)


def tflite_run(model, options: dict, data) -> np.ndarray:
    base = model.get_weights()
    task = schemas.Task("train", "d", schemas.TrainConfig(epochs=1, lr=0.05, options=options), "f32")
    outcome = learner.train(model, base, data, task, np.random.default_rng(0))
    model.set_weights(base)
    delta, _ = schemas.decode_update(outcome.attachment)
    return np.concatenate([v.ravel() for v in delta.values()])


def test_fedprox_in_the_graph_takes_the_same_steps_as_the_numpy_fallback():
    from agent.samples import LocalData
    from firmware_models.runtime import TrainableModel

    model = TrainableModel.from_package("imu_cnn")
    assert model.supports_proximal
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 128, 6)).astype(np.float32)
    y = rng.integers(0, model.num_classes, 64).astype(np.int32)
    data = LocalData(x, y, x[:8], y[:8])
    in_graph = tflite_run(model, {"proximal-mu": 5.0}, data)
    in_numpy = tflite_run(NumpyProx(model), {"proximal-mu": 5.0}, data)
    free = tflite_run(model, {}, data)
    np.testing.assert_allclose(in_graph, in_numpy, atol=2e-5)
    assert np.linalg.norm(in_graph) < np.linalg.norm(free)


def test_a_self_supervised_model_trains_and_evaluates_without_labels():
    from agent.samples import LocalData
    from firmware_models.runtime import TrainableModel

    model = TrainableModel.from_package("imu_autoencoder")
    base = model.get_weights()
    x = np.random.default_rng(4).normal(size=(64, 128, 6)).astype(np.float32)
    unlabelled = np.zeros(64, np.int32)
    data = LocalData(x, unlabelled, x[:16], unlabelled[:16])
    task = schemas.Task("train", "d", schemas.TrainConfig(epochs=3, lr=0.05), "f32")
    before = learner.evaluate(model, base, data).metrics
    outcome = learner.train(model, base, data, task, np.random.default_rng(0))
    delta, _ = schemas.decode_update(outcome.attachment)
    after = learner.evaluate(model, {k: base[k] + delta[k] for k in base}, data).metrics
    assert set(before) == {"loss", "error_p95"} and outcome.examples == 64
    assert after["loss"] < before["loss"]


@pytest.mark.parametrize("n", [70, 20])  # a short last batch wrapped; fewer windows than one batch
def test_training_takes_the_runtimes_own_steps_for_the_same_generator(n):
    """The device's training loop cuts each epoch as `TrainableModel.train_epochs` does, so the same
    generator gives the same weights: what lets bench/vs_flower.py pair its Flower and Starling runs."""
    from agent.samples import LocalData
    from firmware_models.runtime import TrainableModel

    model = TrainableModel.from_package("imu_cnn")
    data_rng = np.random.default_rng(5)
    x = data_rng.normal(size=(n, 128, 6)).astype(np.float32)
    y = data_rng.integers(0, model.num_classes, n).astype(np.int32)
    base = model.get_weights()
    task = schemas.Task("train", "d", schemas.TrainConfig(epochs=2, lr=0.1, batch_size=32), "f32")
    outcome = learner.train(model, base, LocalData(x, y, x[:4], y[:4]), task, np.random.default_rng([7, 1]))
    delta, metrics = schemas.decode_update(outcome.attachment)
    assert outcome.examples == n and metrics["steps"] == 2 * -(-n // 32)

    model.set_weights(base)
    model.train_epochs(x, y, epochs=2, batch_size=32, lr=0.1, rng=np.random.default_rng([7, 1]))
    runtime = model.get_weights()
    for name in base:
        np.testing.assert_allclose(base[name] + delta[name], runtime[name], atol=1e-6)
