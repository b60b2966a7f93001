"""Delta downloads on a real broker: a device holding the task's delta base rebuilds the model from the signed
delta; one without it, and one handed a bad delta (forged, corrupt, oversize, expired, for another base, not
rebuilding the digest), fetches the full release instead, counts why, and answers its task all the same."""

from __future__ import annotations

import time

import numpy as np
import pytest
import test_agent_service as service_tests
from test_agent_service import GATEWAY, ROGUE, enrolled

from agent.state import AgentState
from protocol import cbor, envelope, schemas, topics
from protocol.keys import Identity
from protocol.tensors import delta_step

# test_agent_service's fixtures: its broker, model, replay data, hand-driven gateway and agent starter
broker, model, data, peer, start_agent = (service_tests.broker, service_tests.model, service_tests.data,
                                          service_tests.peer, service_tests.start_agent)


def send_task(peer, device: Identity, base: bytes, round_: int, delta_base: bytes = b"") -> None:
    cfg = schemas.TrainConfig(epochs=1, batch_size=32, lr=0.1, deadline=time.time() + 60)
    body = schemas.Task("train", device.id, cfg, "i8", delta_base=delta_base).to_body()
    ctx = envelope.Context(GATEWAY.public_key, GATEWAY.id, round_, f"train-{round_}", base)
    peer.publish(topics.task(GATEWAY.id, device.id), envelope.seal(GATEWAY, "task", ctx, body))


def reply_to(peer, device: Identity, round_: int) -> envelope.Envelope:
    """The reply for `round_` (earlier rounds' resends are skipped), receipted."""
    while True:
        reply = peer.next("reply")
        if reply.ctx.round == round_:
            peer.receipt(device, reply)
            return reply


def moved(weights: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in weights.items()}


def delta_wire(base: bytes, target: bytes, version: int, data: bytes, codec: str = "i8",
               signer: Identity = GATEWAY, expires_in: float = 3600.0, **body_changes) -> bytes:
    body = schemas.ModelDelta(b"", target, base, version, "", time.time() + expires_in, len(data), codec).to_body()
    ctx = envelope.Context(signer.public_key, GATEWAY.id, version, "model", b"")
    wire = envelope.seal(signer, "delta", ctx, {**body, **body_changes}, data)
    return wire


def first_round(peer, start_agent, model):
    """A device that trained round 1 on release 1 (fetched whole: not the model it was flashed with):
    (device, agent, weights, digest)."""
    device = Identity.generate()
    agent = start_agent(device)
    enrolled(peer, device)
    weights = moved(model.get_weights(), 1)
    digest = peer.release(weights, version=1)
    send_task(peer, device, digest, 1)
    reply_to(peer, device, 1)
    return device, agent, weights, digest


def second_release(peer, weights, codec: str = "i8"):
    """Release 2 as a gateway makes it: the base plus the delta; (its digest, the delta attachment)."""
    tensors, rebuilt = delta_step(weights, moved(weights, 2), codec)
    return peer.release(rebuilt, version=2), schemas.encode_delta(tensors)


@pytest.mark.parametrize("codec", ["i8", "f16"])
def test_a_device_holding_the_base_rebuilds_the_release_from_its_delta(peer, start_agent, model, codec):
    device, agent, weights, first = first_round(peer, start_agent, model)
    digest, data = second_release(peer, weights, codec)
    peer.publish(topics.model_delta(GATEWAY.id, digest.hex()), delta_wire(first, digest, 2, data, codec), retain=True)
    send_task(peer, device, digest, 2, delta_base=first)
    assert reply_to(peer, device, 2).ctx.base == digest
    assert agent.counters.downloads == {"full": 1, "delta": 1}
    assert agent.counters.delta_refused == {} and agent.counters.refused_tasks == {}
    assert agent.state.trusted_version == 2 and agent.state.trusted_digest == digest.hex()
    assert agent.downloads.cached == [digest]  # only the newest model stays in memory


def test_a_new_device_needs_no_download_for_the_model_it_was_flashed_with(peer, start_agent, model):
    """A lineage starts from the family's initial weights, which a new device already holds: it trains on
    them without fetching anything, and takes the next release as a delta from them."""
    device = Identity.generate()
    agent = start_agent(device)
    enrolled(peer, device)
    weights = model.get_weights()  # what the agent was started with
    first = peer.release(weights, version=1)
    send_task(peer, device, first, 1)
    assert reply_to(peer, device, 1).ctx.base == first
    assert agent.counters.downloads == {}
    digest, data = second_release(peer, weights)
    peer.publish(topics.model_delta(GATEWAY.id, digest.hex()), delta_wire(first, digest, 2, data), retain=True)
    send_task(peer, device, digest, 2, delta_base=first)
    assert reply_to(peer, device, 2).ctx.base == digest
    assert agent.counters.downloads == {"delta": 1} and agent.state.trusted_digest == digest.hex()


def test_a_device_that_trusts_a_release_starts_without_the_flashed_model(start_agent, model):
    """Once it trusts a release, a restarted device keeps nothing it did not fetch: a task naming the initial
    model goes through the release checks (the rollback rule among them) like any other."""
    agent = start_agent(Identity.generate(), AgentState(GATEWAY.id, enrolled=True, trusted_version=3,
                                                        trusted_digest=bytes(32).hex()))
    assert agent.downloads.cached == []


def test_a_device_without_the_base_fetches_the_full_model_without_waiting(peer, start_agent, model):
    device = Identity.generate()
    agent = start_agent(device)
    enrolled(peer, device)
    weights = moved(model.get_weights(), 1)
    first = peer.release(weights, version=1)
    digest, data = second_release(peer, weights)
    peer.publish(topics.model_delta(GATEWAY.id, digest.hex()), delta_wire(first, digest, 2, data), retain=True)
    started = time.monotonic()
    send_task(peer, device, digest, 2, delta_base=first)  # it missed release 1
    assert reply_to(peer, device, 2).ctx.base == digest
    assert time.monotonic() - started < 10  # no delta wait: it knew it lacked the base
    assert agent.counters.downloads == {"full": 1} and agent.counters.delta_refused == {}


def corrupt(data: bytes) -> bytes:
    """A well-formed delta whose first value moved by one step: signed anew, it no longer rebuilds the digest."""
    doc = cbor.loads(data)
    first = bytearray(doc["tensors"][0]["data"])
    first[0] = (first[0] + 1) % 256 if first[0] != 127 else 126
    doc["tensors"][0]["data"] = bytes(first)
    return cbor.dumps(doc)


BAD_DELTAS = {
    "forged": (lambda first, digest, data: delta_wire(first, digest, 2, data, signer=ROGUE), "not_from_gateway"),
    "bytes_changed_after_signing": (
        lambda first, digest, data: _swap_attachment(delta_wire(first, digest, 2, data), corrupt(data)),
        "digest_mismatch"),
    "does_not_rebuild_the_digest": (lambda first, digest, data: delta_wire(first, digest, 2, corrupt(data)),
                                    "delta_digest_mismatch"),
    "another_base": (lambda first, digest, data: delta_wire(bytes(32), digest, 2, data), "delta_base_mismatch"),
    "expired": (lambda first, digest, data: delta_wire(first, digest, 2, data, expires_in=-60), "model_expired"),
    "oversize": (lambda first, digest, data: delta_wire(first, digest, 2, data, size=schemas.MAX_DELTA_BYTES + 1),
                 "limits"),
    "wrong_size": (lambda first, digest, data: delta_wire(first, digest, 2, data, size=len(data) + 1),
                   "delta_size_mismatch"),
    "wrong_codec": (lambda first, digest, data: delta_wire(first, digest, 2, data, codec="f16"), "schema"),
    "garbage": (lambda first, digest, data: b"\xff" * 64, None),
}


def _swap_attachment(wire: bytes, attachment: bytes) -> bytes:
    doc = cbor.loads(wire)
    doc["att"] = attachment
    return cbor.dumps(doc)


@pytest.mark.parametrize("case", sorted(BAD_DELTAS))
def test_a_bad_delta_is_refused_with_its_reason_and_the_full_model_is_used(peer, start_agent, model,
                                                                          case):
    device, agent, weights, first = first_round(peer, start_agent, model)
    digest, data = second_release(peer, weights)
    make, reason = BAD_DELTAS[case]
    peer.publish(topics.model_delta(GATEWAY.id, digest.hex()), make(first, digest, data), retain=True)
    send_task(peer, device, digest, 2, delta_base=first)
    assert reply_to(peer, device, 2).ctx.base == digest  # trained on the full release all the same
    assert agent.counters.downloads == {"full": 2}
    assert sum(agent.counters.delta_refused.values()) == 1, agent.counters.delta_refused
    if reason is not None:
        assert list(agent.counters.delta_refused) == [reason]
    assert agent.counters.refused_tasks == {}


def test_a_delta_that_never_comes_is_given_up_for_the_full_model(peer, start_agent, model, monkeypatch):
    import agent.downloads

    monkeypatch.setattr(agent.downloads, "DELTA_WAIT_S", 0.5)
    device, agent_, weights, first = first_round(peer, start_agent, model)
    digest, _ = second_release(peer, weights)
    send_task(peer, device, digest, 2, delta_base=first)  # named, never published (or cleared meanwhile)
    assert reply_to(peer, device, 2).ctx.base == digest
    assert agent_.counters.delta_refused == {"delta_unavailable": 1} and agent_.counters.downloads == {"full": 2}
