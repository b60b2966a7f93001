"""Reply admission: every reply is accepted, a duplicate, deferred, or rejected for one named reason.

The path is the gateway's own: stage 1 (`Authenticator`), stage 2 (`admission.admit`, applied by the
`RoundBook`), then the signed receipts (`ReplyIntake` with an `Outbox`), here with no journal and a
recording publish. Tasks are opened the way the grid opens them, with `book.open`.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from gateway.ingest import EVALUATE_METRICS, Accepted, Authenticator, Deferred, Duplicate, OpenTask, Rejected
from gateway.intake import ReplyIntake
from gateway.journal import Interrupted
from gateway.outbox import Outbox
from gateway.rounds import REMEMBER_ROUNDS, Reopening, RoundBook
from protocol import envelope, schemas, topics
from protocol.keys import Identity

GATEWAY = Identity.from_seed(b"g" * 32)
DEVICE = Identity.from_seed(b"d" * 32)
STRANGER = Identity.from_seed(b"s" * 32)
BASE_WEIGHTS = {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}
BASE = b"\x01" * 32
LINEAGE = 1


class Harness:
    """Stage 1 + the round book + the intake, with a recording publish (the receipts) and requeue."""

    def __init__(self, is_enrolled=lambda key: key == DEVICE.public_key, is_revoked=lambda key: False,
                 max_reply_bytes: int = 1 << 20, interrupted: Interrupted | None = None) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.requeued: list[tuple[str, bytes]] = []
        self.authenticator = Authenticator(GATEWAY.id, is_enrolled, is_revoked, max_reply_bytes)
        self.book = RoundBook(None, self.authenticator.authenticate, is_revoked, EVALUATE_METRICS,
                              self.requeued.extend, interrupted)
        self.intake = ReplyIntake(self.authenticator, self.book, Outbox(GATEWAY, GATEWAY.id, self.publish))

    def publish(self, topic: str, payload: bytes, retain: bool = False, counted: bool = True) -> None:
        self.published.append((topic, payload))

    def open(self, kind: str = "train", round_: int = 3, deadline: float | None = None, task: str | None = None,
             device: Identity = DEVICE, codec: str = "i8", density: float = 0.1) -> OpenTask:
        """Open a one-device exchange, as the grid does when it pushes a round's tasks."""
        task = OpenTask(f"m-{kind}-{round_}", device.id, device.public_key, kind, round_, task or f"{kind}-{round_}",
                        BASE, BASE_WEIGHTS, deadline if deadline is not None else time.time() + 60, {}, codec, density)
        self.book.open(kind, round_, task.task, BASE, LINEAGE, [task])
        return task

    def check(self, topic: str, payload: bytes, first=None):
        (outcome,) = self.intake.handle([(topic, payload, first)])
        return outcome

    def receipts(self, identity: Identity = DEVICE) -> list[tuple[str, schemas.Receipt]]:
        """(task id, receipt) of each signed receipt sent to this device, in order."""
        out = []
        for topic_, payload in self.published:
            if topic_ == topics.receipt(GATEWAY.id, identity.id):
                env = envelope.decode(payload)
                env.verify(GATEWAY.public_key)
                out.append((env.ctx.task, schemas.Receipt.from_body(env.body)))
        return out


def make_checker(kind: str = "train", deadline: float | None = None, codec: str = "i8",
                 density: float = 0.1) -> Harness:
    """A gateway in round 3 with one open task of `kind` for DEVICE (a train task asking for `codec`)."""
    harness = Harness()
    harness.open(kind, 3, deadline, codec=codec, density=density)
    assert harness.book.current_round == 3
    return harness


def reply(identity=DEVICE, *, round_=3, task="train-3", base=BASE, gateway=None, delta=None, metrics=None,
          examples=10, codec="i8", density=0.1) -> bytes:
    delta = {k: np.full_like(v, 0.5) for k, v in BASE_WEIGHTS.items()} if delta is None else delta
    metrics = {"train_loss": 1.0, "steps": 3.0} if metrics is None else metrics
    ctx = envelope.Context(identity.public_key, gateway or GATEWAY.id, round_, task, base)
    update = schemas.encode_update(delta, metrics, codec, density)
    return envelope.seal(identity, "reply", ctx, {"examples": examples}, update)


def topic(identity=DEVICE) -> str:
    return topics.reply(GATEWAY.id, identity.id)


def reason(outcome) -> str:
    assert isinstance(outcome, Rejected), outcome
    return outcome.reason


def test_a_good_reply_is_accepted_with_its_dequantized_delta():
    harness = make_checker()
    outcome = harness.check(topic(), reply())
    assert isinstance(outcome, Accepted)
    assert outcome.examples == 10
    np.testing.assert_allclose(outcome.delta["w"], 0.5, atol=0.5 / 127)
    assert outcome.metrics == {"train_loss": 1.0, "steps": 3.0}
    assert [(t, r.accepted) for t, r in harness.receipts()] == [("train-3", True)]
    assert harness.book.rejections == {} and harness.book.duplicates == 0


def test_the_same_reply_twice_in_its_round_is_a_duplicate_not_a_rejection():
    # An agent re-sends a reply whose receipt is slow (at-least-once delivery): honest, not an attack.
    harness = make_checker()
    wire = reply()
    assert isinstance(harness.check(topic(), wire), Accepted)
    again = harness.check(topic(), wire)
    assert isinstance(again, Duplicate) and not isinstance(again, Rejected)
    assert (again.device_id, again.round, again.envelope.ctx.task) == (DEVICE.id, 3, "train-3")
    assert isinstance(harness.check(topic(), wire), Duplicate)  # as often as the device re-sends it
    assert harness.book.duplicates == 2 and harness.book.rejections == {}
    assert all(r.accepted for _, r in harness.receipts()) and len(harness.receipts()) == 3  # acknowledged again


def test_the_same_reply_after_the_round_moved_on_is_a_replay_still_acknowledged():
    harness = make_checker()
    wire = reply()
    assert isinstance(harness.check(topic(), wire), Accepted)
    harness.open("train", 4)  # the grid pushed round 4's tasks
    outcome = harness.check(topic(), wire)
    assert reason(outcome) == "replay" and outcome.authenticated and outcome.already_accepted
    assert harness.receipts()[-1][1].accepted  # acknowledged: the device stops re-sending
    assert harness.book.rejections == {"replay": 1}


def test_a_replay_of_a_forgotten_round_is_stale():
    harness = make_checker()
    wire = reply()
    assert isinstance(harness.check(topic(), wire), Accepted)
    harness.open("train", 3 + REMEMBER_ROUNDS + 1)  # round 3 is no longer remembered
    assert reason(harness.check(topic(), wire)) == "stale_round"


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"\xff\x00garbage", "malformed"),
        (b"", "malformed"),
        (b"\xa1\x61a\x01", "schema"),  # a valid CBOR map that is no envelope
    ],
)
def test_bytes_that_are_not_an_envelope_are_rejected(payload, expected):
    harness = make_checker()
    assert reason(harness.check(topic(), payload)) == expected
    assert harness.book.rejections == {expected: 1} and harness.published == []


def test_a_reply_from_an_unenrolled_key_is_unknown_device_and_gets_no_receipt():
    harness = make_checker()
    outcome = harness.check(topic(STRANGER), reply(STRANGER))
    assert reason(outcome) == "unknown_device" and not outcome.authenticated
    assert harness.published == []


def test_rejections_after_the_signature_check_are_authenticated_for_a_receipt():
    harness = make_checker()
    outcome = harness.check(topic(), reply(base=b"\x02" * 32))
    assert reason(outcome) == "wrong_base" and outcome.authenticated and not outcome.already_accepted
    ((task, receipt),) = harness.receipts()
    assert task == "train-3" and not receipt.accepted and receipt.reason == "wrong_base"


def test_a_reply_on_another_devices_topic_is_a_topic_mismatch():
    assert reason(make_checker().check(topic(STRANGER), reply())) == "topic_mismatch"


def test_a_reply_bound_to_another_gateway_is_refused():
    assert reason(make_checker().check(topic(), reply(gateway="0" * 32))) == "wrong_gateway"


def test_a_tampered_signature_is_bad_signature():
    wire = bytearray(reply())
    sig_at = bytes(wire).find(b"csig") + 6  # after the key and the byte-string header
    wire[sig_at] ^= 0x01
    assert reason(make_checker().check(topic(), bytes(wire))) == "bad_signature"


def test_a_reply_for_another_base_model_is_wrong_base():
    assert reason(make_checker().check(topic(), reply(base=b"\x02" * 32))) == "wrong_base"


def test_a_reply_for_an_older_round_is_stale():
    assert reason(make_checker().check(topic(), reply(round_=2, task="train-2"))) == "stale_round"


def test_a_reply_for_a_task_never_sent_is_not_selected():
    assert reason(make_checker().check(topic(), reply(round_=3, task="train-9"))) == "not_selected"


def test_a_reply_with_the_right_task_but_another_round_is_wrong_round():
    assert reason(make_checker().check(topic(), reply(round_=4))) == "wrong_round"


def test_a_reply_after_the_deadline_is_late():
    harness = make_checker(deadline=time.time() - 1)
    assert reason(harness.check(topic(), reply())) == "late"


def test_a_reply_after_its_exchange_closed_is_late():
    harness = make_checker()
    harness.book.close({"m-train-3"})
    assert reason(harness.check(topic(), reply())) == "late"


def test_a_delta_of_the_wrong_shape_is_refused():
    delta = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}
    assert reason(make_checker().check(topic(), reply(delta=delta))) == "wrong_shape"


@pytest.mark.parametrize("asked, sent", [("i8", "f32"), ("i8", "topk"), ("f16", "i8"), ("topk", "i8"), ("topk", "f32")])
def test_an_update_in_another_codec_than_its_task_asked_for_is_refused(asked, sent):
    outcome = make_checker(codec=asked).check(topic(), reply(codec=sent))
    assert reason(outcome) == "wrong_codec" and asked in outcome.detail and sent in outcome.detail


def test_a_sparse_update_denser_than_its_task_allows_is_refused():
    delta = {k: np.random.default_rng(1).normal(size=v.shape).astype(np.float32) for k, v in BASE_WEIGHTS.items()}
    assert isinstance(make_checker(codec="topk", density=0.25).check(topic(), reply(delta=delta, codec="topk",
                                                                                     density=0.25)), Accepted)
    outcome = make_checker(codec="topk", density=0.25).check(topic(), reply(delta=delta, codec="topk", density=0.5))
    assert reason(outcome) == "wrong_codec" and "density 0.25" in outcome.detail


def test_a_delta_with_non_finite_values_cannot_even_be_sent():
    # The codec refuses NaN at encode time; a forged attachment with NaN is refused at decode time.
    from protocol import cbor

    tensors = schemas.encode_update({k: np.zeros_like(v) for k, v in BASE_WEIGHTS.items()}, {"train_loss": 1.0, "steps": 1.0}, "f32")
    doc = cbor.loads(tensors)
    doc["tensors"][0]["data"] = np.full(12, np.nan, np.float32).tobytes()
    attachment = cbor.dumps(doc)
    ctx = envelope.Context(DEVICE.public_key, GATEWAY.id, 3, "train-3", BASE)
    wire = envelope.seal(DEVICE, "reply", ctx, {"examples": 5}, attachment)
    assert reason(make_checker().check(topic(), wire)) == "non_finite"


def test_a_train_reply_without_the_expected_metrics_is_refused():
    assert reason(make_checker().check(topic(), reply(metrics={"loss": 1.0}))) == "wrong_metrics"


def test_an_evaluation_with_accuracy_out_of_range_is_refused():
    harness = make_checker("evaluate")
    wire = reply(task="evaluate-3", delta={}, metrics={"loss": 1.0, "accuracy": 1.5})
    assert reason(harness.check(topic(), wire)) == "wrong_metrics"


def test_a_good_evaluation_is_accepted():
    harness = make_checker("evaluate")
    wire = reply(task="evaluate-3", delta={}, metrics={"loss": 1.0, "accuracy": 0.75})
    outcome = harness.check(topic(), wire)
    assert isinstance(outcome, Accepted) and outcome.metrics["accuracy"] == 0.75


def test_random_bytes_never_raise():
    rng = np.random.default_rng(0)
    harness = make_checker()
    good = reply()
    for i in range(300):
        data = bytearray(good)
        data[rng.integers(len(data))] = rng.integers(256)
        outcome = harness.check(topic(), bytes(data[: rng.integers(1, len(data) + 1)] if i % 2 else data))
        assert isinstance(outcome, (Accepted, Duplicate, Rejected))
        assert getattr(outcome, "reason", "") != "internal_error", outcome


def test_an_oversize_reply_is_refused_before_it_is_decoded():
    harness = Harness(is_enrolled=lambda key: True, max_reply_bytes=1000)
    outcome = harness.check(topic(), b"\xff" * 1001)  # not even CBOR: size is checked first
    assert reason(outcome) == "limits"


def test_stage_one_done_elsewhere_is_trusted_and_not_repeated():
    harness = make_checker()
    wire = reply()
    first = Authenticator(GATEWAY.id, lambda key: True).authenticate(topic(), wire)
    harness.authenticator.authenticate = None  # a second signature check would fail loudly
    assert isinstance(harness.check(topic(), wire, first=first), Accepted)


def test_a_worker_whose_enrolled_keys_lag_does_not_cost_an_enrolled_device_its_reply():
    harness = make_checker()
    wire = reply()
    stale = Authenticator(GATEWAY.id, lambda key: False).authenticate(topic(), wire)
    assert reason(stale) == "unknown_device"
    assert isinstance(harness.check(topic(), wire, first=stale), Accepted)


def test_a_worker_whose_revocations_lag_cannot_let_a_revoked_device_in():
    revoked = set()
    harness = Harness(is_enrolled=lambda key: True, is_revoked=revoked.__contains__)
    harness.open("train", 3)
    wire = reply()
    first = Authenticator(GATEWAY.id, lambda key: True).authenticate(topic(), wire)  # before the revocation
    revoked.add(DEVICE.public_key)
    assert reason(harness.check(topic(), wire, first=first)) == "revoked"
    assert harness.book.open_task(DEVICE.id, "train-3") is not None  # nothing answered its task


def test_a_different_reply_to_an_answered_task_is_a_conflicting_reply_not_a_replay():
    harness = make_checker()
    assert isinstance(harness.check(topic(), reply()), Accepted)
    other = reply(delta={k: np.full_like(v, -0.5) for k, v in BASE_WEIGHTS.items()})
    outcome = harness.check(topic(), other)
    assert reason(outcome) == "conflicting_reply" and outcome.authenticated and not outcome.already_accepted


def test_a_reply_to_an_interrupted_exchange_is_deferred_until_it_re_opens_then_admitted():
    """After a restart the broker hands over what queued while the gateway was down, before the round
    engine re-opens the exchange a crash left: such a reply is held (no receipt, no rejection) and admitted
    once `book.open` re-opens that exchange, which hands it back through `requeue`."""
    interrupted = Interrupted("train-3-old.1", LINEAGE, 3, BASE, [DEVICE.node_id], [], closed=False, recorded=False)
    harness = Harness(interrupted=interrupted)
    wire = reply(task="train-3-old.1")
    outcome = harness.check(topic(), wire)
    assert isinstance(outcome, Deferred) and not isinstance(outcome, Rejected)
    assert (outcome.device_id, outcome.task) == (DEVICE.id, "train-3-old.1")
    assert harness.published == [] and harness.book.rejections == {} and harness.requeued == []
    # The grid asks whether the round it is about to push is the interrupted one: its own id and devices.
    assert harness.book.resume_for("train", 3) == Reopening("train-3-old.1", [DEVICE.node_id], {})
    restored = harness.book.open("train", 3, "train-3-old.1", BASE, LINEAGE, [OpenTask(
        "m-resumed", DEVICE.id, DEVICE.public_key, "train", 3, "train-3-old.1", BASE, BASE_WEIGHTS, time.time() + 60)])
    assert restored == set()  # nothing was journaled before the interruption
    assert harness.requeued == [(topic(), wire)]  # handed back to the intake
    assert not harness.book.is_reopening("train-3-old.1")
    (admitted,) = harness.intake.handle([(t, p, None) for t, p in harness.requeued])
    assert isinstance(admitted, Accepted) and admitted.task.message_id == "m-resumed"
    assert [(t, r.accepted) for t, r in harness.receipts()] == [("train-3-old.1", True)]
    assert harness.book.rejections == {} and harness.book.take_replies({"m-resumed"})[0][1] is admitted
