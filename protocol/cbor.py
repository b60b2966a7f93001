"""Deterministic CBOR (RFC 8949 section 4.2.1) on top of cbor2.

Signatures cover encoded bytes, so every party must produce the very same
bytes for the same value. cbor2's `canonical=True` gives preferred (shortest)
integers, floats and lengths, but sorts map keys length-first (the old RFC
7049 rule). RFC 8949 sorts keys by the bytewise order of their encodings; the
two differ only for maps that mix key types. So containers are assembled
here, with keys sorted bytewise, and cbor2 encodes every scalar.

`loads` is strict: no indefinite lengths, no duplicate keys, bounded depth
and size, no trailing bytes, and (by default) the input must re-encode to
itself, which rejects every non-deterministic encoding of a value.

Before cbor2 sees the bytes, a linear scan of the item headers refuses what
would let a few bytes cost a gateway minutes: tags other than the basic
RFC 8949 ones (value sharing and string references expand exponentially
when re-encoded; rationals, decimal fractions and sets cost quadratic time
or invite hash flooding), map keys that are arrays, maps or tags (engineered
hash collisions), and lengths longer than the remaining input.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from .errors import LimitExceeded, MalformedCBOR, NonCanonicalCBOR

MAX_DEPTH = 32
DEFAULT_MAX_BYTES = 8 * 1024 * 1024

# Tags `loads` accepts: date/times (0, 1), bignums (2, 3, which `dumps` itself
# writes for integers beyond 64 bits), and tags cbor2 leaves as inert
# `CBORTag`s (21-24 expected conversions / embedded CBOR, 32-34 URI, base64).
_ALLOWED_TAGS = frozenset({0, 1, 2, 3, 21, 22, 23, 24, 32, 33, 34})
# Major types a map key may have: unsigned / negative integer, byte / text string, simple / float.
_KEY_MAJORS = frozenset({0, 1, 2, 3, 7})


def _head(major: int, length: int) -> bytes:
    """The initial bytes of a data item of `major` type with argument `length`."""
    mt = major << 5
    if length < 24:
        return bytes([mt | length])
    if length < 0x100:
        return bytes([mt | 24, length])
    if length < 0x10000:
        return bytes([mt | 25]) + length.to_bytes(2, "big")
    if length < 0x100000000:
        return bytes([mt | 26]) + length.to_bytes(4, "big")
    return bytes([mt | 27]) + length.to_bytes(8, "big")


def _encode(obj: Any, depth: int) -> bytes:
    if depth > MAX_DEPTH:
        raise LimitExceeded(f"nesting deeper than {MAX_DEPTH}")
    if isinstance(obj, dict):
        items = sorted(
            ((_encode(k, depth + 1), _encode(v, depth + 1)) for k, v in obj.items()),
            key=lambda kv: kv[0],
        )
        for (a, _), (b, _) in zip(items, items[1:]):
            if a == b:
                raise ValueError("map has two keys with the same encoding")
        return _head(5, len(items)) + b"".join(k + v for k, v in items)
    if isinstance(obj, (list, tuple)):
        return _head(4, len(obj)) + b"".join(_encode(x, depth + 1) for x in obj)
    if isinstance(obj, cbor2.CBORTag):
        return _head(6, obj.tag) + _encode(obj.value, depth + 1)
    if isinstance(obj, bytearray | memoryview):
        obj = bytes(obj)
    return cbor2.dumps(obj, canonical=True)


def _scan(data: bytes) -> bool:
    """Walk the item headers of `data` (no recursion, linear time) and refuse what `loads` must not decode.

    Returns whether every map key is a text string (then cbor2's canonical
    order is RFC 8949's, and the canonical check can run in C).
    """
    text_keys = True
    end = len(data)
    pos = 0
    # Each frame: [items still to read, whether the container is a map].
    frames: list[list[Any]] = [[1, False]]
    while frames:
        frame = frames[-1]
        if frame[0] == 0:
            frames.pop()
            continue
        is_key = frame[1] and frame[0] % 2 == 0
        frame[0] -= 1
        if pos >= end:
            raise MalformedCBOR("truncated input")
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            arg = info
        elif info < 28:
            size = 1 << (info - 24)
            if pos + size > end:
                raise MalformedCBOR("truncated input")
            arg = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        elif info == 31:
            raise MalformedCBOR("indefinite-length items and breaks are not allowed")
        else:
            raise MalformedCBOR(f"reserved additional information {info}")
        if is_key and major not in _KEY_MAJORS:
            raise MalformedCBOR("map keys must be integers, strings or simple values")
        if is_key and major != 3:
            text_keys = False
        if major in (2, 3):
            if arg > end - pos:
                raise MalformedCBOR("truncated input")
            pos += arg
        elif major == 4:
            if arg > end - pos:
                raise MalformedCBOR("truncated input")
            frames.append([arg, False])
        elif major == 5:
            if 2 * arg > end - pos:
                raise MalformedCBOR("truncated input")
            frames.append([2 * arg, True])
        elif major == 6:
            if arg not in _ALLOWED_TAGS:
                raise MalformedCBOR(f"tag {arg} is not allowed")
            frames.append([1, False])
    if pos != end:
        raise MalformedCBOR(f"{end - pos} trailing bytes after the item")
    return text_keys


_SCALARS = frozenset({str, bytes, int, float, bool, type(None)})


def _text_keys_only(obj: Any, depth: int) -> bool:
    """True if every map in `obj` has text keys only and every leaf is a plain scalar."""
    if depth > MAX_DEPTH:
        return False
    kind = type(obj)
    if (kind is dict or kind is list or kind is tuple) and obj and depth >= MAX_DEPTH:
        return False  # its items would be too deep: the careful path raises LimitExceeded
    if kind is dict:
        for key, value in obj.items():
            if type(key) is not str:
                return False
            if type(value) not in _SCALARS and not _text_keys_only(value, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        for value in obj:
            if type(value) not in _SCALARS and not _text_keys_only(value, depth + 1):
                return False
        return True
    return kind in _SCALARS


def dumps(obj: Any) -> bytes:
    """Encode `obj` in RFC 8949 core deterministic encoding.

    Fast path: when every map key is a text string (all of Starling's own
    messages), cbor2's length-first canonical order is the same as RFC 8949's
    bytewise order (a text key's header grows with its length), so cbor2
    encodes the whole value in C. Anything else takes the careful path.
    """
    if _text_keys_only(obj, 0):
        return cbor2.dumps(obj, canonical=True)
    return _encode(obj, 0)


def loads(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, canonical: bool = True) -> Any:
    """Decode one CBOR data item, strictly.

    Raises `LimitExceeded` for oversize input, `MalformedCBOR` for anything
    that is not exactly one well-formed item (or uses a tag or a map key type
    that `_scan` refuses), and `NonCanonicalCBOR` when `canonical` is set and
    the bytes are not the deterministic encoding.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedCBOR(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise LimitExceeded(f"{len(data)} bytes is over the limit of {max_bytes}")
    if not data:
        raise MalformedCBOR("empty input")
    text_keys = _scan(data)
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            max_depth=MAX_DEPTH,
        )
        value = decoder.decode()
    except RecursionError as exc:
        raise MalformedCBOR("nesting too deep") from exc
    except Exception as exc:  # cbor2 raises many types for bad input
        raise MalformedCBOR(str(exc) or type(exc).__name__) from exc
    if stream.tell() != len(data):
        raise MalformedCBOR(f"{len(data) - stream.tell()} trailing bytes after the item")
    if canonical:
        try:
            again = cbor2.dumps(value, canonical=True) if text_keys else _encode(value, 0)
        except Exception as exc:
            raise NonCanonicalCBOR(f"value cannot be re-encoded: {exc}") from exc
        if again != data:
            raise NonCanonicalCBOR("bytes are not the deterministic encoding of their value")
    return value
