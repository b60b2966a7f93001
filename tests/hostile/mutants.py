"""Hostile variants of real Starling messages, for the hostile-input suite.

Every mutant starts from a real message (a sealed envelope with a real
signature, a real vertex, a real control map) and changes it in one of three
ways, all deterministic for a given seed:

* bytes: flips, truncations, insertions, deletions, duplicated or spliced ranges,
  and CBOR heads dropped in at random places (huge lengths, indefinite
  lengths, breaks, tags, NaN/inf floats, 64-bit integers);
* structure: the message is decoded, one node of its tree (or of a CBOR
  document nested in a byte string, such as an update attachment) is replaced
  by a hostile value (another type, NaN/inf, huge numbers, deep nesting, long
  text, wrong shapes), a key is dropped, added or renamed; the tree is then
  encoded canonically, or deliberately not (long heads, unsorted or duplicate
  keys, indefinite lengths, wider floats);
* re-signed: the same structural change to an envelope's ctx/body/attachment,
  then sealed again with a real key, so the signature verifies and only the
  meaning is hostile (wrong round, wrong shapes, oversize, NaN updates ...).

`Mutator.mutate` never returns the original bytes.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable
from typing import Any

import cbor2

from protocol import cbor, envelope
from protocol.digest import sha256
from protocol.keys import Identity

# CBOR heads that decoders must survive wherever they land.
HOSTILE_HEADS = [
    b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff",  # byte string of 2^64-1 bytes
    b"\x7b\x7f\xff\xff\xff\xff\xff\xff\xff",  # text string of 2^63-1 bytes
    b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00",  # array of 2^32 items
    b"\xbb\xff\xff\xff\xff\xff\xff\xff\xff",  # map of 2^64-1 pairs
    b"\x9f", b"\xbf", b"\x5f", b"\x7f", b"\xff",  # indefinite lengths and a stray break
    b"\xf9\x7e\x00", b"\xfb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # NaN (f16), +inf (f64)
    b"\xfa\xff\x80\x00\x00",  # -inf (f32)
    b"\x1b\xff\xff\xff\xff\xff\xff\xff\xff", b"\x3b\xff\xff\xff\xff\xff\xff\xff\xff",  # +-2^64
    b"\xc2\x49\x01\x00\x00\x00\x00\x00\x00\x00\x00",  # bignum tag
    b"\xd8\x18\x41\x00", b"\xd9\xd9\xf7",  # embedded CBOR tag, self-describe tag
    b"\xc1\xfb\x41\xd0\x00\x00\x00\x00\x00\x00",  # epoch date tag
    b"\x1c", b"\xfc", b"\xf8\x00", b"\xf7", b"\xf6",  # reserved info, bad simple, undefined, null
    b"\x81" * 40 + b"\x00",  # 40 nested arrays
]


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


HOSTILE_VALUES: list[Callable[[random.Random], Any]] = [
    lambda r: None, lambda r: True, lambda r: False, lambda r: 0, lambda r: -1, lambda r: 1,
    lambda r: 2**31, lambda r: 2**63 - 1, lambda r: 2**64 - 1, lambda r: -(2**64),
    lambda r: math.nan, lambda r: math.inf, lambda r: -math.inf, lambda r: 1e308, lambda r: -0.0, lambda r: 1.5,
    lambda r: "", lambda r: "x" * r.choice([1, 64, 65, 257, 5000]), lambda r: "\u0000\ud7ff\U0010ffff",
    lambda r: b"", lambda r: bytes(r.choice([1, 31, 32, 33, 63, 64, 65])), lambda r: r.randbytes(32),
    lambda r: [], lambda r: {}, lambda r: [0] * r.choice([3, 17, 300]), lambda r: {"": None},
    lambda r: {str(i): i for i in range(r.choice([17, 40]))},
    lambda r: _deep(r.choice([31, 33, 60])), lambda r: [1, [2, [3, math.nan]]],
    lambda r: {"k": {"k": {"k": b""}}}, lambda r: r.randbytes(r.choice([1, 8, 200])),
]


class Loose:
    """A CBOR encoder that can break RFC 8949 deterministic-encoding rules on purpose."""

    def __init__(self, rng: random.Random, sloppiness: float) -> None:
        self.rng = rng
        self.p = sloppiness

    def _sloppy(self) -> bool:
        return self.rng.random() < self.p

    def head(self, major: int, n: int) -> bytes:
        widths = [w for w, lim in ((0, 24), (1, 1 << 8), (2, 1 << 16), (4, 1 << 32), (8, 1 << 64)) if n < lim]
        width = self.rng.choice(widths) if self._sloppy() else widths[0]
        if width == 0:
            return bytes([major << 5 | n])
        info = {1: 24, 2: 25, 4: 26, 8: 27}[width]
        return bytes([major << 5 | info]) + n.to_bytes(width, "big")

    def encode(self, obj: Any) -> bytes:
        if obj is None:
            return b"\xf6"
        if obj is True or obj is False:
            return b"\xf5" if obj else b"\xf4"
        if isinstance(obj, int):
            if not -(1 << 64) <= obj < (1 << 64):
                return cbor2.dumps(obj)
            return self.head(0, obj) if obj >= 0 else self.head(1, -1 - obj)
        if isinstance(obj, float):
            if self._sloppy():
                return b"\xfb" + struct.pack(">d", obj)
            return cbor2.dumps(obj, canonical=True)
        if isinstance(obj, bytes | bytearray):
            if self._sloppy() and obj:
                cut = self.rng.randrange(len(obj))
                return b"\x5f" + self.head(2, cut) + obj[:cut] + self.head(2, len(obj) - cut) + obj[cut:] + b"\xff"
            return self.head(2, len(obj)) + bytes(obj)
        if isinstance(obj, str):
            raw = obj.encode("utf-8", "surrogatepass")
            return self.head(3, len(raw)) + raw
        if isinstance(obj, list | tuple):
            items = b"".join(self.encode(v) for v in obj)
            if self._sloppy():
                return b"\x9f" + items + b"\xff"
            return self.head(4, len(obj)) + items
        if isinstance(obj, dict):
            pairs = [(self.encode(k), self.encode(v)) for k, v in obj.items()]
            if self._sloppy():
                self.rng.shuffle(pairs)  # unsorted keys
            else:
                pairs.sort(key=lambda kv: kv[0])
            if pairs and self._sloppy():
                pairs.append(self.rng.choice(pairs))  # a duplicate key
            body = b"".join(k + v for k, v in pairs)
            if self._sloppy():
                return b"\xbf" + body + b"\xff"
            return self.head(5, len(pairs)) + body
        return cbor2.dumps(obj)


def _nodes(tree: Any, out: list, depth: int = 0) -> list:
    """(container, key) for every node below `tree`, nested CBOR in byte strings included."""
    if depth > 12:
        return out
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in list(items):
        out.append((tree, key))
        if isinstance(value, dict | list):
            _nodes(value, out, depth + 1)
    return out


def _try_nested(value: bytes) -> Any:
    if len(value) < 2 or value[0] >> 5 not in (4, 5):
        return None
    try:
        doc = cbor2.loads(value)
    except Exception:  # noqa: BLE001 (hostile bytes: the decoder raises many types)
        return None
    return doc if isinstance(doc, dict | list) else None


class Mutator:
    """Hostile variants of one real message; deterministic for a seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    # --- bytes --------------------------------------------------------------------------

    def flip_bytes(self, data: bytes) -> bytes:
        out = bytearray(data)
        for _ in range(self.rng.choice([1, 1, 1, 2, 4, 16])):
            i = self.rng.randrange(len(out))
            out[i] = (out[i] ^ (1 << self.rng.randrange(8))) if self.rng.random() < 0.5 else self.rng.randrange(256)
        return bytes(out)

    def truncate(self, data: bytes) -> bytes:
        return data[: self.rng.randrange(len(data))]

    def insert(self, data: bytes) -> bytes:
        i = self.rng.randrange(len(data) + 1)
        piece = self.rng.choice(HOSTILE_HEADS) if self.rng.random() < 0.6 else self.rng.randbytes(self.rng.randint(1, 16))
        return data[:i] + piece + data[i:]

    def overwrite_head(self, data: bytes) -> bytes:
        i = self.rng.randrange(len(data))
        piece = self.rng.choice(HOSTILE_HEADS)
        return data[:i] + piece + data[i + len(piece):]

    def delete(self, data: bytes) -> bytes:
        i = self.rng.randrange(len(data))
        return data[:i] + data[i + self.rng.randint(1, 32):]

    def duplicate(self, data: bytes) -> bytes:
        i = self.rng.randrange(len(data))
        j = min(len(data), i + self.rng.randint(1, 64))
        return data[:j] + data[i:j] + data[j:]

    def append(self, data: bytes) -> bytes:
        return data + self.rng.choice([b"\x00", b"\xf6", data[:8], self.rng.randbytes(3)])

    def byte_level(self, data: bytes) -> bytes:
        ops = [self.flip_bytes, self.flip_bytes, self.truncate, self.insert, self.overwrite_head, self.delete,
               self.duplicate, self.append]
        return self.rng.choice(ops)(data) if data else self.rng.randbytes(4)

    # --- structure ----------------------------------------------------------------------

    def mutate_tree(self, tree: Any, protect: frozenset[str] = frozenset()) -> Any:
        """Change one node of a decoded tree in place (descending into nested CBOR byte strings)."""
        nodes = [(c, k) for c, k in _nodes(tree, []) if not (c is tree and k in protect)]
        if not nodes:
            return self.rng.choice(HOSTILE_VALUES)(self.rng)
        container, key = self.rng.choice(nodes)
        value = container[key]
        if isinstance(value, bytes) and self.rng.random() < 0.7:
            nested = _try_nested(value)
            if nested is not None:  # e.g. an update inside an attachment: change it inside
                nested = self.mutate_tree(nested)
                container[key] = Loose(self.rng, 0.0).encode(nested) if self.rng.random() < 0.8 else cbor2.dumps(nested)
                return tree
        choice = self.rng.random()
        if isinstance(container, dict) and choice < 0.1:
            del container[key]
        elif isinstance(container, dict) and choice < 0.2:
            renamed = key + "x" if isinstance(key, str) else "x"  # a nested map may have int or bytes keys
            container[self.rng.choice(["extra", "", "v", "sig", renamed, 7, b"k"])] = 1
        elif isinstance(container, list) and choice < 0.2:
            if self.rng.random() < 0.5:
                del container[key]
            else:
                container.insert(key, value)
        elif isinstance(value, int) and not isinstance(value, bool) and choice < 0.45:
            container[key] = self.rng.choice([value + 1, value - 1, value * 1000, -value - 1, float(value), 2**63])
        elif isinstance(value, float) and choice < 0.45:
            container[key] = self.rng.choice([math.nan, math.inf, -math.inf, -value, value * 1e300, int(value)
                                              if math.isfinite(value) else 0])
        elif isinstance(value, str) and choice < 0.45:
            container[key] = self.rng.choice([value + "x", value[:-1], value.upper(), value.encode(), "\u00e9" * 40])
        elif isinstance(value, bytes) and choice < 0.45:
            container[key] = self.rng.choice([value[:-1], value + b"\0", value.decode("latin-1"), b"",
                                              bytes(len(value)), value * 2])
        else:
            container[key] = self.rng.choice(HOSTILE_VALUES)(self.rng)
        return tree

    def structural(self, data: bytes) -> bytes:
        try:
            tree = cbor2.loads(data)
        except Exception:  # noqa: BLE001 (a bent tree: encoding it fails in many ways)
            return self.byte_level(data)
        tree = self.mutate_tree(tree)
        return self.encode(tree)

    def encode(self, tree: Any) -> bytes:
        sloppiness = 0.0 if self.rng.random() < 0.6 else self.rng.choice([0.05, 0.3])
        try:
            return Loose(self.rng, sloppiness).encode(tree)
        except Exception:  # noqa: BLE001 (a bent tree: encoding it fails in many ways)
            return cbor2.dumps(tree)

    def resealed(self, data: bytes, identity: Identity) -> bytes:
        """A structural change to ctx/body/att, then signed again by `identity`: it verifies."""
        doc = cbor2.loads(data)
        inner = {k: doc[k] for k in ("ctx", "body") if k in doc}
        if "att" in doc:
            inner["att"] = doc["att"]
        self.mutate_tree(inner, protect=frozenset({"ctx", "body"}) if self.rng.random() < 0.2 else frozenset())
        doc.update({k: inner[k] for k in inner})
        if not isinstance(doc.get("ctx"), dict):
            return self.encode(doc)
        doc["ctx"]["sender"] = identity.public_key
        if isinstance(doc.get("att"), bytes) and isinstance(doc.get("body"), dict):
            doc["body"]["digest"] = sha256(doc["att"])
        try:
            signed = envelope.DOMAIN + cbor.dumps({"v": doc["v"], "type": doc["type"], "ctx": doc["ctx"],
                                                   "body": doc["body"]})
            doc["sig"] = identity.sign(signed)
            return cbor.dumps(doc)
        except Exception:  # noqa: BLE001 (a bent tree: encoding it fails in many ways)
            return self.encode(doc)

    # --- all together ---------------------------------------------------------------------

    def mutate(self, data: bytes, identity: Identity | None = None, resign_share: float = 0.2) -> bytes:
        for _ in range(20):
            roll = self.rng.random()
            if identity is not None and roll < resign_share:
                out = self.resealed(data, identity)
            elif roll < 0.6:
                out = self.byte_level(data)
            else:
                out = self.structural(data)
            if out != data:
                return out
        return data + b"\x00"

    def many(self, seeds: list[bytes], n: int, identity: Identity | None = None,
             resign_share: float = 0.2) -> list[bytes]:
        return [self.mutate(self.rng.choice(seeds), identity, resign_share) for _ in range(n)]
