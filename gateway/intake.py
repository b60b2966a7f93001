"""The reply intake: a batch of replies from the inbox to their receipts.

    stage 1   `Authenticator` (here, or already done by an ingest worker process)
    stage 2   the round book admits, applies and journals the batch (one commit)
    receipts  signed, after the journal commit: a device that hears "accepted" forgets its reply
    notes     each outcome to the status board (per-device counts)

Runs on the gateway's worker thread. Nothing a device sends may stop it: a
check that raises costs only its own reply (`internal_error`, logged with its
traceback), never the rest of the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from protocol import topics
from protocol.logs import event

from .ingest import Accepted, Authenticated, Authenticator, Deferred, Duplicate, Outcome, Rejected, Skipped
from .outbox import Outbox
from .rounds import RoundBook

log = logging.getLogger("starling.gateway.intake")


class ReplyIntake:
    def __init__(self, authenticator: Authenticator, book: RoundBook, outbox: Outbox,
                 note: Callable[[Outcome], None] = lambda outcome: None) -> None:
        self._authenticator = authenticator
        self._book = book
        self._outbox = outbox
        self._note = note

    def handle(self, batch: list[tuple[str, bytes, Authenticated | Rejected | None]]) -> list[Outcome]:
        """Each item is (topic, payload, stage-1 outcome or None when no ingest worker ran stage 1)."""
        staged = [(topic, payload, self._stage_one(topic, payload, first)) for topic, payload, first in batch]
        outcomes = self._book.admit_batch(staged)
        for outcome, (_, payload, _) in zip(outcomes, staged):
            self._answer(outcome, len(payload))
            self._note(outcome)
        return outcomes

    def _stage_one(self, topic: str, payload: bytes, first: Authenticated | Rejected | None) -> Authenticated | Rejected:
        # A worker's copy of the enrolled keys may lag by a moment behind an enrollment: check again here.
        lagging = (isinstance(first, Rejected) and first.reason == "unknown_device" and first.envelope is not None
                   and self._authenticator.is_enrolled(first.envelope.ctx.sender))
        if first is not None and not lagging:
            return first
        try:
            return self._authenticator.authenticate(topic, payload)
        except Exception as exc:  # a bug in a check must cost this reply only, never the rest of the batch
            log.exception("reply.check_failed topic=%s", topic)
            return Rejected("internal_error", topics.device_of(topic) or "", f"{type(exc).__name__}: {exc}")

    def _answer(self, outcome: Outcome, size: int) -> None:
        """The receipt (only for authenticated senders) and the log line of one outcome."""
        if isinstance(outcome, Accepted):
            self._outbox.receipt(outcome.envelope, outcome.task.device_id, True, "")
            event(log, "reply.accepted", logging.DEBUG, device=outcome.task.device_id, round=outcome.task.round,
                  kind=outcome.task.kind, examples=outcome.examples, bytes=size)
        elif isinstance(outcome, Skipped):
            self._outbox.receipt(outcome.envelope, outcome.device_id, False, "skipped")
            event(log, "reply.skipped", device=outcome.device_id, round=outcome.task.round, reason=outcome.reason)
        elif isinstance(outcome, Duplicate):  # its receipt was slow or lost: it gets another
            self._outbox.receipt(outcome.envelope, outcome.device_id, True, "")
            event(log, "reply.duplicate", device=outcome.device_id, round=outcome.round, task=outcome.envelope.ctx.task)
        elif isinstance(outcome, Deferred):  # answered when its exchange re-opens
            event(log, "reply.deferred", logging.DEBUG, device=outcome.device_id, task=outcome.task)
        else:
            if outcome.authenticated:
                # A replay of a reply accepted earlier is acknowledged again: a device whose receipts were
                # all lost stops re-sending it.
                self._outbox.receipt(outcome.envelope, outcome.device_id, outcome.already_accepted, outcome.reason)
            event(log, "reply.rejected", logging.WARNING, device=outcome.device_id or "-", reason=outcome.reason,
                  detail=outcome.detail)
