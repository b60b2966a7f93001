"""`MqttGrid`: Flower's `Grid` over MQTT, with every reply checked first.

`push_messages` turns each Flower instruction into (1) one signed,
content-addressed model release, published once per model, and (2) one
small signed task per device naming that model by digest. Replies arrive on
the gateway's worker thread, go through `ReplyChecker`, get a signed receipt
(when their sender is authenticated), and only accepted ones become Flower
reply messages whose `ArrayRecord` holds full weights (base + dequantized
delta): strategies see ordinary arrays and never see a rejected reply.

Task ids are `<kind>-<round>-<run>.<n>`: `<run>` is fresh in every gateway
process, so replies recorded in an earlier run can never be replayed into a
later one, and `<n>` counts pushes, so two exchanges never share an id (even
for a strategy that sends no "server-round"). `send_and_receive` closes an exchange when every selected device
replied or the round's deadline passed, whichever is first.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from uuid import uuid4

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from protocol import envelope, schemas, topics
from protocol.keys import Identity, identity_id
from protocol.logs import event

from .ingest import Accepted, Authenticated, Duplicate, OpenTask, Rejected, ReplyChecker, Skipped
from .journal import Journal, Resume
from .models import ModelPublisher

log = logging.getLogger("starling.gateway.grid")
REMEMBER_ROUNDS = 2  # replies to tasks this many rounds old are still told apart as replay/late
MAX_DEFERRED = 100_000  # replies held while an interrupted round re-opens (more is not a fleet, it is a flood)


@dataclass
class RoundTraffic:
    """What one (kind, round) exchange produced; handed to the `on_closed` observer, then dropped."""

    kind: str
    round: int
    task: str
    base: bytes
    sent: int = 0
    accepted: list[Accepted] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # the devices' own reasons for sitting it out
    duplicates: int = 0  # accepted replies sent again (at-least-once delivery): not rejections
    started: float = field(default_factory=time.time)
    closed: bool = False


def _kind(message: Message) -> str:
    """Flower message types may carry a suffix ("train.proximal"); the task kind is the prefix."""
    return message.metadata.message_type.split(".")[0]


CONFIG_FIELDS = {"epochs", "batch-size", "lr", "learning-rate", "server-round"}


def _options(config) -> dict[str, schemas.Option]:
    """The strategy's other config keys ("proximal-mu", "clipping_norm", ...), for the device."""
    options = {k: v for k, v in sorted(config.items())
               if k not in CONFIG_FIELDS and isinstance(v, (int, float, str, bool))}
    if len(options) > schemas.MAX_OPTIONS:
        dropped = sorted(options)[schemas.MAX_OPTIONS:]
        event(log, "task.options_dropped", logging.WARNING, keys=",".join(dropped))
        options = {k: options[k] for k in sorted(options)[: schemas.MAX_OPTIONS]}
    return options


def _round(message: Message) -> int:
    config = next(iter(message.content.config_records.values()), None)
    return int(config.get("server-round", 0)) if config is not None else 0


class MqttGrid(Grid):
    """A Flower Grid whose nodes are enrolled, online devices reached over MQTT."""

    def __init__(
        self,
        identity: Identity,
        gateway_id: str,
        publish: Callable[..., object],
        checker: ReplyChecker,
        models: ModelPublisher,
        online_nodes: Callable[[], dict[int, bytes]],
        device_key: Callable[[int], bytes | None],
        deadline_s: float,
        train_defaults: schemas.TrainConfig,
    ) -> None:
        self.identity = identity
        self.gateway_id = gateway_id
        self._publish = publish
        self.checker = checker
        self.models = models
        self._online_nodes = online_nodes  # node id -> device public key, enrolled and online
        self._device_key = device_key  # node id -> public key of any enrolled device
        self.deadline_s = deadline_s
        self.train_defaults = train_defaults
        self.run_tag = secrets.token_hex(4)
        self._pushes = 0
        self.journal: Journal | None = None  # accepted training replies are written here before their receipt
        self.resume: Resume | None = None  # set when this run continues one a crash interrupted
        self.round_offset = 0  # Flower counts from 1 again after a resume; the fleet's rounds go on
        self._deferred: list[tuple[str, bytes]] = []  # replies to the interrupted round, until it re-opens
        self._run = Run.create_empty(run_id=1)
        self._cv = threading.Condition()
        self._instructions: dict[str, Message] = {}  # message id -> Flower instruction
        self._replies: dict[str, Accepted] = {}  # message id -> accepted reply, ready to pull
        self._skipped: set[str] = set()  # message ids whose device sat the task out: nothing to wait for
        self._task_of: dict[str, str] = {}  # message id -> task id
        self.traffic: dict[str, RoundTraffic] = {}  # task id -> open exchange
        self.on_closed: Callable[[RoundTraffic], None] | None = None
        self.rejections: dict[str, int] = {}
        self.duplicates = 0  # exact re-sends of replies accepted in the current round, acknowledged again
        self.stop = threading.Event()  # set on SIGTERM: waits end at once

    # --- Grid API -------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        # Flower's sampling polls this while it waits for enough nodes: let SIGTERM end that wait.
        if self.stop.is_set():
            raise InterruptedError("gateway is stopping")
        return list(self._online_nodes())

    def _resumed(self, messages: list[Message]) -> tuple[list[Message], Resume | None]:
        """On the first training push after a crash: the interrupted round's devices, not a new sample."""
        resume = self.resume
        if resume is None or not messages or _kind(messages[0]) != "train":
            return messages, None
        if _round(messages[0]) + self.round_offset != resume.round:
            return messages, None
        self.resume = None
        template = messages[0]
        nodes = resume.nodes
        if resume.closed:  # it had closed: only the replies it had then count
            answered = {identity_id(envelope.decode(w).ctx.sender) for w in resume.replies}
            nodes = [n for n in nodes if (k := self._device_key(n)) is not None and identity_id(k) in answered]
        return [Message(template.content, n, template.metadata.message_type, group_id=template.metadata.group_id)
                for n in nodes], resume

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        self._pushes += 1
        messages, resume = self._resumed(list(messages))
        restored = {identity_id(envelope.decode(w).ctx.sender): w for w in resume.replies} if resume else {}
        opened: dict[str, tuple[int, bytes, list[int]]] = {}
        for message in messages:
            kind, round_ = _kind(message), _round(message) + self.round_offset
            if kind not in schemas.TASK_KINDS:
                raise ValueError(f"MqttGrid cannot carry message type {message.metadata.message_type!r}")
            device_key = self._device_key(message.metadata.dst_node_id)
            if device_key is None:
                event(log, "task.skipped", logging.WARNING, node=message.metadata.dst_node_id, reason="not_enrolled")
                continue
            release = self._release_for(message, round_)
            config = next(iter(message.content.config_records.values()), {})
            deadline = time.time() + self.deadline_s
            train = schemas.TrainConfig(
                epochs=int(config.get("epochs", self.train_defaults.epochs)),
                batch_size=int(config.get("batch-size", self.train_defaults.batch_size)),
                lr=float(config.get("lr", config.get("learning-rate", self.train_defaults.lr))),
                deadline=deadline,
                options=_options(config),
            )
            task_id = resume.task if resume else f"{kind}-{round_}-{self.run_tag}.{self._pushes}"
            device_id = identity_id(device_key)
            ctx = envelope.Context(self.identity.public_key, self.gateway_id, round_, task_id, release.digest)
            wire = envelope.seal(self.identity, "task", ctx, schemas.Task(kind, device_id, train, "i8").to_body())
            message_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's own grids do
            with self._cv:
                self._instructions[message_id] = message
                self._task_of[message_id] = task_id
                if round_ > self.checker.current_round:
                    self.checker.current_round = round_
                    self.checker.forget_before(round_ - REMEMBER_ROUNDS)
                self.checker.open[(device_id, task_id)] = OpenTask(
                    message_id, device_id, device_key, kind, round_, task_id, release.digest, release.weights, deadline,
                    train.options,
                )
                traffic = self.traffic.setdefault(task_id, RoundTraffic(kind, round_, task_id, release.digest))
                traffic.sent += 1
            if kind == "train":
                opened.setdefault(task_id, (round_, release.digest, []))[2].append(message.metadata.dst_node_id)
            if device_id in restored:  # answered before the crash: its device forgot it, the journal did not
                self.handle_reply(topics.reply(self.gateway_id, device_id), restored[device_id], restoring=True)
            else:
                self._publish(topics.task(self.gateway_id, device_id), wire)
            ids.append(message_id)
        if self.journal is not None:
            for task_id, (round_, base, nodes) in opened.items():
                self.journal.open_exchange(task_id, round_, base, nodes)
        if resume is not None:
            with self._cv:
                self.checker.reopening.discard(resume.task)
                deferred, self._deferred = self._deferred, []
            self.handle_replies([(topic, payload, None) for topic, payload in deferred])  # replies that arrived while the round was being re-opened
        return ids

    def _release_for(self, message: Message, round_: int):
        """The model a message carries; an evaluate message without arrays means the current model."""
        records = message.content.array_records
        if len(records) > 1:
            raise ValueError("MqttGrid carries one ArrayRecord per message")
        if records:
            arrays = next(iter(records.values()))
            return self.models.release({k: v.numpy() for k, v in arrays.items()}, round_)
        if self.models.current is None:
            raise ValueError("a message without an ArrayRecord, and no model released yet")
        return self.models.current

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Flower reply messages for the accepted replies; built here, off the ingest path."""
        with self._cv:
            pulled = [(mid, self._replies.pop(mid), self._instructions.pop(mid, None))
                      for mid in list(message_ids) if mid in self._replies]
        out = []
        for mid, accepted, instruction in pulled:
            reply = Message(self._to_flower(accepted), reply_to=instruction)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            out.append(reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        waiting = set(self.push_messages(messages))
        limit = self.deadline_s if timeout is None else min(timeout, self.deadline_s)
        end = time.monotonic() + limit
        with self._cv:
            while not waiting <= self._replies.keys() | self._skipped and not self.stop.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.5))
        if self.stop.is_set():
            raise InterruptedError("gateway is stopping")
        closed = self._close(waiting)
        replies = list(self.pull_messages(waiting))
        for traffic in closed:
            event(log, "round.closed", kind=traffic.kind, round=traffic.round, replies=len(traffic.accepted),
                  selected=traffic.sent, rejected=sum(traffic.rejected.values()), skipped=sum(traffic.skipped.values()),
                  duplicates=traffic.duplicates,
                  reasons=",".join(f"{r}:{n}" for r, n in sorted(traffic.rejected.items())) or "-")
            if self.on_closed:
                self.on_closed(traffic)
        return replies

    # --- ingest (called on the gateway's worker thread) ------------------------------

    def handle_reply(self, topic: str, payload: bytes,
                     restoring: bool = False) -> Accepted | Skipped | Duplicate | Rejected:
        return self.handle_replies([(topic, payload, None)], restoring)[0]

    def handle_replies(self, messages: list[tuple[str, bytes, Authenticated | Rejected | None]],
                       restoring: bool = False) -> list[Accepted | Skipped | Duplicate | Rejected]:
        """Check a batch of replies, journal the accepted ones in one transaction, then send receipts.

        Each message is (topic, payload, stage-1 outcome): the outcome is None unless an ingest
        worker already authenticated the reply.

        One commit (one fsync) per batch instead of per reply is what lets the ingest path keep
        up with thousands of replies per second; no receipt leaves before its reply is on disk.
        """
        outcomes: list[Accepted | Skipped | Duplicate | Rejected] = []
        # Check and hand over under one lock, so a reply is either in its round or late, never lost between.
        with self._cv:
            for topic, payload, first in messages:
                try:
                    outcome = self.checker.check(topic, payload, first=first)
                except Exception as exc:  # a checker bug must cost this reply only, never the rest of the batch
                    log.exception("reply.check_failed topic=%s", topic)
                    outcome = Rejected("internal_error", topics.device_of(topic) or "", f"{type(exc).__name__}: {exc}")
                outcomes.append(outcome)
                if isinstance(outcome, Accepted):
                    self._replies[outcome.task.message_id] = outcome
                    self.traffic[outcome.task.task].accepted.append(outcome)
                elif isinstance(outcome, Skipped):
                    self._skipped.add(outcome.task.message_id)
                    skipped = self.traffic[outcome.task.task].skipped
                    skipped[outcome.reason] = skipped.get(outcome.reason, 0) + 1
                elif isinstance(outcome, Duplicate):  # honest at-least-once delivery: no rejection
                    self.duplicates += 1
                    traffic = self.traffic.get(outcome.envelope.ctx.task)
                    if traffic is not None:
                        traffic.duplicates += 1
                elif outcome.reason == "deferred":
                    if len(self._deferred) < MAX_DEFERRED:
                        self._deferred.append((topic, payload))
                else:
                    self.rejections[outcome.reason] = self.rejections.get(outcome.reason, 0) + 1
                    traffic = self.traffic.get(outcome.envelope.ctx.task) if outcome.envelope else None
                    if traffic is not None:
                        traffic.rejected[outcome.reason] = traffic.rejected.get(outcome.reason, 0) + 1
            if any(isinstance(o, Accepted | Skipped) for o in outcomes):  # a wait may be over
                self._cv.notify_all()
        if restoring:
            return outcomes
        if self.journal is not None:
            # Before the receipts: once a device hears "accepted" it forgets the reply.
            # Skips too: a device that said it sits the round out will not say it again to a restarted gateway.
            self.journal.accept_many([(o.task.task, o.task.device_id, payload)
                                      for o, (_, payload, _) in zip(outcomes, messages)
                                      if isinstance(o, Accepted | Skipped) and o.task.kind == "train"])
        for outcome, (_, payload, _) in zip(outcomes, messages):
            if isinstance(outcome, Accepted):
                self._receipt(outcome.envelope, outcome.task.device_id, True, "")
                event(log, "reply.accepted", logging.DEBUG, device=outcome.task.device_id, round=outcome.task.round,
                      kind=outcome.task.kind, examples=outcome.examples, bytes=len(payload))
            elif isinstance(outcome, Skipped):
                self._receipt(outcome.envelope, outcome.device_id, False, "skipped")
                event(log, "reply.skipped", device=outcome.device_id, round=outcome.task.round, reason=outcome.reason)
            elif isinstance(outcome, Duplicate):  # its receipt was slow or lost: it gets another
                self._receipt(outcome.envelope, outcome.device_id, True, "")
                event(log, "reply.duplicate", device=outcome.device_id, round=outcome.round,
                      task=outcome.envelope.ctx.task)
            elif outcome.reason != "deferred":
                if outcome.authenticated:
                    # A replay of a reply accepted earlier is acknowledged again: a device whose receipts
                    # were all lost stops re-sending it.
                    self._receipt(outcome.envelope, outcome.device_id, outcome.already_accepted, outcome.reason)
                event(log, "reply.rejected", logging.WARNING, device=outcome.device_id or "-",
                      reason=outcome.reason, detail=outcome.detail)
        return outcomes

    def _to_flower(self, accepted: Accepted) -> RecordDict:
        metrics = MetricRecord({"num-examples": accepted.examples, **accepted.metrics})
        if accepted.task.kind != "train":
            return RecordDict({"metrics": metrics})
        base = accepted.task.base_weights
        delta = accepted.delta
        arrays = ArrayRecord({name: Array(base[name] + delta[name]) for name in base})
        return RecordDict({"arrays": arrays, "metrics": metrics})

    def _receipt(self, reply: envelope.Envelope, device_id: str, accepted: bool, reason: str) -> None:
        """Sign a receipt bound to the reply's round and task."""
        digest = reply.body.get("digest", b"")
        digest = digest if isinstance(digest, bytes) and len(digest) == 32 else b""
        ctx = envelope.Context(self.identity.public_key, self.gateway_id, reply.ctx.round, reply.ctx.task, reply.ctx.base)
        body = schemas.Receipt(device_id, digest, accepted, reason).to_body()
        self._publish(topics.receipt(self.gateway_id, device_id), envelope.seal(self.identity, "receipt", ctx, body))

    def _close(self, message_ids: set[str]) -> list[RoundTraffic]:
        """End the exchanges of these messages; return their traffic (now closed)."""
        with self._cv:
            self.checker.close([key for key, task in self.checker.open.items() if task.message_id in message_ids])
            task_ids = {self._task_of.pop(mid) for mid in message_ids if mid in self._task_of}
            for mid in message_ids:
                self._skipped.discard(mid)
                if mid not in self._replies:
                    self._instructions.pop(mid, None)
            closed = [self.traffic.pop(tid) for tid in task_ids if tid in self.traffic]
            for traffic in closed:
                traffic.closed = True
                if self.journal is not None and traffic.kind == "train":
                    self.journal.close_exchange(traffic.task)
        return sorted(closed, key=lambda t: (t.round, t.kind != "train"))
