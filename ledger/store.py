"""One gateway's copy of the ledger DAG, in SQLite (sqlite-utils, WAL mode).

The `vertices` table is the ledger: each row keeps a vertex's full encoded
bytes (signature included) next to a few columns for queries. Everything
else is derived state, rebuilt from vertices alone and updated in the same
transaction as the vertex that changes it:

    vertices       id (hex), n, creator (identity id), seq, kind, time, depth, data
    tips           ids of vertices nobody names as a parent yet
    gateways       public keys named by genesis
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
derives the same order from the same DAG.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlite_utils import Database

from protocol.errors import ProtocolError
from protocol.keys import Identity, identity_id

from . import validate
from .errors import AlreadyEnrolled, DeviceRevoked, InvalidVertex, LedgerError, NoIdentity, StoreError
from .kinds import AGGREGATE, DEVICE_ENROLL, DEVICE_REVOKE, GENESIS, UPDATES
from .vertex import Vertex, sign

SCHEMA_VERSION = 2  # 2 added the revocations table
APPLICATION_ID = 0x53544C47  # "STLG" in the SQLite header: marks the file as a Starling ledger
BUSY_TIMEOUT_S = 10.0
PAGE_ROWS = 32  # vertices fetched per query while iterating; an updates vertex can be 100s of KB

SCHEMA = """
CREATE TABLE vertices (
    id TEXT PRIMARY KEY,
    n INTEGER NOT NULL UNIQUE,
    creator TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    depth INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE UNIQUE INDEX vertices_creator_seq ON vertices (creator, seq);
CREATE INDEX vertices_order ON vertices (depth, id);
CREATE TABLE tips (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE gateways (public_key TEXT PRIMARY KEY, id TEXT NOT NULL, vertex TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE devices (
    n INTEGER PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    policy TEXT NOT NULL,
    vertex TEXT NOT NULL
);
CREATE TABLE updates (
    digest BLOB NOT NULL,
    device INTEGER NOT NULL,
    vertex INTEGER NOT NULL,
    PRIMARY KEY (digest, device)
) WITHOUT ROWID;
CREATE TABLE contributions (
    device INTEGER NOT NULL,
    vertex INTEGER NOT NULL,
    PRIMARY KEY (device, vertex)
) WITHOUT ROWID;
"""

REVOCATIONS = """
CREATE {temp}TABLE revocations (
    public_key TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    vertex TEXT NOT NULL
) WITHOUT ROWID;
"""

# What each schema version added to the one before. A writer upgrades an older file in
# place; a read-only reader gives itself empty TEMP tables instead, which is what they
# would hold (an older file cannot have vertices of a kind its code did not know).
ADDED_IN = {2: REVOCATIONS}
SCHEMA += "".join(ADDED_IN[v].format(temp="") for v in sorted(ADDED_IN))

TABLES = frozenset({"vertices", "tips", "gateways", "devices", "revocations", "updates", "contributions"})


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
    """Raise StoreError unless the file holds a ledger of a schema this code knows.

    For a file of an older version (only ever met read-only: a writer upgrades
    it first), add the tables it lacks as empty TEMP tables on `conn`, so every
    query reads it as the current schema.
    """
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id != APPLICATION_ID:
        raise StoreError("not a Starling ledger (SQLite application_id does not match)")
    if not 1 <= version <= SCHEMA_VERSION:
        raise StoreError(f"ledger schema version {version}; this code reads versions 1 to {SCHEMA_VERSION}")
    for added in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute(ADDED_IN[added].format(temp="TEMP "))


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
                    for added in range(version + 1, SCHEMA_VERSION + 1):
                        self.db.executescript(ADDED_IN[added].format(temp=""))
                    self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                return
            if self._conn.execute("PRAGMA user_version").fetchone()[0] != 0 or self.db.table_names():
                raise StoreError(f"{self.path} is an SQLite database of something else")
            self.db.executescript(SCHEMA)
            self._conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self, require_identity: bool = True) -> Iterator[SqlState]:
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
                yield SqlState(self._conn)
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
        """Write the genesis vertex naming the DAG and its gateways (sorted, deduplicated).

        Only on an empty store (else AlreadyInitialized), and this ledger's
        identity must be one of the gateways (else NotAGateway).
        """
        try:
            keys = sorted(set(gateways))
        except TypeError:  # not a list of bytes: let the schema check say what is wrong
            keys = gateways
        return self.append(GENESIS, {"name": name, "gateways": keys})

    def append(self, kind: str, body: dict[str, Any]) -> Vertex:
        """Sign a vertex of `kind` as this gateway and store it, in one transaction.

        seq is this gateway's last seq + 1; parents are its previous vertex
        plus the current tips; time is now. The vertex passes every rule of
        `ledger.validate` before anything is written.
        """
        with self._write() as state:
            assert self.identity is not None  # _write checked
            last = state.last_of(self.identity.public_key)
            parents = set(state.tips())
            if last is not None:
                parents.add(last[1])
            try:
                vertex = sign(self.identity, kind, 0 if last is None else last[0] + 1, sorted(parents), body)
            except ProtocolError as exc:
                raise InvalidVertex(str(exc)) from exc
            validate.admit(vertex, state)
        return vertex

    def insert_vertex(self, vertex: Vertex) -> bool:
        """Store a vertex created elsewhere, under the same rules as `append`.

        Returns False (and changes nothing) if the store has it already.
        Its parents must be here already; waiting for missing ones is the
        gossip layer's job.
        """
        with self._write(require_identity=False) as state:
            if state.has_vertex(vertex.id):
                return False
            validate.admit(vertex, state)
        return True

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
        self, gateway: str, round: int, task: str, base: bytes, records: list[tuple[bytes, bytes, int, bytes]]
    ) -> Vertex:
        """Record a batch of accepted updates: (device public key, update digest, examples, device signature).

        `gateway` must be this gateway's id (the `ctx.gateway` the devices
        signed). Every device must be enrolled, every signature valid, and no
        (device, digest) recorded before; otherwise nothing is written.
        """
        rows = [list(r) if isinstance(r, list | tuple) else r for r in records]
        return self.append(
            UPDATES, {"gateway": gateway, "round": round, "task": task, "base": base, "records": rows}
        )

    def record_aggregate(
        self, round: int, strategy: str, base: bytes, inputs: list[bytes], output: bytes
    ) -> Vertex:
        """Record a round's new model (`output`) and the recorded updates it was built from."""
        body = {"round": round, "strategy": strategy, "base": base, "inputs": list(inputs), "output": output}
        return self.append(AGGREGATE, body)

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

    def get(self, id: bytes) -> Vertex | None:  # noqa: A002 (the name callers use)
        """The vertex with this id, or None."""
        with self._read() as conn:
            row = conn.execute("SELECT id, data FROM vertices WHERE id = ?", (id.hex(),)).fetchone()
        return None if row is None else _decode_row(row[0], row[1])

    def vertices(self) -> Iterator[Vertex]:
        """Every vertex in the canonical order: by depth (longest path from genesis), ties by id.

        Fetched a page at a time without holding the lock between pages, so
        appends may go on meanwhile (they show up if they sort later).
        """
        after: tuple[int, str] = (-1, "")
        while True:
            with self._read() as conn:
                rows = conn.execute(
                    "SELECT depth, id, data FROM vertices WHERE (depth, id) > (?, ?)"
                    " ORDER BY depth, id LIMIT ?",
                    (*after, PAGE_ROWS),
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
                ) ORDER BY v.depth, v.id
                """,
                {"key": device_public_key.hex()},
            ).fetchall()
        return [_decode_row(vid, data) for vid, data in rows]

    def gateways(self) -> list[bytes]:
        """Public keys of the gateways that may write to this DAG, sorted."""
        with self._read() as conn:
            rows = conn.execute("SELECT public_key FROM gateways ORDER BY public_key").fetchall()
        return [bytes.fromhex(key) for (key,) in rows]

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


def _decode_row(vertex_id: str, data: Any) -> Vertex:
    """Decode a stored vertex; a row that does not decode means the file is damaged."""
    try:
        return Vertex.decode(data)
    except ProtocolError as exc:
        raise StoreError(
            f"stored vertex {vertex_id} is damaged ({exc}); run `starling-ledger verify`"
        ) from exc


class SqlState:
    """`ledger.state.State` over the store's tables, inside the caller's transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def _exists(self, sql: str, *params: Any) -> bool:
        return self.conn.execute(sql, params).fetchone() is not None

    @property
    def initialized(self) -> bool:
        return self._exists("SELECT 1 FROM gateways LIMIT 1")

    def has_vertex(self, vertex_id: bytes) -> bool:
        return self._exists("SELECT 1 FROM vertices WHERE id = ?", vertex_id.hex())

    def last_of(self, creator: bytes) -> tuple[int, bytes] | None:
        row = self.conn.execute(
            "SELECT seq, id FROM vertices WHERE creator = ? ORDER BY seq DESC LIMIT 1",
            (identity_id(creator),),
        ).fetchone()
        return None if row is None else (row[0], bytes.fromhex(row[1]))

    def tips(self) -> list[bytes]:
        return [bytes.fromhex(vid) for (vid,) in self.conn.execute("SELECT id FROM tips ORDER BY id")]

    def is_gateway(self, public_key: bytes) -> bool:
        return self._exists("SELECT 1 FROM gateways WHERE public_key = ?", public_key.hex())

    def is_enrolled(self, public_key: bytes) -> bool:
        return self._exists("SELECT 1 FROM devices WHERE public_key = ?", public_key.hex())

    def is_revoked(self, public_key: bytes) -> bool:
        return self._exists("SELECT 1 FROM revocations WHERE public_key = ?", public_key.hex())

    def has_update(self, digest: bytes) -> bool:
        return self._exists("SELECT 1 FROM updates WHERE digest = ? LIMIT 1", digest)

    def has_record(self, device: bytes, digest: bytes) -> bool:
        return self._exists(
            "SELECT 1 FROM updates u JOIN devices d ON d.n = u.device"
            " WHERE u.digest = ? AND d.public_key = ?",
            digest,
            device.hex(),
        )

    def add_vertex(self, vertex: Vertex) -> None:
        parents = [p.hex() for p in vertex.parents]
        marks = ",".join("?" * len(parents))
        if parents:
            deepest = self.conn.execute(
                f"SELECT max(depth) FROM vertices WHERE id IN ({marks})", parents
            ).fetchone()[0]
            depth = deepest + 1
        else:
            depth = 0
        self.conn.execute(
            """
            INSERT INTO vertices (id, n, creator, seq, kind, time, depth, data)
            VALUES (?, (SELECT coalesce(max(n) + 1, 0) FROM vertices), ?, ?, ?, ?, ?, ?)
            """,
            (vertex.id_hex, vertex.creator_id, vertex.seq, vertex.kind, vertex.time, depth, vertex.encode()),
        )
        if parents:
            self.conn.execute(f"DELETE FROM tips WHERE id IN ({marks})", parents)
        self.conn.execute("INSERT INTO tips (id) VALUES (?)", (vertex.id_hex,))

    def add_gateways(self, vertex: Vertex, public_keys: list[bytes]) -> None:
        self.conn.executemany(
            "INSERT OR IGNORE INTO gateways (public_key, id, vertex) VALUES (?, ?, ?)",
            [(key.hex(), identity_id(key), vertex.id_hex) for key in public_keys],
        )

    def add_device(self, vertex: Vertex, public_key: bytes, name: str, policy: str) -> None:
        self.conn.execute(
            "INSERT INTO devices (public_key, id, name, policy, vertex) VALUES (?, ?, ?, ?, ?)",
            (public_key.hex(), identity_id(public_key), name, policy, vertex.id_hex),
        )

    def add_revocation(self, vertex: Vertex, public_key: bytes, reason: str) -> None:
        self.conn.execute(
            "INSERT INTO revocations (public_key, reason, vertex) VALUES (?, ?, ?)",
            (public_key.hex(), reason, vertex.id_hex),
        )

    def add_updates(self, vertex: Vertex, records: list[tuple[bytes, bytes]]) -> None:
        n = self.conn.execute("SELECT n FROM vertices WHERE id = ?", (vertex.id_hex,)).fetchone()[0]
        handles = {}
        for device, _ in records:
            if device not in handles:
                row = self.conn.execute(
                    "SELECT n FROM devices WHERE public_key = ?", (device.hex(),)
                ).fetchone()
                if row is None:  # the kind rules refuse unknown devices before this runs
                    raise LedgerError(f"device {identity_id(device)} vanished mid-transaction")
                handles[device] = row[0]
        self.conn.executemany(
            "INSERT INTO updates (digest, device, vertex) VALUES (?, ?, ?)",
            [(digest, handles[device], n) for device, digest in records],
        )
        self.conn.executemany(
            "INSERT OR IGNORE INTO contributions (device, vertex) VALUES (?, ?)",
            [(handle, n) for handle in handles.values()],
        )
