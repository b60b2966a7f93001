"""Content digests: SHA-256, as raw 32 bytes on the wire and hex in topics."""

import hashlib

DIGEST_BYTES = 32


def sha256(data: bytes) -> bytes:
    """The SHA-256 digest of `data` (32 bytes)."""
    return hashlib.sha256(data).digest()


def short(digest: bytes, n: int = 12) -> str:
    """A short hex prefix of a digest, for logs."""
    return digest.hex()[:n]
