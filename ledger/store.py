"""One gateway's copy of the ledger DAG in SQLite: `Ledger`, the one way in.

    schema.py     the tables, the file's header, opening a connection, upgrading an older file
    sql_state.py  the rules' view of the tables (`SqlState`), used inside a write transaction
    queries.py    every read (`LedgerQueries`, which `Ledger` inherits)
    city_queries.py  the city tier's reads: offers, merges, evidence (`CityQueries`, inherited too)
    bootstrap.py  starting from a peer's final checkpoint instead of from genesis
    store.py      `Ledger`: open and close, the one write transaction, every write

Every write is one `BEGIN IMMEDIATE` transaction (`_write`): the write lock
is taken before the creator's last seq and the tips are read, so two writers
cannot both claim the same seq, even two `Ledger`s in different processes
signing with the same gateway key (a running gateway and an operator's
`starling-ledger revoke`). A writer that finds the lock taken waits up to
`schema.BUSY_TIMEOUT_S` for it instead of failing. Validation runs inside
the transaction, and a refusal rolls everything back. This is not
sqlite-utils' `atomic()`, which begins a deferred transaction: it would read
the seq before holding the lock. `self.db`, the sqlite-utils `Database` on
the same connection, sets the pragmas and creates or upgrades the schema.
"""

from __future__ import annotations

import math
import numbers
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlite_utils import Database

from protocol.errors import ProtocolError
from protocol.keys import Identity, identity_id
from protocol.rotation import KeyRotation

from . import bootstrap, validate
from .city_queries import CityQueries
from .errors import AlreadyEnrolled, DeviceRevoked, InvalidVertex, NoIdentity, StoreError
from .kind_rules import snapshot_of
from .kinds import (
    AGGREGATE,
    CHECKPOINT,
    CITY,
    CITY_OFFER,
    CONTRIBUTIONS,
    DEVICE_ENROLL,
    DEVICE_REVOKE,
    GATEWAY_JOIN,
    GATEWAY_LEAVE,
    GATEWAY_ROTATE,
    GENESIS,
    LINEAGE,
    MAX_RECORDS,
    MISMATCH,
    MISMATCH_CLEAR,
    UPDATES,
)
from .queries import LedgerQueries
from .schema import SCHEMA_VERSION, check_schema, connect, create_or_upgrade
from .snapshot import digest_of
from .sql_state import SqlState
from .vertex import Vertex, sign

__all__ = ["SCHEMA_VERSION", "Ledger"]  # SCHEMA_VERSION: tests and tools read it from here


class Ledger(LedgerQueries, CityQueries):
    """A gateway's ledger store. Thread-safe: one lock serializes use of the connection.

    Open it with `Ledger(path, identity)` and `close()` it, or as
    `with Ledger.open(path, identity) as ledger:`. Without an identity (or
    with `read_only=True`) it answers queries only. Every refusal raises a
    `LedgerError` subclass and leaves the store unchanged.
    """

    def __init__(
        self, path: str | Path, identity: Identity | None = None, *, read_only: bool = False
    ) -> None:
        self.path = Path(path)
        self.identity = identity
        self.read_only = read_only
        self._lock = threading.RLock()
        self.writes = 0  # commits through this object (appends and inserts): a cheap "anything new?"
        self.on_append: Callable[[Vertex], None] | None = None  # after each own vertex commits (gossip push)
        self._closed = False
        self._data_version: int | None = None  # SQLite's count of other connections' commits, last seen
        try:
            self._conn = connect(self.path, read_only=read_only)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        try:
            self.db = Database(self._conn, recursive_triggers=False, execute_plugins=False)
            if not read_only:
                with self._write(require_identity=False):  # first: refuse another application's file
                    create_or_upgrade(self.db, self.path)
                self.db.enable_wal()
                # WAL with synchronous=NORMAL stays consistent after a power loss but may lose the
                # last commits. A gateway tells devices "accepted" once their batch is recorded, so
                # a commit must be on disk when it returns: FULL fsyncs the WAL at every commit
                # (one fsync per batch, well under a millisecond on an SSD).
                self.db.execute("PRAGMA synchronous=FULL")
            check_schema(self._conn)
        except (sqlite3.Error, StoreError) as exc:
            self._conn.close()
            self._closed = True
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot use {self.path}: {exc}") from exc

    @classmethod
    def open(cls, path: str | Path, identity: Identity | None = None, *, read_only: bool = False) -> Ledger:
        """Open (creating it if needed) a ledger; use it as a context manager to close it."""
        return cls(path, identity, read_only=read_only)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, read_only={self.read_only})"

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if not self.read_only:
                    # Leave one self-contained file behind: copyable, and auditable without the WAL.
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # another connection is reading; SQLite checkpoints when the last one closes
            finally:
                self._conn.close()

    # --- transactions -------------------------------------------------------------------

    @contextmanager
    def _write(self, require_identity: bool = True, everything_precedes: bool = False) -> Iterator[SqlState]:
        """One write transaction; rolled back on any exception."""
        with self._lock:
            self._check_open()
            if self.read_only:
                raise StoreError("the ledger was opened read-only")
            if require_identity and self.identity is None:
                raise NoIdentity("this ledger was opened without the gateway's identity")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot start a write: {exc}") from exc
            try:
                yield SqlState(self._conn, everything_precedes)
                self._conn.execute("COMMIT")
            except BaseException as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"write failed: {exc}") from exc
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._check_open()
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise StoreError(f"read failed: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the ledger is closed")

    def changed_elsewhere(self) -> bool:
        """True when another connection (an operator's `starling-ledger`) committed since the last call.

        SQLite's `data_version` moves only for other connections' commits: a cheap poll.
        """
        with self._read() as conn:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
        changed, self._data_version = version != self._data_version, version
        return changed

    # --- writing ------------------------------------------------------------------------

    def init_genesis(self, name: str, gateways: list[bytes]) -> Vertex:
        """Write the genesis vertex naming the DAG and its first gateways (sorted, deduplicated).

        Only on an empty store (else AlreadyInitialized). This ledger's identity
        signs it and becomes the root key, the one that signs membership changes:
        the operator's offline key (`starling-ledger init`), or a lone gateway's own.
        """
        try:
            keys = sorted(set(gateways))
        except TypeError:  # not a list of bytes: let the schema check say what is wrong
            keys = gateways
        return self.append(GENESIS, {"name": name, "gateways": keys})

    def append(self, kind: str, body: dict[str, Any], proofs_checked: bool = False) -> Vertex:
        """Sign a vertex of `kind` as this gateway and store it, in one transaction.

        seq is this gateway's last seq + 1; parents are its previous vertex
        plus the current tips; time is now. The vertex passes every rule of
        `ledger.validate` before anything is written.
        """
        with self._write(everything_precedes=True) as state:
            seq, parents = self._next_links(state)
            try:
                vertex = sign(self.identity, kind, seq, parents, body)
            except ProtocolError as exc:
                raise InvalidVertex(str(exc)) from exc
            validate.admit(vertex, state, proofs=not proofs_checked)
        self.writes += 1
        if self.on_append is not None:
            self.on_append(vertex)
        return vertex

    def insert_vertex(self, vertex: Vertex) -> bool:
        """Store a vertex created elsewhere, under the same rules as `append`.

        Returns False (and changes nothing) if the store has it already.
        Its parents must be here already (else `MissingParent`); waiting for
        missing ones is the gossip layer's job. A second vertex with the same
        creator and seq is admitted as evidence and its creator is listed by
        `equivocators`.
        """
        with self._write(require_identity=False) as state:
            if state.has_vertex(vertex.id):
                return False
            validate.admit(vertex, state)
        self.writes += 1
        return True

    def write_checkpoint(self) -> Vertex:
        """Commit to the state of everything this gateway holds: a `checkpoint` vertex.

        Its snapshot is kept (the newest few) to hand to gateways that start from it.
        """
        with self._write() as state:
            seq, parents = self._next_links(state)
            probe = Vertex(CHECKPOINT, self.identity.public_key, 0, tuple(parents), 0.0,
                           {"count": 1, "state": bytes(32)}, bytes(64))
            past = state.past_of(probe)
            if past is None:
                raise StoreError("this ledger started from a checkpoint: it cannot snapshot the history before it")
            snapshot = snapshot_of(past)
            try:
                vertex = sign(self.identity, CHECKPOINT, seq, parents,
                              {"count": len(past), "state": digest_of(snapshot)})
            except ProtocolError as exc:
                raise InvalidVertex(str(exc)) from exc
            vertex.__dict__["snapshot"] = snapshot  # built from this very past: the kind's check need not redo it
            state.everything_precedes = True
            validate.admit(vertex, state)
        self.writes += 1
        if self.on_append is not None:
            self.on_append(vertex)
        return vertex

    def _next_links(self, state: SqlState) -> tuple[int, list[bytes]]:
        """This gateway's next seq, and the parents of its next vertex: its previous one and every tip."""
        assert self.identity is not None  # _write checked
        last = state.last_of(self.identity.public_key)
        parents = set(state.tips())
        if last is not None:
            parents.add(last[1])
        return (0 if last is None else last[0] + 1), sorted(parents)

    def bootstrap(self, genesis: Vertex, checkpoint: Vertex, snapshot: bytes) -> None:
        """Start this store from a checkpoint instead of from genesis (`ledger.bootstrap`).

        Everything is checked first: the genesis (pinned by the gateway's config), the checkpoint's
        signature by a member gateway, the snapshot against the checkpoint's digest and count, and that
        the snapshot starts at this genesis. The store must hold nothing but (at most) that genesis.
        Audits (`verify`) then start from the checkpoint; `history`, `provenance` and `lineage` see from
        there on.
        """
        doc, mask = bootstrap.check(genesis, checkpoint, snapshot)
        with self._write(require_identity=False) as state:
            bootstrap.load(self._conn, doc, mask, genesis, checkpoint, snapshot)
            validate.admit(checkpoint, state)
        self.writes += 1

    def join_gateway(self, public_key: bytes, name: str) -> Vertex:
        """Admit a gateway (this ledger's identity must be the root key that signed genesis)."""
        return self.append(GATEWAY_JOIN, {"gateway": public_key, "name": name})

    def leave_gateway(self, public_key: bytes, reason: str) -> Vertex:
        """Retire a gateway for good (root key only); its later vertices are refused."""
        return self.append(GATEWAY_LEAVE, {"gateway": public_key, "reason": reason})

    def clear_mismatch(self, public_key: bytes, reason: str) -> Vertex:
        """Answer the mismatch evidence against a gateway (root key only): the evidence on record so far no
        longer keeps its models out of the city (`CityQueries.flagged`)."""
        return self.append(MISMATCH_CLEAR, {"gateway": public_key, "reason": reason})

    def rotate_gateway(self, rotation: KeyRotation) -> Vertex:
        """Replace a gateway's key (root key only, `rotation` signed by it): the old key's later vertices
        are refused, the new key writes from here on."""
        return self.append(GATEWAY_ROTATE, {"gateway": rotation.old, "next": rotation.new,
                                            "statement": rotation.encode()})

    def enroll_device(self, public_key: bytes, name: str, policy: str, evidence: bytes | None = None) -> Vertex:
        """Enroll a device as this gateway, with the evidence its policy admitted it on (`ledger.kinds`:
        a voucher's encoding under "voucher", else b""; None writes the first form of the body, without it).

        Idempotent per gateway: if this gateway enrolled the device already, returns that `device.enroll`
        vertex unchanged (its name, policy and evidence stay as first written). An enrollment by another
        gateway does not count: each gateway admits a device on its own policy, so this one writes its own.
        A revoked device is refused (`DeviceRevoked`): re-admission needs a new key.
        """
        if isinstance(public_key, bytes) and self.is_revoked(public_key):
            raise DeviceRevoked(f"device {identity_id(public_key)} was revoked; re-admission needs a new key")
        existing = self._own_enrollment(public_key)
        if existing is not None:
            return existing
        body: dict[str, Any] = {"device": public_key, "name": name, "policy": policy}
        if evidence is not None:
            body["evidence"] = evidence
        try:
            return self.append(DEVICE_ENROLL, body)
        except AlreadyEnrolled:  # another writer with this key enrolled it between the two steps
            existing = self._own_enrollment(public_key)
            if existing is None:  # enrolled before the checkpoint this store started from: no bytes here
                raise
            return existing

    def _own_enrollment(self, public_key: bytes) -> Vertex | None:
        """This gateway's `device.enroll` vertex for the device, if it has one here (with its bytes)."""
        if not isinstance(public_key, bytes) or self.identity is None:
            return None  # not a key at all: append's schema check names the problem (or NoIdentity)
        for record in self.enrollments(public_key):
            if record.creator == self.identity.id:
                return self.get(record.vertex)
        return None

    def revoke_device(self, public_key: bytes, reason: str) -> Vertex:
        """Revoke an enrolled device's key for good, saying why (at most 256 characters).

        Refused with `UnknownDevice` if it was never enrolled and `AlreadyRevoked`
        if it is revoked already. Afterwards it is no longer in `enrolled_devices`,
        no updates vertex may record it, and `enroll_device` refuses it.
        """
        return self.append(DEVICE_REVOKE, {"device": public_key, "reason": reason})

    def record_updates(
        self, gateway: str, round: int, task: str, base: bytes, records: list[tuple[bytes, bytes, int, bytes]],
        signatures_checked: bool = False,
    ) -> Vertex:
        """Record a batch of accepted updates: (device public key, update digest, examples, device signature).

        `gateway` must be this gateway's id (the `ctx.gateway` the devices
        signed). Every device must be enrolled, every signature valid, and no
        (device, digest) recorded before; otherwise nothing is written.
        `signatures_checked=True` (the gateway verified each reply at ingest)
        skips checking the device signatures again; every other gateway and
        every audit still checks them.
        """
        rows = [list(r) if isinstance(r, list | tuple) else r for r in records]
        return self.append(
            UPDATES, {"gateway": gateway, "round": round, "task": task, "base": base, "records": rows},
            proofs_checked=signatures_checked,
        )

    def record_aggregate(
        self, round: int, strategy: str, base: bytes, inputs: Sequence[bytes] | Sequence[tuple[bytes, float | None]],
        output: bytes, rule: str | None = None, params: dict[str, Any] | None = None,
    ) -> Vertex:
        """Record a round's new model (`output`) and the recorded updates it was built from.

        Without `rule`, `inputs` are update digests (the first form of the body). With `rule` (how the
        strategy combined them: "weighted", "selected", "coordinate"), `inputs` are (update digest, effective
        weight) pairs: the inputs that shaped the model, each weight in [0, 1], None under "coordinate".
        `params` (with `rule` only): what a recompute needs besides the inputs (`ledger.kinds._check_params`,
        gateway/recompute.py).
        """
        listed = list(inputs) if rule is None else [_as_floats(item, 1) for item in inputs]
        body: dict[str, Any] = {"round": round, "strategy": strategy, "base": base, "inputs": listed,
                                "output": output}
        if rule is not None:
            body["rule"] = rule
        if params is not None:  # (the schema refuses params without a rule)
            body["params"] = params
        return self.append(AGGREGATE, body)

    def record_contributions(
        self, round: int, model: bytes, scores: Sequence[tuple[bytes, bytes, float]]
    ) -> list[Vertex]:
        """Record each accepted update's contribution score to a round's model (`model`: its aggregate's
        output): (device public key, update digest, score), every pair a recorded update of that device.

        A big round is written in several `contributions` vertices of at most `MAX_RECORDS` scores each,
        each its own transaction; returns them. Nothing is written for no scores.
        """
        rows = [_as_floats(item, 2) for item in scores]
        return [self.append(CONTRIBUTIONS, {"round": round, "model": model, "scores": rows[i:i + MAX_RECORDS]})
                for i in range(0, len(rows), MAX_RECORDS)]

    def record_offer(self, epoch: int, round: int, model: bytes, aggregate: bytes) -> Vertex:
        """Offer this gateway's model `model` (the output of its aggregate vertex `aggregate`, round `round`)
        to city epoch `epoch`."""
        return self.append(CITY_OFFER, {"epoch": epoch, "round": round, "model": model, "aggregate": aggregate})

    def record_city(self, epoch: int, rule: str, inputs: Sequence[tuple[bytes, bytes, float | None]],
                    output: bytes, params: dict[str, Any] | None = None) -> Vertex:
        """Record a city epoch's model: (offer vertex id, model digest, weight or None) in merge order."""
        body: dict[str, Any] = {"epoch": epoch, "rule": rule, "inputs": [_as_floats(i, 2) for i in inputs],
                                "output": output}
        if params is not None:
            body["params"] = params
        return self.append(CITY, body)

    def record_mismatch(self, vertex: bytes, recomputed: bytes, reason: str) -> Vertex:
        """Evidence: the aggregate or city vertex `vertex` recomputed gave `recomputed` (b"": no model)."""
        return self.append(MISMATCH, {"vertex": vertex, "recomputed": recomputed, "reason": reason[:256]})

    def record_lineage(
        self, model: bytes, version: int, previous: bytes, reason: str, architecture: str
    ) -> Vertex:
        """Record where a model lineage starts: its first model and the release version it was given.

        `previous` is the digest of the last model of the lineage this one replaces, b"" for the
        first; `reason` says why a new one starts (at most 256 characters: "first start",
        "reset-model: <operator's text>", "model family changed"); `architecture` is the model's
        architecture id. The aggregates after it name this model as their first `base`, which is
        how `starling-ledger lineage` walks a model back to here.
        """
        body = {"model": model, "version": version, "previous": previous, "reason": reason,
                "architecture": architecture}
        return self.append(LINEAGE, body)



def _as_floats(item: Any, index: int) -> Any:
    """A list item (a tuple becomes a list) whose number at `index` is a Python float, as the body schema
    wants it (a caller may hold an int or a numpy scalar). Anything else passes on for the schema to refuse."""
    if not isinstance(item, list | tuple):
        return item
    row = list(item)
    if len(row) > index and _is_number(row[index]):
        row[index] = float(row[index])
    return row


def _is_number(value: Any) -> bool:
    """A finite real number that is not a bool (NaN and infinity pass on unchanged, for the schema to refuse)."""
    try:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return False
