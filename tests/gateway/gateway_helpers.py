"""Helpers shared by the tests that run a real gateway process against agents in the test's own process."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent.config import AgentConfig
from agent.service import Agent
from hw.broker import Broker
from hw.synthetic import SyntheticModel, synthetic_data, write_manifest
from protocol import envelope, schemas, topics
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"w": (16, 4), "b": (4,)}


class SlowModel(SyntheticModel):
    """Training takes `delay` seconds: a round is still open when a test strikes."""

    def __init__(self, *args, delay: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay

    def train_step(self, x, y, lr):
        time.sleep(self.delay)
        return super().train_step(x, y, lr)


class AgentFleet:
    """Real agents with synthetic models, one thread each; `delays[i]` slows device i's training. They
    outlive every restart of the gateway (the broker keeps their sessions)."""

    def __init__(self, tmp: Path, broker: Broker, gateway: Identity, delays: list[float]) -> None:
        self.stop = threading.Event()
        self.threads = []
        self.devices = []
        for i, delay in enumerate(delays):
            device = Identity.generate()
            config = AgentConfig(name=f"d{i}", key=tmp / f"d{i}.key", state_dir=tmp / f"d{i}", gateway_id=gateway.id,
                                 gateway_public_key=gateway.public_key, broker_host=broker.host,
                                 broker_port=broker.port, replay=tmp / "none.npz", resend_s=1.0, enroll_retry_s=0.5)
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


def gateway_config(tmp: Path, broker: Broker, gateway: Identity, strategy: str, rounds: str) -> Path:
    """The gateway's key and config in `tmp` (state in `tmp/state`): `strategy` and `rounds` are the
    bodies of the `[strategy]` and `[rounds]` tables."""
    gateway.save(tmp / "gw.key")
    manifest = write_manifest(tmp / "model", SHAPES)
    conf = tmp / "gw.toml"
    conf.write_text(
        f'[gateway]\nname = "gw"\nkey = "gw.key"\nstate_dir = "state"\n'
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n[model]\nmanifest = "{manifest}"\n'
        f"[strategy]\n{strategy}\n[rounds]\n{rounds}\n"
        '[enrollment]\npolicy = "open"\n'
    )
    return conf


def start_gateway(conf: Path, log: Path | None = None) -> subprocess.Popen:
    """`starling-gateway run` in its own process, its output appended to `log` (default gateway.log beside conf)."""
    with open(log or conf.parent / "gateway.log", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(conf)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)


class AcceptedReceipts:
    """The gateway's accepted receipts for tasks whose id starts with `task_prefix`, as the devices hear them."""

    def __init__(self, broker: Broker, gateway: Identity, task_prefix: str = "train-") -> None:
        import paho.mqtt.client as mqtt

        self.task_prefix = task_prefix
        self.accepted: queue.Queue[schemas.Receipt] = queue.Queue()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="receipts")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topics.receipt(gateway.id, "+"), qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        env = envelope.decode(msg.payload)
        receipt = schemas.Receipt.from_body(env.body)
        if receipt.accepted and env.ctx.task.startswith(self.task_prefix):
            self.accepted.put(receipt)

    def first(self, timeout: float = 60.0) -> bytes:
        """The digest of the next update accepted."""
        return self.accepted.get(timeout=timeout).reply

    def wait(self, count: int, timeout: float = 60.0) -> set[str]:
        """The devices of at least `count` accepted replies (asserted within `timeout`)."""
        seen, end = set(), time.monotonic() + timeout
        while len(seen) < count and time.monotonic() < end:
            try:
                seen.add(self.accepted.get(timeout=0.5).device)
            except queue.Empty:
                pass
        assert len(seen) >= count, f"only {len(seen)} accepted replies to {self.task_prefix}* tasks"
        return seen

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
