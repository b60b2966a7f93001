"""The `lineage` vertex and `starling-ledger lineage`: a model walked back to where its lineage started."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from ledger_helpers import TASK, Record, run_cli

from ledger import errors, kinds
from ledger.cli import main
from ledger.store import Ledger
from ledger.verify import verify_store
from ledger.vertex import Vertex
from protocol.digest import sha256
from protocol.errors import LimitExceeded, SchemaError
from protocol.keys import Identity

FACTORY = sha256(b"factory initial weights")
ARCH = sha256(b"cnn-small v2").hex()
BODY = {"model": FACTORY, "version": 0, "previous": b"", "reason": "first start", "architecture": ARCH}


# --- the kind's schema ----------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"model": FACTORY.hex()}, SchemaError, "model must be 32 bytes"),
        ({"model": FACTORY[:31]}, SchemaError, "model must be 32 bytes"),
        ({"version": -1}, LimitExceeded, "version=-1 is outside"),
        ({"version": 2**63}, LimitExceeded, "version="),
        ({"version": True}, SchemaError, "version must be an integer"),
        ({"version": 1.0}, SchemaError, "version must be an integer"),
        ({"previous": None}, SchemaError, "previous must be 32 bytes, or empty"),
        ({"previous": ""}, SchemaError, "previous must be 32 bytes, or empty"),
        ({"previous": FACTORY + b"\x00"}, SchemaError, "previous must be 32 bytes, or empty"),
        ({"previous": bytes(16)}, SchemaError, "previous must be 32 bytes, or empty"),
        ({"reason": ""}, LimitExceeded, "reason must have 1 to 256"),
        ({"reason": "x" * 257}, LimitExceeded, "reason must have 1 to 256"),
        ({"reason": b"first start"}, SchemaError, "reason must be text"),
        ({"architecture": ""}, LimitExceeded, "architecture must have 1 to 256"),
        ({"architecture": "a" * 257}, LimitExceeded, "architecture must have 1 to 256"),
        ({"architecture": 7}, SchemaError, "architecture must be text"),
        ({"round": 3}, SchemaError, "unknown ['round']"),
        ({"drop": "model"}, SchemaError, "missing ['model']"),
        ({"drop": "previous"}, SchemaError, "missing ['previous']"),
        ({"drop": "architecture"}, SchemaError, "missing ['architecture']"),
    ],
)
def test_a_lineage_body_that_breaks_the_schema_is_refused_saying_what(change: dict, error: type, words: str) -> None:
    body = {**BODY, **change}
    if "drop" in change:
        body.pop("drop")
        body.pop(change["drop"])
    with pytest.raises(error) as info:
        kinds.check_body(kinds.LINEAGE, body)
    assert words in str(info.value)


def test_a_lineage_body_at_its_limits_is_accepted() -> None:
    kinds.check_body("lineage", BODY)
    kinds.check_body("lineage", {**BODY, "previous": sha256(b"old head"), "version": 2**63 - 1,
                                 "reason": "r" * 256, "architecture": "a" * 256})
    kinds.check_body("lineage", {**BODY, "previous": FACTORY})  # a reset before any round ran


def test_record_lineage_refuses_a_bad_body_and_writes_nothing(ledger: Ledger) -> None:
    height = ledger.height
    with pytest.raises(errors.InvalidVertex, match="previous"):
        ledger.record_lineage(FACTORY, 0, b"\x01", "first start", ARCH)
    assert ledger.height == height


# --- a real store ---------------------------------------------------------------------


def model(name: str) -> bytes:
    return sha256(f"model {name}".encode())


class Rounds:
    """Runs rounds on a ledger: one device update recorded, then an aggregate of it."""

    def __init__(self, ledger: Ledger, gateway: Identity, device: Identity, reply: Callable[..., Record]) -> None:
        self.ledger, self.gateway, self.device, self.reply = ledger, gateway, device, reply
        self.round = 0
        self.aggregates: dict[bytes, Vertex] = {}  # output -> its aggregate vertex

    def run(self, base: bytes, count: int, tag: str = "") -> list[bytes]:
        """`count` rounds from `base`; returns the models made, oldest first."""
        made = []
        for _ in range(count):
            self.round += 1
            record = self.reply(self.device, round=self.round, base=base)
            self.ledger.record_updates(self.gateway.id, self.round, TASK, base, [record], signatures_checked=True)
            output = model(f"{tag}{self.round}")
            self.aggregates[output] = self.ledger.record_aggregate(self.round, "FedAvg", base, [record[1]], output)
            made.append(output)
            base = output
        return made


@pytest.fixture
def rounds(ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply) -> Rounds:
    return Rounds(ledger, gateway, enrolled[0], reply)


def walk(db: Path, digest: bytes | str, capsys) -> tuple[int, dict, str]:
    code = main(["lineage", "--db", str(db), "--model", digest if isinstance(digest, str) else digest.hex()])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out else {}, err


def test_a_chain_of_releases_walks_back_to_its_first_model(ledger: Ledger, rounds: Rounds, db_path: Path,
                                                            gateway: Identity, capsys) -> None:
    start = ledger.record_lineage(FACTORY, 0, b"", "first start", ARCH)
    made = rounds.run(FACTORY, 6)
    ledger.close()

    code, result, err = walk(db_path, made[-1], capsys)
    assert code == 0 and err == ""
    assert result["model"] == made[-1].hex() and result["complete"] is True and result["gap"] is None
    assert result["length"] == len(result["releases"]) == 7
    assert [r["model"] for r in result["releases"]] == [m.hex() for m in [*reversed(made), FACTORY]]
    for release, base in zip(result["releases"], [*reversed([FACTORY, *made[:-1]])], strict=False):
        aggregate = rounds.aggregates[bytes.fromhex(release["model"])]
        assert release == {
            "model": aggregate.body["output"].hex(), "base": base.hex(), "round": aggregate.body["round"],
            "strategy": "FedAvg", "inputs": 1, "time": aggregate.time, "gateway": gateway.id,
            "vertex": aggregate.id_hex,
        }
    assert [r["round"] for r in result["releases"]] == [6, 5, 4, 3, 2, 1, 0]
    assert result["releases"][-1] == {
        "model": FACTORY.hex(), "base": None, "round": 0, "strategy": None, "inputs": 0, "time": start.time,
        "gateway": gateway.id, "vertex": start.id_hex, "reason": "first start", "version": 0, "previous": None,
    }

    done = run_cli("lineage", "--db", str(db_path), "--model", made[-1].hex().upper())  # as an operator runs it
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == result and done.stdout.count("\n") == 1


def test_a_chain_whose_first_model_has_no_lineage_vertex_is_broken_there(ledger: Ledger, rounds: Rounds,
                                                                         db_path: Path, capsys) -> None:
    made = rounds.run(FACTORY, 5)  # no lineage vertex names FACTORY
    ledger.close()
    code, result, err = walk(db_path, made[-1], capsys)
    assert code == 1 and result["complete"] is False
    assert [r["model"] for r in result["releases"]] == [m.hex() for m in reversed(made)]
    assert result["length"] == 5
    assert result["gap"] == {"model": FACTORY.hex(), "after": made[0].hex()}
    assert err == (f"starling-ledger lineage: broken: no aggregate or lineage vertex produced model {FACTORY.hex()}"
                   f" (the base of {made[0].hex()})\n")


def test_a_model_nobody_produced_is_a_gap_at_the_model_itself(ledger: Ledger, rounds: Rounds, db_path: Path,
                                                              capsys) -> None:
    ledger.record_lineage(FACTORY, 0, b"", "first start", ARCH)
    rounds.run(FACTORY, 2)
    ledger.close()
    stranger = sha256(b"a model this gateway never made")
    code, result, err = walk(db_path, stranger, capsys)
    assert code == 1
    assert result == {"model": stranger.hex(), "complete": False, "releases": [], "length": 0,
                      "gap": {"model": stranger.hex(), "after": None}}
    assert err.count("\n") == 1 and stranger.hex() in err and "the model asked about" in err


def test_a_second_lineage_walks_back_to_its_own_start_only(ledger: Ledger, rounds: Rounds, db_path: Path,
                                                           capsys) -> None:
    ledger.record_lineage(FACTORY, 0, b"", "first start", ARCH)
    old = rounds.run(FACTORY, 5)
    fresh = sha256(b"new family, new weights")
    restart = ledger.record_lineage(fresh, 6, old[-1], "model family changed", sha256(b"cnn-large").hex())
    new = rounds.run(fresh, 3, tag="new ")
    ledger.close()

    code, result, _ = walk(db_path, new[-1], capsys)
    assert code == 0
    assert [r["model"] for r in result["releases"]] == [m.hex() for m in [*reversed(new), fresh]]
    root = result["releases"][-1]
    assert root["vertex"] == restart.id_hex and root["previous"] == old[-1].hex()
    assert root["reason"] == "model family changed" and root["version"] == 6
    code, result, _ = walk(db_path, old[-1], capsys)  # the old head still walks back to the factory weights
    assert code == 0 and result["length"] == 6 and result["releases"][-1]["reason"] == "first start"


def test_restarts_at_a_model_met_before_end_the_walk_at_the_start_before_the_release(
    ledger: Ledger, rounds: Rounds, db_path: Path, capsys
) -> None:
    ledger.record_lineage(FACTORY, 0, b"", "first start", ARCH)
    old = rounds.run(FACTORY, 4)
    ledger.record_lineage(FACTORY, 5, old[-1], "reset-model: factory weights again", ARCH)
    after_reset = rounds.run(FACTORY, 2, tag="r")
    ledger.record_lineage(old[1], 8, after_reset[-1], "reset-model: roll back to round 2", ARCH)
    after_rollback = rounds.run(old[1], 2, tag="b")
    ledger.close()

    code, result, _ = walk(db_path, after_reset[-1], capsys)
    assert code == 0 and result["length"] == 3 and result["releases"][-1]["version"] == 5
    code, result, _ = walk(db_path, after_rollback[-1], capsys)  # stops at the rollback, not at round 2's aggregate
    assert code == 0 and result["length"] == 3
    assert result["releases"][-1]["model"] == old[1].hex() and result["releases"][-1]["version"] == 8
    code, result, _ = walk(db_path, old[-1], capsys)  # the releases before the restarts are in the first lineage
    assert code == 0 and result["length"] == 5 and result["releases"][-1]["version"] == 0


def test_a_cycle_of_aggregates_is_reported_not_walked_forever(ledger: Ledger, rounds: Rounds, db_path: Path,
                                                              capsys) -> None:
    rounds.run(FACTORY, 1)
    update = next(iter(rounds.aggregates.values())).body["inputs"][0]
    a, b = model("a"), model("b")
    ledger.record_aggregate(7, "FedAvg", b, [update], a)  # a from b, b from a: no honest gateway writes this
    ledger.record_aggregate(8, "FedAvg", a, [update], b)
    ledger.close()
    code, result, err = walk(db_path, a, capsys)
    assert code == 1 and result["length"] == 2
    assert result["gap"] == {"model": a.hex(), "after": b.hex()}
    assert "comes back in its own lineage" in err and err.count("\n") == 1


@pytest.mark.parametrize("digest", ["abc", "g" * 64, "0" * 63, ""])
def test_a_bad_digest_is_refused_with_exit_2(ledger: Ledger, db_path: Path, digest: str, capsys) -> None:
    ledger.close()
    assert main(["lineage", "--db", str(db_path), "--model", digest]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("starling-ledger lineage: --model") and err.count("\n") == 1


def test_a_missing_or_foreign_db_is_refused_with_exit_2(tmp_path: Path, capsys) -> None:
    absent = tmp_path / "absent.db"
    assert main(["lineage", "--db", str(absent), "--model", FACTORY.hex()]) == 2
    assert capsys.readouterr().err == f"starling-ledger lineage: no ledger at {absent}\n"
    assert not absent.exists()
    other = tmp_path / "notes.txt"
    other.write_text("not a ledger")
    assert main(["lineage", "--db", str(other), "--model", FACTORY.hex()]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --- the rest of the ledger -----------------------------------------------------------


def test_vertices_of_reads_only_the_kinds_asked_in_canonical_order(ledger: Ledger, rounds: Rounds) -> None:
    ledger.record_lineage(FACTORY, 0, b"", "first start", ARCH)
    rounds.run(FACTORY, 3)
    everything = list(ledger.vertices())
    wanted = [v.id for v in everything if v.kind in ("aggregate", "lineage")]
    assert [v.id for v in ledger.vertices_of("aggregate", "lineage")] == wanted and len(wanted) == 4
    assert [v.kind for v in ledger.vertices_of("lineage")] == ["lineage"]
    assert list(ledger.vertices_of()) == []


def test_lineage_vertices_leave_the_derived_state_alone_and_verify(ledger: Ledger, rounds: Rounds,
                                                                   db_path: Path, capsys) -> None:
    rounds.run(FACTORY, 1)
    before = ledger.derived_state()
    ledger.record_lineage(FACTORY, 0, b"", "first start", ARCH)
    assert ledger.derived_state() == before
    ledger.close()
    assert verify_store(db_path).ok
    assert main(["verify", "--db", str(db_path)]) == 0
    assert main(["show", "--db", str(db_path), "--json"]) == 0 and main(["show", "--db", str(db_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[2])["lineages"] == 1 and "lineages 1 started" in out


def test_a_gossiped_lineage_vertex_and_a_checkpoint_over_it_are_accepted_elsewhere(
    ledger: Ledger, rounds: Rounds, tmp_path: Path, capsys
) -> None:
    start = ledger.record_lineage(FACTORY, 0, b"", "first start", ARCH)
    made = rounds.run(FACTORY, 2)
    checkpoint = ledger.write_checkpoint()  # its snapshot covers the lineage vertex
    with Ledger.open(tmp_path / "peer.db") as peer:
        for vertex in ledger.vertices():
            assert peer.insert_vertex(Vertex.decode(vertex.encode())), vertex.kind
        assert peer.get(start.id) == start and peer.get(checkpoint.id) is not None
        assert peer.state_digest() == ledger.state_digest()
    assert verify_store(tmp_path / "peer.db").ok
    code, result, _ = walk(tmp_path / "peer.db", made[-1], capsys)
    assert code == 0 and result["releases"][-1]["vertex"] == start.id_hex


def test_a_store_that_bootstrapped_after_the_start_says_why_the_walk_is_broken(
    ledger: Ledger, rounds: Rounds, tmp_path: Path, capsys
) -> None:
    ledger.record_lineage(FACTORY, 0, b"", "first start", ARCH)
    before = rounds.run(FACTORY, 2)
    ledger.write_checkpoint()
    after = rounds.run(before[-1], 2, tag="after ")
    served = ledger.latest_final_checkpoint()
    assert served is not None
    genesis = next(ledger.vertices())
    with Ledger.open(tmp_path / "newcomer.db") as newcomer:
        newcomer.bootstrap(genesis, *served)
        for vertex in ledger.vertices():
            if not newcomer.holds(vertex.id):
                newcomer.insert_vertex(vertex)
    code, result, err = walk(tmp_path / "newcomer.db", after[-1], capsys)
    assert code == 1 and result["gap"] == {"model": before[-1].hex(), "after": after[0].hex()}
    assert "started from a checkpoint" in err and err.count("\n") == 1


def test_provenance_still_answers_from_the_audit_module(ledger: Ledger, rounds: Rounds, db_path: Path,
                                                        capsys) -> None:
    made = rounds.run(FACTORY, 2)
    ledger.close()
    assert main(["provenance", "--db", str(db_path), "--model", made[-1].hex()]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [a["output"] for a in found["aggregates"]] == [m.hex() for m in reversed(made)]
    assert found["initial_model"] == FACTORY.hex()
    assert main(["provenance", "--db", str(db_path), "--model", FACTORY.hex()]) == 2
    assert "no aggregate" in capsys.readouterr().err

