"""What the gateway tells its operators: state, rounds, devices, lineage and ledger.

`StatusBoard` keeps each round's record (persisted per lineage in the
journal, so a restarted gateway reports the rounds before it), each enrolled
device's counts, and the service's state; it publishes them as retained JSON
(`starling/<gw>/status`, `starling/<gw>/status/device/<id>`, see the
README's "Status topics") and writes `result.json` when the gateway stops.

States: `starting`, `waiting` (for devices), `running` (a round), `idle`
(between rounds, `next_round_at` says until when), `done` (no more rounds:
the round count was reached, or `reason` says why, e.g. `privacy_budget_spent`),
`stopped` (SIGTERM), `failed`; the broker publishes `offline` (the
connection's last will) if the gateway vanishes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from protocol import topics
from protocol.logs import event

from .devices import DeviceRegistry
from .ingest import Accepted, Deferred, Duplicate, Outcome, Skipped
from .journal import HISTORY_KEPT, RoundHistory
from .models import Release
from .rounds import RoundBook, RoundTraffic
from .weights import WeightRule

log = logging.getLogger("starling.gateway.status")
STATUS_HISTORY = 100  # round records in the status message (result.json has up to HISTORY_KEPT)
MAX_STATUS_REVOKED = 1000  # revoked device ids listed in the status (the count is always exact)
MAX_STATUS_EPOCHS = 5  # city epochs listed in the status (result.json lists them all)


@dataclass
class RoundRecord:
    round: int
    accuracy: float | None = None
    loss: float | None = None
    participants: int = 0
    rejected: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    skipped: int = 0  # devices that sat the round's training out, saying why (see the device topics)


class StatusBoard:
    def __init__(self, gateway_id: str, name: str, num_rounds: int | None, publish: Callable[..., object],
                 registry: DeviceRegistry, book: RoundBook, history: RoundHistory,
                 meter: Callable[[], tuple[int, int]], ledger_status: Callable[[], dict[str, Any] | None],
                 enroll_rejections: Callable[[], dict[str, int]], weights: WeightRule = WeightRule(),
                 privacy: Callable[[], dict[str, Any] | None] = lambda: None,
                 blobs: Callable[[], dict[str, Any] | None] = lambda: None,
                 city: Callable[[], dict[str, Any] | None] = lambda: None,
                 training: Callable[[], dict[str, Any] | None] = lambda: None) -> None:
        """`meter()`: (bytes received from devices, bytes sent to them) so far; `ledger_status()`: height,
        finality and peers (None before the ledger opened); `weights`: how the evaluation averages weigh
        each device (the rule the strategy's replies are weighed by); `privacy()`: a DP run's privacy spent
        (gateway/privacy.py), None when nothing is accounted; `blobs()`: the blob store and its exchange
        (gateway/blob_keeper.py), None before the store opened; `city()`: the city tier's epochs, flagged
        gateways and audits (gateway/city.py), None without the tier; `training()`: how rounds run and updates and
        models travel (the round mode, with a buffered engine's account once the engine runs, the codecs)."""
        self._weights = weights
        self._training = training
        self._city = city
        self._privacy = privacy
        self._blobs = blobs
        self.gateway_id = gateway_id
        self.name = name
        self.num_rounds = num_rounds
        self._publish = publish
        self._registry = registry
        self._book = book
        self._history = history
        self._meter = meter
        self._ledger_status = ledger_status
        self._enroll_rejections = enroll_rejections
        self._lock = threading.Lock()
        self.state = "starting"
        self.reason: str | None = None  # why the rounds ended before the round count (privacy.BUDGET_SPENT)
        self._next_round_at: float | None = None
        self._lineage: Release | None = None
        self._records: dict[int, RoundRecord] = {}  # the newest rounds of the current lineage
        self._round_start: dict[int, tuple[float, int, int]] = {}
        self._devices: dict[str, dict[str, Any]] = {}  # enrolled device id -> its counts
        self._changed: set[str] = set()

    # --- the engine's side ------------------------------------------------------------------

    def set_state(self, state: str, next_round_at: float | None = None, reason: str | None = None) -> object:
        """Change the state and publish the status; return what the publish returned (paho's MQTTMessageInfo).
        `reason`: why the rounds ended (kept: the service's last `set_state("done")` does not clear it)."""
        self.state, self._next_round_at = state, next_round_at
        if reason is not None:
            self.reason = reason
        return self.publish()

    def set_lineage(self, head: Release) -> None:
        """The current head; on a new lineage (or at start) the round records are that lineage's."""
        if self._lineage is None or self._lineage.lineage != head.lineage:
            begun = self._records if self._lineage is None else {}  # a round that began before the head was known
            self._records = {r["round"]: RoundRecord(**r) for r in self._history.rounds(head.lineage, STATUS_HISTORY)}
            self._records.update(begun)
        self._lineage = head

    def begin_round(self, round_: int) -> None:
        event(log, "round.start", round=round_)
        received, sent = self._meter()
        self._round_start[round_] = (time.time(), received, sent)
        self._records.setdefault(round_, RoundRecord(round_))

    def exchanges_closed(self, round_: int, closed: list[RoundTraffic], buffered: bool = False) -> None:
        """Participants, skips and rejections after training; accuracy and loss after evaluation.
        `buffered`: a buffered step closes many one-device exchanges: their skips add up, and the step says
        how many updates it aggregated (`step_aggregated`)."""
        record = self._records.setdefault(round_, RoundRecord(round_))
        for traffic in closed:
            event(log, "round.closed", kind=traffic.kind, round=traffic.round, replies=len(traffic.accepted),
                  selected=traffic.sent, rejected=sum(traffic.rejected.values()), skipped=sum(traffic.skipped.values()),
                  duplicates=traffic.duplicates, restored=traffic.restored,
                  reasons=",".join(f"{r}:{n}" for r, n in sorted(traffic.rejected.items())) or "-")
            record.rejected += sum(traffic.rejected.values())
            if traffic.kind == "train" and buffered:
                record.skipped += sum(traffic.skipped.values())
            elif traffic.kind == "train":
                record.participants = len(traffic.accepted)
                record.skipped = sum(traffic.skipped.values())
            else:
                _evaluation(record, traffic.accepted, self._weights.effective([a.examples for a in traffic.accepted]))
        self._save(round_)

    def step_aggregated(self, round_: int, updates: int) -> None:
        """A buffered step's participants: the updates it aggregated (from exchanges closed in earlier steps too)."""
        self._records.setdefault(round_, RoundRecord(round_)).participants = updates

    def forget_round(self, round_: int) -> None:
        """A round that began but never ran (nothing sent, nothing journaled): out of the status again."""
        self._round_start.pop(round_, None)
        record = self._records.get(round_)
        if record is not None and asdict(record) == asdict(RoundRecord(round_)):
            del self._records[round_]

    def end_round(self, round_: int) -> None:
        self._save(round_)
        record = self._records[round_]
        event(log, "round.done", round=round_, accuracy="-" if record.accuracy is None else record.accuracy,
              participants=record.participants, rejected=record.rejected, seconds=record.seconds)
        self._round_start.pop(round_, None)
        for old in sorted(self._records)[:-STATUS_HISTORY]:
            del self._records[old]

    def _save(self, round_: int) -> None:
        record = self._records[round_]
        started, received, sent = self._round_start.get(round_, (time.time(), *self._meter()))
        now_received, now_sent = self._meter()
        record.bytes_up, record.bytes_down = now_received - received, now_sent - sent
        record.seconds = round(time.time() - started, 3)
        if self._lineage is not None:
            self._history.record(self._lineage.lineage, round_, asdict(record))
        self.publish()

    # --- the devices' side (worker thread) ----------------------------------------------------

    def note(self, outcome: Outcome) -> None:
        """Count one reply outcome for its device (enrolled devices only: bounded)."""
        if isinstance(outcome, Deferred):
            return
        device = outcome.task.device_id if isinstance(outcome, Accepted) else outcome.device_id
        with self._lock:
            stats = self._stats(device)
            if stats is None:
                return
            reason = getattr(outcome, "reason", None)
            if isinstance(outcome, Skipped):
                stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
            elif isinstance(outcome, Duplicate):  # a re-send of an accepted reply: neither accepted twice nor refused
                stats["duplicates"] += 1
            elif isinstance(outcome, Accepted):
                stats["accepted"] += 1
            else:
                stats["rejected"][reason] = stats["rejected"].get(reason, 0) + 1

    def seen(self, device: str) -> None:
        """A device said something (it came online or went offline)."""
        with self._lock:
            self._stats(device)

    def _stats(self, device: str) -> dict[str, Any] | None:
        if not self._registry.knows(device):
            return None
        stats = self._devices.setdefault(device, {"device": device, "name": self._registry.name_of(device),
                                                  "last_seen": 0.0, "accepted": 0, "duplicates": 0,
                                                  "rejected": {}, "skipped": {}})
        stats["last_seen"] = round(time.time(), 3)
        stats["online"] = self._registry.is_online(device)
        self._changed.add(device)
        return stats

    # --- out ------------------------------------------------------------------------------------

    def history(self) -> list[dict[str, Any]]:
        """Every kept round record of the current lineage, oldest first (result.json)."""
        if self._lineage is None:
            return []
        return self._history.rounds(self._lineage.lineage, HISTORY_KEPT)

    def lineage(self) -> dict[str, Any] | None:
        head = self._lineage
        if head is None:
            return None
        return {"id": head.lineage, "model": head.digest.hex(), "version": head.version, "round": head.round}

    def status(self) -> dict[str, Any]:
        history = [asdict(self._records[r]) for r in sorted(self._records)]
        revoked = self._registry.revoked_ids()
        enrolled, online = self._registry.counts()
        return {
            "gateway": self.gateway_id,
            "name": self.name,
            "state": self.state,
            "reason": self.reason,  # why the rounds ended early (state "done"): "privacy_budget_spent"; else null
            "round": history[-1]["round"] if history else None,
            "num_rounds": self.num_rounds,
            "next_round_at": self._next_round_at if self.state == "idle" else None,
            "lineage": self.lineage(),
            "enrolled": enrolled,
            "online": online,
            "rejections": self._book.rejections,
            "duplicates": self._book.duplicates,  # honest re-sends of accepted replies: not rejections
            "enroll_rejections": self._enroll_rejections(),
            "ledger": self._ledger_status(),
            "blobs": self._blobs(),  # updates and models kept by digest, and what was served and fetched
            "city": self._city_status(),  # the city tier: epochs, flagged gateways (mismatch evidence), audits
            "privacy": self._privacy(),
            "training": self._training(),
            "history": history,
            "revoked": {"count": len(revoked), "devices": revoked[:MAX_STATUS_REVOKED]},
            "time": time.time(),
        }

    def _city_status(self) -> dict[str, Any] | None:
        """The city tier's section, its newest epochs only (a status is published every few seconds)."""
        try:
            doc = self._city()
        except Exception:  # a status must never fail the round
            log.exception("status.city_failed")
            return None
        if doc is not None:
            doc = {**doc, "epochs": doc.get("epochs", [])[-MAX_STATUS_EPOCHS:]}
        return doc

    def publish(self) -> object:
        """The devices whose counts changed since the last time, then the gateway (all retained); return what
        the gateway status's publish returned."""
        with self._lock:
            changed, self._changed = self._changed, set()
            docs = [dict(self._devices[d], rejected=dict(self._devices[d]["rejected"]),
                         skipped=dict(self._devices[d]["skipped"])) for d in changed]
        for doc in docs:
            self._publish(topics.device_status(self.gateway_id, doc["device"]), json.dumps(doc).encode(),
                          retain=True, counted=False)
        return self._publish(topics.status(self.gateway_id), json.dumps(self.status()).encode(), retain=True,
                             counted=False)


def _evaluation(record: RoundRecord, accepted: list[Accepted], weights: list[int]) -> None:
    """Accuracy and loss on the devices' local test windows, each device weighing what the rule gives it."""
    total = sum(weights)
    if not total:
        return
    if all("accuracy" in a.metrics for a in accepted):  # a self-supervised model has none
        record.accuracy = sum(a.metrics["accuracy"] * w for a, w in zip(accepted, weights)) / total
    record.loss = sum(a.metrics["loss"] * w for a, w in zip(accepted, weights)) / total
