"""What shaped a model, from Flower's own computation: the inputs a strategy aggregated, their weights, each share."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from gateway.grid import NUM_EXAMPLES
from gateway.provenance import (
    COORDINATE,
    SELECTED,
    WEIGHTED,
    SelectionRecorder,
    Source,
    provenance,
    rule_kind,
)
from gateway.strategies import make_strategy

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
BASE = {"w": np.zeros(8, np.float32), "b": np.zeros(2, np.float32)}
TRUE = {"w": np.linspace(0.5, 1.0, 8).astype(np.float32), "b": np.array([0.3, -0.2], np.float32)}


def honest(i: int, noise: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {k: v + rng.normal(0, noise, v.shape).astype(np.float32) for k, v in TRUE.items()}


def replies(deltas: list[dict[str, np.ndarray]], examples: list[int]) -> list[tuple[Source, Message]]:
    """The source and the Flower reply of each delta, as the grid builds them (base + delta)."""
    out = []
    for i, (delta, n) in enumerate(zip(deltas, examples)):
        content = RecordDict({"arrays": ArrayRecord({k: Array(BASE[k] + delta[k]) for k in BASE}),
                              "metrics": MetricRecord({NUM_EXAMPLES: n, "train_loss": 1.0})})
        instruction = Message(RecordDict(), dst_node_id=i + 1, message_type="train")
        source = Source(bytes([i]) * 32, bytes([100 + i]) * 32, content, lambda d=delta: d)
        out.append((source, Message(content, reply_to=instruction)))
    return out


def run(name: str, params: dict, deltas, examples):
    recorder = SelectionRecorder()
    strategy = make_strategy(name, {"min_available_nodes": 1, **params}, selection_recorder=recorder)
    sent = replies(deltas, examples)
    arrays, _ = strategy.aggregate_train(1, [m for _, m in sent])
    output = {k: v.numpy() for k, v in arrays.items()}
    shaped = provenance(rule_kind(strategy), [s for s, _ in sent], recorder.take(), NUM_EXAMPLES, BASE, output)
    return shaped, {u: s for _, u, s in shaped.scores()}


def test_fedavg_names_every_update_with_its_share_and_the_scores_sum_to_one():
    deltas = [honest(i) for i in range(4)] + [{k: np.zeros_like(v) for k, v in TRUE.items()}]  # a free rider
    shaped, score = run("FedAvg", {}, deltas, [10, 20, 30, 40, 100])
    assert shaped.kind == WEIGHTED
    assert [round(w, 6) for _, w in shaped.inputs] == [0.05, 0.1, 0.15, 0.2, 0.5]
    assert sum(score.values()) == pytest.approx(1.0, abs=1e-5)  # a weighted mean: the shares add up
    assert score[bytes([104]) * 32] == 0.0  # the free rider moved nothing
    assert all(score[bytes([100 + i]) * 32] > 0 for i in range(4))


def test_multikrum_records_only_what_it_selected_and_a_sign_flipper_scores_nothing():
    deltas = [honest(i) for i in range(6)] + [{k: -4 * v for k, v in TRUE.items()} for _ in range(2)]
    shaped, score = run("MultiKrum", {"num_malicious_nodes": 2, "num_nodes_to_select": 4}, deltas, [10] * 8)
    attackers = {bytes([106]) * 32, bytes([107]) * 32}
    assert shaped.kind == SELECTED and len(shaped.inputs) == 4
    assert not attackers & {d for d, _ in shaped.inputs}  # Flower's own selection left them out
    assert all(score[a] == 0.0 for a in attackers)
    assert sum(w for _, w in shaped.inputs) == pytest.approx(1.0)


def test_fedavg_scores_a_sign_flipper_below_zero():
    deltas = [honest(i) for i in range(4)] + [{k: -1 * v for k, v in TRUE.items()}]
    _, score = run("FedAvg", {}, deltas, [10] * 5)
    assert score[bytes([104]) * 32] < 0 < min(score[bytes([100 + i]) * 32] for i in range(4))


def test_a_coordinate_rule_names_all_inputs_and_no_weights():
    deltas = [honest(i) for i in range(5)]
    shaped, _ = run("FedMedian", {}, deltas, [10, 20, 30, 40, 50])
    assert shaped.kind == COORDINATE and len(shaped.inputs) == 5 and all(w is None for _, w in shaped.inputs)


def test_byte_identical_updates_are_one_input_with_their_weights_summed():
    zero = {k: np.zeros_like(v) for k, v in TRUE.items()}
    sent = replies([honest(1), zero, zero], [10, 10, 10])
    same = bytes([200]) * 32
    sources = [sent[0][0]] + [Source(s.device, same, s.content, s.delta) for s, _ in sent[1:]]
    recorder = SelectionRecorder()
    strategy = make_strategy("FedAvg", {"min_available_nodes": 1}, selection_recorder=recorder)
    arrays, _ = strategy.aggregate_train(1, [m for _, m in sent])
    shaped = provenance(WEIGHTED, sources, recorder.take(), NUM_EXAMPLES, BASE, {k: v.numpy() for k, v in arrays.items()})
    assert dict(shaped.inputs)[same] == pytest.approx(2 / 3)
    assert [device for device, _, _ in shaped.scores()] == [s.device for s, _ in sent]  # each device keeps its own


def test_the_recorder_is_only_given_to_a_strategy_that_takes_the_hook():
    recorder = SelectionRecorder()
    assert make_strategy("FedAvg", {}, selection_recorder=recorder).train_metrics_aggr_fn is recorder
    wrapped = make_strategy("FedAvg", {}, {"wrapper": "DifferentialPrivacyServerSideFixedClipping", "params": {
        "noise_multiplier": 0.1, "clipping_norm": 1.0, "num_sampled_clients": 2}}, selection_recorder=recorder)
    assert wrapped.strategy.train_metrics_aggr_fn is recorder and rule_kind(wrapped) == WEIGHTED
    assert rule_kind(make_strategy("Bulyan", {"num_malicious_nodes": 0})) == COORDINATE
