"""Device and link profiles: slow, small and badly connected devices in the emulator.

A real fleet is not a row of identical laptops. Scenarios give shares of the
fleet a *device profile* (slower CPU, smaller training budget, memory cap)
and a *link profile* (latency, bandwidth, loss, outages):

    [[device_profile]]
    name = "pi-zero"
    fraction = 0.3           # of all devices (rounded, at least 1), or count = 3
    cpu_slowdown = 4.0       # runs at 1/4 of a laptop core (SIGSTOP/SIGCONT duty cycle)
    max_train_s = 20.0       # -> the agent's [budget] max_train_s (0: no limit)
    max_samples = 500        # -> the agent's [budget] max_samples (0: all)
    memory_mb = 128          # the agent process's data-segment cap (0: none)

    [[link]]
    name = "rural-lte"
    count = 2
    latency_ms = 80.0
    jitter_ms = 20.0
    bandwidth_kbps = 512.0   # kilobits per second (0: unlimited)
    loss = 0.02              # share of chunks that pay a TCP retransmission
    outages = [[30, 45]]     # seconds after the run starts: the link is down

This module parses and checks those tables (errors name the field, as in
hw/scenario.py), chooses which devices get which profile (seeded, disjoint),
and provides the two mechanisms the emulator applies per agent process:
`CpuThrottle` (slow CPU) and `memory_cap` (memory limit). Links are carried
out by hw/links.py's `LinkRelay`, configured by `LinkSpec.profile()`.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from protocol.config import ConfigError
from protocol.fields import is_finite_number

from .links import LinkProfile
from .tables import NUMBER, array_of_tables, check_share, check_table, share_size

DEVICE_KEYS = {"name": str, "fraction": NUMBER, "count": int, "cpu_slowdown": NUMBER, "max_train_s": NUMBER,
               "max_samples": int, "memory_mb": int}
LINK_KEYS = {"name": str, "fraction": NUMBER, "count": int, "latency_ms": NUMBER, "jitter_ms": NUMBER,
             "bandwidth_kbps": NUMBER, "loss": NUMBER, "outages": list}
MIN_MEMORY_MB = 64  # an agent that loads the CNN and trains needs ~57 MiB of data segment (see memory_cap)


@dataclass(frozen=True)
class Share:
    """A named share of the fleet: `count` devices, or `fraction` of them."""

    name: str
    fraction: float | None = None
    count: int | None = None

    def devices(self, total: int) -> int:
        """How many of `total` devices get this profile: `count`, or `fraction` rounded (at least 1)."""
        return share_size(total, self.fraction, self.count)


@dataclass(frozen=True)
class DeviceProfile(Share):
    cpu_slowdown: float = 1.0  # >= 1: runs at 1/cpu_slowdown of a laptop core
    max_train_s: float = 0.0  # 0: no limit
    max_samples: int = 0  # 0: no limit
    memory_mb: int = 0  # 0: no cap

    def budget_toml(self) -> dict[str, float | int]:
        """The agent config's `[budget]` entries this profile sets (the non-zero ones)."""
        entries = {"max_train_s": float(self.max_train_s), "max_samples": int(self.max_samples)}
        return {key: value for key, value in entries.items() if value}


@dataclass(frozen=True)
class LinkSpec(Share):
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_kbps: float = 0.0  # kilobits per second; 0 = unlimited
    loss: float = 0.0  # in [0, 1)
    outages: tuple[tuple[float, float], ...] = ()  # (start_s, end_s) after the run starts

    def profile(self) -> LinkProfile:
        """The relay's profile: seconds and BYTES per second (the seed goes to `LinkRelay(seed=...)`)."""
        return LinkProfile(latency_s=self.latency_ms / 1000, jitter_s=self.jitter_ms / 1000,
                           bandwidth_bps=self.bandwidth_kbps * 1000 / 8, loss=self.loss, outages=self.outages)


# --- parsing ---------------------------------------------------------------------------------


def _table(at: str, table: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """Check keys and types; fraction/count and the name, common to both kinds. Returns the Share fields."""
    check_table(at, table, schema)
    for key, value in table.items():
        if isinstance(value, NUMBER) and value < 0:
            raise ConfigError(f"{at}.{key} must not be negative, got {value}")
    if not table.get("name"):
        raise ConfigError(f"{at}.name is required")
    check_share(at, table)
    fraction = float(table["fraction"]) if "fraction" in table else None
    return {"name": table["name"], "fraction": fraction, "count": table.get("count")}


def _unique(where: str, specs: tuple[Share, ...]) -> None:
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise ConfigError(f"{where}[{i}].name {spec.name!r} is used twice")
        seen.add(spec.name)


def parse_device_profiles(items: Any, where: str = "device_profile") -> tuple[DeviceProfile, ...]:
    """The `[[device_profile]]` tables, checked; errors name the field (`device_profile[1].memory_mb ...`)."""
    out = []
    for i, table in enumerate(array_of_tables(items, where)):
        at = f"{where}[{i}]"
        share = _table(at, table, DEVICE_KEYS)
        slowdown = float(table.get("cpu_slowdown", 1.0))
        if slowdown < 1:
            raise ConfigError(f"{at}.cpu_slowdown must be >= 1, got {table['cpu_slowdown']}")
        memory = table.get("memory_mb", 0)
        if 0 < memory < MIN_MEMORY_MB:
            raise ConfigError(f"{at}.memory_mb must be 0 (no cap) or at least {MIN_MEMORY_MB} "
                              f"(an agent process needs about that to start), got {memory}")
        train_s = float(table.get("max_train_s", 0))
        out.append(DeviceProfile(**share, cpu_slowdown=slowdown, max_train_s=train_s,
                                 max_samples=table.get("max_samples", 0), memory_mb=memory))
    _unique(where, tuple(out))
    return tuple(out)


def parse_links(items: Any, where: str = "link") -> tuple[LinkSpec, ...]:
    """The `[[link]]` tables, checked; errors name the field (`link[0].loss ...`)."""
    out = []
    for i, table in enumerate(array_of_tables(items, where)):
        at = f"{where}[{i}]"
        share = _table(at, table, LINK_KEYS)
        loss = float(table.get("loss", 0.0))
        if not loss < 1:
            raise ConfigError(f"{at}.loss must be in [0, 1), got {table['loss']}")
        outages = []
        for window in table.get("outages", []):
            ok = isinstance(window, list) and len(window) == 2 and all(is_finite_number(t) for t in window)
            if not ok or not 0 <= window[0] < window[1]:
                raise ConfigError(f"{at}.outages must be [[start_s, end_s], ...] with 0 <= start_s < end_s, "
                                  f"got {window!r}")
            outages.append((float(window[0]), float(window[1])))
        out.append(LinkSpec(**share, latency_ms=float(table.get("latency_ms", 0.0)),
                            jitter_ms=float(table.get("jitter_ms", 0.0)),
                            bandwidth_kbps=float(table.get("bandwidth_kbps", 0.0)), loss=loss,
                            outages=tuple(outages)))
    _unique(where, tuple(out))
    return tuple(out)


class TakesShare(Protocol):
    def devices(self, total: int) -> int: ...


S = TypeVar("S", bound=TakesShare)  # a Share, or anything else that takes a share of the fleet (an [[adversary]])


def assign(names: list[str], specs: tuple[S, ...], seed: int, salt: int) -> dict[str, S]:
    """Device name -> its spec: a seeded, reproducible choice, disjoint across specs; the others get none.

    `salt` keeps the choices of different kinds (attackers, device profiles, links) independent.
    """
    import numpy as np  # noqa: PLC0415 (only when a scenario has profiles)

    wanted = [spec.devices(len(names)) for spec in specs]
    if sum(wanted) > len(names):
        asked = ", ".join(f"{getattr(spec, 'name', i)}: {n}" for i, (spec, n) in enumerate(zip(specs, wanted)))
        raise ConfigError(f"the profiles ask for {sum(wanted)} devices ({asked}), the fleet has {len(names)}")
    order = [names[i] for i in np.random.default_rng([seed, salt]).permutation(len(names))]
    chosen: dict[str, S] = {}
    at = 0
    for spec, n in zip(specs, wanted):
        chosen.update((name, spec) for name in order[at: at + n])
        at += n
    return chosen


# --- slow CPUs -------------------------------------------------------------------------------


class CpuThrottle:
    """Slows whole processes down by duty-cycling them with SIGSTOP/SIGCONT, from one thread.

        with CpuThrottle() as throttle:
            throttle.add(proc.pid, 4.0)   # runs 1/4 of each period, stopped for the rest

    Within every `period_s` a process with factor f runs for period_s / f. Each
    process's run window starts at its own phase in the period, so a fleet of
    slow devices does not wake all at once. Processes are held by pidfd, so a
    pid reused after its process was reaped is never signalled. Only the
    process itself is slowed, not any children it starts. A stopped process
    handles SIGTERM once it is continued, i.e. within one period.
    """

    def __init__(self, period_s: float = 0.1) -> None:
        self.period_s = period_s
        self._procs: dict[int, tuple[int, float]] = {}  # pid -> (pidfd, factor)
        self._lock = threading.Lock()  # signals are sent under it, so remove() always has the last word
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-throttle", daemon=True)

    def __enter__(self) -> CpuThrottle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            for pid in list(self._procs):
                self._forget(pid)

    def add(self, pid: int, factor: float) -> None:
        """Run `pid` at 1/factor speed from now on (factor 1: full speed); again to change its factor."""
        if not (math.isfinite(factor) and factor >= 1):
            raise ValueError(f"factor must be a finite number >= 1, got {factor}")
        with self._lock:
            self._forget(pid)  # continued if it was stopped: its new factor starts afresh
            try:
                self._procs[pid] = (os.pidfd_open(pid), factor)
            except ProcessLookupError:  # already gone
                pass

    def remove(self, pid: int) -> None:
        """Stop throttling `pid` and leave it running."""
        with self._lock:
            self._forget(pid)

    def _forget(self, pid: int) -> None:
        if pid in self._procs:
            self._send(pid, signal.SIGCONT)
        entry = self._procs.pop(pid, None)
        if entry is not None:
            os.close(entry[0])

    def _send(self, pid: int, sig: int) -> None:
        try:
            signal.pidfd_send_signal(self._procs[pid][0], sig)
        except ProcessLookupError:  # it exited and was reaped: nothing left to slow down
            os.close(self._procs.pop(pid)[0])

    def _plan(self) -> list[tuple[float, int, int, tuple[int, float]]]:
        """This period's (offset, pid, signal, the pid's entry) events, in time order."""
        events = []
        for pid, entry in self._procs.items():
            factor = entry[1]
            if factor == 1:
                continue
            phase = (pid * 0.6180339887) % 1.0 * self.period_s  # spread evenly, stable per pid
            stop = phase + self.period_s / factor
            if stop > self.period_s:  # its window wraps round: it runs into the next period
                stop -= self.period_s
            events += [(phase, pid, signal.SIGCONT, entry), (stop, pid, signal.SIGSTOP, entry)]
        return sorted(events, key=lambda event: event[0])

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            # periods follow a fixed clock: restarting each from "now" would lengthen them by the loop's
            # overhead, time in which a process whose window wraps round keeps running
            start = max(start, time.monotonic() - self.period_s)
            with self._lock:
                plan = self._plan()
            for offset, pid, sig, entry in plan:
                if self._stop.wait(max(0.0, start + offset - time.monotonic())):
                    return
                with self._lock:
                    if self._procs.get(pid) is entry:  # not removed or re-added (a new factor) meanwhile
                        self._send(pid, sig)
            self._stop.wait(max(0.0, start + self.period_s - time.monotonic()))
            start += self.period_s


# --- small memories --------------------------------------------------------------------------


def memory_cap(mb: int) -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen` that caps the child's data segment (RLIMIT_DATA) at `mb` MiB.

    RLIMIT_DATA counts (Linux >= 4.7) the heap and every private writable
    mapping — numpy's arrays, malloc arenas, thread stacks — but not code or
    read-only shared libraries. It tracks what a device really has to hold:
    measured here (Python 3.11, numpy 2.4, OPENBLAS_NUM_THREADS=1) a bare
    interpreter needs 9 MiB, `import numpy` 49 MiB (mostly OpenBLAS's
    buffer), `import ai_edge_litert.interpreter` 49 MiB, and an agent that
    loads the imu_cnn model and trains 57 MiB (its RSS: 53 MB). RLIMIT_AS
    counts reserved address space instead: the same processes need 97, 119
    and 135 MiB, so a cap there says little about the device's RAM.

    An allocation past the cap fails, and Python raises MemoryError. The cap
    is set hard too, so the child cannot lift it. The figures assume one
    BLAS thread (as hw/broker.py's `_child_env` sets): each further OpenBLAS
    thread reserves about 41 MiB more (its buffer and its stack).
    """
    if mb <= 0:
        raise ValueError(f"the cap must be positive, got {mb} MiB")
    limit = mb << 20
    setrlimit, data = resource.setrlimit, resource.RLIMIT_DATA  # bound now: the child runs no imports

    def cap() -> None:
        setrlimit(data, (limit, limit))

    return cap
