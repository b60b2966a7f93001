"""The walking skeleton end to end: real broker, real agents, real Flower, real ledger.

One emulator run (module-scoped: it is the expensive part) with three kinds of
bad replies injected from outside with `mosquitto_pub` while it runs: one
signed by an unknown key, one replayed, one that is not CBOR at all.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from protocol import envelope, schemas, topics
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "hw" / "scenarios" / "quickstart.toml"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run hw/install-system.sh (apt-get install mosquitto-clients)")
    return path


def _wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    report_path = work / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    emulator = subprocess.Popen(
        [sys.executable, "-m", "hw.emulate", "--scenario", str(SCENARIO), "--report", str(report_path),
         "--workdir", str(work / "run")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    injected = {}
    try:
        info = _wait_for(lambda: (work / "run" / "run.json").exists() and json.loads((work / "run" / "run.json").read_text()),
                         60, "run.json")
        host, port, gw = "127.0.0.1", str(info["broker"]["port"]), info["gateway"]["id"]
        # Capture the first real reply a device sends...
        captured = subprocess.run(
            [_tool("mosquitto_sub"), "-h", host, "-p", port, "-t", topics.reply(gw, "+"), "-C", "1", "-N", "-v", "-q", "1"],
            capture_output=True, timeout=120, check=True,
        ).stdout
        topic, _, reply_bytes = captured.partition(b" ")
        pub = [_tool("mosquitto_pub"), "-h", host, "-p", port, "-q", "1"]
        # ...send it again at once, byte for byte: in its own round, a harmless duplicate...
        (work / "replayed.cbor").write_bytes(reply_bytes)
        subprocess.run(pub + ["-t", topic.decode(), "-f", str(work / "replayed.cbor")], check=True, timeout=30)

        def status_round() -> int:
            status = subprocess.run([_tool("mosquitto_sub"), "-h", host, "-p", port, "-t", topics.status(gw),
                                     "-C", "1", "-W", "5"], capture_output=True, timeout=30).stdout
            try:
                return int(json.loads(status).get("round") or 0)
            except ValueError:
                return 0

        # ...and once the gateway has moved on to a later round, replay it: now a replay. At once: the gateway tells
        # a replay apart for tasks up to REMEMBER_ROUNDS (2) rounds old, later it is a stale_round (a fast machine
        # runs a round in a fraction of a second).
        answered = envelope.decode(reply_bytes).ctx.round
        _wait_for(lambda: status_round() > answered, 240, f"the round after round {answered}")
        subprocess.run(pub + ["-t", topic.decode(), "-f", str(work / "replayed.cbor")], check=True, timeout=30)
        # A well-formed reply signed by a key the gateway never enrolled.
        stranger = Identity.generate()
        ctx = envelope.Context(stranger.public_key, gw, 1, "train-1", b"\x00" * 32)
        forged = envelope.seal(stranger, "reply", ctx, {"examples": 10},
                               schemas.encode_update({"w": np.zeros(3, np.float32)}, {"train_loss": 1.0, "steps": 1.0}))
        (work / "stranger.cbor").write_bytes(forged)
        subprocess.run(pub + ["-t", topics.reply(gw, stranger.id), "-f", str(work / "stranger.cbor")], check=True, timeout=30)
        # Bytes that are not CBOR at all.
        subprocess.run(pub + ["-t", topics.reply(gw, "0123456789abcdef0123456789abcdef"), "-m", "\x1c not cbor"], check=True, timeout=30)
        injected = {"replayed_from": topic.decode()}
        output, _ = emulator.communicate(timeout=300)
    finally:
        if emulator.poll() is None:
            emulator.kill()
            emulator.wait()
    report = json.loads(report_path.read_text())
    return {"report": report, "output": output.decode(errors="replace"), "returncode": emulator.returncode,
            "work": work, "injected": injected}


def test_the_run_completes_and_exits_zero(run):
    assert run["returncode"] == 0, run["output"][-3000:]
    assert run["report"]["gateway"]["state"] == "done"


def test_report_has_every_round_with_the_skeleton_keys(run):
    rounds = run["report"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4, 5]
    for r in rounds:
        assert set(r) >= {"round", "accuracy", "loss", "participants", "rejected", "bytes_up", "bytes_down", "seconds"}
        assert r.get("skipped", 0) == 0  # no device sat a round out
    assert all(r["participants"] == 5 for r in rounds[1:])
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rounds)
    assert set(run["report"]) >= {"rounds", "rejections", "ledger", "config"}


def test_federated_training_beats_the_initial_model_and_chance(run):
    rounds = run["report"]["rounds"]
    first, last = rounds[0]["accuracy"], rounds[-1]["accuracy"]
    assert last > first + 0.2, rounds
    assert last > 1 / 7 + 0.2, rounds
    assert rounds[-1]["loss"] < rounds[0]["loss"]


def test_each_round_sends_one_model_release_and_no_traffic_is_counted_twice(run):
    rounds = run["report"]["rounds"]
    model_bytes = rounds[0]["bytes_down"]  # round 0: the initial model + 5 tasks + 5 receipts
    down = [r["bytes_down"] for r in rounds[1:]]  # each later round publishes exactly one new model
    assert all(model_bytes < d < 1.5 * model_bytes for d in down), down


def test_int8_updates_are_about_a_quarter_of_the_float_model(run):
    # bytes_up of a training round: 5 int8 deltas + 5 small evaluations; the f32 model is ~47 KB.
    model_bytes = run["report"]["rounds"][0]["bytes_down"]  # round 0 publishes the f32 model once
    per_device_up = run["report"]["rounds"][1]["bytes_up"] / 5
    assert per_device_up < 0.35 * model_bytes


def test_each_injected_reply_is_counted_under_its_own_reason(run):
    rejections = run["report"]["rejections"]
    assert run["report"]["duplicates"] >= 1  # the same reply again in its round: acknowledged, not refused
    assert rejections.get("unknown_device", 0) >= 1, rejections
    assert rejections.get("replay", 0) >= 1, rejections
    assert rejections.get("malformed", 0) >= 1, rejections


def test_the_gateway_logged_each_rejection(run):
    log = (run["work"] / "run" / "logs" / "gateway.log").read_text()
    for reason in ("unknown_device", "replay", "malformed"):
        assert "reply.rejected" in log and f"reason={reason}" in log
    assert "Traceback" not in log


def test_every_agent_stopped_cleanly_on_sigterm(run):
    logs = sorted((run["work"] / "run" / "logs").glob("subject-*.log"))
    assert len(logs) == 5
    for path in logs:
        text = path.read_text()
        assert "agent.stop" in text and "Traceback" not in text, path.name
        assert text.count("reply.sent") == 11  # round 0 evaluation + 5 x (train + evaluate)


def test_the_ledger_verifies_and_holds_every_round(run):
    ledger = run["report"]["ledger"]
    assert ledger["verified"] is True
    with sqlite3.connect(ledger["path"]) as db:
        kinds = dict(db.execute("select kind, count(*) from vertices group by kind").fetchall())
    # the lineage starts once (its first model), then per round its updates, aggregate and their scores
    assert kinds == {"genesis": 1, "device.enroll": 5, "lineage": 1, "updates": 5, "aggregate": 5,
                     "contributions": 5}
    assert ledger["height"] == 22


def test_flipping_one_byte_of_an_updates_vertex_makes_verify_name_it(run, tmp_path):
    source = Path(run["report"]["ledger"]["path"])
    copy = tmp_path / "ledger.db"
    shutil.copy(source, copy)
    with sqlite3.connect(copy) as db:
        vertex_id, blob = db.execute("select id, data from vertices where kind = 'updates' order by seq limit 1").fetchone()
    raw = bytearray(copy.read_bytes())
    at = raw.find(blob)
    assert at > 0, "the vertex blob is stored contiguously in the file"
    raw[at + len(blob) // 2] ^= 0x40
    copy.write_bytes(bytes(raw))
    done = subprocess.run([sys.executable, "-m", "ledger.cli", "verify", "--db", str(copy)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode != 0
    assert vertex_id in done.stdout + done.stderr


def test_progress_shows_every_round_with_its_accuracy(run):
    import re

    shown = re.findall(r"round (\d)/5  accuracy (\d\.\d{3})", run["output"])
    assert [int(r) for r, _ in shown] == [0, 1, 2, 3, 4, 5], run["output"]
    assert float(shown[-1][1]) == round(run["report"]["rounds"][-1]["accuracy"], 3)


def test_provenance_of_the_final_model_lists_exactly_the_updates_accepted_behind_it(run):
    import json as _json

    path = run["report"]["ledger"]["path"]
    model = run["report"]["model"]["digest"]
    done = subprocess.run([sys.executable, "-m", "ledger.cli", "provenance", "--db", path, "--model", model],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    trace = _json.loads(done.stdout)
    assert [a["round"] for a in trace["aggregates"]] == [5, 4, 3, 2, 1]
    traced = sorted((r["device"], i["update"]) for a in trace["aggregates"] for i in a["inputs"] for r in i["records"])
    with sqlite3.connect(path) as db:
        blobs = [blob for (blob,) in db.execute("select data from vertices where kind = 'updates'")]
    from ledger.vertex import Vertex
    from protocol.keys import identity_id

    recorded = sorted((identity_id(d), digest.hex()) for blob in blobs for d, digest, _, _ in Vertex.decode(blob).body["records"])
    assert traced == recorded
    assert len(traced) == sum(r["participants"] for r in run["report"]["rounds"][1:])
    assert len(trace["devices"]) == 5


def test_dot_draws_one_rounds_part_of_the_dag(run):
    path = run["report"]["ledger"]["path"]
    done = subprocess.run([sys.executable, "-m", "ledger.cli", "dot", "--db", path, "--round", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("round 2") == 3  # its updates, aggregate and contributions vertices
    assert "round 3" not in done.stdout and "->" in done.stdout


def test_the_gateway_keeps_its_final_model_as_an_npz_whose_digest_is_the_last_release(run):
    from protocol.digest import sha256
    from protocol.schemas import encode_model

    path = Path(run["report"]["workdir"]) / "gateway" / "model.npz"
    with np.load(path) as npz:
        weights = {name: npz[name] for name in npz.files}
    assert sha256(encode_model(weights)).hex() == run["report"]["model"]["digest"]


def test_the_run_also_writes_report_html_with_its_plots(run):
    report_path = Path(run["report"]["workdir"]).parent / "report.json"
    html = report_path.with_suffix(".html").read_text()
    plots = sorted((report_path.parent / "report_plots").glob("*.png"))
    assert {p.stem for p in plots} >= {"accuracy", "participation", "bytes"}
    assert all(f"report_plots/{p.name}" in html for p in plots)
    assert f"{run['report']['rounds'][-1]['accuracy']:.3f}" in html
