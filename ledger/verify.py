"""Offline audit of a ledger file: re-check every vertex from its stored bytes alone.

`verify_store` opens the SQLite file read-only and walks the vertices in
the canonical order, trusting none of the derived tables. For each vertex:
the blob decodes strictly, it hashes to the id it is stored under, the
stored columns match it, the creator's signature verifies, and it passes
the same rules the store enforced when it was written (`ledger.validate`),
against a state rebuilt in memory from the vertices before it. Then, if
every vertex passed, the derived tables must agree with that state, and
SQLite's own integrity check must pass.

A vertex that fails is not applied, so its dependents may fail too; the
report names the first failure in order, which is the one to look at.
Nothing here raises on a damaged file: every failure becomes a `Problem`.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import ProtocolError
from protocol.keys import identity_id

from . import validate
from .errors import LedgerError
from .kind_rules import apply
from .schema import check_schema, connect
from .state import MemoryState, depth_of
from .vertex import Vertex

MAX_PROBLEMS = 100


@dataclass(frozen=True)
class Problem:
    """One thing wrong: with the stored id of the vertex it concerns, or None for the file as a whole."""

    vertex: str | None
    reason: str  # short snake_case key
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class VerifyReport:
    """The verdict on one ledger file. `bad_vertex` and `reason` describe the first problem."""

    ok: bool
    checked: int  # vertices examined
    bad_vertex: str | None = None
    reason: str | None = None
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_store(path: str | Path) -> VerifyReport:
    """Verify the ledger at `path` without writing to it. Never raises for a bad file."""
    problems: list[Problem] = []
    checked = 0
    path = Path(path)
    if not path.is_file():
        problems.append(Problem(None, "missing", f"{path} is not a file"))
        return _report(0, problems)
    try:
        conn = connect(path, read_only=True)
    except sqlite3.Error as exc:
        problems.append(Problem(None, "sqlite", f"cannot open {path}: {exc}"))
        return _report(0, problems)
    try:
        check_schema(conn)

        def load(vertex_id: bytes) -> Vertex:
            row = conn.execute("SELECT data FROM vertices WHERE id = ?", (vertex_id.hex(),)).fetchone()
            return Vertex.decode(row[0])

        state = MemoryState(loader=load)
        skip: set[str] = set()
        start = _bootstrap_start(conn, load)
        if isinstance(start, Problem):
            problems.append(start)
            return _report(0, problems)
        if start is not None:  # the store began at a checkpoint: audit from the state it committed to
            state, skip = start
        rows = conn.execute(
            "SELECT id, creator, seq, kind, time, depth, data FROM vertices ORDER BY depth, id"
        )
        for row in rows:
            if row[0] in skip:
                continue
            checked += 1
            problem = _check_row(row, state)
            if problem is not None:
                problems.append(problem)
        if not problems:
            problems.extend(_check_derived(conn, state))
        problems.extend(_check_sqlite(conn))
    except LedgerError as exc:
        problems.append(Problem(None, exc.reason, exc.detail))
    except sqlite3.Error as exc:
        problems.append(Problem(None, "sqlite", str(exc)))
    except Exception as exc:  # an auditor reports a damaged file; it does not crash on one
        problems.append(Problem(None, "unexpected", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
    return _report(checked, problems)


def _bootstrap_start(conn: sqlite3.Connection, load) -> tuple[MemoryState, set[str]] | Problem | None:
    """For a store that started from a checkpoint: the state its snapshot holds, and the ids it covers.

    The snapshot must hash to the checkpoint's digest and the checkpoint must be signed by its creator.
    """
    from protocol.errors import BadSignature

    from .snapshot import decode, digest_of, memory_state

    rows = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('bootstrap', 'bootstrap_snapshot')"))
    if "bootstrap" not in rows:
        return None
    try:
        checkpoint = load(rows["bootstrap"])
        checkpoint.verify_signature()
        snapshot = rows["bootstrap_snapshot"]
        if digest_of(snapshot) != checkpoint.body.get("state"):
            return Problem(checkpoint.id_hex, "bad_checkpoint", "the kept snapshot does not hash to the checkpoint")
        doc = decode(snapshot)
        genesis = load(doc["vertices"][0][0])
    except (ProtocolError, BadSignature, TypeError) as exc:
        return Problem(None, "bad_bootstrap", f"the checkpoint this store started from does not check out: {exc}")
    return memory_state(doc, genesis, load), {row[0].hex() for row in doc["vertices"]}


def _report(checked: int, problems: list[Problem]) -> VerifyReport:
    if len(problems) > MAX_PROBLEMS:
        more = len(problems) - MAX_PROBLEMS
        problems = problems[:MAX_PROBLEMS] + [Problem(None, "more", f"{more} more problems not listed")]
    if not problems:
        return VerifyReport(ok=True, checked=checked)
    first = problems[0]
    return VerifyReport(False, checked, first.vertex, str(first), problems)


def _check_row(row: tuple[Any, ...], state: MemoryState) -> Problem | None:
    """Check one stored vertex against everything before it; apply it to `state` if it is authentic."""
    stored_id, creator, seq, kind, when, depth, data = row
    name = stored_id if isinstance(stored_id, str) else repr(stored_id)
    if not isinstance(data, bytes):
        return Problem(name, "undecodable", f"data is a {type(data).__name__}, not a blob")
    try:
        vertex = Vertex.decode(data)
    except ProtocolError as exc:
        return Problem(name, "undecodable", str(exc))
    if vertex.id_hex != stored_id:
        return Problem(name, "id_mismatch", f"the stored bytes hash to {vertex.id_hex}")
    try:
        validate.check(vertex, state)
    except LedgerError as exc:
        return Problem(name, exc.reason, exc.detail)
    # The vertex is authentic and admissible; wrong query columns are still a problem
    # (the store relies on them), but the vertex counts for the ones after it.
    expected_depth = depth_of(vertex, state.depths)
    apply(vertex, state)
    columns = (creator, seq, kind, when, depth)
    expected = (vertex.creator_id, vertex.seq, vertex.kind, vertex.time, expected_depth)
    if columns != expected:
        return Problem(name, "column_mismatch", f"stored columns {columns} should be {expected}")
    return None


def _check_derived(conn: sqlite3.Connection, state: MemoryState) -> list[Problem]:
    """The derived tables must say what the vertices say."""
    problems = []

    def compare(table: str, stored: Any, derived: Any) -> None:
        if stored != derived:
            problems.append(Problem(None, "derived_mismatch", f"table {table} disagrees with the vertices"))

    compare("tips", {vid for (vid,) in conn.execute("SELECT id FROM tips")}, {t.hex() for t in state.tips})
    compare(
        "gateways",
        {(k, i, v) for k, i, v in conn.execute("SELECT public_key, id, vertex FROM gateways WHERE left_vertex IS NULL")},
        {(k.hex(), state.speaks_as(k), v.hex()) for k, v in state.gateways.items()},
    )
    compare(
        "equivocations",
        {(c, s) for c, s in conn.execute("SELECT DISTINCT creator, seq FROM equivocations")},
        {(identity_id(c), s) for c, s in state.equivocations},
    )
    compare(
        "devices",
        {tuple(r) for r in conn.execute("SELECT public_key, id, name, policy, vertex FROM devices")},
        {(k.hex(), identity_id(k), name, policy, v.hex()) for k, (name, policy, v) in state.devices.items()},
    )
    compare(
        "revocations",
        {tuple(r) for r in conn.execute("SELECT public_key, reason, vertex FROM revocations")},
        {(k.hex(), reason, v.hex()) for k, (reason, v) in state.revoked.items()},
    )
    compare(
        "updates",
        {
            (bytes.fromhex(key), digest)
            for key, digest in conn.execute(
                "SELECT d.public_key, u.digest FROM updates u JOIN devices d ON d.n = u.device"
            )
        },
        set(state.records),
    )
    return problems


def _check_sqlite(conn: sqlite3.Connection) -> list[Problem]:
    """SQLite's own structural check (pages, indexes that match their tables)."""
    results = [r[0] for r in conn.execute("PRAGMA integrity_check(20)")]
    if results == ["ok"]:
        return []
    return [Problem(None, "sqlite_integrity", "; ".join(map(str, results)))]
