"""What the gateway signs and sends to one device: tasks and receipts.

Every message is a signed envelope bound to this gateway, the round, the task
and the base model, so nothing can be replayed into another round or to
another gateway. (Model releases, sent to all devices at once, are models.py's.)
"""

from __future__ import annotations

from collections.abc import Callable

from protocol import envelope, schemas, topics
from protocol.keys import Identity
from protocol.tensors import DEFAULT_DENSITY

ENROLL_TASK = "enroll"  # the task id of enrollment receipts


class Outbox:
    def __init__(self, identity: Identity, gateway_id: str, publish: Callable[..., object]) -> None:
        """`publish(topic, payload)`: the gateway's connection (thread-safe)."""
        self._identity = identity
        self._gateway_id = gateway_id
        self._publish = publish

    def task(self, device_id: str, kind: str, round_: int, task_id: str, base: bytes,
             config: schemas.TrainConfig, codec: str = "i8", density: float = DEFAULT_DENSITY,
             delta_base: bytes = b"") -> None:
        """A task asking for the update in `codec` (topk: `density` of each tensor's entries); `delta_base`:
        the model a published delta to `base` applies to (b"": the full model only)."""
        ctx = envelope.Context(self._identity.public_key, self._gateway_id, round_, task_id, base)
        body = schemas.Task(kind, device_id, config, codec, density, delta_base).to_body()
        wire = envelope.seal(self._identity, "task", ctx, body)
        self._publish(topics.task(self._gateway_id, device_id), wire)

    def receipt(self, reply: envelope.Envelope, device_id: str, accepted: bool, reason: str) -> None:
        """A receipt bound to the reply's round, task and base, naming the update it settles."""
        digest = reply.body.get("digest", b"")
        digest = digest if isinstance(digest, bytes) and len(digest) == 32 else b""
        ctx = envelope.Context(self._identity.public_key, self._gateway_id, reply.ctx.round, reply.ctx.task,
                               reply.ctx.base)
        body = schemas.Receipt(device_id, digest, accepted, reason).to_body()
        self._publish(topics.receipt(self._gateway_id, device_id), envelope.seal(self._identity, "receipt", ctx, body))

    def enroll_receipt(self, device_id: str, accepted: bool, reason: str) -> None:
        ctx = envelope.Context(self._identity.public_key, self._gateway_id, 0, ENROLL_TASK, b"")
        body = schemas.Receipt(device_id, b"", accepted, reason).to_body()
        self._publish(topics.receipt(self._gateway_id, device_id), envelope.seal(self._identity, "receipt", ctx, body))
