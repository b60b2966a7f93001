"""The emulator's fault timeline: what breaks, when, and for how long.

    [[fault]]
    kind = "gateway_restart"   # kill -9 the gateway (a crash), start it again after down_s:
    target = "gw-2"            #   it resumes the interrupted round from its journal
    at_round = 2               # when the target gateway (or gw-1) has finished this round ...
    # at_s = 40.0              # ... or this many seconds after the fleet started
    down_s = 5.0               # how long it stays broken

    kind = "gateway_stop"      # SIGTERM the gateway (an operator's stop, an upgrade): wait for it to
    target = "gw-1"            #   exit (SIGKILL after STOP_TIMEOUT_S, and the detail says so), start it
    overrides = { lr = 0.1 }   #   again after down_s, optionally with new config values (OVERRIDES:
                               #   [rounds] lr, epochs, batch_size, deadline_s, interval_s,
                               #   evaluate_every; strategy_params merged into [strategy] params)

    kind = "broker_restart"    # stop a broker (every connection drops), start it again after down_s;
    target = "hub"             #   "hub", or "gw-N" for that gateway's own broker (default: the one broker)
    kind = "partition"         # cut the target gateway's broker off the others for down_s: its ledger
    target = "gw-3"            #   gossip stops, both sides go on, then heal (needs gateways >= 2)
    kind = "device_churn"      # a seeded share of the devices lose power (kill -9) and come back
    fraction = 0.25            #   after down_s (or count = 3); in device pools, the pools holding them

A `partition` fault makes the emulator give every gateway its own broker,
bridged (ledger gossip and blob exchange) to a hub broker through a relay
that the fault cuts, as gateways in different districts would be; otherwise
the whole fleet shares one broker. Brokers keep their sessions and retained
messages across a restart (Mosquitto persistence), as a city's brokers would.

After a gateway_restart or a gateway_stop the gateway goes on from its last
release: its rounds, model versions and the model's lineage on the ledger
continue across the restart (the report's `lineage` says whether they did).
A stop's overrides are applied by the emulator, which owns the gateway's
config file (`FleetControl.restart_gateway`); the runner only says which.

`FaultRunner` injects each fault from its own thread through a `FleetControl`
(the emulator's handle on its processes, brokers and relays) and keeps the
timeline the report draws: {t, t_end, kind, target, detail}, in seconds
since the run started. A gateway fault's detail says how it went down
(`signal`; for a stop also `exit`: "exited" or "killed", `exit_code`,
`stop_s`) and, once it is back, the `overrides` applied and the `previous`
values they replaced. Closing it heals what is still broken (the ledgers
must be able to settle afterwards) without restarting what was killed or stopped.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.config import ConfigError

from .tables import NUMBER, array_of_tables, check_share, check_table, share_size

KINDS = ("gateway_restart", "gateway_stop", "broker_restart", "partition", "device_churn")
MAX_DOWN_S = 100.0  # under the emulator's gateways' wait_devices_s (120 s)
TRIGGER_POLL_S = 0.05  # a round ends in well under a second on a small fleet: "after round N" must not be N+1
STOP_TIMEOUT_S = 30.0  # a gateway that has not exited this long after SIGTERM is killed (and the report says so)
KEYS = {"kind": str, "target": str, "at_round": int, "at_s": NUMBER, "down_s": NUMBER,
        "fraction": NUMBER, "count": int, "overrides": dict}
# What a gateway_stop may change before the gateway starts again: the [rounds] values an operator
# would retune on a running service, and strategy parameters (merged into [strategy] params).
OVERRIDES = {"lr": NUMBER, "epochs": int, "batch_size": int, "deadline_s": NUMBER, "interval_s": NUMBER,
             "evaluate_every": int, "strategy_params": dict}
ROUNDS_OVERRIDES = ("lr", "epochs", "batch_size", "deadline_s", "interval_s", "evaluate_every")


@dataclass(frozen=True)
class Ending:
    """How a `Process.terminate` went."""

    how: str  # "exited" (within the timeout after SIGTERM), "killed" (SIGKILL after it), "not running"
    code: int | None  # its exit status (negative: the signal that ended it); None if it never ran
    seconds: float  # from SIGTERM to its end


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str = ""  # a gateway name (gw-N), "hub", or "" (churn, the one broker)
    at_round: int | None = None
    at_s: float | None = None
    down_s: float = 5.0
    fraction: float | None = None  # device_churn: of all devices; or
    count: int | None = None  # this many
    overrides: dict[str, Any] = field(default_factory=dict)  # gateway_stop: config values for its next start

    def devices(self, total: int) -> int:
        return min(share_size(total, self.fraction, self.count), total)

    def label(self) -> str:
        when = f"after round {self.at_round}" if self.at_round is not None else f"at {self.at_s:g} s"
        what = self.target or (f"{self.fraction:.0%}" if self.fraction is not None else f"{self.count} devices")
        changes = ", ".join(f"{k}={v}" for k, v in _flat(self.overrides).items())
        return f"{self.kind} {what} {when} for {self.down_s:g} s" + (f", then {changes}" if changes else "")


def _flat(overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides as one level: strategy_params' entries as strategy_params.<name>."""
    out = {k: v for k, v in overrides.items() if k != "strategy_params"}
    out.update({f"strategy_params.{k}": v for k, v in overrides.get("strategy_params", {}).items()})
    return out


def _overrides(at: str, table: Any) -> dict[str, Any]:
    """A gateway_stop's `overrides` table, checked: known keys, their types and ranges."""
    check_table(at, table, OVERRIDES)
    for key in ("lr", "epochs", "batch_size", "deadline_s", "evaluate_every"):
        if key in table and not table[key] > 0:
            raise ConfigError(f"{at}.{key} must be positive, got {table[key]}")
    if table.get("interval_s", 0) < 0:
        raise ConfigError(f"{at}.interval_s must not be negative, got {table['interval_s']}")
    params = table.get("strategy_params", {})
    for name, value in params.items():  # a constructor argument: a number, a string, a flag or a list of them
        where = f"{at}.strategy_params.{name}"
        if isinstance(value, dict):
            raise ConfigError(f"{where}: a strategy parameter is a value, not a table")
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, (str, int, float)):
                raise ConfigError(f"{where} has the wrong type ({type(item).__name__})")
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{where} must be a finite number, got {item}")
    out = {k: float(v) if k in ("lr", "deadline_s", "interval_s") else v for k, v in table.items()
           if k != "strategy_params"}
    if params:
        out["strategy_params"] = dict(params)
    return out


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A gateway config document with a stop's `overrides` applied, and the values they replaced
    (None: it was not set). Pure: whoever owns the config file writes the new document."""
    new = {section: dict(table) if isinstance(table, dict) else table for section, table in config.items()}
    previous: dict[str, Any] = {}
    rounds = new.setdefault("rounds", {})
    for key in ROUNDS_OVERRIDES:
        if key in overrides:
            previous[key] = rounds.get(key)
            rounds[key] = overrides[key]
    if overrides.get("strategy_params"):
        strategy = new.setdefault("strategy", {})
        params = dict(strategy.get("params", {}))
        previous["strategy_params"] = {k: params.get(k) for k in overrides["strategy_params"]}
        params.update(overrides["strategy_params"])
        strategy["params"] = params
    return new, previous


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
        if "overrides" in table and kind != "gateway_stop":
            raise ConfigError(f"{at}.overrides: only a gateway_stop starts the gateway again with new config "
                              f"(this fault is a {kind})")
        overrides = _overrides(f"{at}.overrides", table["overrides"]) if "overrides" in table else {}
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
                         None if "fraction" not in table else float(table["fraction"]), table.get("count"),
                         overrides))
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
    # SIGTERM, wait up to `timeout` s for it to exit, else SIGKILL: how it ended (hw.fleet.Ending)
    def stop_gateway(self, name: str, timeout: float) -> Ending: ...
    # apply `overrides` to its config (the emulator owns the file), start it; the values they replaced
    def restart_gateway(self, name: str, overrides: dict[str, Any]) -> dict[str, Any]: ...
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
            if self._stop.wait(TRIGGER_POLL_S):
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
            if self._stop.is_set() and fault.kind in ("gateway_restart", "gateway_stop", "device_churn"):
                entry["detail"]["restarted"] = False  # the run is over: nothing to come back to
            else:
                up()  # a closing run still heals the network: the ledgers must settle afterwards
            entry["t_end"] = self._t()
            changed = ", ".join(f"{k}={v}" for k, v in _flat(entry["detail"].get("overrides", {})).items())
            self.say(f"starling-emulate: fault over at {entry['t_end']:.1f} s: {fault.kind} {fault.target}".rstrip()
                     + (f", started again with {changed}" if changed else ""))
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
        if fault.kind == "gateway_stop":
            ending = fleet.stop_gateway(fault.target, STOP_TIMEOUT_S)
            if ending.how == "not running":
                entry["detail"]["skipped"] = "the gateway had already finished"
                return None
            entry["detail"].update(signal="SIGTERM", exit=ending.how, exit_code=ending.code, stop_s=ending.seconds)
            if ending.how == "killed":  # a clean stop that did not happen is a finding, not a detail to hide
                entry["detail"]["killed"] = f"still running {STOP_TIMEOUT_S:g} s after SIGTERM: SIGKILL"

            def up() -> None:
                previous = fleet.restart_gateway(fault.target, fault.overrides)
                if fault.overrides:
                    entry["detail"].update(overrides=fault.overrides, previous=previous)

            return up
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
