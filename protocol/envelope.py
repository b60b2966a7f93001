"""Signed envelopes: every Starling message is one.

Wire form (deterministic CBOR map):

    {"v": 1, "type": str, "ctx": {...}, "body": {...}, "sig": bytes[64],
     "att": bytes}                       # "att" only when there is an attachment

The signature covers `DOMAIN + dumps({"v", "type", "ctx", "body"})`. The
context names the sender's public key, the gateway, the round, the task id
and the base model digest, so a signed message cannot be replayed into
another round, task or gateway. Large payloads travel as an attachment whose
SHA-256 is `body["digest"]`: the signature covers 32 bytes, not megabytes,
and the ledger can re-verify a device's signature from the digest alone.

Decoding and verifying are separate steps so that a gateway can refuse an
unknown sender before it spends a signature check on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from . import cbor
from .digest import DIGEST_BYTES, sha256
from .errors import DigestMismatch, LimitExceeded, SchemaError, _brief
from .fields import is_int
from .keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, identity_id, verify

VERSION = 1
DOMAIN = b"starling/envelope/v1\x00"
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024
TYPES = frozenset({"enroll", "task", "reply", "receipt", "model", "delta", "mcu"})
ID_MAX = 64
# Task ids become file names on devices (state/pending/<round>-<task>.reply): no '/', NUL or space.
TASK_ID = re.compile(r"[A-Za-z0-9._-]{0,64}")


@dataclass(frozen=True)
class Context:
    """Who sent a message and what it is bound to."""

    sender: bytes  # Ed25519 public key of the signer
    gateway: str  # id of the gateway the exchange belongs to
    round: int = 0
    task: str = ""
    base: bytes = b""  # digest of the model the message builds on, or b""

    def to_wire(self) -> dict[str, Any]:
        return {
            "sender": self.sender,
            "gateway": self.gateway,
            "round": self.round,
            "task": self.task,
            "base": self.base,
        }

    @classmethod
    def from_wire(cls, doc: Any) -> Context:
        if not isinstance(doc, dict) or set(doc) != {"sender", "gateway", "round", "task", "base"}:
            raise SchemaError("ctx must be a map with sender, gateway, round, task, base")
        sender, gateway, rnd, task, base = (doc[k] for k in ("sender", "gateway", "round", "task", "base"))
        if not isinstance(sender, bytes) or len(sender) != PUBLIC_KEY_BYTES:
            raise SchemaError("ctx.sender must be a 32-byte public key")
        if not isinstance(gateway, str) or not 0 < len(gateway) <= ID_MAX:
            raise SchemaError("ctx.gateway must be a non-empty id")
        if not is_int(rnd) or not 0 <= rnd < 2**31:
            raise SchemaError("ctx.round must be an integer in [0, 2^31)")
        if not isinstance(task, str) or not TASK_ID.fullmatch(task):
            raise SchemaError("ctx.task must be at most 64 characters of A-Z a-z 0-9 . _ -")
        if not isinstance(base, bytes) or len(base) not in (0, DIGEST_BYTES):
            raise SchemaError("ctx.base must be empty or a 32-byte digest")
        return cls(sender, gateway, rnd, task, base)

    @property
    def sender_id(self) -> str:
        return identity_id(self.sender)


def signed_bytes(msg_type: str, ctx: Context, body: dict[str, Any]) -> bytes:
    """The exact bytes an envelope's signature covers."""
    return DOMAIN + cbor.dumps({"v": VERSION, "type": msg_type, "ctx": ctx.to_wire(), "body": body})


@dataclass(frozen=True)
class Envelope:
    """A decoded (and not yet verified) signed message."""

    type: str
    ctx: Context
    body: dict[str, Any]
    sig: bytes
    attachment: bytes | None = None

    def verify(self, public_key: bytes | None = None) -> None:
        """Check the signature (against `public_key`, default the sender's) and the attachment digest."""
        key = self.ctx.sender if public_key is None else public_key
        verify(key, signed_bytes(self.type, self.ctx, self.body), self.sig)
        if self.attachment is not None and sha256(self.attachment) != self.body.get("digest"):
            raise DigestMismatch("attachment does not hash to body.digest")

    @property
    def digest(self) -> bytes:
        """A digest that identifies this exact signed message."""
        return sha256(signed_bytes(self.type, self.ctx, self.body) + self.sig)


def seal(
    identity: Identity,
    msg_type: str,
    ctx: Context,
    body: dict[str, Any],
    attachment: bytes | None = None,
) -> bytes:
    """Sign and encode a message. With an attachment, `body["digest"]` is set to its SHA-256."""
    if msg_type not in TYPES:
        raise ValueError(f"unknown message type {msg_type!r}")
    if ctx.sender != identity.public_key:
        raise ValueError("ctx.sender must be the signer's public key")
    if attachment is not None:
        body = {**body, "digest": sha256(attachment)}
    sig = identity.sign(signed_bytes(msg_type, ctx, body))
    doc: dict[str, Any] = {"v": VERSION, "type": msg_type, "ctx": ctx.to_wire(), "body": body, "sig": sig}
    if attachment is not None:
        doc["att"] = attachment
    data = cbor.dumps(doc)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise LimitExceeded(f"envelope of {len(data)} bytes is over {MAX_ENVELOPE_BYTES}")
    return data


def decode(data: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Decode and schema-check an envelope. Does NOT verify the signature."""
    doc = cbor.loads(data, max_bytes=max_bytes)
    if not isinstance(doc, dict):
        raise SchemaError("an envelope must be a map")
    keys = set(doc)
    if not {"v", "type", "ctx", "body", "sig"} <= keys <= {"v", "type", "ctx", "body", "sig", "att"}:
        raise SchemaError(f"envelope fields are {sorted(map(_brief, keys))}")
    # type() is not int: true and 1.0 compare equal to 1 but encode differently,
    # and the signature covers VERSION, so they would verify under another encoding.
    if type(doc["v"]) is not int or doc["v"] != VERSION:
        raise SchemaError(f"envelope version {_brief(doc['v'])} is not {VERSION}")
    if not isinstance(doc["type"], str) or doc["type"] not in TYPES:
        raise SchemaError(f"unknown message type {_brief(doc['type'])}")
    if not isinstance(doc["body"], dict) or not all(isinstance(k, str) for k in doc["body"]):
        raise SchemaError("body must be a map with text keys")
    sig = doc["sig"]
    if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
        raise SchemaError("sig must be 64 bytes")
    attachment = doc.get("att")
    if "att" in doc:  # present means a byte string: "att": null is not "no attachment"
        if not isinstance(attachment, bytes):
            raise SchemaError("att must be a byte string")
        if not isinstance(doc["body"].get("digest"), bytes):
            raise SchemaError("a message with an attachment must carry body.digest")
    return Envelope(doc["type"], Context.from_wire(doc["ctx"]), doc["body"], sig, attachment)


def open_verified(data: bytes, expected_type: str, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Decode, check the type and verify the signature against the sender in ctx."""
    envelope = decode(data, max_bytes=max_bytes)
    if envelope.type != expected_type:
        raise SchemaError(f"expected a {expected_type!r} message, got {envelope.type!r}")
    envelope.verify()
    return envelope
