"""Enrollment policies on a running gateway: voucher, allow-list, and what each refuses."""

from __future__ import annotations

import queue
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from gateway.config import GatewayConfig
from gateway.service import Gateway
from hw.broker import Broker
from hw.synthetic import write_manifest
from ledger.store import Ledger
from protocol import envelope, schemas, topics
from protocol.keys import Identity
from protocol.vouchers import issue

OPERATOR = Identity.from_seed(b"o" * 32)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker")) as running:
        yield running


class RunningGateway:
    def __init__(self, broker: Broker, tmp_path, **enrollment) -> None:
        self.identity = Identity.generate()
        self.identity.save(tmp_path / "gw.key")
        self.config = GatewayConfig(
            name="gw", key=tmp_path / "gw.key", state_dir=tmp_path / "gw", broker_host=broker.host,
            broker_port=broker.port, manifest=write_manifest(tmp_path / "model", {"w": (3,)}),
            min_devices=100, wait_devices_s=60, **enrollment,
        )
        self.gateway = Gateway(self.config, self.identity)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.gateway.run, args=(self.stop,), daemon=True)
        self.thread.start()
        self.receipts: queue.Queue = queue.Queue()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="enroll-peer")
        self.client.on_message = lambda _c, _u, m: self.receipts.put(m.payload)
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topics.receipt(self.identity.id, "+"), qos=1)
        self.client.loop_start()
        time.sleep(1.0)  # the gateway subscribes and opens its ledger

    def enroll(self, device: Identity, voucher: bytes = b"") -> schemas.Receipt | None:
        ctx = envelope.Context(device.public_key, self.identity.id, 0, "enroll", b"")
        wire = envelope.seal(device, "enroll", ctx, schemas.EnrollRequest("dev", time.time(), voucher).to_body())
        self.client.publish(topics.enroll(self.identity.id, device.id), wire, qos=1).wait_for_publish(5)
        try:
            env = envelope.decode(self.receipts.get(timeout=5))
        except queue.Empty:
            return None
        env.verify(self.identity.public_key)
        return schemas.Receipt.from_body(env.body)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def voucher_gateway(broker, tmp_path):
    running = RunningGateway(broker, tmp_path, policy="voucher", operator_keys=(OPERATOR.public_key,))
    yield running
    running.close()


def test_a_device_with_a_valid_voucher_is_enrolled_and_recorded(voucher_gateway):
    device = Identity.generate()
    receipt = voucher_gateway.enroll(device, issue(OPERATOR, device.public_key, voucher_gateway.identity.id).encode())
    assert receipt.accepted
    voucher_gateway.close()
    with Ledger.open(voucher_gateway.config.state_dir / "ledger.db") as ledger:
        assert ledger.is_enrolled(device.public_key)


@pytest.mark.parametrize("case, reason", [
    ("none", "no_voucher"),
    ("other device", "bad_voucher"),
    ("other gateway", "bad_voucher"),
    ("expired", "bad_voucher"),
    ("untrusted operator", "bad_voucher"),
    ("garbage", "malformed"),
])
def test_a_device_without_a_fitting_voucher_is_refused_with_the_reason(voucher_gateway, case, reason):
    device = Identity.generate()
    signer, key, gateway, valid = OPERATOR, device.public_key, voucher_gateway.identity.id, 3600.0
    if case == "other device":
        key = Identity.generate().public_key
    elif case == "other gateway":
        gateway = "f" * 32
    elif case == "expired":
        valid = -1.0
    elif case == "untrusted operator":
        signer = Identity.generate()
    if case in ("none", "garbage"):
        voucher = {"none": b"", "garbage": b"\xff\x00"}[case]
    else:
        voucher = issue(signer, key, gateway, valid).encode()
    receipt = voucher_gateway.enroll(device, voucher)
    assert receipt is not None and not receipt.accepted and receipt.reason == reason
    assert voucher_gateway.gateway.enrollment.rejections.get(reason) == 1


def test_the_allowlist_admits_only_listed_keys(broker, tmp_path):
    listed = Identity.generate()
    running = RunningGateway(broker, tmp_path, policy="allowlist", allowlist=(listed.public_key,))
    try:
        assert running.enroll(listed).accepted
        refused = running.enroll(Identity.generate())
        assert not refused.accepted and refused.reason == "not_allowed"
    finally:
        running.close()


def test_a_device_revoked_by_the_operator_is_refused_from_its_next_reply_on(broker, tmp_path):
    import subprocess
    import sys

    running = RunningGateway(broker, tmp_path, policy="open")
    try:
        device = Identity.generate()
        assert running.enroll(device).accepted
        done = subprocess.run(
            [sys.executable, "-m", "ledger.cli", "revoke", "--db", str(running.config.state_dir / "ledger.db"),
             "--key", str(running.config.key), "--device", device.id, "--reason", "stolen"],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        while not running.gateway.registry.is_revoked(device.public_key) and time.monotonic() < deadline:
            time.sleep(0.1)  # the gateway picks up revocations from its ledger every second
        ctx = envelope.Context(device.public_key, running.identity.id, 1, "train-1-x.1", b"\x00" * 32)
        reply = envelope.seal(device, "reply", ctx, {"examples": 1}, schemas.encode_update({}, {"loss": 1.0, "accuracy": 0.5}))
        running.client.publish(topics.reply(running.identity.id, device.id), reply, qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while not running.gateway.book.rejections.get("revoked") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.gateway.book.rejections == {"revoked": 1}
        assert running.gateway.board.status()["revoked"] == {"count": 1, "devices": [device.id]}  # for dashboards
        again = running.enroll(device)
        assert not again.accepted and again.reason == "revoked"
    finally:
        running.close()


def test_a_device_the_operator_enrolls_with_the_cli_is_admitted_by_the_running_gateway(voucher_gateway):
    import subprocess
    import sys

    running = voucher_gateway
    device = Identity.generate()
    refused = running.enroll(device)  # no voucher, not in the ledger
    assert not refused.accepted and refused.reason == "no_voucher"
    done = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "enroll", "--db", str(running.config.state_dir / "ledger.db"),
         "--key", str(running.config.key), "--device", device.public_key.hex(), "--name", "by-hand"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while not running.gateway.registry.is_enrolled(device.public_key) and time.monotonic() < deadline:
        time.sleep(0.1)  # the gateway looks at its ledger every second
    assert running.gateway.registry.name_of(device.id) == "by-hand"
    assert running.enroll(device).accepted  # known now: no voucher needed
