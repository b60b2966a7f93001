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
import threading
from collections.abc import Callable

from protocol import topics
from protocol.logs import event

from . import ingest_profile
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
        self._profile = ingest_profile.PROFILE
        if self._profile is not None:  # receipts' publish apart from their signing
            outbox._publish = _timed(self._profile, "receipt.publish", outbox._publish)

    def handle(self, batch: list[tuple[str, bytes, Authenticated | Rejected | None]]) -> list[Outcome]:
        """Each item is (topic, payload, stage-1 outcome or None when no ingest worker ran stage 1)."""
        if self._profile is not None:
            return self._handle_profiled(batch, self._profile)
        staged = [(topic, payload, self._stage_one(topic, payload, first)) for topic, payload, first in batch]
        outcomes = self._book.admit_batch(staged)
        debug = log.isEnabledFor(logging.DEBUG)
        for outcome, (_, payload, _) in zip(outcomes, staged):
            self._answer(outcome, len(payload), debug)
            self._note(outcome)
        return outcomes

    def _handle_profiled(self, batch: list[tuple[str, bytes, Authenticated | Rejected | None]],
                         profile: ingest_profile.StageProfile) -> list[Outcome]:
        """`handle`, with the CPU of each stage added to `profile` (ingest_profile.py)."""
        profile.begin()
        profile.thread = threading.get_ident()
        staged = [(topic, payload, self._stage_one(topic, payload, first)) for topic, payload, first in batch]
        journal, t = profile.seconds["journal"], profile.now()
        outcomes = self._book.admit_batch(staged)
        t = profile.add("stage2.admit", t)
        profile.seconds["stage2.admit"] -= profile.seconds["journal"] - journal  # the journal counts apart
        debug = log.isEnabledFor(logging.DEBUG)
        publish = profile.seconds["receipt.publish"]
        for outcome, (_, payload, _) in zip(outcomes, staged):
            self._answer(outcome, len(payload), debug)
        t = profile.add("receipt.sign", t)
        profile.seconds["receipt.sign"] -= profile.seconds["receipt.publish"] - publish
        for outcome in outcomes:
            self._note(outcome)
        profile.add("notes", t)
        profile.counted(len(batch))
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

    def _answer(self, outcome: Outcome, size: int, debug: bool) -> None:
        """The receipt (only for authenticated senders) and the log line of one outcome."""
        if isinstance(outcome, Accepted):
            self._outbox.receipt(outcome.envelope, outcome.task.device_id, True, "")
            if debug:  # the common case: no per-reply log work at all
                event(log, "reply.accepted", logging.DEBUG, device=outcome.task.device_id, round=outcome.task.round,
                      kind=outcome.task.kind, examples=outcome.examples, bytes=size)
        elif isinstance(outcome, Skipped):
            self._outbox.receipt(outcome.envelope, outcome.device_id, False, "skipped")
            event(log, "reply.skipped", device=outcome.device_id, round=outcome.task.round, reason=outcome.reason)
        elif isinstance(outcome, Duplicate):  # its receipt was slow or lost: it gets another
            self._outbox.receipt(outcome.envelope, outcome.device_id, True, "")
            event(log, "reply.duplicate", device=outcome.device_id, round=outcome.round, task=outcome.envelope.ctx.task)
        elif isinstance(outcome, Deferred):  # answered when its exchange re-opens
            if debug:
                event(log, "reply.deferred", logging.DEBUG, device=outcome.device_id, task=outcome.task)
        else:
            if outcome.authenticated:
                # A replay of a reply accepted earlier is acknowledged again: a device whose receipts were
                # all lost stops re-sending it.
                self._outbox.receipt(outcome.envelope, outcome.device_id, outcome.already_accepted, outcome.reason)
            event(log, "reply.rejected", logging.WARNING, device=outcome.device_id or "-", reason=outcome.reason,
                  detail=outcome.detail)


def _timed(profile: ingest_profile.StageProfile, stage: str, call: Callable[..., object]) -> Callable[..., object]:
    """`call`, its CPU charged to `stage` when it runs on the thread that handles replies (the engine's
    tasks and models go through the same publish)."""
    def timed(*args, **kwargs):
        if threading.get_ident() != profile.thread:
            return call(*args, **kwargs)
        t = profile.now()
        try:
            return call(*args, **kwargs)
        finally:
            profile.add(stage, t)
    return timed
