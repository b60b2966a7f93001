"""Releases: the lineage's models on their way to the devices and the ledger.

    releases.start(weights, reason)     a new lineage: its first model (round 0)
    releases.release_for(weights, r)    the release a task names (the grid asks): the head, or a model
                                        a strategy sent that is not the head
    releases.advance(...)               a round's new model: journaled, published, recorded
    releases.merge_city(merged, ...)    a city epoch's model (city.py) as the next step: its `city` vertex

Every release is journaled (lineage.py) before it is published, then
recorded on the ledger (`lineage` / `aggregate` vertices); what a crash left
unrecorded is recorded at the next start (`record_pending`). The head is also
kept as `state_dir/model.npz` for operators and `starling-models export-mcu`.
Every model published (a lineage's first, each round's, the head published
again by a restarted gateway, a model a strategy sent that is not the head)
goes to the blob store by its digest (blob_keeper.py), tagged with the
head's version: a step under its own, any other under the current head's.

Downloads (`[training] download`, i8 or f16): a round's model is released
as the head plus the dequantized difference (`tensors.delta_step`), the very
model a device holding the head rebuilds from the delta published beside it,
so the gateway, its devices and the next round (which trains from the head)
never drift apart. The aggregate's recompute params say so (`download`), and
an auditor's recompute applies the same rounding (recompute.py). A lineage's
first model, a city merge, a step f16 cannot hold and a delta over
`schemas.MAX_DELTA_BYTES` stay full releases.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ledger.errors import LedgerError
from protocol import schemas
from protocol.atomic import write_atomic
from protocol.errors import ProtocolError
from protocol.logs import event
from protocol.tensors import delta_step

from .blob_keeper import BlobKeeper
from .city import CITY_STEP, CityMerge
from .ledger_keeper import LedgerKeeper
from .lineage import Lineage, encode
from .models import Delta, ModelPublisher, Release

log = logging.getLogger("starling.gateway.releases")


class Releases:
    def __init__(self, lineage: Lineage, publisher: ModelPublisher, keeper: LedgerKeeper, architecture: str,
                 model_path: Path, on_step: Callable[[Release], None] = lambda release: None,
                 blobs: BlobKeeper | None = None, download: str = schemas.DEFAULT_DOWNLOAD) -> None:
        """`on_step(release)`: after each lineage step is out (the MCU exporter's submit); `blobs`: where each
        published model is kept by its digest; `download` ([training]): a round's step goes out as a delta
        in this codec ("i8", "f16"), or only as the full model ("full")."""
        if download not in schemas.DOWNLOADS:
            raise ValueError(f"download must be one of {schemas.DOWNLOADS}, got {download!r}")
        self._download = download
        self._blobs = blobs
        self._lineage = lineage
        self._publisher = publisher
        self._keeper = keeper
        self._architecture = architecture
        self._model_path = model_path
        self._on_step = on_step
        self._published: dict[bytes, float] = {}  # digest -> when this process last signed and published it

    @property
    def head(self) -> Release | None:
        return self._lineage.head

    def start(self, weights: dict[str, np.ndarray], reason: str) -> Release:
        """Begin a new lineage from `weights`; logged, published and recorded on the ledger."""
        release = self._lineage.start(weights, reason, self._architecture)
        event(log, "lineage.start", lineage=release.lineage, digest=release.digest.hex()[:16], version=release.version,
              reason=reason)
        self._out(release)
        return release

    def release_for(self, weights: dict[str, np.ndarray] | None, round_: int) -> Release:
        """The release a message's arrays are (None: the head), published by this process at least once."""
        head = self._lineage.head
        if head is None:
            raise ValueError("no model released yet: the lineage has not started")
        release = head
        if weights is not None:
            digest = encode(weights)[2]
            if digest != head.digest:
                release = self._lineage.find(digest) or self._lineage.extra(weights, round_)
        # Signed again once half its expiry has passed: a model no round changes for days (a fleet that
        # stays away, a strategy that skips) must not expire on the devices that are asked to train on it.
        if time.monotonic() - self._published.get(release.digest, -math.inf) > self._publisher.ttl_s / 2:
            self._publish(release)
        return release

    def advance(self, weights: dict[str, np.ndarray], round_: int, rule: str,
                inputs: list[tuple[bytes, float | None]], strategy: str, config: dict, state: bytes | None,
                exchanges: list[str], params: dict | None = None) -> Release | None:
        """A round's new model as the lineage's next step (None: it equals the head); `rule` and `inputs`
        (update digest, effective weight) say what shaped it, `params` what a recompute needs (recompute.py).
        With a delta download the released model is the head plus the delta devices get (module doc)."""
        weights, delta = self._as_delta(weights)
        if delta is not None and params is not None:
            params = {**params, schemas.DOWNLOAD: delta.codec}  # the recompute rounds the same way
        release = self._lineage.advance(weights, round_, rule, inputs, strategy, config, state, exchanges, params,
                                        delta)
        if release is not None:
            self._out(release)
        return release

    def _as_delta(self, weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Delta | None]:
        """(the model to release, the delta from the head that rebuilds it), or (`weights`, None) for a full
        release: download "full", no head, a step the codec cannot hold, or a delta too large to send."""
        head = self._lineage.head
        if self._download == schemas.FULL or head is None:
            return weights, None
        try:
            tensors, rounded = delta_step(head.weights, weights, self._download)
        except ProtocolError as exc:  # other shapes, a step beyond f16's range: the full model, as before
            event(log, "model.delta_skipped", logging.WARNING, reason=str(exc))
            return weights, None
        data = schemas.encode_delta(tensors)
        if len(data) > schemas.MAX_DELTA_BYTES:
            event(log, "model.delta_skipped", logging.WARNING, bytes=len(data), limit=schemas.MAX_DELTA_BYTES,
                  reason="delta_too_large")
            return weights, None
        return rounded, Delta(head.digest, self._download, data)

    def merge_city(self, merged: CityMerge, config: dict, state: bytes | None) -> Release | None:
        """A city epoch's model as the lineage's next step (journaled, published, then its `city` vertex
        recorded like an aggregate's: `record_pending`). None when it equals the head (its vertex is recorded
        all the same: the epoch happened)."""
        params = {"epoch": merged.epoch, "rule": merged.rule, "offers": [o.hex() for o, _, _ in merged.inputs],
                  "params": merged.params}
        inputs = [(model, weight) for _, model, weight in merged.inputs]
        release = self._lineage.advance(merged.weights, merged.round, CITY_STEP, inputs, CITY_STEP, config, state,
                                         [], params)
        if release is not None:
            self._out(release)
        else:
            self._keeper.record_city(self.head, inputs, params)
        return release

    def skip_round(self, exchanges: list[str]) -> None:
        """The round made no new model (no replies, or the strategy gave none): its exchanges are done."""
        for exchange in exchanges:
            self._lineage.finish_exchange(exchange)

    def saved_state(self) -> tuple[bytes | None, dict]:
        """The strategy's server-side state saved with the head, and the config the head came from."""
        head = self._lineage.head
        if head is None:
            return None, {}
        return self._lineage.state_of(head), self._lineage.config_of(head)

    def _out(self, release: Release) -> None:
        self._publish(release)
        self.record_pending()
        self.save(release)
        self._on_step(release)

    def _publish(self, release: Release) -> None:
        sent = self._publisher.publish(release)
        self._published[release.digest] = time.monotonic()
        event(log, "model.released", digest=release.digest.hex()[:16], version=release.version, round=release.round,
              lineage=release.lineage, bytes=sent,
              delta=len(release.delta.data) if release.delta is not None else 0)
        if self._blobs is not None:  # (the head: this release once it is a step; else the model devices are on)
            head = self._lineage.head
            self._blobs.keep_model(head.version if head is not None else release.version, release.digest,
                                   release.model or schemas.encode_model(release.weights))

    def record_pending(self) -> None:
        """Write what the ledger has not got yet, oldest first: lineage starts, then steps."""
        for item in self._lineage.unrecorded():
            try:
                if item.start is not None:
                    self._keeper.record_lineage(item.start)
                elif item.rule == CITY_STEP:
                    self._keeper.record_city(item.release, list(item.inputs), item.params)
                else:
                    self._keeper.record_aggregate(item.release, item.strategy, item.rule, list(item.inputs),
                                                  item.params)
            except LedgerError as exc:  # an aggregate of inputs the ledger refused: the model is out anyway
                event(log, "ledger.release_refused", logging.ERROR, version=(item.release or item.start).version,
                      reason=str(exc))
            self._lineage.mark_recorded(item)

    def save(self, release: Release) -> None:
        """The head as `model.npz` (atomic: an operator never reads half a model)."""
        buffer = io.BytesIO()
        np.savez(buffer, **release.weights)
        try:
            write_atomic(self._model_path, buffer.getvalue())
        except OSError as exc:  # the lineage in the journal is the record; this copy is a convenience
            event(log, "model.not_saved", logging.ERROR, reason=str(exc))
