"""`MqttGrid`: Flower's `Grid` over MQTT, with every reply checked first.

`push_messages` turns each Flower instruction into (1) one signed,
content-addressed model release, published once per model, and (2) one
small signed task per device naming that model by digest. Replies arrive on
the gateway's worker thread, go through `ReplyChecker`, get a signed receipt
either way, and only accepted ones become Flower reply messages whose
`ArrayRecord` holds full weights (base + dequantized delta): strategies see
ordinary arrays and never see a rejected reply.

`send_and_receive` closes a round when every selected device replied or the
round's deadline passed, whichever is first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from uuid import uuid4

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from protocol import envelope, schemas, topics
from protocol.keys import Identity
from protocol.logs import event

from .ingest import Accepted, OpenTask, Rejected, ReplyChecker
from .models import ModelPublisher

log = logging.getLogger("starling.gateway.grid")


@dataclass
class RoundTraffic:
    """What one (kind, round) exchange produced; handed to the `on_closed` observer."""

    kind: str
    round: int
    base: bytes
    sent: int
    accepted: list[Accepted] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    closed: float = 0.0


class MqttGrid(Grid):
    """A Flower Grid whose nodes are enrolled, online devices reached over MQTT."""

    def __init__(
        self,
        identity: Identity,
        gateway_id: str,
        publish: Callable[..., object],
        checker: ReplyChecker,
        models: ModelPublisher,
        nodes: Callable[[], dict[int, bytes]],
        deadline_s: float,
        train_defaults: schemas.TrainConfig,
    ) -> None:
        self.identity = identity
        self.gateway_id = gateway_id
        self._publish = publish
        self.checker = checker
        self.models = models
        self._nodes = nodes  # node id -> device public key
        self.deadline_s = deadline_s
        self.train_defaults = train_defaults
        self._run = Run.create_empty(run_id=1)
        self._cv = threading.Condition()
        self._instructions: dict[str, Message] = {}  # message id -> Flower instruction
        self._replies: dict[str, Message] = {}  # message id -> Flower reply, ready to pull
        self.traffic: dict[tuple[str, int], RoundTraffic] = {}
        self.on_closed: Callable[[RoundTraffic], None] | None = None
        self.rejections: dict[str, int] = {}
        self.stop = threading.Event()  # set on SIGTERM: the open round ends at once

    # --- Grid API -------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        nodes = self._nodes()
        ids = []
        for message in messages:
            kind = message.metadata.message_type.split(".")[0]
            if kind not in schemas.TASK_KINDS:
                raise ValueError(f"MqttGrid cannot carry message type {message.metadata.message_type!r}")
            device_key = nodes.get(message.metadata.dst_node_id)
            if device_key is None:
                raise ValueError(f"node {message.metadata.dst_node_id} is not an enrolled, online device")
            content = message.content
            arrays = next(iter(content.array_records.values()))
            config = dict(next(iter(content.config_records.values()), {}).items()) if content.config_records else {}
            round_ = int(config.get("server-round", 0))
            release = self.models.release({k: v.numpy() for k, v in arrays.items()}, round_)
            deadline = time.time() + self.deadline_s
            train = schemas.TrainConfig(
                epochs=int(config.get("epochs", self.train_defaults.epochs)),
                batch_size=int(config.get("batch-size", self.train_defaults.batch_size)),
                lr=float(config.get("lr", config.get("learning-rate", self.train_defaults.lr))),
                deadline=deadline,
            )
            task_id = f"{kind}-{round_}"
            device_id = envelope.Context(device_key, "").sender_id
            task = schemas.Task(kind, device_id, train, "i8")
            ctx = envelope.Context(self.identity.public_key, self.gateway_id, round_, task_id, release.digest)
            wire = envelope.seal(self.identity, "task", ctx, task.to_body())
            message_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's own grids do
            with self._cv:
                self._instructions[message_id] = message
                self.checker.current_round = max(self.checker.current_round, round_)
                self.checker.open[(device_id, task_id)] = OpenTask(
                    message_id, device_id, device_key, kind, round_, task_id, release.digest, release.weights, deadline
                )
                traffic = self.traffic.setdefault((kind, round_), RoundTraffic(kind, round_, release.digest, 0))
                traffic.sent += 1
            self._publish(topics.task(self.gateway_id, device_id), wire)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._cv:
            out = [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]
            for reply in out:
                self._instructions.pop(reply.metadata.reply_to_message_id, None)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        waiting = set(self.push_messages(messages))
        kind = messages[0].metadata.message_type
        round_ = int(next(iter(messages[0].content.config_records.values()), {}).get("server-round", 0))
        limit = self.deadline_s if timeout is None else min(timeout, self.deadline_s)
        end = time.monotonic() + limit
        with self._cv:
            while not waiting <= self._replies.keys() and not self.stop.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.5))
        if self.stop.is_set():
            raise InterruptedError("gateway is stopping")
        replies = list(self.pull_messages(waiting))
        self._close(kind, round_, waiting)
        event(log, "round.closed", kind=kind, round=round_, replies=len(replies), selected=len(waiting))
        return replies

    # --- ingest (called on the gateway's worker thread) ------------------------------

    def handle_reply(self, topic: str, payload: bytes) -> Accepted | Rejected:
        with self._cv:
            outcome = self.checker.check(topic, payload)
        if isinstance(outcome, Accepted):
            task = outcome.task
            instruction = self._instructions.get(task.message_id)
            if instruction is not None:
                content = self._to_flower(outcome)
                with self._cv:
                    self._replies[task.message_id] = Message(content, reply_to=instruction)
                    self.traffic[(task.kind, task.round)].accepted.append(outcome)
                    self._cv.notify_all()
            self._receipt(outcome.envelope, task.device_id, True, "")
            event(log, "reply.accepted", device=task.device_id, round=task.round, kind=task.kind,
                  examples=outcome.examples, bytes=len(payload))
        else:
            self.rejections[outcome.reason] = self.rejections.get(outcome.reason, 0) + 1
            with self._cv:
                for traffic in self.traffic.values():
                    if not traffic.closed:
                        traffic.rejected[outcome.reason] = traffic.rejected.get(outcome.reason, 0) + 1
            if outcome.authenticated:
                self._receipt(outcome.envelope, outcome.device_id, False, outcome.reason)
            event(log, "reply.rejected", logging.WARNING, device=outcome.device_id or "-",
                  reason=outcome.reason, detail=outcome.detail)
        return outcome

    def _to_flower(self, accepted: Accepted) -> RecordDict:
        metrics = MetricRecord({"num-examples": accepted.examples, **accepted.metrics})
        if accepted.task.kind != "train":
            return RecordDict({"metrics": metrics})
        base = accepted.task.base_weights
        arrays = ArrayRecord({name: Array(base[name] + accepted.delta[name]) for name in base})
        return RecordDict({"arrays": arrays, "metrics": metrics})

    def _receipt(self, reply: envelope.Envelope, device_id: str, accepted: bool, reason: str) -> None:
        """Sign a receipt bound to the reply's round and task; only for repliers we can name."""
        if reply.ctx.gateway != self.gateway_id:
            return
        digest = reply.body.get("digest", b"")
        digest = digest if isinstance(digest, bytes) and len(digest) == 32 else b""
        ctx = envelope.Context(self.identity.public_key, self.gateway_id, reply.ctx.round, reply.ctx.task, reply.ctx.base)
        body = schemas.Receipt(device_id, digest, accepted, reason).to_body()
        self._publish(topics.receipt(self.gateway_id, device_id), envelope.seal(self.identity, "receipt", ctx, body))

    def _close(self, kind: str, round_: int, message_ids: set[str]) -> None:
        with self._cv:
            for key, task in list(self.checker.open.items()):
                if task.message_id in message_ids:
                    del self.checker.open[key]
                    self.checker.closed.add(key)  # a reply after this is "late"
            for mid in message_ids:
                self._instructions.pop(mid, None)
            traffic = self.traffic.get((kind, round_))
            if traffic is not None:
                traffic.closed = time.time()
        if traffic is not None and self.on_closed:
            self.on_closed(traffic)
