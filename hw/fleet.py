"""The emulator's running fleet: its brokers and child processes, and the handle faults use on them.

    with Network(workdir / "broker", "auto", ["gw-1", "gw-2"], per_gateway=False) as net:
        host, port = net.endpoint("gw-1")       # where gw-1 and its devices connect
        gateway = Process([sys.executable, "-m", "gateway.cli", ...], log, env)
        gateway.start(); gateway.kill(); gateway.start()   # a crash and a restart, same command line
        gateway.terminate(30.0)                            # a clean stop: Ending("exited", 0, 1.2)

`Network` is one broker for the whole fleet, or, when gateways must be
partitioned from each other, one broker per gateway, each bridged (ledger
gossip and blob exchange: hw.broker.BRIDGE_TOPICS) to a hub broker through a
TCP relay that `cut` and `heal` open and close. `Fleet` is the `hw.faults.FleetControl` the fault runner drives;
it changes a gateway's config only through the `reconfigure` callback the
emulator gives it. `GatewayRun` is the emulator's handle on one gateway: its
identity, folder, devices, process, and its config file (whose only writer
it is).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.keys import Identity

from .broker import Broker
from .faults import Ending, apply_overrides
from .netem import TcpRelay
from .toml_files import write_toml

HUB = "hub"


@dataclass
class Process:
    """A child process that can be killed (a crash, a power cut) and started again with the same command."""

    cmd: list[str]
    log: Path
    env: dict[str, str]
    preexec: Callable[[], None] | None = None
    popen: subprocess.Popen | None = None
    starts: int = 0
    on_start: Callable[[subprocess.Popen], None] | None = field(default=None, repr=False)

    def start(self) -> None:
        with open(self.log, "ab") as out:  # appended: the log keeps every life of the process
            self.popen = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                          preexec_fn=self.preexec)
        self.starts += 1
        if self.on_start is not None:
            self.on_start(self.popen)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> bool:
        """SIGKILL and reap; False if it was not running."""
        if not self.alive():
            return False
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        return True

    def terminate(self, timeout: float) -> Ending:
        """SIGTERM (a clean stop: the process finishes what it must), wait up to `timeout` s, else SIGKILL."""
        if not self.alive():
            return Ending("not running", None if self.popen is None else self.popen.returncode, 0.0)
        began = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
            how = "exited"
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            how = "killed"
        return Ending(how, self.popen.returncode, round(time.monotonic() - began, 3))


class Network:
    """The run's MQTT brokers (real Mosquitto when installed), and the links between them."""

    def __init__(self, folder: Path, kind: str, gateways: list[str], per_gateway: bool, persistent: bool,
                 listen: tuple[str, int] | None = None) -> None:
        """`listen`: a second listener for real devices, on the first gateway's broker (hardware in the loop)."""
        self.per_gateway = per_gateway
        self.hub = Broker(folder / (HUB if per_gateway else ""), kind=kind, persistent=persistent,
                          listen=None if per_gateway else listen)
        self.brokers: dict[str, Broker] = {HUB: self.hub}
        self.relays: dict[str, TcpRelay] = {}
        self._stack = contextlib.ExitStack()
        self._folder, self._gateways, self._persistent, self._listen = folder, gateways, persistent, listen

    @property
    def kind(self) -> str:
        return self.hub.kind

    def __enter__(self) -> Network:
        try:
            self._stack.enter_context(self.hub)
            if self.per_gateway:
                for name in self._gateways:
                    relay = self._stack.enter_context(TcpRelay((self.hub.host, self.hub.port)))
                    broker = Broker(self._folder / name, kind="mosquitto", persistent=self._persistent,
                                    bridge_to=("127.0.0.1", relay.port),
                                    listen=self._listen if name == self._gateways[0] else None)
                    self.relays[name], self.brokers[name] = relay, self._stack.enter_context(broker)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def endpoint(self, gateway: str) -> tuple[str, int]:
        """Where this gateway and its devices connect."""
        broker = self.brokers.get(gateway, self.hub) if self.per_gateway else self.hub
        return broker.host, broker.port

    def endpoints(self) -> list[tuple[str, int]]:
        return sorted({(b.host, b.port) for b in self.brokers.values()})

    def _broker(self, target: str) -> Broker:
        return self.brokers[target or HUB]

    def stop_broker(self, target: str) -> None:
        self._broker(target).stop()

    def start_broker(self, target: str) -> None:
        self._broker(target).start()

    def cut(self, gateway: str) -> None:
        self.relays[gateway].cut()

    def heal(self, gateway: str) -> None:
        self.relays[gateway].heal()


class Fleet:
    """The `hw.faults.FleetControl` of one emulator run."""

    def __init__(self, network: Network, gateways: dict[str, Process], devices: dict[str, Process],
                 rounds_done: Callable[[str], int], seed: int,
                 reconfigure: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None) -> None:
        """`reconfigure(gateway, overrides)`: the emulator applies a fault's overrides to the gateway's
        config file and returns the values they replaced (None: this fleet cannot change configs)."""
        self.network, self.gateways, self.devices = network, gateways, devices
        self.rounds_done = rounds_done
        self.seed = seed
        self._reconfigure = reconfigure
        self._lock = threading.Lock()

    def kill_gateway(self, name: str) -> bool:
        return self.gateways[name].kill()

    def start_gateway(self, name: str) -> None:
        self.gateways[name].start()

    def stop_gateway(self, name: str, timeout: float) -> Ending:
        return self.gateways[name].terminate(timeout)

    def restart_gateway(self, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
        """Start a stopped gateway again, first with `overrides` in its config; the values they replaced."""
        previous = {}
        if overrides:
            if self._reconfigure is None:
                raise ValueError(f"this fleet cannot change {name}'s config")
            previous = self._reconfigure(name, overrides)
        self.gateways[name].start()
        return previous

    def stop_broker(self, target: str) -> None:
        self.network.stop_broker(target)

    def start_broker(self, target: str) -> None:
        self.network.start_broker(target)

    def cut(self, gateway: str) -> None:
        self.network.cut(gateway)

    def heal(self, gateway: str) -> None:
        self.network.heal(gateway)

    def kill_devices(self, fault_index: int, count: int) -> list[str]:
        """Power off `count` devices (a seeded choice per fault); in pools, every device of their pools."""
        import numpy as np

        names = sorted(self.devices)
        order = [names[i] for i in np.random.default_rng([self.seed, 11, fault_index]).permutation(len(names))]
        with self._lock:
            processes = {id(self.devices[n]): self.devices[n] for n in order[:count]}
            for process in processes.values():
                process.kill()
        hit = {id(p) for p in processes.values()}
        return sorted(n for n, p in self.devices.items() if id(p) in hit)

    def start_devices(self, names: list[str]) -> None:
        with self._lock:
            for process in {id(self.devices[n]): self.devices[n] for n in names}.values():
                if not process.alive():
                    process.start()


def describe(network: Network) -> dict[str, Any]:
    """The brokers for run.json: where each listens."""
    return {name: {"host": b.host, "port": b.port} for name, b in network.brokers.items()}


@dataclass
class GatewayRun:
    """One gateway of the run: its identity, folder, devices and process."""

    index: int
    name: str
    identity: Identity
    home: Path
    log: Path
    devices: list[str] = field(default_factory=list)
    proc: Process | None = None  # set once its config is written; a fault may kill and restart it
    config: dict[str, Any] = field(default_factory=dict)  # its gateway.toml as last written (only here)
    _config_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def process(self) -> subprocess.Popen | None:
        return self.proc.popen if self.proc is not None else None

    @property
    def config_path(self) -> Path:
        return self.home / "gateway.toml"

    def write_config(self, doc: dict[str, Any]) -> Path:
        """Write the gateway's config file (the one writer of it); the gateway reads it when it starts."""
        with self._config_lock:
            write_toml(self.config_path, doc)
            self.config = doc
        return self.config_path

    def reconfigure(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """A gateway_stop's `overrides` into the config file, for its next start; the values they replaced."""
        with self._config_lock:
            doc, previous = apply_overrides(self.config, overrides)
            write_toml(self.config_path, doc)
            self.config = doc
        return previous

    @property
    def key(self) -> Path:
        return self.home / "gateway.key"

    @property
    def ledger(self) -> Path:
        return self.home / "ledger.db"

