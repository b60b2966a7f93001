"""Buffered asynchronous rounds (FedBuff): aggregate every K arrived updates, for fleets of uneven speed.

    [rounds]
    mode = "buffered"          # "sync" (the default): one exchange per round, closed when all replied
    buffer = 3                 # K: a step aggregates once this many updates are accepted
    max_staleness = 4          # an update trained this many steps behind the head or more is refused
    staleness_exponent = 0.5   # its weight is scaled by (1 + staleness) ** -exponent (0.5: 1/sqrt(1+s))

A synchronous round waits for its slowest device; here every device trains
all the time. `BufferedEngine` is the round engine (engine.py) with two hooks
of its own, a "round" being one aggregation step:

    begin()           the engine's, then the updates a stopped or killed run had accepted but not aggregated
                      (journaled: Exchanges.buffered) are buffered again, each still with its staleness
    train_round(s)    tasks to every idle online device (the strategy's configure_train: its sampling and
                      config), each task its own exchange (journaled, receipts, the reply checks, one `updates`
                      vertex when its reply is in), until K accepted updates are buffered; then aggregate_step

An update is a delta against the model it was trained on (its task's round r:
staleness = s - r, the steps released since). The step's replies to the
strategy are head + delta, each weighing its effective example count (the
`[aggregation]` rule) times the staleness factor: FedAvg's weighted mean is
then the staleness-weighted mean of the deltas applied to the current head,
and the ledger's aggregate records each input with that effective weight (a
recompute, gateway/recompute.py, replays it bit for bit on the head).
Updates past `max_staleness` are never aggregated: dropped, logged and counted
(`stale`). Only strategies whose aggregate of rebased updates means what it
says are accepted (`check_strategy`); the others are refused at config time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from protocol.keys import node_id
from protocol.logs import event

from .engine import RoundEngine, _arrays
from .grid import train_content
from .ingest import Accepted
from .provenance import Source
from .rounds import RoundTraffic
from .weights import WeightRule

log = logging.getLogger("starling.gateway.buffered")

MODES = ("sync", "buffered")
MAX_BUFFER = 10_000
MAX_STALENESS = 1_000
# Strategies whose aggregate of K rebased updates means what it says: a (weighted) mean or a coordinate-wise
# rule over the updates (a subclass of one of them counts as it, unless it is also one refused below).
BUFFERABLE = ("FedAvg", "FedProx", "FedMedian", "FedTrimmedAvg")
REFUSED = {
    "FedAvgM": "its server momentum steps once per round of the whole fleet",
    "FedOpt": "its server optimizer steps once per round of the whole fleet",
    "QFedAvg": "it needs every selected device's loss on the round's model",
    "Krum": "it selects among a round's replies, assuming num_malicious_nodes of them; a buffer of K is not a round",
    "MultiKrum": "it selects among a round's replies; a buffer of K is not a round",
    "Bulyan": "it selects among a round's replies; a buffer of K is not a round",
}
WAIT_SLICE_S = 1.0  # the longest wait between two looks at the fleet (a device that came online is tasked)
REST_S = 5.0  # a device that sat its task out (or let it expire) is not asked again for this long


@dataclass(frozen=True)
class BufferSettings:
    """The buffered mode's `[rounds]` settings."""

    buffer: int = 3  # K
    max_staleness: int = 4
    staleness_exponent: float = 0.5

    def factor(self, staleness: int) -> float:
        """What an update `staleness` steps behind weighs, relative to a fresh one (FedBuff's 1/sqrt(1+s))."""
        return (1.0 + staleness) ** -self.staleness_exponent

    def too_stale(self, staleness: int) -> bool:
        return staleness > self.max_staleness


def check_strategy(strategy: Any, dp: dict | None) -> str | None:
    """Why buffered mode makes no sense with this strategy (None: it does)."""
    if dp:
        return ("a DP wrapper's accounting assumes rounds of sampled devices, and its clipping a round's base; "
                "buffered steps are neither")
    inner = strategy
    while getattr(inner, "strategy", None) is not None and inner.strategy is not inner:
        inner = inner.strategy  # (the [defense] bound wraps the configured strategy)
    names = [cls.__name__ for cls in type(inner).__mro__]
    for name in names:
        if name in REFUSED:
            return f"{type(inner).__name__}: {REFUSED[name]}"
    if not set(names) & set(BUFFERABLE):
        return f"{type(inner).__name__} is not one of {', '.join(BUFFERABLE)} (or a subclass)"
    return None


@dataclass
class Buffered:
    """An accepted update waiting for its step: the reply, the exchange it came in, the step it was tasked in."""

    accepted: Accepted
    exchange: str
    config: dict  # the task config its device got (what the release records its updates were trained with)

    @property
    def round(self) -> int:
        return self.accepted.task.round


class BufferedEngine(RoundEngine):
    def __init__(self, *args: Any, settings: BufferSettings, weights: WeightRule, **kwargs: Any) -> None:
        """The round engine's arguments, and `settings` ([rounds] buffer, max_staleness, staleness_exponent),
        `weights` (the [aggregation] rule: what an update's example count weighs)."""
        super().__init__(*args, **kwargs)
        self._settings = settings
        self._weight_rule = weights
        self._in_flight: dict[str, tuple[int, float]] = {}  # message id -> (node, deadline: monotonic)
        self._resting: dict[int, float] = {}  # node -> when it may be tasked again (monotonic)
        self._buffer: list[Buffered] = []
        self._waiting: dict[str, int] = {}  # exchange -> its updates still buffered (finished when none are)
        self._recorded: set[bytes] = set()  # update digests on the ledger (an aggregate may name them)
        self.stale = 0  # updates refused for staleness, since start

    def report(self) -> dict[str, Any]:
        """The status's account of the buffer: its settings, what waits in it, what is out, what was too stale."""
        settings = self._settings
        return {"buffer": settings.buffer, "max_staleness": settings.max_staleness,
                "staleness_exponent": settings.staleness_exponent, "buffered": len(self._buffer),
                "in_flight": len(self._in_flight), "stale": self.stale}

    # --- hooks ---------------------------------------------------------------------------------

    def begin(self) -> int:
        """The engine's beginning, then what a previous run accepted and did not aggregate, buffered again."""
        step = super().begin()
        lineage = self._releases.head.lineage
        journaled = self._exchanges.buffered(lineage)
        interrupted = self._book.take_interrupted()  # a synchronous round left by a run before mode = "buffered"
        if interrupted is not None:
            journaled.append(interrupted)
        restored = self._book.restore_accepted(journaled)
        self._take_in(restored, step)
        if restored:
            event(log, "buffer.restored", exchanges=len(restored), updates=len(self._buffer), step=step)
        return step

    def train_round(self, round_: int) -> None:
        """One step: keep every idle device training until K updates are buffered, then aggregate them."""
        while len(self._buffer) < self._settings.buffer:
            self._dispatch(round_)
            until = min([d for _, d in self._in_flight.values()] + [time.monotonic() + WAIT_SLICE_S])
            answered = self._book.wait_any(set(self._in_flight), until, self._stop)
            if self._stop.is_set():
                raise InterruptedError("stopped while buffering updates")
            now = time.monotonic()
            self._close(answered | {m for m, (_, d) in self._in_flight.items() if d <= now}, round_)
        self._aggregate(round_)

    # --- the steps -------------------------------------------------------------------------------

    def _dispatch(self, round_: int) -> None:
        """A task for every idle online device the strategy samples, each its own exchange, on the head."""
        now = time.monotonic()
        self._resting = {node: until for node, until in self._resting.items() if until > now}
        busy = {node for node, _ in self._in_flight.values()} | set(self._resting)
        if not set(self._devices.online_nodes()) - busy:
            return
        head = self._releases.head
        config = ConfigRecord(self._train_config)
        messages = self._strategy.configure_train(round_, _arrays(head.weights), config, self._grid)
        deadline = time.monotonic() + self._schedule.deadline_s
        for message in messages:
            node = message.metadata.dst_node_id
            if node in busy:
                continue
            for message_id in self._grid.push_messages([message]):
                self._in_flight[message_id] = (node, deadline)
            busy.add(node)

    def _close(self, message_ids: set[str], round_: int) -> None:
        """End these tasks' exchanges (answered, or past their deadline); their updates to the ledger and the
        buffer."""
        if not message_ids:
            return
        nodes = {m: self._in_flight.pop(m)[0] for m in message_ids if m in self._in_flight}
        self._book.close(message_ids)
        updated = {m for m, _ in self._book.take_replies(message_ids)}  # (the updates come with their traffic)
        for message_id in set(nodes) - updated:  # sat out or expired: not asked again at once
            self._resting[nodes[message_id]] = time.monotonic() + REST_S
        self._grid.forget(message_ids)
        closed = self._book.take_closed()
        self._take_in([t for t in closed if t.kind == "train"], round_)
        self._board.exchanges_closed(round_, closed, buffered=True)

    def _take_in(self, trained: list[RoundTraffic], round_: int) -> None:
        """Closed training exchanges: their updates kept and on the ledger, then buffered (or refused as stale);
        an exchange with nothing to aggregate is finished at once."""
        head = self._releases.head
        for traffic in trained:
            if traffic.accepted and self._blobs is not None:
                self._blobs.keep_updates(head.version, [a.envelope.attachment for a in traffic.accepted])
            self._recorded.update(self._keeper.record_updates(traffic, self._exchanges))
            fresh = [a for a in traffic.accepted if not self._refuse_stale(a, round_)]
            self._buffer += [Buffered(a, traffic.task, traffic.config) for a in fresh]
            if fresh:
                self._waiting[traffic.task] = self._waiting.get(traffic.task, 0) + len(fresh)
            else:
                self._releases.skip_round([traffic.task])

    def _refuse_stale(self, accepted: Accepted, round_: int) -> bool:
        staleness = round_ - accepted.task.round
        if not self._settings.too_stale(staleness):
            return False
        self.stale += 1
        event(log, "buffer.stale", logging.WARNING, device=accepted.task.device_id, task=accepted.task.task,
              staleness=staleness, bound=self._settings.max_staleness)
        return True

    def _aggregate(self, round_: int) -> None:
        """The buffered updates, rebased on the head and weighted by examples x staleness, as the next step."""
        batch = [b for b in self._buffer if not self._refuse_stale(b.accepted, round_)]
        exchanges = self._release_waiting(self._buffer)
        self._buffer = []
        head = self._releases.head
        staleness = [round_ - b.round for b in batch]
        weights = staleness_weights(self._settings, self._weight_rule.effective([b.accepted.examples for b in batch]),
                                    staleness)
        replies, sources = [], []
        for item, weight in zip(batch, weights):
            accepted = item.accepted
            content = train_content(head.weights, accepted.delta, weight, accepted.metrics)
            replies.append(_reply(content, accepted))
            sources.append(Source(accepted.task.device_key, accepted.envelope.body["digest"], content,
                                  lambda a=accepted: a.delta))
        event(log, "buffer.step", step=round_, updates=len(batch), staleness=",".join(map(str, staleness)) or "-",
              base=head.version)
        self._board.step_aggregated(round_, len(batch))
        if not batch:
            self._releases.skip_round(exchanges)
            return
        extra = {"buffered": {"buffer": self._settings.buffer, "max_staleness": self._settings.max_staleness,
                              "staleness_exponent": self._settings.staleness_exponent, "staleness": staleness}}
        self.aggregate_step(round_, head, replies, sources, self._recorded, exchanges, batch[0].config, extra)
        self._recorded -= {s.digest for s in sources}  # (named by their step: no later one takes them)

    def _release_waiting(self, items: list[Buffered]) -> list[str]:
        """The exchanges whose every buffered update is in `items`: finished with the step that takes them."""
        done = []
        for item in items:
            self._waiting[item.exchange] -= 1
            if self._waiting[item.exchange] == 0:
                del self._waiting[item.exchange]
                done.append(item.exchange)
        return done


def _reply(content: RecordDict, accepted: Accepted) -> Message:
    """A Flower reply to the task `accepted` answers (the strategy reads only its content; provenance maps it back
    to its update through the content)."""
    instruction = Message(RecordDict(), node_id(accepted.task.device_key), "train")
    instruction.metadata.__dict__["_message_id"] = accepted.task.message_id  # as Flower's own grids do
    reply = Message(content, reply_to=instruction)
    reply.metadata.__dict__["_message_id"] = f"{accepted.task.message_id}.reply"
    return reply


def staleness_weights(settings: BufferSettings, examples: list[int], staleness: list[int]) -> list[float]:
    """The weights a step's updates get: effective examples x staleness factor (what `_aggregate` computes)."""
    return [n * settings.factor(s) for n, s in zip(examples, staleness)]

