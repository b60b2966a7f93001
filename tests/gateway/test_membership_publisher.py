"""What a gateway publishes for roaming devices: the ledger's root-signed membership vertices, read back by the
device's own reader (protocol/membership.py), which must agree with the ledger on who the members are."""

from __future__ import annotations

import threading
import time

from gateway.membership import MembershipPublisher, document
from ledger import kinds
from ledger import vertex as ledger_vertex
from ledger.store import Ledger
from protocol import membership, topics
from protocol.keys import Identity, identity_id
from protocol.membership import City
from protocol.rotation import issue

ROOT_KEY = Identity.from_seed(b"r" * 32)
A, B, C, C2, GW = (Identity.from_seed(bytes([i]) * 32) for i in range(1, 6))


def test_the_devices_reader_shares_the_ledgers_vertex_format():
    assert membership.VERTEX_DOMAIN == ledger_vertex.DOMAIN
    assert membership.VERTEX_VERSION == ledger_vertex.VERSION
    assert membership.VERTEX_FIELDS == ledger_vertex.FIELDS
    assert membership.KINDS == (kinds.GENESIS, kinds.GATEWAY_JOIN, kinds.GATEWAY_LEAVE, kinds.GATEWAY_ROTATE)
    assert membership.MAX_GATEWAYS == kinds.MAX_GATEWAYS


def test_the_document_names_the_members_the_ledger_has_after_joins_rotations_and_leaves(tmp_path):
    with Ledger.open(tmp_path / "city.db", ROOT_KEY) as ledger:
        ledger.init_genesis("harbour", [A.public_key, B.public_key])
        ledger.join_gateway(C.public_key, "north")
    with Ledger.open(tmp_path / "city.db", A) as ledger:  # a member's own vertex: not a membership statement
        ledger.enroll_device(Identity.generate().public_key, "d", "open")
    with Ledger.open(tmp_path / "city.db", ROOT_KEY) as ledger:
        ledger.rotate_gateway(issue(ROOT_KEY, C.public_key, C2.public_key))
        ledger.leave_gateway(B.public_key, "decommissioned")
        city = City.from_document(document(ledger), ROOT_KEY.public_key)
        assert sorted(m.key for m in city.members.values()) == ledger.gateways()
    assert [v.kind for v in city.vertices] == ["genesis", "gateway.join", "gateway.rotate", "gateway.leave"]
    assert city.members[C.id].key == C2.public_key and city.members[C.id].retired == (C.public_key,)
    assert city.members[C.id].name == "north"
    assert city.departed == {B.id}
    assert identity_id(C2.public_key) not in city.members  # a rotated gateway keeps its first key's id


def test_a_gateway_that_roots_its_own_ledger_publishes_just_its_genesis(tmp_path):
    with Ledger.open(tmp_path / "own.db", GW) as ledger:
        ledger.init_genesis("alone", [GW.public_key])
        ledger.enroll_device(Identity.generate().public_key, "d", "open")  # its own vertex, not a statement
        city = City.from_document(document(ledger), GW.public_key)
    assert list(city.members) == [GW.id] and len(city.vertices) == 1


def test_the_publisher_publishes_retained_at_once_and_again_only_when_the_members_change(tmp_path):
    sent, stop = [], threading.Event()
    with Ledger.open(tmp_path / "city.db", ROOT_KEY) as ledger:
        ledger.init_genesis("harbour", [A.public_key])
        publisher = MembershipPublisher(ledger, A.id, lambda *a, **k: sent.append((a, k)), stop, interval_s=0.05)
        publisher.start()
        try:
            deadline = time.monotonic() + 5
            while not sent and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)  # several looks at an unchanged ledger
            assert len(sent) == 1
            ledger.join_gateway(B.public_key, "south")
            deadline = time.monotonic() + 5
            while len(sent) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            stop.set()
    assert len(sent) == 2
    (topic, payload), options = sent[-1]
    assert topic == topics.members(A.id) and options["retain"] is True
    assert set(City.from_document(payload, ROOT_KEY.public_key).members) == {A.id, B.id}
