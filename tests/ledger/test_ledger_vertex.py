"""The vertex: wire form, content id, domain-separated signature, strict decoding."""

from __future__ import annotations

import dataclasses

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import kinds
from ledger.vertex import DOMAIN, Vertex, sign
from protocol import cbor
from protocol.digest import sha256
from protocol.errors import BadSignature, NonCanonicalCBOR, ProtocolError, SchemaError
from protocol.keys import Identity, verify

GW = Identity.from_seed(bytes(range(32)))
DEVICE = Identity.from_seed(bytes(range(1, 33)))
DIGEST = sha256(b"update")
PARENT_A, PARENT_B = sha256(b"a"), sha256(b"b")

BODIES = {
    "genesis": {"name": "city", "gateways": [GW.public_key]},
    "device.enroll": {"device": DEVICE.public_key, "name": "pi-1", "policy": "voucher"},
    "device.revoke": {"device": DEVICE.public_key, "reason": "stolen from the lamp post"},
    "updates": {
        "gateway": GW.id,
        "round": 3,
        "task": "t",
        "base": sha256(b"base"),
        "records": [[DEVICE.public_key, DIGEST, 12, bytes(64)]],
    },
    "aggregate": {
        "round": 3,
        "strategy": "FedAvg",
        "base": sha256(b"base"),
        "inputs": [DIGEST],
        "output": sha256(b"o"),
    },
    "lineage": {
        "model": sha256(b"initial"),
        "version": 0,
        "previous": b"",
        "reason": "first start",
        "architecture": sha256(b"arch").hex(),
    },
}


def make(kind: str = "device.enroll", **kw: object) -> Vertex:
    args = {
        "seq": 0 if kind == "genesis" else 4,
        "parents": [] if kind == "genesis" else [PARENT_B, PARENT_A],
    }
    args.update(kw)
    return sign(GW, kind, body=BODIES[kind], time=1_700_000_000.25, **args)  # type: ignore[arg-type]


def wire(vertex: Vertex) -> dict:
    return cbor.loads(vertex.encode())


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_encode_decode_round_trip_keeps_every_field(kind: str) -> None:
    vertex = make(kind)
    again = Vertex.decode(vertex.encode())
    assert again == vertex
    assert again.id == vertex.id
    assert again.encode() == vertex.encode()


def test_wire_form_is_the_documented_map() -> None:
    doc = wire(make())
    assert set(doc) == {"v", "kind", "creator", "seq", "parents", "time", "body", "sig"}
    assert doc["v"] == 1 and doc["creator"] == GW.public_key and doc["seq"] == 4
    assert doc["parents"] == sorted([PARENT_A, PARENT_B])
    assert isinstance(doc["time"], float)


def test_id_is_sha256_of_canonical_cbor_without_sig() -> None:
    vertex = make()
    doc = wire(vertex)
    del doc["sig"]
    assert vertex.id == sha256(cbor.dumps(doc))
    assert vertex.id_hex == vertex.id.hex() and len(vertex.id) == 32


def test_id_does_not_depend_on_the_signature() -> None:
    vertex = make()
    assert dataclasses.replace(vertex, sig=bytes(64)).id == vertex.id


def test_signature_covers_domain_separated_unsigned_bytes() -> None:
    vertex = make()
    doc = wire(vertex)
    del doc["sig"]
    verify(GW.public_key, b"starling/vertex/v1\x00" + cbor.dumps(doc), vertex.sig)
    with pytest.raises(BadSignature):
        verify(GW.public_key, cbor.dumps(doc), vertex.sig)  # no domain prefix
    assert DOMAIN == b"starling/vertex/v1\x00"


def test_verify_signature_fails_for_any_changed_field() -> None:
    vertex = make()
    vertex.verify_signature()
    changed = [
        dataclasses.replace(vertex, seq=5),
        dataclasses.replace(vertex, time=vertex.time + 1),
        dataclasses.replace(vertex, body={**vertex.body, "name": "pi-2"}),
        dataclasses.replace(vertex, parents=(PARENT_A,)),
        dataclasses.replace(vertex, creator=DEVICE.public_key),
    ]
    for other in changed:
        assert other.id != vertex.id
        with pytest.raises(BadSignature):
            other.verify_signature()


def test_creator_id_is_the_protocol_identity_id() -> None:
    assert make().creator_id == GW.id


def test_sign_sorts_and_deduplicates_parents() -> None:
    vertex = make(parents=[PARENT_B, PARENT_A, PARENT_B])
    assert vertex.parents == tuple(sorted([PARENT_A, PARENT_B]))


def test_sign_normalizes_tuples_to_what_a_decoder_sees() -> None:
    body = {**BODIES["updates"], "records": [tuple(BODIES["updates"]["records"][0])]}
    vertex = sign(GW, "updates", 1, [PARENT_A], body, time=5.0)
    assert Vertex.decode(vertex.encode()) == vertex
    assert isinstance(vertex.body["records"][0], list)


def test_sign_defaults_time_to_now_as_float() -> None:
    vertex = sign(GW, "device.enroll", 1, [PARENT_A], BODIES["device.enroll"])
    assert isinstance(vertex.time, float) and vertex.time > 1.7e9


def rewire(vertex: Vertex, **changes: object) -> bytes:
    doc = wire(vertex)
    doc.update(changes)
    return cbor.dumps(doc)


@pytest.mark.parametrize(
    "changes",
    [
        {"v": 2},
        {"v": True},
        {"kind": "device.revoke"},
        {"seq": True},
        {"seq": -1},
        {"time": 17},  # an int time would not be the float the signer hashed
        {"time": float("nan")},
        {"parents": sorted([PARENT_A, PARENT_B], reverse=True)},
        {"parents": [PARENT_A, PARENT_A]},
        {"parents": [b"short"]},
        {"creator": b"x" * 31},
        {"sig": bytes(63)},
        {"body": {"device": DEVICE.public_key, "name": "pi-1"}},
        {"body": {"device": DEVICE.public_key, "name": "pi-1", "policy": "p", "extra": 1}},
        {"extra": 1},
    ],
)
def test_decode_refuses_schema_violations(changes: dict) -> None:
    with pytest.raises(ProtocolError):
        Vertex.decode(rewire(make(), **changes))


def test_decode_refuses_a_missing_field() -> None:
    doc = wire(make())
    del doc["time"]
    with pytest.raises(SchemaError):
        Vertex.decode(cbor.dumps(doc))


def test_decode_refuses_non_canonical_encoding() -> None:
    doc = wire(make())
    loose = cbor2.dumps(dict(reversed(list(doc.items()))))  # same value, keys out of canonical order
    assert cbor2.loads(loose) == doc
    with pytest.raises(NonCanonicalCBOR):
        Vertex.decode(loose)


@pytest.mark.parametrize(
    "kind, body",
    [
        ("genesis", {"name": "c", "gateways": []}),
        ("genesis", {"name": "c", "gateways": sorted([PARENT_A, PARENT_B], reverse=True)}),
        ("updates", {**BODIES["updates"], "records": []}),
        ("updates", {**BODIES["updates"], "records": [[DEVICE.public_key, DIGEST, 12]]}),
        ("updates", {**BODIES["updates"], "records": BODIES["updates"]["records"] * 2}),  # same device twice
        ("updates", {**BODIES["updates"], "records": [[DEVICE.public_key, DIGEST, -1, bytes(64)]]}),
        ("updates", {**BODIES["updates"], "round": 2**31}),
        ("updates", {**BODIES["updates"], "base": b""}),
        ("aggregate", {**BODIES["aggregate"], "inputs": [DIGEST, DIGEST]}),
        ("aggregate", {**BODIES["aggregate"], "inputs": []}),
        ("aggregate", {**BODIES["aggregate"], "output": "not bytes"}),
        ("lineage", {**BODIES["lineage"], "previous": bytes(31)}),
    ],
)
def test_sign_refuses_a_body_that_breaks_its_kind(kind: str, body: dict) -> None:
    with pytest.raises(ProtocolError):
        sign(GW, kind, 1, [PARENT_A], body, time=1.0)


def test_every_kind_has_rules() -> None:
    assert set(kinds.KINDS) == {"genesis", "gateway.join", "gateway.leave", "gateway.rotate", "device.enroll",
                                "device.revoke", "updates", "aggregate", "checkpoint", "lineage", "contributions",
                                "city.offer", "city", "mismatch", "mismatch.clear"}


def test_update_record_is_compact() -> None:
    record = cbor.dumps(BODIES["updates"]["records"][0])
    assert len(record) <= 140  # 32 + 32 + 64 bytes of payload and a few of framing


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_decode_of_garbage_raises_only_protocol_errors(data: bytes) -> None:
    try:
        Vertex.decode(data)
    except ProtocolError:
        pass


ENCODED = make("updates").encode()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(ENCODED) - 1), st.integers(1, 255), st.booleans())
def test_decode_of_damaged_vertex_raises_only_protocol_errors(pos: int, xor: int, truncate: bool) -> None:
    data = ENCODED[:pos] if truncate else ENCODED[:pos] + bytes([ENCODED[pos] ^ xor]) + ENCODED[pos + 1 :]
    try:
        vertex = Vertex.decode(data)
    except ProtocolError:
        return
    # It still decodes: then the damage shows as a different id or a failing signature.
    original = Vertex.decode(ENCODED)
    if vertex.id == original.id:
        assert vertex.sig != original.sig
    with pytest.raises(BadSignature):
        vertex.verify_signature()
