"""Gateway key rotation: the operator's root key says which key signs for a gateway next.

A gateway signs every task, release and receipt with its Ed25519 key, and a
device trusts the key it was flashed with. To replace that key (a routine
rotation, or one feared stolen) the operator signs, with the city's root key
(the key that signed the ledger's genesis), a statement "the gateway key OLD
is retired; NEW signs in its place". It goes on the ledger (a
`gateway.rotate` vertex, `starling-ledger rotate`) and into the gateway's
chain file, which the gateway publishes retained on `topics.keys`; a device
configured with the root key follows the chain from the key it trusts and
from then on refuses what the old key signs (`key_rotated`).

The gateway's id (its topics, the `gateway` of every message) stays the id of
its first key: devices, dashboards and scenario files keep naming it so.

Wire form of one statement (deterministic CBOR): {"old": pk, "new": pk,
"issued": unix seconds, "root": pk, "sig": bytes(64)}; the signature covers
the domain tag and the map without "sig". A chain is a CBOR list of encoded
statements, oldest first, each one's "new" the next one's "old".
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cbor
from .atomic import write_atomic
from .errors import BadSignature, ProtocolError, SchemaError
from .keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, identity_id, verify

DOMAIN = b"starling/key-rotation/v1\x00"
MAX_STATEMENT_BYTES = 256
MAX_CHAIN = 64  # rotations per gateway over its life; a chain file stays a few KB
FIELDS = ("old", "new", "issued", "root", "sig")


class RotationRefused(ProtocolError):
    """A well-formed rotation (or chain) that does not move this key: wrong root, broken link, bad signature."""

    reason = "bad_rotation"


@dataclass(frozen=True)
class KeyRotation:
    old: bytes
    new: bytes
    issued: float
    root: bytes
    sig: bytes = b""

    def _unsigned(self) -> dict[str, Any]:
        return {"old": self.old, "new": self.new, "issued": float(self.issued), "root": self.root}

    def signed_bytes(self) -> bytes:
        return DOMAIN + cbor.dumps(self._unsigned())

    def encode(self) -> bytes:
        return cbor.dumps({**self._unsigned(), "sig": self.sig})

    @classmethod
    def decode(cls, data: bytes) -> KeyRotation:
        doc = cbor.loads(data, max_bytes=MAX_STATEMENT_BYTES)
        if not isinstance(doc, dict) or set(doc) != set(FIELDS):
            raise SchemaError(f"a key rotation is a map of {', '.join(FIELDS)}")
        old, new, issued, root, sig = (doc[k] for k in FIELDS)
        for name, key in (("old", old), ("new", new), ("root", root)):
            if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
                raise SchemaError(f"rotation.{name} must be a 32-byte public key")
        if old == new:
            raise SchemaError("rotation.new must differ from rotation.old")
        if not isinstance(issued, float) or not 0 <= issued < 2**40:
            raise SchemaError("rotation.issued must be a float (unix seconds)")
        if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
            raise SchemaError("rotation.sig must be 64 bytes")
        return cls(old, new, issued, root, sig)

    def check(self, root_keys: Iterable[bytes]) -> None:
        """Raise `RotationRefused` unless a root key in `root_keys` signed this statement."""
        if self.root not in set(root_keys):
            raise RotationRefused("signed by a key that is not the city's root key")
        try:
            verify(self.root, self.signed_bytes(), self.sig)
        except BadSignature as exc:
            raise RotationRefused("the root key's signature does not verify") from exc


def issue(root: Identity, old: bytes, new: bytes) -> KeyRotation:
    """The root key's statement that `new` signs for the gateway whose key was `old`."""
    unsigned = KeyRotation(old, new, float(time.time()), root.public_key)
    return KeyRotation(old, new, unsigned.issued, root.public_key, root.sign(unsigned.signed_bytes()))


@dataclass(frozen=True)
class Chain:
    """A gateway's rotations, oldest first: `first` is the key its id comes from, `current` signs now."""

    rotations: tuple[KeyRotation, ...] = ()

    @property
    def first(self) -> bytes | None:
        return self.rotations[0].old if self.rotations else None

    def gateway_id(self, current: bytes) -> str:
        """The id a gateway whose key is `current` goes by: its first key's."""
        return identity_id(self.first if self.rotations else current)

    def keys(self) -> list[bytes]:
        """Every key this chain names, oldest first."""
        return [r.old for r in self.rotations] + [self.rotations[-1].new] if self.rotations else []

    def encode(self) -> bytes:
        return cbor.dumps([r.encode() for r in self.rotations])

    @classmethod
    def decode(cls, data: bytes) -> Chain:
        doc = cbor.loads(data, max_bytes=MAX_CHAIN * (MAX_STATEMENT_BYTES + 4) + 16)
        if not isinstance(doc, list) or len(doc) > MAX_CHAIN or not all(isinstance(r, bytes) for r in doc):
            raise SchemaError(f"a rotation chain is a list of at most {MAX_CHAIN} encoded rotations")
        chain = cls(tuple(KeyRotation.decode(r) for r in doc))
        for before, after in zip(chain.rotations, chain.rotations[1:]):
            if after.old != before.new:
                raise RotationRefused(f"the chain is broken: {identity_id(after.old)} was not the key before it")
        if len(set(chain.keys())) != len(chain.keys()):
            raise RotationRefused("the chain names a key twice: a retired key never comes back")
        return chain

    def then(self, rotation: KeyRotation) -> Chain:
        """This chain with `rotation` added (it must start from this chain's current key)."""
        if self.rotations and rotation.old != self.rotations[-1].new:
            raise RotationRefused(f"the rotation retires {identity_id(rotation.old)}, not the chain's current key")
        if rotation.new in self.keys():
            raise RotationRefused("a retired key never comes back")
        return Chain((*self.rotations, rotation))

    def check(self, root_keys: Iterable[bytes]) -> None:
        """Raise `RotationRefused` unless a root key in `root_keys` signed every rotation."""
        roots = tuple(root_keys)
        for rotation in self.rotations:
            rotation.check(roots)

    def follow(self, trusted: bytes, root_keys: Iterable[bytes]) -> tuple[bytes, list[bytes]]:
        """From the key a device trusts, the key it trusts after this chain and the keys that retires.

        Rotations before `trusted` are history the device lived through already; if `trusted` is not in
        the chain at all, the chain is about another gateway (or a forgery): nothing changes.
        """
        keys = self.keys()
        if trusted not in keys:
            return trusted, []
        self.check(root_keys)
        start = keys.index(trusted)
        return keys[-1], keys[start:-1]


def load_chain(path: Path) -> Chain:
    """A chain file; one that does not exist is an empty chain (the gateway never rotated)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Chain()
    return Chain.decode(data)


def save_chain(path: Path, chain: Chain) -> None:
    write_atomic(path, chain.encode(), mode=0o644)



def chain_ending_at(rotations: Iterable[KeyRotation], key: bytes) -> Chain:
    """The chain of `rotations` (e.g. every one on the ledger, of every gateway) that ends at `key`:
    the rotations that led to it, oldest first; empty if `key` was never a rotation's new key."""
    by_new = {r.new: r for r in rotations}
    links: list[KeyRotation] = []
    while key in by_new and len(links) < MAX_CHAIN:
        links.append(by_new[key])
        key = by_new[key].old
    chain = Chain()
    for rotation in reversed(links):
        chain = chain.then(rotation)
    return chain


def own_chain(path: Path | None, key: bytes) -> Chain:
    """A gateway's chain file (None: it never rotated), refused unless it ends at the gateway's `key`."""
    chain = Chain() if path is None else load_chain(path)
    if chain.rotations and chain.keys()[-1] != key:
        raise RotationRefused(f"{path} ends at key {identity_id(chain.keys()[-1])}, not this gateway's "
                              f"key {identity_id(key)}")
    return chain
