"""[training] codec and density: the config keys, the tasks the grid sends, and a real topk round.

The round runs through the gateway's own parts (test_mqtt_grid's in-process gateway: round book on a
real journal, outbox, releases, reply intake) with devices that train with the agent's own learner and
keep their error feedback in a state dir, so topk replies are built, signed, checked, accepted and
aggregated by Flower's FedAvg exactly as in a fleet.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg
from test_mqtt_grid import DEVICES, GATEWAY, WEIGHTS, Fleet, arrays
from test_mqtt_grid import Gateway as GridGateway

from agent import learner
from agent.error_feedback import ErrorFeedback
from gateway.config import parse_config as parse_gateway
from gateway.grid import MqttGrid
from gateway.ingest import Accepted, Rejected
from hw.scenario import ScenarioError, parse_scenario
from hw.synthetic import SyntheticModel, synthetic_data
from protocol import cbor, envelope, schemas, topics
from protocol.config import ConfigError

GOOD_GATEWAY = {
    "gateway": {"name": "gw", "key": "k", "state_dir": "s"},
    "strategy": {"name": "FedAvg"},
    "enrollment": {"policy": "allowlist", "allowlist": []},
}


def test_the_codec_defaults_to_int8_and_topk_takes_its_density():
    config = parse_gateway(GOOD_GATEWAY)
    assert (config.codec, config.density) == ("i8", 0.1)
    config = parse_gateway({**GOOD_GATEWAY, "training": {"codec": "topk", "density": 0.05}})
    assert (config.codec, config.density) == ("topk", 0.05)
    assert parse_gateway({**GOOD_GATEWAY, "training": {"codec": "f16"}}).codec == "f16"
    assert parse_gateway({**GOOD_GATEWAY, "training": {"codec": "topk", "density": 1}}).density == 1.0


@pytest.mark.parametrize("table, match", [
    ({"codec": "int8"}, r"training\.codec must be one of \('i8', 'f16', 'f32', 'topk'\), got 'int8'"),
    ({"codec": "topk", "density": 0.0}, r"training\.density: density must be a number in \(0, 1\]"),
    ({"codec": "topk", "density": 1.5}, r"training\.density"),
    ({"codec": "topk", "density": -0.1}, r"training\.density"),
    ({"codec": "topk", "density": True}, r"training\.density must be float, got bool"),
    ({"codec": "topk", "density": float("nan")}, r"training\.density must be a finite number"),
    ({"codec": 8}, r"training\.codec must be str"),
    ({"codecs": "topk"}, r"unknown key training\.codecs; known: codec, density"),
])
def test_a_bad_codec_or_density_is_refused_naming_it(table, match):
    with pytest.raises(ConfigError, match=match):
        parse_gateway({**GOOD_GATEWAY, "training": table})


def test_a_scenario_passes_its_codec_to_the_gateways(tmp_path):
    scenario = parse_scenario({"training": {"codec": "topk", "density": 0.05}}, tmp_path)
    assert (scenario.codec, scenario.density) == ("topk", 0.05)
    assert (parse_scenario({}, tmp_path).codec, parse_scenario({}, tmp_path).density) == ("i8", None)
    with pytest.raises(ScenarioError, match="training.codec"):
        parse_scenario({"training": {"codec": "zip"}}, tmp_path)
    with pytest.raises(ScenarioError, match="training.density"):
        parse_scenario({"training": {"codec": "topk", "density": 2.0}}, tmp_path)


def test_the_grid_refuses_an_unknown_codec_or_density(tmp_path):
    for codec, density in (("zip", 0.1), ("topk", 0.0)):
        with pytest.raises(ValueError):
            MqttGrid(None, None, None, None, 1.0, None, codec=codec, density=density)


class LearningFleet(Fleet):
    """Devices that train with the agent's learner (synthetic models) and keep their residual on disk."""

    def __init__(self, tmp_path, hostile=None):
        super().__init__()
        self.tmp = tmp_path
        self.hostile = hostile  # a device that sends a mangled topk update instead
        self.tasks: list[schemas.Task] = []
        self.sent: dict[str, dict[str, np.ndarray]] = {}
        self.outcomes: list = []

    def publish(self, topic, payload, retain=False, counted=True):
        if "/task/" not in topic:
            self.published.append((topic, payload))
            return
        self.published.append((topic, payload))
        device = next(d for d in DEVICES if d.id == topics.device_of(topic))
        task_env = envelope.decode(payload)
        task = schemas.Task.from_body(task_env.body)
        self.tasks.append(task)
        index = DEVICES.index(device) + 1
        if task.kind == "train":
            feedback = ErrorFeedback(self.tmp / device.id)
            residual = feedback.load({k: v.shape for k, v in WEIGHTS.items()}, "gw:arch", task_env.ctx.round)
            outcome = learner.train(SyntheticModel({k: v.shape for k, v in WEIGHTS.items()}, seed=index), WEIGHTS,
                                    synthetic_data(64), task, np.random.default_rng(index), residual=residual)
            feedback.keep(outcome.residual, "gw:arch", task_env.ctx.round)
            update = outcome.attachment
            if device == self.hostile:  # the same update with a repeated index
                doc = cbor.loads(update)
                tensor = doc["tensors"][0]
                tensor["index"] = tensor["index"][:1] * (len(tensor["index"]))
                update = cbor.dumps(doc)
            self.sent[device.id] = schemas.decode_update(outcome.attachment)[0]
        else:
            update = schemas.encode_update({}, {"loss": 1.0, "accuracy": 0.5})
        ctx = envelope.Context(device.public_key, GATEWAY.id, task_env.ctx.round, task_env.ctx.task,
                               task_env.ctx.base)
        wire = envelope.seal(device, "reply", ctx, {"examples": 64}, update)
        self.outcomes.append(self.send(topics.reply(GATEWAY.id, device.id), wire))


@pytest.fixture
def topk_gateway(tmp_path):
    made = []

    def make(fleet):
        gateway = GridGateway(fleet, tmp_path)
        gateway.grid.codec, gateway.grid.density = "topk", 0.25  # as service.py passes [training]
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        gateway.close()


def test_a_topk_round_is_accepted_and_aggregated_from_the_sparse_deltas(tmp_path, topk_gateway):
    fleet = LearningFleet(tmp_path)
    grid = topk_gateway(fleet).grid
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3)
    for round_ in (1, 2):
        fleet.sent.clear()
        replies = list(grid.send_and_receive(strategy.configure_train(round_, arrays(), ConfigRecord(), grid)))
        assert len(replies) == 3 and all(isinstance(o, Accepted) for o in fleet.outcomes)
        aggregated, _ = strategy.aggregate_train(round_, replies)
        for name, base in WEIGHTS.items():  # equal weights: base + the mean of the decoded sparse deltas
            expected = base + np.mean([fleet.sent[d.id][name] for d in DEVICES], axis=0)
            np.testing.assert_allclose(aggregated[name].numpy(), expected, rtol=1e-6, atol=1e-7)
            assert all(np.count_nonzero(fleet.sent[d.id][name]) <= max(1, int(np.ceil(0.25 * base.size)))
                       for d in DEVICES)
        assert all((tmp_path / d.id / "residual.npz").is_file() for d in DEVICES)  # each device kept the rest
    assert {(t.kind, t.codec, t.density) for t in fleet.tasks} == {("train", "topk", 0.25)}
    grid.send_and_receive(strategy.configure_evaluate(3, arrays(), ConfigRecord(), grid))
    assert {t.codec for t in fleet.tasks if t.kind == "evaluate"} == {"i8"}  # no weights to encode


def test_a_mangled_topk_reply_is_rejected_with_its_reason_and_a_negative_receipt(tmp_path, topk_gateway):
    fleet = LearningFleet(tmp_path, hostile=DEVICES[0])
    grid = topk_gateway(fleet).grid
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=2)
    replies = list(grid.send_and_receive(strategy.configure_train(1, arrays(), ConfigRecord(), grid)))
    rejected = [o for o in fleet.outcomes if isinstance(o, Rejected)]
    assert len(replies) == 2 and len(rejected) == 1
    assert rejected[0].reason == "bad_tensor" and "strictly increasing" in rejected[0].detail
    (_, receipt), = fleet.receipts(DEVICES[0])
    assert not receipt.accepted and receipt.reason == "bad_tensor"
