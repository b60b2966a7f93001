"""The fault timeline: scenario tables checked, faults injected on time, the network cut and healed."""

from __future__ import annotations

import re
import secrets
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from required_tools import needs

from hw.broker import _child_env, find_mosquitto
from hw.faults import STOP_TIMEOUT_S, FaultRunner, apply_overrides, fault_sections, parse_faults
from hw.fleet import Ending, Fleet, Network, Process
from protocol.config import ConfigError

needs_mosquitto = needs(find_mosquitto() is not None, "needs mosquitto (hw/install-system.sh)")


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


def test_a_gateway_stop_parses_with_its_overrides():
    [stop, plain] = parse_faults([
        {"kind": "gateway_stop", "target": "gw-1", "at_round": 10, "down_s": 2,
         "overrides": {"lr": 1, "epochs": 3, "batch_size": 16, "deadline_s": 20, "interval_s": 0,
                       "evaluate_every": 2, "strategy_params": {"fraction_train": 0.5}}},
        {"kind": "gateway_stop", "target": "gw-2", "at_s": 5},
    ], gateways=2)
    assert stop.kind == "gateway_stop" and stop.at_round == 10 and stop.down_s == 2.0
    assert stop.overrides == {"lr": 1.0, "epochs": 3, "batch_size": 16, "deadline_s": 20.0, "interval_s": 0.0,
                              "evaluate_every": 2, "strategy_params": {"fraction_train": 0.5}}
    assert isinstance(stop.overrides["lr"], float)  # as the gateway's config reads it
    assert stop.label().endswith("then lr=1.0, epochs=3, batch_size=16, deadline_s=20.0, interval_s=0.0, "
                                 "evaluate_every=2, strategy_params.fraction_train=0.5")
    assert plain.overrides == {} and plain.label() == "gateway_stop gw-2 at 5 s for 5 s"


@pytest.mark.parametrize("table, message", [
    ({"overrides": {"learning_rate": 0.1}}, "unknown key fault[0].overrides.learning_rate; known: lr, epochs"),
    ({"overrides": {"lr": "0.1"}}, "fault[0].overrides.lr has the wrong type (str)"),
    ({"overrides": {"epochs": 1.5}}, "fault[0].overrides.epochs has the wrong type (float)"),
    ({"overrides": {"epochs": True}}, "fault[0].overrides.epochs has the wrong type (bool)"),
    ({"overrides": {"lr": 0}}, "fault[0].overrides.lr must be positive"),
    ({"overrides": {"lr": float("inf")}}, "fault[0].overrides.lr must be a finite number"),
    ({"overrides": {"interval_s": -1}}, "fault[0].overrides.interval_s must not be negative"),
    ({"overrides": {"strategy_params": {"x": {"y": 1}}}},
     "fault[0].overrides.strategy_params.x: a strategy parameter is a value, not a table"),
    ({"overrides": {"strategy_params": {"x": float("nan")}}}, "fault[0].overrides.strategy_params.x must be a finite"),
    ({"overrides": {"strategy_params": 3}}, "fault[0].overrides.strategy_params has the wrong type (int)"),
    ({"overrides": [1]}, "fault[0].overrides has the wrong type (list)"),
    ({"kind": "gateway_restart", "overrides": {"lr": 0.1}},
     "starts the gateway again with new config (this fault is a gateway_restart)"),
    ({"kind": "device_churn", "target": "", "count": 1, "overrides": {"lr": 0.1}},
     "fault[0].overrides: only a gateway_stop"),
    ({"target": "gw-7"}, "fault[0].target must be one of gw-1, gw-2"),
])
def test_a_bad_gateway_stop_is_refused_naming_the_field(table, message):
    base = {"kind": "gateway_stop", "target": "gw-1", "at_round": 1}
    if table.get("kind") == "device_churn":
        base = {"at_s": 1}
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_faults([{**base, **table}], gateways=2)


def test_strategy_overrides_are_checked_against_the_strategy_at_scenario_load():
    from hw.scenario import ScenarioError, parse_scenario

    fault = {"kind": "gateway_stop", "target": "gw-1", "at_round": 1}
    ok = parse_scenario({"fault": [{**fault, "overrides": {"strategy_params": {"fraction_train": 0.5}}}]})
    assert ok.faults[0].overrides == {"strategy_params": {"fraction_train": 0.5}}
    assert ok.to_dict()["faults"][0]["overrides"] == {"strategy_params": {"fraction_train": 0.5}}
    with pytest.raises(ScenarioError, match=r"fault\[0\]\.overrides\.strategy_params: .*takes no parameter"):
        parse_scenario({"fault": [{**fault, "overrides": {"strategy_params": {"no_such_parameter": 1}}}]})


def test_overrides_make_a_new_config_and_say_what_they_replaced():
    config = {"gateway": {"name": "gw-1"}, "strategy": {"name": "FedAvg", "params": {"fraction_train": 1.0}},
              "rounds": {"num_rounds": 20, "lr": 0.2, "epochs": 1}}
    new, previous = apply_overrides(config, {"lr": 0.1, "interval_s": 5.0,
                                             "strategy_params": {"fraction_train": 0.5, "min_train_nodes": 3}})
    assert new["rounds"] == {"num_rounds": 20, "lr": 0.1, "epochs": 1, "interval_s": 5.0}
    assert new["strategy"] == {"name": "FedAvg", "params": {"fraction_train": 0.5, "min_train_nodes": 3}}
    assert previous == {"lr": 0.2, "interval_s": None,  # None: it was not set (the gateway's default)
                        "strategy_params": {"fraction_train": 1.0, "min_train_nodes": None}}
    assert config["rounds"]["lr"] == 0.2 and config["strategy"]["params"] == {"fraction_train": 1.0}  # untouched


def test_a_scenario_with_faults_is_checked_by_the_scenario_loader():
    from hw.scenario import ScenarioError, load_scenario, parse_scenario

    shipped = load_scenario(Path(__file__).resolve().parents[2] / "hw" / "scenarios" / "faults.toml")
    assert {f.kind for f in shipped.faults} == {"gateway_restart", "broker_restart", "partition", "device_churn"}
    assert shipped.gateways >= 3
    continuity = load_scenario(Path(__file__).resolve().parents[2] / "hw" / "scenarios" / "continuity.toml")
    assert [(f.kind, f.at_round) for f in continuity.faults] == [("gateway_stop", 10), ("gateway_restart", 15)]
    assert continuity.faults[0].overrides["lr"] < continuity.lr and continuity.rounds == 20
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

    ending = "exited"  # how a SIGTERM'd gateway ends here

    def stop_gateway(self, name, timeout):
        self.calls.append(("stop_gateway", name))
        if not self.gateway_alive:
            return Ending("not running", 0, 0.0)
        self.gateway_alive = False
        return Ending(self.ending, 0 if self.ending == "exited" else -9, 0.5 if self.ending == "exited" else timeout)

    def restart_gateway(self, name, overrides):
        self.calls.append(("restart_gateway", name, overrides))
        self.gateway_alive = True
        return {key: "old" for key in overrides}

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


def test_a_gateway_stop_terminates_then_restarts_the_gateway_with_its_overrides():
    fleet = RecordingFleet()
    said: list[str] = []
    faults = parse_faults([{"kind": "gateway_stop", "target": "gw-1", "at_round": 3, "down_s": 0.3,
                            "overrides": {"lr": 0.05}}], 1)
    with FaultRunner(faults, fleet, time.time(), devices=2, say=said.append) as runner:
        time.sleep(0.3)
        assert fleet.calls == []
        fleet.round = 3
        _wait_for(lambda: len(fleet.calls) == 2)
        _wait_for(lambda: not runner.busy())
    assert fleet.calls == [("stop_gateway", "gw-1"), ("restart_gateway", "gw-1", {"lr": 0.05})]
    [entry] = runner.timeline
    assert entry["kind"] == "gateway_stop" and entry["target"] == "gw-1" and entry["t_end"] - entry["t"] >= 0.25
    assert entry["detail"] == {"down_s": 0.3, "signal": "SIGTERM", "exit": "exited", "exit_code": 0, "stop_s": 0.5,
                               "overrides": {"lr": 0.05}, "previous": {"lr": "old"}}
    begin, end = said
    assert begin.startswith("starling-emulate: fault at ") and "gateway_stop gw-1 after round 3" in begin
    assert end.startswith("starling-emulate: fault over at ") and end.endswith("gateway_stop gw-1, started again "
                                                                               "with lr=0.05")


def test_a_gateway_that_ignores_sigterm_is_killed_and_the_fault_says_so():
    fleet = RecordingFleet()
    fleet.ending = "killed"
    faults = parse_faults([{"kind": "gateway_stop", "target": "gw-1", "at_s": 0, "down_s": 0.1}], 1)
    with FaultRunner(faults, fleet, time.time(), devices=1) as runner:
        _wait_for(lambda: runner.timeline and runner.timeline[0]["t_end"] is not None)
    detail = runner.timeline[0]["detail"]
    assert detail["exit"] == "killed" and detail["exit_code"] == -9 and str(int(STOP_TIMEOUT_S)) in detail["killed"]
    assert "overrides" not in detail  # none given: the gateway starts again as it was
    assert fleet.calls == [("stop_gateway", "gw-1"), ("restart_gateway", "gw-1", {})]


def test_a_stop_of_a_finished_gateway_is_skipped_and_one_the_run_outlives_is_not_restarted():
    fleet = RecordingFleet()
    fleet.gateway_alive = False
    with FaultRunner(parse_faults([{"kind": "gateway_stop", "target": "gw-1", "at_s": 0}], 1), fleet,
                     time.time(), devices=1) as runner:
        _wait_for(lambda: runner.timeline)
    assert runner.timeline[0]["detail"]["skipped"] and fleet.calls == [("stop_gateway", "gw-1")]
    fleet = RecordingFleet()
    runner = FaultRunner(parse_faults([{"kind": "gateway_stop", "target": "gw-1", "at_s": 0, "down_s": 60,
                                        "overrides": {"lr": 0.1}}], 1), fleet, time.time(), devices=1)
    with runner:
        _wait_for(lambda: runner.timeline)
    assert fleet.calls == [("stop_gateway", "gw-1")]  # the run ended while it was down
    assert runner.timeline[0]["detail"]["restarted"] is False and "overrides" not in runner.timeline[0]["detail"]


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


TERM_AWARE = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *_: (print('clean stop', flush=True), sys.exit(0)))\n"
              "print('up', flush=True)\n"
              "time.sleep(60)\n")


def test_a_sigtermed_process_exits_cleanly_and_starts_again(tmp_path: Path):
    log = tmp_path / "p.log"
    process = Process([sys.executable, "-c", TERM_AWARE], log, _child_env())
    process.start()
    _wait_for(lambda: log.read_text().count("up") == 1)
    ending = process.terminate(10.0)
    assert ending.how == "exited" and ending.code == 0 and 0 <= ending.seconds < 10
    assert "clean stop" in log.read_text() and not process.alive()
    assert process.terminate(10.0).how == "not running"
    process.start()
    _wait_for(lambda: log.read_text().count("up") == 2)
    assert process.starts == 2 and process.alive()
    process.kill()


def test_a_process_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path):
    log = tmp_path / "p.log"
    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('up', flush=True)\ntime.sleep(60)\n")
    process = Process([sys.executable, "-c", stubborn], log, _child_env())
    process.start()
    _wait_for(lambda: "up" in log.read_text())
    ending = process.terminate(0.5)
    assert ending.how == "killed" and ending.code == -9 and ending.seconds >= 0.5 and not process.alive()


def test_the_fleet_rewrites_the_config_before_the_gateway_starts_again(tmp_path: Path):
    from hw.fleet import GatewayRun
    from protocol.config import read_toml
    from protocol.keys import Identity

    g = GatewayRun(0, "gw-1", Identity.generate(), tmp_path, tmp_path / "gw.log")
    conf = g.write_config({"gateway": {"name": "gw-1 \U0001f426"}, "strategy": {"name": "FedAvg", "params": {}},
                           "rounds": {"num_rounds": 20, "lr": 0.2}})
    # The "gateway" reads its config when it starts: what it read is in its log.
    reader = f"from protocol.config import tomllib; print(tomllib.load(open({str(conf)!r}, 'rb'))['rounds'], flush=True)"
    process = Process([sys.executable, "-c", reader + "; import time; time.sleep(60)"], tmp_path / "gw.log",
                      _child_env())
    g.proc = process
    fleet = Fleet(None, {"gw-1": process}, {}, lambda _: 0, seed=0,  # type: ignore[arg-type]
                  reconfigure=lambda name, overrides: g.reconfigure(overrides))
    fleet.start_gateway("gw-1")
    _wait_for(lambda: "'lr': 0.2" in (tmp_path / "gw.log").read_text())
    assert fleet.stop_gateway("gw-1", 10.0).how == "exited"  # no handler: SIGTERM's default ends it
    assert fleet.restart_gateway("gw-1", {"lr": 0.1, "strategy_params": {"fraction_train": 0.5}}) == {
        "lr": 0.2, "strategy_params": {"fraction_train": None}}
    _wait_for(lambda: "'lr': 0.1" in (tmp_path / "gw.log").read_text())
    process.kill()
    doc = read_toml(conf)
    assert doc == g.config and doc["rounds"] == {"num_rounds": 20, "lr": 0.1}
    assert doc["strategy"]["params"] == {"fraction_train": 0.5} and doc["gateway"]["name"] == "gw-1 \U0001f426"
    with pytest.raises(ValueError, match="cannot change gw-1's config"):
        Fleet(None, {"gw-1": process}, {}, lambda _: 0, seed=0).restart_gateway("gw-1", {"lr": 0.1})  # type: ignore[arg-type]


def test_the_monitor_does_not_end_a_round_that_a_stop_interrupted():
    """A stopped gateway's last round (begun, not evaluated) re-opens when it starts again: its `t` is
    when it really ended, after the restart, not when the gateway stopped."""
    import io

    from hw.fleet import GatewayRun
    from hw.monitor import Monitor
    from protocol.keys import Identity

    g = GatewayRun(0, "gw-1", Identity.generate(), Path("."), Path("gw.log"))
    monitor = Monitor([], [g], 20, started=1000.0, stream=io.StringIO())

    def record(round_, accuracy):
        return {"round": round_, "accuracy": accuracy, "participants": 5, "rejected": 0, "seconds": 0.3}

    def status(state, t, history):
        return {"gateway": g.identity.id, "state": state, "time": t, "history": history}

    monitor._on_gateway_status(status("running", 1010.0, [record(10, 0.8), record(11, None)]))
    monitor._on_gateway_status(status("stopped", 1010.5, [record(10, 0.8), record(11, None)]))
    assert monitor.rounds_done("gw-1") == 10  # round 11 was interrupted, not finished
    monitor._on_gateway_status(status("running", 1014.0, [record(10, 0.8), record(11, 0.81), record(12, None)]))
    assert monitor.rounds_done("gw-1") == 11 and monitor.round_t[g.identity.id][11] == 14.0
    monitor._on_gateway_status(status("done", 1015.0, [record(11, 0.81), record(12, None)]))
    assert monitor.rounds_done("gw-1") == 12  # done: nothing more will come for it


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


