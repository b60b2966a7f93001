"""`MqttGrid`: Flower's `Grid` over MQTT, a thin adapter on the round book.

`push_messages` turns each Flower instruction into (1) one signed,
content-addressed model release, published once per model (the model source
decides which release a message's arrays are), and (2) one small signed task
per device naming that model by digest. The round book (rounds.py) holds
everything about the exchange; replies are checked and admitted there (by
the intake, on the gateway's worker thread), and only accepted ones become
Flower reply messages, whose `ArrayRecord` holds full weights (base +
dequantized delta): strategies see ordinary arrays and never a rejected reply.
Training tasks ask for the update in the configured codec ([training] codec:
i8 by default, f16, f32, or topk at [training] density, which the decoder
expands to the dense delta the device's error feedback accounts for).
A task whose model has a published delta (releases.py, [training] download)
names its base (`Task.delta_base`): a device holding that model fetches the
small delta, any other the full release.

Task ids are `<kind>-<round>-<run>.<n>`: `<run>` is fresh in every gateway
process, so replies recorded in an earlier run can never be replayed into a
later one, and `<n>` counts pushes, so two exchanges never share an id (even
for a strategy that sends no "server-round"). The one exception is the
exchange an interrupted run left open: it re-opens under its own id, with its
own devices (the book says which). `send_and_receive` closes an exchange when
every selected device replied or the deadline passed, whichever is first.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol
from uuid import uuid4

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from protocol import schemas
from protocol.keys import identity_id
from protocol.logs import event
from protocol.tensors import DEFAULT_DENSITY, UPLOAD_CODECS, check_density

from .ingest import Accepted, OpenTask
from .models import Release
from .outbox import Outbox
from .rounds import RoundBook
from .weights import WeightRule

log = logging.getLogger("starling.gateway.grid")

# Config-record keys the grid turns into the device's task config (the engine sets them; Flower's
# strategies add SERVER_ROUND, and "learning-rate" is an alias some strategies use).
EPOCHS = "epochs"
BATCH_SIZE = "batch-size"
LR = "lr"
LEARNING_RATE = "learning-rate"
SERVER_ROUND = "server-round"
NUM_EXAMPLES = "num-examples"  # what Flower's weighted strategies weigh a reply by (their `weighted_by_key`)
CONFIG_FIELDS = frozenset({EPOCHS, BATCH_SIZE, LR, LEARNING_RATE, SERVER_ROUND})


class Devices(Protocol):
    """Which devices the grid may address (the gateway's device registry)."""

    def online_nodes(self) -> dict[int, bytes]: ...  # Flower node id -> public key, enrolled and online
    def key_of(self, node: int) -> bytes | None: ...  # the public key of any enrolled device


def kind_of(message: Message) -> str:
    """Flower message types may carry a suffix ("train.proximal"); the task kind is the prefix."""
    return message.metadata.message_type.split(".")[0]


def round_of(message: Message) -> int:
    config = next(iter(message.content.config_records.values()), None)
    return int(config.get(SERVER_ROUND, 0)) if config is not None else 0


def task_config(config, deadline: float) -> schemas.TrainConfig:
    """The device's task config from a message's config record; other scalar keys ("proximal-mu",
    "clipping_norm", ...) travel as options (at most `schemas.MAX_OPTIONS`)."""
    defaults = schemas.TrainConfig()
    options = {k: v for k, v in sorted(config.items())
               if k not in CONFIG_FIELDS and isinstance(v, (int, float, str, bool))}
    if len(options) > schemas.MAX_OPTIONS:
        event(log, "task.options_dropped", logging.WARNING, keys=",".join(sorted(options)[schemas.MAX_OPTIONS:]))
        options = {k: options[k] for k in sorted(options)[: schemas.MAX_OPTIONS]}
    return schemas.TrainConfig(
        epochs=int(config.get(EPOCHS, defaults.epochs)),
        batch_size=int(config.get(BATCH_SIZE, defaults.batch_size)),
        lr=float(config.get(LR, config.get(LEARNING_RATE, defaults.lr))),
        deadline=deadline,
        options=options,
    )


class MqttGrid(Grid):
    """A Flower Grid whose nodes are enrolled, online devices reached over MQTT."""

    def __init__(self, book: RoundBook, outbox: Outbox, release_for: Callable[[dict[str, np.ndarray] | None, int], Release],
                 devices: Devices, deadline_s: float, stop: threading.Event, weights: WeightRule = WeightRule(),
                 *, codec: str = "i8", density: float = DEFAULT_DENSITY) -> None:
        """`release_for(weights or None, round)`: the release a message's arrays are (None: the current
        model), published if it is new. `stop` (SIGTERM) ends every wait at once. `weights`: what each
        reply weighs for the strategy (its "num-examples"), never simply the device's claim. `codec` and
        `density` ([training]): how training tasks ask devices to encode their updates (evaluate tasks
        send no weights and keep "i8")."""
        if codec not in UPLOAD_CODECS:
            raise ValueError(f"codec must be one of {UPLOAD_CODECS}, got {codec!r}")
        self.codec, self.density = codec, check_density(density)
        self._book = book
        self._weights = weights
        self._outbox = outbox
        self._release_for = release_for
        self._devices = devices
        self._deadline_s = deadline_s
        self._stop = stop
        self.run_tag = secrets.token_hex(4)
        self._pushes = 0
        self._run = Run.create_empty(run_id=1)
        self._lock = threading.Lock()
        self._instructions: dict[str, Message] = {}  # message id -> the Flower instruction it answers

    # --- Grid API -----------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        # Flower's sampling polls this while it waits for enough nodes: let SIGTERM end that wait.
        if self._stop.is_set():
            raise InterruptedError("gateway is stopping")
        return list(self._devices.online_nodes())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._pushes += 1
        groups: dict[tuple[str, int], list[Message]] = {}
        for message in messages:
            kind = kind_of(message)
            if kind not in schemas.TASK_KINDS:
                raise ValueError(f"MqttGrid cannot carry message type {message.metadata.message_type!r}")
            groups.setdefault((kind, round_of(message)), []).append(message)
        ids: list[str] = []
        for (kind, round_), group in groups.items():
            ids += self._push_exchange(kind, round_, group)
        return ids

    def _push_exchange(self, kind: str, round_: int, messages: list[Message]) -> list[str]:
        """One exchange: its release, its open tasks in the book, then the tasks on the wire."""
        reopen = self._book.resume_for(kind, round_)
        if reopen is not None:  # the interrupted exchange: its own id, devices and config, not today's
            task_id = reopen.task
            template = messages[0]
            messages = [Message(template.content, n, template.metadata.message_type,
                                group_id=template.metadata.group_id) for n in reopen.nodes]
        else:
            task_id = f"{kind}-{round_}-{self.run_tag}.{self._pushes}"
        releases, seen = {}, {}
        for message in messages:  # strategies give every message the same ArrayRecord: hash it once
            records = list(message.content.array_records.values())
            if len(records) > 1:
                raise ValueError("MqttGrid carries one ArrayRecord per message")
            key = id(records[0]) if records else None
            if key not in seen:
                weights = {k: v.numpy() for k, v in records[0].items()} if records else None
                seen[key] = self._release_for(weights, round_)  # None: the current model
            releases[seen[key].digest] = seen[key]
        if len(releases) > 1:
            raise ValueError("MqttGrid sends one model per exchange; the strategy's messages carry several")
        release = next(iter(releases.values()), None) or self._release_for(None, round_)
        deadline = time.time() + self._deadline_s
        tasks, wires = [], []
        for message in messages:
            device_key = self._devices.key_of(message.metadata.dst_node_id)
            if device_key is None:
                event(log, "task.skipped", logging.WARNING, node=message.metadata.dst_node_id, reason="not_enrolled")
                continue
            configured = (self.codec, self.density) if kind == "train" else ("i8", DEFAULT_DENSITY)
            if reopen is not None and reopen.config:  # (a journal of the first version kept no config)
                config, codec, density = _asked(reopen.config, deadline, configured)
            else:
                config = task_config(next(iter(message.content.config_records.values()), {}), deadline)
                codec, density = configured
            message_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's own grids do
            tasks.append(OpenTask(message_id, identity_id(device_key), device_key, kind, round_, task_id,
                                  release.digest, release.weights, deadline, config.options, codec, density))
            wires.append(config)
            with self._lock:
                self._instructions[message_id] = message
        # What the exchange's devices are asked (the same for all of them with Flower's strategies): journaled,
        # so that a re-opened round asks the rest the same, and recorded with the round's release.
        exchange_config = {}
        if wires:
            exchange_config = {k: v for k, v in wires[0].to_wire().items() if k != "deadline"}
            # with how it asked for its updates: a round re-opened after a restart (whose devices may have trained
            # already) keeps asking what they were asked, whatever the config says now
            exchange_config.update({schemas.CODEC: tasks[0].codec, schemas.DENSITY: tasks[0].density})
        restored = self._book.open(kind, round_, task_id, release.digest, release.lineage, tasks, exchange_config)
        # A device holding the release before this one downloads the delta published beside it instead.
        delta_base = release.delta.base if release.delta is not None else b""
        for task, config in zip(tasks, wires):
            if task.device_id not in restored:  # answered before the interruption: the journal kept its reply
                self._outbox.task(task.device_id, kind, round_, task_id, release.digest, config, task.codec,
                                  task.density, delta_base)
        return [task.message_id for task in tasks]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Flower reply messages for the accepted replies; built here, off the ingest path. Each weighs
        what the weight rule gives it, from all the claims pulled together (an exchange's, at its close)."""
        out = []
        pulled = self._book.take_replies(message_ids)
        weights = self._weights.effective([accepted.examples for _, accepted in pulled])
        for (message_id, accepted), weight in zip(pulled, weights):
            with self._lock:
                instruction = self._instructions.pop(message_id, None)
            reply = Message(self._to_flower(accepted, weight), reply_to=instruction)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            out.append(reply)
        return out

    def forget(self, message_ids: Iterable[str]) -> None:
        """Drop the instructions of messages whose replies are not pulled (a buffered engine's, gateway/buffered.py)."""
        with self._lock:
            for message_id in message_ids:
                self._instructions.pop(message_id, None)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        waiting = set(self.push_messages(messages))
        limit = self._deadline_s if timeout is None else min(timeout, self._deadline_s)
        self._book.wait(waiting, time.monotonic() + limit, self._stop)
        if self._stop.is_set():
            raise InterruptedError("gateway is stopping")
        self._book.close(waiting)
        replies = list(self.pull_messages(waiting))
        with self._lock:
            for message_id in waiting:  # the unanswered ones: nothing will come for them now
                self._instructions.pop(message_id, None)
        return replies

    @staticmethod
    def _to_flower(accepted: Accepted, weight: int) -> RecordDict:
        if accepted.task.kind != "train":
            return RecordDict({"metrics": MetricRecord({NUM_EXAMPLES: weight, **accepted.metrics})})
        return train_content(accepted.task.base_weights, accepted.delta, weight, accepted.metrics)


def _asked(journaled: dict, deadline: float, configured: tuple[str, float]) -> tuple[schemas.TrainConfig, str, float]:
    """A re-opened exchange's task config, codec and density, as journaled when it opened. A journal written
    before the codec was journaled with the config kept none: then the `configured` (codec, density), what
    that gateway asked unless its config changed across the restart."""
    wire = dict(journaled)
    codec, density = wire.pop(schemas.CODEC, configured[0]), wire.pop(schemas.DENSITY, configured[1])
    return schemas.TrainConfig.from_wire({**wire, "deadline": deadline}), codec, density


def train_content(base: dict[str, np.ndarray], delta: dict[str, np.ndarray], weight: float,
                  metrics: dict[str, float]) -> RecordDict:
    """What a strategy gets for one accepted training reply: full weights (base + the dequantized delta,
    `Accepted.delta`), weighing `weight` (its "num-examples"). gateway/recompute.py builds the very same
    contents from a recorded update, so an aggregate can be recomputed bit for bit."""
    arrays = ArrayRecord({name: Array(base[name] + delta[name]) for name in base})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({NUM_EXAMPLES: weight, **metrics})})
