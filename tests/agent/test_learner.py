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
