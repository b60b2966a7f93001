"""A device that sits a round out (low power, too hot) says so, and the gateway stops waiting for it."""

from __future__ import annotations

import threading
import time

from agent.budget import Budget
from agent.config import AgentConfig
from agent.service import Agent
from gateway.config import GatewayConfig
from gateway.service import Gateway
from hw.broker import Broker
from hw.synthetic import SyntheticModel, synthetic_data, write_manifest
from protocol.keys import Identity

SHAPES = {"w": (6, 3)}


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


class SlowModel(SyntheticModel):
    """Trains like SyntheticModel, but its first step takes seconds: the round is still open meanwhile."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slow = True

    def train_step(self, x, y, lr: float) -> float:
        if self.slow:
            self.slow = False
            time.sleep(4.0)
        return super().train_step(x, y, lr)


def test_a_skip_survives_a_gateway_restart_so_the_resumed_round_does_not_wait_for_that_device(tmp_path):
    import sqlite3

    flag = tmp_path / "low-power"
    flag.touch()
    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        gw_key = Identity.generate()
        gw_key.save(tmp_path / "gw.key")
        config = GatewayConfig(
            name="gw", key=tmp_path / "gw.key", state_dir=tmp_path / "gw", broker_host=broker.host,
            broker_port=broker.port, manifest=write_manifest(tmp_path / "model", SHAPES), num_rounds=1,
            deadline_s=60, min_devices=2, wait_devices_s=30, policy="open", gossip=False,
            strategy_params={"min_available_nodes": 2, "min_train_nodes": 1, "fraction_evaluate": 0.0},
        )
        first_stop, first = threading.Event(), {}
        gateway = threading.Thread(target=lambda: first.update(Gateway(config, gw_key).run(first_stop)), daemon=True)
        gateway.start()
        agents, agent_stop = [], threading.Event()
        for i, (budget, model) in enumerate([(Budget(low_power_file=flag), SyntheticModel(SHAPES, seed=1)),
                                             (Budget(), SlowModel(SHAPES, seed=2))]):
            cfg = AgentConfig(name=f"d{i}", key=tmp_path / f"d{i}.key", state_dir=tmp_path / f"d{i}",
                              gateway_id=gw_key.id, gateway_public_key=gw_key.public_key, broker_host=broker.host,
                              broker_port=broker.port, replay=None, resend_s=1.0, enroll_retry_s=0.5, budget=budget)
            agents.append(threading.Thread(target=Agent(cfg, Identity.generate(), model, synthetic_data(64)).run,
                                           args=(agent_stop,), daemon=True))
            agents[-1].start()

        def journaled() -> int:
            try:
                with sqlite3.connect(tmp_path / "gw" / "rounds.db") as db:
                    return db.execute("select count(*) from accepted").fetchone()[0]
            except sqlite3.OperationalError:
                return 0

        deadline = time.monotonic() + 30
        while journaled() < 1:  # d0's skip is on disk; d1 is still in its slow first step
            assert time.monotonic() < deadline, "the skip was never journaled"
            time.sleep(0.05)
        first_stop.set()  # the gateway goes down mid-round
        gateway.join(30)
        second, started = {}, time.monotonic()
        restarted = threading.Thread(target=lambda: second.update(Gateway(config, gw_key).run(threading.Event())),
                                     daemon=True)
        restarted.start()
        restarted.join(60)
        took = time.monotonic() - started
        agent_stop.set()
        for thread in agents:
            thread.join(20)
    assert first.get("state") == "stopped", first
    assert second.get("state") == "done", second
    trained = [r for r in second["rounds"] if r["round"] == 1][0]
    assert trained["participants"] == 1 and trained["skipped"] == 1
    assert took < 30, "the resumed round closed on d1's reply, not at its 60 s deadline waiting for d0"
