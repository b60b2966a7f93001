"""What the city tier reads from the ledger: the offers of an epoch, its merges, and the evidence.

Every gateway reads these the same way from the same vertices, so they agree
on whose offer counts and who is flagged without asking each other:

    ledger.offers(epoch)          -> [Offer]     each member's first offer (canonical order), sound or not
    ledger.city_merges(epoch)     -> [Vertex]    the epoch's `city` vertices, canonical order
    ledger.city_outputs(epoch)    -> {gateway id: model digest}  each gateway's city model of the epoch
    ledger.evidence()             -> [Evidence]  every `mismatch` vertex, with whom it accuses and whether an
                                                 operator's `mismatch.clear` has answered it since
    ledger.flagged()              -> {gateway id: [Evidence]}   the evidence not cleared, by accused gateway
    ledger.arrived_since(mark, kinds...) -> ([Vertex], mark)    what came in since (the auditor's feed)
    ledger.member_ids()           -> {public key: gateway id}   current members, by the id they write under
    ledger.aggregate_with_output(ids, digest) -> Vertex | None  the aggregate a gateway's offer names

An offer's weight is the examples behind the model it offers, as the ledger
records them: each input update of the aggregate it names counts its
device-signed example count, capped at `max_examples` (a device cannot buy
the city with a big claim, nor a gateway with one). Only the ledger's own
records count, never a number the offering gateway states.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

from .kinds import AGGREGATE, CITY, CITY_OFFER, MISMATCH, MISMATCH_CLEAR, input_digests
from .sql_state import SqlState
from .vertex import Vertex

ARRIVALS_PAGE = 256  # vertices handed out per `arrived_since` call


class Offer(NamedTuple):
    """One member's offer to a city epoch, read from the ledger."""

    vertex: bytes  # the city.offer vertex
    gateway: str  # the id its creator writes under
    round: int
    model: bytes
    aggregate: bytes  # the aggregate vertex it names
    problem: str | None  # why it is unsound (then it is left out), or None
    examples: int  # the (capped) examples behind the model: the ledger's records of the aggregate's inputs


class Evidence(NamedTuple):
    """A `mismatch` vertex: `accuser` recomputed `vertex` (by `accused`) and got `recomputed`."""

    mismatch: bytes
    accuser: str
    accused: str
    vertex: bytes
    kind: str  # the recomputed vertex's kind ("aggregate" or "city"); "" when this store lacks it
    recomputed: bytes
    reason: str
    cleared: bool
    sound: bool  # the named vertex is an aggregate or city vertex whose output is not what was recomputed


class _ByEpoch:
    """The vertices of one kind (`city.offer` or `city`) by epoch, each read and decoded once: the city tier
    asks for one epoch's ten times a second while it waits, and a city that runs for months holds thousands of
    them. Rows are taken in by insertion counter (`vertices.n`); an epoch's list is sorted in the canonical
    order (depth, id), which never changes for a stored vertex. (A vertex known only from a bootstrap has no
    bytes and is not listed, as by `vertices_of`.)"""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._mark = -1
        self._epochs: dict[int, list[tuple[tuple[int, str], Vertex]]] = {}
        self._lock = threading.Lock()

    def of(self, read: Any, epoch: int) -> list[Vertex]:
        with self._lock:
            with read() as conn:
                rows = conn.execute("SELECT n, depth, id, data FROM vertices WHERE n > ? AND kind = ?"
                                    " AND length(data) > 0 ORDER BY n", (self._mark, self.kind)).fetchall()
            for n, depth, vid, data in rows:
                vertex = Vertex.decode(data)
                self._epochs.setdefault(vertex.body["epoch"], []).append(((depth, vid), vertex))
                self._mark = n
            return [vertex for _, vertex in sorted(self._epochs.get(epoch, ()), key=lambda item: item[0])]


class CityQueries:
    """The city tier's reads; `Ledger` inherits them (it provides `_read`, `get` and `vertices_of`)."""

    _by_epoch_lock = threading.Lock()

    def _of_epoch(self, kind: str, epoch: int) -> list[Vertex]:
        """The `kind` vertices of `epoch` in the canonical order (through this store's `_ByEpoch` of that kind)."""
        with CityQueries._by_epoch_lock:
            indexes = self.__dict__.setdefault("_city_by_epoch", {})
            index = indexes.setdefault(kind, _ByEpoch(kind))
        return index.of(self._read, epoch)

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def get(self, id: bytes) -> Vertex | None:
        raise NotImplementedError

    def vertices_of(self, *kinds: str) -> Iterable[Vertex]:
        raise NotImplementedError

    def member_ids(self) -> dict[bytes, str]:
        """The current members' public keys -> the gateway id each writes under (its first key's id)."""
        with self._read() as conn:
            rows = conn.execute("SELECT public_key, id FROM gateways WHERE left_vertex IS NULL").fetchall()
        return {bytes.fromhex(key): gateway for key, gateway in rows}

    def speaks_as(self, public_key: bytes) -> str:
        with self._read() as conn:
            return SqlState(conn).speaks_as(public_key)

    def arrived_since(self, mark: int, *kinds: str) -> tuple[list[Vertex], int]:
        """Vertices of `kinds` that this store took in after `mark` (its insertion counter; -1: from the
        start), at most ARRIVALS_PAGE of them, and the mark to ask from next (no kinds: none, and the mark of
        everything stored now)."""
        marks = ",".join("?" * len(kinds))
        with self._read() as conn:
            rows = [] if not kinds else conn.execute(
                f"SELECT n, id, data FROM vertices WHERE n > ? AND kind IN ({marks}) AND length(data) > 0"
                " ORDER BY n LIMIT ?", (mark, *kinds, ARRIVALS_PAGE)).fetchall()
            if len(rows) < ARRIVALS_PAGE:  # all of them: the next call starts after everything seen now
                top = conn.execute("SELECT max(n) FROM vertices").fetchone()[0]
                mark = max(mark, rows[-1][0] if rows else -1, -1 if top is None else top)
            else:
                mark = rows[-1][0]
        return [Vertex.decode(data) for _, _, data in rows], mark

    def offers(self, epoch: int, max_examples: int) -> list[Offer]:
        """Each gateway's first offer to `epoch` in the canonical order (a second one is ignored), by gateway
        id. Unsound offers are listed with their problem."""
        first: dict[str, Offer] = {}
        records = _Records(self)
        for vertex in self._of_epoch(CITY_OFFER, epoch):
            gateway = self.speaks_as(vertex.creator)
            if gateway in first:
                continue
            first[gateway] = self._offer(vertex, gateway, records, max_examples)
        return sorted(first.values(), key=lambda o: o.gateway)

    def _offer(self, vertex: Vertex, gateway: str, records: _Records, max_examples: int) -> Offer:
        body = vertex.body
        aggregate = self.get(body["aggregate"])
        problem, examples = None, 0
        if aggregate is None or aggregate.kind != AGGREGATE:
            problem = "it names no aggregate vertex"
        elif self.speaks_as(aggregate.creator) != gateway:
            problem = "it offers another gateway's aggregate"
        elif aggregate.body["output"] != body["model"] or aggregate.body["round"] != body["round"]:
            problem = "its model or round is not the aggregate's"
        else:
            examples = sum(min(records.examples(digest), max_examples) for digest in input_digests(aggregate.body))
            if examples <= 0:
                problem = "no recorded examples behind it"
        return Offer(vertex.id, gateway, body["round"], body["model"], body["aggregate"], problem, examples)

    def aggregate_with_output(self, creator_ids: Iterable[str], output: bytes, newest: int = 64) -> Vertex | None:
        """The newest `aggregate` vertex (of the `newest` last ones by these creator ids) whose output is
        `output`: the vertex a gateway names when it offers its head."""
        ids = list(creator_ids)
        marks = ",".join("?" * len(ids))
        with self._read() as conn:
            rows = conn.execute(f"SELECT data FROM vertices WHERE kind = ? AND creator IN ({marks})"
                                " AND length(data) > 0 ORDER BY n DESC LIMIT ?", (AGGREGATE, *ids, newest)).fetchall()
        for (data,) in rows:
            vertex = Vertex.decode(data)
            if vertex.body["output"] == output:
                return vertex
        return None

    def city_merges(self, epoch: int) -> list[Vertex]:
        """The `city` vertices of `epoch`, in the canonical order."""
        return self._of_epoch(CITY, epoch)

    def city_outputs(self, epoch: int) -> dict[str, bytes]:
        """{gateway id: the model of its first `city` vertex of `epoch`}, for each gateway that merged it."""
        out: dict[str, bytes] = {}
        for vertex in self.city_merges(epoch):
            out.setdefault(self.speaks_as(vertex.creator), vertex.body["output"])
        return out

    def evidence(self) -> list[Evidence]:
        """Every mismatch on record, canonical order, with whom it accuses and whether it was cleared."""
        clears = list(self.vertices_of(MISMATCH_CLEAR))
        out = []
        for vertex in self.vertices_of(MISMATCH):
            target = self.get(vertex.body["vertex"])
            accused = self.speaks_as(target.creator) if target is not None else ""
            kind = target.kind if target is not None else ""
            sound = (target is not None and kind in (AGGREGATE, CITY)
                     and target.body["output"] != vertex.body["recomputed"])
            cleared = any(self.speaks_as(c.body["gateway"]) == accused and self._precedes(vertex.id, c)
                          for c in clears)
            out.append(Evidence(vertex.id, self.speaks_as(vertex.creator), accused, vertex.body["vertex"], kind,
                                vertex.body["recomputed"], vertex.body["reason"], cleared, sound))
        return out

    def flagged(self) -> dict[str, list[Evidence]]:
        """Gateway id -> the sound evidence against it that no operator has cleared."""
        out: dict[str, list[Evidence]] = {}
        for item in self.evidence():
            if item.sound and not item.cleared and item.accused != item.accuser:
                out.setdefault(item.accused, []).append(item)
        return out

    def _precedes(self, earlier: bytes, vertex: Vertex) -> bool:
        with self._read() as conn:
            return SqlState(conn).precedes(earlier, vertex)


class _Records:
    """Update digest -> the examples its device signed, read from the updates vertices that record them
    (each vertex decoded once per reader: an aggregate's inputs come from a few of them)."""

    def __init__(self, ledger: Any) -> None:
        self._ledger = ledger
        self._examples: dict[bytes, int] = {}
        self._decoded: set[int] = set()

    def examples(self, digest: bytes) -> int:
        if digest not in self._examples:
            with self._ledger._read() as conn:
                rows = conn.execute("SELECT DISTINCT v.n, v.data FROM updates u JOIN vertices v ON v.n = u.vertex"
                                    " WHERE u.digest = ? AND length(v.data) > 0", (digest,)).fetchall()
            for n, data in rows:
                if n in self._decoded:
                    continue
                self._decoded.add(n)
                for _device, recorded, examples, _signature in Vertex.decode(data).body["records"]:
                    self._examples.setdefault(recorded, examples)
        return self._examples.get(digest, 0)
