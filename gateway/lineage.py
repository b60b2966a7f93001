"""A gateway's model lineage: every global model it released, each naming its parent, kept in its journal.

A lineage starts from a first model (the model family's shipped initial
weights, when a gateway first starts or when an operator runs `starling-gateway
reset-model`, or when the configured model family changed) and grows by one
release per round that changed the model. Each release is written (with its
round, parent, inputs, the config it came from and the strategy's server-side
state) in one transaction before it is published, so after a stop, a crash, a
power cut or an upgrade the gateway goes on from its last release: the same
digest, the version counter going on.

Tables in rounds.db (journal.py creates them):

    lineage         id, first model (root), its version, why it started, the model it replaced, architecture
    release         version -> digest, lineage, round, parent, size, strategy, config, inputs, time, step
                    (step: a lineage step; else a model a strategy sent that did not become the head)
    model           digest -> model bytes (deterministic CBOR, schemas.encode_model): the newest releases only
    strategy_state  version -> the strategy's server-side state after that release (strategy_state.py)

The ledger gets a `lineage` vertex for each start and an `aggregate` vertex
(base -> output) for each step; `on_ledger` says which are written, so a
crash between the journal and the ledger is mended at the next start.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocol import schemas
from protocol.digest import sha256

from .journal import Journal
from .models import Delta, Release

MODELS_KEPT = 3  # step releases whose bytes stay in the journal (the head and the two before it)
ADOPTED = "adopted from a journal of an earlier gateway version"


@dataclass(frozen=True)
class LineageStart:
    """Where a lineage began, and why."""

    id: int
    root: bytes
    version: int
    reason: str
    previous: bytes  # the head of the lineage it replaced; b"" for the gateway's first
    architecture: str


@dataclass(frozen=True)
class Unrecorded:
    """A lineage start or a step release the ledger has not got yet (written in this order)."""

    start: LineageStart | None  # a `lineage` vertex to write ...
    release: Release | None  # ... or an `aggregate` vertex: parent -> digest
    strategy: str = ""
    rule: str = ""  # how the strategy combined its inputs (gateway/provenance.py)
    inputs: tuple[tuple[bytes, float | None], ...] = ()  # (update digest, effective weight) that shaped it
    params: dict | None = None  # what a recompute needs (gateway/recompute.py); None in rows journaled before


def model_family(manifest: dict) -> str:
    """What a lineage is a lineage of: the model family and the names and shapes of its weights. A model
    whose family or weights differ cannot go on from the head; a rebuilt file of the same family can."""
    weights = [[w["name"], list(w["shape"])] for w in manifest.get("weights", [])]
    shapes = sha256(json.dumps(weights, sort_keys=True).encode()).hex()[:16]
    return f"{manifest.get('family') or manifest.get('name') or 'model'}/{shapes}"


def encode(weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bytes, bytes]:
    """float32 weights, their bytes and their content address."""
    weights = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    model = schemas.encode_model(weights)
    return weights, model, sha256(model)


class Lineage:
    """The chain of models this gateway released; the journal is its only storage.

    The head is cached: this object is the journal's only writer of releases while the gateway runs
    (`starling-gateway reset-model` refuses to run beside a running gateway).
    """

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._head: Release | None = None

    # --- reading ---------------------------------------------------------------------------

    @property
    def current(self) -> LineageStart | None:
        rows = self._journal.read("select id, root, version, reason, previous, architecture from lineage "
                                  "order by id desc limit 1")
        return LineageStart(*rows[0]) if rows else None

    @property
    def head(self) -> Release | None:
        """The newest step of the current lineage (its first model, before any round changed it)."""
        if self._head is None:
            start = self.current
            rows = [] if start is None else self._journal.read(
                "select version from release where lineage = ? and step = 1 order by version desc limit 1", start.id)
            self._head = self._release(rows[0][0]) if rows else None
        return self._head

    def find(self, digest: bytes) -> Release | None:
        """A release whose bytes are still kept, by digest (the newest, if released twice)."""
        rows = self._journal.read("select version from release where digest = ? and digest in (select digest "
                                  "from model) order by version desc limit 1", digest)
        return self._release(rows[0][0]) if rows else None

    def state_of(self, release: Release) -> bytes | None:
        rows = self._journal.read("select data from strategy_state where version = ?", release.version)
        return rows[0][0] if rows else None

    def config_of(self, release: Release) -> dict:
        rows = self._journal.read("select config from release where version = ?", release.version)
        return json.loads(rows[0][0]) if rows else {}

    def recent(self, count: int) -> list[Release]:
        """The newest `count` releases whose bytes are kept, oldest first (what may still be retained)."""
        rows = self._journal.read("select version from release where digest in (select digest from model) "
                                  "order by version desc limit ?", count)
        return [self._release(r[0]) for r in reversed(rows)]

    def last_version(self) -> int:
        rows = self._journal.read("select max(version) from release")
        return rows[0][0] if rows[0][0] is not None else -1

    def _release(self, version: int) -> Release:
        digest, lineage, round_, parent, size, step = self._journal.read(
            "select digest, lineage, round, parent, size, step from release where version = ?", version)[0]
        data = self._journal.read("select data from model where digest = ?", digest)
        weights = schemas.decode_model(data[0][0]) if data else {}
        delta = self._journal.read("select base, codec, data from release_delta where version = ?", version)
        return Release(digest, version, lineage, round_, parent, weights, size, bool(step), data[0][0] if data else b"",
                       Delta(*delta[0]) if delta and data else None)

    # --- writing ---------------------------------------------------------------------------

    def start(self, weights: dict[str, np.ndarray], reason: str, architecture: str,
              first_version: int = 0) -> Release:
        """Begin a new lineage from `weights` (round 0); the previous head, if any, is named as replaced."""
        weights, model, digest = encode(weights)
        previous = self.head
        with self._journal.atomic() as db:
            version = max(self.last_version() + 1, first_version)
            cursor = db.execute(
                "insert into lineage (root, version, reason, previous, architecture, started) values (?, ?, ?, ?, ?, ?)",
                [digest, version, reason, previous.digest if previous else b"", architecture, time.time()])
            lineage = cursor.lastrowid
            self._insert(db, version, digest, lineage, 0, b"", model, step=True, on_ledger=True)
        self._head = Release(digest, version, lineage, 0, b"", weights, len(model), model=model)
        return self._head

    def advance(self, weights: dict[str, np.ndarray], round_: int, rule: str,
                inputs: list[tuple[bytes, float | None]], strategy: str, config: dict, state: bytes | None,
                exchanges: list[str], params: dict | None = None, delta: Delta | None = None) -> Release | None:
        """The round's new model, as the next step (None if it equals the head: nothing to release).
        `params`: what its aggregate vertex records for a recompute (gateway/recompute.py); `delta`: the
        step from the head devices may download instead (journaled with it: a restart publishes it again).

        One transaction writes the release, its bytes, the strategy's state and marks the round's
        exchanges finished, so a restart neither loses the step nor aggregates the round again.
        """
        head = self.head
        weights, model, digest = encode(weights)
        with self._journal.atomic() as db:
            for exchange in exchanges:
                self._journal.exchanges.finish(exchange)
            if head is not None and digest == head.digest:
                return None
            version = self.last_version() + 1
            lineage = head.lineage if head else self.current.id
            self._insert(db, version, digest, lineage, round_, head.digest if head else b"", model, step=True,
                         strategy=strategy, config=config, rule=rule, inputs=inputs, params=params)
            db.execute("delete from release_delta")  # only the head's delta is ever published
            if delta is not None:
                db.execute("insert into release_delta values (?, ?, ?, ?)", [version, delta.base, delta.codec,
                                                                              delta.data])
            if state is not None:
                db.execute("insert into strategy_state values (?, ?)", [version, state])
            db.execute("delete from strategy_state where version < ?", [version])
            self._prune(db)
        self._head = Release(digest, version, lineage, round_, head.digest if head else b"", weights, len(model),
                             model=model, delta=delta)
        return self._head

    def finish_exchange(self, exchange: str) -> None:
        """A round that made no new model: its exchange is done all the same."""
        self._journal.exchanges.finish(exchange)

    def extra(self, weights: dict[str, np.ndarray], round_: int) -> Release:
        """A model a strategy sent that is not the head (a release of its own, versioned, not a step)."""
        weights, model, digest = encode(weights)
        head = self.head
        with self._journal.atomic() as db:
            version = self.last_version() + 1
            self._insert(db, version, digest, head.lineage if head else 0, round_, head.digest if head else b"",
                         model, step=False, on_ledger=True)
        return Release(digest, version, head.lineage if head else 0, round_, head.digest if head else b"",
                       weights, len(model), step=False, model=model)

    def _insert(self, db, version: int, digest: bytes, lineage: int, round_: int, parent: bytes, model: bytes,
                step: bool, strategy: str = "", config: dict | None = None, rule: str = "",
                inputs: list[tuple[bytes, float | None]] = (), on_ledger: bool = False,
                params: dict | None = None) -> None:
        provenance = {"rule": rule, "inputs": [[d.hex(), w] for d, w in inputs]}
        if params is not None:  # (JSON keeps ints and floats apart, and floats exactly)
            provenance["params"] = params
        db.execute("insert into release (version, digest, lineage, round, parent, size, strategy, config, inputs, "
                   "time, step, on_ledger) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   [version, digest, lineage, round_, parent, len(model), strategy, json.dumps(config or {}),
                    json.dumps(provenance), time.time(), int(step),
                    int(on_ledger)])
        db.execute("insert or replace into model (digest, data, added) values (?, ?, ?)", [digest, model, version])

    def _prune(self, db) -> None:
        """Keep the bytes of the newest step releases (and anything released after the oldest of them)."""
        rows = db.execute("select version from release where step = 1 order by version desc limit 1 offset ?",
                          [MODELS_KEPT - 1]).fetchall()
        if rows:
            db.execute("delete from model where added < ?", [rows[0][0]])

    # --- the ledger's copy -----------------------------------------------------------------

    def unrecorded(self) -> list[Unrecorded]:
        """Lineage starts and steps not on the ledger yet, oldest first."""
        out: list[tuple[int, Unrecorded]] = []
        for row in self._journal.read("select id, root, version, reason, previous, architecture from lineage "
                                      "where on_ledger = 0"):
            out.append((row[2], Unrecorded(LineageStart(*row), None)))
        for version, digest, lineage, round_, parent, size, strategy, inputs in self._journal.read(
                "select version, digest, lineage, round, parent, size, strategy, inputs from release "
                "where on_ledger = 0 and step = 1"):
            release = Release(digest, version, lineage, round_, parent, {}, size)
            out.append((version, Unrecorded(None, release, strategy,
                                            *_provenance(json.loads(inputs)))))
        return [u for _, u in sorted(out, key=lambda item: (item[0], item[1].release is not None))]

    def mark_recorded(self, item: Unrecorded) -> None:
        with self._journal.atomic() as db:
            if item.start is not None:
                db.execute("update lineage set on_ledger = 1 where id = ?", [item.start.id])
            else:
                db.execute("update release set on_ledger = 1 where version = ?", [item.release.version])

    # --- upgrades ----------------------------------------------------------------------------

    def adopt_legacy(self, version_file: Path, architecture: str) -> Release | None:
        """A journal of the first gateway version holds models but no lineage: its newest model becomes
        the first release of lineage 1 (its version from `model_version`), so the upgrade goes on from it."""
        if self.current is not None:
            return None
        rows = self._journal.read("select digest, data from model order by added desc limit 1")
        if not rows:
            return None
        try:
            version = int(version_file.read_text())
        except (OSError, ValueError):
            version = 0
        digest, data = rows[0]
        round_ = self._legacy_round(digest)
        with self._journal.atomic() as db:
            db.execute("insert into lineage (id, root, version, reason, previous, architecture, started) "
                       "values (1, ?, ?, ?, ?, ?, ?)", [digest, version, ADOPTED, b"", architecture, time.time()])
            self._insert(db, version, digest, 1, round_, b"", data, step=True, on_ledger=True)
        self._head = None
        return self.head

    def _legacy_round(self, digest: bytes) -> int:
        """The round that made the adopted model: the one before an unfinished exchange built on it, else
        the last round with a record."""
        rows = self._journal.read("select round from exchange where finished = 0 and base = ?", digest)
        if rows:
            return max(0, rows[0][0] - 1)
        return max(0, self._journal.history.last_round(1))


def _provenance(stored: Any) -> tuple[str, tuple[tuple[bytes, float | None], ...], dict | None]:
    """(rule, inputs, params) as a release row keeps them; a row of the first lineage version kept digests
    only, and rows journaled before recompute params have none."""
    if isinstance(stored, list):
        return "", tuple((bytes.fromhex(d), None) for d in stored), None
    return stored["rule"], tuple((bytes.fromhex(d), w) for d, w in stored["inputs"]), stored.get("params")
