"""The rules every vertex must pass to join the DAG, whoever created it.

`check` is the one gate: the store runs it on its own appends and on
vertices from elsewhere, and the verifier runs it again on every stored
vertex, so what a gateway writes and what an auditor accepts cannot drift.

In order: the creator's signature; the links (genesis first, a creator that
is the root or a member gateway, parents present, a per-creator sequence in
which each vertex names the creator's previous one as a parent); then the
kind's own rules (`ledger.kind_rules`).

Two vertices with the same creator and seq are an equivocation: the second
one is admitted too (both are evidence, and every gateway must end up with
the same vertex set), and the store flags the creator.
"""

from __future__ import annotations

from protocol.errors import BadSignature
from protocol.keys import identity_id

from .errors import (
    BadSequence,
    BadVertexSignature,
    InvalidVertex,
    MissingParent,
    NotAGateway,
    NotInitialized,
)
from .kind_rules import RULES, apply
from .kinds import GATEWAY_JOIN, GATEWAY_LEAVE, GATEWAY_ROTATE, GENESIS, MISMATCH_CLEAR
from .state import State
from .vertex import Vertex


def check(vertex: Vertex, state: State, proofs: bool = True) -> None:
    """Raise a `LedgerError` subclass unless `vertex` may join the DAG that `state` describes.

    `proofs=False` skips the kind's costly stateless proofs (device signatures): only for a
    gateway's own records whose signatures it has just verified at ingest. Vertices from
    elsewhere and the auditor's verify always check them.
    """
    try:
        vertex.verify_signature()
    except BadSignature as exc:
        raise BadVertexSignature(
            f"vertex {vertex.id_hex} is not signed by its creator {vertex.creator_id}"
        ) from exc
    rules = RULES[vertex.kind]
    if vertex.kind != GENESIS:  # genesis has its own structure rules
        check_links(vertex, state)
    rules.check_state(vertex, state)
    if proofs:
        rules.check_proofs(vertex)


def check_links(vertex: Vertex, state: State) -> None:
    """The DAG rules for every vertex after genesis."""
    if not state.initialized:
        raise NotInitialized("the first vertex must be genesis")
    if not vertex.parents:
        raise InvalidVertex("only genesis may have no parents")
    missing = [p for p in vertex.parents if not state.has_vertex(p)]
    if missing:
        raise MissingParent(f"{len(missing)} parent(s) not in the store, first {missing[0].hex()}")
    if vertex.creator == state.root and not state.is_gateway(vertex.creator):
        if vertex.kind not in (GATEWAY_JOIN, GATEWAY_LEAVE, GATEWAY_ROTATE, MISMATCH_CLEAR):
            raise NotAGateway("the operator root key signs membership changes and cleared evidence only")
    else:
        departure = state.departure_of(vertex.creator)
        if departure is not None:
            if state.precedes(departure, vertex):  # written after it heard it was retired
                raise NotAGateway(f"creator {vertex.creator_id} left the ledger")
        elif not state.is_gateway(vertex.creator):
            raise NotAGateway(f"creator {vertex.creator_id} is not a member gateway")
    if vertex.seq > 0:
        previous = state.vertices_at(vertex.creator, vertex.seq - 1)
        if not any(p in vertex.parents for p in previous):
            raise BadSequence(
                f"seq {vertex.seq} of {identity_id(vertex.creator)} does not name its previous vertex (seq {vertex.seq - 1})"
            )


def is_equivocation(vertex: Vertex, state: State) -> bool:
    """True if the creator already signed another vertex with this seq (kept as evidence, flagged)."""
    return any(other != vertex.id for other in state.vertices_at(vertex.creator, vertex.seq))


def admit(vertex: Vertex, state: State, proofs: bool = True) -> None:
    """`check`, then record the vertex and its kind's effects (`ledger.kind_rules.apply`)."""
    check(vertex, state, proofs)
    apply(vertex, state)
