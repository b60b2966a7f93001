"""`ledger.state.State` over the store's SQLite tables (`ledger.schema`), inside the caller's transaction.

The rules (`ledger.validate`, `ledger.kind_rules`) read and change the
derived state through this class while a vertex is admitted, so every
statement here runs in the append's one transaction, on the append path:
plain SQL, prepared once by SQLite's statement cache.

Facts that several gateways may establish concurrently (a device's
enrollment, its revocation, an update record) are kept with the vertex that
comes first in the canonical order (depth, id), whatever order the vertices
arrived in; `ledger.state.MemoryState` gets the same answers from the
verifier's canonical-order walk.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from protocol.keys import identity_id

from .errors import LedgerError
from .kinds import DEVICE_ENROLL, GENESIS
from .vertex import Vertex

KEEP_SNAPSHOTS = 2  # the snapshots of the newest checkpoints, served to gateways that bootstrap


class SqlState:
    """`ledger.state.State` on a connection that is inside a transaction.

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

    def keep_snapshot(self, vertex: Vertex, snapshot: bytes) -> None:
        """Keep a checked checkpoint's snapshot (the newest few) for gateways that bootstrap from it.

        Not part of `State`: the checkpoint kind calls it where the state has it (the store, not the verifier).
        """
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

    def enrollments_of(self, public_key: bytes) -> list[tuple[bytes, str]]:
        # The first enrollment is in `devices` (also where a bootstrap snapshot put it); every enrollment
        # vertex stored here is in the `contributions` table of (device, vertex) pairs.
        rows = self.conn.execute(
            """
            SELECT v.id, v.creator FROM devices d JOIN vertices v ON v.id = d.vertex WHERE d.public_key = :key
            UNION
            SELECT v.id, v.creator FROM devices d JOIN contributions c ON c.device = d.n
            JOIN vertices v ON v.n = c.vertex WHERE d.public_key = :key AND v.kind = :kind
            """,
            {"key": public_key.hex(), "kind": DEVICE_ENROLL},
        ).fetchall()
        return [(bytes.fromhex(vid), creator) for vid, creator in rows]

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

    def add_gateways(self, vertex: Vertex, public_keys: list[bytes], speaks_as: str = "") -> None:
        for key in public_keys:  # `id`: the gateway id the key writes under (`State.speaks_as`)
            self.conn.execute(
                "INSERT OR IGNORE INTO gateways (public_key, id, vertex, idx)"
                " VALUES (?, ?, ?, (SELECT count(*) FROM gateways))",
                (key.hex(), speaks_as or identity_id(key), vertex.id_hex),
            )

    def speaks_as(self, public_key: bytes) -> str:
        return self._one("SELECT id FROM gateways WHERE public_key = ?", public_key.hex()) or identity_id(public_key)

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
        elif self._earlier(vertex.id_hex, existing):  # enrollments by several gateways: the canonically first counts
            self.conn.execute(
                "UPDATE devices SET name = ?, policy = ?, vertex = ? WHERE public_key = ?",
                (name, policy, vertex.id_hex, public_key.hex()),
            )
        self.note_enrollment(vertex, public_key)

    def note_enrollment(self, vertex: Vertex, public_key: bytes) -> None:
        """Index an enrollment vertex under its device (every one, first or not: `enrollments_of`)."""
        self.conn.execute(
            "INSERT OR IGNORE INTO contributions (device, vertex) SELECT d.n, v.n FROM devices d, vertices v"
            " WHERE d.public_key = ? AND v.id = ?",
            (public_key.hex(), vertex.id_hex),
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
