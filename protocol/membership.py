"""The city's member gateways as a device learns them: the root-signed membership vertices of the ledger.

A device that roams (agent/roaming.py) must know which gateways belong to its
city and which key signs for each, without trusting the gateway that tells
it. Only the operator's root key may say who is a member, and it is kept
offline, so no gateway can sign a fresh statement about the members. The
ledger already holds every statement the root key made about them: the
`genesis` vertex (the first gateways) and every `gateway.join`,
`gateway.leave` and `gateway.rotate`, each created and signed by the root key.
A gateway publishes exactly those vertices, retained, on `topics.members`
(gateway/membership.py); a device that knows the root key checks every
signature itself. A gateway, or anyone who can publish on the broker, can
withhold statements (a device then knows fewer members), never forge or
alter one.

Why a reader here and not `ledger.vertex`: the agent runs on 512 MB devices
without the ledger's SQLite layer, and importing `ledger.vertex` imports the
`ledger` package (its store). So this module reads the vertex wire form that
`ledger/vertex.py` defines, for these four kinds only, and nothing else of
the ledger; tests/protocol/test_membership.py checks it against vertices the
ledger itself signs, so the two readers cannot drift apart unnoticed.

Document wire form (deterministic CBOR): {"v": 1, "vertices": [encoded vertex, ...]}.
The root's vertices are applied in the order of their sequence numbers (the
root's own counter; ties, which only an operator who signed twice at one
seq can make, by vertex id), like the ledger's rules do:

    genesis         its gateways are the members; each one's id is `identity_id(key)`
    gateway.join    the gateway becomes a member (a key that was ever a member never comes back)
    gateway.leave   the gateway is no longer a member, and is remembered as departed
    gateway.rotate  the member keeps its id (its first key's), `next` signs for it, the old key is retired

Documents learned from several gateways (or over time) are merged: the union
of their vertices, so a stale or partial document never takes back what a
newer one said. A document is refused whole, with a counted reason, when any
vertex in it is not what the root key signed:

    members_malformed      not a document, a vertex of the wrong shape or kind, too big, too many
    members_not_root       a vertex created by another key than the root key
    members_bad_signature  the root key's signature does not verify
    members_no_genesis     no genesis vertex, or more than one
    members_other_city     its genesis is not the one this device already knows
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from . import cbor
from .digest import sha256
from .errors import BadSignature, ProtocolError
from .fields import check_bytes, check_fields, check_float, check_int, check_list, check_text
from .keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, identity_id, verify
from .rotation import KeyRotation

VERSION = 1
VERTEX_VERSION = 1  # ledger/vertex.py VERSION
VERTEX_DOMAIN = b"starling/vertex/v1\x00"  # ledger/vertex.py DOMAIN: what a vertex signature covers
VERTEX_FIELDS = frozenset({"v", "kind", "creator", "seq", "parents", "time", "body", "sig"})
GENESIS, JOIN, LEAVE, ROTATE = "genesis", "gateway.join", "gateway.leave", "gateway.rotate"
KINDS = (GENESIS, JOIN, LEAVE, ROTATE)
MAX_GATEWAYS = 62  # ledger/kinds.py: members ever
MAX_VERTICES = 1 + 3 * MAX_GATEWAYS  # a genesis, then at most one join, one leave, one rotation per key ever
MAX_VERTEX_BYTES = 8 * 1024  # a genesis naming 62 gateways is about 2.3 KB
MAX_DOCUMENT_BYTES = MAX_VERTICES * (MAX_VERTEX_BYTES + 4) + 64
MAX_PARENTS = 256
MAX_SEQ = 2**63 - 1
NAME_MAX, REASON_MAX = 64, 256


class MembershipRefused(ProtocolError):
    """A membership document (or a vertex in it) that the root key did not sign as it stands."""

    reason = "members_malformed"

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason  # before the base class builds the message from it
        super().__init__(detail)


@dataclass(frozen=True)
class RootVertex:
    """One verified membership vertex: what it says, and its exact bytes (to pass on and to merge by id)."""

    id: bytes
    kind: str
    seq: int
    body: dict[str, Any]
    wire: bytes


@dataclass(frozen=True)
class Member:
    """A member gateway: its id (its first key's, for life), the key that signs for it now, the keys retired."""

    id: str
    key: bytes
    name: str = ""
    retired: tuple[bytes, ...] = ()


def read_vertex(wire: bytes, root: bytes) -> RootVertex:
    """Decode one membership vertex and check that `root` created and signed it; `MembershipRefused` if not.

    In that order: the vertex's shape, its creator, the signature, and only then what the body says (a body
    is worth reading only once the root key is known to have said it)."""
    try:
        doc = cbor.loads(wire, max_bytes=MAX_VERTEX_BYTES)  # canonical: re-encoding it gives the signed bytes
        if not isinstance(doc, dict) or set(doc) != VERTEX_FIELDS:
            raise MembershipRefused("members_malformed", "a vertex is a map of " + ", ".join(sorted(VERTEX_FIELDS)))
        if type(doc["v"]) is not int or doc["v"] != VERTEX_VERSION or doc["kind"] not in KINDS:
            raise MembershipRefused("members_malformed", f"not a membership vertex: {str(doc['kind'])[:40]!r}")
        creator = check_bytes(doc["creator"], "creator", PUBLIC_KEY_BYTES)
        seq = check_int(doc["seq"], "seq", 0, MAX_SEQ)
        for parent in check_list(doc["parents"], "parents", MAX_PARENTS):
            check_bytes(parent, "a parent", 32)
        check_float(doc["time"], "time", 0.0, 1e11)
        sig = check_bytes(doc["sig"], "sig", SIGNATURE_BYTES)
        if not isinstance(doc["body"], dict):
            raise MembershipRefused("members_malformed", "a vertex body is a map")
    except MembershipRefused:
        raise
    except ProtocolError as exc:  # bad CBOR, a field of the wrong type or size
        raise MembershipRefused("members_malformed", exc.detail) from exc
    if creator != root:
        raise MembershipRefused("members_not_root", f"a {doc['kind']} vertex created by {identity_id(creator)}, "
                                                    f"not by the root key {identity_id(root)}")
    unsigned = cbor.dumps({k: v for k, v in doc.items() if k != "sig"})
    try:
        verify(root, VERTEX_DOMAIN + unsigned, sig)
    except BadSignature as exc:
        raise MembershipRefused("members_bad_signature",
                                f"the {doc['kind']} vertex's signature does not verify") from exc
    try:
        _check_body(doc["kind"], doc["body"], seq, doc["parents"], root)
    except MembershipRefused:
        raise
    except ProtocolError as exc:  # signed by the root, and still not what the ledger would hold
        raise MembershipRefused("members_malformed", exc.detail) from exc
    return RootVertex(sha256(unsigned), doc["kind"], seq, doc["body"], bytes(wire))


def _check_body(kind: str, body: dict[str, Any], seq: int, parents: list[Any], root: bytes) -> None:
    """The fields this module reads, as ledger/kinds.py defines them (SchemaError / MembershipRefused if not)."""
    if kind == GENESIS:
        check_fields(body, {"name", "gateways"}, "genesis body")
        check_text(body["name"], "name", NAME_MAX, 1)
        gateways = check_list(body["gateways"], "gateways", MAX_GATEWAYS, 1)
        for key in gateways:
            check_bytes(key, "a gateway key", PUBLIC_KEY_BYTES)
        if seq != 0 or parents:
            raise MembershipRefused("members_malformed", "a genesis has seq 0 and no parents")
        return
    if seq == 0:
        raise MembershipRefused("members_malformed", f"a {kind} vertex cannot have seq 0 (the genesis has it)")
    other = {JOIN: "name", LEAVE: "reason", ROTATE: "next"}[kind]
    check_fields(body, {"gateway", other} | ({"statement"} if kind == ROTATE else set()), f"{kind} body")
    check_bytes(body["gateway"], "gateway", PUBLIC_KEY_BYTES)
    if kind == ROTATE:
        check_bytes(body["next"], "next", PUBLIC_KEY_BYTES)
        if not isinstance(body["statement"], bytes):
            raise MembershipRefused("members_malformed", "a rotation's statement is bytes")
        rotation = KeyRotation.decode(body["statement"])
        if (rotation.old, rotation.new) != (body["gateway"], body["next"]):
            raise MembershipRefused("members_malformed", "the rotation statement names other keys than its vertex")
        rotation.check([root])  # RotationRefused (a ProtocolError): reported as members_malformed
    else:
        check_text(body[other], other, NAME_MAX if kind == JOIN else REASON_MAX)


@dataclass(frozen=True)
class City:
    """The members a set of verified root vertices names. Build it with `from_document` or `from_genesis`."""

    root: bytes
    vertices: tuple[RootVertex, ...]  # genesis first, then by (seq, id)

    @classmethod
    def from_document(cls, data: bytes, root: bytes, genesis: bytes | None = None) -> City:
        """A document's city; `genesis` (a vertex id) pins the city this device already belongs to."""
        try:
            doc = cbor.loads(data, max_bytes=MAX_DOCUMENT_BYTES)
        except ProtocolError as exc:
            raise MembershipRefused("members_malformed", exc.detail) from exc
        if not isinstance(doc, dict) or set(doc) != {"v", "vertices"} or type(doc["v"]) is not int \
                or doc["v"] != VERSION:
            raise MembershipRefused("members_malformed", f"a membership document is {{v: {VERSION}, vertices}}")
        wires = doc["vertices"]
        if not isinstance(wires, list) or not 1 <= len(wires) <= MAX_VERTICES:
            raise MembershipRefused("members_malformed", f"a document holds 1 to {MAX_VERTICES} vertices")
        if not all(isinstance(w, bytes) for w in wires):
            raise MembershipRefused("members_malformed", "each vertex is carried as its encoded bytes")
        return cls._of([read_vertex(w, root) for w in wires], root, genesis)

    @classmethod
    def from_genesis(cls, wire: bytes, root: bytes) -> City:
        """The city as its genesis file alone says (a device installed with the operator's genesis)."""
        return cls._of([read_vertex(wire, root)], root, None)

    @classmethod
    def _of(cls, vertices: list[RootVertex], root: bytes, genesis: bytes | None) -> City:
        unique = {v.id: v for v in vertices}
        starts = [v for v in unique.values() if v.kind == GENESIS]
        if len(starts) != 1:
            raise MembershipRefused("members_no_genesis", f"{len(starts)} genesis vertices; a city has one")
        if genesis is not None and starts[0].id != genesis:
            raise MembershipRefused("members_other_city", f"genesis {starts[0].id.hex()[:16]} is not this "
                                                          f"device's city ({genesis.hex()[:16]})")
        if len(unique) > MAX_VERTICES:
            raise MembershipRefused("members_malformed", f"more than {MAX_VERTICES} membership vertices")
        return cls(root, tuple(sorted(unique.values(), key=lambda v: (v.seq, v.id))))

    @property
    def genesis(self) -> RootVertex:
        return self.vertices[0]

    @property
    def name(self) -> str:
        return self.genesis.body["name"]

    def merge(self, other: City) -> City:
        """This city and what `other` adds (`MembershipRefused` "members_other_city" for another genesis)."""
        return City._of([*self.vertices, *other.vertices], self.root, self.genesis.id)

    def encode(self) -> bytes:
        return cbor.dumps({"v": VERSION, "vertices": [v.wire for v in self.vertices]})

    @cached_property
    def _derived(self) -> tuple[dict[str, Member], frozenset[str]]:
        members: dict[str, Member] = {}
        departed: set[str] = set()
        ever: set[bytes] = set()  # every key that was ever a member's: it never joins again

        def by_key(key: bytes) -> str | None:
            return next((m.id for m in members.values() if m.key == key), None)

        for vertex in self.vertices:
            body = vertex.body
            if vertex.kind == GENESIS:
                for key in body["gateways"]:
                    members[identity_id(key)] = Member(identity_id(key), key)
                    ever.add(key)
            elif vertex.kind == JOIN and body["gateway"] not in ever:
                key = body["gateway"]
                members[identity_id(key)] = Member(identity_id(key), key, body["name"])
                ever.add(key)
            elif vertex.kind == LEAVE and (gone := by_key(body["gateway"])) is not None:
                del members[gone]
                departed.add(gone)
            elif vertex.kind == ROTATE and (moved := by_key(body["gateway"])) is not None and body["next"] not in ever:
                old = members[moved]
                members[moved] = Member(old.id, body["next"], old.name, (*old.retired, old.key))
                ever.add(body["next"])
        return members, frozenset(departed)

    @property
    def members(self) -> dict[str, Member]:
        """The member gateways now, by id."""
        return self._derived[0]

    @property
    def departed(self) -> frozenset[str]:
        """Ids of the gateways that left the city (the operator's `gateway.leave`)."""
        return self._derived[1]

    def ids(self) -> frozenset[bytes]:
        """The ids of the vertices this city was learned from (equal sets: the same knowledge)."""
        return frozenset(v.id for v in self.vertices)
