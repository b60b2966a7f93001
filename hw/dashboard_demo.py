"""Watch an emulator run on the dashboard: `python -m hw.dashboard_demo [--listen 127.0.0.1:8080]`.

Runs a small emulator scenario (Mosquitto or the embedded broker, one
gateway, real agents), starts `starling-dashboard` on its broker and prints
the page's address; after the first completed round it publishes a few bad
replies (bytes that are not a reply) on a real device's reply topic, so the
page shows rejections and a rejection-spike alert. The browser test
(tests/dashboard/test_dashboard_browser.py) drives the same pieces.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import topics

from .emulate import run as run_emulator
from .scenario import Scenario

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """The first truthy value of `predicate()` within `timeout` seconds, else AssertionError naming `what`."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class DashboardProcess:
    process: subprocess.Popen
    url: str
    log: Path

    def fleet(self) -> dict[str, Any]:
        """The page's data (`/api/fleet`)."""
        with urllib.request.urlopen(self.url + "api/fleet", timeout=5) as answer:
            return json.loads(answer.read())

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_dashboard(broker_url: str, log: Path, listen: str = "127.0.0.1:0", timeout: float = 30.0,
                    extra: list[str] | None = None) -> DashboardProcess:
    """Start `python -m dashboard.cli` and wait until it says where it listens."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "dashboard.cli", "--broker", broker_url, "--listen", listen,
                                    *(extra or [])], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def listening() -> str | None:
        if process.poll() is not None:
            raise AssertionError(f"the dashboard exited with {process.returncode}: {log.read_text()[-2000:]}")
        for line in log.read_text(errors="replace").splitlines():
            if " dashboard.listening url=" in line:
                return line.split(" dashboard.listening url=", 1)[1].split()[0]
        return None

    try:
        url = wait_for(listening, timeout, "the dashboard to listen")
    except BaseException:
        process.kill()
        process.wait()
        raise
    return DashboardProcess(process, url, log)


def publish_bad_replies(host: str, port: int, gateway_id: str, device_id: str, count: int = 3) -> None:
    """Publish `count` replies that are not CBOR on `device_id`'s reply topic: each a `malformed` rejection."""
    from mqttlink import Connection, ConnectionOptions

    with Connection(ConnectionOptions(f"bad-{os.getpid()}", host, port, clean_session=True)) as conn:
        for i in range(count):
            conn.publish(topics.reply(gateway_id, device_id), b"\x1c not a reply %d" % i).wait_for_publish(10)


class EmulatorRun:
    """`hw.emulate.run` in a thread; `info()` is its run.json once the broker and gateway exist."""

    def __init__(self, scenario: Scenario, workdir: Path) -> None:
        self.workdir = workdir
        self.stop_event = threading.Event()
        self.report: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(scenario,), name="emulator", daemon=True)

    def _run(self, scenario: Scenario) -> None:
        try:
            self.report = run_emulator(scenario, self.workdir / "report.json", self.workdir / "run", self.stop_event)
        except Exception as exc:  # handed to whoever waits on the run
            self.error = exc

    def start(self) -> EmulatorRun:
        self.thread.start()
        return self

    def info(self, timeout: float = 120.0) -> dict[str, Any]:
        path = self.workdir / "run" / "run.json"

        def ready() -> dict[str, Any] | None:
            if self.error is not None:
                raise AssertionError(f"the emulator failed: {self.error!r}")
            return json.loads(path.read_text()) if path.exists() else None

        return wait_for(ready, timeout, "the emulator's run.json")

    def finish(self, timeout: float) -> dict[str, Any] | None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.stop_event.set()
            self.thread.join(60)
        return self.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hw.dashboard_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8080")
    parser.add_argument("--workdir", type=Path, default=Path("dashboard-demo.run"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20, help="local epochs: more makes rounds slower to watch")
    parser.add_argument("--hold", type=float, default=0.0, help="keep the dashboard up this long after the run")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    emulator = EmulatorRun(Scenario(name="dashboard-demo", devices=3, subjects=(1, 2, 3), rounds=args.rounds,
                                    epochs=args.epochs),
                           args.workdir.resolve()).start()
    info = emulator.info()
    host, port = info["broker"]["host"], info["broker"]["port"]
    dashboard = start_dashboard(f"mqtt://{host}:{port}", args.workdir / "dashboard.log", args.listen)
    print(f"dashboard: {dashboard.url}  (broker mqtt://{host}:{port})", flush=True)
    try:
        gateway = wait_for(lambda: next((g for g in dashboard.fleet()["gateways"] if (g["round"] or 0) >= 1), None),
                           300, "a completed round")
        device = wait_for(lambda: next((d["device"] for d in dashboard.fleet()["devices"]), None), 60, "a device")
        publish_bad_replies(host, port, gateway["id"], device)
        print(f"published 3 bad replies as device {device[:8]}", flush=True)
        emulator.finish(900)
        time.sleep(args.hold)
    finally:
        emulator.stop_event.set()
        dashboard.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
