"""Why the ledger refuses a vertex, as one exception family.

`Vertex.decode` raises `protocol.errors.ProtocolError` for bytes that are
not a well-formed vertex. Everything the ledger itself refuses (a vertex
that is well formed but may not join the DAG, or a store it cannot use)
raises a `LedgerError` subclass. Like protocol errors, each carries a short
snake_case `reason` that gateways can count refusals by, and a `detail` for
humans. A refusal always means nothing was written.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base class: the ledger refused an operation; the store is unchanged."""

    reason = "ledger_error"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class StoreError(LedgerError):
    """The SQLite file cannot be used: corrupt, not a ledger, or a newer schema."""

    reason = "store"


class NoIdentity(LedgerError):
    """Writing needs the gateway's identity, and the ledger was opened without one."""

    reason = "no_identity"


class NotInitialized(LedgerError):
    """The store has no genesis vertex yet."""

    reason = "not_initialized"


class AlreadyInitialized(LedgerError):
    """A second genesis vertex was offered."""

    reason = "already_initialized"


class InvalidVertex(LedgerError):
    """The vertex or its body breaks the schema of its kind."""

    reason = "invalid_vertex"


class BadVertexSignature(LedgerError):
    """The creator's signature over the vertex does not verify."""

    reason = "bad_signature"


class NotAGateway(LedgerError):
    """The creator is not one of the gateways named in genesis."""

    reason = "not_a_gateway"


class MissingParent(LedgerError):
    """A parent the vertex names is not in the store."""

    reason = "missing_parent"


class BadSequence(LedgerError):
    """The per-creator sequence number skips, repeats, or is not linked to the creator's previous vertex."""

    reason = "bad_sequence"


class Equivocation(BadSequence):
    """The creator already signed a different vertex with this sequence number."""

    reason = "equivocation"


class UnknownDevice(LedgerError):
    """An update record or a revocation names a device that was never enrolled."""

    reason = "unknown_device"


class AlreadyEnrolled(LedgerError):
    """The device is enrolled already."""

    reason = "already_enrolled"


class DeviceRevoked(LedgerError):
    """The device was revoked: it may not contribute updates or enroll again (that takes a new key)."""

    reason = "revoked"


class AlreadyRevoked(DeviceRevoked):
    """A revocation names a device that is revoked already."""

    reason = "already_revoked"


class BadDeviceSignature(LedgerError):
    """An update record's device signature does not verify."""

    reason = "bad_device_signature"


class WrongGateway(LedgerError):
    """An updates vertex records replies addressed to another gateway than its creator."""

    reason = "wrong_gateway"


class DuplicateUpdate(LedgerError):
    """The same device's update (same digest) is already recorded."""

    reason = "duplicate_update"


class UnknownInput(LedgerError):
    """An aggregate names an update digest that no updates vertex recorded."""

    reason = "unknown_input"


class NotRoot(LedgerError):
    """A membership change not signed by the operator root key that signed genesis."""

    reason = "not_root"


class MembershipError(LedgerError):
    """A gateway joined twice, left without being a member, or came back after leaving."""

    reason = "membership"


class BadCheckpoint(LedgerError):
    """A checkpoint whose state digest or vertex count is not what its causal past adds up to."""

    reason = "bad_checkpoint"
