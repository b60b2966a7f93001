"""The ledger file: its tables, how a connection to it is opened, and how an older one is upgraded.

The `vertices` table is the ledger: each row keeps a vertex's full encoded
bytes (signature included) next to a few columns for queries. Everything
else is derived state, rebuilt from vertices alone and updated in the same
transaction as the vertex that changes it (`ledger.sql_state`):

    meta           the root key; where a bootstrapped store started (checkpoint and its snapshot); whether
                   every enrollment is indexed (`_index_enrollments`)
    vertices       id (hex), n, creator (identity id), seq, kind, time, depth, seen, data
                   (data is empty for vertices known only from a bootstrap snapshot)
    edges          (child n, parent n): ancestry walks for the causal rules and finality
    tips           ids of vertices nobody names as a parent yet
    gateways       every gateway key ever admitted: key, the gateway id it writes under (its own, or
                   its first key's after a rotation), admitting vertex, finality bit (idx), leave vertex
    equivocations  (creator, seq, vertex) for every creator that signed two vertices with one seq
    snapshots      the snapshots of the newest checkpoints, served to gateways that bootstrap
    devices        enrolled devices, revoked since or not: public key, id, name, policy, enroll vertex
    revocations    revoked devices: public key, reason, revoke vertex
    updates        (update digest, device) -> updates vertex; answers "is this input recorded?"
    contributions  (device, vertex) pairs; answers "which vertices name this device?": its updates
                   vertices and every device.enroll vertex naming it (the table is older than the
                   `contributions` kind of vertex and has nothing to do with it)

`updates` and `contributions` hold one row per update record, so they refer
to devices and vertices by small integer handles (`devices.n`,
`vertices.n`) rather than hex: a handle is 1-3 bytes on disk, an id 64.
`n` is an explicit column because SQLite may renumber implicit rowids on
VACUUM.

The canonical order of vertices is (depth, id): depth is the longest path
from genesis, so every parent comes before its children, and every gateway
derives the same order from the same DAG. `seen` holds one bit per gateway
(`gateways.idx`), set on a vertex and all its ancestors when that gateway's
vertex arrives: a vertex is final once more than two thirds of the members'
bits are set.

The SQLite header marks the file: `application_id` says it is a Starling
ledger and `user_version` is `SCHEMA_VERSION`. A schema change bumps the
version, and the first writer that opens an older file rebuilds every
derived table from the vertices (the vertices' bytes never change), so there
is one upgrade path whatever the version was. Rows a table gained without a
schema change (every enrollment in `contributions`, not only the first, since
a device may be enrolled once per gateway) are filled in by the first writer
that opens the file (`_index_enrollments`), so readers of any file of this
version keep working. Readers (`read_only`, the
auditor) refuse an older file rather than read tables it lacks. This is why
the version is the header's `user_version` and not a sqlite-utils
`Migrations` table: a read-only opener can check it without a table, and an
audited file holds nothing but the ledger.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlite_utils import Database

from .errors import StoreError
from .kind_rules import apply
from .kinds import DEVICE_ENROLL
from .sql_state import SqlState
from .vertex import Vertex

SCHEMA_VERSION = 3  # 2 added revocations; 3 added membership, edges, seen bits, equivocations (rebuilt)
APPLICATION_ID = 0x53544C47  # "STLG" in the SQLite header: marks the file as a Starling ledger
BUSY_TIMEOUT_S = 10.0
ENROLLMENTS_INDEXED = "enrollments_indexed"  # meta key: every enrollment vertex is in `contributions`

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

    An older file is upgraded by the first writer that opens it (`create_or_upgrade`).
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


def create_or_upgrade(db: Database, path: Path) -> None:
    """Make an empty file a ledger, or bring a ledger of an older schema up to date.

    Runs inside the caller's write transaction. Another application's database is refused before
    anything changes; a newer schema is left alone for `check_schema` to refuse.
    """
    if db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if 1 <= version < SCHEMA_VERSION:
            _rebuild(db)
        elif version == SCHEMA_VERSION:
            _index_enrollments(db)
        return
    if db.execute("PRAGMA user_version").fetchone()[0] != 0 or db.table_names():
        raise StoreError(f"{path} is an SQLite database of something else")
    db.executescript(SCHEMA)  # in a transaction sqlite-utils runs it statement by statement, without a commit
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    db.execute("INSERT INTO meta (key, value) VALUES (?, 1)", (ENROLLMENTS_INDEXED,))


def _index_enrollments(db: Database) -> None:
    """Index every stored enrollment vertex under its device, once per file (a file written before a device
    could be enrolled once per gateway indexed none: its concurrent duplicates are found here)."""
    if db.execute("SELECT 1 FROM meta WHERE key = ?", (ENROLLMENTS_INDEXED,)).fetchone() is not None:
        return
    state = SqlState(db.conn)
    rows = db.execute("SELECT data FROM vertices WHERE kind = ? AND length(data) > 0", (DEVICE_ENROLL,)).fetchall()
    for (data,) in rows:
        vertex = Vertex.decode(data)
        state.note_enrollment(vertex, vertex.body["device"])
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, 1)", (ENROLLMENTS_INDEXED,))


def _rebuild(db: Database) -> None:
    """Re-derive every table from the vertices alone: the vertices are the ledger, the rest follows."""
    rows = db.execute("SELECT data FROM vertices ORDER BY depth, id").fetchall()
    for table in db.table_names():
        db[table].drop()
    db.executescript(SCHEMA)
    state = SqlState(db.conn)
    for (data,) in rows:
        apply(Vertex.decode(data), state)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, 1)", (ENROLLMENTS_INDEXED,))
