"""hw/tampered_gateway.py: the gateway attack's aggregates are not what their recorded inputs give, and a recompute
(gateway/recompute.py, what the city's audits run) says so; nothing but the tampered strategy instance changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gateway import recompute
from gateway.config import GatewayConfig, parse_config
from gateway.grid import train_content
from gateway.ingest import dequantize
from gateway.strategies import make_strategy
from hw import tampered_gateway
from hw.tampered_gateway import DEFAULT_SCALE, MIN_RMS, command, install, perturb, tamper
from protocol import schemas
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]
BASE = {"dense_w": np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4), "dense_b": np.zeros(4, np.float32)}
CLAIMS = [30, 50, 20]


def updates() -> list[bytes]:
    """Three devices' signed-reply attachments (int8 deltas), as the gateway keeps them."""
    rng = np.random.default_rng(5)
    return [schemas.encode_update({k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in BASE.items()},
                                  {"train_loss": 1.0}) for _ in CLAIMS]


def replies(attachments: list[bytes]) -> list:
    """Flower reply messages around the gateway's own contents (grid.train_content of ingest.dequantize)."""
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    out = []
    for i, (attachment, claim) in enumerate(zip(attachments, CLAIMS)):
        delta, metrics = dequantize(attachment)
        instruction = Message(RecordDict(), i + 1, "train")
        instruction.metadata.__dict__["_message_id"] = str(i)
        out.append(Message(train_content(BASE, delta, claim, metrics), reply_to=instruction))
    return out


def aggregate(strategy, attachments: list[bytes]) -> dict[str, np.ndarray]:
    arrays, _ = strategy.aggregate_train(1, replies(attachments))
    return {k: v.numpy() for k, v in arrays.items()}


def test_perturb_moves_every_array_even_an_all_zero_one_and_is_seeded():
    out = perturb(BASE, 0.05, np.random.default_rng(1))
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, np.float32) for k, v in BASE.items()}
    assert all(not np.array_equal(out[k], BASE[k]) for k in BASE)
    rms = float(np.sqrt(np.mean(BASE["dense_w"].astype(np.float64) ** 2)))
    assert 0 < np.std(out["dense_w"] - BASE["dense_w"]) < 3 * 0.05 * rms  # small: relative to the array
    assert np.abs(out["dense_b"]).max() < 10 * 0.05 * MIN_RMS
    again = perturb(BASE, 0.05, np.random.default_rng(1))
    assert all(np.array_equal(out[k], again[k]) for k in BASE)


def test_a_tampered_aggregate_fails_the_recompute_its_honest_twin_passes():
    attachments = updates()
    honest = make_strategy("FedAvg", {"min_available_nodes": 1})
    tampered = tamper(make_strategy("FedAvg", {"min_available_nodes": 1}), DEFAULT_SCALE, np.random.default_rng(0))
    truth, lie = aggregate(honest, attachments), aggregate(tampered, attachments)
    assert not any(np.array_equal(truth[k], lie[k]) for k in BASE)  # every array differs ...
    assert max(float(np.abs(truth[k] - lie[k]).max()) for k in BASE) < 0.5  # ... by a little noise
    # What the gateway records for it: the strategy's real parameters, no wrapper (so it looks recomputable)
    assert recompute.strategy_params(tampered) == recompute.strategy_params(honest)
    assert recompute.strategy_params(tampered)[1] == []
    params = {"strategy": recompute.strategy_params(tampered)[0], "versions": recompute.versions(),
              "sequence": [[i, claim] for i, claim in enumerate(CLAIMS)]}
    inputs = [recompute.Input(a, claim) for a, claim in zip(attachments, CLAIMS)]
    good = recompute.verify("FedAvg", params, BASE, inputs, recompute.digest_of(truth))
    assert good.status == "match", good  # the harness is right: the honest aggregate recomputes bit for bit
    bad = recompute.verify("FedAvg", params, BASE, inputs, recompute.digest_of(lie))
    assert bad.status == "mismatch" and bad.got_digest == recompute.digest_of(truth), bad
    # Only that instance: Flower's class, and a fresh FedAvg (as a peer's recompute builds), are untouched
    fresh = make_strategy("FedAvg", {"min_available_nodes": 1})
    assert all(np.array_equal(aggregate(fresh, attachments)[k], truth[k]) for k in BASE)
    assert "aggregate_train" not in vars(fresh) and "aggregate_train" in vars(tampered)


def test_install_makes_the_gateways_own_strategy_tamper(monkeypatch, tmp_path):
    monkeypatch.setattr(GatewayConfig, "make_strategy", GatewayConfig.make_strategy)  # undone after the test
    config = parse_config({"gateway": {"name": "g", "key": "g.key", "state_dir": "s"}, "enrollment": {"policy": "open"},
                           "strategy": {"name": "FedAvg", "params": {"min_available_nodes": 1}}}, tmp_path)
    honest = config.make_strategy()
    install(0.05, seed=3)
    strategy = config.make_strategy(selection_recorder=None)
    attachments = updates()
    truth, lie = aggregate(honest, attachments), aggregate(strategy, attachments)
    assert not np.array_equal(truth["dense_w"], lie["dense_w"])


def test_the_launcher_hands_the_rest_of_its_arguments_to_the_gateway(tmp_path):
    Identity.generate().save(tmp_path / "g.key")
    (tmp_path / "g.toml").write_text('[gateway]\nname = "g"\nkey = "g.key"\nstate_dir = "s"\n'
                                     '[enrollment]\npolicy = "open"\n')
    cmd = command(tmp_path / "g.toml", 0.2, seed=4)
    assert cmd[:3] == [sys.executable, "-m", "hw.tampered_gateway"]
    assert cmd[3:] == ["--scale", "0.2", "--seed", "4", "run", "--config", str(tmp_path / "g.toml")]
    assert command("c.toml")[4] == repr(DEFAULT_SCALE)
    check = [*cmd[:-3], "check", "--config", str(tmp_path / "g.toml")]  # the gateway's own `check`
    done = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["config"] == "ok"


@pytest.mark.parametrize(("argv", "message"), [
    (["--scale", "0", "run", "--config", "x"], "--scale must be a positive number"),
    (["--scale", "nan", "run", "--config", "x"], "--scale must be a positive number"),
    (["--scale", "0.1"], "give the gateway's command after the launcher's options"),
])
def test_bad_launcher_arguments_are_refused(argv, message, capsys):
    assert tampered_gateway.main(argv) == 2
    assert message in capsys.readouterr().err
