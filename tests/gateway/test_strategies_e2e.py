"""Every named Flower strategy through the real gateway, broker and agents.

Each test runs one training round of the real `Gateway` (in a thread) with
five real `Agent`s whose model is synthetic (hw/synthetic.py), over a real
Mosquitto broker. A recorder on the broker keeps every reply and model
release. The check: the model the gateway released equals what a fresh
instance of the same Flower strategy computes from the very same replies
(dequantized the same way) — Flower's own aggregation is the reference.
"""

from __future__ import annotations

import json
import queue
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from agent.config import AgentConfig
from agent.service import Agent
from gateway.config import GatewayConfig
from gateway.service import Gateway, load_initial_weights
from hw.broker import Broker
from hw.synthetic import SyntheticModel, synthetic_data, write_manifest
from protocol import envelope, schemas, topics
from protocol.keys import Identity
from protocol.tensors import delta_step

SHAPES = {"dense_w": (8, 4), "dense_b": (4,)}
DEVICES = 5
TRAIN = {"epochs": 1, "batch_size": 32, "lr": 0.5}


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker"), kind="mosquitto") as running:
        yield running


class Recorder:
    def __init__(self, broker: Broker, gateway_id: str) -> None:
        self.messages: queue.Queue = queue.Queue()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="recorder")
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.subscribe([(topics.reply(gateway_id, "+"), 1), (topics.model(gateway_id, "+"), 1),
                               (topics.device_status(gateway_id, "+"), 1)])
        self.client.loop_start()
        time.sleep(0.2)

    def drain(self) -> list[tuple[str, bytes]]:
        out = []
        while not self.messages.empty():
            out.append(self.messages.get())
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class _NodesOnly(Grid):
    """Just enough of a Grid for a reference strategy's configure_train."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def set_run(self, run): ...
    @property
    def run(self): ...
    def create_message(self, *a, **k): ...
    def get_node_ids(self):
        return self.node_ids
    def push_messages(self, messages): ...
    def pull_messages(self, message_ids): ...
    def send_and_receive(self, messages, *, timeout=None): ...


def run_one_round(broker: Broker, tmp_path, name: str, params: dict, dp: dict | None = None):
    manifest = write_manifest(tmp_path / "model", SHAPES)
    gw_key = Identity.generate()
    gw_key.save(tmp_path / "gw.key")
    config = GatewayConfig(
        name="gw", key=tmp_path / "gw.key", state_dir=tmp_path / "gw", broker_host=broker.host,
        broker_port=broker.port, manifest=manifest, strategy=name, strategy_params=params, strategy_dp=dp,
        num_rounds=1, deadline_s=30, epochs=TRAIN["epochs"], batch_size=TRAIN["batch_size"], lr=TRAIN["lr"],
        min_devices=DEVICES, wait_devices_s=30, policy="open",
    )
    recorder = Recorder(broker, gw_key.id)
    stop = threading.Event()
    result: dict = {}
    gateway = threading.Thread(target=lambda: result.update(Gateway(config, gw_key).run(stop)), daemon=True)
    gateway.start()
    agents, agent_stop = [], threading.Event()
    for i in range(DEVICES):
        device = Identity.generate()
        cfg = AgentConfig(name=f"syn-{i}", key=tmp_path / f"d{i}.key", state_dir=tmp_path / f"d{i}",
                          gateway_id=gw_key.id, gateway_public_key=gw_key.public_key, broker_host=broker.host,
                          broker_port=broker.port, replay=tmp_path / "none.npz", enroll_retry_s=0.5)
        agent = Agent(cfg, device, SyntheticModel(SHAPES, seed=i + 1), synthetic_data(32 * (i + 1)))
        thread = threading.Thread(target=agent.run, args=(agent_stop,), daemon=True)
        thread.start()
        agents.append(thread)
    gateway.join(120)
    agent_stop.set()
    for thread in agents:
        thread.join(20)
    time.sleep(0.3)
    recorded = recorder.drain()
    recorder.close()
    assert result.get("state") == "done", result
    return config, result, recorded


def reference(config: GatewayConfig, recorded, final_digest: str):
    """Flower's own aggregation of the replies the gateway got, and the model the gateway released."""
    _, initial = load_initial_weights(config.manifest)
    models = {}
    replies = []
    train = []
    for topic, payload in recorded:
        if "/status/" in topic:
            continue
        env = envelope.decode(payload)
        if env.type == "model" and payload:
            models[env.body["digest"].hex()] = schemas.decode_model(env.attachment)
        elif env.type == "reply" and env.ctx.task.startswith("train-1-"):
            train.append(env)
    # Flower weighs each reply by what the gateway's weight rule makes of the claims (the default "capped"
    # cuts the claims above the exchange's median), not by the claims themselves.
    weights = config.weights.effective([env.body["examples"] for env in train])
    for env, examples in zip(train, weights):
        delta, metrics = schemas.decode_update(env.attachment)
        instruction = Message(RecordDict(), len(replies) + 1, "train")  # node ids only label replies
        instruction.metadata.__dict__["_message_id"] = env.ctx.sender_id
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(initial[k] + delta[k]) for k in initial}),
            "metrics": MetricRecord({"num-examples": examples, **metrics}),
        })
        replies.append(Message(content, reply_to=instruction))
    assert len(replies) == DEVICES
    strategy = config.make_strategy()
    initial_arrays = ArrayRecord({k: Array(v) for k, v in initial.items()})
    train_config = ConfigRecord({"epochs": TRAIN["epochs"], "batch-size": TRAIN["batch_size"], "lr": TRAIN["lr"]})
    list(strategy.configure_train(1, initial_arrays, train_config, _NodesOnly(list(range(DEVICES)))))
    expected, _ = strategy.aggregate_train(1, replies)
    expected = {k: v.numpy() for k, v in expected.items()}
    if config.download != schemas.FULL:  # released as the first model plus the delta devices download
        expected = delta_step(initial, expected, config.download)[1]
    return expected, models[final_digest], replies


STRATEGIES = {
    "FedAvg": {},
    "FedAvgM": {"server_learning_rate": 1.0, "server_momentum": 0.9},
    "FedProx": {"proximal_mu": 0.5},
    "FedAdam": {"eta": 0.1, "eta_l": 0.1},
    "FedYogi": {"eta": 0.1, "eta_l": 0.1},
    "FedAdagrad": {"eta": 0.1, "eta_l": 0.1},
    "Krum": {"num_malicious_nodes": 1},
    "MultiKrum": {"num_malicious_nodes": 1, "num_nodes_to_select": 3},
    "Bulyan": {"num_malicious_nodes": 0},
    "FedMedian": {},
    "FedTrimmedAvg": {"beta": 0.2},
    "QFedAvg": {"client_learning_rate": 0.5, "q": 0.2},
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_strategy_releases_exactly_what_flower_aggregates_from_the_same_replies(broker, tmp_path, name):
    params = {**STRATEGIES[name], "min_available_nodes": DEVICES, "min_train_nodes": DEVICES,
              "min_evaluate_nodes": DEVICES}
    config, result, recorded = run_one_round(broker, tmp_path, name, params)
    expected, released, _ = reference(config, recorded, result["model"]["digest"])
    for key in expected:
        np.testing.assert_allclose(released[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=f"{name}:{key}")
    assert result["rounds"][-1]["participants"] == DEVICES
    statuses = {}
    for topic, payload in recorded:
        if "/status/device/" in topic:
            statuses[topics.device_of(topic)] = json.loads(payload)
    assert len(statuses) == DEVICES  # every device's retained status: last seen, accepted, rejected
    assert all(s["accepted"] >= 2 and s["rejected"] == {} and s["last_seen"] > 0 for s in statuses.values())
    assert sorted(s["name"] for s in statuses.values()) == [f"syn-{i}" for i in range(DEVICES)]


def test_fedprox_mu_reaches_the_devices_and_pulls_updates_toward_the_global_model(broker, tmp_path):
    def mean_update_norm(mu: float, where) -> float:
        params = {"proximal_mu": mu, "min_available_nodes": DEVICES, "min_train_nodes": DEVICES}
        config, result, recorded = run_one_round(broker, where, "FedProx", params)
        _, _, replies = reference(config, recorded, result["model"]["digest"])
        _, initial = load_initial_weights(config.manifest)
        return float(np.mean([np.linalg.norm(np.concatenate(
            [(r.content["arrays"][k].numpy() - initial[k]).ravel() for k in initial])) for r in replies]))

    assert mean_update_norm(1.0, tmp_path / "a") < 0.8 * mean_update_norm(0.0, tmp_path / "b")


@pytest.mark.parametrize("wrapper, dp_params", [
    ("DifferentialPrivacyClientSideFixedClipping", {"noise_multiplier": 0.0, "clipping_norm": 0.5}),
    ("DifferentialPrivacyServerSideFixedClipping", {"noise_multiplier": 0.0, "clipping_norm": 0.5}),
    ("DifferentialPrivacyClientSideAdaptiveClipping", {"noise_multiplier": 0.0, "initial_clipping_norm": 0.5}),
])
def test_dp_wrappers_run_and_clip(broker, tmp_path, wrapper, dp_params):
    dp = {"wrapper": wrapper, "params": {**dp_params, "num_sampled_clients": DEVICES}}
    config, result, recorded = run_one_round(broker, tmp_path, "FedAvg", {"min_available_nodes": DEVICES}, dp)
    expected, released, replies = reference(config, recorded, result["model"]["digest"])
    for key in expected:  # noise 0: Flower's own result is deterministic
        np.testing.assert_allclose(released[key], expected[key], rtol=1e-5, atol=1e-6)
    if "ClientSide" in wrapper:  # the devices clipped their own updates
        _, initial = load_initial_weights(config.manifest)
        for reply in replies:
            delta = np.concatenate([(reply.content["arrays"][k].numpy() - initial[k]).ravel() for k in initial])
            assert np.linalg.norm(delta) <= 0.5 * 1.01
            assert "norm_bit" in reply.content["metrics"]
