"""The gateway's blobs: every update and model its ledger records, kept by digest and served to peers.

    blobs = BlobKeeper(state_dir / "blobs", settings, gateway_id, (host, port, auth))   # opens; serves
    blobs.keep_updates(tag, attachments)   # a round's accepted updates (queued before the ledger records them)
    blobs.keep_model(tag, digest, model)   # a release's encoded model (the bytes its digest names)
    blobs.end_round(tag, head)             # the head kept under `tag` too, then retention prunes
    blobs.flush(timeout)                   # wait until what is queued is on disk
    blobs.status()                         # the `blobs` field of the status and result.json
    blobs.close()

What is kept (BlobStore, blobs.py): each accepted reply's attachment, the
exact bytes whose SHA-256 is the update digest the `updates` vertex records,
and each model the gateway releases (a lineage's first model, every round's
new one, a restarted gateway's head published again, a model a strategy sent
that is not the head), the bytes whose SHA-256 is the release digest the
`lineage` and `aggregate` vertices record. With `serve` on, a BlobExchange
(blob_exchange.py, node id = the gateway id) answers any member gateway's or
auditor's want for them on `starling/blobs/want/<gateway id>`.

Tags (retention): until the city tier exists a tag is a model version: a
round's updates go under the version of the model they were trained on, a
release under its own version. Versions only grow, across restarts and new
lineages (devices refuse a rollback), where round numbers start again at 0
with a new lineage and would make the newest blobs look the oldest. So
`keep = 4` keeps the last four models and the updates trained on each
(about the last four rounds: a round that makes a model makes one version).
With the city tier a tag becomes the city epoch. `end_round` also links the
head under the round's tag, so that whatever a tag comes to mean, pruning
never removes the model the devices are on; the newest tag is always kept.
Should tags ever go back (the journal lost, the blobs kept), nothing is
pruned and each round says so (`blob.not_pruned`) rather than prune the
current blobs as the oldest.

Off the round's critical path: a round's thousand updates are 100 MB or more
of disk writes (bench/round_scale.py: 1,000 x 100 KB take 0.25-0.4 s with
`put_many`, one fsync per folder; about 1 s one `put` at a time, which is
as long as the whole round close), so one writer thread does every write,
retag and prune in the order they were asked for, while the round goes on to
aggregate and release. An update is queued before its `updates` vertex is
written and is on disk well within a second after it; a want that arrives in
between is answered "missing" (the asker asks another holder, or again
later). A stop drains the queue; a kill -9 or power cut in that second loses
those blobs (their records on the ledger stay: an audit counts them missing,
as after a prune). When the writer falls behind by more than
MAX_PENDING_BYTES, the round waits for it (up to WRITER_WAIT_S) rather than
hold ever more rounds in memory.

A failure to keep a blob (disk full, a blob over the size limit, the writer
too far behind) is one ERROR line `blob.not_stored what=... tag=... blobs=...
reason=...`, counted in the status (`not_stored`); it never fails a round.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.digest import sha256
from protocol.logs import event
from protocol.transport import BrokerAuth

from .blob_exchange import BlobExchange, ExchangeSettings, Fetched
from .blobs import DEFAULT_KEEP_TAGS, BlobStore, Retention

log = logging.getLogger("starling.gateway.blobs")
MB = 1024 * 1024
MAX_PENDING_BYTES = 256 * MB  # queued, not yet written: beyond this a new round's updates wait for the writer
WRITER_WAIT_S = 60.0  # ... this long at most; then they are not kept (logged), the round goes on
CLOSE_WAIT_S = 60.0  # at a stop, how long the writer may take to finish what is queued


@dataclass(frozen=True)
class BlobSettings:
    """The `[blobs]` config table."""

    keep: int = DEFAULT_KEEP_TAGS  # tags kept (model versions; city epochs once the city tier exists)
    max_mb: float = 0.0  # and of those only the newest that fit in this many MB (2^20 bytes); 0: no cap
    serve: bool = True  # answer other gateways' and auditors' wants
    serve_mb_per_s: float = 64.0  # serving budget (a token bucket): a want beyond it is answered "busy"
    fetch_timeout_s: float = 30.0  # a fetch's whole life, every holder tried (for the city tier's fetches)

    @property
    def retention(self) -> Retention:
        return Retention(self.keep, int(self.max_mb * MB) if self.max_mb > 0 else None)

    @property
    def exchange(self) -> ExchangeSettings:
        return ExchangeSettings(fetch_timeout_s=self.fetch_timeout_s, give_bytes_per_s=self.serve_mb_per_s * MB)


@dataclass(frozen=True)
class _Job:
    what: str  # "updates", "model", "end_round"
    tag: int
    blobs: list[bytes]
    digest: bytes | None = None  # a model's release digest; the head's, for end_round

    @property
    def size(self) -> int:
        return sum(map(len, self.blobs))


class BlobKeeper:
    def __init__(self, folder: Path, settings: BlobSettings, gateway_id: str,
                 broker: tuple[str, int, BrokerAuth]) -> None:
        """Open the store (and, with `settings.serve`, connect the exchange: mqttlink.ConnectError if no broker
        within 10 s)."""
        self.settings = settings
        self.store = BlobStore(folder, settings.retention)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._cond = threading.Condition()
        self._pending_jobs = 0
        self._pending_bytes = 0
        self.not_stored = 0  # blobs that could not be kept, since start
        self._closed = False
        self._writer = threading.Thread(target=self._write, name="blob-writer", daemon=True)
        self._writer.start()
        self.exchange: BlobExchange | None = None
        if settings.serve:
            host, port, auth = broker
            try:
                self.exchange = BlobExchange(self.store, gateway_id, host, port, auth, settings.exchange).start()
            except BaseException:
                self._stop_writer(0.0)
                raise

    # --- the round engine's side ---------------------------------------------------------------

    def keep_updates(self, tag: int, attachments: list[bytes]) -> None:
        """Queue a round's accepted updates under `tag`; never raises."""
        if attachments:
            self._queue(_Job("updates", tag, list(attachments)))

    def keep_model(self, tag: int, digest: bytes, model: bytes) -> None:
        """Queue a released model (`model` must hash to its release digest `digest`); never raises."""
        self._queue(_Job("model", tag, [model], digest))

    def end_round(self, tag: int, head: bytes | None) -> None:
        """After a round: the head model kept under `tag` too, then the tags retention does not keep pruned."""
        self._queue(_Job("end_round", tag, [], head))

    def fetch(self, digest: bytes, holders: list[str], tag: int) -> Future:
        """A future `Fetched` (blob_exchange.py: `data` None if it cannot be had, `holder` "local" when this
        store had it): from this store, else asked of `holders` (gateway ids) over the exchange and kept under
        `tag` when it arrives checked against its digest."""
        data = self.store.get(digest)
        if data is not None or self.exchange is None:
            future: Future = Future()
            future.set_result(Fetched(digest, data, "ok" if data is not None else "not_serving", "local"))
            return future
        return self.exchange.fetch(digest, holders, tag)

    def push(self, data: bytes) -> bool:
        """Send a blob once to every member gateway (blob_exchange.py); False when not serving."""
        if self.exchange is None:
            return False
        self.exchange.push(data)
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is done (written, or logged as not kept); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending_jobs == 0, timeout)

    def status(self) -> dict[str, Any]:
        with self._cond:
            pending, pending_bytes = self._pending_jobs, self._pending_bytes
        return {**self.store.status(), "max_bytes": self.store.retention.max_bytes, "pending": pending,
                "pending_bytes": pending_bytes, "not_stored": self.not_stored, "serving": self.exchange is not None,
                "exchange": self.exchange.status() if self.exchange is not None else None}

    def close(self) -> None:
        """Finish what is queued (at most CLOSE_WAIT_S), stop the writer, then stop serving."""
        self._stop_writer(CLOSE_WAIT_S)
        if self.exchange is not None:
            self.exchange.close()

    # --- inside ----------------------------------------------------------------------------------

    def _queue(self, job: _Job) -> None:
        size = job.size
        with self._cond:
            if not self._closed and job.what == "updates":  # backpressure: hold at most ~a round in memory
                ready = self._cond.wait_for(lambda: self._closed or self._pending_bytes <= MAX_PENDING_BYTES,
                                            WRITER_WAIT_S)
                if not ready:
                    return self._failed(job, f"the writer is {self._pending_bytes} bytes behind")
            if self._closed:
                return self._failed(job, "closed")
            self._pending_jobs += 1
            self._pending_bytes += size
            self._jobs.put(job)
        return None

    def _failed(self, job: _Job, reason: str) -> None:
        count = len(job.blobs) or 1
        with self._cond:
            self.not_stored += count
        event(log, "blob.not_stored", logging.ERROR, what=job.what, tag=job.tag, blobs=count, bytes=job.size,
              reason=reason[:200])

    def _write(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            started = time.monotonic()
            try:
                self._do(job)
            except Exception as exc:  # disk full, a blob over the limit, a bug: this job's blobs, never the round
                reason = f"{type(exc).__name__}: {exc}"
                if job.what == "end_round":  # nothing lost: the next round's prune tries again
                    event(log, "blob.prune_failed", logging.ERROR, tag=job.tag, reason=reason[:200])
                else:
                    self._failed(job, reason)
                if not isinstance(exc, (OSError, ValueError)):
                    log.exception("blob.writer_failed")
            else:
                if job.what == "updates":
                    event(log, "blob.kept", what=job.what, tag=job.tag, blobs=len(job.blobs), bytes=job.size,
                          seconds=round(time.monotonic() - started, 3))
            finally:
                with self._cond:
                    self._pending_jobs -= 1
                    self._pending_bytes -= job.size
                    self._cond.notify_all()

    def _do(self, job: _Job) -> None:
        if job.what == "updates":
            self.store.put_many(job.blobs, job.tag)
        elif job.what == "model":
            if sha256(job.blobs[0]) != job.digest:  # (a release whose bytes are no longer at hand)
                raise ValueError(f"the model bytes do not hash to the release digest {job.digest.hex()[:16]}")
            self.store.put(job.blobs[0], job.tag)
        else:
            if job.digest is not None and not self.store.retag(job.digest, job.tag):
                event(log, "blob.head_missing", logging.WARNING, digest=job.digest.hex()[:16], tag=job.tag)
            tags = self.store.tags()
            if tags and tags[-1] > job.tag:  # tags went back (a journal lost, the blobs kept): pruning would take
                event(log, "blob.not_pruned", logging.WARNING, tag=job.tag, newest=tags[-1],  # the current ones
                      reason="the store holds newer tags than the current one")
                return
            self.store.prune()

    def _stop_writer(self, timeout: float) -> None:
        drained = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._jobs.put(None)
        self._writer.join(timeout + 5)
        if not drained:
            with self._cond:
                jobs, size = self._pending_jobs, self._pending_bytes
            event(log, "blob.not_stored", logging.ERROR, what="queued", jobs=jobs, bytes=size,
                  reason=f"still writing after {timeout:.0f} s at the stop")
