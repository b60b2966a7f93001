"""Nothing accepted is lost: kill -9 of the gateway mid-round, a broker restart mid-round.

Real Mosquitto (with persistence, as shipped), a real gateway process, real
agents (synthetic models: two answer at once, two take a few seconds).
"""

from __future__ import annotations

import json

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from agent.config import AgentConfig
from agent.service import Agent
from hw.broker import Broker
from hw.synthetic import SyntheticModel, synthetic_data, write_manifest
from ledger.store import Ledger
from protocol import envelope, schemas, topics
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"w": (16, 4), "b": (4,)}


class SlowModel(SyntheticModel):
    """Training takes `delay` seconds: the round is still open when the test strikes."""

    def __init__(self, *args, delay: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay

    def train_step(self, x, y, lr):
        time.sleep(self.delay)
        return super().train_step(x, y, lr)


class Fleet:
    def __init__(self, tmp: Path, broker: Broker, gateway: Identity, delays: list[float]) -> None:
        self.stop = threading.Event()
        self.threads = []
        self.devices = []
        for i, delay in enumerate(delays):
            device = Identity.generate()
            config = AgentConfig(name=f"d{i}", key=tmp / f"d{i}.key", state_dir=tmp / f"d{i}", gateway_id=gateway.id,
                                 gateway_public_key=gateway.public_key, broker_host=broker.host, broker_port=broker.port,
                                 replay=tmp / "none.npz", resend_s=1.0, enroll_retry_s=0.5)
            model = SlowModel(SHAPES, seed=i + 1, delay=delay) if delay else SyntheticModel(SHAPES, seed=i + 1)
            agent = Agent(config, device, model, synthetic_data(32))
            thread = threading.Thread(target=agent.run, args=(self.stop,), daemon=True)
            thread.start()
            self.threads.append(thread)
            self.devices.append(device)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)


class Receipts:
    def __init__(self, broker: Broker, gateway: Identity) -> None:
        self.accepted: queue.Queue = queue.Queue()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="receipts")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topics.receipt(gateway.id, "+"), qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        env = envelope.decode(msg.payload)
        receipt = schemas.Receipt.from_body(env.body)
        if receipt.accepted and env.ctx.task.startswith("train-1-"):
            self.accepted.put(receipt.device)

    def wait(self, count: int, timeout: float = 60.0) -> set[str]:
        seen, end = set(), time.monotonic() + timeout
        while len(seen) < count and time.monotonic() < end:
            try:
                seen.add(self.accepted.get(timeout=0.5))
            except queue.Empty:
                pass
        assert len(seen) >= count, f"only {len(seen)} accepted train replies"
        return seen

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def gateway_config(tmp: Path, broker: Broker, gateway: Identity) -> Path:
    gateway.save(tmp / "gw.key")
    manifest = write_manifest(tmp / "model", SHAPES)
    conf = tmp / "gw.toml"
    conf.write_text(
        f'[gateway]\nname = "gw"\nkey = "gw.key"\nstate_dir = "state"\n'
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n[model]\nmanifest = "{manifest}"\n'
        '[strategy]\nname = "FedAvg"\nparams = { min_available_nodes = 4, min_train_nodes = 4, min_evaluate_nodes = 4 }\n'
        "[rounds]\nnum_rounds = 2\ndeadline_s = 60\nmin_devices = 4\nwait_devices_s = 60\nepochs = 1\n"
        '[enrollment]\npolicy = "open"\n'
    )
    return conf


def start_gateway(conf: Path) -> subprocess.Popen:
    log = open(conf.parent / "gateway.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(conf)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)


def round_one_updates(state: Path) -> tuple[list[bytes], list[list[bytes]]]:
    with Ledger.open(state / "ledger.db") as ledger:
        vertices = list(ledger.vertices())
    devices = [bytes(r[0]) for v in vertices if v.kind == "updates" and v.body["round"] == 1 for r in v.body["records"]]
    inputs = [list(v.body["inputs"]) for v in vertices if v.kind == "aggregate" and v.body["round"] == 1]
    return devices, inputs


def test_kill_9_mid_round_then_restart_keeps_every_accepted_reply_once(tmp_path):
    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        gateway = Identity.generate()
        conf = gateway_config(tmp_path, broker, gateway)
        receipts = Receipts(broker, gateway)
        gateways = [start_gateway(conf)]
        fleet = Fleet(tmp_path, broker, gateway, delays=[0, 0, 6.0, 6.0])
        try:
            fast = receipts.wait(2)  # two devices heard "accepted" and forgot their replies
            gateways[0].kill()  # SIGKILL: no clean-up of any kind
            gateways[0].wait(10)
            gateways.append(start_gateway(conf))
            assert gateways[1].wait(120) == 0, (tmp_path / "gateway.log").read_text()[-3000:]
        finally:
            fleet.close()
            receipts.close()
            for process in gateways:
                if process.poll() is None:
                    process.kill()
    devices, inputs = round_one_updates(tmp_path / "state")
    assert sorted(devices) == sorted(d.public_key for d in fleet.devices), "each round-1 update recorded exactly once"
    assert len(inputs) == 1 and len(inputs[0]) == 4, inputs
    assert {d.id for d in fleet.devices} >= fast
    log = (tmp_path / "gateway.log").read_text()
    assert "gateway.resume round=1 accepted=2" in log
    result = json.loads((tmp_path / "state" / "result.json").read_text())
    rounds = [r["round"] for r in result["rounds"]]
    assert rounds == [0, 1, 2], result["rounds"]
    assert result["rounds"][1]["participants"] == 4


def test_a_broker_restart_mid_round_loses_nothing(tmp_path):
    with Broker(tmp_path / "broker", kind="mosquitto", persistent=True) as broker:
        gateway = Identity.generate()
        conf = gateway_config(tmp_path, broker, gateway)
        receipts = Receipts(broker, gateway)
        process = start_gateway(conf)
        fleet = Fleet(tmp_path, broker, gateway, delays=[0, 0, 4.0, 4.0])
        try:
            receipts.wait(2)
            broker.stop()  # the slow devices finish while the broker is away
            time.sleep(5)
            broker.start()  # same port, same persistence file
            assert process.wait(120) == 0, (tmp_path / "gateway.log").read_text()[-3000:]
        finally:
            fleet.close()
            receipts.close()
            if process.poll() is None:
                process.kill()
    devices, inputs = round_one_updates(tmp_path / "state")
    assert sorted(devices) == sorted(d.public_key for d in fleet.devices)
    assert len(inputs) == 1 and len(inputs[0]) == 4
