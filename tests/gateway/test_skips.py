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
