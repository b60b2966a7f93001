"""One gateway's copy of the ledger DAG, in SQLite (sqlite-utils, WAL mode).

The `vertices` table is the ledger: each row keeps a vertex's full encoded
bytes (signature included) next to a few columns for queries. Everything
else is derived state, rebuilt from vertices alone and updated in the same
transaction as the vertex that changes it:

    meta           the root key; where a bootstrapped store started (checkpoint and its snapshot)
    vertices       id (hex), n, creator (identity id), seq, kind, time, depth, seen, data
                   (data is empty for vertices known only from a bootstrap snapshot)
    edges          (child n, parent n): ancestry walks for the causal rules and finality
    tips           ids of vertices nobody names as a parent yet
    gateways       every gateway ever admitted: key, admitting vertex, finality bit (idx), leave vertex
    equivocations  (creator, seq, vertex) for every creator that signed two vertices with one seq
    snapshots      the snapshots of the newest checkpoints, served to gateways that bootstrap
    devices        enrolled devices, revoked since or not: public key, id, name, policy, enroll vertex
    revocations    revoked devices: public key, reason, revoke vertex
    updates        (update digest, device) -> updates vertex; answers "is this input recorded?"
    contributions  (device, vertex) pairs; answers "which vertices name this device?"

`updates` and `contributions` hold one row per update record, so they refer
to devices and vertices by small integer handles (`devices.n`,
`vertices.n`) rather than hex: a handle is 1-3 bytes on disk, an id 64.
`n` is an explicit column because SQLite may renumber implicit rowids on
VACUUM.

A device is active while it is in `devices` and not in `revocations`;
`enrolled_devices` and `is_enrolled` answer for active devices only.

Every write is one `BEGIN IMMEDIATE` transaction: the write lock is taken
before the creator's last seq and the tips are read, so two writers cannot
both claim the same seq, even two `Ledger`s in different processes signing
with the same gateway key (a running gateway and an operator's
`starling-ledger revoke`). A writer that finds the lock taken waits up to
`BUSY_TIMEOUT_S` for it instead of failing. Validation runs inside the
transaction, and a refusal rolls everything back.

The canonical order of vertices is (depth, id): depth is the longest path
from genesis, so every parent comes before its children, and every gateway
derives the same order from the same DAG. `seen` holds one bit per gateway,
set on a vertex and all its ancestors when that gateway's vertex arrives: a
vertex is final once more than two thirds of the members' bits are set.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlite_utils import Database

from protocol.errors import BadSignature, ProtocolError
from protocol.keys import Identity, identity_id

from . import validate
from .errors import (
    AlreadyEnrolled,
    BadCheckpoint,
    BadVertexSignature,
    DeviceRevoked,
    InvalidVertex,
    LedgerError,
    NoIdentity,
    NotAGateway,
    StoreError,
)
from .kinds import (
    AGGREGATE,
    CHECKPOINT,
    DEVICE_ENROLL,
    DEVICE_REVOKE,
    GATEWAY_JOIN,
    GATEWAY_LEAVE,
    GENESIS,
    LINEAGE,
    UPDATES,
)
from .vertex import Vertex, sign

SCHEMA_VERSION = 3  # 2 added revocations; 3 added membership, edges, seen bits, equivocations (rebuilt)
APPLICATION_ID = 0x53544C47  # "STLG" in the SQLite header: marks the file as a Starling ledger
BUSY_TIMEOUT_S = 10.0
PAGE_ROWS = 32  # vertices fetched per query while iterating; an updates vertex can be 100s of KB

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE vertices (
    id TEXT PRIMARY KEY,
    n INTEGER NOT NULL UNIQUE,
    creator TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    depth INTEGER NOT NULL,
    seen INTEGER NOT NULL DEFAULT 0,
    data BLOB NOT NULL
);
CREATE INDEX vertices_creator_seq ON vertices (creator, seq);
CREATE INDEX vertices_order ON vertices (depth, id);
CREATE TABLE edges (child INTEGER NOT NULL, parent INTEGER NOT NULL, PRIMARY KEY (child, parent)) WITHOUT ROWID;
CREATE TABLE tips (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE gateways (
    public_key TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    vertex TEXT NOT NULL,
    idx INTEGER NOT NULL UNIQUE,
    left_vertex TEXT
) WITHOUT ROWID;
CREATE TABLE equivocations (
    creator TEXT NOT NULL,
    seq INTEGER NOT NULL,
    vertex TEXT NOT NULL,
    PRIMARY KEY (creator, seq, vertex)
) WITHOUT ROWID;
CREATE TABLE devices (
    n INTEGER PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    policy TEXT NOT NULL,
    vertex TEXT NOT NULL
);
CREATE TABLE revocations (
    public_key TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    vertex TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE updates (
    digest BLOB NOT NULL,
    device INTEGER NOT NULL,
    vertex INTEGER NOT NULL,
    PRIMARY KEY (digest, device)
) WITHOUT ROWID;
CREATE TABLE snapshots (vertex TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE contributions (
    device INTEGER NOT NULL,
    vertex INTEGER NOT NULL,
    PRIMARY KEY (device, vertex)
) WITHOUT ROWID;
"""

TABLES = frozenset({"meta", "vertices", "edges", "tips", "gateways", "equivocations", "devices", "revocations",
                    "updates", "contributions", "snapshots"})
KEEP_SNAPSHOTS = 2  # the snapshots of the newest checkpoints, served to gateways that bootstrap


def create_tables(conn: sqlite3.Connection) -> None:
    """The schema, one statement at a time (executescript would commit the caller's transaction)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def connect(path: str | Path, *, read_only: bool) -> sqlite3.Connection:
    """A connection with no implicit transactions (every transaction here is explicit)."""
    if read_only:
        # mode=ro: never create the file, never write it. Still reads a WAL a live gateway is writing.
        target, uri = Path(path).resolve().as_uri() + "?mode=ro", True
    else:
        target, uri = str(path), False
    return sqlite3.connect(
        target, uri=uri, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
    )


def check_schema(conn: sqlite3.Connection) -> None:
    """Raise StoreError unless the file holds a ledger of the schema this code knows.

    An older file is upgraded by the first writer that opens it (`Ledger(path, identity)`),
    which rebuilds the derived tables from the vertices.
    """
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id != APPLICATION_ID:
        raise StoreError("not a Starling ledger (SQLite application_id does not match)")
    if 1 <= version < SCHEMA_VERSION:
        raise StoreError(f"ledger schema version {version} is older than {SCHEMA_VERSION}: "
                         "open it once read-write (e.g. `starling-ledger show --db FILE --upgrade`) to upgrade it")
    if version != SCHEMA_VERSION:
        raise StoreError(f"ledger schema version {version}; this code reads version {SCHEMA_VERSION}")


class Ledger:
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
        try:
            self._conn = connect(self.path, read_only=read_only)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        try:
            self.db = Database(self._conn, recursive_triggers=False, execute_plugins=False)
            if not read_only:
                self._create_schema()  # first: refuse another application's file before changing it
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

    def _create_schema(self) -> None:
        with self._write(require_identity=False):
            if self._conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID:
                # A ledger already: bring an older schema up to date (check_schema refuses newer ones).
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                if 1 <= version < SCHEMA_VERSION:
                    self._rebuild()
                return
            if self._conn.execute("PRAGMA user_version").fetchone()[0] != 0 or self.db.table_names():
                raise StoreError(f"{self.path} is an SQLite database of something else")
            create_tables(self._conn)
            self._conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _rebuild(self) -> None:
        """Re-derive every table from the vertices alone (inside the caller's transaction).

        Used to upgrade a file of an older schema: the vertices are the ledger, the rest follows.
        """
        rows = self._conn.execute("SELECT data FROM vertices ORDER BY depth, id").fetchall()
        for table in self.db.table_names():
            self._conn.execute(f"DROP TABLE {table}")
        create_tables(self._conn)
        state = SqlState(self._conn)
        for (data,) in rows:
            validate.apply(Vertex.decode(data), state)
        self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
        from .snapshot import digest_of, snapshot_of

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
        """Start this store from a checkpoint instead of from genesis: the snapshot's vertices are kept
        as ids only (no bytes), its derived state is taken as it is, then the checkpoint goes in.

        Everything is checked first: the genesis (pinned by the gateway's config), the checkpoint's
        signature by a member gateway, the snapshot against the checkpoint's digest and count, and that
        the snapshot starts at this genesis. The store must hold nothing but (at most) that genesis.
        Audits (`verify`) then start from the checkpoint; `history`, `provenance` and `lineage` see from
        there on.
        """
        from .snapshot import decode, digest_of

        try:
            genesis.verify_signature()
            checkpoint.verify_signature()
        except BadSignature as exc:
            raise BadVertexSignature("the genesis or the checkpoint is not signed by its creator") from exc
        if checkpoint.kind != CHECKPOINT:
            raise InvalidVertex(f"bootstrap needs a checkpoint vertex, not {checkpoint.kind}")
        if digest_of(snapshot) != checkpoint.body["state"]:
            raise BadCheckpoint("the snapshot does not hash to the checkpoint's state digest")
        try:
            doc = decode(snapshot)
        except ProtocolError as exc:
            raise BadCheckpoint(f"the snapshot is malformed: {exc}") from exc
        rows = doc["vertices"]
        if len(rows) != checkpoint.body["count"]:
            raise BadCheckpoint("the snapshot's vertex count is not the checkpoint's")
        if rows[0][0] != genesis.id or doc["root"] != genesis.creator:
            raise BadCheckpoint("the snapshot is of another ledger (its genesis differs)")
        members = [m[0] for m in doc["members"] if m[2] is None]
        if checkpoint.creator not in members:
            raise NotAGateway(f"checkpoint creator {checkpoint.creator_id} is not a member gateway")
        mask = sum(1 << i for i, m in enumerate(doc["members"]) if m[2] is None)
        with self._write(require_identity=False) as state:
            present = self._conn.execute("SELECT id FROM vertices").fetchall()
            if present not in ([], [(genesis.id_hex,)]):
                raise StoreError("bootstrap needs an empty ledger (or one holding only its genesis)")
            for table in ("vertices", "tips", "gateways", "meta"):
                self._conn.execute(f"DELETE FROM {table}")
            state.bootstrap(doc, genesis, mask)
            self._conn.execute("INSERT INTO meta (key, value) VALUES ('bootstrap', ?), ('bootstrap_snapshot', ?)",
                               (checkpoint.id, snapshot))
            validate.admit(checkpoint, state)
        self.writes += 1

    def bootstrap_point(self) -> tuple[bytes, bytes] | None:
        """(checkpoint id, snapshot) this store started from, or None if it holds the whole history."""
        rows = dict(self._read_all("SELECT key, value FROM meta WHERE key IN ('bootstrap', 'bootstrap_snapshot')"))
        return (rows["bootstrap"], rows["bootstrap_snapshot"]) if "bootstrap" in rows else None

    def since_checkpoint(self) -> int:
        """Vertices here beyond the past of the newest checkpoint (all of them if there is none)."""
        rows = self._read_all("SELECT data FROM vertices WHERE kind = ? AND length(data) > 0"
                              " ORDER BY depth DESC, id DESC LIMIT 1", CHECKPOINT)
        covered = Vertex.decode(rows[0][0]).body["count"] + 1 if rows else 0
        return self.height - covered

    def latest_final_checkpoint(self) -> tuple[Vertex, bytes] | None:
        """The newest final checkpoint whose snapshot this store keeps, with that snapshot."""
        rows = self._read_all(
            "SELECT v.id, v.data, s.data FROM vertices v JOIN snapshots s ON s.vertex = v.id"
            " ORDER BY v.depth DESC, v.id DESC"
        )
        for vid, data, snapshot in rows:
            if self.is_final(bytes.fromhex(vid)):
                return Vertex.decode(data), snapshot
        return None

    def join_gateway(self, public_key: bytes, name: str) -> Vertex:
        """Admit a gateway (this ledger's identity must be the root key that signed genesis)."""
        return self.append(GATEWAY_JOIN, {"gateway": public_key, "name": name})

    def leave_gateway(self, public_key: bytes, reason: str) -> Vertex:
        """Retire a gateway for good (root key only); its later vertices are refused."""
        return self.append(GATEWAY_LEAVE, {"gateway": public_key, "reason": reason})

    def enroll_device(self, public_key: bytes, name: str, policy: str) -> Vertex:
        """Enroll a device. Idempotent: if it is enrolled already, returns the existing
        `device.enroll` vertex unchanged (its name and policy stay as first enrolled).

        A revoked device is refused (`DeviceRevoked`): re-admission needs a new key.
        """
        if isinstance(public_key, bytes) and self.is_revoked(public_key):
            raise DeviceRevoked(f"device {identity_id(public_key)} was revoked; re-admission needs a new key")
        existing = self._enroll_vertex(public_key)
        if existing is not None:
            return existing
        try:
            return self.append(DEVICE_ENROLL, {"device": public_key, "name": name, "policy": policy})
        except AlreadyEnrolled:  # another writer enrolled it between the two steps
            existing = self._enroll_vertex(public_key)
            assert existing is not None
            return existing

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
        self, round: int, strategy: str, base: bytes, inputs: list[bytes], output: bytes
    ) -> Vertex:
        """Record a round's new model (`output`) and the recorded updates it was built from."""
        body = {"round": round, "strategy": strategy, "base": base, "inputs": list(inputs), "output": output}
        return self.append(AGGREGATE, body)

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

    # --- queries ------------------------------------------------------------------------

    @property
    def is_initialized(self) -> bool:
        """True once the store holds a genesis vertex."""
        with self._read() as conn:
            return SqlState(conn).initialized

    def changed_elsewhere(self) -> bool:
        """True when another connection (an operator's `starling-ledger`) committed since the last call.

        SQLite's `data_version` moves only for other connections' commits: a cheap poll.
        """
        with self._read() as conn:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
        changed, self._data_version = version != getattr(self, "_data_version", None), version
        return changed

    @property
    def height(self) -> int:
        """The number of vertices."""
        with self._read() as conn:
            return conn.execute("SELECT count(*) FROM vertices").fetchone()[0]

    def tips(self) -> list[bytes]:
        """Ids of the vertices no other vertex names as a parent, sorted."""
        with self._read() as conn:
            return SqlState(conn).tips()

    def ids(self) -> list[bytes]:
        """Every vertex id in the DAG here, in canonical order (with ids kept only from a bootstrap)."""
        return [bytes.fromhex(v) for (v,) in self._read_all("SELECT id FROM vertices ORDER BY depth, id")]

    def holds(self, vertex_id: bytes) -> bool:
        """True if the vertex is in the DAG here (also when only its id is kept, before a bootstrap)."""
        with self._read() as conn:
            return SqlState(conn).has_vertex(vertex_id)

    def get(self, id: bytes) -> Vertex | None:  # noqa: A002 (the name callers use)
        """The vertex with this id, or None."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT id, data FROM vertices WHERE id = ? AND length(data) > 0", (id.hex(),)
            ).fetchone()
        return None if row is None else _decode_row(row[0], row[1])

    def vertices(self) -> Iterator[Vertex]:
        """Every vertex in the canonical order: by depth (longest path from genesis), ties by id.

        Fetched a page at a time without holding the lock between pages, so
        appends may go on meanwhile (they show up if they sort later).
        """
        return self._paged("", ())

    def vertices_of(self, *kinds: str) -> Iterator[Vertex]:
        """The vertices of the given kinds only, in the canonical order, paged like `vertices`.

        Chosen by the `kind` column, so the others (an updates vertex can be 100s of KB) are
        neither decoded nor read past their row header: an audit of aggregates and lineages
        costs what those vertices weigh. Vertices known only from a bootstrap have no bytes
        and are left out, as by `vertices`.
        """
        if not kinds:
            return iter(())
        return self._paged(f" AND kind IN ({','.join('?' * len(kinds))})", kinds)

    def _paged(self, condition: str, params: tuple[Any, ...]) -> Iterator[Vertex]:
        """The stored vertices matching `condition` (SQL to AND to the query), in canonical order, paged."""
        after: tuple[int, str] = (-1, "")
        while True:
            with self._read() as conn:
                rows = conn.execute(
                    f"SELECT depth, id, data FROM vertices WHERE (depth, id) > (?, ?){condition}"
                    " AND length(data) > 0 ORDER BY depth, id LIMIT ?",
                    (*after, *params, PAGE_ROWS),
                ).fetchall()
            if not rows:
                return
            for _depth, vid, data in rows:
                yield _decode_row(vid, data)
            after = (rows[-1][0], rows[-1][1])

    def enrolled_devices(self) -> dict[bytes, str]:
        """Active devices (enrolled and not revoked), in enrollment order: public key -> name."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT public_key, name FROM devices WHERE public_key NOT IN"
                " (SELECT public_key FROM revocations) ORDER BY n"
            ).fetchall()
        return {bytes.fromhex(key): name for key, name in rows}

    def is_enrolled(self, public_key: bytes) -> bool:
        """True if the device is active: enrolled and not revoked."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT 1 FROM devices WHERE public_key = :key"
                " AND NOT EXISTS (SELECT 1 FROM revocations WHERE public_key = :key)",
                {"key": public_key.hex()},
            ).fetchone()
        return row is not None

    def is_revoked(self, public_key: bytes) -> bool:
        """True if a device.revoke vertex names the device."""
        with self._read() as conn:
            return SqlState(conn).is_revoked(public_key)

    def revoked_devices(self) -> dict[bytes, str]:
        """Revoked devices, in enrollment order: public key -> the revocation's reason."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT r.public_key, r.reason FROM revocations r"
                " JOIN devices d ON d.public_key = r.public_key ORDER BY d.n"
            ).fetchall()
        return {bytes.fromhex(key): reason for key, reason in rows}

    def history(self, device_public_key: bytes) -> list[Vertex]:
        """The vertices that name a device, in order: its enrollment, the updates
        vertices with its records, its revocation."""
        with self._read() as conn:
            rows = conn.execute(
                """
                SELECT v.id, v.data FROM vertices v WHERE v.id IN (
                    SELECT vertex FROM devices WHERE public_key = :key
                    UNION ALL
                    SELECT vertex FROM revocations WHERE public_key = :key
                    UNION ALL
                    SELECT w.id FROM contributions c
                    JOIN devices d ON d.n = c.device
                    JOIN vertices w ON w.n = c.vertex
                    WHERE d.public_key = :key
                ) AND length(v.data) > 0 ORDER BY v.depth, v.id
                """,
                {"key": device_public_key.hex()},
            ).fetchall()
        return [_decode_row(vid, data) for vid, data in rows]

    def gateways(self) -> list[bytes]:
        """Public keys of the gateways that may write to this DAG now, sorted."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT public_key FROM gateways WHERE left_vertex IS NULL ORDER BY public_key"
            ).fetchall()
        return [bytes.fromhex(key) for (key,) in rows]

    @property
    def root(self) -> bytes | None:
        """The operator root key (genesis creator), or None before genesis."""
        with self._read() as conn:
            return SqlState(conn).root

    def version_vector(self) -> dict[str, int]:
        """For each creator (identity id): its highest seq here. Seqs are gap-free: each names the one before."""
        with self._read() as conn:
            return dict(conn.execute("SELECT creator, max(seq) FROM vertices GROUP BY creator ORDER BY creator"))

    def last_seq(self, creator_id: str) -> int:
        """The creator's highest seq here, -1 if none (one entry of `version_vector`, by index)."""
        with self._read() as conn:
            found = conn.execute("SELECT max(seq) FROM vertices WHERE creator = ?", (creator_id,)).fetchone()[0]
        return -1 if found is None else found

    def encoded_from(self, creator_id: str, first_seq: int, limit: int) -> list[bytes]:
        """Encoded vertices of one creator with seq >= first_seq, in seq order (all of an equivocating seq)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT data FROM vertices WHERE creator = ? AND seq >= ? AND length(data) > 0"
                " ORDER BY seq, id LIMIT ?",
                (creator_id, first_seq, limit),
            ).fetchall()
        return [data for (data,) in rows]

    def derived_state(self) -> dict[str, Any]:
        """The state every gateway must derive alike from the same DAG: members, devices, revocations,
        update records, equivocations (hex and plain values, sorted)."""
        with self._read() as conn:
            q = conn.execute
            return {
                "root": (SqlState(conn).root or b"").hex(),
                "gateways": q("SELECT public_key, vertex, left_vertex FROM gateways ORDER BY public_key").fetchall(),
                "devices": q("SELECT public_key, name, policy, vertex FROM devices ORDER BY public_key").fetchall(),
                "revocations": q("SELECT public_key, reason, vertex FROM revocations ORDER BY public_key").fetchall(),
                "updates": q("SELECT hex(u.digest), d.public_key, v.id FROM updates u JOIN devices d ON d.n = u.device"
                             " JOIN vertices v ON v.n = u.vertex ORDER BY 1, 2").fetchall(),
                "equivocations": q("SELECT creator, seq, vertex FROM equivocations ORDER BY 1, 2, 3").fetchall(),
            }

    def state_digest(self) -> str:
        """SHA-256 (hex, first 16) of `derived_state` and the canonical order: equal on gateways that agree."""
        import hashlib
        import json

        order = [v for (v,) in self._read_all("SELECT id FROM vertices ORDER BY depth, id")]
        doc = json.dumps({"state": self.derived_state(), "order": order}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    def _read_all(self, sql: str, *params: Any) -> list[tuple]:
        with self._read() as conn:
            return conn.execute(sql, params).fetchall()

    def update_records(self) -> dict[bytes, list[tuple[bytes, bytes, int]]]:
        """Update digest -> [(device public key, id of the updates vertex recording it, round)]."""
        found: dict[bytes, list[tuple[bytes, bytes, int]]] = {}
        for vertex in self.vertices_of(UPDATES):
            for device, digest, _, _ in vertex.body["records"]:
                found.setdefault(digest, []).append((device, vertex.id, vertex.body["round"]))
        return found

    def equivocators(self) -> dict[str, list[int]]:
        """Creators (identity ids) that signed two vertices with one seq -> those seqs."""
        with self._read() as conn:
            rows = conn.execute("SELECT DISTINCT creator, seq FROM equivocations ORDER BY creator, seq").fetchall()
        found: dict[str, list[int]] = {}
        for creator, seq in rows:
            found.setdefault(creator, []).append(seq)
        return found

    def finality(self) -> dict[str, Any]:
        """How much of the DAG is final: seen (descended from) by vertices of more than 2/3 of the gateways.

        {"height", "final", "lag" (vertices not final yet), "oldest_pending_s" (age of the oldest of them)}.
        """
        with self._read() as conn:
            mask, needed = _finality_rule(conn)
            groups = conn.execute("SELECT seen, count(*), min(time) FROM vertices GROUP BY seen").fetchall()
        height = final = 0
        oldest = None
        for seen, count, first in groups:
            height += count
            if (seen & mask).bit_count() >= needed:
                final += count
            elif oldest is None or first < oldest:
                oldest = first
        return {"height": height, "final": final, "lag": height - final,
                "oldest_pending_s": 0.0 if oldest is None else round(max(0.0, time.time() - oldest), 3)}

    def is_final(self, vertex_id: bytes) -> bool:
        """True once vertices of more than two thirds of the member gateways descend from this vertex."""
        with self._read() as conn:
            mask, needed = _finality_rule(conn)
            seen = conn.execute("SELECT seen FROM vertices WHERE id = ?", (vertex_id.hex(),)).fetchone()
        return seen is not None and (seen[0] & mask).bit_count() >= needed

    def kind_counts(self) -> dict[str, int]:
        """Number of vertices of each kind."""
        with self._read() as conn:
            return dict(
                conn.execute("SELECT kind, count(*) FROM vertices GROUP BY kind ORDER BY kind").fetchall()
            )

    def _enroll_vertex(self, public_key: bytes) -> Vertex | None:
        if not isinstance(public_key, bytes):
            return None  # not a key at all: append's schema check names the problem
        with self._read() as conn:
            row = conn.execute(
                "SELECT vertex FROM devices WHERE public_key = ?", (public_key.hex(),)
            ).fetchone()
        return None if row is None else self.get(bytes.fromhex(row[0]))


def _finality_rule(conn: sqlite3.Connection) -> tuple[int, int]:
    """(bits of the current members, how many of them make a vertex final: more than two thirds)."""
    members = [idx for (idx,) in conn.execute("SELECT idx FROM gateways WHERE left_vertex IS NULL")]
    return sum(1 << i for i in members), (2 * len(members)) // 3 + 1


def _decode_row(vertex_id: str, data: Any) -> Vertex:
    """Decode a stored vertex; a row that does not decode means the file is damaged."""
    try:
        return Vertex.decode(data)
    except ProtocolError as exc:
        raise StoreError(
            f"stored vertex {vertex_id} is damaged ({exc}); run `starling-ledger verify`"
        ) from exc


class SqlState:
    """`ledger.state.State` over the store's tables, inside the caller's transaction.

    `everything_precedes` is set for this gateway's own appends: their parents are all the
    tips, so every stored vertex is in their past and no ancestry walk is needed.
    """

    def __init__(self, conn: sqlite3.Connection, everything_precedes: bool = False) -> None:
        self.conn = conn
        self.everything_precedes = everything_precedes

    def _exists(self, sql: str, *params: Any) -> bool:
        return self.conn.execute(sql, params).fetchone() is not None

    def _one(self, sql: str, *params: Any) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    @property
    def initialized(self) -> bool:
        return self.root is not None

    @property
    def root(self) -> bytes | None:
        return self._one("SELECT value FROM meta WHERE key = 'root'")

    def has_vertex(self, vertex_id: bytes) -> bool:
        return self._exists("SELECT 1 FROM vertices WHERE id = ?", vertex_id.hex())

    def last_of(self, creator: bytes) -> tuple[int, bytes] | None:
        row = self.conn.execute(
            "SELECT seq, id FROM vertices WHERE creator = ? ORDER BY seq DESC, id LIMIT 1",
            (identity_id(creator),),
        ).fetchone()
        return None if row is None else (row[0], bytes.fromhex(row[1]))

    def vertices_at(self, creator: bytes, seq: int) -> list[bytes]:
        rows = self.conn.execute("SELECT id FROM vertices WHERE creator = ? AND seq = ?", (identity_id(creator), seq))
        return [bytes.fromhex(vid) for (vid,) in rows]

    def precedes(self, earlier: bytes, vertex: Vertex) -> bool:
        if self.everything_precedes:
            return self.has_vertex(earlier)
        row = self.conn.execute("SELECT n, depth FROM vertices WHERE id = ?", (earlier.hex(),)).fetchone()
        if row is None:
            return False
        target, floor = row
        parents = [p.hex() for p in vertex.parents]
        marks = ",".join("?" * len(parents))
        # Walk up from the parents, never below the target's depth: only deeper vertices can lead to it.
        found = self.conn.execute(
            f"""
            WITH RECURSIVE up(n) AS (
                SELECT n FROM vertices WHERE id IN ({marks}) AND depth >= ?
                UNION
                SELECT e.parent FROM edges e JOIN up ON e.child = up.n
                JOIN vertices p ON p.n = e.parent WHERE p.depth >= ?
            ) SELECT 1 FROM up WHERE n = ? LIMIT 1
            """,
            (*parents, floor, floor, target),
        ).fetchone()
        return found is not None

    def tips(self) -> list[bytes]:
        return [bytes.fromhex(vid) for (vid,) in self.conn.execute("SELECT id FROM tips ORDER BY id")]

    def past_of(self, vertex: Vertex) -> list[Vertex] | None:
        parents = [p.hex() for p in vertex.parents]
        marks = ",".join("?" * len(parents))
        rows = self.conn.execute(
            f"""
            WITH RECURSIVE up(n) AS (
                SELECT n FROM vertices WHERE id IN ({marks})
                UNION
                SELECT e.parent FROM edges e JOIN up ON e.child = up.n
            ) SELECT v.data FROM vertices v JOIN up ON v.n = up.n ORDER BY v.depth, v.id
            """,
            parents,
        ).fetchall()
        if any(not data for (data,) in rows):  # pruned by a bootstrap: the state before it is not here
            return None
        return [Vertex.decode(data) for (data,) in rows]

    def is_gateway(self, public_key: bytes) -> bool:
        return self._exists("SELECT 1 FROM gateways WHERE public_key = ? AND left_vertex IS NULL", public_key.hex())

    def bootstrap(self, doc: dict[str, Any], genesis: Vertex, mask: int) -> None:
        """Fill the tables from a checked snapshot (see Ledger.bootstrap)."""
        ids = [row[0].hex() for row in doc["vertices"]]
        self.conn.execute("INSERT INTO meta (key, value) VALUES ('root', ?)", (doc["root"],))
        self.conn.executemany(
            "INSERT INTO vertices (id, n, creator, seq, kind, time, depth, seen, data) VALUES (?, ?, ?, ?, ?, 0.0, ?, ?, ?)",
            [(ids[i], i, identity_id(creator), seq, kind, depth, mask, genesis.encode() if i == 0 else b"")
             for i, (_, depth, creator, seq, kind) in enumerate(doc["vertices"])],
        )
        self.conn.executemany("INSERT INTO tips (id) VALUES (?)", [(ids[i],) for i in doc["tips"]])
        self.conn.executemany(
            "INSERT INTO gateways (public_key, id, vertex, idx, left_vertex) VALUES (?, ?, ?, ?, ?)",
            [(key.hex(), identity_id(key), ids[admitted], idx, None if left is None else ids[left])
             for idx, (key, admitted, left) in enumerate(doc["members"])],
        )
        self.conn.executemany(
            "INSERT INTO devices (n, public_key, id, name, policy, vertex) VALUES (?, ?, ?, ?, ?, ?)",
            [(i, key.hex(), identity_id(key), name, policy, ids[vertex])
             for i, (key, name, policy, vertex) in enumerate(doc["devices"])],
        )
        keys = [row[0] for row in doc["devices"]]
        self.conn.executemany(
            "INSERT INTO revocations (public_key, reason, vertex) VALUES (?, ?, ?)",
            [(keys[device].hex(), reason, ids[vertex]) for device, reason, vertex in doc["revocations"]],
        )
        self.conn.executemany("INSERT INTO updates (digest, device, vertex) VALUES (?, ?, ?)",
                              [(digest, device, vertex) for digest, device, vertex in doc["records"]])
        self.conn.executemany("INSERT OR IGNORE INTO contributions (device, vertex) VALUES (?, ?)",
                              [(device, vertex) for _, device, vertex in doc["records"]])
        for creator, seq in doc["equivocations"]:
            self.conn.execute(
                "INSERT OR IGNORE INTO equivocations (creator, seq, vertex) SELECT creator, seq, id FROM vertices"
                " WHERE creator = ? AND seq = ?", (identity_id(creator), seq))

    def keep_snapshot(self, vertex: Vertex, snapshot: bytes) -> None:
        self.conn.execute("INSERT OR REPLACE INTO snapshots (vertex, data) VALUES (?, ?)", (vertex.id_hex, snapshot))
        self.conn.execute(
            "DELETE FROM snapshots WHERE vertex NOT IN (SELECT s.vertex FROM snapshots s JOIN vertices v"
            " ON v.id = s.vertex ORDER BY v.depth DESC, v.id DESC LIMIT ?)",
            (KEEP_SNAPSHOTS,),
        )

    def departure_of(self, public_key: bytes) -> bytes | None:
        left = self._one("SELECT left_vertex FROM gateways WHERE public_key = ?", public_key.hex())
        return None if left is None else bytes.fromhex(left)

    def member_count_ever(self) -> int:
        return self._one("SELECT count(*) FROM gateways")

    def enrollment_of(self, public_key: bytes) -> bytes | None:
        found = self._one("SELECT vertex FROM devices WHERE public_key = ?", public_key.hex())
        return None if found is None else bytes.fromhex(found)

    def revocation_of(self, public_key: bytes) -> bytes | None:
        found = self._one("SELECT vertex FROM revocations WHERE public_key = ?", public_key.hex())
        return None if found is None else bytes.fromhex(found)

    def is_enrolled(self, public_key: bytes) -> bool:
        return self._exists("SELECT 1 FROM devices WHERE public_key = ?", public_key.hex())

    def is_revoked(self, public_key: bytes) -> bool:
        return self._exists("SELECT 1 FROM revocations WHERE public_key = ?", public_key.hex())

    def has_update(self, digest: bytes) -> bool:
        return self._exists("SELECT 1 FROM updates WHERE digest = ? LIMIT 1", digest)

    def record_of(self, device: bytes, digest: bytes) -> bytes | None:
        found = self._one(
            "SELECT v.id FROM updates u JOIN devices d ON d.n = u.device JOIN vertices v ON v.n = u.vertex"
            " WHERE u.digest = ? AND d.public_key = ?",
            digest,
            device.hex(),
        )
        return None if found is None else bytes.fromhex(found)

    def _earlier(self, new_id: str, old_id: str) -> bool:
        """True if vertex `new_id` comes before `old_id` in the canonical order (depth, id)."""
        rows = dict(self.conn.execute("SELECT id, depth FROM vertices WHERE id IN (?, ?)", (new_id, old_id)))
        return (rows[new_id], new_id) < (rows[old_id], old_id)

    def add_vertex(self, vertex: Vertex) -> None:
        parents = [p.hex() for p in vertex.parents]
        marks = ",".join("?" * len(parents))
        depth = 0
        if parents:
            depth = self._one(f"SELECT max(depth) FROM vertices WHERE id IN ({marks})", *parents) + 1
        if vertex.kind == GENESIS:
            self.conn.execute("INSERT INTO meta (key, value) VALUES ('root', ?)", (vertex.creator,))
        n = self._one("SELECT coalesce(max(n) + 1, 0) FROM vertices")
        equivocation = self.vertices_at(vertex.creator, vertex.seq)
        self.conn.execute(
            "INSERT INTO vertices (id, n, creator, seq, kind, time, depth, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (vertex.id_hex, n, vertex.creator_id, vertex.seq, vertex.kind, vertex.time, depth, vertex.encode()),
        )
        if equivocation:  # kept as evidence, both (or all) of them
            self.conn.executemany(
                "INSERT OR IGNORE INTO equivocations (creator, seq, vertex) VALUES (?, ?, ?)",
                [(vertex.creator_id, vertex.seq, v.hex()) for v in [*equivocation, vertex.id]],
            )
        if parents:
            self.conn.execute(
                f"INSERT INTO edges (child, parent) SELECT ?, n FROM vertices WHERE id IN ({marks})", (n, *parents)
            )
            self.conn.execute(f"DELETE FROM tips WHERE id IN ({marks})", parents)
        self.conn.execute("INSERT INTO tips (id) VALUES (?)", (vertex.id_hex,))
        self._mark_seen(vertex, n)

    def _mark_seen(self, vertex: Vertex, n: int) -> None:
        """The creator (a gateway) has now seen this vertex and all its ancestors: set its bit on them.

        Each (vertex, gateway) bit is set once, so this costs O(vertices x gateways) over a ledger's life.
        """
        idx = self._one("SELECT idx FROM gateways WHERE public_key = ?", vertex.creator.hex())
        if idx is None:
            return
        bit = 1 << idx
        self.conn.execute(
            """
            WITH RECURSIVE up(n) AS (
                SELECT ?
                UNION
                SELECT e.parent FROM edges e JOIN up ON e.child = up.n
                JOIN vertices p ON p.n = e.parent WHERE (p.seen & ?) = 0
            ) UPDATE vertices SET seen = seen | ? WHERE n IN (SELECT n FROM up)
            """,
            (n, bit, bit),
        )

    def add_gateways(self, vertex: Vertex, public_keys: list[bytes]) -> None:
        for key in public_keys:
            self.conn.execute(
                "INSERT OR IGNORE INTO gateways (public_key, id, vertex, idx)"
                " VALUES (?, ?, ?, (SELECT count(*) FROM gateways))",
                (key.hex(), identity_id(key), vertex.id_hex),
            )

    def remove_gateway(self, vertex: Vertex, public_key: bytes) -> None:
        self.conn.execute(
            "UPDATE gateways SET left_vertex = ? WHERE public_key = ? AND left_vertex IS NULL",
            (vertex.id_hex, public_key.hex()),
        )

    def add_device(self, vertex: Vertex, public_key: bytes, name: str, policy: str) -> None:
        existing = self._one("SELECT vertex FROM devices WHERE public_key = ?", public_key.hex())
        if existing is None:
            self.conn.execute(
                "INSERT INTO devices (public_key, id, name, policy, vertex) VALUES (?, ?, ?, ?, ?)",
                (public_key.hex(), identity_id(public_key), name, policy, vertex.id_hex),
            )
        elif self._earlier(vertex.id_hex, existing):  # concurrent enrollments: the canonically first one counts
            self.conn.execute(
                "UPDATE devices SET name = ?, policy = ?, vertex = ? WHERE public_key = ?",
                (name, policy, vertex.id_hex, public_key.hex()),
            )

    def add_revocation(self, vertex: Vertex, public_key: bytes, reason: str) -> None:
        existing = self._one("SELECT vertex FROM revocations WHERE public_key = ?", public_key.hex())
        if existing is None:
            self.conn.execute(
                "INSERT INTO revocations (public_key, reason, vertex) VALUES (?, ?, ?)",
                (public_key.hex(), reason, vertex.id_hex),
            )
        elif self._earlier(vertex.id_hex, existing):
            self.conn.execute(
                "UPDATE revocations SET reason = ?, vertex = ? WHERE public_key = ?",
                (reason, vertex.id_hex, public_key.hex()),
            )

    def add_updates(self, vertex: Vertex, records: list[tuple[bytes, bytes]]) -> None:
        n = self._one("SELECT n FROM vertices WHERE id = ?", vertex.id_hex)
        handles = {}
        for device, _ in records:
            if device not in handles:
                row = self.conn.execute(
                    "SELECT n FROM devices WHERE public_key = ?", (device.hex(),)
                ).fetchone()
                if row is None:  # the kind rules refuse unknown devices before this runs
                    raise LedgerError(f"device {identity_id(device)} vanished mid-transaction")
                handles[device] = row[0]
        # A record both this and a concurrent vertex hold stays with the canonically first of them.
        self.conn.executemany(
            """
            INSERT INTO updates (digest, device, vertex) VALUES (?, ?, ?)
            ON CONFLICT (digest, device) DO UPDATE SET vertex = excluded.vertex
            WHERE (SELECT depth, id FROM vertices WHERE n = excluded.vertex)
                < (SELECT depth, id FROM vertices WHERE n = updates.vertex)
            """,
            [(digest, handles[device], n) for device, digest in records],
        )
        self.conn.executemany(
            "INSERT OR IGNORE INTO contributions (device, vertex) VALUES (?, ?)",
            [(handle, n) for handle in handles.values()],
        )
