"""A gateway's round aggregates, recomputed bit for bit from what its ledger records (gateway/recompute.py).

The real `Gateway` runs two training rounds with five real `Agent`s on the
synthetic model over a real Mosquitto broker (as test_strategies_e2e.py does);
a recorder on the broker keeps every reply and model release. Then, for each
`aggregate` vertex in the gateway's own ledger, the recorded reply attachments
are replayed in the order and with the weights the vertex records, through the
same Flower code, and the digest must be the release's, bit for bit. A single
changed byte of one update, or one changed weight, must give another digest.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_strategies_e2e import SHAPES, TRAIN, Recorder

from agent.config import AgentConfig
from agent.service import Agent
from gateway import recompute
from gateway.config import GatewayConfig
from gateway.recompute import Input
from gateway.service import Gateway
from hw.broker import Broker
from hw.synthetic import SyntheticModel, synthetic_data, write_manifest
from ledger.kinds import AGGREGATE
from ledger.store import Ledger
from protocol import cbor, envelope, schemas
from protocol.digest import sha256
from protocol.keys import Identity

DEVICES = 5
ROUNDS = 2
STRATEGIES = {
    "FedAvg": {},
    "FedMedian": {},
    "MultiKrum": {"num_malicious_nodes": 1, "num_nodes_to_select": 3},
    "FedTrimmedAvg": {"beta": 0.2},
}


IN_PROCESS = {**STRATEGIES, "FedProx": {"proximal_mu": 0.5}, "Krum": {"num_malicious_nodes": 1},
              "Bulyan": {"num_malicious_nodes": 1}}


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker"), kind="mosquitto") as running:
        yield running


def run_rounds(broker: Broker, tmp_path, name: str, params: dict):
    """ROUNDS rounds of the real gateway; (its result, every blob seen on the broker by digest, its aggregate
    vertex bodies)."""
    gw_key = Identity.generate()
    gw_key.save(tmp_path / "gw.key")
    config = GatewayConfig(
        name="gw", key=tmp_path / "gw.key", state_dir=tmp_path / "gw", broker_host=broker.host,
        broker_port=broker.port, manifest=write_manifest(tmp_path / "model", SHAPES), strategy=name,
        strategy_params={**params, "min_available_nodes": DEVICES, "min_train_nodes": DEVICES},
        num_rounds=ROUNDS, deadline_s=30, epochs=TRAIN["epochs"], batch_size=TRAIN["batch_size"], lr=TRAIN["lr"],
        min_devices=DEVICES, wait_devices_s=30, policy="open", evaluate_every=ROUNDS,
    )
    recorder = Recorder(broker, gw_key.id)
    stop, agent_stop = threading.Event(), threading.Event()
    result: dict = {}
    gateway = threading.Thread(target=lambda: result.update(Gateway(config, gw_key).run(stop)), daemon=True)
    gateway.start()
    agents = []
    for i in range(DEVICES):
        cfg = AgentConfig(name=f"syn-{i}", key=tmp_path / f"d{i}.key", state_dir=tmp_path / f"d{i}",
                          gateway_id=gw_key.id, gateway_public_key=gw_key.public_key, broker_host=broker.host,
                          broker_port=broker.port, replay=tmp_path / "none.npz", enroll_retry_s=0.5)
        agent = Agent(cfg, Identity.generate(), SyntheticModel(SHAPES, seed=i + 1), synthetic_data(32 * (i + 1)))
        thread = threading.Thread(target=agent.run, args=(agent_stop,), daemon=True)
        thread.start()
        agents.append(thread)
    gateway.join(120)
    agent_stop.set()
    for thread in agents:
        thread.join(20)
    recorded = recorder.drain()
    recorder.close()
    assert result.get("state") == "done", result
    blobs: dict[bytes, bytes] = {}
    for topic, payload in recorded:
        if "/status/" in topic or not payload:
            continue
        env = envelope.decode(payload)
        if env.type in ("model", "reply") and env.attachment:
            blobs[env.body["digest"]] = env.attachment
    with Ledger.open(config.state_dir / "ledger.db", read_only=True) as ledger:
        aggregates = [v.body for v in ledger.vertices_of(AGGREGATE)]
    return result, blobs, aggregates


def inputs_of(body: dict, blobs: dict[bytes, bytes]) -> list[Input]:
    """The recorded replies, in the recorded order, with the recorded weights."""
    return [Input(blobs[body["inputs"][i][0]], weight) for i, weight in body["params"]["sequence"]]


def tamper_one_byte(body: dict, inputs: list[Input], base: dict[str, np.ndarray]) -> list[Input]:
    """The inputs with one byte of one update's int8 data changed, where the rule cannot miss it: a value
    the output depends on (for a median or trimmed mean: a value strictly inside the kept ones)."""
    docs = [cbor.loads(item.update) for item in inputs]
    tensor = 0
    values = np.stack([np.frombuffer(d["tensors"][tensor]["data"], np.int8).astype(np.float64)
                       * d["tensors"][tensor]["scale"] for d in docs])  # (inputs, coordinates)
    ranks = np.argsort(np.argsort(values, axis=0, kind="stable"), axis=0, kind="stable")
    middle = len(inputs) // 2
    j, c = next((j, c) for c in range(values.shape[1]) for j in range(len(inputs))
                if ranks[j, c] == middle and len(set(values[:, c])) == len(inputs))
    data = bytearray(docs[j]["tensors"][tensor]["data"])
    data[c] = 127 if data[c] >= 128 else 0x81  # a negative value to +127, any other to -127
    docs[j]["tensors"][tensor]["data"] = bytes(data)
    changed = cbor.dumps(docs[j])
    assert len(changed) == len(inputs[j].update)
    assert sum(a != b for a, b in zip(changed, inputs[j].update)) == 1
    return [Input(changed, item.weight) if i == j else item for i, item in enumerate(inputs)]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_round_aggregate_recomputes_bit_for_bit_from_the_ledger(broker, tmp_path, name):
    result, blobs, aggregates = run_rounds(broker, tmp_path, name, STRATEGIES[name])
    assert [b["round"] for b in aggregates] == list(range(1, ROUNDS + 1))
    assert aggregates[-1]["output"].hex() == result["model"]["digest"]
    for body in aggregates:
        assert "params" in body, "no recompute params recorded: engine.py passes recompute.aggregate_params?"
        params = body["params"]
        assert params["strategy"].get("beta") == STRATEGIES[name].get("beta")
        assert params["versions"]["numpy"] == np.__version__
        selected = 3 if name == "MultiKrum" else DEVICES
        assert len(body["inputs"]) == len(params["sequence"]) == selected
        base = schemas.decode_model(blobs[body["base"]])
        inputs = inputs_of(body, blobs)
        weights = recompute.recompute(body["strategy"], params, base, inputs, body["round"])
        assert recompute.digest_of(weights) == body["output"]  # the release digest, bit for bit
        assert sha256(blobs[body["output"]]) == body["output"]  # ... of the model the devices got
        verdict = recompute.verify_body(body, blobs.get)
        assert verdict.ok and verdict.status == "match", verdict

        tampered = recompute.verify(body["strategy"], params, base, tamper_one_byte(body, inputs, base),
                                    body["output"])
        assert tampered.status == "mismatch" and tampered.got_digest not in (None, body["output"]), tampered
        copy = dict(blobs)  # a store handing out bytes that are not the digest's: a bad copy, not evidence
        copy[body["inputs"][0][0]] = blobs[body["inputs"][0][0]][:-1] + b"\0"
        assert recompute.verify_body(body, copy.get).status == "missing_inputs"
        if body["rule"] != "coordinate":  # (a coordinate rule weighs nothing)
            sequence = [list(item) for item in params["sequence"]]
            sequence[0][1] += 1
            reweighed = recompute.verify(body["strategy"], {**params, "sequence": sequence}, base,
                                         [Input(i.update, w) for i, (_, w) in zip(inputs, sequence)],
                                         body["output"])
            assert reweighed.status == "mismatch" and reweighed.got_digest is not None, reweighed
            forged = {**body, "params": {**params, "sequence": sequence}}
            assert recompute.verify_body(forged, blobs.get).status == "mismatch"


def test_what_cannot_be_recomputed_is_unverifiable_and_never_a_mismatch():
    body = {"round": 1, "strategy": "FedAdam", "base": b"\1" * 32, "rule": "weighted", "inputs": [[b"\2" * 32, 1.0]],
            "output": b"\3" * 32, "params": {"strategy": {}, "sequence": [[0, 10]]}}
    for changed, words in [({}, "optimizer state"),
                           ({"strategy": "FedAvg", "params": {"strategy": {}, "wrappers": [
                               "DifferentialPrivacyServerSideFixedClipping"], "sequence": [[0, 10]]}}, "noise"),
                           ({"strategy": "my.module:Fair"}, "not a strategy"),
                           ({"strategy": "FedAvg", "params": {"strategy": {}}}, "no sequence"),
                           ({"strategy": "Bulyan", "rule": "coordinate", "inputs": [[b"\2" * 32, None]],
                             "params": {"strategy": {}, "sequence": [[0, None]],
                                        "versions": {**recompute.versions(), "numpy_simd": "NEON,ASIMD"}}},
                            "SIMD")]:
        verdict = recompute.verify_body({**body, **changed}, lambda digest: None)
        assert verdict.status == "unverifiable" and not verdict.ok and words in verdict.reason, verdict
    first_form = {k: v for k, v in body.items() if k != "params"} | {"strategy": "FedAvg"}
    assert recompute.verify_body(first_form, lambda digest: None).status == "unverifiable"


def aggregate_in_process(name: str, updates: list[bytes], claims: list[int], order: list[int]):
    """The gateway's own path without the broker: its contents (grid.train_content of ingest.dequantize), in
    `order`, through the configured strategy with its SelectionRecorder, then provenance and the params the
    engine records. (the strategy's output, the recorded inputs, the params)"""
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from gateway.grid import NUM_EXAMPLES, train_content
    from gateway.ingest import dequantize
    from gateway.provenance import SelectionRecorder, Source, provenance, rule_kind
    from gateway.strategies import make_strategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    recorder = SelectionRecorder()
    strategy = make_strategy(name, {"min_available_nodes": 1, **IN_PROCESS[name]}, selection_recorder=recorder)
    sources, replies = [], []
    for i in order:
        delta, metrics = dequantize(updates[i])
        content = train_content(BASE, delta, claims[i], metrics)
        instruction = Message(RecordDict(), i + 1, "train")
        instruction.metadata.__dict__["_message_id"] = str(i)
        replies.append(Message(content, reply_to=instruction))
        sources.append(Source(bytes([i]) * 32, sha256(updates[i]), content, lambda d=delta: d))
    arrays, _ = strategy.aggregate_train(1, replies)
    output = {k: v.numpy() for k, v in arrays.items()}
    shaped = provenance(rule_kind(strategy), sources, recorder.take(), NUM_EXAMPLES, BASE, output)
    return output, list(shaped.inputs), recompute.aggregate_params(strategy, shaped, list(shaped.inputs))


BASE = {"w": np.random.default_rng(9).normal(size=(16, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}


def encoded_update(seed: int, scale: float = 0.1) -> bytes:
    from protocol.tensors import encode_tensors

    rng = np.random.default_rng(seed)
    delta = {k: (rng.normal(0, scale, v.shape)).astype(np.float32) for k, v in BASE.items()}
    return cbor.dumps({"tensors": encode_tensors(delta, "i8"), "metrics": {"train_loss": 0.5}})


@pytest.mark.parametrize("name", sorted(IN_PROCESS))
def test_each_verifiable_rule_recomputes_from_its_record_whatever_order_the_replies_came_in(name):
    updates = [encoded_update(seed) for seed in range(8)]
    claims = [31, 250, 47, 250, 99, 180, 12, 64]
    for trial in range(3):
        order = [int(i) for i in np.random.default_rng(trial).permutation(8)]
        output, inputs, params = aggregate_in_process(name, updates, claims, order)
        body = {"round": 1, "strategy": name, "base": sha256(schemas.encode_model(BASE)),
                "rule": "coordinate" if inputs[0][1] is None else "weighted", "inputs": [list(i) for i in inputs],
                "output": recompute.digest_of(output), "params": params}
        blobs = {sha256(u): u for u in updates} | {body["base"]: schemas.encode_model(BASE)}
        verdict = recompute.verify_body(body, blobs.get)
        assert verdict.ok, (trial, verdict)
        if name in ("MultiKrum", "FedTrimmedAvg", "FedAvg", "FedProx"):  # the order is part of the result
            replay = inputs_of(body, blobs)[::-1]
            assert not recompute.verify(name, params, BASE, replay, body["output"]).ok


def test_byte_identical_updates_are_one_input_but_replayed_once_per_reply():
    from protocol.tensors import encode_tensors

    zero = cbor.dumps({"tensors": encode_tensors({k: np.zeros_like(v) for k, v in BASE.items()}, "i8"),
                       "metrics": {"train_loss": 0.5}})
    updates = [encoded_update(1), zero, encoded_update(2), zero]  # two free riders send the same bytes
    for name in ("FedAvg", "FedMedian"):
        output, inputs, params = aggregate_in_process(name, updates, [40, 30, 50, 30], [0, 1, 2, 3])
        assert len(inputs) == 3 and len(params["sequence"]) == 4
        body = {"round": 1, "strategy": name, "base": sha256(schemas.encode_model(BASE)),
                "rule": "coordinate" if inputs[0][1] is None else "weighted", "inputs": [list(i) for i in inputs],
                "output": recompute.digest_of(output), "params": params}
        blobs = {sha256(u): u for u in updates} | {body["base"]: schemas.encode_model(BASE)}
        assert recompute.verify_body(body, blobs.get).ok
        once = [Input(u, w) for u, w in zip(updates[:3], [40, 60, 50] if name == "FedAvg" else [None] * 3)]
        assert not recompute.verify(name, params, BASE, once, body["output"]).ok  # merged: not what was summed
