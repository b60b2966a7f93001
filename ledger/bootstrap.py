"""Starting a store from a final checkpoint instead of replaying every vertex since genesis.

A new or long-offline gateway gets a peer's newest final checkpoint and its
snapshot (`ledger.gossip`) and hands them to `Ledger.bootstrap`, which runs
`check` before it touches the store and `load` inside its write transaction,
then admits the checkpoint like any vertex.

The snapshot's vertices are kept as ids only (their `data` is empty; the
genesis keeps its bytes) and its derived state is taken as it is. The
`meta` rows `bootstrap` and `bootstrap_snapshot` record where the store
started, so an audit (`ledger.verify`) starts from the same state.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from protocol.errors import BadSignature, ProtocolError
from protocol.keys import identity_id

from .errors import BadCheckpoint, BadVertexSignature, InvalidVertex, NotAGateway, StoreError
from .kinds import CHECKPOINT
from .snapshot import decode, digest_of
from .vertex import Vertex


def check(genesis: Vertex, checkpoint: Vertex, snapshot: bytes) -> tuple[dict[str, Any], int]:
    """The decoded snapshot and the finality bits of its current members, once everything checks out.

    The genesis (pinned by the gateway's config) and the checkpoint must be signed by their creators,
    the checkpoint's creator a member gateway; the snapshot must hash to the checkpoint's state digest,
    hold its count of vertices, and start at this genesis. Raises a `LedgerError` subclass otherwise.
    """
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
    return doc, mask


def load(
    conn: sqlite3.Connection, doc: dict[str, Any], mask: int, genesis: Vertex, checkpoint: Vertex, snapshot: bytes
) -> None:
    """Fill the tables from a checked snapshot (`check`), inside the caller's write transaction.

    The store must hold nothing but (at most) the genesis. Every snapshot vertex is marked as seen by
    every current member (`mask`): the checkpoint was final. Bulk rows go in with `executemany`, which
    loads a large snapshot about twice as fast as sqlite-utils' `insert_all`.
    """
    present = conn.execute("SELECT id FROM vertices").fetchall()
    if present not in ([], [(genesis.id_hex,)]):
        raise StoreError("bootstrap needs an empty ledger (or one holding only its genesis)")
    for table in ("vertices", "tips", "gateways", "meta"):
        conn.execute(f"DELETE FROM {table}")
    ids = [row[0].hex() for row in doc["vertices"]]
    conn.execute("INSERT INTO meta (key, value) VALUES ('root', ?)", (doc["root"],))
    conn.executemany(
        "INSERT INTO vertices (id, n, creator, seq, kind, time, depth, seen, data) VALUES (?, ?, ?, ?, ?, 0.0, ?, ?, ?)",
        [(ids[i], i, identity_id(creator), seq, kind, depth, mask, genesis.encode() if i == 0 else b"")
         for i, (_, depth, creator, seq, kind) in enumerate(doc["vertices"])],
    )
    conn.executemany("INSERT INTO tips (id) VALUES (?)", [(ids[i],) for i in doc["tips"]])
    conn.executemany(
        "INSERT INTO gateways (public_key, id, vertex, idx, left_vertex) VALUES (?, ?, ?, ?, ?)",
        [(key.hex(), speaks_as[0] if speaks_as else identity_id(key), ids[admitted], idx,
          None if left is None else ids[left])
         for idx, (key, admitted, left, *speaks_as) in enumerate(doc["members"])],
    )
    conn.executemany(
        "INSERT INTO devices (n, public_key, id, name, policy, vertex) VALUES (?, ?, ?, ?, ?, ?)",
        [(i, key.hex(), identity_id(key), name, policy, ids[vertex])
         for i, (key, name, policy, vertex) in enumerate(doc["devices"])],
    )
    keys = [row[0] for row in doc["devices"]]
    conn.executemany(
        "INSERT INTO revocations (public_key, reason, vertex) VALUES (?, ?, ?)",
        [(keys[device].hex(), reason, ids[vertex]) for device, reason, vertex in doc["revocations"]],
    )
    conn.executemany("INSERT INTO updates (digest, device, vertex) VALUES (?, ?, ?)",
                     [(digest, device, vertex) for digest, device, vertex in doc["records"]])
    conn.executemany("INSERT OR IGNORE INTO contributions (device, vertex) VALUES (?, ?)",
                     [(device, vertex) for _, device, vertex in doc["records"]])
    for creator, seq in doc["equivocations"]:
        conn.execute(
            "INSERT OR IGNORE INTO equivocations (creator, seq, vertex) SELECT creator, seq, id FROM vertices"
            " WHERE creator = ? AND seq = ?", (identity_id(creator), seq))
    conn.execute("INSERT INTO meta (key, value) VALUES ('bootstrap', ?), ('bootstrap_snapshot', ?)",
                 (checkpoint.id, snapshot))
