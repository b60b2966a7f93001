"""The ledger keeper (no broker): each gateway's own enrollment policy applied to enrollments made elsewhere,
and what it writes of a release: the aggregate's rule and weighted inputs, and the contribution scores."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from gateway.devices import DeviceRegistry
from gateway.ingest import Accepted
from gateway.journal import Exchanges, Journal
from gateway.ledger_keeper import LedgerKeeper
from gateway.lineage import Lineage
from gateway.rounds import RoundTraffic
from ledger.audit import contribution_totals, provenance
from ledger.store import Ledger
from ledger.verify import verify_store
from ledger.vertex import sign
from protocol import envelope
from protocol.digest import sha256
from protocol.envelope import Context
from protocol.keys import Identity, identity_id
from protocol.vouchers import issue

OPERATOR = Identity.from_seed(b"o" * 32)
ELSEWHERE = Identity.from_seed(b"A" * 32)  # the gateway that enrolled the devices
HERE = Identity.from_seed(b"B" * 32)  # the keeper's gateway
THIRD = Identity.from_seed(b"C" * 32)  # a gateway that admits a device later, on a voucher


@pytest.fixture
def city(tmp_path: Path):
    """A genesis naming both gateways (signed by a root key) and the other gateway's ledger."""
    root = Identity.from_seed(b"r" * 32)
    genesis = sign(root, "genesis", 0, [], {"name": "city", "gateways": sorted(
        [ELSEWHERE.public_key, HERE.public_key, THIRD.public_key])})
    (tmp_path / "genesis.cbor").write_bytes(genesis.encode())
    other = Ledger(tmp_path / "elsewhere.db", ELSEWHERE)
    other.insert_vertex(genesis)
    yield tmp_path / "genesis.cbor", other
    other.close()


def keeper_of(folder: Path, genesis: Path, **policy) -> LedgerKeeper:
    return LedgerKeeper(folder / f"here-{policy.get('policy', 'open')}.db", HERE, "here", genesis, False,
                        ("localhost", 1883, None), 0.0, 0, **policy)


def gossip(source: Ledger, keeper: LedgerKeeper) -> None:
    gossip_into(source, keeper.ledger)


def gossip_into(source: Ledger, target: Ledger) -> None:
    for vertex in source.vertices():
        target.insert_vertex(vertex)


def test_each_policy_admits_the_enrollments_from_elsewhere_it_accepts(city, tmp_path: Path) -> None:
    genesis, other = city
    plain, listed, vouched, for_other_gateway, expired, untrusted, anywhere = (Identity.generate() for _ in range(7))
    now = time.time()
    other.enroll_device(plain.public_key, "plain", "open", b"")
    other.enroll_device(listed.public_key, "listed", "allowlist", b"")
    other.enroll_device(vouched.public_key, "vouched", "voucher", issue(OPERATOR, vouched.public_key, HERE.id).encode())
    other.enroll_device(for_other_gateway.public_key, "other-gw", "voucher",
                        issue(OPERATOR, for_other_gateway.public_key, ELSEWHERE.id).encode())
    other.enroll_device(expired.public_key, "expired", "voucher", issue(OPERATOR, expired.public_key, "", -60).encode())
    other.enroll_device(untrusted.public_key, "untrusted", "voucher",
                        issue(Identity.generate(), untrusted.public_key, HERE.id).encode())
    other.enroll_device(anywhere.public_key, "anywhere", "voucher", issue(OPERATOR, anywhere.public_key).encode())
    other.append("device.enroll", {"device": Identity.generate().public_key, "name": "old", "policy": "voucher"})
    assert time.time() - now < 30  # the vouchers that should be valid still are, at the vertices' times
    admitted = {}
    for policy in ({"policy": "open"}, {"policy": "allowlist", "allowlist": (listed.public_key,)},
                   {"policy": "voucher", "operator_keys": (OPERATOR.public_key,)}):
        keeper = keeper_of(tmp_path, genesis, **policy)
        try:
            gossip(other, keeper)
            registry = DeviceRegistry()
            keeper.sync(registry)
            admitted[policy["policy"]] = {registry.name_of(identity_id(k)) for k in registry.keys()[0]}
        finally:
            keeper.close()
    assert admitted["open"] == {"plain", "listed", "vouched", "other-gw", "expired", "untrusted", "anywhere", "old"}
    assert admitted["allowlist"] == {"listed"}
    assert admitted["voucher"] == {"vouched", "anywhere"}


def test_a_voucher_gateway_admits_what_it_enrolled_itself_and_looks_again_at_new_enrollments(
    city, tmp_path: Path, caplog
) -> None:
    genesis, other = city
    device, by_hand = Identity.generate(), Identity.generate()
    other.enroll_device(device.public_key, "dev", "open", b"")
    keeper = keeper_of(tmp_path, genesis, policy="voucher", operator_keys=(OPERATOR.public_key,))
    try:
        gossip(other, keeper)
        registry = DeviceRegistry()
        with caplog.at_level(logging.INFO, logger="starling.gateway.ledger"):
            keeper.sync(registry)
        assert not registry.is_enrolled(device.public_key)
        assert "device.not_admitted" in caplog.text
        keeper.enroll(by_hand.public_key, "by-hand", "operator")  # this gateway's own: admitted whatever it is
        keeper.sync(registry)
        assert registry.is_enrolled(by_hand.public_key) and not registry.is_enrolled(device.public_key)

        # Nothing new on the ledger for `device`: it stays out. Then it presents a voucher at this gateway
        # (gateway.devices.Enrollment), which writes its own enrollment with the voucher as evidence.
        keeper.sync(registry)
        assert not registry.is_enrolled(device.public_key)
        voucher = issue(OPERATOR, device.public_key, HERE.id).encode()
        keeper.enroll(device.public_key, "dev", "voucher", voucher)
        keeper.sync(registry)
        assert registry.is_enrolled(device.public_key)
        records = keeper.ledger.enrollments(device.public_key)
        assert [(r.creator, r.policy, r.evidence) for r in records] == [
            (ELSEWHERE.id, "open", b""), (HERE.id, "voucher", voucher)]
        assert keeper.ledger.enrolled_devices()[device.public_key] == "dev"

        later = Identity.generate()  # refused here, until a third gateway enrolls it on a voucher for here too
        other.enroll_device(later.public_key, "later", "open", b"")
        gossip(other, keeper)
        keeper.sync(registry)
        assert not registry.is_enrolled(later.public_key)
        with Ledger(tmp_path / "third.db", THIRD) as third:
            gossip_into(other, third)
            third.enroll_device(later.public_key, "later", "voucher", issue(OPERATOR, later.public_key).encode())
            gossip(third, keeper)
        keeper.sync(registry)
        assert registry.is_enrolled(later.public_key)

        late = Identity.generate()  # refused here; its revocation is honoured all the same
        other.enroll_device(late.public_key, "late", "open", b"")
        gossip(other, keeper)
        keeper.sync(registry)
        assert not registry.is_enrolled(late.public_key)
        other.revoke_device(late.public_key, "lost")
        gossip(other, keeper)
        keeper.sync(registry)
        assert registry.is_revoked(late.public_key) and not registry.is_enrolled(late.public_key)
        assert verify_store(keeper.path).ok
    finally:
        keeper.close()


# --- what the keeper writes of a release --------------------------------------------------


def signed(device: Identity, gateway: str, round_: int, base: bytes, update: bytes) -> tuple:
    ctx = Context(sender=device.public_key, gateway=gateway, round=round_, task="train-1", base=base)
    sealed = envelope.seal(device, "reply", ctx, {"examples": 10}, attachment=update)
    reply = envelope.open_verified(sealed, "reply")
    return (device.public_key, reply.body["digest"], 10, reply.sig)


WEIGHTS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}


@pytest.mark.parametrize("rule, weights", [("selected", [0.5, 0.5, None]), ("coordinate", [None, None, None])])
def test_the_keeper_writes_the_aggregate_with_its_rule_and_weights_and_the_scores(
    tmp_path: Path, rule: str, weights: list, caplog
) -> None:
    keeper = LedgerKeeper(tmp_path / "own.db", HERE, "own", None, False, ("localhost", 1883, None), 0.0, 0)
    journal = Journal(tmp_path / "rounds.db")
    try:
        devices = [Identity.generate() for _ in range(3)]
        for d in devices:
            keeper.enroll(d.public_key, "d", "open")
        lineage = Lineage(journal)
        root = lineage.start(WEIGHTS, "first start", "fam/1")
        records = [signed(d, HERE.id, 1, root.digest, bytes([i]) * 32) for i, d in enumerate(devices)]
        keeper.ledger.record_updates(HERE.id, 1, "train-1", root.digest, records)
        inputs = [(r[1], w) for r, w in zip(records, weights, strict=True) if rule == "coordinate" or w is not None]
        lineage.advance({"w": WEIGHTS["w"] + 1}, 1, rule, inputs, "MultiKrum", {}, None, [])
        (item,) = [u for u in lineage.unrecorded() if u.release is not None]
        assert item.rule == rule and list(item.inputs) == inputs
        keeper.record_aggregate(item.release, item.strategy, item.rule, list(item.inputs))
        scores = tuple((r[0], r[1], s) for r, s in zip(records, (0.6, 0.4, 0.0), strict=True))
        keeper.record_contributions(1, item.release.digest, scores)
        result = provenance(keeper.ledger, item.release.digest)
        (aggregate,) = result["aggregates"]
        assert aggregate["rule"] == rule and aggregate["strategy"] == "MultiKrum"
        assert [(bytes.fromhex(i["update"]), i["weight"]) for i in aggregate["inputs"]] == inputs
        if rule == "selected":  # the third device's update shaped nothing
            assert [x["device"] for x in aggregate["left_out"]] == [devices[2].id]
        totals = contribution_totals(keeper.ledger)
        assert [(r["device"], r["total"]) for r in totals["devices"]] == [
            (devices[0].id, 0.6), (devices[1].id, 0.4), (devices[2].id, 0.0)]

        # A score of an update the ledger does not hold is left out; the others are still written.
        stranger = (devices[0].public_key, sha256(b"refused by the ledger"), 0.9)
        with caplog.at_level(logging.INFO, logger="starling.gateway.ledger"):
            keeper.record_contributions(2, sha256(b"m2"), (*scores[:1], stranger))
        written = list(keeper.ledger.vertices_of("contributions"))[-1]
        assert written.body["round"] == 2 and written.body["scores"] == [list(scores[0])]
        keeper.record_contributions(3, sha256(b"m3"), (stranger,))  # nothing on record: nothing written, no error
        assert len(list(keeper.ledger.vertices_of("contributions"))) == 2
        assert verify_store(keeper.path).ok
    finally:
        journal.close()
        keeper.close()


def test_a_lineage_row_without_a_rule_is_written_in_the_first_form(tmp_path: Path) -> None:
    keeper = LedgerKeeper(tmp_path / "own.db", HERE, "own", None, False, ("localhost", 1883, None), 0.0, 0)
    try:
        device = Identity.generate()
        keeper.enroll(device.public_key, "d", "open")
        base = sha256(b"base")
        record = signed(device, HERE.id, 1, base, b"\x07" * 32)
        keeper.ledger.record_updates(HERE.id, 1, "train-1", base, [record])
        from gateway.models import Release

        release = Release(sha256(b"out"), 1, 1, 1, base, {}, 0)
        keeper.record_aggregate(release, "FedAvg", "", [(record[1], None)])
        (vertex,) = keeper.ledger.vertices_of("aggregate")
        assert vertex.body == {"round": 1, "strategy": "FedAvg", "base": base, "inputs": [record[1]],
                               "output": release.digest}
    finally:
        keeper.close()


def test_the_keeper_records_what_a_recompute_needs_and_params_the_ledger_refuses_cost_only_the_params(
    tmp_path: Path, caplog
) -> None:
    keeper = LedgerKeeper(tmp_path / "own.db", HERE, "own", None, False, ("localhost", 1883, None), 0.0, 0)
    try:
        device = Identity.generate()
        keeper.enroll(device.public_key, "d", "open")
        base = sha256(b"base")
        record = signed(device, HERE.id, 1, base, b"\x07" * 32)
        keeper.ledger.record_updates(HERE.id, 1, "train-1", base, [record])
        from gateway.models import Release

        params = {"strategy": {"beta": 0.2}, "sequence": [[0, 10]]}
        keeper.record_aggregate(Release(sha256(b"o1"), 1, 1, 1, base, {}, 0), "FedAvg", "weighted",
                                [(record[1], 1.0)], params)
        bad = {"strategy": {"callback": [1, 2]}, "sequence": [[0, 10]]}  # (a gateway bug: not a scalar)
        with caplog.at_level(logging.ERROR, logger="starling.gateway.ledger"):
            keeper.record_aggregate(Release(sha256(b"o2"), 2, 1, 1, base, {}, 0), "FedAvg", "weighted",
                                    [(record[1], 1.0)], bad)
        first, second = keeper.ledger.vertices_of("aggregate")
        assert first.body["params"] == params
        assert "params" not in second.body and second.body["output"] == sha256(b"o2")  # the record stands
        assert "ledger.params_refused" in caplog.text
    finally:
        keeper.close()


def test_an_update_on_record_already_costs_its_round_only_its_own_record(city, tmp_path: Path, caplog) -> None:
    """A device trains deterministically: re-homed from ELSEWHERE, it sends HERE's round 1 the very bytes it sent
    ELSEWHERE's round 1 (same base, round and data). The ledger holds that update once; HERE's round still records
    the other devices' updates, and its aggregate may name all of them."""
    genesis, other = city
    keeper = keeper_of(tmp_path, genesis)
    journal = Journal(tmp_path / "rounds.db")
    try:
        roamer, local, neighbour = Identity.generate(), Identity.generate(), Identity.generate()
        base, repeated, fresh, also = sha256(b"genesis model"), b"\x01" * 64, b"\x02" * 64, b"\x03" * 64
        other.enroll_device(roamer.public_key, "roamer", "open")
        other.record_updates(ELSEWHERE.id, 1, "train-1", base, [signed(roamer, ELSEWHERE.id, 1, base, repeated)])
        gossip(other, keeper)
        keeper.enroll(local.public_key, "local", "open")
        keeper.enroll(neighbour.public_key, "neighbour", "open")

        def accepted(device: Identity, update: bytes) -> Accepted:
            ctx = Context(sender=device.public_key, gateway=HERE.id, round=1, task="train-1", base=base)
            sealed = envelope.seal(device, "reply", ctx, {"examples": 10}, attachment=update)
            return Accepted(None, envelope.open_verified(sealed, "reply"), {}, 10)

        traffic = RoundTraffic("train", 1, "train-1", base, accepted=[accepted(roamer, repeated),
                                                                      accepted(local, fresh),
                                                                      accepted(neighbour, also)])
        exchanges = Exchanges(journal)
        exchanges.open("train-1", 1, 1, base, [0, 1])
        with caplog.at_level(logging.INFO, logger="starling.gateway.ledger"):
            digests = keeper.record_updates(traffic, exchanges)
        assert digests == [sha256(repeated), sha256(fresh), sha256(also)]  # all shaped the round, all on record
        assert exchanges.is_recorded("train-1")
        mine = [v for v in keeper.ledger.vertices_of("updates") if v.creator == HERE.public_key]
        assert [[r[0] for r in v.body["records"]] for v in mine] == [[local.public_key, neighbour.public_key]]
        assert "ledger.batch_has_known round=1 known=1 recorded=2" in caplog.text
        assert f"ledger.record_known round=1 device={roamer.id}" in caplog.text
        assert "batch_refused" not in caplog.text and "record_refused" not in caplog.text
        assert keeper.record_updates(traffic, exchanges) == digests  # a round recorded before is not written again
        assert len(list(keeper.ledger.vertices_of("updates"))) == 2
    finally:
        journal.close()
        keeper.close()
