"""Hostile replies against the gateway's ingest path (`ReplyIntake.handle`, what the worker thread calls).

Mutants of a real, signed reply (bytes flipped, cut, CBOR restructured, or
re-signed by an enrolled attacker with a hostile update) must each come back as
one counted rejection with a reason the gateway defines (or, for the exact
bytes of a reply already accepted in this round, one counted duplicate);
nothing may raise or log a traceback, the honest device's open task must stay
open, and its real reply must still be accepted after the flood.
"""

from __future__ import annotations

import time

import numpy as np
import tally
import world
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mutants import Mutator

from gateway.ingest import EVALUATE_METRICS, Accepted, Authenticator, Duplicate, OpenTask, Rejected, Skipped
from gateway.intake import ReplyIntake
from gateway.journal import Journal
from gateway.outbox import Outbox
from gateway.rounds import RoundBook
from protocol import schemas, topics

# The reasons gateway/ingest.py defines (its module docstring); internal_error means a checker bug.
REPLY_REASONS = {
    "malformed", "non_canonical", "schema", "topic_mismatch", "wrong_gateway", "revoked", "unknown_device",
    "bad_signature", "digest_mismatch", "limits", "bad_tensor", "non_finite", "replay", "conflicting_reply",
    "stale_round", "not_selected", "wrong_round", "wrong_base", "late", "wrong_shape", "wrong_metrics", "wrong_codec",
}
FLOOD = 160 * 256  # 40,960
BATCH = 256  # what the gateway worker takes from its inbox at once
LINEAGE = 1


class Recorder:
    """Stands in for the MQTT publish: keeps the signed receipts the gateway sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes, retain: bool = False, counted: bool = True):
        self.sent.append((topic, payload))


def make_authenticator() -> Authenticator:
    enrolled = {world.DEVICE.public_key, world.HOSTILE.public_key}
    return Authenticator(world.GATEWAY.id, enrolled.__contains__, lambda key: key == world.REVOKED.public_key,
                         max_reply_bytes=64 * 1024)


def open_round(journal: Journal, authenticator: Authenticator, recorder: Recorder) -> tuple[RoundBook, ReplyIntake]:
    """A gateway in round 3 whose exchange has an open task for the honest device and one for the attacker."""
    book = RoundBook(journal.exchanges, authenticator.authenticate, authenticator.is_revoked, EVALUATE_METRICS,
                     lambda items: None)
    book.open("train", world.ROUND, world.TASK, world.BASE, LINEAGE, [
        OpenTask(f"m-{device.id}", device.id, device.public_key, "train", world.ROUND, world.TASK, world.BASE,
                 world.BASE_WEIGHTS, time.time() + 3600)
        for device in (world.DEVICE, world.HOSTILE)])
    return book, ReplyIntake(authenticator, book, Outbox(world.GATEWAY, world.GATEWAY.id, recorder))


def hostile_updates() -> list[bytes]:
    """Real update attachments the attacker may sign: the mutator bends them further."""
    d = world.delta()
    return [
        schemas.encode_update(d, world.TRAIN_METRICS),
        schemas.encode_update(d, world.TRAIN_METRICS, codec="f32"),
        schemas.encode_update(d, world.TRAIN_METRICS, codec="f16"),
        schemas.encode_update({"w": np.zeros((5, 3), np.float32), "b": d["b"]}, world.TRAIN_METRICS),
        schemas.encode_update(d, {"train_loss": 0.5}),
    ]


def test_a_flood_of_mutated_replies_is_refused_by_reason_and_the_honest_reply_still_counts(tmp_path):
    recorder = Recorder()
    journal = Journal(tmp_path / "rounds.db")
    authenticator = make_authenticator()
    honest = world.reply(world.DEVICE)
    attacker_seeds = [world.reply(world.HOSTILE, update=u) for u in hostile_updates()]
    attacker_seeds += [world.reply(world.HOSTILE, round_=world.ROUND + 1), world.reply(world.HOSTILE, base=bytes(32)),
                       world.skip_reply(world.HOSTILE)]
    mutator = Mutator(seed=8)
    honest_topic = topics.reply(world.GATEWAY.id, world.DEVICE.id)
    attacker_topic = topics.reply(world.GATEWAY.id, world.HOSTILE.id)
    outcomes: list = []
    books: list[RoundBook] = []
    started = time.monotonic()
    for start in range(0, FLOOD, BATCH):
        # A new exchange for each batch (both tasks opened again), so the attacker's re-signed mutants keep
        # reaching task matching; the honest device's task must come through every batch still open.
        book, intake = open_round(journal, authenticator, recorder)
        books.append(book)
        batch = []
        for _ in range(BATCH):
            if mutator.rng.random() < 0.5:  # the honest device's reply, bent: it can never verify again
                batch.append((honest_topic, mutator.mutate(honest), None))
            else:  # the attacker's own replies, often re-signed so that only their meaning is hostile
                batch.append((attacker_topic, mutator.mutate(mutator.rng.choice(attacker_seeds), world.HOSTILE, 0.4),
                              None))
        outcomes += intake.handle(batch)
        assert book.open_task(world.DEVICE.id, world.TASK) is not None
        assert book.accepted_reply(world.DEVICE.id, world.TASK) is None
    tally.count("gateway reply (in-process)", FLOOD)
    took = time.monotonic() - started

    rejections: dict[str, int] = {}
    for book in books:
        for reason, n in book.rejections.items():
            rejections[reason] = rejections.get(reason, 0) + n
    rejected = [o for o in outcomes if isinstance(o, Rejected)]
    duplicates = [o for o in outcomes if isinstance(o, Duplicate)]
    assert len(outcomes) == FLOOD and all(isinstance(o, Accepted | Skipped | Duplicate | Rejected) for o in outcomes)
    assert {o.reason for o in rejected} <= REPLY_REASONS, {o.reason for o in rejected} - REPLY_REASONS
    assert sum(rejections.values()) == len(rejected)  # every refusal counted, by its reason
    assert sum(b.duplicates for b in books) == len(duplicates) and all(o.device_id == world.HOSTILE.id
                                                                       for o in duplicates)
    # Only the attacker's own task may have been answered (a re-signed mutant can be a valid reply).
    settled = [o for o in outcomes if isinstance(o, Accepted | Skipped)]
    assert all(o.task.device_id == world.HOSTILE.id for o in settled)
    # Negative receipts go to authenticated senders only: the honest device's bent replies never verify.
    assert not [t for t, _ in recorder.sent if t == topics.receipt(world.GATEWAY.id, world.DEVICE.id)]
    # The flood reached deep: signature checks, update checks and task matching all refused something.
    assert {"bad_signature", "malformed", "schema", "non_canonical"} <= set(rejections)
    assert len(set(rejections)) >= 10, rejections

    (after,) = intake.handle([(honest_topic, honest, None)])
    assert isinstance(after, Accepted) and after.task.device_id == world.DEVICE.id
    # Each exchange's traffic counts only the refusals bound to its task, never more than were refused.
    traffic_rejected = 0
    for book in books:
        book.close({f"m-{world.DEVICE.id}", f"m-{world.HOSTILE.id}"})
        (traffic,) = book.take_closed()
        traffic_rejected += sum(traffic.rejected.values())
    assert 0 < traffic_rejected <= len(rejected)
    assert [a.task.device_id for a in traffic.accepted][-1] == world.DEVICE.id  # the last exchange has its reply
    print(f"\ngateway reply (in-process): {FLOOD} mutants in {took:.1f} s; rejections {rejections}")
    journal.close()


ANY_CBOR = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(ctx=ANY_CBOR, body=ANY_CBOR, att=st.none() | st.binary(max_size=64) | ANY_CBOR)
def test_any_signed_envelope_shape_on_the_reply_topic_is_a_counted_rejection(ctx, body, att):
    """Property: whatever ctx/body/attachment an enrolled device signs, the intake answers with a reason."""
    import cbor2

    from protocol import envelope

    tally.count("gateway reply (property)", 1)
    authenticator = Authenticator(world.GATEWAY.id, lambda key: key == world.HOSTILE.public_key)
    book = RoundBook(None, authenticator.authenticate, authenticator.is_revoked, EVALUATE_METRICS, lambda items: None)
    intake = ReplyIntake(authenticator, book, Outbox(world.GATEWAY, world.GATEWAY.id, Recorder()))
    doc = {"v": 1, "type": "reply", "ctx": ctx, "body": body, "sig": bytes(64)}
    if att is not None:
        doc["att"] = att
    try:
        doc["sig"] = world.HOSTILE.sign(envelope.DOMAIN + cbor2.dumps(
            {"v": 1, "type": "reply", "ctx": ctx, "body": body}, canonical=True))
        wire = cbor2.dumps(doc, canonical=True)
    except Exception:  # noqa: BLE001 (an arbitrary tree: encoding it fails in many ways)
        wire = b"\xa0"
    (outcome,) = intake.handle([(topics.reply(world.GATEWAY.id, world.HOSTILE.id), wire, None)])
    assert isinstance(outcome, Rejected) and outcome.reason in REPLY_REASONS
    assert book.rejections == {outcome.reason: 1}
