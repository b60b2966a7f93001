"""The fault timeline: scenario tables checked, faults injected on time, the network cut and healed."""

from __future__ import annotations

import secrets
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from hw.broker import _child_env, find_mosquitto
from hw.faults import FaultRunner, fault_sections, parse_faults
from hw.fleet import Fleet, Network, Process
from protocol.config import ConfigError

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


# --- the [[fault]] tables ------------------------------------------------------------------


def test_every_fault_kind_parses_with_its_trigger_and_duration():
    faults = parse_faults([
        {"kind": "gateway_restart", "target": "gw-2", "at_round": 2, "down_s": 4},
        {"kind": "broker_restart", "at_s": 10.5},
        {"kind": "partition", "target": "gw-3", "at_round": 1, "down_s": 8},
        {"kind": "device_churn", "count": 2, "at_s": 3},
    ], gateways=3)
    assert [f.kind for f in faults] == ["gateway_restart", "broker_restart", "partition", "device_churn"]
    assert faults[0].target == "gw-2" and faults[0].at_round == 2 and faults[0].down_s == 4.0
    assert faults[1].target == "" and faults[1].at_s == 10.5 and faults[1].down_s == 5.0
    assert faults[3].devices(10) == 2
    assert parse_faults([{"kind": "device_churn", "fraction": 0.25, "at_s": 0}], 1)[0].devices(10) == 2


@pytest.mark.parametrize("table, gateways, message", [
    ({"kind": "meltdown", "at_s": 1}, 2, "fault[0].kind must be one of"),
    ({"kind": "partition", "target": "gw-9", "at_s": 1}, 3, "fault[0].target must be one of gw-1, gw-2, gw-3"),
    ({"kind": "partition", "target": "gw-1", "at_s": 1}, 1, "a partition needs at least 2 gateways"),
    ({"kind": "gateway_restart", "target": "gw-1"}, 2, "give either at_round or at_s, not neither"),
    ({"kind": "gateway_restart", "target": "gw-1", "at_s": 1, "at_round": 1}, 2, "not both"),
    ({"kind": "gateway_restart", "target": "gw-1", "at_s": -1}, 2, "must not be negative"),
    ({"kind": "gateway_restart", "target": "gw-1", "at_s": 1, "down_s": 0}, 2, "fault[0].down_s must be in"),
    ({"kind": "gateway_restart", "target": "gw-1", "at_s": 1, "down_s": 1e6}, 2, "fault[0].down_s must be in"),
    ({"kind": "gateway_restart", "target": "gw-1", "at_s": float("nan")}, 2, "fault[0].at_s must be a finite"),
    ({"kind": "gateway_restart", "target": "gw-1", "at_s": True}, 2, "fault[0].at_s has the wrong type"),
    ({"kind": "gateway_restart", "target": "gw-1", "at_s": 1, "when": 3}, 2, "unknown key fault[0].when"),
    ({"kind": "device_churn", "at_s": 1}, 2, "needs either fraction or count"),
    ({"kind": "device_churn", "at_s": 1, "fraction": 1.5}, 2, "fault[0].fraction must be in (0, 1]"),
    ({"kind": "device_churn", "at_s": 1, "count": 2, "target": "gw-1"}, 2, "picks its devices"),
    ({"kind": "partition", "target": "gw-1", "at_s": 1, "count": 2}, 2, "for device_churn only"),
    ({"kind": "broker_restart", "target": "gw-1", "at_s": 1}, 2, "only in a scenario with a partition fault"),
])
def test_a_bad_fault_table_is_refused_naming_the_field(table, gateways, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        parse_faults([table], gateways)


def test_a_scenario_with_faults_is_checked_by_the_scenario_loader():
    from hw.scenario import ScenarioError, load_scenario, parse_scenario

    shipped = load_scenario(Path(__file__).resolve().parents[2] / "hw" / "scenarios" / "faults.toml")
    assert {f.kind for f in shipped.faults} == {"gateway_restart", "broker_restart", "partition", "device_churn"}
    assert shipped.gateways >= 3
    with pytest.raises(ScenarioError, match="fault.0..kind"):
        parse_scenario({"fault": [{"kind": "nope", "at_s": 1}]})


# --- the runner, against a recording fleet ---------------------------------------------------


class RecordingFleet:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.round = -1
        self.gateway_alive = True

    def rounds_done(self, gateway: str) -> int:
        return self.round

    def kill_gateway(self, name):
        self.calls.append(("kill_gateway", name))
        alive, self.gateway_alive = self.gateway_alive, False
        return alive

    def start_gateway(self, name):
        self.calls.append(("start_gateway", name))
        self.gateway_alive = True

    def stop_broker(self, target):
        self.calls.append(("stop_broker", target))

    def start_broker(self, target):
        self.calls.append(("start_broker", target))

    def cut(self, gateway):
        self.calls.append(("cut", gateway))

    def heal(self, gateway):
        self.calls.append(("heal", gateway))

    def kill_devices(self, index, count):
        self.calls.append(("kill_devices", str(count)))
        return [f"d{i}" for i in range(count)]

    def start_devices(self, names):
        self.calls.append(("start_devices", ",".join(names)))


def _wait_for(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_a_round_triggered_fault_waits_for_the_round_then_breaks_and_restores_on_time():
    fleet = RecordingFleet()
    faults = parse_faults([{"kind": "gateway_restart", "target": "gw-2", "at_round": 2, "down_s": 0.5}], 2)
    with FaultRunner(faults, fleet, time.time(), devices=4) as runner:
        time.sleep(0.5)
        assert fleet.calls == [] and not runner.busy()  # round 2 is not done yet
        fleet.round = 2
        _wait_for(lambda: fleet.calls)
        assert fleet.calls == [("kill_gateway", "gw-2")]
        assert runner.busy()  # the emulator must not take the dead gateway for a finished one
        _wait_for(lambda: len(fleet.calls) == 2)
        assert fleet.calls[1] == ("start_gateway", "gw-2")
        _wait_for(lambda: not runner.busy())
    [entry] = runner.timeline
    assert entry["kind"] == "gateway_restart" and entry["target"] == "gw-2"
    assert 0.45 <= entry["t_end"] - entry["t"] < 5.0
    assert entry["detail"]["signal"] == "SIGKILL"


def test_closing_the_runner_heals_the_network_but_does_not_restart_what_was_killed():
    fleet = RecordingFleet()
    faults = parse_faults([{"kind": "partition", "target": "gw-1", "at_s": 0, "down_s": 60},
                           {"kind": "device_churn", "count": 3, "at_s": 0, "down_s": 60},
                           {"kind": "gateway_restart", "target": "gw-2", "at_s": 3600}], 2)
    runner = FaultRunner(faults, fleet, time.time(), devices=10)
    with runner:
        _wait_for(lambda: len(fleet.calls) == 2)
    assert sorted(fleet.calls) == [("cut", "gw-1"), ("heal", "gw-1"), ("kill_devices", "3")]
    ends = {e["kind"]: e for e in runner.timeline}
    assert set(ends) == {"partition", "device_churn"}  # the one-hour fault never came
    assert ends["device_churn"]["detail"]["restarted"] is False
    assert ends["device_churn"]["detail"]["names"] == ["d0", "d1", "d2"]
    assert all(e["t_end"] is not None for e in runner.timeline)


def test_a_fault_on_a_gateway_that_already_finished_is_recorded_as_skipped():
    fleet = RecordingFleet()
    fleet.gateway_alive = False
    faults = parse_faults([{"kind": "gateway_restart", "target": "gw-1", "at_s": 0}], 1)
    with FaultRunner(faults, fleet, time.time(), devices=1) as runner:
        _wait_for(lambda: runner.timeline)
    assert runner.timeline[0]["detail"]["skipped"] and fleet.calls == [("kill_gateway", "gw-1")]


def test_fault_sections_say_which_rounds_ran_during_a_fault_and_how_soon_one_finished_after():
    timeline = [{"t": 10.0, "t_end": 14.0, "kind": "partition", "target": "gw-2", "detail": {}}]
    rounds = {"gw-1": [{"round": 1, "t": 9.0}, {"round": 2, "t": 12.0}, {"round": 3, "t": 15.5}],
              "gw-2": [{"round": 1, "t": 11.0}]}
    [section] = fault_sections(timeline, rounds)
    assert section["rounds_during"] == {"gw-1": [2], "gw-2": [1]}
    assert section["next_round_after_s"] == {"gw-1": 1.5, "gw-2": None}


# --- the real processes and brokers -------------------------------------------------------------


def test_a_killed_process_starts_again_with_the_same_command_and_an_appended_log(tmp_path: Path):
    log = tmp_path / "p.log"
    process = Process([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"], log,
                      _child_env())
    process.start()
    _wait_for(lambda: log.read_text().count("up") == 1)
    assert process.kill() and not process.alive() and process.popen.returncode == -9
    assert not process.kill()  # already down
    process.start()
    _wait_for(lambda: log.read_text().count("up") == 2)
    assert process.starts == 2
    process.kill()


def test_churn_in_device_pools_takes_down_every_device_of_the_pools_hit(tmp_path: Path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    pools = [Process(sleeper, tmp_path / f"pool{i}.log", _child_env()) for i in range(2)]
    single = Process(sleeper, tmp_path / "single.log", _child_env())
    devices = {"a1": pools[0], "a2": pools[0], "b1": pools[1], "b2": pools[1], "c": single}
    for p in (*pools, single):
        p.start()
    try:
        fleet = Fleet(None, {}, devices, lambda _: 0, seed=0)  # type: ignore[arg-type]
        down = fleet.kill_devices(0, 1)
        assert down in (["a1", "a2"], ["b1", "b2"], ["c"])
        assert sorted(n for n, p in devices.items() if not p.alive()) == down
        assert fleet.kill_devices(0, 1) == down  # the same seeded choice
        fleet.start_devices(down)
        assert all(p.alive() for p in devices.values())
    finally:
        for p in (*pools, single):
            p.kill()


def _client(port: int, received: list, topic: str) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{secrets.token_hex(4)}")
    subscribed = threading.Event()
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda c, u, msg: received.append(msg.payload)
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert subscribed.wait(10)
    return client


@needs_mosquitto
def test_a_partitioned_gateway_broker_stops_exchanging_ledger_gossip_until_healed(tmp_path: Path):
    with Network(tmp_path, "mosquitto", ["gw-1", "gw-2"], per_gateway=True, persistent=False) as net:
        assert len(net.endpoints()) == 3 and net.endpoint("gw-1") != net.endpoint("gw-2")
        heard: list[bytes] = []
        listener = _client(net.endpoint("gw-2")[1], heard, "starling/ledger/#")
        speaker = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="speaker")
        speaker.connect(*net.endpoint("gw-1"))
        speaker.loop_start()
        try:
            def reaches(payload: bytes, timeout: float) -> bool:
                end = time.monotonic() + timeout
                while time.monotonic() < end:  # bridges come up within a few seconds: retry until heard
                    speaker.publish("starling/ledger/vertex/x", payload, qos=1)
                    time.sleep(0.3)
                    if payload in heard:
                        return True
                return False

            assert reaches(b"before", 20)
            net.cut("gw-2")
            time.sleep(0.5)
            assert not reaches(b"during", 2)
            net.heal("gw-2")
            assert reaches(b"after", 30)  # the bridge reconnects (restart_timeout 1-2 s)
            heard.clear()
            speaker.publish("starling/other/topic", b"local", qos=1)  # only ledger gossip is bridged
            time.sleep(1.0)
            assert b"local" not in heard
        finally:
            speaker.loop_stop()
            speaker.disconnect()
            listener.loop_stop()
            listener.disconnect()


@needs_mosquitto
def test_a_restarted_broker_listens_on_the_same_port_with_its_retained_messages(tmp_path: Path):
    with Network(tmp_path, "mosquitto", ["gw-1"], per_gateway=False, persistent=True) as net:
        host, port = net.endpoint("gw-1")
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="retainer")
        client.connect(host, port)
        client.loop_start()
        client.publish("starling/x/status", b"kept", qos=1, retain=True).wait_for_publish(5)
        client.loop_stop()
        client.disconnect()
        net.stop_broker("")
        net.start_broker("")
        heard: list[bytes] = []
        reader = _client(port, heard, "starling/x/status")
        try:
            _wait_for(lambda: heard)
            assert heard == [b"kept"]
        finally:
            reader.loop_stop()
            reader.disconnect()


