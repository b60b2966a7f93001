"""`starling-ledger audit --recompute`: every aggregate whose inputs are kept, recomputed bit for bit.

A real gateway runs two FedAvg rounds with two real agents (synthetic model)
over a real Mosquitto; its state dir then holds ledger.db and blobs/ side by
side, and the real CLI, in a fresh interpreter, recomputes both aggregates
from them (0 mismatches). An update blob deleted: that aggregate counts as
missing inputs, still exit 0. An update blob whose bytes were altered on disk:
missing inputs too, never a mismatch: the ledger and the device's signature
commit to the digest, and bytes that do not hash to it are a bad copy that
anyone with the files could have made, so they are no evidence against the
gateway that signed the aggregate (and the read-only audit leaves the file as
it found it). A real mismatch needs the gateway itself to sign a wrong output:
a second ledger written with the Ledger API by a test gateway, from real
device-signed replies with real updates, records one round honestly and the
next with an output its inputs do not give: exit 1, and the mismatch names
that vertex, that gateway and the digest the inputs give.

The recompute is Flower's (gateway/recompute.py), which the ledger package may
not import: the gateway package plugs it in as the entry point "aggregate" of
the group "starling.recompute"; without it the command exits 2 saying the
gateway extra is needed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from ledger_helpers import REPO, TASK, cli_env, run_cli, run_cli_many, signed_reply

from agent.config import AgentConfig
from agent.service import Agent
from gateway import recompute
from gateway.blobs import BlobStore
from gateway.config import GatewayConfig
from gateway.service import Gateway
from hw.broker import Broker
from hw.synthetic import SyntheticModel, synthetic_data, write_manifest
from ledger.kinds import AGGREGATE
from ledger.store import Ledger
from protocol import cbor, schemas
from protocol.digest import sha256
from protocol.keys import Identity
from protocol.tensors import encode_tensors

SHAPES = {"dense_w": (8, 4), "dense_b": (4,)}
DEVICES = 2
ROUNDS = 2


@pytest.fixture(scope="module")
def gateway_run(tmp_path_factory) -> tuple[Path, str]:
    """A real gateway's state dir after ROUNDS FedAvg rounds (ledger.db and blobs/), and its gateway id."""
    tmp = tmp_path_factory.mktemp("run")
    gw_key = Identity.generate()
    gw_key.save(tmp / "gw.key")
    with Broker(tmp / "broker", kind="mosquitto") as broker:
        config = GatewayConfig(
            name="gw", key=tmp / "gw.key", state_dir=tmp / "gw", broker_host=broker.host, broker_port=broker.port,
            manifest=write_manifest(tmp / "model", SHAPES), strategy="FedAvg", num_rounds=ROUNDS, deadline_s=20,
            epochs=1, batch_size=32, lr=0.5, min_devices=DEVICES, wait_devices_s=30, policy="open",
        )
        stop, agent_stop = threading.Event(), threading.Event()
        result: dict = {}
        gateway = threading.Thread(target=lambda: result.update(Gateway(config, gw_key).run(stop)), daemon=True)
        gateway.start()
        agents = []
        for i in range(DEVICES):
            cfg = AgentConfig(name=f"syn-{i}", key=tmp / f"d{i}.key", state_dir=tmp / f"d{i}", gateway_id=gw_key.id,
                              gateway_public_key=gw_key.public_key, broker_host=broker.host,
                              broker_port=broker.port, replay=tmp / "none.npz", enroll_retry_s=0.5)
            agent = Agent(cfg, Identity.generate(), SyntheticModel(SHAPES, seed=i + 1), synthetic_data(64))
            thread = threading.Thread(target=agent.run, args=(agent_stop,), daemon=True)
            thread.start()
            agents.append(thread)
        gateway.join(90)
        stop.set()
        agent_stop.set()
        for thread in agents:
            thread.join(20)
    assert result.get("state") == "done", result
    return tmp / "gw", gw_key.id


def audit(*args: str) -> tuple[int, dict | None, str]:
    done = run_cli("audit", "--recompute", *args)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else None, done.stderr


def copy_of(state: Path, where: Path) -> Path:
    """A copy of a gateway's state dir (hard links become separate files: each tag's copy of a blob)."""
    shutil.copytree(state, where)
    return where


def files_of(blobs: Path, digest: bytes) -> list[Path]:
    """Every tag's file of one blob."""
    return sorted(blobs.glob(f"*/{digest.hex()[:2]}/{digest.hex()}"))


def aggregate_bodies(db: Path) -> list[dict]:
    with Ledger.open(db, read_only=True) as ledger:
        return sorted((v.body for v in ledger.vertices_of(AGGREGATE)), key=lambda body: body["round"])


def test_a_real_gateways_ledger_recomputes_bit_for_bit_and_round_limits_it(gateway_run):
    state, gateway_id = gateway_run
    db = str(state / "ledger.db")
    everything, one, none = run_cli_many(["audit", "--recompute", "--db", db],  # blobs/ beside the ledger
                                         ["audit", "--recompute", "--db", db, "--round", "1"],
                                         ["audit", "--recompute", "--db", db, "--round", "99"])
    assert everything.returncode == 0, everything.stderr
    report = json.loads(everything.stdout)
    assert report["checked"] == report["matched"] == report["aggregates"] >= ROUNDS, report
    assert (report["mismatches"], report["missing_inputs"], report["unverifiable"]) == ([], 0, 0)
    assert report["blobs"] == str(state / "blobs") and report["round"] is None
    assert report["gateways"] == {gateway_id: {"aggregates": report["aggregates"], "cities": 0,
                                               "checked": report["checked"], "mismatches": 0, "missing_inputs": 0,
                                               "unverifiable": 0}}
    assert (report["cities"], report["epochs"]) == (0, [])  # a gateway of its own: no city merges
    assert one.returncode == 0 and none.returncode == 0, (one.stderr, none.stderr)
    assert {k: json.loads(one.stdout)[k] for k in ("round", "aggregates", "checked")} == {
        "round": 1, "aggregates": 1, "checked": 1}
    assert {k: json.loads(none.stdout)[k] for k in ("aggregates", "checked", "mismatches")} == {
        "aggregates": 0, "checked": 0, "mismatches": []}


def test_a_deleted_or_altered_update_blob_is_missing_inputs_never_a_mismatch(gateway_run, tmp_path):
    state, _ = gateway_run
    first = aggregate_bodies(state / "ledger.db")[0]
    update = first["inputs"][0][0]
    deleted, altered = copy_of(state, tmp_path / "deleted"), copy_of(state, tmp_path / "altered")
    for path in files_of(deleted / "blobs", update):
        path.unlink()
    changed = []
    for path in files_of(altered / "blobs", update):  # one byte flipped in every copy: same name, other bytes
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        changed.append((path, bytes(data)))
    assert changed
    outcomes = run_cli_many(["audit", "--recompute", "--db", str(deleted / "ledger.db")],
                            ["audit", "--recompute", "--db", str(altered / "ledger.db")])
    for done in outcomes:
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert (report["missing_inputs"], report["mismatches"]) == (1, []), report
        assert report["checked"] == report["aggregates"] - 1 >= 1
    assert all(path.read_bytes() == data for path, data in changed)  # read-only: the bad copy is left as found


def test_an_output_its_gateway_signed_that_its_inputs_do_not_give_is_a_mismatch_naming_it(tmp_path):
    liar, devices = Identity.generate(), [Identity.generate() for _ in range(3)]
    store = BlobStore(tmp_path / "kept-elsewhere")
    rng = np.random.default_rng(5)
    model = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
    vertices = {}
    (tmp_path / "liar").mkdir()
    with Ledger.open(tmp_path / "liar" / "ledger.db", liar) as ledger:
        ledger.init_genesis("audit-city", [liar.public_key])
        for i, device in enumerate(devices):
            ledger.enroll_device(device.public_key, f"pi-{i}", "open")
        for round_ in (1, 2):
            base = schemas.encode_model(model)
            store.put(base, round_)
            updates, records, examples = [], [], [32 * (i + 1) for i in range(len(devices))]
            for device, count in zip(devices, examples):
                delta = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in model.items()}
                update = cbor.dumps({"tensors": encode_tensors(delta, "i8"), "metrics": {"train_loss": 0.5}})
                updates.append(update)
                records.append(signed_reply(device, liar.id, round_, TASK, sha256(base), count, update=update))
            store.put_many(updates, round_)
            ledger.record_updates(liar.id, round_, TASK, sha256(base), records)
            sequence = [[i, count] for i, count in enumerate(examples)]
            total = float(sum(examples))
            inputs = [(sha256(u), float(count) / total) for u, count in zip(updates, examples)]
            params = {"strategy": {}, "versions": recompute.versions(), "sequence": sequence}
            model = recompute.recompute("FedAvg", params, schemas.decode_model(base),
                                        [recompute.Input(u, count) for u, count in zip(updates, examples)], round_)
            honest = recompute.digest_of(model)
            if round_ == 2:  # one float32 step off in one coordinate: not what these inputs give
                model["dense_b"][0] = np.nextafter(model["dense_b"][0], np.float32(np.inf))
            output = recompute.digest_of(model)
            store.put(schemas.encode_model(model), round_)
            vertices[round_] = (ledger.record_aggregate(round_, "FedAvg", sha256(base), inputs, output,
                                                        rule="weighted", params=params), honest, output)
    db, blobs = str(tmp_path / "liar" / "ledger.db"), str(tmp_path / "kept-elsewhere")
    everything, first, no_folder = run_cli_many(["audit", "--recompute", "--db", db, "--blobs", blobs],
                                                ["audit", "--recompute", "--db", db, "--blobs", blobs, "--round", "1"],
                                                ["audit", "--recompute", "--db", db])  # no blobs/ beside it
    assert everything.returncode == 1, everything.stderr
    report = json.loads(everything.stdout)
    vertex, honest, recorded = vertices[2]
    assert honest != recorded and report["checked"] == 2 and report["matched"] == 1
    assert report["mismatches"] == [{"vertex": vertex.id_hex, "kind": "aggregate", "gateway": liar.id, "round": 2,
                                     "strategy": "FedAvg",
                                     "expected": recorded.hex(), "got": honest.hex(),
                                     "reason": "the recomputed model differs from the recorded output"}]
    assert report["gateways"][liar.id]["mismatches"] == 1
    assert f"MISMATCH: aggregate {vertex.id_hex} by gateway {liar.id} round 2" in everything.stderr
    assert first.returncode == 0 and json.loads(first.stdout)["checked"] == 1, first.stderr
    assert (no_folder.returncode, no_folder.stdout) == (2, "")
    assert no_folder.stderr.count("\n") == 1 and "no blob folder at" in no_folder.stderr


def test_bad_arguments_and_no_ledger_are_one_line_and_exit_2(tmp_path):
    for args, words in [(["--db", str(tmp_path / "none.db")], "no ledger at"),
                        (["--db", str(tmp_path / "none.db"), "--round", "-1"], "--round must be"),
                        (["--db", str(tmp_path / "none.db"), "--round", "x"], "invalid int value"),
                        (["--db", str(tmp_path / "none.db"), "--bogus"], "unrecognized arguments")]:
        code, out, err = audit(*args)
        assert (code, out, err.count("\n")) == (2, None, 1) and words in err, (args, err)
    done = run_cli("audit", "--db", str(tmp_path / "none.db"))  # an audit of what? (only --recompute so far)
    assert done.returncode == 2 and "--recompute" in done.stderr


@pytest.mark.parametrize("setup", [
    "metadata.entry_points = lambda **kw: []",  # a ledger-only install: no plugin registered
    "sys.modules['flwr'] = None",  # the plugin is registered (same distribution) but Flower is not installed
])
def test_without_the_gateway_extra_it_says_so_and_exits_2(gateway_run, setup):
    state, _ = gateway_run
    code = (f"import sys; from importlib import metadata; {setup}\n"
            "from ledger.cli import main; raise SystemExit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", code, "audit", "--recompute", "--db", str(state / "ledger.db")],
                          capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr.count("\n")) == (2, "", 1), done.stderr
    assert "needs the gateway extra" in done.stderr


def test_the_ledger_package_imports_neither_the_gateway_nor_flower():
    code = ("import sys, ledger, ledger.cli, ledger.audit\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {'flwr', 'gateway'})))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO,
                          timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "", (done.stdout, done.stderr)
