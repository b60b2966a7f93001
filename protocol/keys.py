"""Ed25519 identities (PyNaCl) and their key files.

A device's or gateway's identity is its Ed25519 key pair. Its id is derived
from the public key, so nobody can claim an id without holding the key.
Key files hold the 32-byte seed as JSON, are written atomically with mode
0600, and are refused on load when group or others can read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from .atomic import write_atomic
from .errors import BadSignature, KeyFileError, _brief

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
KEY_FILE_TYPE = "starling-ed25519-v1"


def identity_id(public_key: bytes) -> str:
    """The stable, printable id of the holder of `public_key` (32 hex chars, 128 bits).

    Safe to use in MQTT topics: only [0-9a-f]. 128 bits so that nobody can
    make two keys with one id (with 64 bits, ~2^32 tries find such a pair).
    """
    return hashlib.sha256(b"starling-id" + public_key).hexdigest()[:32]


def node_id(public_key: bytes) -> int:
    """The integer node id Flower uses for this key (fits in a signed 64-bit int)."""
    return int(identity_id(public_key)[:16], 16) >> 1


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature; raise `BadSignature` if it does not verify."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        raise BadSignature("public key or signature has the wrong length")
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError) as exc:
        raise BadSignature("signature does not verify") from exc


@dataclass(frozen=True)
class Identity:
    """An Ed25519 private key with its derived public key and id."""

    signing_key: nacl.signing.SigningKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise KeyFileError("an Ed25519 seed is 32 bytes")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def id(self) -> str:
        return identity_id(self.public_key)

    @property
    def node_id(self) -> int:
        return node_id(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached signature of `message`."""
        return self.signing_key.sign(message).signature

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key file atomically, readable by its owner only."""
        doc = {
            "type": KEY_FILE_TYPE,
            "seed": bytes(self.signing_key).hex(),
            "public_key": self.public_key.hex(),
            "id": self.id,
        }
        write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o600)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a key file; refuse one that others can read or that is inconsistent."""
        path = Path(path)
        try:
            mode = path.stat().st_mode
            raw = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"key file {path} has mode {stat.S_IMODE(mode):o}; it must be 600 (chmod 600 {path})"
            )
        try:
            doc = json.loads(raw.decode("utf-8"))  # UnicodeDecodeError is a ValueError
            if doc.get("type") != KEY_FILE_TYPE:
                raise ValueError(f"type is {_brief(doc.get('type'))}, expected {KEY_FILE_TYPE!r}")
            identity = cls.from_seed(bytes.fromhex(doc["seed"]))
        # RecursionError: JSON nested thousands deep.
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise KeyFileError(f"key file {path} is malformed: {exc}") from exc
        if "public_key" in doc and doc["public_key"] != identity.public_key.hex():
            raise KeyFileError(f"key file {path}: public key does not match the seed")
        return identity


def load_or_create(path: str | os.PathLike[str]) -> Identity:
    """Load the key at `path`, creating it first if there is none."""
    if not Path(path).exists():
        Identity.generate().save(path)
    return Identity.load(path)
