"""A gateway's key rotated by the operator's root key, through the real gateway, ledger CLI and agents.

Round 1 runs under key A. The operator retires A (`starling-ledger rotate`);
the gateway restarts with key B and the chain file: it keeps A's id, publishes
the chain, and round 2 runs under B with the same devices, which followed the
chain (they know the root key). A task still signed by A is refused by them
as `key_rotated`, and the ledger records round 2's updates by B under A's id.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.service import Agent
from gateway.config import GatewayConfig
from gateway.service import Gateway
from hw.broker import Broker
from hw.synthetic import SyntheticModel, synthetic_data, write_manifest
from ledger.store import Ledger
from ledger.verify import verify_store
from protocol import cbor, envelope, schemas, topics
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"dense_w": (8, 4), "dense_b": (4,)}
DEVICES = 2


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker"), kind="mosquitto") as running:
        yield running


def _run(config: GatewayConfig, key: Identity) -> dict:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(Gateway(config, key).run(threading.Event())), daemon=True)
    thread.start()
    thread.join(120)
    assert result.get("state") == "done", result
    return result


def _task_signed_by(signer: Identity, gateway_id: str, device: Identity, base: bytes) -> bytes:
    cfg = schemas.TrainConfig(epochs=1, batch_size=32, lr=0.1, deadline=time.time() + 60)
    body = schemas.Task("train", device.id, cfg, "i8").to_body()
    ctx = envelope.Context(signer.public_key, gateway_id, 9, "train-9-x", base)
    sig = signer.sign(envelope.signed_bytes("task", ctx, body))
    return cbor.dumps({"v": 1, "type": "task", "ctx": ctx.to_wire(), "body": body, "sig": sig})


def test_a_rotated_gateway_keeps_its_id_and_devices_follow_its_new_key(broker, tmp_path: Path):
    root, a, b = (Identity.generate() for _ in range(3))
    root.save(tmp_path / "root.key")
    a.save(tmp_path / "a.key")
    b.save(tmp_path / "b.key")
    with Ledger.open(tmp_path / "genesis.db", root) as ledger:  # the operator's genesis naming gateway A
        (tmp_path / "genesis.cbor").write_bytes(ledger.init_genesis("harbour", [a.public_key]).encode())
    base = dict(name="gw", state_dir=tmp_path / "gw", broker_host=broker.host, broker_port=broker.port,
                manifest=write_manifest(tmp_path / "model", SHAPES), genesis=tmp_path / "genesis.cbor",
                strategy="FedAvg", deadline_s=30, epochs=1, batch_size=32, lr=0.5, min_devices=DEVICES,
                wait_devices_s=30, policy="open")
    agents, stop = [], threading.Event()
    for i in range(DEVICES):
        cfg = AgentConfig(name=f"syn-{i}", key=tmp_path / f"d{i}.key", state_dir=tmp_path / f"d{i}",
                          gateway_id=a.id, gateway_public_key=a.public_key, broker_host=broker.host,
                          broker_port=broker.port, replay=tmp_path / "none.npz", enroll_retry_s=0.5,
                          gateway_root_key=root.public_key)
        agent = Agent(cfg, Identity.generate(), SyntheticModel(SHAPES, seed=i + 1), synthetic_data(64))
        threading.Thread(target=agent.run, args=(stop,), daemon=True).start()
        agents.append(agent)
    try:
        first = _run(GatewayConfig(key=tmp_path / "a.key", num_rounds=1, **base), a)
        done = subprocess.run(
            [sys.executable, "-m", "ledger.cli", "rotate", "--root-key", str(tmp_path / "root.key"),
             "--db", str(tmp_path / "gw" / "ledger.db"), "--gateway", a.id, "--new-key", b.public_key.hex(),
             "--chain", str(tmp_path / "rotations.cbor")], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert done.returncode == 0, done.stderr
        second = _run(GatewayConfig(key=tmp_path / "b.key", rotations=tmp_path / "rotations.cbor", num_rounds=2,
                                    **base), b)
        assert first["gateway"]["id"] == second["gateway"]["id"] == a.id
        assert second["gateway"]["public_key"] == b.public_key.hex()
        assert [r["round"] for r in second["rounds"] if r["round"] > 0] == [1, 2]  # the journal keeps round 1
        assert all(agent.gateway_key == b.public_key for agent in agents)
        assert all(agent.counters.refused_tasks == {} for agent in agents), [a.counters.refused_tasks for a in agents]
        # A task the old key signs (a thief's, say) is refused by a device that followed the rotation.
        import paho.mqtt.client as mqtt

        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="thief")
        client.connect(broker.host, broker.port)
        client.loop_start()
        victim = agents[0]
        client.publish(topics.task(a.id, victim.identity.id), _task_signed_by(a, a.id, victim.identity, b"\0" * 32),
                       qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while "key_rotated" not in victim.counters.refused_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        client.loop_stop()
        client.disconnect()
        assert victim.counters.refused_tasks == {"key_rotated": 1}
    finally:
        stop.set()
    with Ledger.open(tmp_path / "gw" / "ledger.db", read_only=True) as ledger:
        updates = [v for v in ledger.vertices_of("updates")]
        assert [(v.body["round"], v.creator) for v in updates] == [(1, a.public_key), (2, b.public_key)]
        assert {v.body["gateway"] for v in updates} == {a.id}
        assert ledger.gateways() == [b.public_key]
    assert verify_store(tmp_path / "gw" / "ledger.db").ok
    assert json.loads((tmp_path / "gw" / "result.json").read_text())["gateway"]["id"] == a.id
