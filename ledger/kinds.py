"""The kinds of vertex and the schema of each one's body.

A `Vertex` checks its body against its kind when it is built (`check_body`),
so every vertex in hand is schema-valid. A schema checks types and limits
only and raises `protocol.errors.ProtocolError` subclasses (SchemaError,
LimitExceeded); what a kind means to the DAG (its rules against the state
so far, and what it adds to it) is in `ledger.kind_rules`.

    genesis        {"name": str, "gateways": [public key, ...] sorted, no duplicates}
    gateway.join   {"gateway": public key, "name": str}
    gateway.leave  {"gateway": public key, "reason": str}
    device.enroll  {"device": public key, "name": str, "policy": str}
    device.revoke  {"device": public key, "reason": str}
    updates        {"gateway": str, "round": int, "task": str, "base": digest,
                    "records": [[device key, update digest, examples, device signature], ...]}
    aggregate      {"round": int, "strategy": str, "base": digest, "inputs": [update digests], "output": digest}
    checkpoint     {"count": int, "state": digest}
    lineage        {"model": digest, "version": int, "previous": digest or b"", "reason": str,
                    "architecture": str}

Bodies are deliberately compact: an update record is a 4-item list, not a
map, because there are thousands per round and each one stays on disk
forever.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

from protocol.digest import DIGEST_BYTES
from protocol.envelope import ID_MAX, Context, signed_bytes
from protocol.errors import SchemaError
from protocol.fields import check_bytes, check_fields, check_int, check_list, check_text
from protocol.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, identity_id
from protocol.schemas import MAX_EXAMPLES

GENESIS = "genesis"
GATEWAY_JOIN = "gateway.join"
GATEWAY_LEAVE = "gateway.leave"
DEVICE_ENROLL = "device.enroll"
DEVICE_REVOKE = "device.revoke"
UPDATES = "updates"
AGGREGATE = "aggregate"
CHECKPOINT = "checkpoint"
LINEAGE = "lineage"

MAX_GATEWAYS = 62  # members ever (each has a bit in a 64-bit SQLite integer for finality)
MAX_RECORDS = 10_000  # per updates vertex; a gateway records a bigger round in several batches
MAX_INPUTS = 50_000  # per aggregate
MAX_ROUND = 2**31 - 1  # as protocol.envelope.Context
NAME_MAX = 64
REASON_MAX = 256  # a revocation's reason, kept for auditors
STRATEGY_MAX = 256  # room for a user strategy's import path
ARCHITECTURE_MAX = 256  # a model architecture id (a hex digest in practice)
MAX_VERSION = 2**63 - 1  # a release version; fits SQLite's INTEGER
RECORD_FIELDS = 4  # [device public key, update digest, examples, device signature]


def _genesis(body: dict[str, Any]) -> None:
    """The root: the DAG's name and its first gateways (their keys sorted bytewise, no duplicates)."""
    check_fields(body, {"name", "gateways"}, "genesis body")
    check_text(body["name"], "name", NAME_MAX, 1)
    gateways = check_list(body["gateways"], "gateways", MAX_GATEWAYS, 1)
    for key in gateways:
        check_bytes(key, "a gateway key", PUBLIC_KEY_BYTES)
    if any(a >= b for a, b in pairwise(gateways)):
        raise SchemaError("gateways must be sorted bytewise without duplicates")


def _gateway_join(body: dict[str, Any]) -> None:
    check_fields(body, {"gateway", "name"}, "gateway.join body")
    check_bytes(body["gateway"], "gateway", PUBLIC_KEY_BYTES)
    check_text(body["name"], "name", NAME_MAX)


def _gateway_leave(body: dict[str, Any]) -> None:
    check_fields(body, {"gateway", "reason"}, "gateway.leave body")
    check_bytes(body["gateway"], "gateway", PUBLIC_KEY_BYTES)
    check_text(body["reason"], "reason", REASON_MAX)


def _device_enroll(body: dict[str, Any]) -> None:
    check_fields(body, {"device", "name", "policy"}, "device.enroll body")
    check_bytes(body["device"], "device", PUBLIC_KEY_BYTES)
    check_text(body["name"], "name", NAME_MAX)
    check_text(body["policy"], "policy", NAME_MAX, 1)


def _device_revoke(body: dict[str, Any]) -> None:
    check_fields(body, {"device", "reason"}, "device.revoke body")
    check_bytes(body["device"], "device", PUBLIC_KEY_BYTES)
    check_text(body["reason"], "reason", REASON_MAX)


def _updates(body: dict[str, Any]) -> None:
    """A batch of accepted updates: at most one record per device, each re-checkable from its fields alone
    (see `reply_signed_bytes`)."""
    check_fields(body, {"gateway", "round", "task", "base", "records"}, "updates body")
    check_text(body["gateway"], "gateway", ID_MAX, 1)
    check_int(body["round"], "round", 0, MAX_ROUND)
    check_text(body["task"], "task", ID_MAX)
    check_bytes(body["base"], "base", DIGEST_BYTES)
    records = check_list(body["records"], "records", MAX_RECORDS, 1)
    devices = set()
    for i, record in enumerate(records):
        check_list(record, f"record {i}", RECORD_FIELDS, RECORD_FIELDS)
        device, digest, examples, signature = record
        check_bytes(device, f"record {i} device", PUBLIC_KEY_BYTES)
        check_bytes(digest, f"record {i} digest", DIGEST_BYTES)
        check_int(examples, f"record {i} examples", 0, MAX_EXAMPLES)
        check_bytes(signature, f"record {i} signature", SIGNATURE_BYTES)
        if device in devices:
            raise SchemaError(f"record {i}: device {identity_id(device)} appears twice in the batch")
        devices.add(device)


def _aggregate(body: dict[str, Any]) -> None:
    """A round's new model (`output`), the model it started from (`base`) and the updates it was built from."""
    check_fields(body, {"round", "strategy", "base", "inputs", "output"}, "aggregate body")
    check_int(body["round"], "round", 0, MAX_ROUND)
    check_text(body["strategy"], "strategy", STRATEGY_MAX, 1)
    check_bytes(body["base"], "base", DIGEST_BYTES)
    inputs = check_list(body["inputs"], "inputs", MAX_INPUTS, 1)
    for i, digest in enumerate(inputs):
        check_bytes(digest, f"input {i}", DIGEST_BYTES)
    if len(set(inputs)) != len(inputs):
        raise SchemaError("inputs name an update twice")
    check_bytes(body["output"], "output", DIGEST_BYTES)


def _checkpoint(body: dict[str, Any]) -> None:
    """The vertices in the checkpoint's causal past, and the SHA-256 of their `ledger.snapshot`."""
    check_fields(body, {"count", "state"}, "checkpoint body")
    check_int(body["count"], "count", 1, 2**62)
    check_bytes(body["state"], "state", DIGEST_BYTES)


def _lineage(body: dict[str, Any]) -> None:
    """Where a model lineage starts: its first model, the release version the gateway gave it, the last
    model of the lineage it replaces (b"" if none; it may equal `model`: a reset to the factory weights
    before any round ran restarts at the model it leaves), why, and the model's architecture id."""
    check_fields(body, {"model", "version", "previous", "reason", "architecture"}, "lineage body")
    check_bytes(body["model"], "model", DIGEST_BYTES)
    check_int(body["version"], "version", 0, MAX_VERSION)
    previous = body["previous"]  # empty bytes: the first lineage, nothing replaced
    if not isinstance(previous, bytes) or len(previous) not in (0, DIGEST_BYTES):
        raise SchemaError(f"previous must be {DIGEST_BYTES} bytes, or empty bytes when there was none")
    check_text(body["reason"], "reason", REASON_MAX, 1)
    check_text(body["architecture"], "architecture", ARCHITECTURE_MAX, 1)


KINDS: dict[str, Callable[[dict[str, Any]], None]] = {
    GENESIS: _genesis,
    GATEWAY_JOIN: _gateway_join,
    GATEWAY_LEAVE: _gateway_leave,
    DEVICE_ENROLL: _device_enroll,
    DEVICE_REVOKE: _device_revoke,
    UPDATES: _updates,
    AGGREGATE: _aggregate,
    CHECKPOINT: _checkpoint,
    LINEAGE: _lineage,
}


def check_kind(name: Any) -> None:
    """Raise SchemaError unless `name` is a kind of vertex."""
    _schema_of(name)


def check_body(kind: str, body: Any) -> None:
    """Schema-check a body for its kind. Raises ProtocolError subclasses."""
    schema = _schema_of(kind)
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise SchemaError("body must be a map with text keys")
    schema(body)


def _schema_of(name: Any) -> Callable[[dict[str, Any]], None]:
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise SchemaError(f"unknown vertex kind {name!r}") from None


def reply_signed_bytes(
    device: bytes, gateway: str, round: int, task: str, base: bytes, digest: bytes, examples: int
) -> bytes:
    """The bytes a device signed when it sent the reply an update record stands for: the "reply"
    envelope with context (device, gateway, round, task, base) and body {"digest", "examples"}."""
    ctx = Context(sender=device, gateway=gateway, round=round, task=task, base=base)
    return signed_bytes("reply", ctx, {"digest": digest, "examples": examples})
