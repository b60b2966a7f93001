"""`starling-emulate`: a whole fleet on one machine, every part real.

    starling-emulate --scenario hw/scenarios/quickstart.toml --report report.json

Starts a broker on a free loopback port (Mosquitto if installed), writes a
key and config for one gateway and one per device, starts the gateway and
the agents as separate processes (`python -m gateway.cli run`, `python -m
agent.cli run`), follows the gateway's retained status topic to show
progress, and when the rounds are done stops everything, verifies the
ledger and writes the report.

The run folder (`--workdir`, default next to the report) keeps every log,
key, config and the ledger; `run.json` in it names the broker port and the
gateway id as soon as they exist, for tools and tests that join a run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from protocol import topics
from protocol.atomic import write_atomic
from protocol.keys import Identity

from .broker import Broker, _child_env
from .scenario import Scenario, ScenarioError, load_scenario


def _toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, dict) else "{ " + ", ".join(
        f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"


def _toml(doc: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def prepare_devices(scenario: Scenario, workdir: Path) -> list[tuple[str, Path]]:
    """Write one `.npz` per device; return (name, path) pairs."""
    out = []
    if scenario.source == "watch":
        from .datasets import load_watch_devices, save_device_npz

        subjects = scenario.subjects or tuple(range(1, scenario.devices + 1))
        for device in load_watch_devices(subjects, stride=scenario.stride):
            path = workdir / "data" / f"{device.name}.npz"
            save_device_npz(device, path)
            out.append((device.name, path))
    else:
        files = sorted(Path(scenario.source).glob("*.npz"))[: scenario.devices]
        if len(files) < scenario.devices:
            raise ScenarioError(f"dataset.source has {len(files)} .npz files for {scenario.devices} devices")
        out = [(f.stem, f) for f in files]
    return out


class Progress:
    """Follows the gateway's retained status topic and prints one line per finished round."""

    def __init__(self, host: str, port: int, gateway_id: str, rounds: int, stream=sys.stderr) -> None:
        import paho.mqtt.client as mqtt

        self.rounds = rounds
        self.stream = stream
        self.seen = -1
        self.status: dict[str, Any] = {}
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"emu-{os.getpid()}")
        self.client.on_connect = lambda c, *_: c.subscribe(topics.status(gateway_id), qos=1)
        self.client.on_message = self._on_message
        self.client.connect_async(host, port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            self.status = json.loads(msg.payload)
        except ValueError:
            return
        history = self.status.get("history", [])
        finished = self.status.get("state") in ("done", "stopped", "failed")
        for i, record in enumerate(history):
            # A round is shown once its evaluation is in (or nothing more will come for it).
            complete = record["accuracy"] is not None or i + 1 < len(history) or finished
            if record["round"] > self.seen and complete:
                self.seen = record["round"]
                acc = record["accuracy"]
                print(
                    f"  round {record['round']}/{self.rounds}  accuracy "
                    f"{'  -  ' if acc is None else f'{acc:.3f}'}  participants {record['participants']}"
                    f"  rejected {record['rejected']}  {record['seconds']:.1f} s",
                    file=self.stream, flush=True,
                )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _stop(processes: list[subprocess.Popen], timeout: float = 20.0) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + timeout
    for p in processes:
        try:
            p.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(scenario: Scenario, report_path: Path, workdir: Path, stop: threading.Event | None = None) -> dict[str, Any]:
    """Run `scenario` in `workdir`; write and return the report."""
    from ledger.verify import verify_store

    stop = stop or threading.Event()
    started = time.time()
    if (workdir / "run.json").exists():
        shutil.rmtree(workdir)  # an earlier run of ours: its keys, ledger and device state must not leak in
    elif workdir.exists() and any(workdir.iterdir()):
        raise ScenarioError(f"run folder {workdir} is not empty and holds no earlier run: choose another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    devices = prepare_devices(scenario, workdir)
    gateway_key = workdir / "gateway" / "gateway.key"
    gateway = Identity.generate()
    gateway.save(gateway_key)
    env = _child_env()
    processes: list[subprocess.Popen] = []
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    with Broker(workdir / "broker", kind=scenario.broker) as broker:
        say(f"starling-emulate: {scenario.name}: {broker.kind} broker on 127.0.0.1:{broker.port}, "
            f"1 gateway {gateway.id}, {len(devices)} devices, {scenario.rounds} rounds of {scenario.strategy}")
        write_atomic(workdir / "run.json", json.dumps({
            "broker": {"host": broker.host, "port": broker.port, "kind": broker.kind},
            "gateway": {"id": gateway.id, "public_key": gateway.public_key.hex()},
            "devices": [name for name, _ in devices],
        }).encode())
        gateway_conf = workdir / "gateway" / "gateway.toml"
        gateway_conf.write_text(_toml({
            "gateway": {"name": "gw-1", "key": str(gateway_key), "state_dir": str(workdir / "gateway")},
            "broker": {"host": broker.host, "port": broker.port},
            "strategy": {"name": scenario.strategy, "params": scenario.strategy_params,
                         **({"dp": scenario.strategy_dp} if scenario.strategy_dp else {})},
            "rounds": {"num_rounds": scenario.rounds, "deadline_s": scenario.deadline_s, "epochs": scenario.epochs,
                       "batch_size": scenario.batch_size, "lr": scenario.lr, "min_devices": len(devices),
                       "wait_devices_s": 120.0},
            "enrollment": {"policy": "open"},  # the emulator's devices are its own
        }))
        progress = Progress(broker.host, broker.port, gateway.id, scenario.rounds)
        with open(logs / "gateway.log", "wb") as out:
            gateway_proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(gateway_conf)],
                                            stdout=out, stderr=subprocess.STDOUT, env=env)
        processes.append(gateway_proc)
        for name, data in devices:
            home = workdir / "devices" / name
            home.mkdir(parents=True, exist_ok=True)
            conf = home / "agent.toml"
            conf.write_text(_toml({
                "device": {"name": name, "key": str(home / "device.key"), "state_dir": str(home / "state")},
                "gateway": {"id": gateway.id, "public_key": gateway.public_key.hex()},
                "broker": {"host": broker.host, "port": broker.port},
                "data": {"replay": str(data)},
            }))
            with open(logs / f"{name}.log", "wb") as out:
                processes.append(subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(conf)],
                                                  stdout=out, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + scenario.timeout_s
        timed_out = False
        try:
            while gateway_proc.poll() is None:
                if stop.is_set() or time.monotonic() > deadline:
                    timed_out = not stop.is_set()
                    say("starling-emulate: stopping early" + (" (timeout)" if timed_out else ""))
                    break
                time.sleep(0.2)
        finally:
            _stop(processes)
            progress.close()
    result_file = workdir / "gateway" / "result.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    ledger_path = workdir / "gateway" / "ledger.db"
    verified = verify_store(ledger_path) if ledger_path.exists() else None
    report = {
        "scenario": scenario.name,
        "rounds": result.get("rounds", []),
        "rejections": result.get("rejections", {}),
        "ledger": {
            "path": str(ledger_path),
            "height": result.get("ledger", {}).get("height"),
            "verified": bool(verified and verified.ok),
            "problem": None if verified is None or verified.ok else f"{verified.bad_vertex}: {verified.reason}",
        },
        "config": scenario.to_dict(),
        "gateway": {**result.get("gateway", {}), "state": result.get("state", "no result"),
                    "exit_code": gateway_proc.returncode, "enroll_rejections": result.get("enroll_rejections", {})},
        "model": result.get("model", {}),
        "broker": broker.kind,
        "workdir": str(workdir),
        "seconds": round(time.time() - started, 1),
        "timed_out": timed_out,
    }
    write_atomic(report_path, (json.dumps(report, indent=2) + "\n").encode())
    from hw.report import write_html_report

    html = report_path.with_suffix(".html")
    write_html_report(report, html)
    say(f"starling-emulate: report {report_path}, {html}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="starling-emulate",
                                     description="Run a Starling fleet (broker, gateway, agents) on this machine.")
    parser.add_argument("--scenario", required=True, help="scenario TOML file (see hw/scenarios/)")
    parser.add_argument("--report", default="report.json", help="where to write the JSON report")
    parser.add_argument("--workdir", help="run folder for logs, keys and the ledger (default: <report>.run/)")
    args = parser.parse_args(argv)
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"starling-emulate: {exc}", file=sys.stderr)
        return 2
    report_path = Path(args.report).resolve()
    workdir = Path(args.workdir).resolve() if args.workdir else report_path.with_suffix(".run")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        report = run(scenario, report_path, workdir, stop)
    except ScenarioError as exc:
        print(f"starling-emulate: {exc}", file=sys.stderr)
        return 2
    rounds = report["rounds"]
    final = rounds[-1]["accuracy"] if rounds else None
    print(f"starling-emulate: {len(rounds) - 1 if rounds else 0} rounds in {report['seconds']:.0f} s, "
          f"final accuracy {final if final is None else round(final, 3)}, "
          f"ledger height {report['ledger']['height']} verified={report['ledger']['verified']}, "
          f"report {report_path}", file=sys.stderr)
    ok = report["gateway"]["state"] == "done" and report["ledger"]["verified"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
