"""CPU per reply by stage, inside a gateway process: off unless `STARLING_INGEST_PROFILE` names a file.

    STARLING_INGEST_PROFILE=/tmp/profile.json starling-gateway run ...

With it set, the reply path adds up the CPU time (`time.thread_time`, the
calling thread's own, so time spent waiting for the GIL or the disk does not
count as work) of each stage:

    stage1.decode         envelope bytes -> Envelope (strict CBOR: scan, decode, canonical re-encode)
    stage1.checks         type, sender, gateway, enrolled/revoked, Reply body
    stage1.verify         the Ed25519 signature and the attachment's SHA-256
    stage1.update_check   the update's own strict CBOR and tensor checks
    stage2.admit          the round book's stage 2 (match to an open task) and its bookkeeping
    journal               the SQLite transaction of a batch (its CPU; `wall_us` has its wall time, fsync too)
    receipt.sign          building and signing the receipts
    receipt.publish       handing the receipts to paho (the socket write, when paho does it at once)
    notes                 status counts and log lines

and, over the same time, the CPU of each of the process's threads by name (paho's network thread reads
the sockets, parses the MQTT packets and sends the PUBACKs and queued publishes). The totals are taken
and written, as JSON, to the named file every SNAPSHOT_S while replies flow (a plain write: it is a
measurement, not state; threads' and the process's CPU may include up to SNAPSHOT_S of what followed the
last reply); ingest workers write theirs beside it (`<name>-worker<i>.json`).

Disabled (the default), `PROFILE` is None and the reply path pays one `is None` test per stage.
"""

from __future__ import annotations

import json
import os
import re
import resource
import threading
import time
from pathlib import Path

PROFILE_ENV = "STARLING_INGEST_PROFILE"
SNAPSHOT_S = 0.05  # how often the totals are looked at, and taken and written when replies went through
STAGES = ("stage1.decode", "stage1.checks", "stage1.verify", "stage1.update_check", "stage2.admit", "journal",
          "receipt.sign", "receipt.publish", "notes")


def _thread_cpu(ident: int) -> float:
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except (OSError, AttributeError):  # the thread ended, or no per-thread clocks here
        return 0.0


class StageProfile:
    """Seconds of CPU per stage, replies counted, and per-thread CPU since the first reply."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.wall: dict[str, float] = {}  # wall-clock seconds of stages that wait (the journal's fsync)
        self.replies = 0
        self.thread = 0  # the ident of the thread that handles replies (the gateway's worker)
        self._start_threads: dict[int, tuple[str, float]] | None = None
        self._start_process = 0.0
        self._start_wall = 0.0
        self._last: dict | None = None  # the newest snapshot (`report`), what `write` writes
        self._written: dict | None = None
        self._writer: threading.Thread | None = None

    now = staticmethod(time.thread_time)

    def add(self, stage: str, since: float) -> float:
        """Charge the CPU since `since` (a `now()`) to `stage`; return `now()` for the next stage."""
        t = time.thread_time()
        self.seconds[stage] += t - since
        return t

    def add_wall(self, stage: str, seconds: float) -> None:
        self.wall[stage] = self.wall.get(stage, 0.0) + seconds

    def begin(self) -> None:
        """The first reply arrived: the per-thread and process CPU counts start here."""
        if self._start_threads is None:
            self.seconds = dict.fromkeys(STAGES, 0.0)  # tasks and enrollments published before do not count
            self.wall = {}
            self._start_threads = {t.ident: (t.name, _thread_cpu(t.ident)) for t in threading.enumerate()
                                   if t.ident is not None}
            self._start_process = _process_cpu()
            self._start_wall = time.monotonic()

    def counted(self, replies: int) -> None:
        """`replies` more went through. A daemon thread looks every SNAPSHOT_S: when more replies went
        through since it last looked, it takes the totals and writes them, so what comes long after the
        last reply (a round's aggregation, the shutdown) does not count."""
        self.replies += replies
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_now_and_then, name="ingest-profile", daemon=True)
            self._writer.start()

    def _write_now_and_then(self) -> None:
        while True:
            time.sleep(SNAPSHOT_S)
            if self._last is None or self._last["replies"] != self.replies:
                self._last = self.report()
                try:
                    self.write()
                except OSError:  # the folder is gone (the run is over): nothing more to say
                    return

    def report(self) -> dict:
        """Microseconds of CPU per reply: by stage, by thread (names with their numbers folded), in all."""
        n = max(1, self.replies)
        threads: dict[str, float] = {}
        start = self._start_threads or {}
        for t in threading.enumerate():
            if t.ident is None:
                continue
            name = _thread_kind(t.name)
            threads[name] = threads.get(name, 0.0) + _thread_cpu(t.ident) - start.get(t.ident, ("", 0.0))[1]
        return {
            "replies": self.replies,
            "wall_s": round(time.monotonic() - self._start_wall, 3),
            "stages_us": {k: round(v / n * 1e6, 1) for k, v in self.seconds.items()},
            "wall_us": {k: round(v / n * 1e6, 1) for k, v in self.wall.items()},
            "stages_total_us": round(sum(self.seconds.values()) / n * 1e6, 1),
            "threads_us": {k: round(v / n * 1e6, 1) for k, v in sorted(threads.items(), key=lambda kv: -kv[1])
                           if v > 0},
            "process_us": round((_process_cpu() - self._start_process) / n * 1e6, 1),
        }

    def write(self) -> None:
        """Write the newest snapshot (one is taken if there is none yet)."""
        last = self._last if self._last is not None else self.report()
        if last is self._written:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(last))
        os.replace(tmp, self.path)
        self._written = last


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _thread_kind(name: str) -> str:
    """`paho-mqtt-client-gw-ab12...` -> `paho-mqtt-client-gw-<id>`; `Thread-7 (run)` -> `Thread (run)`."""
    name = re.sub(r"[0-9a-f]{16,}", "<id>", name)
    if name.startswith("Thread-"):
        _, _, rest = name.partition(" ")
        return f"Thread {rest}".strip()
    return name


def from_env() -> StageProfile | None:
    path = os.environ.get(PROFILE_ENV)
    return StageProfile(Path(path)) if path else None


PROFILE: StageProfile | None = from_env()
