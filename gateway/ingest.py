"""Checking a device's reply before anything else touches it.

`ReplyChecker.check` runs the checks cheapest first, so garbage and strangers
cost almost nothing and only enrolled devices cost a signature check. Stage 1
(`Authenticator`: bytes, sender, signature, the update itself) needs no round
state, so ingest worker processes can run it (see ingest_workers.py); stage 2
(`ReplyChecker.admit`) matches the reply to an open task:

    malformed / non_canonical / schema   the bytes are not a reply envelope
    topic_mismatch                        signed by a key other than the topic's device
    wrong_gateway                         bound to another gateway
    revoked                               the sender's key was revoked (device.revoke in the ledger)
    unknown_device                        the sender is not enrolled here
    bad_signature / digest_mismatch       the signature or attachment does not verify
    limits / bad_tensor / non_finite      the update is oversize, inconsistent or not finite
    --- stage 2
    replay                                this device's reply to this task was accepted in an earlier round
    conflicting_reply                     this device's task was answered with a different update
    stale_round / not_selected            no open task for this device and task id
    wrong_round / wrong_base              bound to another round or base model
    late                                  arrived after the round's deadline
    wrong_shape / wrong_metrics           the update does not fit the model or the task
    --- the grid
    internal_error                        the check itself failed (a bug): logged with its traceback, and
                                          only this reply is lost, not the rest of its batch

Two stage-2 outcomes are not rejections, and are not counted as such:

    Duplicate                             the exact reply (same device, task and update digest) accepted
                                          in the current round, sent again: agents deliver at least once
                                          and re-send when a receipt is slow. Acknowledged again (an
                                          accepted receipt), counted as a duplicate, changes nothing
    Rejected("deferred")                  a reply to a round a crash interrupted: held until it re-opens

Every outcome is a value, never an exception: a gateway must outlive any input.
Only senders whose signature verified get a (signed) negative receipt: signing
an answer to every piece of garbage would let anyone make the gateway burn
CPU and broker bandwidth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from protocol import envelope, schemas, topics
from protocol.errors import ProtocolError, SchemaError

TRAIN_METRICS = frozenset({"train_loss", "steps"})
EVALUATE_METRICS = frozenset({"loss", "accuracy"})  # a classifier's evaluation
# What an evaluate reply reports, by the model's task (its manifest's "task"): a self-supervised
# autoencoder has no accuracy, but a reconstruction loss and the 95th percentile of its errors.
EVALUATE_METRICS_BY_TASK = {
    "classification": EVALUATE_METRICS,
    "reconstruction": frozenset({"loss", "error_p95"}),
}


@dataclass
class OpenTask:
    """A task the gateway sent and awaits a reply for."""

    message_id: str
    device_id: str
    device_key: bytes
    kind: str  # "train" or "evaluate"
    round: int
    task: str
    base: bytes
    base_weights: dict[str, np.ndarray]
    deadline: float
    options: dict = field(default_factory=dict)

    @property
    def train_metrics(self) -> frozenset[str]:
        """What a train reply must report: with client-side clipping, whether it clipped."""
        return TRAIN_METRICS | ({"norm_bit"} if "clipping_norm" in self.options else set())


@dataclass(frozen=True)
class Accepted:
    """An accepted reply. It keeps the update as it arrived (int8: a quarter of float32) and
    dequantizes it only when asked, so a round's memory grows with the int8 size of its replies."""

    task: OpenTask
    envelope: envelope.Envelope
    metrics: dict[str, float]
    examples: int

    @property
    def delta(self) -> dict[str, np.ndarray]:
        return schemas.decode_update(self.envelope.attachment)[0]


@dataclass(frozen=True)
class Rejected:
    reason: str
    device_id: str  # "" when not even the topic names a device
    detail: str
    envelope: envelope.Envelope | None = None
    authenticated: bool = False  # the sender's signature verified: it may get a signed receipt
    already_accepted: bool = False  # a replay of a reply accepted in an earlier round: acknowledge it again


@dataclass(frozen=True)
class Duplicate:
    """The exact reply accepted in the current round, sent again (its device got no receipt in time).

    Honest at-least-once delivery, not an attack: the grid acknowledges it again and counts it apart
    from rejections. Only the same reply in a later round is a `replay`."""

    device_id: str
    round: int
    envelope: envelope.Envelope


@dataclass(frozen=True)
class Skipped:
    """A device sat its task out and said why (too hot, low power, out of budget): its task is closed."""

    task: OpenTask
    envelope: envelope.Envelope
    reason: str  # the device's own reason, e.g. "cpu_hot"

    @property
    def device_id(self) -> str:
        return self.task.device_id


@dataclass(frozen=True)
class Authenticated:
    """A reply whose bytes, sender and signature check out, not yet matched to a task.

    Plain data (it pickles): an ingest worker process hands these to the gateway."""

    envelope: envelope.Envelope
    reply: schemas.Reply
    shapes: dict[str, tuple[int, ...]]
    metrics: dict[str, float]


class Authenticator:
    """Stage 1, stateless but for the key sets: is this a well-formed reply, signed by an enrolled key?

    It runs in the gateway process, or in ingest worker processes that share the reply topic.
    """

    def __init__(
        self,
        gateway_id: str,
        is_enrolled: Callable[[bytes], bool],
        is_revoked: Callable[[bytes], bool] = lambda key: False,
        max_reply_bytes: int = 1 << 20,
    ) -> None:
        self.gateway_id = gateway_id
        self.is_enrolled = is_enrolled
        self.is_revoked = is_revoked
        self.max_reply_bytes = max_reply_bytes  # refused before decoding: oversize costs nothing

    def authenticate(self, topic: str, payload: bytes) -> Authenticated | Rejected:
        topic_device = topics.device_of(topic)
        if len(payload) > self.max_reply_bytes:
            return Rejected("limits", topic_device, f"{len(payload)} bytes, limit {self.max_reply_bytes}")
        try:
            env = envelope.decode(payload)
        except ProtocolError as exc:
            return Rejected(exc.reason, topic_device, exc.detail)
        if env.type != "reply":
            return Rejected("schema", topic_device, f"a {env.type!r} message on a reply topic", env)
        device = env.ctx.sender_id
        if device != topic_device:
            return Rejected("topic_mismatch", topic_device, f"signed by {device}", env)
        if env.ctx.gateway != self.gateway_id:
            return Rejected("wrong_gateway", device, f"bound to gateway {env.ctx.gateway}", env)
        if self.is_revoked(env.ctx.sender):
            return Rejected("revoked", device, "the device's key was revoked", env)
        if not self.is_enrolled(env.ctx.sender):
            return Rejected("unknown_device", device, "sender is not enrolled", env)
        try:
            reply = schemas.Reply.from_body(env.body)
            if reply.skip and env.attachment is not None:
                raise SchemaError("a skip carries no update")
            if not reply.skip and env.attachment is None:
                raise SchemaError("a reply must carry its update as an attachment")
            env.verify()
        except ProtocolError as exc:
            return Rejected(exc.reason, device, exc.detail, env)
        if reply.skip:
            return Authenticated(env, reply, {}, {})
        try:
            shapes, metrics = schemas.check_update(env.attachment)
        except ProtocolError as exc:
            return Rejected(exc.reason, device, exc.detail, env, authenticated=True)
        return Authenticated(env, reply, shapes, metrics)


class ReplyChecker:
    """Decides accept or reject for one reply; holds no MQTT and no strategy.

    Stage 1 is `Authenticator.authenticate` (here, or already done by an ingest worker);
    stage 2, `admit`, matches an authenticated reply to an open task.
    """

    def __init__(
        self,
        gateway_id: str,
        is_enrolled: Callable[[bytes], bool],
        max_reply_bytes: int = 1 << 20,
        is_revoked: Callable[[bytes], bool] = lambda key: False,
        evaluate_metrics: frozenset[str] = EVALUATE_METRICS,
    ) -> None:
        self.gateway_id = gateway_id
        self.is_revoked = is_revoked
        self.evaluate_metrics = evaluate_metrics
        self.authenticator = Authenticator(gateway_id, is_enrolled, is_revoked, max_reply_bytes)
        self.open: dict[tuple[str, str], OpenTask] = {}  # (device id, task id) -> task
        self.accepted: dict[tuple[str, str], tuple[int, bytes]] = {}  # (device, task) -> (round, update digest)
        self.closed: dict[tuple[str, str], int] = {}  # tasks whose round closed without a reply -> round
        self.reopening: set[str] = set()  # task ids of a round a crash interrupted, not re-opened yet
        self.current_round = 0

    def check(self, topic: str, payload: bytes, now: float | None = None,
              first: Authenticated | Rejected | None = None) -> Accepted | Skipped | Duplicate | Rejected:
        """Both stages; `first` is stage 1's outcome when an ingest worker already ran it."""
        lagging = (isinstance(first, Rejected) and first.reason == "unknown_device" and first.envelope is not None
                   and self.authenticator.is_enrolled(first.envelope.ctx.sender))
        if first is None or lagging:  # (a worker's copy of the enrolled keys may lag by a moment)
            first = self.authenticator.authenticate(topic, payload)
        return first if isinstance(first, Rejected) else self.admit(first, now)

    def admit(self, auth: Authenticated, now: float | None = None) -> Accepted | Skipped | Duplicate | Rejected:
        now = time.time() if now is None else now
        env, reply, metrics = auth.envelope, auth.reply, auth.metrics
        device = env.ctx.sender_id
        if self.is_revoked(env.ctx.sender):  # a worker's copy of the revocations may lag by a moment
            return Rejected("revoked", device, "the device's key was revoked", env)

        def refuse(reason: str, detail: str) -> Rejected:  # from here on the sender is authenticated
            return Rejected(reason, device, detail, env, authenticated=True)

        key = (device, env.ctx.task)
        if key in self.accepted:
            accepted_round, digest = self.accepted[key]
            if digest != reply.digest:  # a second, different answer: a device bug or a lie
                return refuse("conflicting_reply", f"task {env.ctx.task} was answered with another update")
            if accepted_round >= self.current_round:  # a re-send while its receipt was on the way
                return Duplicate(device, accepted_round, env)
            # Still acknowledged: an honest device whose receipts were all lost stops re-sending.
            return Rejected("replay", device, f"task {env.ctx.task} was answered in round {accepted_round}", env,
                            authenticated=True, already_accepted=True)
        task = self.open.get(key)
        if task is None:
            if env.ctx.task in self.reopening:  # after a crash, before its round is re-opened: keep it
                return Rejected("deferred", device, f"task {env.ctx.task} re-opens shortly", env, authenticated=True)
            if key in self.closed:
                return refuse("late", f"task {env.ctx.task} closed before this reply")
            if env.ctx.round < self.current_round:
                return refuse("stale_round", f"round {env.ctx.round} is over")
            return refuse("not_selected", f"no open task {env.ctx.task} for this device")
        if env.ctx.round != task.round:
            return refuse("wrong_round", f"round {env.ctx.round}, task is round {task.round}")
        if env.ctx.base != task.base:
            return refuse("wrong_base", "built on another model")
        if now > task.deadline:
            return refuse("late", f"{now - task.deadline:.1f} s after the deadline")
        if reply.skip:  # the round need not wait for this device any longer
            del self.open[key]
            self.closed[key] = task.round
            return Skipped(task, env, reply.skip)
        if task.kind == "train":
            if auth.shapes != {k: v.shape for k, v in task.base_weights.items()}:
                return refuse("wrong_shape", "delta does not match the model's weights")
            if set(metrics) != task.train_metrics or reply.examples < 1:
                return refuse("wrong_metrics", f"train metrics {sorted(metrics)}")
        else:
            if auth.shapes or set(metrics) != self.evaluate_metrics or reply.examples < 1:
                return refuse("wrong_metrics", f"evaluate metrics {sorted(metrics)}")
            if not 0.0 <= metrics.get("accuracy", 0.0) <= 1.0 or any(metrics[k] < 0 for k in metrics):
                return refuse("wrong_metrics", "accuracy, loss or error out of range")
        del self.open[key]
        self.accepted[key] = (task.round, reply.digest)
        return Accepted(task, env, metrics, reply.examples)

    def close(self, keys: Iterable[tuple[str, str]]) -> None:
        """Stop waiting for these tasks: a reply after this is `late`."""
        for key in keys:
            task = self.open.pop(key, None)
            if task is not None:
                self.closed[key] = task.round

    def forget_before(self, round_: int) -> None:
        """Drop what is remembered of rounds before `round_` (their replies are then `stale_round`)."""
        self.accepted = {k: v for k, v in self.accepted.items() if v[0] >= round_}
        self.closed = {k: r for k, r in self.closed.items() if r >= round_}
