"""A load generator: one MQTT connection that plays N lightweight devices.

For benchmarks and scale tests of a gateway: it enrolls N keys (open
policy), marks them online, answers every task the gateway sends them with
a signed reply carrying a synthetic int8 delta (no training), and counts the
gateway's receipts. Every message is real protocol, signed with the
device's own key; only the training is skipped.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import numpy as np

from mqttlink import Connection, ConnectionOptions
from protocol import envelope, schemas, topics
from protocol.config import tomllib  # the stdlib's, or tomli on Python 3.10
from protocol.keys import Identity

from .broker import Broker, _child_env
from .synthetic import write_manifest
from .toml_files import write_toml


@dataclass
class Timeline:
    """When things happened (`time.time()`, as `mqttlink.Message.at`), and what the gateway answered."""

    first_reply: float = 0.0
    last_reply: float = 0.0
    last_receipt: float = 0.0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    releases: list[tuple[float, bytes]] = field(default_factory=list)  # (arrival, digest)


class LoadGenerator:
    def __init__(self, host: str, port: int, gateway_id: str, devices: int, shapes: dict[str, tuple[int, ...]],
                 seed: int = 0) -> None:
        self.gateway_id = gateway_id
        self.devices = {d.id: d for d in (Identity.from_seed((seed * 10**7 + i).to_bytes(32, "big"))
                                          for i in range(1, devices + 1))}
        rng = np.random.default_rng(seed)
        # A handful of distinct updates, so robust strategies have something to choose between.
        self.updates = [
            schemas.encode_update({k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()},
                                  {"train_loss": 1.0, "steps": 1.0}, "i8")
            for _ in range(8)
        ]
        self.timeline = Timeline()
        subscriptions = ((topics.task(gateway_id, "+"), 1), (topics.receipt(gateway_id, "+"), 1),
                         (topics.model(gateway_id, "+"), 1), (topics.status(gateway_id), 1))
        options = ConnectionOptions(f"load-{seed}", host, port, clean_session=True, max_inflight=1000,
                                    subscriptions=subscriptions, log_name="starling.loadgen")
        self.client = Connection(options).connect()  # what arrives is on `self.client.inbox`
        self._stop = threading.Event()

    def wait_for_gateway(self, timeout: float = 60.0) -> None:
        """Until the gateway's status says it is up (it subscribes before it says so): an enrollment sent to a
        gateway still starting (importing Flower takes seconds on a loaded machine) would reach nobody."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                topic, payload, at = self.client.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if topic == topics.status(self.gateway_id):
                if payload and json.loads(payload).get("state") not in ("offline", "starting"):
                    return
                continue
            self._note(topic, payload, at)
        raise TimeoutError(f"gateway {self.gateway_id} said nothing on its status topic in {timeout:.0f} s")

    def enroll_all(self, wait_s: float = 60.0) -> None:
        """Enroll every device and say it is online, once the gateway is up (`wait_for_gateway`)."""
        self.wait_for_gateway(wait_s)
        for device in self.devices.values():
            ctx = envelope.Context(device.public_key, self.gateway_id, 0, "enroll", b"")
            body = schemas.EnrollRequest("load", time.time()).to_body()
            self.client.publish(topics.enroll(self.gateway_id, device.id), envelope.seal(device, "enroll", ctx, body), qos=1)
            self.client.publish(topics.online(self.gateway_id, device.id), b"1", qos=1)

    def collect_tasks(self, count: int, timeout: float) -> dict[str, envelope.Envelope]:
        tasks: dict[str, envelope.Envelope] = {}
        end = time.monotonic() + timeout
        while len(tasks) < count and time.monotonic() < end:
            try:
                topic, payload, at = self.client.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            self._note(topic, payload, at)
            if "/task/" in topic:
                tasks[topics.device_of(topic)] = envelope.decode(payload)
        return tasks

    def sign_replies(self, tasks: dict[str, envelope.Envelope]) -> list[tuple[str, bytes]]:
        wires = []
        for i, (device_id, task) in enumerate(sorted(tasks.items())):
            device = self.devices[device_id]
            ctx = envelope.Context(device.public_key, self.gateway_id, task.ctx.round, task.ctx.task, task.ctx.base)
            update = self.updates[i % len(self.updates)]
            wires.append((topics.reply(self.gateway_id, device_id), envelope.seal(device, "reply", ctx, {"examples": 32}, update)))
        return wires

    def send(self, wires: list[tuple[str, bytes]]) -> None:
        self.timeline.first_reply = time.time()
        for topic, wire in wires:
            self.client.publish(topic, wire, qos=1)
        self.timeline.last_reply = time.time()

    def _note(self, topic: str, payload: bytes, at: float) -> None:
        if "/receipt/" in topic:
            # Plain CBOR, not the strict decode: this process shares the machine with the gateway it
            # measures, and the gateway's own receipts need no canonical-encoding check here.
            receipt = schemas.Receipt.from_body(cbor2.loads(payload)["body"])
            if not receipt.reply:
                return
            if receipt.accepted:
                self.timeline.accepted += 1
            else:
                self.timeline.rejected[receipt.reason] = self.timeline.rejected.get(receipt.reason, 0) + 1
            self.timeline.last_receipt = at
        elif "/model/" in topic and payload and topic.count("/") == 3:
            self.timeline.releases.append((at, envelope.decode(payload).body["digest"]))

    def wait_receipts(self, count: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.timeline.accepted + sum(self.timeline.rejected.values()) < count and time.monotonic() < end:
            self.drain(0.5)

    def drain(self, wait: float) -> None:
        try:
            topic, payload, at = self.client.inbox.get(timeout=wait)
        except queue.Empty:
            return
        self._note(topic, payload, at)
        while not self.client.inbox.empty():
            self._note(*self.client.inbox.get())

    def close(self) -> None:
        self.client.close()


def finished_gateway(process: subprocess.Popen, workdir: Path, timeout: float) -> dict:
    """Wait for a `start_gateway` process and return its result.json; raise if the round did not finish."""
    import json

    process.wait(timeout)
    result_path = workdir / "state" / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {"state": "no result.json"}
    if result.get("state") != "done":
        log_tail = (workdir / "gateway.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the gateway ended {result.get('state')!r}: {result.get('failure')}\n{log_tail}")
    return result


def start_gateway(workdir: Path, broker: Broker, shapes: dict[str, tuple[int, ...]], devices: int, timeout: float,
                  strategy: str = "FedAvg", params: dict[str, Any] | str | None = None,
                  workers: int = 0, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Identity]:
    """A real `starling-gateway` process for one round of `devices` load-generated devices, no evaluation.

    `params`: extra parameters of the strategy ({"beta": 0.1}; the older form, inline TOML such as
    "beta = 0.1, ", is read as such); `workers` is `[ingest] workers` (processes sharing the reply
    topic; 0 = none); `env`: extra environment variables for the gateway (e.g. STARLING_INGEST_PROFILE).
    """
    if isinstance(params, str):
        params = tomllib.loads(f"params = {{ {params.strip().rstrip(',')} }}")["params"]
    manifest = write_manifest(workdir / "model", shapes)
    gateway = Identity.generate()
    gateway.save(workdir / "gw.key")
    write_toml(workdir / "gw.toml", {
        "gateway": {"name": "load", "key": "gw.key", "state_dir": "state"},  # relative to the config's folder
        "broker": {"host": broker.host, "port": broker.port},
        "model": {"manifest": str(manifest)},
        "strategy": {"name": strategy, "params": {**(params or {}), "fraction_evaluate": 0.0,
                                                  "min_available_nodes": devices, "min_train_nodes": devices}},
        "rounds": {"num_rounds": 1, "deadline_s": timeout, "min_devices": devices, "wait_devices_s": timeout},
        "enrollment": {"policy": "open"},
        "ingest": {"workers": workers},
    })
    root = Path(__file__).resolve().parent.parent
    with open(workdir / "gateway.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(workdir / "gw.toml")],
                                   cwd=root, env={**_child_env(), **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    return process, gateway
