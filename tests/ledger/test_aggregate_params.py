"""An aggregate's optional `params`: what a recompute needs besides its inputs (gateway/recompute.py).

The strategy's constructor parameters, what wrapped it, the software, and the
sequence of replies it aggregated ([input index, weight], in its order). Bodies
without params (both earlier forms) stay valid; params need the rule's form.
"""

from __future__ import annotations

import json
import math

import pytest
from ledger_helpers import TASK

from ledger import errors, kinds
from ledger.cli import to_json
from ledger.store import Ledger
from ledger.verify import verify_store
from ledger.vertex import Vertex
from protocol.digest import sha256
from protocol.errors import LimitExceeded, NonFiniteValues, SchemaError

D1, D2, OUT, BASE = sha256(b"u1"), sha256(b"u2"), sha256(b"out"), sha256(b"base")
PARAMS = {"strategy": {"beta": 0.2, "weighted_by_key": "num-examples", "min_train_nodes": 2, "x": None,
                       "flag": True}, "versions": {"flwr": "1.42.0", "numpy": "2.4.6"}}
WEIGHTED = {"round": 3, "strategy": "FedAvg", "base": BASE, "rule": "weighted",
            "inputs": [[D1, 0.25], [D2, 0.75]], "output": OUT}
MEDIAN = {**WEIGHTED, "strategy": "FedMedian", "rule": "coordinate", "inputs": [[D1, None], [D2, None]]}


@pytest.mark.parametrize("body", [
    {**WEIGHTED, "params": {**PARAMS, "sequence": [[1, 300], [0, 100]]}},  # the order Flower summed in
    {**WEIGHTED, "params": {**PARAMS, "sequence": [[0, 50], [1, 300], [0, 50.0]]}},  # byte-identical updates
    {**WEIGHTED, "params": {"strategy": {}}},  # no sequence: not replayable, and says so
    {**WEIGHTED, "params": {"strategy": {}, "wrappers": ["DifferentialPrivacyServerSideFixedClipping"],
                            "sequence": [[0, 1], [1, 3]]}},
    {**MEDIAN, "params": {**PARAMS, "sequence": [[1, None], [0, None]]}},
    WEIGHTED,  # the rule's form without params, and the first form, stay valid
    {k: v for k, v in WEIGHTED.items() if k != "rule"} | {"inputs": [D1, D2]},
])
def test_aggregate_bodies_with_and_without_params_are_accepted(body: dict) -> None:
    kinds.check_body(kinds.AGGREGATE, body)


@pytest.mark.parametrize("change, error, words", [
    ({"rule": None}, SchemaError, "unknown ['params']"),  # (rule removed below) params need the rule's form
    ({"params": []}, SchemaError, "params must be a map"),
    ({"params": {"sequence": [[0, 1], [1, 1]]}}, SchemaError, "keys are strategy"),
    ({"params": {"strategy": {}, "seed": 1}}, SchemaError, "keys are strategy"),
    ({"params": {"strategy": {"f": [1]}}}, SchemaError, "must be null, a bool, a number or text"),
    ({"params": {"strategy": {"f": b"x"}}}, SchemaError, "must be null, a bool, a number or text"),
    ({"params": {"strategy": {"f": math.inf}}}, NonFiniteValues, "not finite"),
    ({"params": {"strategy": {"f": 2**63}}}, LimitExceeded, "outside"),
    ({"params": {"strategy": {"f": "x" * 257}}}, LimitExceeded, "params.strategy.f"),
    ({"params": {"strategy": {"": 1}}}, LimitExceeded, "a key of params.strategy"),
    ({"params": {"strategy": {f"p{i}": i for i in range(65)}}}, SchemaError, "at most 64"),
    ({"params": {"strategy": {}, "versions": {"numpy": 2}}}, SchemaError, "must be text"),
    ({"params": {"strategy": {}, "wrappers": []}}, LimitExceeded, "params.wrappers must have 1"),
    ({"params": {"strategy": {}, "sequence": []}}, LimitExceeded, "params.sequence must have 1"),
    ({"params": {"strategy": {}, "sequence": [[0, 1], [2, 1]]}}, LimitExceeded, "sequence 1 input=2"),
    ({"params": {"strategy": {}, "sequence": [[0, 1], [0, 1]]}}, SchemaError, "leaves out an input"),
    ({"params": {"strategy": {}, "sequence": [[0, 1], [1, None]]}}, SchemaError, "weight must be a number"),
    ({"params": {"strategy": {}, "sequence": [[0, 1], [1, True]]}}, SchemaError, "weight must be a number"),
    ({"params": {"strategy": {}, "sequence": [[0, 1], [1, -1]]}}, LimitExceeded, "outside"),
    ({"params": {"strategy": {}, "sequence": [[0, 1], [1, math.nan]]}}, NonFiniteValues, "not finite"),
    ({"params": {"strategy": {}, "sequence": [[0, 1, 2], [1, 1]]}}, LimitExceeded, "sequence 0 must have 2"),
    ({"params": {"strategy": {}, "sequence": [[0.0, 1], [1, 1]]}}, SchemaError, "input must be an integer"),
])
def test_params_that_break_the_schema_are_refused(change: dict, error: type, words: str) -> None:
    body = {**WEIGHTED, "params": {"strategy": {}, "sequence": [[0, 1], [1, 3]]}, **change}
    if body.get("rule") is None:
        body = {k: v for k, v in body.items() if k != "rule"} | {"inputs": [D1, D2]}
    with pytest.raises(error) as info:
        kinds.check_body(kinds.AGGREGATE, body)
    assert words in str(info.value)


def test_a_coordinate_rule_sequence_weighs_nothing() -> None:
    with pytest.raises(SchemaError, match="weighs nothing"):
        kinds.check_body(kinds.AGGREGATE, {**MEDIAN, "params": {"strategy": {}, "sequence": [[0, None], [1, 5]]}})


def test_params_are_stored_signed_and_read_back_exactly(ledger: Ledger, gateway, enrolled, reply) -> None:
    records = [reply(d, round=3, base=BASE) for d in enrolled[:2]]
    ledger.record_updates(gateway.id, 3, TASK, BASE, records, signatures_checked=True)
    params = {**PARAMS, "sequence": [[1, 312], [0, 250]]}
    vertex = ledger.record_aggregate(3, "FedTrimmedAvg", BASE, [(records[1][1], 312 / 562),
                                                                (records[0][1], 250 / 562)], OUT,
                                     rule="weighted", params=params)
    assert vertex.body["params"] == params
    again = Vertex.decode(vertex.encode())
    assert again.body["params"] == params and again.id == vertex.id
    assert type(again.body["params"]["strategy"]["beta"]) is float and again.body["params"]["strategy"]["beta"] == 0.2
    assert ledger.get(vertex.id).body["params"]["sequence"] == [[1, 312], [0, 250]]
    assert verify_store(ledger.path).ok
    assert json.loads(json.dumps(to_json(vertex)))["body"]["params"] == params  # `starling-ledger export`
    with pytest.raises(errors.InvalidVertex, match="params"):  # params without the rule's form
        ledger.record_aggregate(4, "FedAvg", OUT, [records[0][1]], sha256(b"o"), params={"strategy": {}})
