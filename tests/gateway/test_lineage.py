"""The journal and the model lineage: what a gateway keeps across stops, crashes and upgrades."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from gateway import strategy_state
from gateway.journal import Journal
from gateway.lineage import ADOPTED, Lineage, model_family
from gateway.strategies import make_strategy
from protocol import schemas
from protocol.digest import sha256

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
WEIGHTS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}


def shifted(by: float) -> dict[str, np.ndarray]:
    return {k: v + np.float32(by) for k, v in WEIGHTS.items()}


def test_a_lineage_goes_on_across_a_reopened_journal(tmp_path):
    journal = Journal(tmp_path / "rounds.db")
    lineage = Lineage(journal)
    assert lineage.head is None and lineage.current is None
    root = lineage.start(WEIGHTS, "first start", "fam/1")
    journal.exchanges.open("train-1-a.1", root.lineage, 1, root.digest, [1, 2])
    one = lineage.advance(shifted(1), 1, "weighted", [(b"\x01" * 32, 1.0)], "FedAvg", {"lr": 0.1}, None, ["train-1-a.1"])
    journal.close()

    again = Lineage(Journal(tmp_path / "rounds.db"))
    head = again.head
    assert (head.digest, head.version, head.round, head.parent) == (one.digest, 1, 1, root.digest)
    np.testing.assert_array_equal(head.weights["w"], shifted(1)["w"])
    two = again.advance(shifted(2), 2, "weighted", [(b"\x02" * 32, 1.0)], "FedAvg", {"lr": 0.1}, None, [])
    assert (two.version, two.parent, two.lineage) == (2, one.digest, root.lineage)
    assert again.advance(shifted(2), 3, "weighted", [], "FedAvg", {}, None, []) is None  # unchanged: nothing to release
    assert again.config_of(two) == {"lr": 0.1}


def test_a_new_lineage_names_the_head_it_replaces_and_versions_never_go_back(tmp_path):
    lineage = Lineage(Journal(tmp_path / "rounds.db"))
    root = lineage.start(WEIGHTS, "first start", "fam/1")
    step = lineage.advance(shifted(1), 1, "weighted", [(b"\x01" * 32, 1.0)], "FedAvg", {}, None, [])
    again = lineage.start(WEIGHTS, "reset-model: drifted", "fam/1")
    assert again.digest == root.digest and again.version == step.version + 1  # same weights, a new release
    assert (again.lineage, again.round, again.parent) == (root.lineage + 1, 0, b"")
    start = lineage.current
    assert (start.previous, start.reason) == (step.digest, "reset-model: drifted")
    assert lineage.head == again


def test_what_the_ledger_has_not_got_comes_out_oldest_first_until_marked(tmp_path):
    lineage = Lineage(Journal(tmp_path / "rounds.db"))
    lineage.start(WEIGHTS, "first start", "fam/1")
    lineage.advance(shifted(1), 1, "weighted", [(b"\x01" * 32, 1.0)], "FedAvg", {}, None, [])
    pending = lineage.unrecorded()
    assert [(p.start is not None, p.release is not None) for p in pending] == [(True, False), (False, True)]
    assert pending[1].inputs == ((b"\x01" * 32, 1.0),) and (pending[1].strategy, pending[1].rule) == ("FedAvg", "weighted")
    lineage.mark_recorded(pending[0])
    assert [p.release.version for p in lineage.unrecorded()] == [1]


def test_what_a_recompute_needs_is_journaled_with_the_step_exactly(tmp_path):
    """An aggregate recorded after a crash records the params the round journaled (gateway/recompute.py)."""
    lineage = Lineage(Journal(tmp_path / "rounds.db"))
    lineage.start(WEIGHTS, "first start", "fam/1")
    params = {"strategy": {"beta": 0.2, "weighted_by_key": "num-examples", "min_train_nodes": 2},
              "versions": {"numpy": "2.4.6"}, "sequence": [[1, 312], [0, 250.0]]}
    lineage.advance(shifted(1), 1, "weighted", [(b"\x01" * 32, 0.5), (b"\x02" * 32, 0.5)], "FedAvg", {}, None, [],
                    params)
    lineage.advance(shifted(2), 2, "weighted", [(b"\x03" * 32, 1.0)], "FedAvg", {}, None, [])  # none given
    (_, first, second) = Lineage(Journal(tmp_path / "rounds.db")).unrecorded()
    assert first.params == params and type(first.params["sequence"][1][1]) is float
    assert second.params is None


def test_old_model_bytes_are_pruned_but_the_head_and_its_parents_stay(tmp_path):
    journal = Journal(tmp_path / "rounds.db")
    lineage = Lineage(journal)
    lineage.start(WEIGHTS, "first start", "fam/1")
    for r in range(1, 8):
        lineage.advance(shifted(r), r, "weighted", [(bytes([r]) * 32, 1.0)], "FedAvg", {}, None, [])
    kept = [r.round for r in lineage.recent(10)]
    assert kept == [5, 6, 7]
    assert journal.read("select count(*) from release")[0][0] == 8  # every release stays on record
    assert lineage.find(sha256(schemas.encode_model(shifted(1)))) is None


def test_a_finished_exchange_is_never_resumed_and_an_unfinished_one_is(tmp_path):
    journal = Journal(tmp_path / "rounds.db")
    lineage = Lineage(journal)
    root = lineage.start(WEIGHTS, "first start", "fam/1")
    journal.exchanges.open("train-1-a.1", root.lineage, 1, root.digest, [7, 8])
    journal.exchanges.accept_many([("train-1-a.1", "dev", b"reply bytes")])
    interrupted = journal.exchanges.interrupted(root.lineage, root.digest)
    assert (interrupted.task, interrupted.round, interrupted.nodes, interrupted.replies) == (
        "train-1-a.1", 1, [7, 8], [b"reply bytes"])
    assert journal.exchanges.interrupted(root.lineage, b"\x09" * 32) is None  # another base: never resumable
    journal.exchanges.open("train-1-b.1", root.lineage, 1, root.digest, [7])
    lineage.advance(shifted(1), 1, "weighted", [(b"\x01" * 32, 1.0)], "FedAvg", {}, None, ["train-1-b.1"])
    assert journal.exchanges.interrupted(root.lineage, lineage.head.digest) is None


# The journal of the first gateway version (before lineages): its schema and a run a crash interrupted.
LEGACY = """
create table run (id integer primary key check (id = 1), tag text not null, strategy text not null,
    num_rounds integer not null, status text not null);
create table exchange (task text primary key, round integer not null, base blob not null,
    nodes text not null, closed integer not null default 0, recorded integer not null default 0);
create table accepted (task text not null, device text not null, reply blob not null, primary key (task, device));
create table model (digest blob primary key, data blob not null, added integer not null);
create table history (round integer primary key, record text not null);
"""


def test_a_journal_of_the_first_version_upgrades_and_goes_on_from_its_newest_model(tmp_path):
    older, newer = schemas.encode_model(shifted(1)), schemas.encode_model(shifted(2))
    with sqlite3.connect(tmp_path / "rounds.db") as db:
        db.executescript(LEGACY)
        db.execute("insert into run values (1, 'abcd', 'FedAvg', 5, 'running')")
        db.execute("insert into model values (?, ?, 1)", (sha256(older), older))
        db.execute("insert into model values (?, ?, 2)", (sha256(newer), newer))
        db.execute("insert into exchange values ('train-3-abcd.3', 3, ?, '[1, 2]', 0, 0)", (sha256(newer),))
        db.execute("insert into accepted values ('train-3-abcd.3', 'dev', x'00')")
        for r in range(3):
            db.execute("insert into history values (?, ?)", (r, json.dumps({"round": r, "participants": 2})))
    (tmp_path / "model_version").write_text("7")
    journal = Journal(tmp_path / "rounds.db")
    lineage = Lineage(journal)
    head = lineage.adopt_legacy(tmp_path / "model_version", "fam/1")
    assert (head.digest, head.version, head.round) == (sha256(newer), 7, 2)
    assert lineage.current.reason == ADOPTED
    assert [r["round"] for r in journal.history.rounds(head.lineage)] == [0, 1, 2]
    resumed = journal.exchanges.interrupted(head.lineage, head.digest)
    assert (resumed.task, resumed.round, resumed.replies) == ("train-3-abcd.3", 3, [b"\x00"])
    assert lineage.adopt_legacy(tmp_path / "model_version", "fam/1") is None  # once
    assert lineage.advance(shifted(3), 3, "weighted", [(b"\x03" * 32, 1.0)], "FedAvg", {}, None, []).version == 8


def test_the_model_family_is_the_family_and_the_weights_shapes():
    manifest = {"family": "imu_cnn", "sha256": "aa", "weights": [{"name": "w", "shape": [2, 3]}]}
    rebuilt = dict(manifest, sha256="bb")
    more_classes = dict(manifest, weights=[{"name": "w", "shape": [2, 4]}])
    assert model_family(manifest) == model_family(rebuilt)
    assert model_family(manifest) != model_family(more_classes)
    assert model_family(manifest).startswith("imu_cnn/")


# --- the strategies' server-side state -------------------------------------------------------------


def train_replies(arrays: dict[str, np.ndarray], count: int = 3) -> list[Message]:
    replies = []
    for i in range(count):
        content = RecordDict({"arrays": ArrayRecord({k: Array(v + np.float32(i + 1)) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": 10})})
        message = Message(content, dst_node_id=i + 1, message_type="train")
        replies.append(Message(content, reply_to=message))
    return replies


def one_round(strategy, weights: dict[str, np.ndarray], round_: int) -> dict[str, np.ndarray]:
    class Grid:  # what configure_train needs of a grid: the node ids
        def get_node_ids(self):
            return [1, 2, 3]

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id, message_type, group_id=group_id)

    arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
    strategy.configure_train(round_, arrays, ConfigRecord(), Grid())
    aggregated, _ = strategy.aggregate_train(round_, train_replies(weights))
    return {k: v.numpy() for k, v in aggregated.items()}


@pytest.mark.parametrize("name, params", [
    ("FedAdam", {"eta": 0.1}), ("FedYogi", {"eta": 0.1}), ("FedAdagrad", {"eta": 0.1}),
    ("FedAvgM", {"server_momentum": 0.9}),
])
def test_a_restarted_stateful_strategy_takes_the_same_step_as_one_that_never_stopped(name, params):
    """Three rounds without a stop, and the same three with a save/restore (a restart) before the third:
    bit-identical models. Without the saved state the third step differs (the test would fail)."""
    base = {"min_available_nodes": 3, "min_train_nodes": 3, "fraction_evaluate": 0.0}
    steady = make_strategy(name, {**base, **params})
    weights = dict(WEIGHTS)
    for r in (1, 2):
        weights = one_round(steady, weights, r)
    saved = strategy_state.capture(steady)
    expected = one_round(steady, weights, 3)

    restarted = make_strategy(name, {**base, **params})
    restored = strategy_state.restore(restarted, saved)
    assert restored, "the strategy has state to restore"
    after = one_round(restarted, weights, 3)
    for k in expected:
        np.testing.assert_array_equal(after[k], expected[k])
    fresh = one_round(make_strategy(name, {**base, **params}), weights, 3)
    assert any(not np.array_equal(fresh[k], expected[k]) for k in expected), "state made no difference"


def test_the_adaptive_clipping_norm_survives_and_a_wrapped_strategy_is_walked():
    strategy = make_strategy("FedAvg", {"min_available_nodes": 2}, {
        "wrapper": "DifferentialPrivacyServerSideAdaptiveClipping",
        "params": {"noise_multiplier": 0.0, "num_sampled_clients": 2, "initial_clipping_norm": 0.1}})
    strategy.clipping_norm = 0.37  # what a few rounds of adaptation left
    restarted = make_strategy("FedAvg", {"min_available_nodes": 2}, {
        "wrapper": "DifferentialPrivacyServerSideAdaptiveClipping",
        "params": {"noise_multiplier": 0.0, "num_sampled_clients": 2, "initial_clipping_norm": 0.1}})
    assert strategy_state.restore(restarted, strategy_state.capture(strategy)) == ["clipping_norm"]
    assert restarted.clipping_norm == 0.37


def test_a_users_strategy_names_its_own_state_and_garbage_is_refused():
    from flwr.serverapp.strategy import FedAvg

    class Counting(FedAvg):
        starling_state = ("seen", "history")

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seen, self.history = 0, None

    before = Counting()
    before.seen, before.history = 5, [np.ones(2)]
    after = Counting()
    assert sorted(strategy_state.restore(after, strategy_state.capture(before))) == ["history", "seen"]
    assert after.seen == 5 and np.array_equal(after.history[0], np.ones(2))
    assert strategy_state.capture(make_strategy("FedAvg", {})) is None  # FedAvg keeps nothing between rounds
    with pytest.raises(ValueError):
        strategy_state.restore(after, b"not an npz")


def test_where_a_restarted_gateway_begins(tmp_path):
    from gateway.service import FIRST_START, NEW_FAMILY, where_to_begin

    journal = Journal(tmp_path / "rounds.db")
    lineage = Lineage(journal)
    assert where_to_begin(lineage, journal, "fam/1")[0].new_lineage == FIRST_START
    root = lineage.start(WEIGHTS, FIRST_START, "fam/1")
    assert where_to_begin(lineage, journal, "fam/1")[0].next_round == 0  # round 0 was never evaluated
    journal.history.record(root.lineage, 0, {"round": 0})
    assert where_to_begin(lineage, journal, "fam/1")[0].next_round == 1
    journal.exchanges.open("train-1-a.1", root.lineage, 1, root.digest, [3])
    beginning, interrupted = where_to_begin(lineage, journal, "fam/1")
    assert (beginning.new_lineage, beginning.next_round, interrupted.task) == (None, 1, "train-1-a.1")
    lineage.advance(shifted(1), 1, "weighted", [(b"\x01" * 32, 1.0)], "FedAvg", {}, None, ["train-1-a.1"])
    journal.history.record(root.lineage, 2, {"round": 2})  # a round that made no new model
    beginning, interrupted = where_to_begin(lineage, journal, "fam/1")
    assert (beginning.new_lineage, beginning.next_round, interrupted) == (None, 3, None)
    assert where_to_begin(lineage, journal, "fam/2")[0].new_lineage == NEW_FAMILY  # another model family


def test_only_the_newest_finished_exchanges_keep_their_replies(tmp_path):
    from gateway.journal import EXCHANGES_KEPT

    journal = Journal(tmp_path / "rounds.db")
    for r in range(1, 6):
        journal.exchanges.open(f"train-{r}-a.{r}", 1, r, b"\x01" * 32, [1])
        journal.exchanges.accept_many([(f"train-{r}-a.{r}", "dev", b"x" * 1000)])
        if r < 5:
            journal.exchanges.finish(f"train-{r}-a.{r}")
    journal.exchanges.prune()
    kept = [r[0] for r in journal.read("select task from exchange order by round")]
    assert kept == [f"train-{r}-a.{r}" for r in range(5 - EXCHANGES_KEPT, 6)]  # the unfinished one stays too
    assert journal.read("select count(*) from accepted")[0][0] == EXCHANGES_KEPT + 1


def test_the_head_is_signed_again_once_half_its_expiry_has_passed(tmp_path):
    import time

    from gateway.models import ModelPublisher
    from gateway.releases import Releases
    from protocol import envelope
    from protocol.keys import Identity

    class Keeper:  # the ledger's side is not what this test is about
        def record_lineage(self, start): ...
        def record_aggregate(self, release, strategy, rule, inputs, params=None): ...

    published = []
    gateway = Identity.from_seed(b"r" * 32)
    publisher = ModelPublisher(gateway, gateway.id, "arch", lambda t, p, retain=False: published.append((t, p)),
                               ttl_s=0.4)
    releases = Releases(Lineage(Journal(tmp_path / "rounds.db")), publisher, Keeper(), "fam/1", tmp_path / "m.npz")
    head = releases.start(WEIGHTS, "first start")
    releases.release_for(None, 0)  # just published: not again
    time.sleep(0.25)  # more than half of the 0.4 s expiry
    releases.release_for(None, 0)
    models = [envelope.decode(p) for t, p in published if p and t.endswith(head.digest.hex())]
    assert len(models) == 2 and models[1].body["expires"] > models[0].body["expires"]
    assert {m.body["version"] for m in models} == {head.version}  # the same release, a fresh expiry
