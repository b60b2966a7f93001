"""The auditor: every gateway recomputes its peers' work and keeps the evidence when it does not add up.

    auditor = CityAuditor(ledger, gateway_id, own_ids, blobs, share, tag, max_examples,
                          hold=tier.in_epoch)   # starts its thread
    auditor.report()   # {"checked", "match", "mismatch", "unverifiable", "missing_inputs", "pending"}
    auditor.close()

What it checks, as vertices arrive (`Ledger.arrived_since`), off the round
engine's thread:

    a peer's `aggregate`   a share of them (`[city] audit_share`, by default 2 / (members - 1): every
                           aggregate is checked by two peers on average, all of them in a city of up to
                           three; chosen by a hash of this gateway's id and the vertex, so different
                           auditors check different ones): the base model and
                           the input updates fetched from that gateway's blob store, recomputed by the
                           same Flower code (recompute.py `verify_body`)
    a peer's `city`        every one: its inputs' models recomputed by the merge rule (city_merge.py), each
                           input's weight against what the ledger records behind that offer, and its
                           momentum's two models against the city models the ledger records

A mismatch is written as a `mismatch` vertex (the vertex, what came out, why):
evidence on every gateway's ledger, like an equivocation, which keeps the
accused gateway's models out of the city merges (city.py `excluded`) until the
operator clears it. What cannot be recomputed (a stateful strategy, a DP
wrapper) is counted as unverifiable, never as a mismatch; inputs not at hand
(not written yet at the holder, or pruned) are tried again a few times, then
counted missing. While this gateway's own city epoch runs (`hold`), no check
starts: the merge that every member waits for goes first, and the audits of
the epoch's round aggregates follow it (at most HOLD_MAX_S later).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import wait
from dataclasses import dataclass
from typing import Any

from ledger.errors import LedgerError
from ledger.kinds import AGGREGATE, CITY
from ledger.store import Ledger
from ledger.vertex import Vertex
from protocol.digest import sha256
from protocol.errors import ProtocolError
from protocol.fields import is_int
from protocol.logs import event

from .blob_keeper import BlobKeeper
from .city_merge import Momentum, momentum_problem, verify_city
from .recompute import Verdict, verify_body

log = logging.getLogger("starling.gateway.audit")
POLL_S = 0.3
RETRY_S = 2.0  # a check whose inputs were not at hand is tried again after this ...
ATTEMPTS = 4  # ... this many times in all
MAX_TIMES = 1000  # recompute times kept for the report
HOLD_POLL_S = 0.05
HOLD_MAX_S = 120.0  # a check waits at most this long for an epoch to end (an epoch is bounded by its deadline)


@dataclass
class _Check:
    vertex: Vertex
    holders: list[str]
    attempts: int = 0
    due: float = 0.0


class CityAuditor:
    def __init__(self, ledger: Ledger, gateway_id: str, own_ids: set[str], blobs: BlobKeeper, share: float | None,
                 tag: Callable[[], int], max_examples: int, hold: Callable[[], bool] = lambda: False) -> None:
        """`own_ids`: the ids this gateway writes under (never audited by itself); `share`: of the peers' round
        aggregates, checked (None: two checks of each on average); `tag()`: the blob tag fetched blobs are kept
        under (the head's version); `max_examples`: the city's cap on an update's examples (a `city` vertex's
        weights are read with it); `hold()`: true while no check should start (the city tier's epoch)."""
        self._ledger = ledger
        self._id = gateway_id
        self._own_ids = set(own_ids)
        self._blobs = blobs
        self._share = share
        self._tag = tag
        self._max_examples = max_examples
        self._hold = hold
        self._mark = ledger.arrived_since(-1)[1]  # from now: what arrived before a restart was looked at then
        self._checks: list[_Check] = []
        self._accused: set[bytes] = set()  # vertices this gateway wrote evidence against
        self._lock = threading.Lock()
        self._counts = {"checked": 0, "match": 0, "mismatch": 0, "unverifiable": 0, "missing_inputs": 0,
                        "fetched_bytes": 0}
        self._seconds: list[float] = []  # each concluded check's recompute time (fetching excluded), newest last
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="city-audit", daemon=True)
        self._thread.start()

    def report(self) -> dict[str, Any]:
        """The counts, the blob bytes fetched for audits, and the recompute time per check (mean, p95)."""
        with self._lock:
            seconds = sorted(self._seconds)
            return {**self._counts, "pending": len(self._checks), "share": self.share(),
                    "recompute_s": round(sum(seconds) / len(seconds), 4) if seconds else None,
                    "recompute_p95_s": round(seconds[int(0.95 * (len(seconds) - 1))], 4) if seconds else None}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._take_arrivals()
                self._check_due()
            except Exception:  # an audit must never take the gateway down; the next pass tries again
                log.exception("audit.failed")

    def _take_arrivals(self) -> None:
        while True:
            vertices, self._mark = self._ledger.arrived_since(self._mark, AGGREGATE, CITY)
            for vertex in vertices:
                creator = self._ledger.speaks_as(vertex.creator)
                if creator in self._own_ids or creator == self._id:
                    continue
                if vertex.kind == AGGREGATE and not self._sampled(vertex):
                    continue
                with self._lock:
                    self._checks.append(_Check(vertex, [creator]))
            if not vertices:
                return

    def share(self) -> float:
        if self._share is not None:
            return self._share
        return min(1.0, 2.0 / max(1, len(self._ledger.member_ids()) - 1))

    def _sampled(self, vertex: Vertex) -> bool:
        share = self.share()
        if share >= 1.0:
            return True
        draw = int.from_bytes(sha256(self._id.encode() + vertex.id)[:8], "big") / 2**64
        return draw < share

    def _check_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [c for c in self._checks if c.due <= now]
        for check in due:
            if not self._wait_for_quiet():
                return
            verdict, seconds = self._verify(check)
            check.attempts += 1
            if verdict.status == "missing_inputs" and check.attempts < ATTEMPTS:
                check.due = time.monotonic() + RETRY_S
                continue
            with self._lock:
                self._checks.remove(check)
                self._counts["checked"] += 1
                self._counts[verdict.status] += 1
                if verdict.status in ("match", "mismatch"):
                    self._seconds = [*self._seconds, seconds][-MAX_TIMES:]
            self._conclude(check.vertex, check.holders[0], verdict)

    def _wait_for_quiet(self) -> bool:
        """Wait while `hold()` says so (at most HOLD_MAX_S); False when stopped."""
        waited_until = time.monotonic() + HOLD_MAX_S
        while self._hold() and time.monotonic() < waited_until:
            if self._stop.wait(HOLD_POLL_S):
                return False
        return not self._stop.is_set()

    def _verify(self, check: _Check) -> tuple[Verdict, float]:
        """The verdict, and the seconds the recompute took once the blobs were at hand."""
        vertex = check.vertex
        body = vertex.body
        if vertex.kind == AGGREGATE:
            digests = [body["base"], *(d for d, _ in body["inputs"])] if "rule" in body else [body["base"]]
            holders = check.holders
        else:
            problem = self._city_weights(body) or momentum_problem(body, self._ledger.city_outputs)
            if problem is not None:
                return Verdict(False, body["output"], None, problem, "mismatch"), 0.0
            digests = [m for _, m, _ in body["inputs"]]
            momentum = Momentum.of(body)
            if momentum is not None:
                digests += [momentum.previous, momentum.before]
            holders = check.holders + self._offerers(body)
        blobs = self._fetch(digests, holders)
        started = time.perf_counter()
        verdict = verify_body(body, blobs.get) if vertex.kind == AGGREGATE else verify_city(body, blobs.get)
        return verdict, time.perf_counter() - started

    def _city_weights(self, body: dict[str, Any]) -> str | None:
        """Why a `city` vertex's inputs are not sound offers with the ledger's weights (None: they are)."""
        cap = body.get("params", {}).get("max_examples", self._max_examples)
        if not is_int(cap) or cap < 1:
            return "its params name no usable max_examples"
        offers = {o.vertex: o for o in self._ledger.offers(body["epoch"], cap)}
        for offer_id, model, weight in body["inputs"]:
            offer = offers.get(offer_id)
            if offer is None or offer.problem is not None or offer.model != model:
                return f"input offer {offer_id.hex()[:16]} is not a sound offer of epoch {body['epoch']}"
            if body["rule"] == "weighted" and weight != float(offer.examples):
                return f"input offer {offer_id.hex()[:16]} weighs {weight}, the ledger records {offer.examples}"
        return None

    def _offerers(self, body: dict[str, Any]) -> list[str]:
        out = []
        for offer_id, _, _ in body["inputs"]:
            offer = self._ledger.get(offer_id)
            if offer is not None:
                out.append(self._ledger.speaks_as(offer.creator))
        return list(dict.fromkeys(out))

    def _fetch(self, digests: list[bytes], holders: list[str]) -> dict[bytes, bytes]:
        tag = self._tag()
        futures = {d: self._blobs.fetch(d, holders, tag) for d in dict.fromkeys(digests)}
        wait(futures.values(), timeout=self._blobs.settings.fetch_timeout_s + 5)
        done = [f.result() for f in futures.values() if f.done()]
        got = {f.digest: f.data for f in done if f.data is not None}
        with self._lock:
            self._counts["fetched_bytes"] += sum(len(f.data) for f in done if f.data is not None and f.holder != "local")
        return got

    def _conclude(self, vertex: Vertex, accused: str, verdict: Verdict) -> None:
        event(log, "audit.checked", vertex=vertex.id_hex[:16], kind=vertex.kind, gateway=accused,
              round=vertex.body.get("round", vertex.body.get("epoch")), status=verdict.status,
              reason=verdict.reason[:120])
        if verdict.status != "mismatch" or vertex.id in self._accused:
            return
        try:
            evidence = self._ledger.record_mismatch(vertex.id, verdict.got_digest or b"", verdict.reason)
        except (LedgerError, ProtocolError) as exc:
            event(log, "audit.evidence_refused", logging.ERROR, vertex=vertex.id_hex[:16], reason=str(exc))
            return
        self._accused.add(vertex.id)
        event(log, "audit.mismatch", logging.WARNING, gateway=accused, vertex=vertex.id_hex[:16], kind=vertex.kind,
              evidence=evidence.id_hex[:16], reason=verdict.reason[:120])
