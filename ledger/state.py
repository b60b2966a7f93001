"""What the validation rules need to know about the DAG so far, and how a vertex changes it.

The same rules (`ledger.validate`, `ledger.kind_rules`) run in two places: the
store, where the state lives in SQLite tables updated inside the append's
transaction, and the offline verifier, which rebuilds the state in memory
while it walks the file. `State` is the small interface between the rules
and either place; `MemoryState` is the in-memory one.

Facts that several gateways may establish concurrently (a device's
enrollment, its revocation, an update record) are answered by the vertex
that established them first in the canonical order, so the derived state
does not depend on the order vertices arrived in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from protocol.keys import identity_id

if TYPE_CHECKING:
    from .vertex import Vertex


def canonical_key(depth: int, vertex_id: bytes) -> tuple[int, bytes]:
    """The canonical order of vertices: by depth, ties by id."""
    return depth, vertex_id


class State(Protocol):
    """Read what the rules ask, and record what an admitted vertex adds."""

    @property
    def initialized(self) -> bool:
        """True once a genesis vertex is in."""

    @property
    def root(self) -> bytes | None:
        """The operator root key: the creator of genesis."""

    def has_vertex(self, vertex_id: bytes) -> bool: ...

    def last_of(self, creator: bytes) -> tuple[int, bytes] | None:
        """(seq, id) of the creator's vertex with the highest seq, or None if it has none."""

    def vertices_at(self, creator: bytes, seq: int) -> list[bytes]:
        """Ids of the creator's vertices with this seq (more than one: it equivocated)."""

    def precedes(self, earlier: bytes, vertex: Vertex) -> bool:
        """True if vertex `earlier` is an ancestor of `vertex` (reachable through its parents)."""

    def past_of(self, vertex: Vertex) -> list[Vertex] | None:
        """Every ancestor of `vertex`, in canonical order; None if part of it was pruned (bootstrap)."""

    def is_gateway(self, public_key: bytes) -> bool:
        """True if the key is a member now (named by genesis or joined, and not left)."""

    def departure_of(self, public_key: bytes) -> bytes | None:
        """Id of the gateway.leave (or gateway.rotate) vertex that retired this gateway key, or None."""

    def speaks_as(self, public_key: bytes) -> str:
        """The gateway id a member key writes under: its own id, or after a key rotation the id of the
        gateway's first key (devices keep addressing the gateway by it: `protocol.rotation`)."""

    def member_count_ever(self) -> int: ...

    def enrollment_of(self, public_key: bytes) -> bytes | None:
        """Id of the (canonically first) device.enroll vertex naming the device, or None."""

    def enrollments_of(self, public_key: bytes) -> list[tuple[bytes, str]]:
        """(vertex id, creator's identity id) of every device.enroll vertex naming the device (a device is
        enrolled once per gateway), the canonically first included. A store that started from a
        checkpoint knows, of those before it, only the first (the snapshot keeps no more)."""

    def revocation_of(self, public_key: bytes) -> bytes | None:
        """Id of the (canonically first) device.revoke vertex naming the device, or None."""

    def has_update(self, digest: bytes) -> bool:
        """True if some updates vertex recorded an update with this digest."""

    def record_of(self, device: bytes, digest: bytes) -> bytes | None:
        """Id of the (canonically first) updates vertex recording this device's update, or None."""

    def add_vertex(self, vertex: Vertex) -> None:
        """Record the vertex itself: its id, depth, parents, the tips, an equivocation if it is one."""

    def add_gateways(self, vertex: Vertex, public_keys: list[bytes], speaks_as: str = "") -> None:
        """Admit gateway keys; `speaks_as`: the gateway id a rotated-in key writes under ("" its own)."""

    def remove_gateway(self, vertex: Vertex, public_key: bytes) -> None: ...

    def add_device(self, vertex: Vertex, public_key: bytes, name: str, policy: str) -> None: ...

    def add_revocation(self, vertex: Vertex, public_key: bytes, reason: str) -> None: ...

    def add_updates(self, vertex: Vertex, records: list[tuple[bytes, bytes]]) -> None:
        """Record (device public key, update digest) pairs of an updates vertex."""


class MemoryState:
    """`State` in plain dicts and sets: what the verifier rebuilds from the vertices alone.

    The verifier feeds vertices in the canonical order, so "first one wins" is canonical-first.
    """

    def __init__(self, loader: Callable[[bytes], Vertex] | None = None) -> None:
        self.loader = loader  # id -> stored vertex, for checkpoints (the verifier reads its file)
        self.depths: dict[bytes, int] = {}  # vertex id -> longest path from genesis
        self.parents: dict[bytes, tuple[bytes, ...]] = {}
        self.by_seq: dict[tuple[bytes, int], list[bytes]] = {}  # (creator, seq) -> vertex ids
        self.last: dict[bytes, tuple[int, bytes]] = {}  # creator -> (highest seq, id)
        self.tips: set[bytes] = set()
        self.root_key: bytes | None = None
        self.gateways: dict[bytes, bytes] = {}  # member public key -> id of the vertex that named it
        self.admitted: dict[bytes, bytes] = {}  # every gateway ever, in admission order (= finality bit)
        self.departed: dict[bytes, bytes] = {}  # former member -> id of its gateway.leave vertex
        self.speaks: dict[bytes, str] = {}  # a rotated-in key -> the gateway id it writes under
        self.devices: dict[bytes, tuple[str, str, bytes]] = {}  # public key -> (name, policy, vertex id)
        self.enrollments: dict[bytes, list[tuple[bytes, str]]] = {}  # public key -> [(vertex id, creator id)]
        self.revoked: dict[bytes, tuple[str, bytes]] = {}  # public key -> (reason, vertex id)
        self.updates: set[bytes] = set()
        self.records: dict[tuple[bytes, bytes], bytes] = {}  # (device, digest) -> updates vertex id
        self.equivocations: set[tuple[bytes, int]] = set()  # (creator, seq) signed twice
        self.pruned: set[bytes] = set()  # ids known only from a bootstrap snapshot (no bytes, no parents)

    @property
    def initialized(self) -> bool:
        return self.root_key is not None

    @property
    def root(self) -> bytes | None:
        return self.root_key

    def has_vertex(self, vertex_id: bytes) -> bool:
        return vertex_id in self.depths

    def last_of(self, creator: bytes) -> tuple[int, bytes] | None:
        return self.last.get(creator)

    def vertices_at(self, creator: bytes, seq: int) -> list[bytes]:
        return list(self.by_seq.get((creator, seq), ()))

    def precedes(self, earlier: bytes, vertex: Vertex) -> bool:
        if earlier not in self.depths:
            return False
        floor = self.depths[earlier]  # nothing shallower can lead to it
        seen: set[bytes] = set()
        stack = [p for p in vertex.parents if p in self.depths]
        while stack:
            current = stack.pop()
            if current == earlier:
                return True
            if current in seen or self.depths[current] <= floor:
                continue
            seen.add(current)
            stack.extend(self.parents[current])
        return False

    def past_of(self, vertex: Vertex) -> list[Vertex] | None:
        if self.loader is None:
            return None
        seen: set[bytes] = set()
        stack = [p for p in vertex.parents if p in self.depths]
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.parents[current])
        if seen & self.pruned:
            return None
        return [self.loader(v) for v in sorted(seen, key=lambda v: (self.depths[v], v))]

    def is_gateway(self, public_key: bytes) -> bool:
        return public_key in self.gateways

    def departure_of(self, public_key: bytes) -> bytes | None:
        return self.departed.get(public_key)

    def member_count_ever(self) -> int:
        return len(self.gateways) + len(self.departed)

    def enrollment_of(self, public_key: bytes) -> bytes | None:
        found = self.devices.get(public_key)
        return None if found is None else found[2]

    def enrollments_of(self, public_key: bytes) -> list[tuple[bytes, str]]:
        return list(self.enrollments.get(public_key, ()))

    def revocation_of(self, public_key: bytes) -> bytes | None:
        found = self.revoked.get(public_key)
        return None if found is None else found[1]

    def has_update(self, digest: bytes) -> bool:
        return digest in self.updates

    def record_of(self, device: bytes, digest: bytes) -> bytes | None:
        return self.records.get((device, digest))

    def add_vertex(self, vertex: Vertex) -> None:
        if vertex.kind == "genesis":
            self.root_key = vertex.creator
        self.depths[vertex.id] = depth_of(vertex, self.depths)
        self.parents[vertex.id] = vertex.parents
        same_seq = self.by_seq.setdefault((vertex.creator, vertex.seq), [])
        if same_seq:
            self.equivocations.add((vertex.creator, vertex.seq))
        same_seq.append(vertex.id)
        if vertex.creator not in self.last or vertex.seq > self.last[vertex.creator][0]:
            self.last[vertex.creator] = (vertex.seq, vertex.id)
        self.tips.difference_update(vertex.parents)
        self.tips.add(vertex.id)

    def add_gateways(self, vertex: Vertex, public_keys: list[bytes], speaks_as: str = "") -> None:
        for key in public_keys:
            self.gateways.setdefault(key, vertex.id)
            self.admitted.setdefault(key, vertex.id)
            if speaks_as and speaks_as != identity_id(key):
                self.speaks.setdefault(key, speaks_as)

    def speaks_as(self, public_key: bytes) -> str:
        return self.speaks.get(public_key) or identity_id(public_key)

    def remove_gateway(self, vertex: Vertex, public_key: bytes) -> None:
        self.gateways.pop(public_key, None)
        self.departed.setdefault(public_key, vertex.id)

    def add_device(self, vertex: Vertex, public_key: bytes, name: str, policy: str) -> None:
        self.devices.setdefault(public_key, (name, policy, vertex.id))
        self.enrollments.setdefault(public_key, []).append((vertex.id, vertex.creator_id))

    def add_revocation(self, vertex: Vertex, public_key: bytes, reason: str) -> None:
        self.revoked.setdefault(public_key, (reason, vertex.id))

    def add_updates(self, vertex: Vertex, records: list[tuple[bytes, bytes]]) -> None:
        for device, digest in records:
            self.updates.add(digest)
            self.records.setdefault((device, digest), vertex.id)


def depth_of(vertex: Vertex, depths: dict[bytes, int]) -> int:
    """Longest path from genesis: 0 for genesis, else one more than the deepest parent.

    Every parent is strictly shallower than its child, so sorting by
    (depth, id) is a topological order that every gateway derives alike.
    """
    return 1 + max(depths[p] for p in vertex.parents) if vertex.parents else 0
