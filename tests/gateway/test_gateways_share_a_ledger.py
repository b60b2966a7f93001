"""Two gateways of one city share a ledger by gossip: an enrollment and a revocation at one reach the other, and
each applies its own enrollment policy to what it learns: a voucher gateway admits a device enrolled at an open
one only on a voucher for it."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from gateway.config import GatewayConfig
from gateway.service import Gateway
from hw.broker import Broker
from hw.ledger_peer import make_city
from hw.synthetic import write_manifest
from protocol import envelope, schemas, topics
from protocol.keys import Identity
from protocol.vouchers import issue

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = Identity.from_seed(b"o" * 32)


def eventually(condition, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


class Running:
    def __init__(self, broker: Broker, workdir: Path, identity: Identity, genesis: Path, **enrollment) -> None:
        self.identity = identity
        self.config = GatewayConfig(
            name=workdir.name, key=workdir / "gw.key", state_dir=workdir, broker_host=broker.host,
            broker_port=broker.port, manifest=write_manifest(workdir / "model", {"w": (3,)}), genesis=genesis,
            min_devices=100, wait_devices_s=60, checkpoint_every=2, **enrollment,
        )
        self.gateway = Gateway(self.config, identity)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.gateway.run, args=(self.stop,), daemon=True)
        self.thread.start()
        self.receipts: queue.Queue = queue.Queue()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"peer-{identity.id[:8]}")
        self.client.on_message = lambda _c, _u, m: self.receipts.put(m.payload)
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topics.receipt(identity.id, "+"), qos=1)
        self.client.loop_start()
        assert eventually(lambda: self.gateway.keeper is not None and self.gateway.keeper.sync_link is not None
                          and self.gateway.state == "waiting")

    def enroll(self, device: Identity, voucher: bytes = b"") -> schemas.Receipt:
        ctx = envelope.Context(device.public_key, self.identity.id, 0, "enroll", b"")
        wire = envelope.seal(device, "enroll", ctx, schemas.EnrollRequest("dev", time.time(), voucher).to_body())
        self.client.publish(topics.enroll(self.identity.id, device.id), wire, qos=1).wait_for_publish(5)
        return schemas.Receipt.from_body(envelope.decode(self.receipts.get(timeout=10)).body)

    def reply(self, device: Identity) -> None:
        """A signed update reply from `device`, as if to a round: refused one way or another (no round is open)."""
        ctx = envelope.Context(device.public_key, self.identity.id, 1, "train-1-x.1", b"\x00" * 32)
        wire = envelope.seal(device, "reply", ctx, {"examples": 1},
                             schemas.encode_update({}, {"loss": 1.0, "accuracy": 0.5}))
        self.client.publish(topics.reply(self.identity.id, device.id), wire, qos=1).wait_for_publish(5)

    def rejections(self) -> dict[str, int]:
        return dict(self.gateway.book.rejections)

    def ledger_enrollments(self, device: Identity) -> list:
        return self.gateway.keeper.ledger.enrollments(device.public_key)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def two_gateways(tmp_path: Path):
    keys, genesis = make_city(tmp_path, 2)
    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        for i in range(2):
            (tmp_path / f"gw{i}").mkdir()
            keys[i].save(tmp_path / f"gw{i}" / "gw.key")
        a = Running(broker, tmp_path / "gw0", keys[0], genesis, policy="open")
        b = Running(broker, tmp_path / "gw1", keys[1], genesis, policy="voucher", operator_keys=(OPERATOR.public_key,))
        try:
            yield a, b
        finally:
            a.close()
            b.close()


def test_a_device_enrolled_at_an_open_gateway_enrolls_at_a_voucher_gateway_only_with_a_voucher(two_gateways):
    a, b = two_gateways
    device = Identity.generate()
    assert a.enroll(device).accepted
    assert eventually(lambda: len(b.ledger_enrollments(device)) == 1), "the enrollment reached the other gateway"
    time.sleep(2.5)  # b looks at its ledger every second: it has seen the enrollment, and not admitted it
    assert not b.gateway.registry.is_enrolled(device.public_key)
    b.reply(device)
    assert eventually(lambda: b.rejections().get("unknown_device") == 1), b.rejections()

    refused = b.enroll(device)  # without a voucher: the voucher policy refuses it as it would a new device
    assert not refused.accepted and refused.reason == "no_voucher"
    voucher = issue(OPERATOR, device.public_key, b.identity.id).encode()
    assert b.enroll(device, voucher).accepted
    assert b.gateway.registry.is_enrolled(device.public_key)
    b.reply(device)  # known now: refused for the round (none is open), not as an unknown device
    assert eventually(lambda: sum(b.rejections().values()) == 2), b.rejections()
    assert b.rejections().get("unknown_device") == 1

    expected = [(a.identity.id, "open", b""), (b.identity.id, "voucher", voucher)]
    for gateway in (a, b):  # both enrollments, with their evidence, on both ledgers
        assert eventually(lambda g=gateway: len(g.ledger_enrollments(device)) == 2)
        assert [(r.creator, r.policy, r.evidence) for r in gateway.ledger_enrollments(device)] == expected
    assert eventually(lambda: a.gateway.keeper.ledger.state_digest() == b.gateway.keeper.ledger.state_digest())


def test_a_voucher_gateway_admits_a_device_enrolled_elsewhere_on_a_voucher_for_it(two_gateways):
    a, b = two_gateways
    vouched, for_a_only = Identity.generate(), Identity.generate()
    for device, gateway in ((vouched, b.identity.id), (for_a_only, a.identity.id)):
        voucher = tmp_voucher(a, device, gateway)
        done = subprocess.run(  # the operator enrolls it by hand at the open gateway, keeping its voucher
            [sys.executable, "-m", "ledger.cli", "enroll", "--db", str(a.config.state_dir / "ledger.db"),
             "--key", str(a.config.key), "--device", device.public_key.hex(), "--name", "vouched",
             "--voucher", str(voucher)],
            check=False, capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
        assert done.returncode == 0, done.stderr
    assert eventually(lambda: b.gateway.registry.is_enrolled(vouched.public_key)), \
        "admitted at the voucher gateway without a request of its own"
    assert eventually(lambda: len(b.ledger_enrollments(for_a_only)) == 1)
    time.sleep(2.5)
    assert not b.gateway.registry.is_enrolled(for_a_only.public_key)  # its voucher is for the other gateway
    assert [r.creator for r in b.ledger_enrollments(vouched)] == [a.identity.id]  # b wrote nothing of its own


def tmp_voucher(running: Running, device: Identity, gateway: str) -> Path:
    path = running.config.state_dir / f"{device.id}.voucher"
    path.write_bytes(issue(OPERATOR, device.public_key, gateway).encode())
    return path


def test_a_revocation_at_one_gateway_is_honoured_by_the_other(two_gateways):
    a, b = two_gateways
    device = Identity.generate()
    assert a.enroll(device).accepted
    assert eventually(lambda: b.ledger_enrollments(device) != []), "the enrollment reached the other gateway"
    done = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "revoke", "--db", str(a.config.state_dir / "ledger.db"),
         "--key", str(a.config.key), "--device", device.id, "--reason", "stolen"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert eventually(lambda: b.gateway.registry.is_revoked(device.public_key)), \
        "the revocation reached the other gateway"
    refused = b.enroll(device)
    assert not refused.accepted and refused.reason == "revoked"
    status = b.gateway.keeper.status()
    assert status["peers"] == [a.identity.id] and status["equivocators"] == []
    assert b.gateway.board.status()["ledger"]["peers"] == [a.identity.id]  # what the status topic carries
    from ledger.store import Ledger
    from ledger.verify import verify_store

    path = b.config.state_dir / "ledger.db"

    def checkpoints() -> int:
        with Ledger.open(path, read_only=True) as ledger:
            return ledger.kind_counts().get("checkpoint", 0)

    assert eventually(lambda: checkpoints() >= 1), "checkpoint_every = 2: a checkpoint is written and gossiped"
    assert verify_store(path).ok
