"""The round book: the one owner of the round's state.

Everything about the exchanges in flight lives here, behind one lock: the
open tasks, the replies accepted and the tasks closed (remembered for
`REMEMBER_ROUNDS` rounds, so a late or replayed reply is told apart), the
current round, the exchange an interrupted run left open (resumed, and the
replies that arrive for it before it re-opens, deferred), the traffic of
each exchange, the counters of rejections and duplicates, and the journal
writes that make an accepted reply survive a crash.

Who calls what:

    the grid (engine thread)      resume_for, open, wait, close, take_replies
    the intake (worker thread)    admit_batch: stage 2 for a batch of stage-1 outcomes
    the engine                    take_closed: each exchange's traffic, once
    the buffered engine           wait_any, take_interrupted, restore_accepted (gateway/buffered.py)

Stage 2 itself is `admission.admit`, a pure function of this book; the book
applies its outcome. A reply is journaled (one commit per batch) before
`admit_batch` returns, so no receipt can leave before its reply is on disk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from uuid import uuid4

from protocol import envelope, topics
from protocol.keys import node_id
from protocol.logs import event

from .admission import admit
from .ingest import Accepted, Authenticated, Deferred, Duplicate, OpenTask, Outcome, Rejected, Skipped
from .journal import Exchanges, Interrupted

log = logging.getLogger("starling.gateway.rounds")
REMEMBER_ROUNDS = 2  # replies to tasks this many rounds old are still told apart as replay/late
MAX_DEFERRED = 100_000  # replies held while an interrupted exchange re-opens (more is not a fleet, it is a flood)


@dataclass
class RoundTraffic:
    """What one exchange (a kind of task for one round) produced; handed to the engine once, then dropped."""

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
    restored: int = 0  # replies journaled before an interruption, restored when it re-opened
    config: dict = field(default_factory=dict)  # the task config its devices got (without the deadline)


@dataclass(frozen=True)
class Reopening:
    """The exchange an interrupted run left, re-opened as it was: its task id, its devices (only those that
    had answered, if it had closed) and the task config they got."""

    task: str
    nodes: list[int]
    config: dict


def _count(counter: dict[str, int], reason: str) -> None:
    counter[reason] = counter.get(reason, 0) + 1


class RoundBook:
    """Open tasks, accepted and closed replies, the current round, resume and deferral, traffic, journal."""

    def __init__(
        self,
        exchanges: Exchanges | None,
        authenticate: Callable[[str, bytes], Authenticated | Rejected],
        is_revoked: Callable[[bytes], bool],
        evaluate_metrics: frozenset[str],
        requeue: Callable[[list[tuple[str, bytes]]], None],
        interrupted: Interrupted | None = None,
        buffered: bool = False,
    ) -> None:
        """`exchanges`: the journal's table (None: nothing survives a crash, for tests of the logic only).
        `authenticate`: stage 1, for replies restored from the journal. `requeue`: hands deferred replies
        back to the intake once their exchange re-opened. `interrupted`: the exchange to resume.
        `buffered`: the exchanges are a buffered run's (journaled as such: a restart keeps them all)."""
        self._exchanges = exchanges
        self._buffered = buffered
        self._authenticate = authenticate
        self._is_revoked = is_revoked
        self.evaluate_metrics = evaluate_metrics
        self._requeue = requeue
        self._interrupted = interrupted
        self._cv = threading.Condition()
        self.current_round = 0
        self._open: dict[tuple[str, str], OpenTask] = {}  # (device id, task id) -> task
        self._accepted: dict[tuple[str, str], tuple[int, bytes]] = {}  # (device, task) -> (round, update digest)
        self._closed: dict[tuple[str, str], int] = {}  # tasks whose exchange closed without a reply -> round
        self._deferred: list[tuple[str, bytes]] = []
        self._traffic: dict[str, RoundTraffic] = {}  # task id -> open exchange
        self._done: list[RoundTraffic] = []  # closed exchanges not taken yet
        self._task_of: dict[str, str] = {}  # message id -> task id, while its exchange is open
        self._ready: dict[str, Accepted] = {}  # message id -> accepted reply, until pulled
        self._answered: set[str] = set()  # message ids with a reply or a skip: nothing more to wait for
        self._rejections: dict[str, int] = {}
        self._duplicates = 0

    # --- what admission reads (called with the lock held) ------------------------------------

    def open_task(self, device: str, task: str) -> OpenTask | None:
        return self._open.get((device, task))

    def accepted_reply(self, device: str, task: str) -> tuple[int, bytes] | None:
        return self._accepted.get((device, task))

    def closed_in(self, device: str, task: str) -> int | None:
        return self._closed.get((device, task))

    def is_reopening(self, task: str) -> bool:
        return self._interrupted is not None and task == self._interrupted.task

    def is_revoked(self, key: bytes) -> bool:
        return self._is_revoked(key)

    # --- counters (any thread) ----------------------------------------------------------------

    @property
    def rejections(self) -> dict[str, int]:
        with self._cv:
            return dict(self._rejections)

    @property
    def duplicates(self) -> int:
        return self._duplicates

    # --- the grid's side ----------------------------------------------------------------------

    def resume_for(self, kind: str, round_: int) -> Reopening | None:
        """How to re-open this exchange when it is the one an interrupted run left (its devices, not a new
        sample; the config they got, not today's), else None."""
        resume = self._interrupted
        if resume is None or kind != "train" or round_ != resume.round:
            return None
        nodes = list(resume.nodes) if not resume.closed else sorted(
            {node_id(envelope.decode(w).ctx.sender) for w in resume.replies})
        return Reopening(resume.task, nodes, resume.config)

    def open(self, kind: str, round_: int, task_id: str, base: bytes, lineage: int,
             tasks: list[OpenTask], config: dict | None = None) -> set[str]:
        """Open an exchange; return the devices whose replies were restored from the journal (not to be
        tasked again). Re-opening an interrupted exchange also hands its deferred replies back. `config`:
        the task config its devices get (without the deadline), journaled with the exchange."""
        config = config or {}
        resumed = self.is_reopening(task_id)
        restored: set[str] = set()
        deferred: list[tuple[str, bytes]] = []
        with self._cv:
            if round_ > self.current_round:
                self.current_round = round_
                self._forget_before(round_ - REMEMBER_ROUNDS)
            traffic = self._traffic.setdefault(task_id, RoundTraffic(kind, round_, task_id, base, config=config))
            for task in tasks:
                self._open[(task.device_id, task.task)] = task
                self._task_of[task.message_id] = task_id
                traffic.sent += 1
            if resumed:
                # Restored under the lock that opened the tasks: a device re-sending its journaled reply in
                # between (its receipt never left) would otherwise be accepted live, turn the restored copy
                # into a duplicate and be tasked again.
                restored = self._restore(self._interrupted.replies)
                traffic.restored = len(restored)
                self._interrupted, deferred, self._deferred = None, self._deferred, []
            # No device could be tasked (all gone since sampling, or a resumed exchange that had closed with
            # no reply): close() by message ids would never find this exchange, so it is over at once and
            # still reaches take_closed (the engine finishes it in the journal; else a restart resumes it).
            empty = not traffic.sent
            if empty:
                self._done.append(self._traffic.pop(task_id))
        if kind == "train" and self._exchanges is not None:
            self._exchanges.open(task_id, lineage, round_, base, [node_id(t.device_key) for t in tasks], config,
                                 self._buffered)
            if empty:
                self._exchanges.close(task_id)
        if deferred:
            self._requeue(deferred)  # replies that came while the exchange was re-opening
        return restored

    def _restore(self, replies: list[bytes]) -> set[str]:
        """Admit journaled replies again (no journal write, no receipt: both happened before)."""
        batch = []
        for wire in replies:
            env = envelope.decode(wire)
            topic = topics.reply(env.ctx.gateway, env.ctx.sender_id)
            batch.append((topic, wire, self._authenticate(topic, wire)))
        outcomes = self._apply(batch)
        for outcome in outcomes:
            if not isinstance(outcome, Accepted | Skipped):
                event(log, "reply.not_restored", logging.WARNING, device=outcome.device_id,
                      reason=getattr(outcome, "reason", type(outcome).__name__))
        return {o.device_id if isinstance(o, Skipped) else o.task.device_id
                for o in outcomes if isinstance(o, Accepted | Skipped)}

    def wait(self, message_ids: set[str], until: float, stop: threading.Event) -> None:
        """Until every message has a reply or a skip, `until` (monotonic) passed, or `stop` is set."""
        with self._cv:
            while not message_ids <= self._answered and not stop.is_set():
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._cv.wait(min(left, 0.5))

    def wait_any(self, message_ids: set[str], until: float, stop: threading.Event) -> set[str]:
        """Until one of these messages has a reply or a skip, `until` (monotonic) passed, or `stop` is set;
        return the ones answered."""
        with self._cv:
            while not (answered := message_ids & self._answered) and not stop.is_set():
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.5))
            return answered

    def take_interrupted(self) -> Interrupted | None:
        """The exchange an interrupted run left, handed over instead of re-opened (a buffered engine keeps its
        journaled replies, not its devices); the replies deferred for it go back to the intake."""
        with self._cv:
            interrupted, self._interrupted = self._interrupted, None
            deferred, self._deferred = self._deferred, []
        if deferred:
            self._requeue(deferred)  # now late or not selected: their devices get an answer
        return interrupted

    def restore_accepted(self, journaled: list[Interrupted]) -> list[RoundTraffic]:
        """Journaled replies of exchanges that are not re-opened (a buffered run's, gateway/buffered.py), checked
        again (stage 1) and remembered as accepted: their devices' re-sends are duplicates, not new. One traffic
        per exchange, its `accepted` the updates (signed skips are left out); nothing is journaled again."""
        out = []
        with self._cv:
            for exchange in journaled:
                traffic = RoundTraffic("train", exchange.round, exchange.task, exchange.base, config=exchange.config)
                for wire in exchange.replies:
                    env = envelope.decode(wire)
                    auth = self._authenticate(topics.reply(env.ctx.gateway, env.ctx.sender_id), wire)
                    if isinstance(auth, Rejected):  # (a key revoked since: its update is not aggregated)
                        event(log, "reply.not_restored", logging.WARNING, device=auth.device_id, reason=auth.reason)
                        continue
                    if auth.reply.skip:
                        continue
                    task = OpenTask(str(uuid4()), env.ctx.sender_id, env.ctx.sender, "train", exchange.round,
                                    exchange.task, exchange.base, {}, 0.0)
                    self._accepted[(task.device_id, task.task)] = (task.round, auth.reply.digest)
                    traffic.accepted.append(Accepted(task, env, auth.metrics, auth.reply.examples))
                traffic.restored = len(traffic.accepted)
                out.append(traffic)
        return out

    def close(self, message_ids: set[str]) -> None:
        """End the exchanges of these messages: a reply after this is `late`; their traffic is done."""
        with self._cv:
            task_ids = {self._task_of.pop(m) for m in message_ids if m in self._task_of}
            for key in [key for key, task in self._open.items() if task.message_id in message_ids]:
                self._closed[key] = self._open.pop(key).round
            self._answered -= message_ids
            done = [self._traffic.pop(t) for t in task_ids if t in self._traffic]
            self._done.extend(sorted(done, key=lambda t: (t.round, t.kind != "train")))
        for traffic in done:
            if traffic.kind == "train" and self._exchanges is not None:
                self._exchanges.close(traffic.task)

    def take_replies(self, message_ids: Iterable[str]) -> list[tuple[str, Accepted]]:
        with self._cv:
            return [(mid, self._ready.pop(mid)) for mid in list(message_ids) if mid in self._ready]

    def take_closed(self) -> list[RoundTraffic]:
        with self._cv:
            done, self._done = self._done, []
        return done

    # --- the intake's side --------------------------------------------------------------------

    def admit_batch(self, batch: list[tuple[str, bytes, Authenticated | Rejected]]) -> list[Outcome]:
        """Stage 2 for a batch; the accepted training replies are journaled (one commit) before return."""
        outcomes = self._apply(batch)
        if self._exchanges is not None:
            # Before the receipts: once a device hears "accepted" it forgets the reply. Skips too: a device
            # that said it sits the round out will not say it again to a restarted gateway.
            self._exchanges.accept_many([(o.task.task, o.task.device_id, payload)
                                         for o, (_, payload, _) in zip(outcomes, batch)
                                         if isinstance(o, Accepted | Skipped) and o.task.kind == "train"])
        return outcomes

    def _apply(self, batch: list[tuple[str, bytes, Authenticated | Rejected]]) -> list[Outcome]:
        """Admit and apply under one lock, so a reply is either in its round or late, never lost between."""
        outcomes: list[Outcome] = []
        now = time.time()
        with self._cv:
            for topic, payload, first in batch:
                outcome = first if isinstance(first, Rejected) else self._admit(topic, first, now)
                outcomes.append(outcome)
                self._record(outcome, topic, payload)
            if any(isinstance(o, Accepted | Skipped) for o in outcomes):  # a wait may be over
                self._cv.notify_all()
        return outcomes

    def _admit(self, topic: str, auth: Authenticated, now: float) -> Outcome:
        try:
            return admit(self, auth, now)
        except Exception as exc:  # a bug in a check must cost this reply only, never the rest of the batch
            log.exception("reply.check_failed topic=%s", topic)
            return Rejected("internal_error", topics.device_of(topic) or "", f"{type(exc).__name__}: {exc}")

    def _record(self, outcome: Outcome, topic: str, payload: bytes) -> None:
        """Apply one outcome to the book (lock held)."""
        if isinstance(outcome, Accepted):
            task = outcome.task
            del self._open[(task.device_id, task.task)]
            self._accepted[(task.device_id, task.task)] = (task.round, outcome.envelope.body["digest"])
            self._ready[task.message_id] = outcome
            self._answered.add(task.message_id)
            self._traffic[task.task].accepted.append(outcome)
        elif isinstance(outcome, Skipped):
            task = outcome.task
            del self._open[(task.device_id, task.task)]
            self._closed[(task.device_id, task.task)] = task.round
            self._answered.add(task.message_id)
            _count(self._traffic[task.task].skipped, outcome.reason)
        elif isinstance(outcome, Duplicate):  # honest at-least-once delivery: no rejection
            self._duplicates += 1
            traffic = self._traffic.get(outcome.envelope.ctx.task)
            if traffic is not None:
                traffic.duplicates += 1
        elif isinstance(outcome, Deferred):
            if len(self._deferred) < MAX_DEFERRED:
                self._deferred.append((topic, payload))
        else:
            _count(self._rejections, outcome.reason)
            traffic = self._traffic.get(outcome.envelope.ctx.task) if outcome.envelope else None
            if traffic is not None:
                _count(traffic.rejected, outcome.reason)

    def _forget_before(self, round_: int) -> None:
        """Drop what is remembered of rounds before `round_` (their replies are then `stale_round`)."""
        self._accepted = {k: v for k, v in self._accepted.items() if v[0] >= round_}
        self._closed = {k: r for k, r in self._closed.items() if r >= round_}
