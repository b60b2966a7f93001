"""The rules every vertex must pass to join the DAG, whoever created it.

`check` is the one gate: the store runs it on its own appends and on
vertices from elsewhere, and the verifier runs it again on every stored
vertex, so what a gateway writes and what an auditor accepts cannot drift.

In order: the creator's signature; the links (genesis first, a creator
named in genesis, parents present, a per-creator sequence without gaps or
repeats that links to the creator's previous vertex); then the kind's own
rules (`ledger.kinds`).
"""

from __future__ import annotations

from protocol.errors import BadSignature
from protocol.keys import identity_id

from .errors import (
    BadSequence,
    BadVertexSignature,
    Equivocation,
    InvalidVertex,
    MissingParent,
    NotAGateway,
    NotInitialized,
)
from .kinds import GENESIS, KINDS
from .state import State
from .vertex import Vertex


def check(vertex: Vertex, state: State) -> None:
    """Raise a `LedgerError` subclass unless `vertex` may join the DAG that `state` describes."""
    try:
        vertex.verify_signature()
    except BadSignature as exc:
        raise BadVertexSignature(
            f"vertex {vertex.id_hex} is not signed by its creator {vertex.creator_id}"
        ) from exc
    rules = KINDS[vertex.kind]
    if vertex.kind != GENESIS:  # genesis has its own structure rules
        check_links(vertex, state)
    rules.check_state(vertex, state)
    rules.check_proofs(vertex)


def check_links(vertex: Vertex, state: State) -> None:
    """The DAG rules for every vertex after genesis."""
    if not state.initialized:
        raise NotInitialized("the first vertex must be genesis")
    if not state.is_gateway(vertex.creator):
        raise NotAGateway(f"creator {vertex.creator_id} is not a gateway named in genesis")
    if not vertex.parents:
        raise InvalidVertex("only genesis may have no parents")
    missing = [p for p in vertex.parents if not state.has_vertex(p)]
    if missing:
        raise MissingParent(f"{len(missing)} parent(s) not in the store, first {missing[0].hex()}")
    last = state.last_of(vertex.creator)
    expected = 0 if last is None else last[0] + 1
    if vertex.seq < expected:
        raise Equivocation(f"creator {vertex.creator_id} already signed another vertex with seq {vertex.seq}")
    if vertex.seq > expected:
        raise BadSequence(f"creator {identity_id(vertex.creator)}'s next seq is {expected}, not {vertex.seq}")
    if last is not None and last[1] not in vertex.parents:
        raise BadSequence(f"does not name its creator's previous vertex {last[1].hex()} as a parent")


def apply(vertex: Vertex, state: State) -> None:
    """Record an admitted vertex and its kind's effects in `state`."""
    state.add_vertex(vertex)
    KINDS[vertex.kind].apply(vertex, state)


def admit(vertex: Vertex, state: State) -> None:
    """`check`, then `apply`."""
    check(vertex, state)
    apply(vertex, state)
