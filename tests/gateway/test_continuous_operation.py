"""A gateway that runs for years: rounds on an interval with no round count, and a lineage that survives restarts.

A real gateway process (no `num_rounds`, `interval_s = 1`), a real Mosquitto
and two in-process agents (synthetic models): it runs at least six rounds, is
stopped with SIGTERM, started again, and goes on where it was: the round
numbers, the version counter and the lineage on the ledger continue. Then an
operator starts a new lineage with `starling-gateway reset-model`.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from gateway_helpers import ROOT, AgentFleet, gateway_config, start_gateway

from hw.broker import Broker
from ledger.store import Ledger
from protocol import topics
from protocol.keys import Identity

STAMP = r"^(\S+)Z INFO gateway "
STRATEGY = 'name = "FedAdam"\nparams = { eta = 0.05, min_available_nodes = 2, min_train_nodes = 2, min_evaluate_nodes = 2 }'
ROUNDS = "interval_s = 1.0\ndeadline_s = 30\nmin_devices = 2\nwait_devices_s = 30\nepochs = 1"


class Status:
    """The gateway's retained status, as an operator's MQTT tool sees it."""

    def __init__(self, broker: Broker, gateway: Identity) -> None:
        self.latest: dict = {}
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="status-reader")
        self.client.on_message = lambda _c, _u, m: self.latest.update(json.loads(m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topics.status(gateway.id), qos=1)
        self.client.loop_start()

    def wait_round(self, round_: int, since: float, timeout: float = 60.0) -> dict:
        """The first status published after `since` (by the process started then) with `round_` evaluated."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            latest = dict(self.latest)
            done = [r for r in latest.get("history", []) if r["accuracy"] is not None]
            if latest.get("time", 0) > since and done and done[-1]["round"] >= round_:
                return latest
            time.sleep(0.1)
        raise AssertionError(f"round {round_} not done in {timeout} s: {self.latest.get('history', [])[-3:]}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def gateway_cli(conf: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args, "--config", str(conf)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def stop(process: subprocess.Popen, log: Path) -> dict:
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, log.read_text()[-3000:]
    return json.loads((log.parent / "state" / "result.json").read_text())


def released(log: Path) -> list[tuple[str, int, int]]:
    """(digest prefix, version, round) of every model.released line."""
    return [(d, int(v), int(r)) for d, v, r in
            re.findall(r"model\.released digest=(\w+) version=(\d+) round=(\d+)", log.read_text())]


def starts(log: Path) -> list[tuple[float, int]]:
    """(time, round) of every round.start line."""
    return [(datetime.fromisoformat(t).replace(tzinfo=timezone.utc).timestamp(), int(r))
            for t, r in re.findall(STAMP + r"round\.start round=(\d+)", log.read_text(), re.M)]


def lineage(state: Path, digest: str) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "ledger.cli", "lineage", "--db", str(state / "ledger.db"),
                           "--model", digest], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}


class GatewayRig:
    """A broker, a gateway's config, its retained status and two agents; the gateway processes a test starts."""

    def __init__(self, tmp: Path, broker: Broker) -> None:
        self.gateway = Identity.generate()
        self.conf = gateway_config(tmp, broker, self.gateway, STRATEGY, ROUNDS)
        self.status = Status(broker, self.gateway)
        self.devices = AgentFleet(tmp, broker, self.gateway, delays=[0, 0])
        self.processes: list[subprocess.Popen] = []

    def start(self, log: Path) -> subprocess.Popen:
        self.processes.append(start_gateway(self.conf, log))
        return self.processes[-1]

    def close(self) -> None:
        self.devices.close()
        self.status.close()
        for process in self.processes:
            if process.poll() is None:
                process.kill()


@pytest.fixture
def rig(tmp_path):
    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        running = GatewayRig(tmp_path, broker)
        try:
            yield running
        finally:
            running.close()


def test_rounds_go_on_at_their_interval_and_a_restart_continues_the_version_and_the_lineage(rig, tmp_path):
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    since = time.time()
    rig.start(first_log)
    seen = rig.status.wait_round(6, since)
    assert seen["num_rounds"] is None and seen["state"] in ("idle", "running")
    busy = gateway_cli(rig.conf, "reset-model", "--reason", "while running")
    assert busy.returncode == 2 and "stop the gateway first" in busy.stderr  # one writer per state folder
    first = stop(rig.processes[0], first_log)
    assert first["state"] == "stopped"
    since = time.time()
    rig.start(second_log)
    rig.status.wait_round(first["rounds"][-1]["round"] + 2, since)
    second = stop(rig.processes[1], second_log)

    # Rounds: one after another, at least interval_s apart, numbered on across the restart.
    before, after = starts(first_log), starts(second_log)
    assert [r for _, r in before][:7] == list(range(7))
    assert all(b - a >= 0.95 for (a, _), (b, _) in zip(before[1:], before[2:])), before  # round 0 has no wait
    assert after[0][1] in (first["rounds"][-1]["round"], first["rounds"][-1]["round"] + 1)  # resumed or next
    assert 0 not in [r for _, r in after], "a restart must not start the lineage over"
    rounds = [r["round"] for r in second["rounds"]]
    assert rounds == list(range(rounds[-1] + 1)) and rounds[-1] >= len(first["rounds"]) + 1

    # The version counter goes on: the restarted gateway publishes its last release again, then newer ones.
    one, two = released(first_log), released(second_log)
    assert [v for _, v, _ in one] == list(range(len(one)))
    last_digest, last_version, _ = one[-1]
    assert two[0][:2] == (last_digest, last_version)  # the same model, the same version, republished
    assert [v for _, v, _ in two[1:]] == list(range(last_version + 1, last_version + len(two)))
    assert second["lineage"]["version"] == two[-1][1] and second["model"]["version"] == two[-1][1]
    assert "strategy.state_restored attributes=m_t,v_t" in second_log.read_text()  # FedAdam's moments

    # The lineage on the ledger: one chain from the first model to the last, across the restart.
    code, chain = lineage(tmp_path / "state", second["model"]["digest"])
    assert code == 0 and chain["complete"], chain
    models = [r["model"] for r in chain["releases"]]
    assert len(models) == len(one) + len(two) - 1  # every release once (the republished one is no new step)
    assert any(m.startswith(last_digest) for m in models)
    assert [r["round"] for r in chain["releases"]] == sorted((r["round"] for r in chain["releases"]), reverse=True)
    assert chain["releases"][-1]["reason"] == "first start"


def test_an_operator_starts_a_new_lineage_and_the_gateway_evaluates_it_as_round_0(rig, tmp_path):
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    since = time.time()
    rig.start(first_log)
    rig.status.wait_round(2, since)
    first = stop(rig.processes[0], first_log)
    conf = rig.conf
    conf.write_text(conf.read_text().replace("epochs = 1", "epochs = 1\nlr = 0.2"))  # and a new lr
    reset = gateway_cli(conf, "reset-model", "--reason", "sensor recalibration")
    assert reset.returncode == 0, reset.stderr
    started = json.loads(reset.stdout)
    assert "lineage.start" in reset.stderr and "sensor recalibration" in reset.stderr  # logged
    assert started["previous"] == first["model"]["digest"] and started["on_ledger"]
    assert started["version"] == first["model"]["version"] + 1
    since = time.time()
    rig.start(second_log)
    rig.status.wait_round(1, since)
    second = stop(rig.processes[1], second_log)
    assert [r["round"] for r in second["rounds"]][:2] == [0, 1]  # the new lineage's own rounds
    assert second["lineage"]["id"] == first["lineage"]["id"] + 1
    code, chain = lineage(tmp_path / "state", second["model"]["digest"])
    assert code == 0 and chain["releases"][-1]["model"] == started["model"]
    assert chain["releases"][-1]["reason"] == "reset-model: sensor recalibration"
    assert chain["releases"][-1]["previous"] == first["model"]["digest"]
    with Ledger.open(tmp_path / "state" / "ledger.db") as ledger:
        assert ledger.kind_counts()["lineage"] == 2
