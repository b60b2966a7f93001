"""Checking a device's reply before anything else touches it: stage 1, and every outcome.

Checks run cheapest first, so garbage and strangers cost almost nothing and
only enrolled devices cost a signature check. Stage 1 (`Authenticator`:
bytes, sender, signature, the update itself) needs no round state, so ingest
worker processes can run it (see ingest_workers.py); stage 2
(`admission.admit`) matches an authenticated reply to an open task of the
round book (rounds.py):

    malformed / non_canonical / schema   the bytes are not a reply envelope
    topic_mismatch                        signed by a key other than the topic's device
    wrong_gateway                         bound to another gateway
    revoked                               the sender's key was revoked (device.revoke in the ledger)
    unknown_device                        the sender is not enrolled here
    bad_signature / digest_mismatch       the signature or attachment does not verify
    limits / bad_tensor / non_finite      the update is oversize, inconsistent or not finite
    --- stage 2 (admission.py)
    replay                                this device's reply to this task was accepted in an earlier round
    conflicting_reply                     this device's task was answered with a different update
    stale_round / not_selected            no open task for this device and task id
    wrong_round / wrong_base              bound to another round or base model
    late                                  arrived after the round's deadline
    wrong_shape / wrong_metrics           the update does not fit the model or the task
    wrong_codec                           the update is not encoded as its task asked (codec, topk density)
    --- the intake (intake.py)
    internal_error                        a check itself failed (a bug): logged with its traceback, and
                                          only this reply is lost, not the rest of its batch

Four outcomes are not rejections, and are not counted as such: `Accepted`;
`Skipped` (the device sat the task out and said why); `Duplicate` (the exact
reply accepted in the current round, sent again: agents deliver at least once,
so it is acknowledged again and changes nothing); `Deferred` (a reply to a
round a crash or stop interrupted, held until that round re-opens).

Every outcome is a value, never an exception: a gateway must outlive any input.
Only senders whose signature verified get a (signed) negative receipt: signing
an answer to every piece of garbage would let anyone make the gateway burn
CPU and broker bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from protocol import envelope, schemas, topics
from protocol.errors import ProtocolError, SchemaError
from protocol.tensors import DEFAULT_DENSITY

from . import ingest_profile

TRAIN_METRICS = frozenset({"train_loss", "steps"})
EVALUATE_METRICS = frozenset({"loss", "accuracy"})  # a classifier's evaluation
# What an evaluate reply reports, by the model's task (its manifest's "task"): a self-supervised
# autoencoder has no accuracy, but a reconstruction loss and the 95th percentile of its errors.
EVALUATE_METRICS_BY_TASK = {
    "classification": EVALUATE_METRICS,
    "reconstruction": frozenset({"loss", "error_p95"}),
}


@dataclass(frozen=True)
class OpenTask:
    """A task the gateway sent and awaits a reply for (one device, one exchange)."""

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
    codec: str = "i8"  # how a train reply must encode its update (the task's codec) ...
    density: float = DEFAULT_DENSITY  # ... and with topk, at most this share of each tensor's entries

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
        return dequantize(self.envelope.attachment)[0]


def dequantize(attachment: bytes) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """An update attachment as the strategies get it: (float32 delta, int8 and f16 tensors dequantized; its
    metrics). The one place this is done: gateway/recompute.py uses it on recorded updates too."""
    return schemas.decode_update(attachment)


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
class Deferred:
    """A reply to the exchange an interrupted run left open (crash, power cut, stop), arriving before that
    exchange re-opened: the broker hands over what it queued as soon as the gateway connects. Held by the
    round book and admitted again when the exchange re-opens; no receipt yet."""

    device_id: str
    task: str


Outcome = Accepted | Skipped | Duplicate | Deferred | Rejected


@dataclass(frozen=True)
class Authenticated:
    """A reply whose bytes, sender and signature check out, not yet matched to a task.

    Plain data (it pickles): an ingest worker process hands these to the gateway."""

    envelope: envelope.Envelope
    reply: schemas.Reply
    shapes: dict[str, tuple[int, ...]]
    metrics: dict[str, float]
    encodings: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (codec, entries sent)


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
        """`is_enrolled` and `is_revoked` answer from the gateway's device registry (or, in an ingest
        worker, from its copy of the key sets)."""
        self.gateway_id = gateway_id
        self.is_enrolled = is_enrolled
        self.is_revoked = is_revoked
        self.max_reply_bytes = max_reply_bytes  # refused before decoding: oversize costs nothing

    def authenticate(self, topic: str, payload: bytes) -> Authenticated | Rejected:
        profile = ingest_profile.PROFILE  # None unless STARLING_INGEST_PROFILE is set: one test per stage
        t = profile.now() if profile is not None else 0.0
        topic_device = topics.device_of(topic)
        if len(payload) > self.max_reply_bytes:
            return Rejected("limits", topic_device, f"{len(payload)} bytes, limit {self.max_reply_bytes}")
        try:
            env = envelope.decode(payload)
        except ProtocolError as exc:
            return Rejected(exc.reason, topic_device, exc.detail)
        if profile is not None:
            t = profile.add("stage1.decode", t)
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
            if profile is not None:
                t = profile.add("stage1.checks", t)
            env.verify()
        except ProtocolError as exc:
            return Rejected(exc.reason, device, exc.detail, env)
        if profile is not None:
            t = profile.add("stage1.verify", t)
        if reply.skip:
            return Authenticated(env, reply, {}, {})
        try:
            update = schemas.check_update(env.attachment)
        except ProtocolError as exc:
            return Rejected(exc.reason, device, exc.detail, env, authenticated=True)
        if profile is not None:
            profile.add("stage1.update_check", t)
        return Authenticated(env, reply, update.shapes, update.metrics, update.encodings)
