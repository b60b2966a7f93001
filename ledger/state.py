"""What the validation rules need to know about the DAG so far, and how a vertex changes it.

The same rules (`ledger.validate`, `ledger.kinds`) run in two places: the
store, where the state lives in SQLite tables updated inside the append's
transaction, and the offline verifier, which rebuilds the state in memory
while it walks the file. `State` is the small interface between the rules
and either place; `MemoryState` is the in-memory one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .vertex import Vertex


class State(Protocol):
    """Read what the rules ask, and record what an admitted vertex adds."""

    @property
    def initialized(self) -> bool:
        """True once a genesis vertex is in."""

    def has_vertex(self, vertex_id: bytes) -> bool: ...

    def last_of(self, creator: bytes) -> tuple[int, bytes] | None:
        """(seq, id) of the creator's latest vertex, or None if it has none."""

    def is_gateway(self, public_key: bytes) -> bool: ...

    def is_enrolled(self, public_key: bytes) -> bool:
        """True if a device.enroll vertex names the device, revoked since or not."""

    def is_revoked(self, public_key: bytes) -> bool:
        """True if a device.revoke vertex names the device."""

    def has_update(self, digest: bytes) -> bool:
        """True if some updates vertex recorded an update with this digest."""

    def has_record(self, device: bytes, digest: bytes) -> bool:
        """True if this device's update with this digest is recorded already."""

    def add_vertex(self, vertex: Vertex) -> None:
        """Record the vertex itself: its id, its creator's sequence, the tips."""

    def add_gateways(self, vertex: Vertex, public_keys: list[bytes]) -> None: ...

    def add_device(self, vertex: Vertex, public_key: bytes, name: str, policy: str) -> None: ...

    def add_revocation(self, vertex: Vertex, public_key: bytes, reason: str) -> None: ...

    def add_updates(self, vertex: Vertex, records: list[tuple[bytes, bytes]]) -> None:
        """Record (device public key, update digest) pairs of an updates vertex."""


class MemoryState:
    """`State` in plain dicts and sets: what the verifier rebuilds from the vertices alone."""

    def __init__(self) -> None:
        self.depths: dict[bytes, int] = {}  # vertex id -> longest path from genesis
        self.last: dict[bytes, tuple[int, bytes]] = {}  # creator -> (seq, id)
        self.tips: set[bytes] = set()
        self.gateways: dict[bytes, bytes] = {}  # public key -> id of the vertex that named it
        self.devices: dict[bytes, tuple[str, str, bytes]] = {}  # public key -> (name, policy, vertex id)
        self.revoked: dict[bytes, tuple[str, bytes]] = {}  # public key -> (reason, vertex id)
        self.updates: set[bytes] = set()
        self.records: set[tuple[bytes, bytes]] = set()

    @property
    def initialized(self) -> bool:
        return bool(self.gateways)

    def has_vertex(self, vertex_id: bytes) -> bool:
        return vertex_id in self.depths

    def last_of(self, creator: bytes) -> tuple[int, bytes] | None:
        return self.last.get(creator)

    def is_gateway(self, public_key: bytes) -> bool:
        return public_key in self.gateways

    def is_enrolled(self, public_key: bytes) -> bool:
        return public_key in self.devices

    def is_revoked(self, public_key: bytes) -> bool:
        return public_key in self.revoked

    def has_update(self, digest: bytes) -> bool:
        return digest in self.updates

    def has_record(self, device: bytes, digest: bytes) -> bool:
        return (device, digest) in self.records

    def add_vertex(self, vertex: Vertex) -> None:
        self.depths[vertex.id] = depth_of(vertex, self.depths)
        self.last[vertex.creator] = (vertex.seq, vertex.id)
        self.tips.difference_update(vertex.parents)
        self.tips.add(vertex.id)

    def add_gateways(self, vertex: Vertex, public_keys: list[bytes]) -> None:
        for key in public_keys:
            self.gateways.setdefault(key, vertex.id)

    def add_device(self, vertex: Vertex, public_key: bytes, name: str, policy: str) -> None:
        self.devices[public_key] = (name, policy, vertex.id)

    def add_revocation(self, vertex: Vertex, public_key: bytes, reason: str) -> None:
        self.revoked[public_key] = (reason, vertex.id)

    def add_updates(self, vertex: Vertex, records: list[tuple[bytes, bytes]]) -> None:
        for device, digest in records:
            self.updates.add(digest)
            self.records.add((device, digest))


def depth_of(vertex: Vertex, depths: dict[bytes, int]) -> int:
    """Longest path from genesis: 0 for genesis, else one more than the deepest parent.

    Every parent is strictly shallower than its child, so sorting by
    (depth, id) is a topological order that every gateway derives alike.
    """
    return 1 + max(depths[p] for p in vertex.parents) if vertex.parents else 0
