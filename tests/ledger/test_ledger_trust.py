"""What the ledger promises about trust: enrollments carry their evidence (once per gateway), aggregates name
their rule and their inputs' weights, and contribution scores are on record; the first forms of the bodies
stay valid, and `starling-ledger provenance | contributions | show` read all of it."""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
from pathlib import Path

import pytest
from ledger_helpers import TASK, Record, run_cli

from ledger import errors, kinds
from ledger.cli import main
from ledger.kind_rules import snapshot_of
from ledger.snapshot import decode
from ledger.store import Ledger
from ledger.verify import verify_store
from protocol.digest import sha256
from protocol.errors import LimitExceeded, NonFiniteValues, ProtocolError, SchemaError
from protocol.keys import Identity
from protocol.vouchers import MAX_VOUCHER_BYTES, issue

OPERATOR = Identity.from_seed(b"o" * 32)
DEVICE = Identity.from_seed(b"d" * 32)
D1, D2, OUT, BASE = sha256(b"u1"), sha256(b"u2"), sha256(b"out"), sha256(b"base")


def voucher_for(device: Identity, gateway: str = "", valid_s: float = 3600.0) -> bytes:
    return issue(OPERATOR, device.public_key, gateway, valid_s).encode()


# --- body schemas -----------------------------------------------------------------------


ENROLL = {"device": DEVICE.public_key, "name": "pi", "policy": "open"}


@pytest.mark.parametrize("body", [
    ENROLL,  # the first form: no evidence
    {**ENROLL, "evidence": b""},
    {**ENROLL, "policy": "allowlist", "evidence": b""},
    {**ENROLL, "policy": "operator", "evidence": b""},
    {**ENROLL, "policy": "voucher", "evidence": voucher_for(DEVICE)},
    {**ENROLL, "policy": "voucher"},  # the first form under "voucher": nothing carried, still valid
])
def test_enroll_bodies_with_and_without_evidence_are_accepted(body: dict) -> None:
    kinds.check_body(kinds.DEVICE_ENROLL, body)


@pytest.mark.parametrize("change, words", [
    ({"evidence": b"x"}, "evidence must be empty under policy 'open'"),
    ({"policy": "allowlist", "evidence": DEVICE.public_key}, "evidence must be empty"),
    ({"evidence": "text"}, "evidence must be bytes"),
    ({"evidence": None}, "evidence must be bytes"),
    ({"policy": "voucher", "evidence": b""}, "evidence is not a voucher"),
    ({"policy": "voucher", "evidence": b"\xff\x00"}, "evidence is not a voucher"),
    ({"policy": "voucher", "evidence": voucher_for(Identity.from_seed(b"x" * 32))}, "another device key"),
    ({"policy": "voucher", "evidence": bytes(MAX_VOUCHER_BYTES + 1)}, f"at most {MAX_VOUCHER_BYTES} bytes"),
    ({"proof": b""}, "unknown ['proof']"),
])
def test_enroll_evidence_that_breaks_the_schema_is_refused(change: dict, words: str) -> None:
    with pytest.raises(SchemaError) as info:
        kinds.check_body(kinds.DEVICE_ENROLL, {**ENROLL, **change})
    assert words in str(info.value)


AGGREGATE = {"round": 3, "strategy": "FedAvg", "base": BASE, "inputs": [D1, D2], "output": OUT}


@pytest.mark.parametrize("body", [
    AGGREGATE,  # the first form
    {**AGGREGATE, "rule": "weighted", "inputs": [[D1, 0.25], [D2, 0.75]]},
    {**AGGREGATE, "rule": "selected", "inputs": [[D1, 1.0]]},
    {**AGGREGATE, "rule": "weighted", "inputs": [[D1, 0.0], [D2, 1.0]]},
    {**AGGREGATE, "rule": "coordinate", "inputs": [[D1, None], [D2, None]]},
    {**AGGREGATE, "rule": "r" * 32, "inputs": [[D1, 0.5]]},
])
def test_aggregate_bodies_of_either_form_are_accepted(body: dict) -> None:
    kinds.check_body(kinds.AGGREGATE, body)
    assert kinds.input_digests(body) == [D1, D2][:len(body["inputs"])]


@pytest.mark.parametrize("change, error, words", [
    ({"rule": "weighted"}, SchemaError, "input 0 must be a list"),  # a rule needs [digest, weight] inputs
    ({"inputs": [[D1, 0.5]]}, SchemaError, "input 0 must be 32 bytes"),  # pairs need a rule
    ({"rule": "", "inputs": [[D1, 0.5]]}, LimitExceeded, "rule must have 1 to 32"),
    ({"rule": "r" * 33, "inputs": [[D1, 0.5]]}, LimitExceeded, "rule must have 1 to 32"),
    ({"rule": 1, "inputs": [[D1, 0.5]]}, SchemaError, "rule must be text"),
    ({"rule": "weighted", "inputs": [[D1, 1.5]]}, LimitExceeded, "outside [0.0, 1.0]"),
    ({"rule": "weighted", "inputs": [[D1, -0.1]]}, LimitExceeded, "outside [0.0, 1.0]"),
    ({"rule": "weighted", "inputs": [[D1, math.nan]]}, NonFiniteValues, "not finite"),
    ({"rule": "weighted", "inputs": [[D1, 1]]}, SchemaError, "weight must be a float"),
    ({"rule": "weighted", "inputs": [[D1, True]]}, SchemaError, "weight must be a float"),
    ({"rule": "weighted", "inputs": [[D1, None]]}, SchemaError, "weight must be a float"),
    ({"rule": "coordinate", "inputs": [[D1, 0.5]]}, SchemaError, "carry no weight"),
    ({"rule": "weighted", "inputs": [[D1, 0.5, 1.0]]}, LimitExceeded, "input 0 must have 2 to 2"),
    ({"rule": "weighted", "inputs": [[D1[:31], 0.5]]}, SchemaError, "input 0 digest must be 32 bytes"),
    ({"rule": "weighted", "inputs": [[D1, 0.5], [D1, 0.5]]}, SchemaError, "inputs name an update twice"),
    ({"rule": "weighted", "inputs": []}, LimitExceeded, "inputs must have 1"),
])
def test_aggregate_bodies_that_break_the_schema_are_refused(change: dict, error: type, words: str) -> None:
    with pytest.raises(error) as info:
        kinds.check_body(kinds.AGGREGATE, {**AGGREGATE, **change})
    assert words in str(info.value)


SCORES = {"round": 3, "model": OUT, "scores": [[DEVICE.public_key, D1, 0.5], [DEVICE.public_key, D2, -0.25]]}


def test_a_contributions_body_is_accepted_up_to_its_limits() -> None:
    kinds.check_body(kinds.CONTRIBUTIONS, SCORES)
    many = [[DEVICE.public_key, sha256(str(i).encode()), 0.0] for i in range(kinds.MAX_RECORDS)]
    kinds.check_body(kinds.CONTRIBUTIONS, {**SCORES, "scores": many})
    with pytest.raises(LimitExceeded):
        kinds.check_body(kinds.CONTRIBUTIONS, {**SCORES, "scores": [*many, [DEVICE.public_key, OUT, 0.0]]})


@pytest.mark.parametrize("change, error, words", [
    ({"scores": []}, LimitExceeded, "scores must have 1"),
    ({"scores": [[DEVICE.public_key, D1, math.inf]]}, NonFiniteValues, "not finite"),
    ({"scores": [[DEVICE.public_key, D1, math.nan]]}, NonFiniteValues, "not finite"),
    ({"scores": [[DEVICE.public_key, D1, 1]]}, SchemaError, "score 0 score must be a float"),
    ({"scores": [[DEVICE.public_key, D1]]}, LimitExceeded, "score 0 must have 3 to 3"),
    ({"scores": [[DEVICE.public_key[:31], D1, 0.1]]}, SchemaError, "score 0 device must be 32 bytes"),
    ({"scores": [[DEVICE.public_key, b"", 0.1]]}, SchemaError, "score 0 digest must be 32 bytes"),
    ({"scores": [[DEVICE.public_key, D1, 0.1], [DEVICE.public_key, D1, 0.2]]}, SchemaError, "scored twice"),
    ({"model": b""}, SchemaError, "model must be 32 bytes"),
    ({"round": -1}, LimitExceeded, "round=-1"),
    ({"gateway": "x"}, SchemaError, "unknown ['gateway']"),
])
def test_contributions_bodies_that_break_the_schema_are_refused(change: dict, error: type, words: str) -> None:
    with pytest.raises(error) as info:
        kinds.check_body(kinds.CONTRIBUTIONS, {**SCORES, **change})
    assert words in str(info.value)


# --- two gateways: an enrollment per gateway ---------------------------------------------


@pytest.fixture
def city(tmp_path: Path):
    """Ledgers of two member gateways A and B, one genesis; `share()` gossips everything both ways."""
    a_key, b_key = Identity.from_seed(b"A" * 32), Identity.from_seed(b"B" * 32)
    a, b = Ledger(tmp_path / "a.db", a_key), Ledger(tmp_path / "b.db", b_key)
    genesis = a.init_genesis("city", [a_key.public_key, b_key.public_key])
    b.insert_vertex(genesis)

    def share() -> None:
        for _ in range(3):
            for source, target in ((a, b), (b, a)):
                for vertex in source.vertices():
                    target.insert_vertex(vertex)

    yield a, b, share
    a.close()
    b.close()


def test_a_device_is_enrolled_once_per_gateway_and_the_first_enrollment_names_it(city) -> None:
    a, b, share = city
    first = a.enroll_device(DEVICE.public_key, "at-a", "open", b"")
    share()
    evidence = voucher_for(DEVICE, b.identity.id)
    second = b.enroll_device(DEVICE.public_key, "at-b", "voucher", evidence)
    assert second.id != first.id and second.body["evidence"] == evidence
    assert b.enroll_device(DEVICE.public_key, "again", "voucher", evidence) == second  # idempotent per gateway
    assert a.enroll_device(DEVICE.public_key, "again", "open", b"") == first
    with pytest.raises(errors.AlreadyEnrolled):  # written anyway: refused, it is in its creator's past
        b.append(kinds.DEVICE_ENROLL, {"device": DEVICE.public_key, "name": "x", "policy": "open"})
    share()
    for ledger in (a, b):
        records = ledger.enrollments(DEVICE.public_key)
        assert [(r.vertex, r.creator, r.name, r.policy, r.evidence, r.time) for r in records] == [
            (first.id, a.identity.id, "at-a", "open", b"", first.time),
            (second.id, b.identity.id, "at-b", "voucher", evidence, second.time),
        ]
        assert ledger.enrolled_devices() == {DEVICE.public_key: "at-a"}  # the derived state keeps the first
        assert [v.id for v in ledger.history(DEVICE.public_key)] == [first.id, second.id]
        assert verify_store(ledger.path).ok
    assert a.state_digest() == b.state_digest()
    assert a.enrollments(Identity.generate().public_key) == []


def test_a_gateway_enrolling_the_same_device_twice_is_refused_even_from_elsewhere(city) -> None:
    a, b, share = city
    a.enroll_device(DEVICE.public_key, "at-a", "open")
    share()
    from ledger.vertex import sign

    last = max(a.vertices(), key=lambda v: (v.creator == a.identity.public_key, v.seq))
    again = sign(a.identity, kinds.DEVICE_ENROLL, last.seq + 1, b.tips(),
                 {"device": DEVICE.public_key, "name": "dup", "policy": "open", "evidence": b""})
    with pytest.raises(errors.AlreadyEnrolled):
        b.insert_vertex(again)


def test_enrolled_since_names_the_devices_of_new_enrollments_only(city) -> None:
    a, b, share = city
    devices, mark = b.enrolled_since()
    assert devices == []
    a.enroll_device(DEVICE.public_key, "d", "open")
    share()
    devices, mark = b.enrolled_since(mark)
    assert devices == [DEVICE.public_key]
    assert b.enrolled_since(mark) == ([], mark)
    b.enroll_device(DEVICE.public_key, "d", "voucher", voucher_for(DEVICE))
    assert b.enrolled_since(mark)[0] == [DEVICE.public_key]


def test_a_file_written_before_enrollments_were_indexed_gets_them_indexed_by_its_first_writer(
    tmp_path: Path,
) -> None:
    a_key, b_key = Identity.from_seed(b"A" * 32), Identity.from_seed(b"B" * 32)
    with Ledger.open(tmp_path / "a.db", a_key) as a, Ledger.open(tmp_path / "b.db", b_key) as b:
        genesis = a.init_genesis("city", [a_key.public_key, b_key.public_key])
        b.insert_vertex(genesis)
        at_a = a.enroll_device(DEVICE.public_key, "at-a", "open")  # concurrent: neither knows the other's
        at_b = b.enroll_device(DEVICE.public_key, "at-b", "open")
        a.insert_vertex(at_b)
        digest = a.state_digest()
    with sqlite3.connect(tmp_path / "a.db") as conn:  # as an older version of this code left the file
        conn.execute("DELETE FROM contributions")
        conn.execute("DELETE FROM meta WHERE key = 'enrollments_indexed'")
    with Ledger.open(tmp_path / "a.db", read_only=True) as reader:
        assert [r.vertex for r in reader.enrollments(DEVICE.public_key)] == [min(at_a.id, at_b.id)]
    with Ledger.open(tmp_path / "a.db", b_key) as writer:  # opened by the gateway B shares this file with
        assert {r.vertex for r in writer.enrollments(DEVICE.public_key)} == {at_a.id, at_b.id}
        assert writer.enroll_device(DEVICE.public_key, "again", "open") == at_b
        assert writer.state_digest() == digest
    assert verify_store(tmp_path / "a.db").ok


# --- aggregates and contributions on a store ----------------------------------------------


@pytest.fixture
def round_on_record(ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply) -> list[Record]:
    records = [reply(d, round=3, base=BASE) for d in enrolled]
    ledger.record_updates(gateway.id, 3, TASK, BASE, records, signatures_checked=True)
    return records


def test_an_aggregate_of_the_new_form_names_its_rule_and_weights(ledger: Ledger, round_on_record) -> None:
    r0, r1, r2 = round_on_record
    vertex = ledger.record_aggregate(3, "MultiKrum", BASE, [(r0[1], 0.5), (r1[1], 0.5)], OUT, rule="selected")
    assert vertex.body["rule"] == "selected" and vertex.body["inputs"] == [[r0[1], 0.5], [r1[1], 0.5]]
    median = ledger.record_aggregate(4, "FedMedian", OUT, [(r0[1], None), (r2[1], None)], sha256(b"m"),
                                     rule="coordinate")
    assert median.body["inputs"] == [[r0[1], None], [r2[1], None]]
    old = ledger.record_aggregate(5, "FedAvg", sha256(b"m"), [r1[1]], sha256(b"o"))
    assert "rule" not in old.body and old.body["inputs"] == [r1[1]]
    assert ledger.get(vertex.id) == vertex and verify_store(ledger.path).ok
    with pytest.raises(errors.UnknownInput):
        ledger.record_aggregate(3, "FedAvg", BASE, [(sha256(b"nobody's"), 1.0)], OUT, rule="weighted")
    with pytest.raises(errors.InvalidVertex, match="outside"):
        ledger.record_aggregate(3, "FedAvg", BASE, [(r0[1], 2.0)], OUT, rule="weighted")


def test_weights_given_as_ints_or_numpy_scalars_are_stored_as_floats(ledger: Ledger, round_on_record) -> None:
    np = pytest.importorskip("numpy")
    r0, r1, _ = round_on_record
    vertex = ledger.record_aggregate(3, "FedAvg", BASE, [(r0[1], 1), (r1[1], np.float32(0.25))], OUT,
                                     rule="weighted")
    assert vertex.body["inputs"] == [[r0[1], 1.0], [r1[1], 0.25]]
    assert all(type(w) is float for _, w in vertex.body["inputs"])


def test_contributions_are_recorded_in_batches_and_change_no_derived_state(
    ledger: Ledger, round_on_record, monkeypatch
) -> None:
    import ledger.store as store_module

    ledger.record_aggregate(3, "FedAvg", BASE, [(r[1], 1 / 3) for r in round_on_record], OUT, rule="weighted")
    state, snapshot = ledger.derived_state(), _snapshot(ledger)
    monkeypatch.setattr(store_module, "MAX_RECORDS", 2)
    scores = [(r[0], r[1], 0.1 * i) for i, r in enumerate(round_on_record)]
    vertices = ledger.record_contributions(3, OUT, scores)
    assert [len(v.body["scores"]) for v in vertices] == [2, 1]
    assert [s for v in vertices for s in v.body["scores"]] == [list(s) for s in scores]
    assert ledger.derived_state() == state
    assert _snapshot(ledger) == snapshot  # the snapshot lists the new vertices, and holds nothing more of them
    assert ledger.kind_counts()["contributions"] == 2
    assert ledger.record_contributions(3, OUT, []) == []
    assert verify_store(ledger.path).ok
    checkpoint = ledger.write_checkpoint()
    assert verify_store(ledger.path).ok and checkpoint.body["count"] == ledger.height - 1


def _snapshot(ledger: Ledger) -> dict:
    doc = decode(snapshot_of(list(ledger.vertices())))
    return {k: v for k, v in doc.items() if k not in ("vertices", "tips")}


def test_contributions_must_score_recorded_updates_of_that_device(
    ledger: Ledger, round_on_record, enrolled: list[Identity]
) -> None:
    r0, r1, _ = round_on_record
    height = ledger.height
    with pytest.raises(errors.UnknownInput, match="score 0"):
        ledger.record_contributions(3, OUT, [(r0[0], sha256(b"never sent"), 0.5)])
    with pytest.raises(errors.UnknownInput, match="score 1"):  # recorded, but another device's
        ledger.record_contributions(3, OUT, [(r0[0], r0[1], 0.5), (r0[0], r1[1], 0.5)])
    with pytest.raises(errors.InvalidVertex, match="not finite"):
        ledger.record_contributions(3, OUT, [(r0[0], r0[1], math.nan)])
    assert ledger.height == height
    assert ledger.is_recorded(r0[0], r0[1]) and not ledger.is_recorded(r0[0], r1[1])


# --- the first forms still verify, and the state they derive is what it was ---------------


def test_a_ledger_of_first_form_bodies_verifies_and_derives_the_state_it_always_did(
    tmp_path: Path, monkeypatch
) -> None:
    """Pinned: these digests are what the code before evidence, rules and scores derived from this ledger."""
    import ledger.vertex

    class Clock:
        now = 1_700_000_000.0

        def time(self) -> float:
            self.now += 1.0
            return self.now

    monkeypatch.setattr(ledger.vertex, "_time", Clock())
    gateway = Identity.from_seed(b"g" * 32)
    devices = [Identity.from_seed(bytes([65 + i]) * 32) for i in range(3)]
    with Ledger.open(tmp_path / "old.db", gateway) as store:
        store.init_genesis("old city", [gateway.public_key])
        for i, device in enumerate(devices):
            store.append(kinds.DEVICE_ENROLL, {"device": device.public_key, "name": f"d{i}", "policy": "open"})
        records = [_fixed_reply(device, gateway.id, i) for i, device in enumerate(devices)]
        store.record_updates(gateway.id, 1, TASK, BASE, records)
        store.append(kinds.AGGREGATE, {"round": 1, "strategy": "FedAvg", "base": BASE,
                                       "inputs": [r[1] for r in records], "output": OUT})
        store.revoke_device(devices[2].public_key, "stolen")
        checkpoint = store.write_checkpoint()
        assert store.state_digest() == PINNED_STATE_DIGEST
        assert checkpoint.body["state"].hex() == PINNED_SNAPSHOT_DIGEST
        assert store.latest_final_checkpoint()[0] == checkpoint
    assert verify_store(tmp_path / "old.db").ok


PINNED_STATE_DIGEST = "c41c26da909290e2"  # computed by the code of commit 8b255aa (before these kinds grew)
PINNED_SNAPSHOT_DIGEST = "aae88eab868f01dd33f305c2efa5b0bfc7bd42954f27f07f66bf63dc2deaf9b0"


def _fixed_reply(device: Identity, gateway: str, i: int) -> Record:
    """A real device-signed update record whose update bytes are fixed (Ed25519 signatures are deterministic)."""
    from protocol import envelope
    from protocol.envelope import Context

    ctx = Context(sender=device.public_key, gateway=gateway, round=1, task=TASK, base=BASE)
    update = bytes([i]) * 64
    sealed = envelope.seal(device, "reply", ctx, {"examples": 8 + i}, attachment=update)
    reply = envelope.open_verified(sealed, "reply")
    return (device.public_key, reply.body["digest"], 8 + i, reply.sig)


# --- the command line -------------------------------------------------------------------


@pytest.fixture
def audited(ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply) -> dict:
    """Two rounds at one gateway: round 1 a weighted mean of all three, round 2 a selection that left the
    third device (the attacker) out; both scored. Another gateway's round-2 update is no business of it."""
    m1, m2 = sha256(b"model 1"), sha256(b"model 2")
    first = [reply(d, round=1, base=BASE) for d in enrolled]
    ledger.record_updates(gateway.id, 1, TASK, BASE, first, signatures_checked=True)
    ledger.record_aggregate(1, "FedAvg", BASE, [(r[1], 1 / 3) for r in first], m1, rule="weighted")
    ledger.record_contributions(1, m1, [(r[0], r[1], s) for r, s in zip(first, (0.5, 0.25, 0.25), strict=True)])
    second = [reply(d, round=2, base=m1) for d in enrolled]
    ledger.record_updates(gateway.id, 2, TASK, m1, second, signatures_checked=True)
    ledger.record_aggregate(2, "MultiKrum", m1, [(second[0][1], 0.5), (second[1][1], 0.5)], m2, rule="selected")
    ledger.record_contributions(2, m2, [(second[0][0], second[0][1], 0.75), (second[1][0], second[1][1], 0.25),
                                        (second[2][0], second[2][1], 0.0)])
    ledger.close()
    return {"models": (m1, m2), "first": first, "second": second, "devices": enrolled, "path": ledger.path}


def test_provenance_names_rules_weights_and_the_updates_a_robust_rule_left_out(audited: dict, capsys) -> None:
    _, m2 = audited["models"]
    attacker = audited["devices"][2]
    assert main(["provenance", "--db", str(audited["path"]), "--model", m2.hex()]) == 0
    result = json.loads(capsys.readouterr().out)
    latest, earlier = result["aggregates"]
    assert latest["rule"] == "selected" and latest["strategy"] == "MultiKrum" and latest["output"] == m2.hex()
    assert [(i["update"], i["weight"]) for i in latest["inputs"]] == [
        (audited["second"][0][1].hex(), 0.5), (audited["second"][1][1].hex(), 0.5)]
    assert [i["records"][0]["device"] for i in latest["inputs"]] == [d.id for d in audited["devices"][:2]]
    assert latest["left_out"] == [{"update": audited["second"][2][1].hex(), "device": attacker.id,
                                   "updates_vertex": latest["left_out"][0]["updates_vertex"]}]
    assert {s["device"]: s["score"] for s in latest["scores"]} == {
        audited["devices"][0].id: 0.75, audited["devices"][1].id: 0.25, attacker.id: 0.0}
    assert earlier["rule"] == "weighted" and earlier["left_out"] == [] and len(earlier["inputs"]) == 3
    assert result["left_out_devices"] == [attacker.id] and result["left_out"] == 1
    assert result["updates"] == 5 and result["initial_model"] == BASE.hex()


def test_provenance_of_a_first_form_aggregate_has_no_rule_or_weights(
    ledger: Ledger, round_on_record, capsys
) -> None:
    ledger.record_aggregate(3, "FedAvg", BASE, [r[1] for r in round_on_record[:2]], OUT)
    ledger.close()
    assert main(["provenance", "--db", str(ledger.path), "--model", OUT.hex()]) == 0
    (aggregate,) = json.loads(capsys.readouterr().out)["aggregates"]
    assert aggregate["rule"] is None and [i["weight"] for i in aggregate["inputs"]] == [None, None]
    assert [x["update"] for x in aggregate["left_out"]] == [round_on_record[2][1].hex()]
    assert aggregate["scores"] == []


def test_contributions_totals_per_device_highest_first(audited: dict, capsys) -> None:
    d0, d1, attacker = audited["devices"]
    assert main(["contributions", "--db", str(audited["path"])]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(r["device"], r["total"], r["rounds"], r["mean"]) for r in result["devices"]] == [
        (d0.id, 1.25, 2, 0.625), (d1.id, 0.5, 2, 0.25), (attacker.id, 0.25, 2, 0.125)]
    assert result["devices"][0]["public_key"] == d0.public_key.hex()
    assert result["rounds"] == 2 and result["vertices"] == 2 and result["since"] is None

    assert main(["contributions", "--db", str(audited["path"]), "--since", "2", "--device", attacker.id]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["devices"] == [{"device": attacker.id, "public_key": attacker.public_key.hex(), "total": 0.0,
                                  "rounds": 1, "mean": 0.0}]
    assert result["since"] == 2 and result["device"] == attacker.id

    done = run_cli("contributions", "--db", str(audited["path"]), "--format", "csv",
                   "--device", d1.public_key.hex().upper())
    assert done.returncode == 0, done.stderr
    rows = list(csv.reader(io.StringIO(done.stdout)))
    assert rows == [["device", "public_key", "total", "rounds", "mean"],
                    [d1.id, d1.public_key.hex(), "0.5", "2", "0.25"]]


def test_contributions_of_a_ledger_without_scores_is_empty(closed_ledger: Path, capsys) -> None:
    assert main(["contributions", "--db", str(closed_ledger), "--format", "csv"]) == 0
    assert capsys.readouterr().out == "device,public_key,total,rounds,mean\n"


@pytest.fixture
def closed_ledger(db_path: Path, ledger: Ledger, enrolled: list[Identity]) -> Path:
    ledger.close()
    return db_path


@pytest.mark.parametrize("args, words", [
    (["--since", "-1"], "--since must be a round from 0"),
    (["--since", "two"], "invalid int value: 'two'"),
    (["--device", "nobody"], "neither a device id"),
    (["--format", "xml"], "invalid choice: 'xml'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_contributions_refuses_bad_arguments_in_one_line(closed_ledger: Path, args: list[str], words: str) -> None:
    done = run_cli("contributions", "--db", str(closed_ledger), *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("starling-ledger contributions: ")
    assert words in done.stderr


def test_contributions_without_a_ledger_or_a_db_exits_2_in_one_line(tmp_path: Path) -> None:
    for args in (["--db", str(tmp_path / "absent.db")], []):
        done = run_cli("contributions", *args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "absent.db").exists()


def test_show_counts_contributions_vertices(audited: dict, capsys) -> None:
    assert main(["show", "--db", str(audited["path"]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["contributions"] == 2 and summary["kinds"]["contributions"] == 2
    assert main(["show", "--db", str(audited["path"])]) == 0
    assert "scores   2 contributions vertices" in capsys.readouterr().out


def test_the_operator_enrolls_with_a_voucher_as_evidence(closed_ledger: Path, tmp_path: Path,
                                                         gateway: Identity) -> None:
    key_file = tmp_path / "gw.key"
    gateway.save(key_file)
    device = Identity.generate()
    (tmp_path / "v.cbor").write_bytes(voucher_for(device))
    base = ["enroll", "--db", str(closed_ledger), "--key", str(key_file), "--device", device.public_key.hex(),
            "--name", "pi"]
    refused = run_cli(*base, "--policy", "voucher")
    assert refused.returncode == 2 and "needs --voucher" in refused.stderr
    done = run_cli(*base, "--voucher", str(tmp_path / "v.cbor"))
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout)
    assert line["policy"] == "voucher" and line["evidence"] == voucher_for_bytes(tmp_path) and line["created"]
    other = run_cli(*base[:-4], "--device", Identity.generate().public_key.hex(), "--name", "x",
                    "--voucher", str(tmp_path / "v.cbor"))
    assert other.returncode == 2 and "another device key" in other.stderr
    assert verify_store(closed_ledger).ok


def voucher_for_bytes(folder: Path) -> str:
    return (folder / "v.cbor").read_bytes().hex()


def test_a_mismatched_body_is_a_protocol_error_not_a_crash() -> None:
    with pytest.raises(ProtocolError):
        kinds.check_body(kinds.CONTRIBUTIONS, {"round": 1, "model": OUT, "scores": "all"})
    with pytest.raises(ProtocolError):
        kinds.check_body(kinds.AGGREGATE, {**AGGREGATE, "rule": "weighted", "inputs": [D1, D2]})
