"""The round engine: a Flower strategy run round after round, for as long as the gateway runs.

Flower's `Strategy.start` runs an experiment: N rounds from initial arrays,
then it returns. A gateway is a service: rounds go on at an interval until it
is stopped, and every restart continues from the last release. So the engine
runs the same steps as `Strategy.start` (configure_train, send_and_receive,
aggregate_train, configure_evaluate, send_and_receive, aggregate_evaluate) one
round at a time, with round numbers that go on across restarts (strategies
such as FedAdam use them), through a template method over a few hooks:

    run()                    begin(), then per round: wait_turn(r), train_round(r), city_epoch(r) every
                             `[city] every` rounds, evaluate_round(r) when due, until the round count (if any) is reached
                             or a DP run's privacy budget is spent (max_epsilon: "done", with the
                             status's reason "privacy_budget_spent"; the last model stays published)
    begin()                  start the lineage (first start, reset, new model family) or go on from
                             the head: restore the strategy's state, publish the head again
    wait_turn(r)             the interval since the last round's start; enough devices online
    train_round(r)           one training exchange, its updates kept (blob_keeper.py) and on the ledger,
                             the next release (aggregate_step: the strategy's aggregate, journaled, published,
                             on the ledger with its inputs; gateway/buffered.py's engine overrides train_round
                             and begin, and aggregates every K arrived updates through aggregate_step too)
    city_epoch(r)            the city's merge of the member gateways' models (city.py), released as the
                             next step: the rounds go on from the city model
    evaluate_round(r)        one federated evaluation exchange (after a city epoch: of the city model)

After each round the blob store keeps the head under the round's tag and
prunes what retention does not keep (`BlobKeeper.end_round`).

`stop` (SIGTERM) ends any wait at once with InterruptedError; the round it
interrupted re-opens at the next start (the round book and the journal).

A spent privacy budget is an end, not a failure: the gateway would refuse every
later round too, so it says so once (`privacy.budget_spent` in the log), ends
"done" (exit 0: systemd's Restart=on-failure does not loop on it) and leaves its
last release published. Started again, it publishes that release afresh and ends
the same way (the accountant's record is restored, whatever the strategy).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp.exception import PrivacyBudgetExhausted

from protocol.logs import event

from . import privacy, recompute, strategy_state
from .blob_keeper import BlobKeeper
from .city import CityTier
from .devices import DeviceRegistry
from .grid import NUM_EXAMPLES, MqttGrid
from .journal import Exchanges
from .ledger_keeper import LedgerKeeper
from .provenance import SelectionRecorder, Source, provenance, rule_kind
from .releases import Releases
from .rounds import RoundBook, RoundTraffic
from .status import StatusBoard

log = logging.getLogger("starling.gateway.engine")
POLL_S = 0.2


@dataclass(frozen=True)
class Schedule:
    """When rounds run (the `[rounds]` section)."""

    num_rounds: int | None = None  # the lineage's last round; None: rounds go on until the gateway is stopped
    interval_s: float = 0.0  # between round starts
    min_devices: int = 2  # enrolled and online before a round starts ...
    wait_devices_s: float = 120.0  # ... waited for this long at a time
    evaluate_every: int = 1  # federated evaluation after every n-th round (and the last, and round 0)
    deadline_s: float = 60.0  # an exchange closes when all replied or this passed

    def evaluates(self, round_: int) -> bool:
        return round_ == 0 or round_ % self.evaluate_every == 0 or round_ == self.num_rounds

    def finished(self, last_round: int) -> bool:
        return self.num_rounds is not None and last_round >= self.num_rounds


@dataclass(frozen=True)
class Beginning:
    """Where this run of the gateway starts: a new lineage (and why), or the round to go on with."""

    new_lineage: str | None  # the reason to start a new lineage, or None to go on from the head
    next_round: int  # the interrupted round, or the one after the last


class RoundEngine:
    def __init__(self, strategy: Any, strategy_name: str, grid: MqttGrid, book: RoundBook, releases: Releases,
                 keeper: LedgerKeeper, exchanges: Exchanges, board: StatusBoard, devices: DeviceRegistry,
                 schedule: Schedule, train_config: dict[str, Any], release_config: dict[str, Any],
                 initial_weights: dict[str, np.ndarray], beginning: Beginning, stop: threading.Event,
                 recorder: SelectionRecorder | None = None, blobs: BlobKeeper | None = None,
                 city: CityTier | None = None) -> None:
        """`train_config`: the config record sent with every training task (grid.EPOCHS, BATCH_SIZE, LR);
        `release_config`: what each release records it came from, besides the task config its updates
        were trained with; `initial_weights`: a new lineage's first model; `recorder`: the strategy's
        `train_metrics_aggr_fn` (which replies it aggregated: provenance.py); `blobs`: where accepted updates
        and models are kept by digest; `city`: the city tier, None when this gateway merges with nobody."""
        self._blobs = blobs
        self._city = city
        self._strategy = strategy
        self._strategy_name = strategy_name
        self._grid = grid
        self._book = book
        self._releases = releases
        self._keeper = keeper
        self._exchanges = exchanges
        self._board = board
        self._devices = devices
        self._schedule = schedule
        self._train_config = train_config
        self._release_config = release_config
        self._initial_weights = initial_weights
        self._beginning = beginning
        self._stop = stop
        self._recorder = recorder or SelectionRecorder()  # (a strategy without the hook: all replies count)
        self._rule = rule_kind(strategy)
        self._last_start: float | None = None

    def run(self) -> str:
        """Rounds until the round count is reached or the privacy budget is spent ("done"); raises
        InterruptedError when stopped."""
        round_ = self.begin()
        while not self._schedule.finished(round_ - 1):
            spent = privacy.budget_spent(self._strategy)  # before waiting for a round that cannot run
            if spent is not None:
                return self._budget_spent(round_, spent)
            self.wait_turn(round_)
            self._board.begin_round(round_)
            try:
                self.train_round(round_)
            except PrivacyBudgetExhausted as exc:  # a wrapper's own check (the one above, or a user's strategy's)
                self._board.forget_round(round_)
                return self._budget_spent(round_, f"{privacy.mark_budget_spent(self._strategy)}: {exc}")
            if self._city is not None and self._city.due(round_):
                self.city_epoch(round_)
            if self._schedule.evaluates(round_):
                self.evaluate_round(round_)
            self._board.end_round(round_)
            self._end_blobs()
            self._exchanges.prune()
            round_ += 1
        return "done"

    # --- hooks ---------------------------------------------------------------------------------

    def begin(self) -> int:
        """Start the lineage or go on from its head; return the first round to train."""
        reason = self._beginning.new_lineage
        if reason is not None:
            self.wait_turn(0)  # a lineage starts when its first model goes out, to devices that are there
            self._board.begin_round(0)  # the first model's bytes are round 0's
            head = self._releases.start(self._initial_weights, reason)
        else:
            head = self._releases.head
            self._restore_strategy_state()
            self._releases.record_pending()  # what a crash left between the journal and the ledger
            self._releases.release_for(None, head.round)  # again, with a fresh expiry: the broker may have lost it
        self._board.set_lineage(head)
        if self._beginning.next_round > 0:
            return self._beginning.next_round
        if reason is None:  # a lineage an operator started (reset-model) goes out to devices that are there
            self.wait_turn(0)
            self._board.begin_round(0)
        self.evaluate_round(0)  # round 0: the first model, evaluated by the devices like every later one
        self._board.end_round(0)
        self._end_blobs()
        return 1

    def wait_turn(self, round_: int) -> None:
        """The interval since the last round's start, then enough devices (InterruptedError on stop)."""
        schedule = self._schedule
        if self._last_start is not None and schedule.interval_s > 0:
            start_at = self._last_start + schedule.interval_s
            if start_at > time.monotonic():
                self._board.set_state("idle", next_round_at=time.time() + start_at - time.monotonic())
                if self._stop.wait(start_at - time.monotonic()):
                    raise InterruptedError("stopped between rounds")
        give_up = time.monotonic() + schedule.wait_devices_s
        waiting = False
        while len(self._devices.online_nodes()) < schedule.min_devices:
            if not waiting:
                self._board.set_state("waiting")
                waiting = True
            if self._stop.wait(POLL_S):
                raise InterruptedError("stopped while waiting for devices")
            if time.monotonic() > give_up:
                online = len(self._devices.online_nodes())
                if schedule.num_rounds is not None:  # a bounded run: say so and end
                    raise TimeoutError(f"only {online} of {schedule.min_devices} devices enrolled and online "
                                       f"after {schedule.wait_devices_s:.0f} s")
                event(log, "round.postponed", logging.WARNING, round=round_, online=online,
                      needed=schedule.min_devices)  # a service waits on, and says so now and then
                give_up = time.monotonic() + schedule.wait_devices_s
        self._board.set_state("running")
        self._last_start = time.monotonic()

    def train_round(self, round_: int) -> None:
        head = self._releases.head
        messages = self._strategy.configure_train(round_, _arrays(head.weights), ConfigRecord(self._train_config),
                                                  self._grid)
        replies = list(self._grid.send_and_receive(messages, timeout=self._schedule.deadline_s))
        closed = self._book.take_closed()
        inputs: list[bytes] = []
        for traffic in closed:
            if traffic.kind == "train":
                if self._blobs is not None:  # queued before the ledger names them; written off this thread
                    self._blobs.keep_updates(head.version, [a.envelope.attachment for a in traffic.accepted])
                inputs += self._keeper.record_updates(traffic, self._exchanges)
        self._board.exchanges_closed(round_, closed)
        trained = [t for t in closed if t.kind == "train"]
        # The release records what its updates were trained with: the config the exchange's devices got
        # (a round re-opened after a restart keeps the config it began with).
        self.aggregate_step(round_, head, replies, _sources(replies, trained), set(inputs),
                            [t.task for t in trained], trained[0].config if trained else {})

    def aggregate_step(self, round_: int, head: Any, replies: list[Message], sources: list[Source],
                       recorded: set[bytes], exchanges: list[str], task_config: dict, extra: dict | None = None) -> None:
        """The strategy's aggregate of `replies` (each reply's sender and update: `sources`) as the lineage's next
        step: journaled, published, on the ledger with its inputs (those `recorded` there) and their effective
        weights, then each update's contribution. `exchanges` are finished with it; `extra`: more the release
        records it came from (a buffered step's staleness)."""
        try:
            arrays, _ = self._strategy.aggregate_train(round_, replies)
        except Exception:  # a strategy's error costs this round's model, not the service
            log.exception("round.aggregate_failed round=%d replies=%d", round_, len(replies))
            arrays = None
        selected = self._recorder.take()  # the replies the strategy aggregated, by its own computation
        if arrays is None:
            self._releases.skip_round(exchanges)
            return
        weights = {k: v.numpy() for k, v in arrays.items()}
        shaped = provenance(self._rule, sources, selected, NUM_EXAMPLES, head.weights, weights)
        config = {**self._release_config, **task_config, **(extra or {})}
        kept = [i for i in shaped.inputs if i[0] in recorded]  # (an update the ledger refused cannot be an input)
        release = self._releases.advance(weights, round_, shaped.kind, kept, self._strategy_name, config,
                                         strategy_state.capture(self._strategy), exchanges,
                                         recompute.aggregate_params(self._strategy, shaped, kept))
        if release is not None:
            self._board.set_lineage(release)
            started = time.monotonic()  # the model is out: now the costly part, each update's share of it
            scores = shaped.scores()
            self._keeper.record_contributions(round_, release.digest, scores)
            event(log, "round.scored", round=round_, updates=len(scores), inputs=len(shaped.inputs),
                  rule=shaped.kind, seconds=round(time.monotonic() - started, 3))

    def city_epoch(self, round_: int) -> None:
        """The city's merge (city.py); its model becomes the head the next round trains from."""
        head = self._releases.head
        try:
            merged = self._city.epoch(round_, head)
        except InterruptedError:
            raise
        except Exception:  # a merge that fails costs this epoch, never the gateway's own rounds
            log.exception("city.failed round=%d", round_)
            return
        if merged is None:
            return
        config = {**self._release_config, **self._releases.saved_state()[1]}  # what the head came from
        release = self._releases.merge_city(merged, config, strategy_state.capture(self._strategy))
        if release is not None:
            self._board.set_lineage(release)

    def evaluate_round(self, round_: int) -> None:
        head = self._releases.head
        messages = self._strategy.configure_evaluate(round_, _arrays(head.weights), ConfigRecord(), self._grid)
        replies = list(self._grid.send_and_receive(messages, timeout=self._schedule.deadline_s))
        self._board.exchanges_closed(round_, self._book.take_closed())
        try:
            self._strategy.aggregate_evaluate(round_, replies)
        except Exception:  # a strategy's error in its own metrics must not stop the rounds
            log.exception("round.evaluate_failed round=%d replies=%d", round_, len(replies))

    # --- helpers ---------------------------------------------------------------------------------

    def _end_blobs(self) -> None:
        """The head under the current tag too (the model devices are on outlives any prune), then prune."""
        head = self._releases.head
        if self._blobs is not None and head is not None:
            self._blobs.end_round(head.version, head.digest)

    def _budget_spent(self, round_: int, reason: str) -> str:
        """The end of a DP run whose budget is spent: one log line, the status says why; "done"."""
        head = self._releases.head
        event(log, "privacy.budget_spent", logging.WARNING, round=round_, model=head.digest.hex()[:16],
              version=head.version, reason=reason)
        self._board.set_state("done", reason=privacy.BUDGET_SPENT)
        return "done"

    def _restore_strategy_state(self) -> None:
        """The saved state of the strategy that made the head; when the configured strategy is another one,
        only the privacy accountant's record (what the lineage spent stays spent), never the strategy's own."""
        saved, config = self._releases.saved_state()
        if saved is None:
            return
        changed = config.get("strategy") != self._strategy_name
        if changed:
            event(log, "strategy.state_not_restored", logging.WARNING, reason="strategy changed",
                  was=config.get("strategy"), now=self._strategy_name)
        try:
            restored = strategy_state.restore(self._strategy, saved, privacy_only=changed)
        except ValueError as exc:
            event(log, "strategy.state_not_restored", logging.WARNING, reason=str(exc))
            return
        if not changed:
            event(log, "strategy.state_restored", attributes=",".join(restored) or "-")
        elif restored:
            event(log, "privacy.state_restored", reason="strategy changed", attributes=",".join(restored))


def _arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in weights.items()})


def _sources(replies: list[Message], trained: list[RoundTraffic]) -> list[Source]:
    """Who sent each Flower reply, with which update: found through the task it answers."""
    by_task = {a.task.message_id: a for t in trained for a in t.accepted}
    return [Source(a.task.device_key, a.envelope.body["digest"], r.content, lambda a=a: a.delta)
            for r in replies if (a := by_task.get(r.metadata.reply_to_message_id)) is not None]
