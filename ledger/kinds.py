"""The kinds of vertex: each one's body schema, its rules against the DAG, and its effect.

A kind is a class with four steps, run in this order by `ledger.validate`:

    check_body(body)          schema only; raises ProtocolError (SchemaError, LimitExceeded)
    check_state(vertex, st)   rules against the DAG so far; raises LedgerError
    check_proofs(vertex)      costly stateless checks (device signatures); raises LedgerError
    apply(vertex, st)         what the vertex adds to the derived state

State is checked before proofs so that a record from an unknown device is
refused before any signature check is spent on it. A later kind (membership
change, model release, checkpoint) is one more class in `KINDS`.

A model's lineage is on the ledger as a chain: each `aggregate` names the
model it started from (`base`) and the one it made (`output`), and a
`lineage` vertex marks where a chain starts (the factory weights at first
start, an operator's `reset-model`, a change of model family). The chain is
read back by `ledger.audit.lineage`; no rule links the two kinds, because a
model's bytes live at the gateway, not on the ledger.

A device is "enrolled" once a `device.enroll` vertex names it and "revoked"
once a `device.revoke` vertex does; it is active while enrolled and not
revoked. Revocation is final: a revoked key contributes no more updates and
cannot enroll again (the device needs a new key).

Several gateways write at once, so two vertices may disagree without either
knowing the other (two gateways enroll the same device, or one records a
device's update while another revokes it). A rule that forbids something
("not revoked", "not enrolled twice", "not recorded twice") therefore only
counts facts in the vertex's causal past (`state.precedes`): a vertex is
refused for what its creator knew, never for what it could not have known.
Such concurrent duplicates are kept, and the derived state takes the first
of them in the canonical order, so every gateway derives the same state
whatever order the vertices arrived in.

Membership: genesis is signed by the operator's root key and names the first
gateways; `gateway.join` and `gateway.leave` are signed by the same root key.
A gateway that left cannot come back under the same key.

Bodies are deliberately compact: an update record is a 4-item list, not a
map, because there are thousands per round and each one stays on disk
forever.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import TYPE_CHECKING, Any, ClassVar

from protocol.digest import DIGEST_BYTES
from protocol.envelope import ID_MAX, Context, signed_bytes
from protocol.errors import BadSignature, LimitExceeded, NonFiniteValues, SchemaError
from protocol.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, identity_id, verify
from protocol.schemas import MAX_EXAMPLES

from .errors import (
    AlreadyEnrolled,
    AlreadyInitialized,
    AlreadyRevoked,
    BadCheckpoint,
    BadDeviceSignature,
    BadSequence,
    DeviceRevoked,
    DuplicateUpdate,
    InvalidVertex,
    MembershipError,
    NotRoot,
    UnknownDevice,
    UnknownInput,
    WrongGateway,
)

if TYPE_CHECKING:
    from .state import State
    from .vertex import Vertex

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


# --- field checks -------------------------------------------------------------------


def is_int(value: Any) -> bool:
    """An integer that is not a bool (CBOR true/false decode to Python bools, which are ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_fields(body: dict[str, Any], names: set[str], what: str) -> None:
    if set(body) != names:
        missing, unknown = names - set(body), set(body) - names
        raise SchemaError(f"{what}: missing {sorted(missing)}, unknown {sorted(map(str, unknown))}")


def check_int(value: Any, name: str, lo: int, hi: int) -> int:
    if not is_int(value):
        raise SchemaError(f"{name} must be an integer")
    if not lo <= value <= hi:
        raise LimitExceeded(f"{name}={value} is outside [{lo}, {hi}]")
    return value


def check_float(value: Any, name: str, lo: float, hi: float) -> float:
    if type(value) is not float:  # an int here would not round-trip as the same CBOR
        raise SchemaError(f"{name} must be a float")
    if not math.isfinite(value):
        raise NonFiniteValues(f"{name} is not finite")
    if not lo <= value <= hi:
        raise LimitExceeded(f"{name}={value} is outside [{lo}, {hi}]")
    return value


def check_text(value: Any, name: str, max_len: int, min_len: int = 0) -> str:
    if not isinstance(value, str):
        raise SchemaError(f"{name} must be text")
    if not min_len <= len(value) <= max_len:
        raise LimitExceeded(f"{name} must have {min_len} to {max_len} characters")
    return value


def check_bytes(value: Any, name: str, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise SchemaError(f"{name} must be {size} bytes")
    return value


def check_list(value: Any, name: str, max_len: int, min_len: int = 0) -> list[Any] | tuple[Any, ...]:
    # Tuples are accepted from callers; the encoded vertex always holds lists.
    if not isinstance(value, list | tuple):
        raise SchemaError(f"{name} must be a list")
    if not min_len <= len(value) <= max_len:
        raise LimitExceeded(f"{name} must have {min_len} to {max_len} items, has {len(value)}")
    return value


# --- the kinds ------------------------------------------------------------------------


class Kind:
    """One kind of vertex. Subclasses override the steps that matter to them."""

    name: ClassVar[str]

    def check_body(self, body: dict[str, Any]) -> None:
        raise NotImplementedError

    def check_state(self, vertex: Vertex, state: State) -> None:
        pass

    def check_proofs(self, vertex: Vertex) -> None:
        pass

    def apply(self, vertex: Vertex, state: State) -> None:
        pass


class Genesis(Kind):
    """The root: names the DAG and the first gateways allowed to write to it.

    Body: {"name": str, "gateways": [public key, ...] sorted, no duplicates}.
    Its creator is the operator's root key, which alone signs later
    membership changes (a single self-run gateway may be its own root). It
    has seq 0 and no parents.
    """

    name = GENESIS

    def check_body(self, body: dict[str, Any]) -> None:
        check_fields(body, {"name", "gateways"}, "genesis body")
        check_text(body["name"], "name", NAME_MAX, 1)
        gateways = check_list(body["gateways"], "gateways", MAX_GATEWAYS, 1)
        for key in gateways:
            check_bytes(key, "a gateway key", PUBLIC_KEY_BYTES)
        if any(a >= b for a, b in pairwise(gateways)):
            raise SchemaError("gateways must be sorted bytewise without duplicates")

    def check_state(self, vertex: Vertex, state: State) -> None:
        if state.initialized:
            raise AlreadyInitialized("the ledger has a genesis vertex already")
        if vertex.seq != 0:
            raise BadSequence(f"genesis must have seq 0, has {vertex.seq}")
        if vertex.parents:
            raise InvalidVertex("genesis must have no parents")

    def apply(self, vertex: Vertex, state: State) -> None:
        state.add_gateways(vertex, list(vertex.body["gateways"]))


class GatewayJoin(Kind):
    """The operator admits a gateway. Body: {"gateway": public key, "name": str}; signed by the root key."""

    name = GATEWAY_JOIN

    def check_body(self, body: dict[str, Any]) -> None:
        check_fields(body, {"gateway", "name"}, "gateway.join body")
        check_bytes(body["gateway"], "gateway", PUBLIC_KEY_BYTES)
        check_text(body["name"], "name", NAME_MAX)

    def check_state(self, vertex: Vertex, state: State) -> None:
        if vertex.creator != state.root:
            raise NotRoot(f"{vertex.creator_id} is not the root key that signed genesis")
        gateway = vertex.body["gateway"]
        if state.is_gateway(gateway) or state.departure_of(gateway) is not None:
            raise MembershipError(f"gateway {identity_id(gateway)} was a member already")
        if state.member_count_ever() >= MAX_GATEWAYS:
            raise MembershipError(f"a ledger has at most {MAX_GATEWAYS} gateways over its life")

    def apply(self, vertex: Vertex, state: State) -> None:
        state.add_gateways(vertex, [vertex.body["gateway"]])


class GatewayLeave(Kind):
    """The operator retires a gateway. Body: {"gateway": public key, "reason": str}; signed by the root key.

    The gateway's vertices that descend from this one are refused; ones
    written concurrently (it had not heard yet) are kept.
    """

    name = GATEWAY_LEAVE

    def check_body(self, body: dict[str, Any]) -> None:
        check_fields(body, {"gateway", "reason"}, "gateway.leave body")
        check_bytes(body["gateway"], "gateway", PUBLIC_KEY_BYTES)
        check_text(body["reason"], "reason", REASON_MAX)

    def check_state(self, vertex: Vertex, state: State) -> None:
        if vertex.creator != state.root:
            raise NotRoot(f"{vertex.creator_id} is not the root key that signed genesis")
        if not state.is_gateway(vertex.body["gateway"]):
            raise MembershipError(f"gateway {identity_id(vertex.body['gateway'])} is not a member")

    def apply(self, vertex: Vertex, state: State) -> None:
        state.remove_gateway(vertex, vertex.body["gateway"])


class DeviceEnroll(Kind):
    """A gateway admitted a device under a policy.

    Body: {"device": public key, "name": str, "policy": str}. A device is
    enrolled once; enrolling it again is refused, and so is enrolling a
    revoked one.
    """

    name = DEVICE_ENROLL

    def check_body(self, body: dict[str, Any]) -> None:
        check_fields(body, {"device", "name", "policy"}, "device.enroll body")
        check_bytes(body["device"], "device", PUBLIC_KEY_BYTES)
        check_text(body["name"], "name", NAME_MAX)
        check_text(body["policy"], "policy", NAME_MAX, 1)

    def check_state(self, vertex: Vertex, state: State) -> None:
        device = vertex.body["device"]
        revocation = state.revocation_of(device)
        if revocation is not None and state.precedes(revocation, vertex):
            raise DeviceRevoked(f"device {identity_id(device)} was revoked; re-admission needs a new key")
        enrollment = state.enrollment_of(device)
        if enrollment is not None and state.precedes(enrollment, vertex):
            raise AlreadyEnrolled(f"device {identity_id(device)} is enrolled already")

    def apply(self, vertex: Vertex, state: State) -> None:
        body = vertex.body
        state.add_device(vertex, body["device"], body["name"], body["policy"])


class DeviceRevoke(Kind):
    """A gateway revoked an enrolled device's key.

    Body: {"device": public key, "reason": str}. The device must be enrolled
    and not revoked already. From then on no updates vertex may record it
    and it cannot enroll again.
    """

    name = DEVICE_REVOKE

    def check_body(self, body: dict[str, Any]) -> None:
        check_fields(body, {"device", "reason"}, "device.revoke body")
        check_bytes(body["device"], "device", PUBLIC_KEY_BYTES)
        check_text(body["reason"], "reason", REASON_MAX)

    def check_state(self, vertex: Vertex, state: State) -> None:
        device = vertex.body["device"]
        if state.enrollment_of(device) is None:
            raise UnknownDevice(f"device {identity_id(device)} is not enrolled, so it cannot be revoked")
        revocation = state.revocation_of(device)
        if revocation is not None and state.precedes(revocation, vertex):
            raise AlreadyRevoked(f"device {identity_id(device)} is revoked already")

    def apply(self, vertex: Vertex, state: State) -> None:
        state.add_revocation(vertex, vertex.body["device"], vertex.body["reason"])


class Updates(Kind):
    """A batch of update replies the creating gateway accepted in one round.

    Body: {"gateway": str, "round": int, "task": str, "base": digest,
    "records": [[device key, update digest, examples, device signature], ...]}.
    Each device signature is re-checkable from these fields alone: it signs
    the "reply" envelope with context (device, gateway, round, task, base)
    and body {"digest": update digest, "examples": examples}. The gateway
    named must be the creator, so no gateway can re-record replies that
    devices addressed to another. Every device must be active (enrolled, not
    revoked).
    """

    name = UPDATES

    def check_body(self, body: dict[str, Any]) -> None:
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

    def check_state(self, vertex: Vertex, state: State) -> None:
        body = vertex.body
        if body["gateway"] != vertex.creator_id:
            raise WrongGateway(
                f"records replies to gateway {body['gateway']!r}, but was created by {vertex.creator_id!r}"
            )
        for i, (device, digest, _, _) in enumerate(body["records"]):
            if state.enrollment_of(device) is None:
                raise UnknownDevice(f"record {i}: device {identity_id(device)} is not enrolled")
            revocation = state.revocation_of(device)
            if revocation is not None and state.precedes(revocation, vertex):
                raise DeviceRevoked(f"record {i}: device {identity_id(device)} was revoked")
            recorded = state.record_of(device, digest)
            if recorded is not None and state.precedes(recorded, vertex):
                raise DuplicateUpdate(
                    f"record {i}: device {identity_id(device)}'s update {digest.hex()} is recorded already"
                )

    def check_proofs(self, vertex: Vertex) -> None:
        body = vertex.body
        for i, (device, digest, examples, signature) in enumerate(body["records"]):
            message = reply_signed_bytes(
                device, body["gateway"], body["round"], body["task"], body["base"], digest, examples
            )
            try:
                verify(device, message, signature)
            except BadSignature as exc:
                raise BadDeviceSignature(
                    f"record {i}: device {identity_id(device)}'s signature does not verify"
                ) from exc

    def apply(self, vertex: Vertex, state: State) -> None:
        state.add_updates(vertex, [(record[0], record[1]) for record in vertex.body["records"]])


class Aggregate(Kind):
    """A round's new model, traced to its inputs.

    Body: {"round": int, "strategy": str, "base": digest of the model the
    round started from, "inputs": [update digests], "output": digest of the
    new model}. Every input must be an update some updates vertex recorded.
    """

    name = AGGREGATE

    def check_body(self, body: dict[str, Any]) -> None:
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

    def check_state(self, vertex: Vertex, state: State) -> None:
        missing = [d for d in vertex.body["inputs"] if not state.has_update(d)]
        if missing:
            raise UnknownInput(f"{len(missing)} input(s) are not recorded updates, first {missing[0].hex()}")


class Checkpoint(Kind):
    """A gateway's commitment to the state of its causal past.

    Body: {"count": vertices in the past, "state": SHA-256 of `ledger.snapshot` of that past}.
    Every receiver recomputes both from its own copy of the past and refuses a
    mismatch, so a final checkpoint is a state all gateways agreed on; a new
    gateway can start from it (`Ledger.bootstrap`).
    """

    name = CHECKPOINT

    def check_body(self, body: dict[str, Any]) -> None:
        check_fields(body, {"count", "state"}, "checkpoint body")
        check_int(body["count"], "count", 1, 2**62)
        check_bytes(body["state"], "state", DIGEST_BYTES)

    def check_state(self, vertex: Vertex, state: State) -> None:
        from .snapshot import digest_of, snapshot_of

        if "snapshot" in vertex.__dict__:  # its writer just built it from this past (never set by decoding)
            return
        past = state.past_of(vertex)
        if past is None:  # this store starts from a checkpoint: gateways with the history check it
            return
        if len(past) != vertex.body["count"]:
            raise BadCheckpoint(f"names {vertex.body['count']} vertices in its past, there are {len(past)}")
        snapshot = snapshot_of(past)
        if digest_of(snapshot) != vertex.body["state"]:
            raise BadCheckpoint("its state digest is not the state of its past")
        vertex.__dict__["snapshot"] = snapshot  # checked: kept by the store for gateways that bootstrap

    def apply(self, vertex: Vertex, state: State) -> None:
        snapshot = vertex.__dict__.get("snapshot")
        keep = getattr(state, "keep_snapshot", None)
        if snapshot is not None and keep is not None:
            keep(vertex, snapshot)


class Lineage(Kind):
    """Where a model lineage starts: the first model of a chain of aggregates.

    Body: {"model": digest of the lineage's first model, "version": the release
    version the gateway gave it, "previous": digest of the last model of the
    lineage it replaces, or b"" if there was none, "reason": why (e.g. "first
    start", "reset-model: <operator's text>", "model family changed"),
    "architecture": the model's architecture id}.

    Only the schema is checked: the creator must be a member gateway like any
    writer, and nothing here can check a model digest (the bytes are at the
    gateway). It adds nothing to the derived state (`derived_state`): a
    checkpoint's snapshot lists it as a vertex like any other and holds
    nothing more of it, so the snapshot format is unchanged and checkpoints
    written before this kind existed stay valid. An audit reads these
    vertices straight from the store (`Ledger.vertices_of`).
    `previous` may equal `model`: a reset to the factory weights before any
    round ran restarts at the model it leaves.
    """

    name = LINEAGE

    def check_body(self, body: dict[str, Any]) -> None:
        check_fields(body, {"model", "version", "previous", "reason", "architecture"}, "lineage body")
        check_bytes(body["model"], "model", DIGEST_BYTES)
        check_int(body["version"], "version", 0, MAX_VERSION)
        previous = body["previous"]  # empty bytes: the first lineage, nothing replaced
        if not isinstance(previous, bytes) or len(previous) not in (0, DIGEST_BYTES):
            raise SchemaError(f"previous must be {DIGEST_BYTES} bytes, or empty bytes when there was none")
        check_text(body["reason"], "reason", REASON_MAX, 1)
        check_text(body["architecture"], "architecture", ARCHITECTURE_MAX, 1)


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (Genesis(), GatewayJoin(), GatewayLeave(), DeviceEnroll(), DeviceRevoke(), Updates(),
                 Aggregate(), Checkpoint(), Lineage())
}


def kind_of(name: str) -> Kind:
    """The rules for kind `name`; raises SchemaError for an unknown kind."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise SchemaError(f"unknown vertex kind {name!r}") from None


def check_body(kind: str, body: Any) -> None:
    """Schema-check a body for its kind. Raises ProtocolError subclasses."""
    rules = kind_of(kind)
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise SchemaError("body must be a map with text keys")
    rules.check_body(body)


def reply_signed_bytes(
    device: bytes, gateway: str, round: int, task: str, base: bytes, digest: bytes, examples: int
) -> bytes:
    """The bytes a device signed when it sent the reply an update record stands for."""
    ctx = Context(sender=device, gateway=gateway, round=round, task=task, base=base)
    return signed_bytes("reply", ctx, {"digest": digest, "examples": examples})
