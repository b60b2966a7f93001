"""Every Flower strategy that fits the IMU CNN, three rounds of real training through the real gateway.

Each run: the real `Gateway` (in a thread) with the shipped IMU CNN, and four real `Agent`s, each
training the real LiteRT `TrainableModel` on one watch subject's own windows (`hw.datasets`: one
subject is one device; capped to 64 training and 32 test windows, evenly spread over the subject's
recordings so every exercise is in them), one local epoch a round, over a real Mosquitto broker. A
recorder on the broker keeps every reply, model release and gateway status. The runs go four at a
time (module fixture `runs`); each test then checks one of them:

- every strategy: three trained rounds, each with every device; accuracy recorded for round 0 and
  every round after; every released model finite and different from its parent; the server
  optimizers' state (FedAdam, FedYogi, FedAdagrad: m_t, v_t; FedAvgM: the momentum) non-empty,
  finite and non-zero after the run;
- the four DP wrappers with noise_multiplier > 0 (FedAvg inside, uniform weights): each released
  model minus Flower's noise-free result from the very same replies (clipped as the wrapper
  clips) is Gaussian noise of the standard deviation the wrapper promises (z C / m; adaptive
  clipping: z_delta C' / m, with C' the norm it adapted to, read from the status topic); the
  adaptive clipping norm changed every round; the privacy reported (status topic and result.json)
  grows with every release, and equals what Google's dp-accounting computes independently here.
"""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent.budget import Budget
from agent.config import AgentConfig
from agent.samples import LocalData
from agent.service import Agent
from gateway.config import GatewayConfig
from gateway.service import Gateway, default_manifest, load_initial_weights
from hw.broker import Broker
from hw.datasets import load_watch_devices
from protocol import envelope, schemas, topics
from protocol.keys import Identity

pytest.importorskip("dp_accounting")  # the gateway extra's flwr[dp]

SUBJECTS = (1, 2, 3, 4)  # one watch subject per device
DEVICES = len(SUBJECTS)
ROUNDS = 3
TRAIN_WINDOWS, TEST_WINDOWS = 64, 32  # per device
TRAIN = {"epochs": 1, "batch_size": 32, "lr": 0.05}
PARALLEL = 4  # runs at a time (each: one gateway, four agents)
DELTA = 1e-5

STRATEGIES = {
    "FedAvg": {},
    "FedAvgM": {"server_learning_rate": 1.0, "server_momentum": 0.9},
    "FedProx": {"proximal_mu": 0.1},
    "FedAdam": {"eta": 0.01, "eta_l": 0.05},
    "FedYogi": {"eta": 0.01, "eta_l": 0.05},
    "FedAdagrad": {"eta": 0.01, "eta_l": 0.05},
    "Krum": {"num_malicious_nodes": 1},
    "MultiKrum": {"num_malicious_nodes": 1, "num_nodes_to_select": 3},
    "Bulyan": {"num_malicious_nodes": 0},
    "FedMedian": {},
    "FedTrimmedAvg": {"beta": 0.25},
    "QFedAvg": {"client_learning_rate": 0.05, "q": 0.2},
}
SERVER_STATE = {"FedAdam": ("m_t", "v_t"), "FedYogi": ("m_t", "v_t"), "FedAdagrad": ("m_t", "v_t"),
                "FedAvgM": ("momentum_vector",)}
ADAPTIVE = {"initial_clipping_norm": 0.5, "clipped_count_stddev": 1.0, "target_clipped_quantile": 0.5,
            "clip_norm_lr": 0.2}
DP = {
    "DifferentialPrivacyServerSideFixedClipping": {"noise_multiplier": 0.5, "clipping_norm": 0.5},
    "DifferentialPrivacyClientSideFixedClipping": {"noise_multiplier": 0.5, "clipping_norm": 0.5},
    "DifferentialPrivacyServerSideAdaptiveClipping": {"noise_multiplier": 0.5, **ADAPTIVE},
    "DifferentialPrivacyClientSideAdaptiveClipping": {"noise_multiplier": 0.5, **ADAPTIVE},
}


@dataclass
class Run:
    config: GatewayConfig
    result: dict[str, Any]
    strategy: Any  # the gateway's strategy object after the run
    models: dict[int, dict[str, np.ndarray]]  # round -> the model released by that round (0: the first)
    replies: dict[int, dict[str, dict[str, np.ndarray]]]  # round -> device -> its (dequantized) delta
    statuses: list[dict[str, Any]] = field(default_factory=list)  # every gateway status, in order
    seconds: float = 0.0


class Recorder:
    """Everything the gateway publishes (models, statuses) and every reply it gets."""

    def __init__(self, broker: Broker, gateway_id: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"recorder-{gateway_id}")
        self.client.on_message = self._take
        self.client.connect(broker.host, broker.port)
        self.client.subscribe([(topics.reply(gateway_id, "+"), 1), (topics.model(gateway_id, "+"), 1),
                               (topics.status(gateway_id), 1)])
        self.client.loop_start()

    def _take(self, _client, _userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload))

    def close(self) -> list[tuple[str, bytes]]:
        time.sleep(0.3)
        self.client.loop_stop()
        self.client.disconnect()
        with self.lock:
            return list(self.messages)


def spread(n: int, k: int) -> np.ndarray:
    return np.linspace(0, n - 1, min(n, k)).round().astype(int)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker"), kind="mosquitto") as running:
        yield running


@pytest.fixture(scope="module")
def watch_data() -> list[LocalData]:
    """Each subject's own windows (train and test, split in time per recording), capped."""
    out = []
    for device in load_watch_devices(SUBJECTS):
        tr, te = spread(device.num_train, TRAIN_WINDOWS), spread(device.num_test, TEST_WINDOWS)
        out.append(LocalData(device.x_train[tr], device.y_train[tr], device.x_test[te], device.y_test[te]))
    return out


def run(broker: Broker, tmp: Path, data: list[LocalData], name: str, params: dict, dp: dict | None = None,
        weights: str = "capped") -> Run:
    from firmware_models.runtime import TrainableModel
    from gateway.weights import WeightRule

    started = time.monotonic()
    manifest = json.loads(default_manifest().read_text())
    gw_key = Identity.generate()
    gw_key.save(tmp / "gw.key")
    nodes = {"min_available_nodes": DEVICES, "min_train_nodes": DEVICES, "min_evaluate_nodes": DEVICES}
    config = GatewayConfig(
        name=f"gw-{name}", key=tmp / "gw.key", state_dir=tmp / "gw", broker_host=broker.host, broker_port=broker.port,
        strategy="FedAvg" if dp else name, strategy_params={**params, **nodes}, strategy_dp=dp,
        num_rounds=ROUNDS, deadline_s=60, epochs=TRAIN["epochs"], batch_size=TRAIN["batch_size"], lr=TRAIN["lr"],
        min_devices=DEVICES, wait_devices_s=60, policy="open", weights=WeightRule(weights), gossip=False,
        bootstrap_s=0.0)
    recorder = Recorder(broker, gw_key.id)
    gateway, stop, result = Gateway(config, gw_key), threading.Event(), {}
    thread = threading.Thread(target=lambda: result.update(gateway.run(stop)), daemon=True)
    thread.start()
    agents, agent_stop = [], threading.Event()
    for i, local in enumerate(data):
        cfg = AgentConfig(name=f"subject-{SUBJECTS[i]}", key=tmp / f"d{i}.key", state_dir=tmp / f"d{i}",
                          gateway_id=gw_key.id, gateway_public_key=gw_key.public_key, broker_host=broker.host,
                          broker_port=broker.port, replay=None, enroll_retry_s=0.5, resend_s=2.0,
                          budget=Budget(thermal_zone=None))  # (a hot test machine must not make them sit out)
        agent = Agent(cfg, Identity.generate(), TrainableModel.from_package(), local,
                      architecture=manifest["sha256"], seed=i + 1)
        agents.append(threading.Thread(target=agent.run, args=(agent_stop,), daemon=True))
        agents[-1].start()
    thread.join(180)
    agent_stop.set()
    for agent_thread in agents:
        agent_thread.join(20)
    recorded = recorder.close()
    models, replies, statuses = {}, {}, []
    for topic, payload in recorded:
        if topic == topics.status(gw_key.id):
            statuses.append(json.loads(payload))
            continue
        if not payload:
            continue
        env = envelope.decode(payload)
        if env.type == "model":
            models[env.ctx.round] = schemas.decode_model(env.attachment)
        elif env.type == "reply" and env.ctx.task.startswith("train-"):
            round_ = int(env.ctx.task.split("-")[1])
            delta, _ = schemas.decode_update(env.attachment)
            replies.setdefault(round_, {})[env.ctx.sender_id] = delta
    return Run(config, result, gateway.strategy, models, replies, statuses, time.monotonic() - started)


CASES = {**{name: (name, params, None, "capped") for name, params in STRATEGIES.items()},
         **{wrapper: ("FedAvg", {}, {"wrapper": wrapper, "params": {**params, "num_sampled_clients": DEVICES}},
                      "uniform") for wrapper, params in DP.items()}}


@pytest.fixture(scope="module")
def runs(broker, watch_data, tmp_path_factory):
    """Every case, PARALLEL at a time; a case that raised keeps its exception (its test re-raises it)."""
    def one(case: str):
        name, params, dp, weights = CASES[case]
        try:
            return run(broker, tmp_path_factory.mktemp(case), watch_data, case if dp else name, params, dp, weights)
        except Exception as exc:  # noqa: BLE001 (reported by the case's own test)
            return exc

    started = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        done = dict(zip(CASES, pool.map(one, CASES)))
    print(f"\n{len(CASES)} runs of {ROUNDS} rounds in {time.monotonic() - started:.1f} s")
    return done


def finished(runs: dict[str, Any], case: str) -> Run:
    outcome = runs[case]
    if isinstance(outcome, Exception):
        raise outcome
    assert outcome.result.get("state") == "done", outcome.result
    return outcome


def check_rounds(r: Run) -> None:
    """Three trained rounds with every device; accuracy each round; every release finite and new."""
    records = {rec["round"]: rec for rec in r.result["rounds"]}
    assert sorted(records) == list(range(ROUNDS + 1)), records
    for round_ in range(ROUNDS + 1):
        rec = records[round_]
        assert rec["accuracy"] is not None and 0.0 <= rec["accuracy"] <= 1.0, rec
        assert rec["loss"] is not None and math.isfinite(rec["loss"]), rec
        if round_:
            assert rec["participants"] == DEVICES and rec["rejected"] == 0, rec
            assert len(r.replies[round_]) == DEVICES
    assert sorted(r.models) == list(range(ROUNDS + 1)), sorted(r.models)  # a release per round
    _, initial = load_initial_weights(default_manifest())
    for key in initial:
        np.testing.assert_array_equal(r.models[0][key], initial[key])
    for round_ in range(1, ROUNDS + 1):
        model, parent = r.models[round_], r.models[round_ - 1]
        assert all(np.all(np.isfinite(v)) for v in model.values()), round_
        moved = max(float(np.max(np.abs(model[k] - parent[k]))) for k in model)
        assert moved > 1e-6, f"round {round_}: the release did not move from its parent"


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_strategy_trains_three_real_rounds(runs, name):
    r = finished(runs, name)
    check_rounds(r)
    assert r.result["privacy"] is None  # no DP wrapper: nothing to account
    for attribute in SERVER_STATE.get(name, ()):
        value = getattr(r.strategy, attribute)
        arrays = list(value.values()) if isinstance(value, dict) else list(value or [])
        assert arrays, f"{name}.{attribute} is empty after {ROUNDS} rounds"
        assert all(np.all(np.isfinite(a)) for a in arrays)
        assert any(np.any(a != 0) for a in arrays), f"{name}.{attribute} is all zeros"


def clipped(delta: dict[str, np.ndarray], norm: float) -> dict[str, np.ndarray]:
    length = math.sqrt(sum(float(np.sum(np.square(v.astype(np.float64)))) for v in delta.values()))
    scale = min(1.0, norm / length) if length > 0 else 1.0
    return {k: v.astype(np.float64) * scale for k, v in delta.items()}


def norms_by_release(statuses: list[dict[str, Any]]) -> dict[int, float]:
    """The clipping norm the status showed after k releases (k = 0: the initial one)."""
    out: dict[int, float] = {}
    for status in statuses:
        privacy = status.get("privacy")
        if privacy is not None:
            out.setdefault(privacy["rounds"], privacy["clipping_norm"])
    return out


def adaptive_multiplier(z_model: float, sigma_b: float) -> float:
    """One round of adaptive clipping as one Gaussian mechanism: (z_model^-2 + sigma_b^-2)^-1/2, the count's
    sensitivity 1 (Flower counts plain 0/1 bits), to 3 significant digits rounded down (as the gateway)."""
    z = (z_model ** -2 + sigma_b ** -2) ** -0.5
    scale = 10.0 ** (2 - math.floor(math.log10(z)))
    return math.floor(z * scale) / scale


def independent_epsilon(multipliers: list[float], delta: float) -> float:
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE)
    for z in multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("wrapper", sorted(DP))
def test_each_dp_wrapper_adds_its_noise_and_reports_the_privacy_spent(runs, wrapper):
    r = finished(runs, wrapper)
    check_rounds(r)
    dp = r.config.strategy_dp["params"]
    adaptive = "Adaptive" in wrapper
    z_model = r.strategy.noise_multiplier  # (adaptive: what Flower kept for the model noise after the split)
    norms = norms_by_release(r.statuses) if adaptive else {k: dp["clipping_norm"] for k in range(ROUNDS + 1)}
    assert sorted(norms) == list(range(ROUNDS + 1)), norms
    if adaptive:
        assert norms[0] == dp["initial_clipping_norm"]
        assert all(norms[k] != norms[k - 1] for k in range(1, ROUNDS + 1)), f"the clipping norm did not adapt: {norms}"
    multipliers = []
    for round_ in range(1, ROUNDS + 1):
        base, deltas = r.models[round_ - 1], list(r.replies[round_].values())
        clip_to, noise_by = norms[round_ - 1], norms[round_]  # Flower scales its noise by the adapted norm
        if "ServerSide" in wrapper:
            deltas = [clipped(d, clip_to) for d in deltas]
        noise_free = {k: base[k] + np.mean([d[k] for d in deltas], axis=0) for k in base}
        residual = np.concatenate([(r.models[round_][k] - noise_free[k]).ravel() for k in base])
        expected = z_model * noise_by / DEVICES
        # ~11,750 weights: the standard deviation is known to within ~1 %; C' and C differ by more, mostly
        assert abs(float(np.std(residual)) / expected - 1) < 0.03, (round_, float(np.std(residual)), expected)
        assert abs(float(np.mean(residual))) < 0.05 * expected
        if adaptive:
            z = z_model * noise_by / clip_to
            multipliers.append(adaptive_multiplier(z, dp["clipped_count_stddev"]))
        else:
            multipliers.append(dp["noise_multiplier"])
    privacy = r.result["privacy"]
    assert privacy["rounds"] == ROUNDS and privacy["delta"] == DELTA and privacy["wrapper"] == wrapper
    assert math.isfinite(privacy["epsilon"]) and privacy["epsilon"] > 0
    assert privacy["method"] == "rdp, no-amplification, add-or-remove-one"
    assert privacy["epsilon"] == pytest.approx(independent_epsilon(multipliers, DELTA), rel=1e-9)
    if adaptive:  # a full round's effective multiplier is below the configured one (gateway/privacy.py)
        assert r.strategy.accounted_noise_multiplier() < dp["noise_multiplier"]
    spent = {}  # the status topic, release after release
    for status in r.statuses:
        if status.get("privacy") is not None:
            spent[status["privacy"]["rounds"]] = status["privacy"]["epsilon"]
    assert sorted(spent) == list(range(ROUNDS + 1)) and spent[0] == 0.0
    assert all(spent[k] > spent[k - 1] for k in range(1, ROUNDS + 1)), spent
    assert spent[ROUNDS] == privacy["epsilon"]
    for k in range(1, ROUNDS + 1):
        assert spent[k] == pytest.approx(independent_epsilon(multipliers[:k], DELTA), rel=1e-9)
