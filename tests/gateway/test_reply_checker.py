"""ReplyChecker: every reply is accepted or rejected for one named reason."""

from __future__ import annotations

import time

import numpy as np
import pytest

from gateway.ingest import Accepted, Authenticator, Duplicate, OpenTask, Rejected, ReplyChecker
from protocol import envelope, schemas, topics
from protocol.keys import Identity

GATEWAY = Identity.from_seed(b"g" * 32)
DEVICE = Identity.from_seed(b"d" * 32)
STRANGER = Identity.from_seed(b"s" * 32)
BASE_WEIGHTS = {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}
BASE = b"\x01" * 32


def make_checker(kind: str = "train", deadline: float | None = None) -> ReplyChecker:
    checker = ReplyChecker(GATEWAY.id, lambda key: key == DEVICE.public_key)
    checker.current_round = 3
    task = OpenTask("m1", DEVICE.id, DEVICE.public_key, kind, 3, f"{kind}-3", BASE, BASE_WEIGHTS,
                    deadline if deadline is not None else time.time() + 60)
    checker.open[(DEVICE.id, task.task)] = task
    return checker


def reply(identity=DEVICE, *, round_=3, task="train-3", base=BASE, gateway=None, delta=None, metrics=None,
          examples=10) -> bytes:
    delta = {k: np.full_like(v, 0.5) for k, v in BASE_WEIGHTS.items()} if delta is None else delta
    metrics = {"train_loss": 1.0, "steps": 3.0} if metrics is None else metrics
    ctx = envelope.Context(identity.public_key, gateway or GATEWAY.id, round_, task, base)
    return envelope.seal(identity, "reply", ctx, {"examples": examples}, schemas.encode_update(delta, metrics))


def topic(identity=DEVICE) -> str:
    return topics.reply(GATEWAY.id, identity.id)


def reason(outcome) -> str:
    assert isinstance(outcome, Rejected), outcome
    return outcome.reason


def test_a_good_reply_is_accepted_with_its_dequantized_delta():
    outcome = make_checker().check(topic(), reply())
    assert isinstance(outcome, Accepted)
    assert outcome.examples == 10
    np.testing.assert_allclose(outcome.delta["w"], 0.5, atol=0.5 / 127)
    assert outcome.metrics == {"train_loss": 1.0, "steps": 3.0}


def test_the_same_reply_twice_in_its_round_is_a_duplicate_not_a_rejection():
    # An agent re-sends a reply whose receipt is slow (at-least-once delivery): honest, not an attack.
    checker = make_checker()
    wire = reply()
    assert isinstance(checker.check(topic(), wire), Accepted)
    again = checker.check(topic(), wire)
    assert isinstance(again, Duplicate) and not isinstance(again, Rejected)
    assert (again.device_id, again.round, again.envelope.ctx.task) == (DEVICE.id, 3, "train-3")
    assert isinstance(checker.check(topic(), wire), Duplicate)  # as often as the device re-sends it


def test_the_same_reply_after_the_round_moved_on_is_a_replay_still_acknowledged():
    checker = make_checker()
    wire = reply()
    assert isinstance(checker.check(topic(), wire), Accepted)
    checker.current_round = 4  # the grid pushed round 4's tasks
    outcome = checker.check(topic(), wire)
    assert reason(outcome) == "replay" and outcome.authenticated and outcome.already_accepted


def test_a_replay_of_a_forgotten_round_is_stale():
    checker = make_checker()
    wire = reply()
    assert isinstance(checker.check(topic(), wire), Accepted)
    checker.current_round = 6
    checker.forget_before(4)
    assert reason(checker.check(topic(), wire)) == "stale_round"


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"\xff\x00garbage", "malformed"),
        (b"", "malformed"),
        (b"\xa1\x61a\x01", "schema"),  # a valid CBOR map that is no envelope
    ],
)
def test_bytes_that_are_not_an_envelope_are_rejected(payload, expected):
    assert reason(make_checker().check(topic(), payload)) == expected


def test_a_reply_from_an_unenrolled_key_is_unknown_device_and_gets_no_receipt():
    outcome = make_checker().check(topic(STRANGER), reply(STRANGER))
    assert reason(outcome) == "unknown_device" and not outcome.authenticated


def test_rejections_after_the_signature_check_are_authenticated_for_a_receipt():
    outcome = make_checker().check(topic(), reply(base=b"\x02" * 32))
    assert reason(outcome) == "wrong_base" and outcome.authenticated and not outcome.already_accepted


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
    checker = make_checker(deadline=time.time() - 1)
    assert reason(checker.check(topic(), reply())) == "late"


def test_a_delta_of_the_wrong_shape_is_refused():
    delta = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}
    assert reason(make_checker().check(topic(), reply(delta=delta))) == "wrong_shape"


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
    checker = make_checker("evaluate")
    wire = reply(task="evaluate-3", delta={}, metrics={"loss": 1.0, "accuracy": 1.5})
    assert reason(checker.check(topic(), wire)) == "wrong_metrics"


def test_a_good_evaluation_is_accepted():
    checker = make_checker("evaluate")
    wire = reply(task="evaluate-3", delta={}, metrics={"loss": 1.0, "accuracy": 0.75})
    outcome = checker.check(topic(), wire)
    assert isinstance(outcome, Accepted) and outcome.metrics["accuracy"] == 0.75


def test_random_bytes_never_raise():
    rng = np.random.default_rng(0)
    checker = make_checker()
    good = reply()
    for i in range(300):
        data = bytearray(good)
        data[rng.integers(len(data))] = rng.integers(256)
        outcome = checker.check(topic(), bytes(data[: rng.integers(1, len(data) + 1)] if i % 2 else data))
        assert isinstance(outcome, (Accepted, Duplicate, Rejected))


def test_an_oversize_reply_is_refused_before_it_is_decoded():
    checker = ReplyChecker(GATEWAY.id, lambda key: True, max_reply_bytes=1000)
    outcome = checker.check(topic(), b"\xff" * 1001)  # not even CBOR: size is checked first
    assert reason(outcome) == "limits"


def test_stage_one_done_elsewhere_is_trusted_and_not_repeated():
    checker = make_checker()
    wire = reply()
    first = Authenticator(GATEWAY.id, lambda key: True).authenticate(topic(), wire)
    checker.authenticator.authenticate = None  # a second signature check would fail loudly
    assert isinstance(checker.check(topic(), wire, first=first), Accepted)


def test_a_worker_whose_enrolled_keys_lag_does_not_cost_an_enrolled_device_its_reply():
    checker = make_checker()
    wire = reply()
    stale = Authenticator(GATEWAY.id, lambda key: False).authenticate(topic(), wire)
    assert reason(stale) == "unknown_device"
    assert isinstance(checker.check(topic(), wire, first=stale), Accepted)


def test_a_worker_whose_revocations_lag_cannot_let_a_revoked_device_in():
    revoked = set()
    checker = ReplyChecker(GATEWAY.id, lambda key: True, is_revoked=revoked.__contains__)
    task = make_checker().open
    checker.open.update(task)
    checker.current_round = 3
    wire = reply()
    first = Authenticator(GATEWAY.id, lambda key: True).authenticate(topic(), wire)  # before the revocation
    revoked.add(DEVICE.public_key)
    assert reason(checker.check(topic(), wire, first=first)) == "revoked"


def test_a_different_reply_to_an_answered_task_is_a_conflicting_reply_not_a_replay():
    checker = make_checker()
    assert isinstance(checker.check(topic(), reply()), Accepted)
    other = reply(delta={k: np.full_like(v, -0.5) for k, v in BASE_WEIGHTS.items()})
    outcome = checker.check(topic(), other)
    assert reason(outcome) == "conflicting_reply" and outcome.authenticated and not outcome.already_accepted
