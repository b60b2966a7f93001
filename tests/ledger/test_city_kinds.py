"""The city tier's vertices: `city.offer`, `city`, `mismatch`, `mismatch.clear`, and how every gateway reads them.

One store, three member gateways writing in turn (as gossip would interleave
them): offers are read the same way by everyone (each member's first, sound or
with its problem, weighed by the examples the ledger records), evidence flags
the gateway whose vertex it names until the root clears it, and none of these
kinds changes the derived state (old checkpoints stay valid).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from ledger_helpers import signed_reply

from gateway.city import CitySettings, CityTier
from ledger.errors import InvalidVertex, NotAGateway, NotRoot, UnknownInput
from ledger.kinds import CITY, MAX_GATEWAYS
from ledger.store import Ledger
from ledger.verify import verify_store
from protocol.keys import Identity

BASE = b"\x01" * 32
D = [bytes([i]) * 32 for i in range(2, 8)]  # model digests


@pytest.fixture
def city(tmp_path: Path):
    """Genesis naming gateways a, b, c (sorted by id: a < b < c); two devices; a round at a and at b, each an
    aggregate of its two updates (the devices claim 40 and 30 examples)."""
    root = Identity.generate()
    a, b, c = sorted((Identity.generate() for _ in range(3)), key=lambda i: i.id)
    devices = [Identity.generate() for _ in range(2)]
    path = tmp_path / "city.db"
    with Ledger.open(path, root) as ledger:
        ledger.init_genesis("harbour", [a.public_key, b.public_key, c.public_key])
    aggregates = {}
    for gateway, output in ((a, D[0]), (b, D[1])):
        with Ledger.open(path, gateway) as ledger:
            if gateway is a:
                for device in devices:
                    ledger.enroll_device(device.public_key, device.id[:8], "open")
            records = [signed_reply(device, gateway.id, 1, "t1", BASE, examples=n)
                       for device, n in zip(devices, (40, 30), strict=True)]
            ledger.record_updates(gateway.id, 1, "t1", BASE, records)
            inputs = [(r[1], 0.5) for r in records]
            aggregates[gateway.id] = ledger.record_aggregate(1, "FedAvg", BASE, inputs, output, rule="weighted")
    return path, root, (a, b, c), aggregates


def test_offers_are_each_members_first_sound_or_not_and_weighed_by_the_ledgers_capped_records(city):
    path, _, (a, b, c), aggregates = city
    with Ledger.open(path, a) as ledger:
        first = ledger.record_offer(1, 1, D[0], aggregates[a.id].id)
        ledger.record_offer(1, 1, D[0], aggregates[a.id].id)  # a second offer to the same epoch: ignored
    with Ledger.open(path, b) as ledger:
        ledger.record_offer(1, 1, D[5], aggregates[b.id].id)  # not the model its aggregate made
    with Ledger.open(path, c) as ledger:
        ledger.record_offer(1, 1, D[0], aggregates[a.id].id)  # c offers a's aggregate
        with pytest.raises(UnknownInput):  # an aggregate nobody recorded
            ledger.record_offer(1, 1, D[5], b"\x09" * 32)
        offers = ledger.offers(1, max_examples=35)
        assert ledger.offers(2, max_examples=35) == []
    assert [o.gateway for o in offers] == [a.id, b.id, c.id]
    assert offers[0].vertex == first.id and offers[0].problem is None
    assert offers[0].examples == 35 + 30  # 40 capped at 35, and 30
    assert offers[1].problem == "its model or round is not the aggregate's"
    assert offers[2].problem == "it offers another gateway's aggregate"
    assert verify_store(path).ok


def test_a_long_lived_store_sees_each_epochs_offers_as_they_arrive_from_other_writers(city):
    """The per-epoch index reads each offer once: offers written later, through another connection, are in
    the next answer of the same store object, each under its own epoch."""
    path, _, (a, b, _), aggregates = city
    with Ledger.open(path, a) as watching:
        watching.record_offer(1, 1, D[0], aggregates[a.id].id)
        assert [o.gateway for o in watching.offers(1, max_examples=100)] == [a.id]
        with Ledger.open(path, b) as other:
            other.record_offer(1, 1, D[1], aggregates[b.id].id)
            other.record_offer(2, 1, D[1], aggregates[b.id].id)
        assert [o.gateway for o in watching.offers(1, max_examples=100)] == [a.id, b.id]
        assert [(o.gateway, o.problem) for o in watching.offers(2, max_examples=100)] == [(b.id, None)]
        assert watching.offers(3, max_examples=100) == []


def test_a_city_vertex_names_offers_it_knew_with_weights_by_its_rule(city):
    path, _, (a, b, _), aggregates = city
    with Ledger.open(path, a) as ledger:
        offer_a = ledger.record_offer(1, 1, D[0], aggregates[a.id].id)
    with Ledger.open(path, b) as ledger:
        offer_b = ledger.record_offer(1, 1, D[1], aggregates[b.id].id)
        vertex = ledger.record_city(1, "weighted", [(offer_a.id, D[0], 70), (offer_b.id, D[1], 70.0)], D[2],
                                    {"max_examples": 100000, "version_flwr": "1.x"})
        assert vertex.body["inputs"][0][2] == 70.0  # ints are stored as floats
        median = ledger.record_city(1, "median", [(offer_a.id, D[0], None), (offer_b.id, D[1], None)], D[3])
        assert {v.id for v in ledger.city_merges(1)} == {vertex.id, median.id} == {v.id for v in ledger.vertices_of(CITY)}
        assert ledger.city_merges(2) == []
        bad = {
            "a median input with a weight": ("median", [(offer_a.id, D[0], 1.0)]),
            "a weighted input without one": ("weighted", [(offer_a.id, D[0], None)]),
            "a negative weight": ("weighted", [(offer_a.id, D[0], -1.0)]),
            "an offer twice": ("weighted", [(offer_a.id, D[0], 1.0), (offer_a.id, D[1], 1.0)]),
            "an unknown rule": ("mean", [(offer_a.id, D[0], 1.0)]),
            "no inputs": ("weighted", []),
            "too many inputs": ("weighted", [(bytes([i % 256, i // 256]) * 16, D[0], 1.0)
                                             for i in range(MAX_GATEWAYS + 1)]),
        }
        for what, (rule, inputs) in bad.items():
            with pytest.raises(InvalidVertex):
                ledger.record_city(1, rule, inputs, D[2])
                pytest.fail(what)
        with pytest.raises(UnknownInput):
            ledger.record_city(1, "weighted", [(b"\x09" * 32, D[0], 1.0)], D[2])
    assert verify_store(path).ok


def test_evidence_flags_the_writer_of_the_vertex_it_names_until_the_root_clears_it(city):
    path, root, (a, b, c), aggregates = city
    bad_aggregate = aggregates[b.id]
    with Ledger.open(path, a) as ledger:
        ledger.record_mismatch(bad_aggregate.id, D[4], "the recomputed model differs from the recorded output")
        ledger.record_mismatch(aggregates[a.id].id, D[4], "an accuser against itself counts for nothing")
    with Ledger.open(path, c) as ledger:
        ledger.record_mismatch(bad_aggregate.id, bad_aggregate.body["output"], "recomputed equal: not evidence")
        flagged = ledger.flagged()
        assert set(flagged) == {b.id} and [e.accuser for e in flagged[b.id]] == [a.id]
        assert {(e.accuser, e.sound) for e in ledger.evidence()} == {(a.id, True), (c.id, False)}
        with pytest.raises(InvalidVertex):  # the schema: recomputed is a digest or nothing
            ledger.record_mismatch(bad_aggregate.id, b"\x01" * 5, "short")
        with pytest.raises(UnknownInput):
            ledger.record_mismatch(b"\x09" * 32, D[4], "a vertex nobody has")
        with pytest.raises(NotRoot):  # a gateway cannot clear evidence
            ledger.clear_mismatch(b.public_key, "friends")
    with Ledger.open(path, root) as ledger:
        ledger.clear_mismatch(b.public_key, "re-imaged after a disk fault")
        assert ledger.flagged() == {}
        with pytest.raises(NotAGateway):  # the root signs membership and clears, nothing else
            ledger.record_mismatch(bad_aggregate.id, D[4], "root")
    with Ledger.open(path, c) as ledger:  # new evidence after the clear flags it again
        ledger.record_mismatch(bad_aggregate.id, D[5], "again")
        assert [e.accuser for e in ledger.flagged()[b.id]] == [c.id]
    assert verify_store(path).ok


def test_arrivals_are_paged_by_kind_from_a_mark(city):
    path, _, (a, _, _), aggregates = city
    with Ledger.open(path, a) as ledger:
        everything, mark = ledger.arrived_since(-1, "aggregate")
        assert {v.id for v in everything} == {v.id for v in aggregates.values()}
        assert ledger.arrived_since(mark, "aggregate") == ([], mark)
        offer = ledger.record_offer(1, 1, D[0], aggregates[a.id].id)
        assert ledger.arrived_since(mark, "aggregate")[0] == []
        news, _ = ledger.arrived_since(mark, "city.offer", "aggregate")
        assert [v.id for v in news] == [offer.id]
        assert ledger.arrived_since(-1)[0] == []  # no kinds: nothing, only the mark of now


def test_a_gateway_excludes_whom_it_accused_itself_or_more_than_a_third_of_the_members_did(tmp_path):
    root = Identity.generate()
    members = sorted((Identity.generate() for _ in range(4)), key=lambda i: i.id)
    path = tmp_path / "four.db"
    with Ledger.open(path, root) as ledger:
        ledger.init_genesis("four", [m.public_key for m in members])
    me, cheat, one, two = members
    device = Identity.generate()  # evidence names an aggregate (or city) vertex: the cheat records a real round
    with Ledger.open(path, cheat) as ledger:
        ledger.enroll_device(device.public_key, "d", "open")
        record = signed_reply(device, cheat.id, 1, "t1", BASE)
        ledger.record_updates(cheat.id, 1, "t1", BASE, [record])
        aggregate = ledger.record_aggregate(1, "FedAvg", BASE, [(record[1], 1.0)], D[1], rule="weighted")

    def excluded() -> set[str]:
        with Ledger.open(path, me) as ledger:
            tier = CityTier(CitySettings(), ledger, me.id, {me.id}, None, threading.Event())
            return tier.excluded()

    with Ledger.open(path, one) as ledger:
        ledger.record_mismatch(aggregate.id, D[4], "one accuser")
    assert excluded() == set()  # one of four is not more than a third: a lone liar keeps nobody out
    with Ledger.open(path, two) as ledger:
        ledger.record_mismatch(aggregate.id, D[4], "a second accuser")
    assert excluded() == {cheat.id}
    with Ledger.open(path, root) as ledger:
        ledger.clear_mismatch(cheat.public_key, "checked: a bad disk")
    assert excluded() == set()
    with Ledger.open(path, me) as ledger:
        ledger.record_mismatch(aggregate.id, D[5], "my own recompute")
    assert excluded() == {cheat.id}  # its own evidence is enough for a gateway
