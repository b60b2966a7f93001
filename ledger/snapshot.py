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
    members        [[gateway key, index of the vertex that admitted it], ...] in admission order
    departed       [[gateway key, index of its gateway.leave vertex], ...]
    devices        [[public key, name, policy, enroll vertex index], ...] sorted by key
    revocations    [[device index, reason, revoke vertex index], ...]
    records        [[update digest, device index, updates vertex index], ...]
    equivocations  [[creator key, seq], ...]
    tips           [vertex index, ...]

Indices point into `vertices` (and `devices`), which keeps a record at about
40 bytes instead of the vertex's 135.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from protocol import cbor
from protocol.digest import sha256

from . import validate
from .state import MemoryState
from .vertex import Vertex

MAX_SNAPSHOT_BYTES = 1 << 31


def replay(past: Iterable[Vertex]) -> tuple[MemoryState, list[Vertex]]:
    """The state the vertices (in canonical order, each already admitted once) add up to."""
    state, order = MemoryState(), []
    for vertex in past:
        validate.apply(vertex, state)
        order.append(vertex)
    return state, order


def encode(state: MemoryState, order: list[Vertex]) -> bytes:
    index = {v.id: i for i, v in enumerate(order)}
    devices = sorted(state.devices)
    device_index = {key: i for i, key in enumerate(devices)}
    doc: dict[str, Any] = {
        "vertices": [[v.id, state.depths[v.id], v.creator, v.seq, v.kind] for v in order],
        "root": state.root_key,
        "members": [[key, index[vid]] for key, vid in state.gateways.items()],  # admission order = finality bits
        "departed": [[key, index[vid]] for key, vid in state.departed.items()],
        "devices": [[key, *state.devices[key][:2], index[state.devices[key][2]]] for key in devices],
        "revocations": sorted([device_index[key], reason, index[vid]] for key, (reason, vid) in state.revoked.items()),
        "records": sorted([digest, device_index[device], index[vid]]
                          for (device, digest), vid in state.records.items()),
        "equivocations": sorted([creator, seq] for creator, seq in state.equivocations),
        "tips": sorted(index[t] for t in state.tips),
    }
    return cbor.dumps(doc)


def snapshot_of(past: Iterable[Vertex]) -> bytes:
    """The snapshot of a causal past given as its vertices in canonical order."""
    return encode(*replay(past))


def digest_of(snapshot: bytes) -> bytes:
    return sha256(snapshot)
