"""Learning within a budget: time and sample limits, and sitting a round out with a reason the gateway hears."""

from __future__ import annotations

import time

import numpy as np
import pytest

from agent import learner
from agent.budget import Budget
from agent.config import ConfigError, parse_config
from hw.synthetic import SyntheticModel, synthetic_data
from protocol import schemas

SHAPES = {"w": (6, 3)}


def task(epochs: int = 1, deadline: float = 0.0) -> schemas.Task:
    return schemas.Task("train", "d" * 32, schemas.TrainConfig(epochs, 32, 0.1, deadline), "i8")


def test_the_reason_to_skip_comes_from_the_thermal_zone_and_the_low_power_flag(tmp_path):
    zone = tmp_path / "temp"
    zone.write_text("85000\n")  # millidegrees, as /sys/class/thermal reports
    flag = tmp_path / "low-power"
    assert Budget(thermal_zone=zone).skip_reason() == "cpu_hot"
    assert Budget(thermal_zone=zone, max_cpu_temp_c=90).skip_reason() == ""
    flag.touch()
    assert Budget(thermal_zone=zone, max_cpu_temp_c=90, low_power_file=flag).skip_reason() == "low_power"
    assert Budget(thermal_zone=tmp_path / "missing").skip_reason() == ""  # no sensor: take part
    zone.write_text("garbage")
    assert Budget(thermal_zone=zone).cpu_temp_c() is None


def test_training_takes_at_most_the_sample_budget_and_stops_at_the_time_budget():
    model = SyntheticModel(SHAPES, seed=1)
    data = synthetic_data(320)
    base = model.get_weights()
    rng = np.random.default_rng(0)
    assert learner.train(model, base, data, task(), rng).examples == 320
    assert learner.train(model, base, data, task(), rng, max_samples=64).examples == 64

    class Slow(SyntheticModel):
        def train_step(self, x, y, lr):
            time.sleep(0.05)
            return super().train_step(x, y, lr)

    started = time.monotonic()
    outcome = learner.train(Slow(SHAPES, seed=1), base, data, task(epochs=5), rng, max_seconds=0.3)
    assert time.monotonic() - started < 1.0 and 0 < outcome.examples < 320


def test_a_bad_budget_is_a_config_error():
    doc = {"device": {"name": "d", "key": "k", "state_dir": "s"},
           "gateway": {"id": "0" * 32, "public_key": "ab" * 32}, "data": {"replay": "x.npz"},
           "budget": {"max_train_s": -1.0}}
    with pytest.raises(ConfigError, match="budget.max_train_s must not be negative"):
        parse_config(doc)
