"""The update bound: any strategy, with every update bounded before it (gateway/defense.py)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from gateway import strategy_state
from gateway.defense import UpdateBound
from gateway.provenance import SelectionRecorder
from gateway.strategies import make_strategy
from protocol.config import ConfigError

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
BASE = {"w": np.zeros(4, np.float32)}


class Grid:
    def get_node_ids(self):
        return [1, 2, 3, 4, 5]

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id)


def replies(deltas: list[np.ndarray]) -> list[Message]:
    out = []
    for i, delta in enumerate(deltas):
        content = RecordDict({"arrays": ArrayRecord({"w": Array((BASE["w"] + delta).astype(np.float32))}),
                              "metrics": MetricRecord({"num-examples": 10})})
        out.append(Message(content, reply_to=Message(RecordDict(), dst_node_id=i + 1, message_type="train")))
    return out


def round_of(strategy, deltas, base=BASE):
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in base.items()}), ConfigRecord(), Grid())
    sent = replies(deltas)
    arrays, _ = strategy.aggregate_train(1, sent)
    return arrays["w"].numpy(), sent


HONEST = [np.array([1.0, 1.0, 0.0, 0.0]) + 0.1 * i for i in range(4)]


def test_a_boosted_update_is_cut_to_the_bound_and_the_contents_stay_the_same_objects():
    recorder = SelectionRecorder()
    strategy = make_strategy("FedAvg", {"min_available_nodes": 1}, selection_recorder=recorder,
                             defense={"median_multiple": 1.5})
    boosted = -40 * HONEST[0]
    output, sent = round_of(strategy, [*HONEST, boosted])
    assert strategy.bounded == 1
    cut = sent[-1].content["arrays"]["w"].numpy()
    median = float(np.median([np.linalg.norm(d) for d in [*HONEST, boosted]]))
    assert np.linalg.norm(cut) == pytest.approx(1.5 * median, rel=1e-5)
    assert [id(c) for c in recorder.take()] == [id(m.content) for m in sent]  # provenance still sees them
    plain = make_strategy("FedAvg", {"min_available_nodes": 1})
    unbounded, _ = round_of(plain, [*HONEST, boosted])
    assert output[0] > 0 > unbounded[0]  # without the bound the boosted flip drags the mean the wrong way


def test_centered_clipping_clips_around_last_rounds_direction_and_that_survives_a_restart():
    defense = {"median_multiple": 1.0, "centered_clipping": True}
    strategy = make_strategy("FedAvg", {"min_available_nodes": 1}, defense=defense)
    first, _ = round_of(strategy, HONEST)  # no history yet: clipped around zero
    assert np.allclose(strategy.momentum["w"], first)
    restarted = make_strategy("FedAvg", {"min_available_nodes": 1}, defense=defense)
    assert "momentum" in strategy_state.restore(restarted, strategy_state.capture(strategy))
    attacker = -10 * HONEST[0]
    after, sent = round_of(restarted, [*HONEST, attacker])
    # The attacker's update is pulled to within the bound of last round's direction v: v + (x - v) * tau / |x - v|
    v = first
    tau = float(np.median([np.linalg.norm(d - v) for d in [*HONEST, attacker]]))
    expected = v + (attacker - v) * tau / np.linalg.norm(attacker - v)
    assert np.allclose(sent[-1].content["arrays"]["w"].numpy(), expected, atol=1e-6)
    assert after[0] > 0
    fresh, fresh_sent = round_of(make_strategy("FedAvg", {"min_available_nodes": 1}, defense=defense),
                                 [*HONEST, attacker])  # forgotten (no restored state): clipped around zero
    assert not np.allclose(fresh_sent[-1].content["arrays"]["w"].numpy(), expected, atol=1e-3)


def test_a_defense_table_is_checked_like_any_strategy_parameter():
    with pytest.raises(ConfigError, match="defense"):
        make_strategy("FedAvg", {}, defense={"median_multiple": 2.0, "typo": 1})
    with pytest.raises(ConfigError, match="defense"):
        make_strategy("FedAvg", {}, defense={"median_multiple": 0.0, "norm_bound": 0.0})
    assert isinstance(make_strategy("FedAvg", {}, defense={"norm_bound": 3.0}), UpdateBound)


@pytest.mark.parametrize("kwargs, match", [
    ({"centered_clipping": "no"}, r"centered_clipping must be true or false, got str 'no'"),  # truthy: clipping on
    ({"centered_clipping": 1}, r"centered_clipping must be true or false, got int"),
    ({"norm_bound": True}, r"norm_bound must be a number, got bool"),
    ({"median_multiple": "2.0"}, r"median_multiple must be a number, got str"),
    ({"norm_bound": float("nan")}, r"norm_bound must be finite and not negative, got nan"),
    ({"median_multiple": float("inf")}, r"median_multiple must be finite and not negative, got inf"),
    ({"norm_bound": -1.0}, r"norm_bound must be finite and not negative, got -1\.0"),
])
def test_update_bound_refuses_a_bad_parameter_naming_it(kwargs, match):
    inner = make_strategy("FedAvg", {})
    with pytest.raises((TypeError, ValueError), match=match):
        UpdateBound(inner, **kwargs)
    with pytest.raises(ConfigError, match="defense: UpdateBound refused them: " + match):  # a config built in code
        make_strategy("FedAvg", {}, defense=kwargs)
