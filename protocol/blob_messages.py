"""The blob exchange's messages: fetching update and model bytes by digest between gateways (and auditors).

    starling/blobs/want/<holder>      {"from": requester, "want": [digest, ...]}        (at most MAX_WANT digests)
    starling/blobs/give/<requester>   {"from": holder, "digest": d, "chunk": i, "chunks": n, "size": bytes,
                                       "data": the i-th CHUNK_BYTES of the blob}
                                      or {"from": holder, "digest": d, "absent": "missing" | "busy"}

Deterministic CBOR, not signed: what a requester asks for is a digest it
read on the ledger, and it keeps a blob only if the reassembled bytes hash to
that digest. A forged or wrong answer can make a fetch fail (then it is asked
of another holder); it can never make anyone keep bytes under a digest they
do not hash to. Who may read and write these topics is the broker's ACL.

Decoding is strict and bounded: sizes are checked before CBOR is parsed, and
a chunk's numbering and length must agree with the blob size it claims, so a
requester can refuse a bad chunk on its own, before the digest check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from . import cbor
from .digest import DIGEST_BYTES
from .errors import LimitExceeded, SchemaError
from .fields import check_bytes, check_int, check_list, check_text
from .schemas import CHUNK_BYTES, MAX_MODEL_BYTES

MAX_BLOB_BYTES = MAX_MODEL_BYTES  # the largest honest blob: a model (an update is at most 2 MB)
MAX_WANT = 32  # digests named in one want
MAX_WANT_BYTES = 4096  # a want with MAX_WANT digests is about 1.2 KB
MAX_GIVE_BYTES = CHUNK_BYTES + 512  # one chunk and its header
ABSENT_REASONS = ("missing", "busy")  # the holder lacks it; the holder is over its serving budget right now
NODE_ID = re.compile(r"[0-9a-f]{32}")  # a gateway's or an auditor's identity id: a safe topic segment


def chunk_count(size: int) -> int:
    """How many chunks a blob of `size` bytes travels in (an empty blob: one empty chunk)."""
    return max(1, -(-size // CHUNK_BYTES))


def chunk_length(size: int, index: int) -> int:
    """The exact length of chunk `index` of a blob of `size` bytes."""
    return min(CHUNK_BYTES, size - index * CHUNK_BYTES)


def _node(value: Any, name: str) -> str:
    if not isinstance(value, str) or not NODE_ID.fullmatch(value):
        raise SchemaError(f"{name} must be a node id (32 lowercase hex characters)")
    return value


def _map(payload: bytes, max_bytes: int, what: str) -> dict[str, Any]:
    if len(payload) > max_bytes:  # before any parsing: a flood of big payloads costs a length check each
        raise LimitExceeded(f"a {what} of {len(payload)} bytes is over {max_bytes}")
    doc = cbor.loads(payload, max_bytes=max_bytes)
    if not isinstance(doc, dict):
        raise SchemaError(f"a {what} must be a map")
    return doc


@dataclass(frozen=True)
class Want:
    sender: str  # the requester: answers go to starling/blobs/give/<sender>
    digests: tuple[bytes, ...]

    def encode(self) -> bytes:
        if not 1 <= len(self.digests) <= MAX_WANT:
            raise ValueError(f"a want names 1 to {MAX_WANT} digests")
        return cbor.dumps({"from": self.sender, "want": list(self.digests)})

    @classmethod
    def decode(cls, payload: bytes) -> Want:
        doc = _map(payload, MAX_WANT_BYTES, "want")
        if set(doc) != {"from", "want"}:
            raise SchemaError("a want is {from, want}")
        digests = check_list(doc["want"], "want", MAX_WANT, 1)
        return cls(_node(doc["from"], "from"), tuple(dict.fromkeys(
            check_bytes(d, "want digest", DIGEST_BYTES) for d in digests)))


@dataclass(frozen=True)
class Chunk:
    sender: str  # the holder that sent it (unauthenticated: for logs and failover only)
    digest: bytes
    index: int
    count: int
    size: int  # the whole blob's bytes
    data: bytes

    def encode(self) -> bytes:
        return cbor.dumps({"from": self.sender, "digest": self.digest, "chunk": self.index, "chunks": self.count,
                           "size": self.size, "data": self.data})


@dataclass(frozen=True)
class Absent:
    sender: str
    digest: bytes
    reason: str  # one of ABSENT_REASONS

    def encode(self) -> bytes:
        return cbor.dumps({"from": self.sender, "digest": self.digest, "absent": self.reason})


def split(sender: str, digest: bytes, data: bytes) -> list[Chunk]:
    """The chunks a holder sends for a blob."""
    count = chunk_count(len(data))
    return [Chunk(sender, digest, i, count, len(data), data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES])
            for i in range(count)]


def decode_give(payload: bytes, max_blob_bytes: int = MAX_BLOB_BYTES) -> Chunk | Absent:
    """A message on a give topic: a chunk whose numbering and length agree with its claimed size (at most
    `max_blob_bytes`), or an absent answer. Raises a ProtocolError (its `reason` says why) for anything else."""
    doc = _map(payload, MAX_GIVE_BYTES, "give")
    if set(doc) == {"from", "digest", "absent"}:
        reason = check_text(doc["absent"], "absent", 16)
        if reason not in ABSENT_REASONS:
            raise SchemaError(f"absent must be one of {ABSENT_REASONS}")
        return Absent(_node(doc["from"], "from"), check_bytes(doc["digest"], "digest", DIGEST_BYTES), reason)
    if set(doc) != {"from", "digest", "chunk", "chunks", "size", "data"}:
        raise SchemaError("a give is {from, digest, chunk, chunks, size, data} or {from, digest, absent}")
    size = check_int(doc["size"], "size", 0, max_blob_bytes)
    count = check_int(doc["chunks"], "chunks", 1, chunk_count(max_blob_bytes))
    index = check_int(doc["chunk"], "chunk", 0, count - 1)
    data = doc["data"]
    if count != chunk_count(size):
        raise SchemaError(f"a blob of {size} bytes travels in {chunk_count(size)} chunks, not {count}")
    if not isinstance(data, bytes) or len(data) != chunk_length(size, index):
        raise SchemaError(f"chunk {index} of a {size}-byte blob must be {chunk_length(size, index)} bytes")
    return Chunk(_node(doc["from"], "from"), check_bytes(doc["digest"], "digest", DIGEST_BYTES), index, count,
                 size, data)
