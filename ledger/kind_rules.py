"""What each kind of vertex means to the DAG: its rules against the state so far, and its effect.

A kind's body schema is in `ledger.kinds` (a `Vertex` is checked against it
when built). Here each kind has three more steps, run in this order by
`ledger.validate`:

    check_state(vertex, st)   rules against the DAG so far; raises LedgerError
    check_proofs(vertex)      costly stateless checks (device signatures); raises LedgerError
    apply(vertex, st)         what the vertex adds to the derived state

State is checked before proofs so that a record from an unknown device is
refused before any signature check is spent on it. A new kind is a body
schema in `ledger.kinds` and one more class in `RULES`.

A model's lineage is on the ledger as a chain: each `aggregate` names the
model it started from (`base`) and the one it made (`output`), and a
`lineage` vertex marks where a chain starts (the factory weights at first
start, an operator's `reset-model`, a change of model family). The chain is
read back by `ledger.audit.lineage`; no rule links the two kinds, because a
model's bytes live at the gateway, not on the ledger.

A device is "enrolled" once a `device.enroll` vertex names it and "revoked"
once a `device.revoke` vertex does; it is active while enrolled and not
revoked. Revocation is final: a revoked key contributes no more updates and
cannot enroll again (the device needs a new key). Each gateway applies its
own enrollment policy to the enrollments it learns (`gateway.ledger_keeper`),
so a device may be enrolled once per gateway: by the gateway that first
admitted it, then by each gateway that admits it on its own evidence (a
voucher for that gateway). The derived state keeps the first enrollment (the
device's name and policy); the others are read from their vertices
(`Ledger.enrollments`).

A model's round is scored on the ledger too: a `contributions` vertex gives
each accepted update's contribution score to the round's model. Like
`lineage`, it adds nothing to the derived state, so the checkpoint snapshot
format is the same as before these kinds existed; `ledger.audit` reads them
from the store.

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
gateways; `gateway.join`, `gateway.leave` and `gateway.rotate` (a gateway's
key replaced: the old one leaves, the new one joins) are signed by the same
root key. A key that left cannot come back.

The city tier (gateway/city.py) writes three more kinds that, like
`lineage`, add nothing to the derived state: `city.offer` (a gateway's latest
aggregate offered to a city epoch), `city` (the epoch's merged model, naming
the offers it merged) and `mismatch` (evidence: the writer recomputed an
aggregate or city vertex and got another model). Their rules check only what
the causal past proves (the vertex named was known to the writer); what they
mean (whose offer counts, which gateway is flagged) is read from the store by
`ledger.city_queries`, the same way at every gateway. `mismatch.clear`,
signed by the root key like membership, is the operator's answer to the
evidence against a gateway.

A checkpoint's rule recomputes the snapshot of its causal past, which is
what the effects of every kind add up to: that is why `snapshot_of` is here,
next to the effects, and `ledger.snapshot` only encodes and decodes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from protocol.errors import BadSignature, ProtocolError
from protocol.keys import identity_id, verify
from protocol.rotation import KeyRotation

from . import snapshot
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
from .kinds import (
    AGGREGATE,
    CHECKPOINT,
    CITY,
    CITY_OFFER,
    CONTRIBUTIONS,
    DEVICE_ENROLL,
    DEVICE_REVOKE,
    GATEWAY_JOIN,
    GATEWAY_LEAVE,
    GATEWAY_ROTATE,
    GENESIS,
    LINEAGE,
    MAX_GATEWAYS,
    MISMATCH,
    MISMATCH_CLEAR,
    UPDATES,
    input_digests,
    reply_signed_bytes,
)
from .state import MemoryState, State
from .vertex import Vertex


class KindRules:
    """One kind's steps after its body schema. Subclasses override the steps that matter to them."""

    name: ClassVar[str]

    def check_state(self, vertex: Vertex, state: State) -> None:
        pass

    def check_proofs(self, vertex: Vertex) -> None:
        pass

    def apply(self, vertex: Vertex, state: State) -> None:
        pass


class Genesis(KindRules):
    """The root: names the DAG and the first gateways allowed to write to it.

    Its creator is the operator's root key, which alone signs later
    membership changes (a single self-run gateway may be its own root). It
    has seq 0 and no parents.
    """

    name = GENESIS

    def check_state(self, vertex: Vertex, state: State) -> None:
        if state.initialized:
            raise AlreadyInitialized("the ledger has a genesis vertex already")
        if vertex.seq != 0:
            raise BadSequence(f"genesis must have seq 0, has {vertex.seq}")
        if vertex.parents:
            raise InvalidVertex("genesis must have no parents")

    def apply(self, vertex: Vertex, state: State) -> None:
        state.add_gateways(vertex, list(vertex.body["gateways"]))


class GatewayJoin(KindRules):
    """The operator admits a gateway; signed by the root key."""

    name = GATEWAY_JOIN

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


class GatewayLeave(KindRules):
    """The operator retires a gateway; signed by the root key.

    The gateway's vertices that descend from this one are refused; ones
    written concurrently (it had not heard yet) are kept.
    """

    name = GATEWAY_LEAVE

    def check_state(self, vertex: Vertex, state: State) -> None:
        if vertex.creator != state.root:
            raise NotRoot(f"{vertex.creator_id} is not the root key that signed genesis")
        if not state.is_gateway(vertex.body["gateway"]):
            raise MembershipError(f"gateway {identity_id(vertex.body['gateway'])} is not a member")

    def apply(self, vertex: Vertex, state: State) -> None:
        state.remove_gateway(vertex, vertex.body["gateway"])


class GatewayRotate(KindRules):
    """The operator replaces a gateway's key; signed by the root key, carrying the root's statement that
    devices follow (`protocol.rotation`).

    Like a leave and a join in one: the old key's vertices that descend from this one are refused, the
    new key is a member from here on and must never have been one.
    """

    name = GATEWAY_ROTATE

    def check_state(self, vertex: Vertex, state: State) -> None:
        if vertex.creator != state.root:
            raise NotRoot(f"{vertex.creator_id} is not the root key that signed genesis")
        old, new = vertex.body["gateway"], vertex.body["next"]
        if not state.is_gateway(old):
            raise MembershipError(f"gateway {identity_id(old)} is not a member")
        if state.is_gateway(new) or state.departure_of(new) is not None:
            raise MembershipError(f"key {identity_id(new)} was a member already: a rotation needs a fresh key")
        if state.member_count_ever() >= MAX_GATEWAYS:
            raise MembershipError(f"a ledger has at most {MAX_GATEWAYS} gateway keys over its life")

    def check_proofs(self, vertex: Vertex) -> None:
        try:
            KeyRotation.decode(vertex.body["statement"]).check([vertex.creator])
        except ProtocolError as exc:
            raise InvalidVertex(f"gateway.rotate: {exc}") from exc

    def apply(self, vertex: Vertex, state: State) -> None:
        speaks_as = state.speaks_as(vertex.body["gateway"])  # the gateway keeps its id: devices address it so
        state.remove_gateway(vertex, vertex.body["gateway"])
        state.add_gateways(vertex, [vertex.body["next"]], speaks_as)


class DeviceEnroll(KindRules):
    """A gateway admitted a device under a policy (with the evidence it admitted it on, `ledger.kinds`).

    A device is enrolled once per gateway: a gateway enrolling it again is
    refused, another gateway enrolling it too is not (it admits the device on
    its own evidence). Enrolling a revoked device is refused.

    A store that started from a checkpoint knows, of the enrollments before
    it, only each device's first (the snapshot keeps no more): it cannot
    refuse a gateway's second enrollment of a device whose first enrollment
    by that gateway came before the checkpoint and was not the device's first.
    """

    name = DEVICE_ENROLL

    def check_state(self, vertex: Vertex, state: State) -> None:
        device = vertex.body["device"]
        revocation = state.revocation_of(device)
        if revocation is not None and state.precedes(revocation, vertex):
            raise DeviceRevoked(f"device {identity_id(device)} was revoked; re-admission needs a new key")
        for enrollment, creator in state.enrollments_of(device):
            if creator == vertex.creator_id and state.precedes(enrollment, vertex):
                raise AlreadyEnrolled(f"device {identity_id(device)} is enrolled by {vertex.creator_id} already")

    def apply(self, vertex: Vertex, state: State) -> None:
        body = vertex.body
        state.add_device(vertex, body["device"], body["name"], body["policy"])


class DeviceRevoke(KindRules):
    """A gateway revoked an enrolled device's key, saying why.

    The device must be enrolled and not revoked already. From then on no
    updates vertex may record it and it cannot enroll again.
    """

    name = DEVICE_REVOKE

    def check_state(self, vertex: Vertex, state: State) -> None:
        device = vertex.body["device"]
        if state.enrollment_of(device) is None:
            raise UnknownDevice(f"device {identity_id(device)} is not enrolled, so it cannot be revoked")
        revocation = state.revocation_of(device)
        if revocation is not None and state.precedes(revocation, vertex):
            raise AlreadyRevoked(f"device {identity_id(device)} is revoked already")

    def apply(self, vertex: Vertex, state: State) -> None:
        state.add_revocation(vertex, vertex.body["device"], vertex.body["reason"])


class Updates(KindRules):
    """A batch of update replies the creating gateway accepted in one round.

    Each device signature is re-checkable from the record alone
    (`ledger.kinds.reply_signed_bytes`). The gateway named must be the
    creator, so no gateway can re-record replies that devices addressed to
    another. Every device must be active (enrolled, not revoked).
    """

    name = UPDATES

    def check_state(self, vertex: Vertex, state: State) -> None:
        body = vertex.body
        if body["gateway"] != state.speaks_as(vertex.creator):  # its own id, or its first key's after a rotation
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


class Aggregate(KindRules):
    """A round's new model, traced to its inputs: every input must be an update some updates vertex recorded
    (in either form of the body: digests, or digests with their weights and the rule)."""

    name = AGGREGATE

    def check_state(self, vertex: Vertex, state: State) -> None:
        missing = [d for d in input_digests(vertex.body) if not state.has_update(d)]
        if missing:
            raise UnknownInput(f"{len(missing)} input(s) are not recorded updates, first {missing[0].hex()}")


class Checkpoint(KindRules):
    """A gateway's commitment to the state of its causal past.

    Every receiver recomputes the count and the snapshot digest from its own
    copy of the past and refuses a mismatch, so a final checkpoint is a state
    all gateways agreed on; a new gateway can start from it (`Ledger.bootstrap`).
    """

    name = CHECKPOINT

    def check_state(self, vertex: Vertex, state: State) -> None:
        if "snapshot" in vertex.__dict__:  # its writer just built it from this past (never set by decoding)
            return
        past = state.past_of(vertex)
        if past is None:  # this store starts from a checkpoint: gateways with the history check it
            return
        if len(past) != vertex.body["count"]:
            raise BadCheckpoint(f"names {vertex.body['count']} vertices in its past, there are {len(past)}")
        checked = snapshot_of(past)
        if snapshot.digest_of(checked) != vertex.body["state"]:
            raise BadCheckpoint("its state digest is not the state of its past")
        vertex.__dict__["snapshot"] = checked  # checked: kept by the store for gateways that bootstrap

    def apply(self, vertex: Vertex, state: State) -> None:
        kept = vertex.__dict__.get("snapshot")
        keep = getattr(state, "keep_snapshot", None)
        if kept is not None and keep is not None:
            keep(vertex, kept)


class Lineage(KindRules):
    """Where a model lineage starts: the first model of a chain of aggregates.

    Only the schema is checked: the creator must be a member gateway like any
    writer, and nothing here can check a model digest (the bytes are at the
    gateway). It adds nothing to the derived state (`derived_state`): a
    checkpoint's snapshot lists it as a vertex like any other and holds
    nothing more of it, so the snapshot format is unchanged and checkpoints
    written before this kind existed stay valid. An audit reads these
    vertices straight from the store (`Ledger.vertices_of`).
    """

    name = LINEAGE


class Contributions(KindRules):
    """Contribution scores for a round's model: each (device, update) scored must be an update recorded for
    that device (by any updates vertex, as an aggregate's inputs). Nothing links it to the aggregate whose
    output it names (the audit does that). Like `Lineage`, it adds nothing to the derived state."""

    name = CONTRIBUTIONS

    def check_state(self, vertex: Vertex, state: State) -> None:
        for i, (device, digest, _) in enumerate(vertex.body["scores"]):
            if state.record_of(device, digest) is None:
                raise UnknownInput(
                    f"score {i}: device {identity_id(device)}'s update {digest.hex()} is not a recorded update"
                )


def _known(state: State, vertex: Vertex, named: bytes, what: str) -> None:
    """`named` must be in `vertex`'s causal past: a writer names only what it knew."""
    if not state.precedes(named, vertex):
        raise UnknownInput(f"{what} {named.hex()[:16]} is not in this vertex's causal past")


class CityOffer(KindRules):
    """A gateway's model offered to a city epoch: the aggregate vertex it names must be in its causal past.
    Whether the offer is sound (that aggregate is its creator's, its output the model offered) is checked by
    every reader alike (`ledger.city_queries`): an unsound offer is left out, not refused, so that the store
    keeps the evidence of a gateway that offered what it never made."""

    name = CITY_OFFER

    def check_state(self, vertex: Vertex, state: State) -> None:
        _known(state, vertex, vertex.body["aggregate"], "aggregate")


class City(KindRules):
    """A city epoch's merged model: every offer it merged must be in its causal past."""

    name = CITY

    def check_state(self, vertex: Vertex, state: State) -> None:
        for offer, _, _ in vertex.body["inputs"]:
            _known(state, vertex, offer, "offer")


class Mismatch(KindRules):
    """Evidence against the writer of the vertex named: it must be in the evidence's causal past."""

    name = MISMATCH

    def check_state(self, vertex: Vertex, state: State) -> None:
        _known(state, vertex, vertex.body["vertex"], "vertex")


class MismatchClear(KindRules):
    """The operator clears the mismatch evidence against a gateway; signed by the root key."""

    name = MISMATCH_CLEAR

    def check_state(self, vertex: Vertex, state: State) -> None:
        if vertex.creator != state.root:
            raise NotRoot(f"{vertex.creator_id} is not the root key that signed genesis")
        gateway = vertex.body["gateway"]
        if not state.is_gateway(gateway) and state.departure_of(gateway) is None:
            raise MembershipError(f"gateway {identity_id(gateway)} was never a member")


RULES: dict[str, KindRules] = {
    rules.name: rules
    for rules in (Genesis(), GatewayJoin(), GatewayLeave(), GatewayRotate(), DeviceEnroll(), DeviceRevoke(), Updates(),
                  Aggregate(), Checkpoint(), Lineage(), Contributions(), CityOffer(), City(), Mismatch(),
                  MismatchClear())
}


def apply(vertex: Vertex, state: State) -> None:
    """Record an admitted vertex and its kind's effects in `state`."""
    state.add_vertex(vertex)
    RULES[vertex.kind].apply(vertex, state)


def snapshot_of(past: Iterable[Vertex]) -> bytes:
    """The snapshot of a causal past given as its vertices in canonical order (each admitted once already)."""
    state, order = MemoryState(), list(past)
    for vertex in order:
        apply(vertex, state)
    return snapshot.encode(state, order)
