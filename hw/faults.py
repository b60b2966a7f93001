"""The emulator's fault timeline: what breaks, when, and for how long.

    [[fault]]
    kind = "gateway_restart"   # kill -9 the gateway (a crash), start it again after down_s:
    target = "gw-2"            #   it resumes the interrupted round from its journal
    at_round = 2               # when the target gateway (or gw-1) has finished this round ...
    # at_s = 40.0              # ... or this many seconds after the fleet started
    down_s = 5.0               # how long it stays broken

    kind = "broker_restart"    # stop a broker (every connection drops), start it again after down_s;
    target = "hub"             #   "hub", or "gw-N" for that gateway's own broker (default: the one broker)
    kind = "partition"         # cut the target gateway's broker off the others for down_s: its ledger
    target = "gw-3"            #   gossip stops, both sides go on, then heal (needs gateways >= 2)
    kind = "device_churn"      # a seeded share of the devices lose power (kill -9) and come back
    fraction = 0.25            #   after down_s (or count = 3); in device pools, the pools holding them

A `partition` fault makes the emulator give every gateway its own broker,
bridged (ledger gossip only) to a hub broker through a relay that the fault
cuts, as gateways in different districts would be; otherwise the whole
fleet shares one broker. Brokers keep their sessions and retained messages
across a restart (Mosquitto persistence), as a city's brokers would.

`FaultRunner` injects each fault from its own thread through a `FleetControl`
(the emulator's handle on its processes, brokers and relays) and keeps the
timeline the report draws: {t, t_end, kind, target, detail}, in seconds
since the run started. Closing it heals what is still broken (the ledgers
must be able to settle afterwards) without restarting what was killed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from protocol.config import ConfigError

from .tables import array_of_tables, check_share, check_table, share_size

KINDS = ("gateway_restart", "broker_restart", "partition", "device_churn")
MAX_DOWN_S = 100.0  # under the emulator's gateways' wait_devices_s (120 s)
KEYS = {"kind": str, "target": str, "at_round": int, "at_s": (int, float), "down_s": (int, float),
        "fraction": (int, float), "count": int}


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str = ""  # a gateway name (gw-N), "hub", or "" (churn, the one broker)
    at_round: int | None = None
    at_s: float | None = None
    down_s: float = 5.0
    fraction: float | None = None  # device_churn: of all devices; or
    count: int | None = None  # this many

    def devices(self, total: int) -> int:
        return min(share_size(total, self.fraction, self.count), total)

    def label(self) -> str:
        when = f"after round {self.at_round}" if self.at_round is not None else f"at {self.at_s:g} s"
        what = self.target or (f"{self.fraction:.0%}" if self.fraction is not None else f"{self.count} devices")
        return f"{self.kind} {what} {when} for {self.down_s:g} s"


def parse_faults(items: Any, gateways: int, where: str = "fault") -> tuple[Fault, ...]:
    """The scenario's [[fault]] tables, checked; a ConfigError names the field."""
    names = [f"gw-{i + 1}" for i in range(gateways)]
    out = []
    for i, table in enumerate(array_of_tables(items, where)):
        at = f"{where}[{i}]"
        check_table(at, table, KEYS)
        kind = table.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{at}.kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if ("at_round" in table) == ("at_s" in table):
            raise ConfigError(f"{at}: give either at_round or at_s, not {'both' if 'at_round' in table else 'neither'}")
        if table.get("at_round", 0) < 0 or table.get("at_s", 0) < 0:
            raise ConfigError(f"{at}: at_round and at_s must not be negative")
        down_s = float(table.get("down_s", 5.0))
        if not 0 < down_s <= MAX_DOWN_S:
            raise ConfigError(f"{at}.down_s must be in (0, {MAX_DOWN_S:g}] (a restarted gateway waits "
                              f"{MAX_DOWN_S:g} s at most for its devices), got {down_s}")
        target = table.get("target", "")
        if kind == "device_churn":
            if target:
                raise ConfigError(f"{at}.target: device_churn picks its devices by fraction or count")
            if ("fraction" in table) == ("count" in table):
                raise ConfigError(f"{at}: device_churn needs either fraction or count, not "
                                  f"{'both' if 'fraction' in table else 'neither'}")
            check_share(at, table)
        else:
            if "fraction" in table or "count" in table:
                raise ConfigError(f"{at}: fraction and count are for device_churn only")
            allowed = [*names, "hub"] if kind == "broker_restart" else names
            if kind == "broker_restart" and not target:
                target = ""  # the one broker (or the hub)
            elif target not in allowed:
                raise ConfigError(f"{at}.target must be one of {', '.join(allowed)}, not {target!r}")
            if kind == "partition" and gateways < 2:
                raise ConfigError(f"{at}: a partition needs at least 2 gateways (fleet.gateways = {gateways})")
        out.append(Fault(kind, target, table.get("at_round"),
                         None if "at_s" not in table else float(table["at_s"]), down_s,
                         None if "fraction" not in table else float(table["fraction"]), table.get("count")))
    partitioned = any(f.kind == "partition" for f in out)
    for i, f in enumerate(out):
        if f.kind == "broker_restart" and f.target and not partitioned:
            raise ConfigError(f"{where}[{i}].target: gateways have their own brokers only in a scenario with a "
                              "partition fault; without one, restart the one broker (no target)")
    return tuple(out)


class FleetControl(Protocol):
    """What the fault runner may do to the emulated fleet (the emulator implements it)."""

    def rounds_done(self, gateway: str) -> int: ...  # the last round the gateway finished, -1 before any
    def kill_gateway(self, name: str) -> bool: ...  # False: it had already finished
    def start_gateway(self, name: str) -> None: ...
    def stop_broker(self, target: str) -> None: ...
    def start_broker(self, target: str) -> None: ...
    def cut(self, gateway: str) -> None: ...
    def heal(self, gateway: str) -> None: ...
    def kill_devices(self, fault_index: int, count: int) -> list[str]: ...  # the devices that went down
    def start_devices(self, names: list[str]) -> None: ...


class FaultRunner:
    """Injects `faults` into a fleet, one thread per fault; `timeline` is what happened, when."""

    def __init__(self, faults: tuple[Fault, ...], fleet: FleetControl, started: float, devices: int,
                 say: Callable[[str], None] = lambda _: None) -> None:
        self.faults, self.fleet, self.started, self.devices, self.say = faults, fleet, started, devices, say
        self.timeline: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._busy = 0  # faults between their "down" and "up": a killed gateway is coming back
        self._threads = [threading.Thread(target=self._run, args=(i, f), name=f"fault-{i}", daemon=True)
                         for i, f in enumerate(faults)]

    def __enter__(self) -> FaultRunner:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def busy(self) -> bool:
        """True while some fault holds a part of the fleet down (a dead gateway process is not finished)."""
        with self._lock:
            return self._busy > 0

    def close(self) -> None:
        """Stop waiting for triggers; heal partitions and restart brokers still down (not processes)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _t(self) -> float:
        return round(time.time() - self.started, 3)

    def _triggered(self, fault: Fault) -> bool:
        if fault.at_s is not None:
            return time.time() - self.started >= fault.at_s
        gateway = fault.target if fault.target.startswith("gw-") else "gw-1"
        return self.fleet.rounds_done(gateway) >= fault.at_round

    def _run(self, index: int, fault: Fault) -> None:
        while not self._triggered(fault):
            if self._stop.wait(0.2):
                return
        with self._lock:
            if self._stop.is_set():
                return
            self._busy += 1
        entry: dict[str, Any] = {"t": self._t(), "t_end": None, "kind": fault.kind, "target": fault.target or None,
                                 "detail": {"down_s": fault.down_s}}
        try:
            up = self._down_action(index, fault, entry)
            self.say(f"starling-emulate: fault at {entry['t']:.1f} s: {fault.label()}: {entry['detail']}")
            with self._lock:
                self.timeline.append(entry)
            if up is None:
                return
            self._stop.wait(fault.down_s)
            if self._stop.is_set() and fault.kind in ("gateway_restart", "device_churn"):
                entry["detail"]["restarted"] = False  # the run is over: nothing to come back to
            else:
                up()  # a closing run still heals the network: the ledgers must settle afterwards
            entry["t_end"] = self._t()
            self.say(f"starling-emulate: fault over at {entry['t_end']:.1f} s: {fault.kind} {fault.target}".rstrip())
        except Exception as exc:  # noqa: BLE001 (a fault that cannot be injected is reported, not fatal)
            entry["detail"]["error"] = f"{type(exc).__name__}: {exc}"
            with self._lock:
                if entry not in self.timeline:
                    self.timeline.append(entry)
        finally:
            with self._lock:
                self._busy -= 1

    def _down_action(self, index: int, fault: Fault, entry: dict[str, Any]) -> Callable[[], None] | None:
        """Break what the fault breaks; return how to bring it back (None: nothing to bring back)."""
        fleet = self.fleet
        if fault.kind == "gateway_restart":
            if not fleet.kill_gateway(fault.target):
                entry["detail"]["skipped"] = "the gateway had already finished"
                return None
            entry["detail"]["signal"] = "SIGKILL"
            return lambda: fleet.start_gateway(fault.target)
        if fault.kind == "broker_restart":
            fleet.stop_broker(fault.target)
            return lambda: fleet.start_broker(fault.target)
        if fault.kind == "partition":
            fleet.cut(fault.target)
            return lambda: fleet.heal(fault.target)
        names = fleet.kill_devices(index, fault.devices(self.devices))
        entry["detail"].update(devices=len(names), names=names[:20])
        return lambda: fleet.start_devices(names)


def fault_sections(timeline: list[dict[str, Any]], rounds_by_gateway: dict[str, list[dict[str, Any]]]
                   ) -> list[dict[str, Any]]:
    """Per fault: what the gateways did meanwhile and how soon the fleet finished a round after it.

    `rounds_by_gateway`: gateway name -> its rounds with `t` (seconds since the run started).
    """
    out = []
    for entry in sorted(timeline, key=lambda e: e["t"]):
        start, end = entry["t"], entry["t_end"] if entry["t_end"] is not None else entry["t"]
        during, recovered = {}, {}
        for name, rounds in rounds_by_gateway.items():
            ends = [r for r in rounds if isinstance(r.get("t"), (int, float))]
            during[name] = [r["round"] for r in ends if start <= r["t"] <= end]
            after = [r["t"] for r in ends if r["t"] > end]
            recovered[name] = round(min(after) - end, 3) if after else None
        out.append({**entry, "rounds_during": during, "next_round_after_s": recovered})
    return out
