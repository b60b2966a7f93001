"""CPU and memory of processes and process trees, from Linux's /proc: the one copy the benches share.

    from bench.proc_usage import Sampler, cpu_seconds, peak_rss_mb  # after sys.path.insert(0, ROOT)

Linux only, as the benches are (psutil is not a dependency of the project). What is read:

- /proc/<pid>/task/<tid>/children: the direct children of each of the process's threads (a child is listed
  under the thread that forked it, so every thread is read). `tree` walks them to every live descendant.
- /proc/<pid>/stat: the state (its 3rd field: "Z" for a zombie) and utime + stime (its 14th and 15th, in clock
  ticks of SC_CLK_TCK): the CPU seconds the process has used so far, all its threads, not its children. A
  zombie keeps its entry, and its final CPU, until its parent reaps it.
- /proc/<pid>/status: VmHWM (the peak resident memory of the process's life) and VmRSS (resident now), in kB.
  A zombie has neither.
- /proc/<pid>/cmdline: what the process runs, to group processes by program (`program`).

The functions of one pid never raise for a process that is gone (or a pid never seen): they return None, 0.0,
[] or "?". `Sampler` follows named groups of process trees from a thread, at a fixed interval, and keeps a
`Usage` per group: each process's CPU and peak memory as last seen (so processes that came and went between
two samples of their tree are counted if one sample saw them), and the largest summed VmRSS of one sample.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import resource
import threading
import time
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- one process


def children(pid: int) -> list[int]:
    """The direct children of `pid`, from every one of its threads; [] if it is gone."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    return out


def tree(pid: int) -> list[int]:
    """`pid` (always, first) and its live descendants."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += children(p)
    return seen


def stat(pid: int) -> tuple[str, float] | None:
    """(state, CPU seconds user + system) of one process, zombies included; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces and parentheses
    return fields[0], (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (its threads included); 0.0 if it is gone."""
    got = stat(pid)
    return 0.0 if got is None else got[1]


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, from getrusage (finer than /proc's clock ticks)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def alive(pid: int) -> bool:
    """True while `pid` runs: it has a /proc entry and is not a zombie."""
    got = stat(pid)
    return got is not None and got[0] != "Z"


def memory_kb(pid: int) -> tuple[int, int] | None:
    """(VmHWM, VmRSS) of one process in kB; None if it is gone or has no memory left (a zombie)."""
    hwm, rss = 0, None
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return None if rss is None else (hwm, rss)


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory (VmHWM) of one process's life so far, in MB; 0.0 if it is gone or a zombie."""
    memory = memory_kb(pid)
    return 0.0 if memory is None else memory[0] / 1024


def program(pid: int, programs: tuple[str, ...] = ()) -> str:
    """What one process runs, to group processes by: the first of its first four arguments whose basename
    starts with one of `programs` (a console script started as `python /venv/bin/flwr-clientapp ...` is named
    by the script), else the module of `python -m MODULE`, else its executable's basename; "?" if unreadable."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as fh:
        argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        for arg in argv[:4]:
            base = os.path.basename(arg)
            if base.startswith(programs):
                return base
        if "-m" in argv[:-1]:
            return argv[argv.index("-m") + 1]
        return os.path.basename(argv[0]) if argv else "?"
    return "?"


# --------------------------------------------------------------------------- process trees, sampled


@dataclass
class Usage:
    """CPU and memory of one group of process trees, as a `Sampler` saw them."""

    cpu: dict[int, float] = field(default_factory=dict)  # pid -> last CPU seconds seen
    hwm: dict[int, int] = field(default_factory=dict)  # pid -> largest VmHWM (kB) seen
    names: dict[int, str] = field(default_factory=dict)  # pid -> `program`, read when first seen
    series: list[tuple[float, float]] = field(default_factory=list)  # (time, total CPU seconds), one per sample
    rss_peak_kb: int = 0  # the largest sum of VmRSS over the live processes in one sample
    processes_peak: int = 0  # the most live processes (zombies not counted) in one sample

    def cpu_s(self) -> float:
        """CPU seconds of every process seen, the ones gone included."""
        return sum(self.cpu.values())

    def peak_rss_mb(self) -> float:
        """The sum of every process's VmHWM: a bound on the group's peak, which its processes may not share."""
        return sum(self.hwm.values()) / 1024

    def cpu_at(self, t: float) -> float:
        """Total CPU seconds at time t, from the nearest sample at or before it."""
        i = bisect.bisect_right([s[0] for s in self.series], t) - 1
        return self.series[i][1] if i >= 0 else 0.0

    def by_process(self) -> dict[str, dict[str, float]]:
        """Per program name: how many processes, their CPU seconds and their summed VmHWM (MB)."""
        out: dict[str, dict[str, float]] = {}
        for pid, cpu in self.cpu.items():
            if self.names.get(pid, "?") == "?" and cpu == 0:
                continue  # gone before it could be read
            entry = out.setdefault(self.names.get(pid, "?"), {"count": 0, "cpu_s": 0.0, "peak_rss_mb": 0.0})
            entry["count"] += 1
            entry["cpu_s"] = round(entry["cpu_s"] + cpu, 2)
            entry["peak_rss_mb"] = round(entry["peak_rss_mb"] + self.hwm.get(pid, 0) / 1024, 1)
        return out


class Sampler:
    """Samples named groups of process trees every `interval` seconds in a thread (a pid may be in several).

    Use it as a context manager (the thread runs inside it); `watch` adds a tree's root to a group and samples
    at once; `sample` samples now (e.g. to read a child's final CPU from its zombie before reaping it).
    `programs`: name prefixes `program` looks for in a process's arguments.
    """

    def __init__(self, interval: float = 0.2, programs: tuple[str, ...] = ()) -> None:
        self.interval, self.programs = interval, programs
        self.groups: dict[str, list[int]] = {}
        self.usage: dict[str, Usage] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)

    def watch(self, group: str, pid: int) -> None:
        with self._lock:
            self.groups.setdefault(group, []).append(pid)
            self.usage.setdefault(group, Usage())
        self.sample()

    def sample(self) -> None:
        with self._lock:
            now = time.time()
            for group, roots in self.groups.items():
                usage, rss_kb, live = self.usage[group], 0, 0
                for root in roots:
                    for pid in tree(root):
                        got = stat(pid)
                        if got is None:
                            continue
                        if pid not in usage.names:
                            usage.names[pid] = program(pid, self.programs)
                        usage.cpu[pid] = max(got[1], usage.cpu.get(pid, 0.0))
                        memory = memory_kb(pid)
                        if memory is not None:
                            usage.hwm[pid] = max(memory[0], usage.hwm.get(pid, 0))
                            rss_kb, live = rss_kb + memory[1], live + 1
                usage.rss_peak_kb = max(usage.rss_peak_kb, rss_kb)
                usage.processes_peak = max(usage.processes_peak, live)
                usage.series.append((now, usage.cpu_s()))

    def names(self, group: str) -> dict[int, str]:
        """pid -> program of every process seen in `group` so far."""
        with self._lock:
            return dict(self.usage[group].names) if group in self.usage else {}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
