"""Checkpoints: the derived state of a vertex's causal past as one canonical byte string.

A `checkpoint` vertex commits (SHA-256) to the snapshot of its own causal
past; every gateway that receives it recomputes the snapshot from its own
copy of that past and refuses the checkpoint if it differs. Once final,
a checkpoint is a state all gateways agreed on, and a new or long-offline
gateway can start from it (`Ledger.bootstrap`) instead of replaying every
vertex since genesis.

The snapshot (deterministic CBOR map) holds what the rules need to go on:

    vertices       [[id, depth, creator key, seq, kind], ...] in canonical order
    root           the operator root key
    members        [[gateway key, admitting vertex index, leave vertex index or null(, the gateway id it
                   writes under: only for a key a rotation brought in)], ...] in admission
                   order (which is also each gateway's finality bit)
    devices        [[public key, name, policy, enroll vertex index], ...] sorted by key
    revocations    [[device index, reason, revoke vertex index], ...]
    records        [[update digest, device index, updates vertex index], ...]
    equivocations  [[creator key, seq], ...]
    tips           [vertex index, ...]

Indices point into `vertices` (and `devices`), which keeps a record at about
40 bytes instead of the vertex's 135.

This module is the format: `encode` a replayed state, `decode` and check one
that came from elsewhere, `memory_state` to audit from it. The snapshot of a
past is `ledger.kind_rules.snapshot_of`, which replays the kinds' effects.
"""

from __future__ import annotations

from typing import Any

from protocol import cbor
from protocol.digest import sha256
from protocol.errors import SchemaError
from protocol.fields import is_int
from protocol.keys import identity_id

from .state import MemoryState
from .vertex import Vertex

MAX_SNAPSHOT_BYTES = 1 << 30
FIELDS = frozenset({"vertices", "root", "members", "devices", "revocations", "records", "equivocations", "tips"})


def encode(state: MemoryState, order: list[Vertex]) -> bytes:
    """The snapshot of `state`, replayed from the vertices `order` (in canonical order)."""
    index = {v.id: i for i, v in enumerate(order)}
    devices = sorted(state.devices)
    device_index = {key: i for i, key in enumerate(devices)}
    doc: dict[str, Any] = {
        "vertices": [[v.id, state.depths[v.id], v.creator, v.seq, v.kind] for v in order],
        "root": state.root_key,
        "members": [[key, index[vid], index[state.departed[key]] if key in state.departed else None,
                     *([state.speaks[key]] if key in state.speaks else [])]  # a rotated-in key: its gateway's id
                    for key, vid in state.admitted.items()],
        "devices": [[key, *state.devices[key][:2], index[state.devices[key][2]]] for key in devices],
        "revocations": sorted([device_index[key], reason, index[vid]] for key, (reason, vid) in state.revoked.items()),
        "records": sorted([digest, device_index[device], index[vid]]
                          for (device, digest), vid in state.records.items()),
        "equivocations": sorted([creator, seq] for creator, seq in state.equivocations),
        "tips": sorted(index[t] for t in state.tips),
    }
    return cbor.dumps(doc)


def digest_of(snapshot: bytes) -> bytes:
    return sha256(snapshot)


def _rows(doc: dict[str, Any], name: str, shape: tuple[type | tuple[type, ...], ...],
          optional: int = 0) -> list[list[Any]]:
    """The rows of `name`, each a list shaped like `shape` (its last `optional` items may be left out)."""
    rows = doc.get(name)
    if not isinstance(rows, list):
        raise SchemaError(f"snapshot: {name} must be a list")
    for row in rows:
        if not isinstance(row, list) or not len(shape) - optional <= len(row) <= len(shape) or not all(
            is_int(value) if kind is int else isinstance(value, kind) for value, kind in zip(row, shape)
        ):
            raise SchemaError(f"snapshot: a row of {name} is not {[getattr(k, '__name__', k) for k in shape]}")
    return rows


def decode(snapshot: bytes) -> dict[str, Any]:
    """Decode and check a snapshot's structure and indices (it may come from anyone)."""
    doc = cbor.loads(snapshot, max_bytes=MAX_SNAPSHOT_BYTES)
    if not isinstance(doc, dict) or set(doc) != FIELDS:
        raise SchemaError(f"snapshot fields must be {sorted(FIELDS)}")
    vertices = _rows(doc, "vertices", (bytes, int, bytes, int, str))
    members = _rows(doc, "members", (bytes, int, (int, type(None)), str), optional=1)
    devices = _rows(doc, "devices", (bytes, str, str, int))
    revocations = _rows(doc, "revocations", (int, str, int))
    records = _rows(doc, "records", (bytes, int, int))
    _rows(doc, "equivocations", (bytes, int))
    tips = doc["tips"]
    if not isinstance(doc["root"], bytes) or not isinstance(tips, list) or not vertices:
        raise SchemaError("snapshot: root, tips or vertices missing")
    count, ndevices = len(vertices), len(devices)
    indices = ([m[1] for m in members] + [m[2] for m in members if m[2] is not None] + [d[3] for d in devices]
               + [r[2] for r in revocations] + [r[2] for r in records] + list(tips))
    if not all(is_int(i) and 0 <= i < count for i in indices):
        raise SchemaError("snapshot: a vertex index is out of range")
    if not all(0 <= r[0] < ndevices for r in revocations) or not all(0 <= r[1] < ndevices for r in records):
        raise SchemaError("snapshot: a device index is out of range")
    if any(len(v[0]) != 32 or len(v[2]) != 32 for v in vertices) or any(len(r[0]) != 32 for r in records):
        raise SchemaError("snapshot: ids, keys and digests are 32 bytes")
    return doc


def memory_state(doc: dict[str, Any], genesis: Vertex, loader: Any = None) -> MemoryState:
    """A `MemoryState` holding what a (decoded) snapshot says: where a bootstrapped store's audit starts."""
    state = MemoryState(loader=loader)
    ids = [row[0] for row in doc["vertices"]]
    state.root_key = doc["root"]
    for vid, depth, creator, seq, _kind in doc["vertices"]:
        state.depths[vid] = depth
        state.parents[vid] = genesis.parents if vid == genesis.id else ()
        if vid != genesis.id:
            state.pruned.add(vid)
        state.by_seq.setdefault((creator, seq), []).append(vid)
        if creator not in state.last or seq > state.last[creator][0]:
            state.last[creator] = (seq, vid)
    for key, admitted, left, *speaks_as in doc["members"]:
        state.admitted[key] = ids[admitted]
        if speaks_as:
            state.speaks[key] = speaks_as[0]
        if left is None:
            state.gateways[key] = ids[admitted]
        else:
            state.departed[key] = ids[left]
    keys = [row[0] for row in doc["devices"]]
    for key, name, policy, vertex in doc["devices"]:
        state.devices[key] = (name, policy, ids[vertex])
        state.enrollments[key] = [(ids[vertex], identity_id(doc["vertices"][vertex][2]))]  # the first only
    for device, reason, vertex in doc["revocations"]:
        state.revoked[keys[device]] = (reason, ids[vertex])
    for digest, device, vertex in doc["records"]:
        state.updates.add(digest)
        state.records[(keys[device], digest)] = ids[vertex]
    state.equivocations = {(creator, seq) for creator, seq in doc["equivocations"]}
    state.tips = {ids[i] for i in doc["tips"]}
    return state
