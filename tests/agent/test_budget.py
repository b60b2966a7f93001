"""Learning within a budget: time and sample limits, and sitting a round out with a reason the gateway hears."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from agent import learner
from agent.budget import Budget
from agent.config import AgentConfig, ConfigError, parse_config
from agent.service import Agent
from gateway.config import GatewayConfig
from gateway.service import Gateway
from hw.broker import Broker
from hw.synthetic import SyntheticModel, synthetic_data, write_manifest
from protocol import schemas
from protocol.keys import Identity

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


def test_a_device_on_low_power_sits_the_round_out_and_the_gateway_stops_waiting_for_it(tmp_path):
    flag = tmp_path / "low-power"
    flag.touch()
    with Broker(tmp_path / "broker") as broker:
        gw_key = Identity.generate()
        gw_key.save(tmp_path / "gw.key")
        config = GatewayConfig(
            name="gw", key=tmp_path / "gw.key", state_dir=tmp_path / "gw", broker_host=broker.host,
            broker_port=broker.port, manifest=write_manifest(tmp_path / "model", SHAPES), num_rounds=1,
            deadline_s=60, min_devices=2, wait_devices_s=30, policy="open", gossip=False,
            strategy_params={"min_available_nodes": 2, "min_train_nodes": 1, "fraction_evaluate": 0.0},
        )
        result: dict = {}
        stop = threading.Event()
        gateway = threading.Thread(target=lambda: result.update(Gateway(config, gw_key).run(stop)), daemon=True)
        gateway.start()
        agents, agent_stop = [], threading.Event()
        for i, budget in enumerate([Budget(low_power_file=flag), Budget()]):
            cfg = AgentConfig(name=f"d{i}", key=tmp_path / f"d{i}.key", state_dir=tmp_path / f"d{i}",
                              gateway_id=gw_key.id, gateway_public_key=gw_key.public_key, broker_host=broker.host,
                              broker_port=broker.port, replay=tmp_path / "none.npz", enroll_retry_s=0.5,
                              budget=budget)
            agent = Agent(cfg, Identity.generate(), SyntheticModel(SHAPES, seed=i + 1), synthetic_data(64))
            thread = threading.Thread(target=agent.run, args=(agent_stop,), daemon=True)
            thread.start()
            agents.append(thread)
        started = time.monotonic()
        gateway.join(60)
        took = time.monotonic() - started
        agent_stop.set()
        for thread in agents:
            thread.join(20)
    assert result.get("state") == "done", result
    trained = [r for r in result["rounds"] if r["round"] == 1][0]
    assert trained["participants"] == 1 and trained["skipped"] == 1
    assert took < 30, "the round closed when both devices had answered, not at its 60 s deadline"
    assert "skipped" not in result["rejections"]
    assert not list((tmp_path / "d0" / "pending").glob("*.reply"))  # its skip was receipted too
