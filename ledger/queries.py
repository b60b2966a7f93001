"""Every read of a ledger store: the query half of `Ledger` (`ledger.store`), which inherits it.

Each query takes the store's lock for one statement or a few (`_read`), so
queries may run on any thread next to a writer; `vertices` and `vertices_of`
page through the table without holding the lock between pages. Vertices known
only from a bootstrap snapshot are in the DAG (`ids`, `holds`, `height`) but
have no bytes, so the queries that return vertices leave them out.

A device is active while it is in `devices` and not in `revocations`;
`enrolled_devices` and `is_enrolled` answer for active devices only. A
device may be enrolled by several gateways (each admits it on its own
policy); `devices` keeps the first enrollment, `enrollments` lists them all
with the evidence each carries.

Finality: a vertex is final once vertices of more than two thirds of the
current member gateways descend from it, read from its `seen` bits (see
`ledger.schema`).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

from protocol.errors import ProtocolError
from protocol.rotation import KeyRotation

from .errors import StoreError
from .kinds import CHECKPOINT, DEVICE_ENROLL, GATEWAY_ROTATE, UPDATES
from .sql_state import SqlState
from .vertex import Vertex

PAGE_ROWS = 32  # vertices fetched per query while iterating; an updates vertex can be 100s of KB


class EnrollmentRecord(NamedTuple):
    """One `device.enroll` vertex naming a device: who admitted it, under which policy, on what evidence.

    `evidence` is the body's (b"" when the body has none: its first form); None, and `time` None, for an
    enrollment known only from the checkpoint snapshot this store started from (no bytes here).
    """

    vertex: bytes  # the device.enroll vertex's id
    creator: str  # the enrolling gateway's id
    name: str
    policy: str
    evidence: bytes | None
    time: float | None  # the vertex's time (its creator's clock when it enrolled the device)


class LedgerQueries:
    """The read-only API of `Ledger`. Every method reads through `_read()`, which `Ledger` provides."""

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        """The store's connection, held under its lock for the `with` block (`Ledger._read`)."""
        raise NotImplementedError

    def _read_all(self, sql: str, *params: Any) -> list[tuple]:
        with self._read() as conn:
            return conn.execute(sql, params).fetchall()

    # --- the DAG --------------------------------------------------------------------

    @property
    def is_initialized(self) -> bool:
        """True once the store holds a genesis vertex."""
        with self._read() as conn:
            return SqlState(conn).initialized

    @property
    def root(self) -> bytes | None:
        """The operator root key (genesis creator), or None before genesis."""
        with self._read() as conn:
            return SqlState(conn).root

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

    def gateways(self) -> list[bytes]:
        """Public keys of the gateways that may write to this DAG now, sorted."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT public_key FROM gateways WHERE left_vertex IS NULL ORDER BY public_key"
            ).fetchall()
        return [bytes.fromhex(key) for (key,) in rows]

    def rotations(self) -> list[KeyRotation]:
        """Every gateway key rotation on record (`gateway.rotate`), in the canonical order."""
        return [KeyRotation.decode(v.body["statement"]) for v in self.vertices_of(GATEWAY_ROTATE)]

    def kind_counts(self) -> dict[str, int]:
        """Number of vertices of each kind."""
        with self._read() as conn:
            return dict(
                conn.execute("SELECT kind, count(*) FROM vertices GROUP BY kind ORDER BY kind").fetchall()
            )

    # --- gossip: what a peer lacks --------------------------------------------------

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

    # --- devices and their updates --------------------------------------------------

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

    def enrollments(self, public_key: bytes) -> list[EnrollmentRecord]:
        """Every `device.enroll` vertex naming the device, in canonical order (the first is the one
        `enrolled_devices` names it by), revoked since or not; [] if none. A store that started from a
        checkpoint knows, of the enrollments before it, only the first."""
        with self._read() as conn:
            device = conn.execute(
                "SELECT n, name, policy, vertex FROM devices WHERE public_key = ?", (public_key.hex(),)
            ).fetchone()
            if device is None:
                return []
            n, first_name, first_policy, first = device
            rows = conn.execute(
                "SELECT id, creator, data FROM vertices WHERE kind = :kind AND (id = :first OR n IN"
                " (SELECT vertex FROM contributions WHERE device = :n)) ORDER BY depth, id",
                {"kind": DEVICE_ENROLL, "first": first, "n": n},
            ).fetchall()
        found = []
        for vid, creator, data in rows:
            if not data:  # known from a bootstrap snapshot only: the first enrollment, from `devices`
                found.append(EnrollmentRecord(bytes.fromhex(vid), creator, first_name, first_policy, None, None))
                continue
            vertex = _decode_row(vid, data)
            body = vertex.body
            found.append(EnrollmentRecord(vertex.id, creator, body["name"], body["policy"],
                                          body.get("evidence", b""), vertex.time))
        return found

    def enrolled_since(self, mark: int = -1) -> tuple[list[bytes], int]:
        """Devices named by the `device.enroll` vertices this store took in after `mark`, in the order it
        took them in, and the mark to pass next time (-1: from the start). A cheap "who has new
        enrollments?" for a gateway that re-reads only those (`gateway.ledger_keeper`)."""
        with self._read() as conn:
            top = conn.execute("SELECT max(n) FROM vertices").fetchone()[0]
            if top is None or top <= mark:
                return [], mark
            rows = conn.execute(
                "SELECT id, data FROM vertices WHERE n > ? AND n <= ? AND kind = ? AND length(data) > 0 ORDER BY n",
                (mark, top, DEVICE_ENROLL),
            ).fetchall()
        return list(dict.fromkeys(_decode_row(vid, data).body["device"] for vid, data in rows)), top

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

    def is_recorded(self, device_public_key: bytes, digest: bytes) -> bool:
        """True if an updates vertex recorded this device's update (what a `contributions` score needs)."""
        with self._read() as conn:
            return SqlState(conn).record_of(device_public_key, digest) is not None

    def update_records(self) -> dict[bytes, list[tuple[bytes, bytes, int]]]:
        """Update digest -> [(device public key, id of the updates vertex recording it, round)]."""
        found: dict[bytes, list[tuple[bytes, bytes, int]]] = {}
        for vertex in self.vertices_of(UPDATES):
            for device, digest, _, _ in vertex.body["records"]:
                found.setdefault(digest, []).append((device, vertex.id, vertex.body["round"]))
        return found

    # --- agreement between gateways -------------------------------------------------

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
        order = [v for (v,) in self._read_all("SELECT id FROM vertices ORDER BY depth, id")]
        doc = json.dumps({"state": self.derived_state(), "order": order}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

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

    # --- checkpoints ----------------------------------------------------------------

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
