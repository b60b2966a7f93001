"""Adversarial devices: each attack's transform on real encoded updates, and a real gateway's answer to them."""

from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from agent import learner
from agent import service as agent_service
from agent.config import AgentConfig
from agent.samples import LocalData
from agent.service import Agent
from gateway.config import GatewayConfig
from gateway.ingest import Authenticator
from gateway.service import Gateway
from gateway.strategies import make_strategy
from gateway.weights import WeightRule
from hw import adversary, attacks
from hw.adversary import AdversarialAgent, adversary_command, build_parser, make_attack
from hw.attacks import (
    INFLATED_CLAIM,
    Crafted,
    ForgedSignature,
    FreeRider,
    GaussianNoise,
    InflateExamples,
    LabelFlip,
    Replay,
    Scaling,
    SignFlip,
    Sybil,
    UnderBound,
    alie_z,
    craft,
    flip_labels,
    tamper,
)
from hw.broker import Broker
from hw.synthetic import SyntheticModel, synthetic_data, write_manifest
from protocol import envelope, schemas, topics
from protocol.errors import BadSignature
from protocol.keys import Identity
from protocol.tensors import topk_count
from protocol.vouchers import issue

METRICS = {"train_loss": 0.5, "steps": 3.0}


def task(codec: str = "i8", **options) -> schemas.Task:
    return schemas.Task("train", "dev", schemas.TrainConfig(epochs=2, batch_size=32, lr=0.1, options=options), codec)


def honest_outcome(codec: str, seed: int = 0, shapes=((40, 30), (7,))) -> learner.Outcome:
    rng = np.random.default_rng(seed)
    delta = {f"t{i}": rng.normal(0, 0.05, size=s).astype(np.float32) for i, s in enumerate(shapes)}
    return learner.Outcome(schemas.encode_update(delta, METRICS, codec), 64, dict(METRICS))


def never_train(*args, **kwargs):
    raise AssertionError("this attack must not train")


# --- transforms on real encoded updates -------------------------------------------------------


@pytest.mark.parametrize("codec", ["i8", "f16", "f32"])
def test_sign_flip_sends_exactly_the_negated_update_with_the_same_count_and_metrics(codec):
    attack = SignFlip()
    honest = honest_outcome(codec)
    out = attack.train(lambda *a: honest, None, {}, None, task(codec), None)
    sent, metrics = schemas.decode_update(out.attachment)
    trained, _ = schemas.decode_update(honest.attachment)
    assert set(sent) == set(trained)
    for name in trained:
        np.testing.assert_array_equal(sent[name], -trained[name])
    assert metrics == METRICS and out.examples == honest.examples
    assert attack.sent[-1] == (honest.attachment, out.attachment)
    assert sent["t0"].dtype == np.float32 and schemas.check_update(out.attachment).shapes["t0"] == (40, 30)


@pytest.mark.parametrize("codec", ["i8", "f32"])
def test_scaling_multiplies_the_update_by_its_factor(codec):
    honest = honest_outcome(codec)
    out = tamper(honest, Scaling(10.0).transform, task(codec))
    sent, _ = schemas.decode_update(out.attachment)
    trained, _ = schemas.decode_update(honest.attachment)
    for name in trained:
        np.testing.assert_allclose(sent[name], 10.0 * trained[name], rtol=1e-5, atol=1e-7)
    out = tamper(honest, Scaling(-2.5).transform, task(codec))
    np.testing.assert_allclose(schemas.decode_update(out.attachment)[0]["t1"], -2.5 * trained["t1"], rtol=1e-5)


@pytest.mark.parametrize("codec", ["i8", "f32"])
def test_gaussian_noise_replaces_the_update_with_noise_of_the_given_sigma_without_training(codec):
    base = {"w": np.ones((200, 100), np.float32), "b": np.zeros(10, np.float32)}
    model = SyntheticModel({"w": (200, 100), "b": (10,)}, seed=1)
    out = GaussianNoise(0.5, seed=3).train(never_train, model, base, synthetic_data(64), task(codec), None)
    sent, metrics = schemas.decode_update(out.attachment)
    w = sent["w"].astype(np.float64)
    assert abs(w.mean()) < 0.01
    assert w.std() == pytest.approx(0.5, rel=0.03)
    assert sent["b"].shape == (10,) and set(metrics) == {"train_loss", "steps"} and out.examples == 64
    other = GaussianNoise(0.5, seed=3).train(never_train, model, base, synthetic_data(64), task(codec), None)
    assert other.attachment == out.attachment  # seeded: reproducible runs
    again = GaussianNoise(0.5, seed=3)
    again.train(never_train, model, base, synthetic_data(64), task(codec), None)
    assert again.train(never_train, model, base, synthetic_data(64), task(codec), None).attachment != out.attachment


def test_a_free_rider_sends_a_zero_update_with_a_plausible_count_and_metrics_and_never_trains():
    base = {"w": np.full((6, 3), 0.3, np.float32)}
    model = SyntheticModel({"w": (6, 3)}, seed=2)
    out = FreeRider().train(never_train, model, base, synthetic_data(100), task(), None)
    delta, metrics = schemas.decode_update(out.attachment)
    assert np.array_equal(delta["w"], np.zeros((6, 3), np.float32))
    assert out.examples == 100
    assert set(metrics) == {"train_loss", "steps"} and metrics["steps"] == 2 * 4  # 2 epochs of ceil(100/32)
    assert 0 < metrics["train_loss"] < 10
    capped = FreeRider().train(never_train, model, base, synthetic_data(100), task(clipping_norm=1.0), None, 0.0, 40)
    assert capped.examples == 40  # as the device's budget (max_samples) would have allowed
    assert set(schemas.decode_update(capped.attachment)[1]) == {"train_loss", "steps", "norm_bit"}


def test_label_flip_maps_training_labels_to_their_mirror_class_and_leaves_test_labels_alone(tmp_path):
    y = np.arange(7, dtype=np.int32).repeat(3)
    x = np.random.default_rng(0).normal(size=(len(y), 4)).astype(np.float32)
    data = LocalData(x, y, x[:7], y[:7])
    flipped = flip_labels(data, 7)
    np.testing.assert_array_equal(flipped.y_train, 6 - y)
    assert flipped.y_train.dtype == y.dtype and flipped.x_train is x
    np.testing.assert_array_equal(flipped.y_test, y[:7])
    # ... and the agent trains on the flipped labels, but evaluates on the true ones.
    gw = Identity.generate()
    cfg = AgentConfig(name="lf", key=tmp_path / "k", state_dir=tmp_path / "lf", gateway_id=gw.id,
                      gateway_public_key=gw.public_key, broker_host="127.0.0.1", broker_port=1, replay=None)
    agent = AdversarialAgent(cfg, Identity.generate(), SyntheticModel({"w": (2, 2)}, seed=1), data, LabelFlip(7))
    np.testing.assert_array_equal(agent._local_data("train").y_train, 6 - y)
    np.testing.assert_array_equal(agent._local_data("evaluate").y_test, y[:7])


def test_a_forging_identity_breaks_reply_signatures_only():
    device, gw = Identity.generate(), Identity.generate()
    forging = attacks.ForgedSignature().identity(device)
    assert forging.id == device.id and forging.public_key == device.public_key
    ctx = envelope.Context(device.public_key, gw.id, 1, "t", b"\x01" * 32)
    attachment = honest_outcome("i8").attachment
    forged = envelope.decode(envelope.seal(forging, "reply", ctx, {"examples": 64}, attachment))
    honest = envelope.decode(envelope.seal(device, "reply", ctx, {"examples": 64}, attachment))
    assert len(forged.sig) == 64 and forged.sig != honest.sig and forged.sig[1:] == honest.sig[1:]
    with pytest.raises(BadSignature):
        forged.verify()
    enroll_ctx = envelope.Context(device.public_key, gw.id, 0, "enroll", b"")
    envelope.decode(envelope.seal(forging, "enroll", enroll_ctx, {"name": "x", "time": 1.0})).verify()
    # The gateway's first stage refuses it as bad_signature; a sybil's push as unknown_device.
    checker = Authenticator(gw.id, lambda key: key == device.public_key)
    wire = envelope.seal(forging, "reply", ctx, {"examples": 64}, attachment)
    assert checker.authenticate(topics.reply(gw.id, device.id), wire).reason == "bad_signature"
    sybil = Identity.generate()
    push = attacks.unsolicited_reply(sybil, gw.id, {"w": (6, 3)}, 1)
    envelope.decode(push).verify()  # validly signed, by a key the gateway does not know
    assert checker.authenticate(topics.reply(gw.id, sybil.id), push).reason == "unknown_device"


def test_honest_agents_in_the_same_process_train_unchanged():
    adversary._install_view()
    assert isinstance(agent_service.learner, adversary._LearnerView)
    assert agent_service.learner.Outcome is learner.Outcome and agent_service.learner.BadOption is learner.BadOption
    base = {"w": np.zeros((6, 3), np.float32)}

    def run() -> learner.Outcome:
        return agent_service.learner.train(SyntheticModel({"w": (6, 3)}, seed=5), base, synthetic_data(64), task(),
                                           np.random.default_rng(0))

    honest = learner.train(SyntheticModel({"w": (6, 3)}, seed=5), base, synthetic_data(64), task(),
                           np.random.default_rng(0))
    assert run() == honest
    adversary._current.attack = SignFlip()
    try:  # in an attacker's worker thread the attack applies; in any other thread it does not
        other: list = []
        thread = threading.Thread(target=lambda: other.append(run()))
        thread.start()
        thread.join()
        assert other == [honest] and run() != honest
    finally:
        adversary._current.attack = None


def test_the_command_line_the_emulator_runs_parses_back(tmp_path):
    cmd = adversary_command("scaling", tmp_path / "agent.toml", scale=20)
    assert cmd[1:3] == ["-m", "hw.adversary"]
    args = build_parser().parse_args(cmd[3:])
    assert args.attack == "scaling" and args.scale == 20.0 and args.config == str(tmp_path / "agent.toml")
    args = build_parser().parse_args(adversary_command("sybil", "a.toml", payload="none", sigma=0.1)[3:])
    assert args.sybil_payload == "none" and args.sigma == 0.1
    with pytest.raises(ValueError):
        adversary_command("bogus", "a.toml")
    for name in adversary.ATTACKS:
        assert make_attack(name, num_classes=7).name == name
        assert name in adversary.EXPECTED
    assert isinstance(make_attack("sybil", payload="label_flip", num_classes=3).payload, LabelFlip)
    with pytest.raises(ValueError):
        make_attack("label_flip")
    assert adversary.main(["--attack", "sign_flip", "--config", str(tmp_path / "missing.toml")]) == 2
    cmd = adversary_command("crafted", "a.toml", collude=tmp_path / "c", colluders=3, fleet=10, z=0.7)
    args = build_parser().parse_args(cmd[3:])
    assert (args.collude, args.colluders, args.fleet_size, args.z) == (str(tmp_path / "c"), 3, 10, 0.7)
    args = build_parser().parse_args(adversary_command("inflate_examples", "a.toml", scale=0.5, claim=99)[3:])
    assert (args.scale, args.claim) == (0.5, 99)
    assert build_parser().parse_args(adversary_command("under_bound", "a.toml")[3:]).bound_multiple == 2.0
    assert make_attack("inflate_examples").scale == attacks.INFLATE_SCALE and make_attack("scaling").scale == 10
    for name in ("inflate_examples", "crafted", "under_bound"):
        assert adversary.EXPECTED[name] == ("accepted",)


# --- trust: inflated claims, crafted and bounded updates ----------------------------------------


@pytest.mark.parametrize("codec", ["i8", "f32"])
def test_inflate_examples_claims_ten_million_and_sends_a_boosted_flip(codec):
    honest = honest_outcome(codec)
    out = InflateExamples(scale=2.0).train(lambda *a: honest, None, {}, None, task(codec), None)
    assert out.examples == INFLATED_CLAIM == schemas.MAX_EXAMPLES and honest.examples == 64
    sent, metrics = schemas.decode_update(out.attachment)
    trained, _ = schemas.decode_update(honest.attachment)
    for name in trained:
        np.testing.assert_allclose(sent[name], -2.0 * trained[name], rtol=1e-5, atol=1e-7)
    assert metrics == METRICS
    # What the agent seals from that outcome (agent.service: {"examples": outcome.examples}) passes the schema.
    reply = schemas.Reply.from_body({"digest": b"\x00" * 32, "examples": out.examples})
    assert reply.examples == INFLATED_CLAIM
    with pytest.raises(ValueError):
        InflateExamples(claim=schemas.MAX_EXAMPLES + 1)


def deltas_of(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"w": rng.normal(0.2, 1.0, size=(30, 20)).astype(np.float32), "b": rng.normal(0, 0.5, 7).astype(np.float32)}
            for _ in range(n)]


def test_crafted_colluders_meet_in_their_folder_and_send_the_mean_minus_z_std_inside_the_honest_spread(tmp_path):
    assert alie_z(10, 3) == pytest.approx(0.5244, abs=1e-4)  # s = 6 - 3 = 3 supporters: Phi^-1(0.7)
    honest = deltas_of(3)
    attacks = [Crafted(tmp_path, colluders=3, fleet=10, wait_s=10, device=f"d{i}") for i in range(3)]
    sent: dict[int, dict[str, np.ndarray]] = {}

    def collude(i: int) -> None:
        attacks[i].begin_task("000001-train-1-x")
        sent[i] = attacks[i].transform(honest[i])

    threads = [threading.Thread(target=collude, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    z = alie_z(10, 3)
    assert all(a.seen == [3] and a.z == pytest.approx(z) for a in attacks)
    for name in honest[0]:
        stack = np.stack([d[name] for d in honest])
        mu, sigma = stack.mean(axis=0), stack.std(axis=0)
        for i in range(3):  # all three send the same update: mu - z sigma, coordinate by coordinate
            np.testing.assert_allclose(sent[i][name], mu - z * sigma, atol=1e-5)
        assert np.all(np.abs(sent[0][name] - mu) <= z * sigma + 1e-5)  # within z < 1 std of the mean
        # ... so closer to the mean than the honest deltas are, on average: inside their spread
        spread = np.sqrt(np.mean([np.sum((stack[i] - mu) ** 2) for i in range(3)]))
        assert np.linalg.norm(sent[0][name] - mu) <= z * spread + 1e-4
    assert sorted(p.name for p in (tmp_path / "000001-train-1-x").iterdir()) == ["d0.npz", "d1.npz", "d2.npz"]


def test_a_crafted_attacker_alone_waits_a_bounded_time_and_falls_back_to_its_own_delta(tmp_path):
    [d] = deltas_of(1, seed=4)
    lonely = Crafted(tmp_path, colluders=3, z=1.0, wait_s=0.3, device="d0")
    lonely.begin_task("000002-train-2-x")
    out = lonely.transform(d)
    assert lonely.seen == [1]
    for name in d:  # one sample has no spread: sigma = |d|, so it sends d - z|d|
        np.testing.assert_allclose(out[name], d[name] - np.abs(d[name]), atol=1e-6)
    np.testing.assert_allclose(craft([d], 0.5)["w"], d["w"] - 0.5 * np.abs(d["w"]), atol=1e-6)
    assert Crafted().z == 1.0 and Crafted(colluders=3, fleet=10).z == pytest.approx(alie_z(10, 3))
    assert Crafted(colluders=3, fleet=10, z=2.0).z == 2.0
    # Another exchange's deltas are not mixed in; no folder at all: alone, without waiting.
    other = Crafted(tmp_path, colluders=2, wait_s=0.2, device="d1")
    other.begin_task("000003-train-3-x")
    other.transform(d)
    assert other.seen == [1]
    unfolded = Crafted(colluders=3, z=1.0, wait_s=60)  # no rendezvous folder: alone at once, no wait
    np.testing.assert_allclose(unfolded.transform(d)["b"], d["b"] - np.abs(d["b"]), atol=1e-6)


TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1


def bounded_round(defense: dict, deltas: list[np.ndarray]):
    """One FedAvg round through the gateway's UpdateBound on plain arrays (as tests/gateway/test_defense.py)."""
    class Grid:
        def get_node_ids(self):
            return list(range(1, len(deltas) + 1))

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id, message_type, group_id=group_id)

    base = np.zeros(deltas[0].shape, np.float32)
    strategy = make_strategy("FedAvg", {"min_available_nodes": 1}, defense=defense)
    strategy.configure_train(1, ArrayRecord({"w": Array(base)}), ConfigRecord(), Grid())
    sent = [Message(RecordDict({"arrays": ArrayRecord({"w": Array((base + d).astype(np.float32))}),
                                "metrics": MetricRecord({"num-examples": 10})}),
                    reply_to=Message(RecordDict(), dst_node_id=i + 1, message_type="train"))
            for i, d in enumerate(deltas)]
    strategy.aggregate_train(1, sent)
    return strategy, [m.content["arrays"]["w"].numpy() for m in sent]


def test_under_bound_sends_a_flip_just_inside_the_norm_bound_the_gateway_then_leaves_uncut():
    rng = np.random.default_rng(7)
    honest = [rng.normal(0.1, 1.0, 64).astype(np.float32) for _ in range(10)]
    honest = [d / np.linalg.norm(d) * (1.0 + 0.01 * i) for i, d in enumerate(honest)]  # norms 1.00 ... 1.09
    attack = UnderBound(2.0)
    flipped = [attack.transform({"w": d})["w"] for d in honest[:3]]  # the three smallest norms attack
    for d, f in zip(honest, flipped):
        assert np.linalg.norm(f) == pytest.approx(0.99 * 2.0 * np.linalg.norm(d), rel=1e-6)
        assert np.dot(f, d) < 0
    deltas = [*flipped, *honest[3:]]
    bound = 2.0 * float(np.median([np.linalg.norm(d) for d in deltas]))
    assert all(np.linalg.norm(f) < bound for f in flipped)  # below the gateway's bound ...
    strategy, seen = bounded_round({"median_multiple": 2.0}, deltas)
    assert strategy.bounded == 0  # ... so the gateway's UpdateBound leaves every one of them as it is
    np.testing.assert_allclose(seen[0], flipped[0], atol=1e-6)
    boosted, _ = bounded_round({"median_multiple": 2.0}, [*(-4 * d for d in honest[:3]), *honest[3:]])
    assert boosted.bounded == 3  # where a -4 x flip is cut


# --- against a real gateway ---------------------------------------------------------------------

SHAPES = {"w": (6, 3)}
OPERATOR = Identity.generate()


def test_a_gateway_refuses_forged_replayed_and_sybil_replies_and_accepts_a_signed_sign_flip(tmp_path):
    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        gw_key = Identity.generate()
        gw_key.save(tmp_path / "gw.key")
        manifest = write_manifest(tmp_path / "model", SHAPES)
        config = GatewayConfig(
            name="gw", key=tmp_path / "gw.key", state_dir=tmp_path / "gw", broker_host=broker.host,
            broker_port=broker.port, manifest=manifest, num_rounds=2, deadline_s=6, min_devices=4,
            wait_devices_s=30, policy="voucher", operator_keys=(OPERATOR.public_key,), gossip=False, lr=0.1,
            strategy_params={"min_available_nodes": 4, "min_train_nodes": 4, "fraction_evaluate": 0.0},
        )
        result: dict = {}
        gateway = threading.Thread(target=lambda: result.update(Gateway(config, gw_key).run(threading.Event())),
                                   daemon=True)
        gateway.start()
        attacks = {"honest": None, "sign_flip": SignFlip(), "forged": ForgedSignature(),
                   "replay": Replay(), "sybil": Sybil(SignFlip())}
        ids, threads, agent_stop = {}, [], threading.Event()
        for i, (name, attack) in enumerate(attacks.items()):
            device = Identity.generate()
            ids[name] = device.id
            voucher = tmp_path / f"{name}.voucher"
            voucher.write_bytes(issue(OPERATOR, device.public_key, gw_key.id).encode())
            cfg = AgentConfig(name=name, key=tmp_path / f"{name}.key", state_dir=tmp_path / name,
                              gateway_id=gw_key.id, gateway_public_key=gw_key.public_key, broker_host=broker.host,
                              broker_port=broker.port, replay=None, voucher=voucher, enroll_retry_s=1.0)
            args = (cfg, device, SyntheticModel(SHAPES, seed=i + 1), synthetic_data(64))
            agent = Agent(*args) if attack is None else AdversarialAgent(*args, attack)
            threads.append(threading.Thread(target=agent.run, args=(agent_stop,), daemon=True))
            threads[-1].start()
        gateway.join(90)
        agent_stop.set()
        for thread in threads:
            thread.join(20)
    assert result.get("state") == "done", result
    rounds = {r["round"]: r for r in result["rounds"]}
    assert rounds[1]["participants"] == 3  # honest, sign_flip and (still honest in round 1) replay
    assert rounds[2]["participants"] == 2  # the replayer re-sent round 1's reply instead
    rejections = result["rejections"]
    assert rejections.get("bad_signature", 0) >= 2  # the forger's reply in each round
    assert rejections.get("replay", 0) >= 1
    assert rejections.get("unknown_device", 0) >= 1  # the sybil's unsolicited pushes
    assert result["enroll_rejections"].get("no_voucher", 0) >= 1  # the sybil's enrollment
    assert attacks["replay"].replayed >= 1 and attacks["sybil"].pushed >= 1

    with sqlite3.connect(tmp_path / "gw" / "rounds.db") as db:
        rows = db.execute("select e.round, a.device, a.reply from accepted a join exchange e on a.task = e.task"
                          ).fetchall()
    accepted = {}
    for round_, device, wire in rows:
        accepted.setdefault(device, {})[round_] = envelope.decode(wire)
    assert ids["forged"] not in accepted and ids["sybil"] not in accepted
    assert sorted(accepted[ids["replay"]]) == [1]
    flipped = accepted[ids["sign_flip"]]
    assert sorted(flipped) == [1, 2]
    sent = dict((s, h) for h, s in attacks["sign_flip"].sent)
    for env in flipped.values():
        env.verify()  # validly signed by the device: only the strategy can defend against it
        recorded, _ = schemas.decode_update(env.attachment)
        trained, _ = schemas.decode_update(sent[env.attachment])
        np.testing.assert_array_equal(recorded["w"], -trained["w"])
        assert np.abs(trained["w"]).max() > 0
    # Independently of the attack's own record: a synthetic device's honest delta points from the base
    # toward its target; the recorded one points the other way.
    with np.load(tmp_path / "model" / "weights.npz") as npz:
        base = npz["w"]
    recorded = schemas.decode_update(flipped[1].attachment)[0]["w"]
    toward = SyntheticModel(SHAPES, seed=2).target["w"] - base
    cosine = float(np.sum(recorded * toward) / np.linalg.norm(recorded) / np.linalg.norm(toward))
    assert cosine < -0.99


def test_attackers_run_as_processes_from_the_agent_toml_and_a_sybil_is_enrolled_under_open_policy(tmp_path):
    """`python -m hw.adversary` as the emulator starts it: real model, replay file, open enrollment."""
    import json
    import subprocess

    from gateway.service import default_manifest
    from hw.broker import _child_env

    rng = np.random.default_rng(0)
    data = tmp_path / "windows.npz"
    np.savez(data, x_train=rng.normal(size=(40, 128, 6)).astype(np.float32), y_train=rng.integers(0, 7, 40),
             x_test=rng.normal(size=(8, 128, 6)).astype(np.float32), y_test=rng.integers(0, 7, 8))
    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        gw_key = Identity.generate()
        gw_key.save(tmp_path / "gw.key")
        config = GatewayConfig(
            name="gw", key=tmp_path / "gw.key", state_dir=tmp_path / "gw", broker_host=broker.host,
            broker_port=broker.port, manifest=default_manifest(), num_rounds=1, deadline_s=40, min_devices=2,
            wait_devices_s=60, policy="open", gossip=False,
            strategy_params={"min_available_nodes": 2, "min_train_nodes": 2, "fraction_evaluate": 0.0},
        )
        result: dict = {}
        gateway = threading.Thread(target=lambda: result.update(Gateway(config, gw_key).run(threading.Event())),
                                   daemon=True)
        gateway.start()
        processes = []
        for name, extra in (("lf", {}), ("sybil", {"payload": "sign_flip"})):
            home = tmp_path / name
            home.mkdir()
            (home / "agent.toml").write_text(
                f'[device]\nname = "{name}"\nkey = "{home / "device.key"}"\nstate_dir = "{home / "state"}"\n'
                f'voucher = "{home / "none.voucher"}"\n'  # missing: fine for a sybil, which never sends one
                f'[gateway]\nid = "{gw_key.id}"\npublic_key = "{gw_key.public_key.hex()}"\n'
                f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n[data]\nreplay = "{data}"\n')
            if name == "lf":  # a label flipper with a voucher path that does not exist is refused, as the agent is
                cmd = adversary_command("label_flip", home / "agent.toml")
                done = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, timeout=60)
                assert done.returncode == 2 and "does not exist" in done.stderr
                (home / "agent.toml").write_text((home / "agent.toml").read_text().replace(
                    f'voucher = "{home / "none.voucher"}"\n', ""))
                cmd = adversary_command("label_flip", home / "agent.toml")
            else:
                cmd = adversary_command("sybil", home / "agent.toml", **extra)
            log = open(home / "log", "wb")
            processes.append(subprocess.Popen(cmd, env=_child_env(), stdout=log, stderr=subprocess.STDOUT))
            log.close()
        gateway.join(120)
        for p in processes:
            p.terminate()
        codes = [p.wait(30) for p in processes]
    logs = {name: (tmp_path / name / "log").read_text() for name in ("lf", "sybil")}
    assert result.get("state") == "done", (result, logs)
    assert codes == [0, 0], logs
    assert result["rounds"][-1]["participants"] == 2, (result, logs)  # both validly signed: both accepted
    assert not result["rejections"] and not result["enroll_rejections"], result
    for name in ("lf", "sybil"):
        assert "attack.start" in logs[name] and "receipt.accepted" in logs[name], logs[name]
    assert json.loads((tmp_path / "gw" / "result.json").read_text())["state"] == "done"


def test_a_gateway_accepts_a_signed_inflated_claim_and_weighs_it_as_the_capped_rule_says(tmp_path):
    """One inflate_examples device among two honest ones, against a real gateway with the default weights:
    the device signed the 10,000,000-example claim, the gateway accepted it, and the release records the
    effective weight the strategy got: the cap (1 x the median claim), not ~all of it."""
    import json

    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        gw_key = Identity.generate()
        gw_key.save(tmp_path / "gw.key")
        manifest = write_manifest(tmp_path / "model", SHAPES)
        config = GatewayConfig(
            name="gw", key=tmp_path / "gw.key", state_dir=tmp_path / "gw", broker_host=broker.host,
            broker_port=broker.port, manifest=manifest, num_rounds=1, deadline_s=20, min_devices=3,
            wait_devices_s=30, policy="open", gossip=False, lr=0.1,
            strategy_params={"min_available_nodes": 3, "min_train_nodes": 3, "fraction_evaluate": 0.0},
        )
        assert config.weights == WeightRule("capped", 100_000, 1.0)  # the gateway's default
        result: dict = {}
        gateway = threading.Thread(target=lambda: result.update(Gateway(config, gw_key).run(threading.Event())),
                                   daemon=True)
        gateway.start()
        inflate = InflateExamples(scale=1.0)
        ids, threads, agent_stop = {}, [], threading.Event()
        for i, (name, attack, n) in enumerate((("a", None, 64), ("b", None, 96), ("inflated", inflate, 80))):
            device = Identity.generate()
            ids[name] = device.id
            cfg = AgentConfig(name=name, key=tmp_path / f"{name}.key", state_dir=tmp_path / name,
                              gateway_id=gw_key.id, gateway_public_key=gw_key.public_key, broker_host=broker.host,
                              broker_port=broker.port, replay=None, enroll_retry_s=1.0)
            args = (cfg, device, SyntheticModel(SHAPES, seed=i + 1), synthetic_data(n))
            agent = Agent(*args) if attack is None else AdversarialAgent(*args, attack)
            threads.append(threading.Thread(target=agent.run, args=(agent_stop,), daemon=True))
            threads[-1].start()
        gateway.join(60)
        agent_stop.set()
        for thread in threads:
            thread.join(20)
    assert result.get("state") == "done", result
    assert result["rounds"][-1]["participants"] == 3 and not result["rejections"], result
    with sqlite3.connect(tmp_path / "gw" / "rounds.db") as db:
        replies = {device: envelope.decode(wire) for device, wire in db.execute("select device, reply from accepted")}
        [(inputs,)] = db.execute("select inputs from release where round = 1 and step = 1").fetchall()
    claims = {}
    for name, device_id in ids.items():
        env = replies[device_id]
        env.verify()  # signed by the device, the claim included
        claims[name] = env.body["examples"]
    assert claims == {"a": 64, "b": 96, "inflated": INFLATED_CLAIM}
    recorded = json.loads(inputs)
    assert recorded["rule"] == "weighted"
    weight = {digest: w for digest, w in recorded["inputs"]}
    share = {name: weight[replies[device_id].body["digest"].hex()] for name, device_id in ids.items()}
    cap = 96  # 1 x the median claim (96): the inflated reply weighs what device b weighs
    assert share["inflated"] == pytest.approx(cap / (64 + 96 + cap))  # 0.375, where "reported" would give ~0.99998
    assert share["a"] == pytest.approx(64 / (64 + 96 + cap))


def test_a_tampered_topk_update_keeps_the_tasks_density():
    honest = honest_outcome("topk")
    sparse = schemas.Task("train", "dev", schemas.TrainConfig(epochs=2, batch_size=32, lr=0.1), "topk", 0.05)
    out = tamper(honest, Scaling(-1.0).transform, sparse)
    sent, _ = schemas.decode_update(out.attachment)
    assert np.count_nonzero(sent["t0"]) <= topk_count(40 * 30, 0.05) < np.count_nonzero(
        schemas.decode_update(honest.attachment)[0]["t0"])
