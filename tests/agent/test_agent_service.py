"""The agent against a real broker, driven by a test peer that speaks the real protocol.

The peer plays the gateway's part by hand (sign a model release, a task, a
receipt) so each test can also play it wrong: a forged signature, an old
model, a missing receipt.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent.config import AgentConfig
from agent.samples import LocalData
from agent.service import Agent
from agent.state import AgentState, StateStore
from firmware_models.runtime import TrainableModel
from hw.broker import Broker
from protocol import envelope, schemas, topics
from protocol.keys import Identity
from protocol.rotation import Chain, issue

GATEWAY = Identity.from_seed(b"G" * 32)
ROGUE = Identity.from_seed(b"R" * 32)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="module")
def model():
    return TrainableModel.from_package()


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 128, 6)).astype(np.float32)
    y = rng.integers(0, 7, size=64).astype(np.int32)
    return LocalData(x, y, x[:16], y[:16])


class Peer:
    """A hand-driven gateway: sees what the device publishes, publishes what the test says."""

    def __init__(self, broker: Broker) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="peer")
        self.client.on_message = lambda _c, _u, m: self.inbox.put((m.topic, m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe([(topics.reply(GATEWAY.id, "+"), 1), (topics.enroll(GATEWAY.id, "+"), 1)])
        time.sleep(0.2)

    def next(self, kind: str, timeout: float = 20.0) -> envelope.Envelope:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                topic, payload = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if f"/{kind}/" in topic:
                return envelope.decode(payload)
        raise AssertionError(f"no {kind} message within {timeout} s")

    def nothing(self, kind: str, wait: float = 2.0) -> None:
        with pytest.raises(AssertionError):
            self.next(kind, wait)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def release(self, weights, version: int, publish: bool = True, expires_in: float = 3600.0,
                expires: float | None = None, signer: Identity = GATEWAY):
        """Sign a model release; publish it retained under its digest (or return it with the digest).

        It expires `expires_in` seconds from now, or at `expires` (unix seconds; 0: the old "never") when given.
        """
        model = schemas.encode_model(weights)
        ctx = envelope.Context(signer.public_key, GATEWAY.id, version, "model", b"")
        body = {"version": version, "architecture": "", "size": len(model), "chunks": 1,
                "expires": time.time() + expires_in if expires is None else expires}
        wire = envelope.seal(signer, "model", ctx, body, model)
        digest = envelope.decode(wire).body["digest"]
        if not publish:
            return wire, digest
        self.publish(topics.model(GATEWAY.id, digest.hex()), wire, retain=True)
        return digest

    def task(self, device: Identity, base: bytes, round_: int = 1, kind: str = "train", signer: Identity = GATEWAY,
             sender: Identity | None = None) -> None:
        cfg = schemas.TrainConfig(epochs=1, batch_size=32, lr=0.1, deadline=time.time() + 60)
        body = schemas.Task(kind, device.id, cfg, "i8").to_body()
        ctx = envelope.Context((sender or signer).public_key, GATEWAY.id, round_, f"{kind}-{round_}", base)
        sig = signer.sign(envelope.signed_bytes("task", ctx, body))
        from protocol import cbor

        wire = cbor.dumps({"v": 1, "type": "task", "ctx": ctx.to_wire(), "body": body, "sig": sig})
        self.publish(topics.task(GATEWAY.id, device.id), wire)

    def receipt(self, device: Identity, reply: envelope.Envelope, accepted: bool = True, task: str | None = None) -> None:
        ctx = envelope.Context(GATEWAY.public_key, GATEWAY.id, reply.ctx.round if reply else 0,
                               task or reply.ctx.task, reply.ctx.base if reply else b"")
        body = schemas.Receipt(device.id, reply.body["digest"] if reply else b"", accepted, "").to_body()
        self.publish(topics.receipt(GATEWAY.id, device.id), envelope.seal(GATEWAY, "receipt", ctx, body))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def peer(broker):
    p = Peer(broker)
    yield p
    p.close()


@pytest.fixture
def start_agent(broker, model, data, tmp_path):
    running = []

    def start(device: Identity, state: AgentState | None = None, resend_s: float = 0.5,
              root_key: bytes | None = None) -> Agent:
        config = AgentConfig(name="test-device", key=tmp_path / "device.key", state_dir=tmp_path / f"state-{device.id}",
                             gateway_id=GATEWAY.id, gateway_public_key=GATEWAY.public_key, broker_host=broker.host,
                             broker_port=broker.port, replay=tmp_path / "unused.npz", resend_s=resend_s,
                             enroll_retry_s=0.5, gateway_root_key=root_key)
        if state is not None:
            StateStore(config.state_dir).save(state)
        agent = Agent(config, device, model, data)
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        thread.start()
        running.append((stop, thread))
        assert agent.conn.connected.wait(10), "agent did not connect"
        time.sleep(0.3)  # let its SUBSCRIBE reach the broker before the test publishes tasks
        return agent

    yield start
    for stop, thread in running:
        stop.set()
        thread.join(20)


def refusals(agent: Agent, timeout: float = 10.0) -> dict[str, int]:
    end = time.monotonic() + timeout
    while not agent.counters.refused_tasks and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.3)  # a second refusal may follow the first
    return agent.counters.refused_tasks


def enrolled(peer: Peer, device: Identity) -> None:
    request = peer.next("enroll")
    assert request.ctx.sender == device.public_key
    request.verify()
    peer.receipt(device, None, task="enroll")


def test_a_device_enrolls_trains_and_resends_its_reply_until_a_receipt_comes(peer, start_agent, model):
    device = Identity.generate()
    agent = start_agent(device)
    enrolled(peer, device)
    digest = peer.release(model.get_weights(), version=1)
    peer.task(device, digest)
    reply = peer.next("reply")
    reply.verify()
    assert reply.ctx.sender == device.public_key and reply.ctx.base == digest and reply.ctx.round == 1
    delta, metrics = schemas.decode_update(reply.attachment)
    assert set(delta) == set(model.weight_names) and any(np.abs(v).max() > 0 for v in delta.values())
    again = peer.next("reply", timeout=5)  # no receipt yet: the same signed bytes come back
    assert again.sig == reply.sig
    assert len(agent.store.pending()) == 1
    peer.receipt(device, reply)
    deadline = time.monotonic() + 10
    while agent.store.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.store.pending() == {}


def test_a_reply_is_sent_once_while_its_state_is_still_being_saved(peer, start_agent, model):
    # The resend loop runs on another thread; a slow disk (fsync) between storing the reply as pending
    # and publishing it must not make the loop take it for an old, unreceipted reply.
    device = Identity.generate()
    agent = start_agent(device, resend_s=30.0)
    enrolled(peer, device)
    save = agent.store.save

    def slow_save(state):
        time.sleep(2.5)  # longer than the resend loop's 1 s period
        save(state)

    agent.store.save = slow_save
    peer.task(device, peer.release(model.get_weights(), version=1))
    peer.next("reply", timeout=30)
    peer.nothing("reply", wait=2.0)


def test_the_same_task_again_brings_the_unreceipted_reply_at_once_not_at_the_next_resend(peer, start_agent, model):
    # A gateway that restarted re-tasks the devices whose replies it has not journaled, under the same task:
    # the device answers with its stored reply right away (its resend period here is 60 s), never trains again.
    device = Identity.generate()
    agent = start_agent(device, resend_s=60.0)
    enrolled(peer, device)
    digest = peer.release(model.get_weights(), version=1)
    peer.task(device, digest)
    reply = peer.next("reply")
    peer.nothing("reply", wait=1.5)  # no receipt, but nothing until the resend period
    asked = time.monotonic()
    peer.task(device, digest)
    again = peer.next("reply", timeout=5)
    assert time.monotonic() - asked < 5 and again.sig == reply.sig  # the same signed bytes: not trained again
    assert agent.counters.replies_sent == 1


def test_a_task_signed_by_another_key_is_refused(peer, start_agent, model):
    device = Identity.generate()
    agent = start_agent(device)
    enrolled(peer, device)
    digest = peer.release(model.get_weights(), version=1)
    peer.task(device, digest, signer=ROGUE)  # claims to be the rogue: not our gateway
    peer.task(device, digest, signer=ROGUE, sender=GATEWAY, round_=2)  # claims to be the gateway: bad signature
    peer.nothing("reply")
    assert refusals(agent) == {"not_from_gateway": 1, "bad_signature": 1}


def not_flashed(model) -> dict[str, np.ndarray]:
    """Weights other than the ones the agent starts with: a device fetches (and checks) a release of them,
    where it would use its own copy of the model it was flashed with (agent/downloads.py, `_flashed_cache`)."""
    return {k: (v + 0.25).astype(np.float32) for k, v in model.get_weights().items()}


def test_a_model_older_than_one_already_trusted_is_refused(peer, start_agent, model):
    device = Identity.generate()
    agent = start_agent(device, AgentState(GATEWAY.id, enrolled=True, trusted_version=5))
    digest = peer.release(model.get_weights(), version=4)
    peer.task(device, digest)
    peer.nothing("reply")
    assert refusals(agent) == {"model_rollback": 1}


def test_an_expired_release_is_refused(peer, start_agent, model):
    device = Identity.generate()
    agent = start_agent(device, AgentState(GATEWAY.id, enrolled=True, trusted_version=0))
    digest = peer.release(not_flashed(model), version=1, expires_in=-1.0)
    peer.task(device, digest)
    peer.nothing("reply")
    assert refusals(agent) == {"model_expired": 1}


def test_a_model_over_256_kb_arrives_in_chunks_and_is_used(peer, broker, tmp_path):
    from gateway.models import ModelPublisher, Release, chunk_count
    from hw.synthetic import SyntheticModel, synthetic_data
    from protocol.digest import sha256

    shapes = {"big": (300, 300), "b": (7,)}  # 360 KB of float32: two chunks
    device = Identity.generate()
    config = AgentConfig(name="big", key=tmp_path / "k", state_dir=tmp_path / "big-state", gateway_id=GATEWAY.id,
                         gateway_public_key=GATEWAY.public_key, broker_host=broker.host, broker_port=broker.port,
                         replay=tmp_path / "unused.npz")
    StateStore(config.state_dir).save(AgentState(GATEWAY.id, enrolled=True, trusted_version=0))
    agent = Agent(config, device, SyntheticModel(shapes, seed=3), synthetic_data(32))
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert agent.conn.connected.wait(10)
        time.sleep(0.3)
        weights = {k: np.full(s, 0.5, np.float32) for k, s in shapes.items()}
        model = schemas.encode_model(weights)
        release = Release(sha256(model), 1, 1, 1, b"", weights, len(model))
        publisher = ModelPublisher(GATEWAY, GATEWAY.id, "", peer.publish)
        publisher.publish(release)
        assert chunk_count(release.size) == 2
        peer.task(device, release.digest)
        reply = peer.next("reply")
        assert reply.ctx.base == release.digest
        delta, _ = schemas.decode_update(reply.attachment)
        assert delta["big"].shape == (300, 300)
    finally:
        stop.set()
        thread.join(20)


def test_a_model_that_does_not_hash_to_the_tasks_digest_is_refused(peer, start_agent, model):
    device = Identity.generate()
    agent = start_agent(device, AgentState(GATEWAY.id, enrolled=True, trusted_version=0))
    wire_a, _ = peer.release(model.get_weights(), version=1, publish=False)
    _, digest_b = peer.release({k: v + 1 for k, v in model.get_weights().items()}, version=1, publish=False)
    # A broker (untrusted) serves model A under the address of model B.
    peer.publish(topics.model(GATEWAY.id, digest_b.hex()), wire_a, retain=True)
    peer.task(device, digest_b)
    peer.nothing("reply")
    assert refusals(agent) == {"model_digest_mismatch": 1}


def test_a_reply_left_on_disk_by_a_power_cut_is_sent_at_start(peer, start_agent, tmp_path):
    device = Identity.generate()
    ctx = envelope.Context(device.public_key, GATEWAY.id, 7, "train-7", b"\x01" * 32)
    wire = envelope.seal(device, "reply", ctx, {"examples": 3}, schemas.encode_update({}, {"loss": 1.0, "accuracy": 0.5}))
    StateStore(tmp_path / f"state-{device.id}").put_pending("000007-train-7", wire)
    start_agent(device, AgentState(GATEWAY.id, enrolled=True, trusted_version=0))
    assert peer.next("reply").sig == envelope.decode(wire).sig


def test_a_release_that_never_expires_is_refused(peer, start_agent, model):
    device = Identity.generate()
    agent = start_agent(device, AgentState(GATEWAY.id, enrolled=True, trusted_version=0))
    digest = peer.release(not_flashed(model), version=1, expires=0.0)  # what "no expiry" used to be
    peer.task(device, digest)
    peer.nothing("reply")
    assert refusals(agent) == {"model_no_expiry": 1}
    assert agent.state.trusted_version == 0


def test_a_second_digest_under_a_version_already_trusted_is_refused(peer, start_agent, model):
    device = Identity.generate()
    agent = start_agent(device, AgentState(GATEWAY.id, enrolled=True, trusted_version=0), resend_s=60.0)
    weights = not_flashed(model)
    first = peer.release(weights, version=1)
    peer.task(device, first)
    peer.next("reply")
    assert StateStore(agent.config.state_dir).load(GATEWAY.id).trusted_digest == first.hex()  # kept on disk
    other = peer.release({k: v + 1 for k, v in weights.items()}, version=1)  # signed, fresh, same version
    peer.task(device, other, round_=2)
    peer.nothing("reply")
    assert refusals(agent) == {"model_version_conflict": 1}
    assert (agent.state.trusted_version, agent.state.trusted_digest) == (1, first.hex())


def test_a_release_signed_long_before_the_newest_one_known_is_refused_as_frozen(peer, start_agent, model):
    # The device has seen a release that expires in 10 days; this one (a higher version, not expired)
    # expires in an hour: more than the default freeze window (1 day) older than what the device knows.
    device = Identity.generate()
    agent = start_agent(device, AgentState(GATEWAY.id, enrolled=True, trusted_version=0,
                                           newest_expires=time.time() + 10 * 86400))
    digest = peer.release(model.get_weights(), version=1, expires_in=3600.0)
    peer.task(device, digest)
    peer.nothing("reply")
    assert refusals(agent) == {"model_frozen": 1}
    assert agent.state.trusted_version == 0


def test_a_restarted_gateway_republishing_its_model_with_a_fresh_expiry_is_accepted(peer, start_agent, model):
    # What releases.release_for(None, ...) does at a gateway's start: the same version, the same digest,
    # signed again with a later expiry. The device (restarted too: nothing cached) trusts that release.
    device = Identity.generate()
    weights = model.get_weights()
    _, digest = peer.release(weights, version=1, publish=False)
    seen = time.time() + 3600.0
    agent = start_agent(device, AgentState(GATEWAY.id, enrolled=True, trusted_version=1, trusted_digest=digest.hex(),
                                           newest_expires=seen))
    assert peer.release(weights, version=1, expires_in=7200.0) == digest
    peer.task(device, digest)
    reply = peer.next("reply")
    assert reply.ctx.base == digest and agent.counters.refused_tasks == {}
    kept = StateStore(agent.config.state_dir).load(GATEWAY.id)
    assert (kept.trusted_version, kept.trusted_digest) == (1, digest.hex()) and kept.newest_expires > seen + 3000


# --- the release rules one by one, on an agent that is not running --------------------------------


@pytest.fixture
def idle_agent(model, data, tmp_path):
    def make(state: AgentState, freeze_window_s: float = 86400.0) -> Agent:
        config = AgentConfig(name="idle", key=tmp_path / "k", state_dir=tmp_path / "idle", gateway_id=GATEWAY.id,
                             gateway_public_key=GATEWAY.public_key, broker_host="127.0.0.1", broker_port=1,
                             replay=None, freeze_window_s=freeze_window_s)
        StateStore(config.state_dir).save(state)
        return Agent(config, Identity.generate(), model, data)

    return make


def _release(version: int, expires: float, digest: bytes = b"\x01" * 32) -> schemas.ModelRelease:
    return schemas.ModelRelease(digest, version, "", expires, 10, 1)


def refused_for(agent: Agent, release: schemas.ModelRelease) -> str:
    from agent.downloads import Refused

    try:
        agent.downloads.check_release(release, release.digest)
    except Refused as exc:
        return exc.reason
    return "accepted"


def test_the_freeze_window_bounds_how_much_older_an_expiry_may_be_than_the_newest_known(idle_agent):
    newest = time.time() + 30 * 86400
    agent = idle_agent(AgentState(GATEWAY.id, True, 3, [], "01" * 32, newest), freeze_window_s=3600.0)
    assert refused_for(agent, _release(3, newest - 3600.0)) == "accepted"  # at the edge of the window
    assert refused_for(agent, _release(4, newest - 3600.0)) == "accepted"
    assert refused_for(agent, _release(3, newest - 3601.0)) == "model_frozen"  # a stale copy of the trusted one
    assert refused_for(agent, _release(9, newest - 3601.0)) == "model_frozen"  # even at a higher version
    assert refused_for(agent, _release(2, newest)) == "model_rollback"  # lower: rollback, whatever its expiry
    assert refused_for(agent, _release(3, newest, b"\x02" * 32)) == "model_version_conflict"
    assert refused_for(agent, _release(4, newest, b"\x02" * 32)) == "accepted"  # a new version, a new digest
    assert refused_for(agent, _release(3, time.time() - 1)) == "model_expired"  # expired before frozen


def test_a_state_from_before_digests_takes_the_next_release_at_its_version_as_that_versions_digest(idle_agent):
    agent = idle_agent(AgentState(GATEWAY.id, True, 3))  # an old state file: no digest, no expiry
    first = _release(3, time.time() + 3600)
    assert refused_for(agent, first) == "accepted"
    agent.downloads.remember(first)
    again = StateStore(agent.config.state_dir).load(GATEWAY.id)
    assert (again.trusted_version, again.trusted_digest, again.newest_expires) == (3, "01" * 32, first.expires)
    assert refused_for(agent, _release(3, time.time() + 7200, b"\x02" * 32)) == "model_version_conflict"


def test_accepting_the_same_release_again_writes_nothing(idle_agent):
    release = _release(3, time.time() + 3600)
    agent = idle_agent(AgentState(GATEWAY.id, True, 3, [], "01" * 32, release.expires))
    saves = []
    agent.store.save = saves.append
    agent.downloads.remember(release)
    agent.downloads.remember(_release(3, release.expires - 60))  # an older copy, within the window
    assert saves == []
    agent.downloads.remember(_release(3, release.expires + 60))  # republished with a fresh expiry
    assert len(saves) == 1 and agent.state.newest_expires == release.expires + 60


# --- the gateway's key rotated by the city's root key ------------------------------------------------


@pytest.fixture
def rotation(peer):
    """Publish a rotation chain retained on the gateway's keys topic; cleared afterwards (the broker is shared)."""
    def publish(chain: Chain) -> None:
        peer.publish(topics.keys(GATEWAY.id), chain.encode(), retain=True)

    yield publish
    peer.publish(topics.keys(GATEWAY.id), b"", retain=True)


def _key_after(agent: Agent, key: bytes, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while agent.gateway_key != key and time.monotonic() < end:
        time.sleep(0.05)
    return agent.gateway_key == key


def test_a_task_signed_by_a_rotated_out_gateway_key_is_refused_and_the_new_key_is_followed(
        peer, start_agent, model, rotation):
    root, new = Identity.generate(), Identity.generate()
    device = Identity.generate()
    agent = start_agent(device, AgentState(GATEWAY.id, enrolled=True), root_key=root.public_key)
    rotation(Chain((issue(root, GATEWAY.public_key, new.public_key),)))
    assert _key_after(agent, new.public_key)
    weights = model.get_weights()
    digest = peer.release(weights, version=1, signer=new)
    peer.task(device, digest, round_=1, signer=GATEWAY)  # the retired key: perhaps stolen
    peer.nothing("reply")
    assert refusals(agent) == {"key_rotated": 1}
    peer.task(device, digest, round_=2, signer=new)
    assert peer.next("reply").ctx.round == 2
    kept = StateStore(agent.config.state_dir).load(GATEWAY.id)  # it outlives a restart
    assert (kept.gateway_key, kept.retired_keys) == (new.public_key.hex(), [GATEWAY.public_key.hex()])


def test_a_rotation_not_signed_by_the_root_key_or_without_one_configured_changes_nothing(
        peer, start_agent, model, rotation):
    root, forger, new = Identity.generate(), Identity.generate(), Identity.generate()
    trusting = start_agent(Identity.generate(), AgentState(GATEWAY.id, enrolled=True), root_key=root.public_key)
    pinned = start_agent(Identity.generate(), AgentState(GATEWAY.id, enrolled=True))
    rotation(Chain((issue(forger, GATEWAY.public_key, new.public_key),)))
    assert refusals(trusting) == {"bad_rotation": 1} and refusals(pinned) == {"no_root_key": 1}
    assert trusting.gateway_key == pinned.gateway_key == GATEWAY.public_key
    digest = peer.release(model.get_weights(), version=1, signer=new)
    peer.task(trusting.identity, digest, signer=new)
    peer.nothing("reply")
    assert trusting.counters.refused_tasks == {"bad_rotation": 1, "not_from_gateway": 1}
    peer.publish(topics.keys(GATEWAY.id), b"\xa1\x61", retain=True)  # garbage: counted, nothing changes
    deadline = time.monotonic() + 10
    while sum(trusting.counters.refused_tasks.values()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(trusting.counters.refused_tasks.values()) == 3 and trusting.gateway_key == GATEWAY.public_key
