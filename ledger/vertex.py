"""A ledger vertex: one signed, content-addressed event in the gateways' DAG.

Wire form, a deterministic CBOR map with text keys:

    {"v": 1, "kind": str, "creator": bytes[32], "seq": int, "parents": [bytes[32], ...],
     "time": float, "body": {...}, "sig": bytes[64]}

- `creator` is the creating gateway's Ed25519 public key; `seq` counts that
  creator's vertices from 0, so a gap or a repeat is visible.
- `parents` are vertex ids, sorted bytewise, without duplicates: the
  creator's previous vertex plus the tips it knew.
- The id is SHA-256 of the canonical CBOR of the map without "sig", so the
  id names the content and the signature is checked separately.
- The signature is the creator's over `DOMAIN + that same CBOR`; the domain
  prefix keeps a vertex signature from ever being valid as an envelope
  signature or the other way round.

Every `Vertex` is schema-valid by construction (the constructor checks the
fields and the body of its kind), so `decode` is strict and raises only
`protocol.errors.ProtocolError` subclasses.
"""

from __future__ import annotations

import math
import time as _time
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise
from typing import Any

from protocol import cbor
from protocol.digest import DIGEST_BYTES, sha256
from protocol.errors import LimitExceeded, MalformedCBOR, NonFiniteValues, SchemaError
from protocol.fields import check_bytes, check_float, check_int, check_list, is_int, is_number
from protocol.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, identity_id, verify

from . import kinds

VERSION = 1
DOMAIN = b"starling/vertex/v1\x00"
MAX_VERTEX_BYTES = 4 * 1024 * 1024  # a 10,000-record updates batch is about 1.4 MB
MAX_PARENTS = 256
MAX_SEQ = 2**63 - 1  # fits SQLite's INTEGER
MAX_TIME = 1e11  # unix seconds, year 5138
FIELDS = frozenset({"v", "kind", "creator", "seq", "parents", "time", "body", "sig"})


@dataclass(frozen=True)
class Vertex:
    """A decoded, schema-checked vertex. Its signature is checked by `verify_signature`."""

    kind: str
    creator: bytes  # the creating gateway's Ed25519 public key
    seq: int
    parents: tuple[bytes, ...]
    time: float
    body: dict[str, Any]
    sig: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str):
            raise SchemaError("kind must be text")
        kinds.check_kind(self.kind)
        check_bytes(self.creator, "creator", PUBLIC_KEY_BYTES)
        check_int(self.seq, "seq", 0, MAX_SEQ)
        parents = check_list(self.parents, "parents", MAX_PARENTS)
        for parent in parents:
            check_bytes(parent, "a parent", DIGEST_BYTES)
        if any(a >= b for a, b in pairwise(parents)):
            raise SchemaError("parents must be sorted bytewise without duplicates")
        object.__setattr__(self, "parents", tuple(parents))
        check_float(self.time, "time", 0.0, MAX_TIME)
        kinds.check_body(self.kind, self.body)
        check_bytes(self.sig, "sig", SIGNATURE_BYTES)

    def __hash__(self) -> int:  # the body is a dict; the id names the content anyway
        return hash(self.id)

    def __repr__(self) -> str:
        return (
            f"Vertex(kind={self.kind!r}, id={self.id_hex[:16]}, creator={self.creator_id}, "
            f"seq={self.seq}, parents={len(self.parents)})"
        )

    def _unsigned_doc(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "kind": self.kind,
            "creator": self.creator,
            "seq": self.seq,
            "parents": list(self.parents),
            "time": self.time,
            "body": self.body,
        }

    @cached_property
    def unsigned_bytes(self) -> bytes:
        """The canonical CBOR of the vertex without "sig": what the id hashes and the signature covers."""
        return cbor.dumps(self._unsigned_doc())

    @cached_property
    def id(self) -> bytes:
        """SHA-256 of `unsigned_bytes` (32 bytes)."""
        return sha256(self.unsigned_bytes)

    @property
    def id_hex(self) -> str:
        return self.id.hex()

    @property
    def creator_id(self) -> str:
        """The creator's printable identity id (protocol.keys.identity_id)."""
        return identity_id(self.creator)

    def encode(self) -> bytes:
        """The full wire form, signature included."""
        return cbor.dumps({**self._unsigned_doc(), "sig": self.sig})

    @classmethod
    def decode(cls, data: bytes) -> Vertex:
        """Decode and schema-check a vertex. Does NOT verify the signature.

        Raises `MalformedCBOR` / `NonCanonicalCBOR` / `LimitExceeded` for bad
        bytes and `SchemaError` for a wrong field; nothing else.
        """
        doc = cbor.loads(data, max_bytes=MAX_VERTEX_BYTES)
        if not isinstance(doc, dict):
            raise SchemaError("a vertex must be a map")
        if set(doc) != FIELDS:
            raise SchemaError(f"vertex fields are {sorted(map(str, doc))}, expected {sorted(FIELDS)}")
        if not is_int(doc["v"]) or doc["v"] != VERSION:
            raise SchemaError(f"vertex version {doc['v']!r} is not {VERSION}")
        if not isinstance(doc["parents"], list):
            raise SchemaError("parents must be a list")
        return cls(
            kind=doc["kind"],
            creator=doc["creator"],
            seq=doc["seq"],
            parents=tuple(doc["parents"]),
            time=doc["time"],
            body=doc["body"],
            sig=doc["sig"],
        )

    def verify_signature(self) -> None:
        """Check the creator's signature; raise `protocol.errors.BadSignature` if it does not verify."""
        verify(self.creator, DOMAIN + self.unsigned_bytes, self.sig)


def sign(
    identity: Identity,
    kind: str,
    seq: int,
    parents: list[bytes] | tuple[bytes, ...],
    body: dict[str, Any],
    time: float | None = None,
) -> Vertex:
    """Build and sign a vertex as `identity`. Parents are sorted and deduplicated; time defaults to now.

    Raises `ProtocolError` subclasses (SchemaError, LimitExceeded ...) if the
    fields or the body break the schema.
    """
    when = _time.time() if time is None else time
    if not is_number(when):
        raise SchemaError("time must be a number")
    when = float(when)
    if not math.isfinite(when):
        raise NonFiniteValues("time is not finite")
    kinds.check_body(kind, body)  # before encoding, so a bad body gets a schema error, not a CBOR one
    for parent in check_list(parents, "parents", MAX_PARENTS * 2):
        check_bytes(parent, "a parent", DIGEST_BYTES)
    doc = {
        "v": VERSION,
        "kind": kind,
        "creator": identity.public_key,
        "seq": seq,
        "parents": sorted(set(parents)),
        "time": when,
        "body": body,
    }
    try:
        unsigned = cbor.dumps(doc)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"vertex cannot be encoded: {exc}") from exc
    if len(unsigned) + 2 + SIGNATURE_BYTES > MAX_VERTEX_BYTES:
        raise LimitExceeded(f"vertex of {len(unsigned)} bytes is over {MAX_VERTEX_BYTES}")
    # Re-read what was encoded, so the Vertex holds exactly what a decoder will see
    # (lists, not tuples; bytes, not bytearrays).
    wire = cbor.loads(unsigned, max_bytes=MAX_VERTEX_BYTES, canonical=False)
    if not isinstance(wire, dict):
        raise MalformedCBOR("vertex did not encode as a map")
    vertex = Vertex(
        kind=kind,
        creator=identity.public_key,
        seq=wire["seq"],
        parents=tuple(wire["parents"]),
        time=wire["time"],
        body=wire["body"],
        sig=identity.sign(DOMAIN + unsigned),
    )
    vertex.__dict__["unsigned_bytes"] = unsigned  # prime the cache: the signer's bytes are canonical
    return vertex
