"""The sampler: reads the device's sensors at a steady rate into the sample store, on its own thread.

    with Sampler(sensors, store, rate_hz=50.0) as sampler:
        ...                       # training, MQTT, power-saving: sampling goes on regardless
    sampler.counters              # samples written, failed reads per sensor, late ticks

One row per tick holds every sensor's channels side by side, in config
order. A sensor slower than the sampler (a BME280 at 1 Hz beside an IMU at
50 Hz) is read at its own rate and its last value is held between reads. A
failed read (or a non-finite value) drops that tick's row, so the store shows
a gap there and no model window is cut across it; the sensor is tried again on the next tick
(a loose wire may come back). Rows are written once per `flush_s` in one
transaction, which keeps SD-card writes few.

It knows nothing about the broker: sampling goes on while the network is
away. Ticks are scheduled on the monotonic clock; a tick that comes too late
(the CPU was busy) is skipped and counted rather than bunched up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from protocol.logs import event

from .sample_store import SampleStore
from .sensors import Sensor

log = logging.getLogger("starling.agent.sampler")

LOG_EVERY_FAILURE = 100  # a failing sensor logs its 1st, 101st, 201st ... failure: greppable, not a flood


@dataclass
class SamplerCounters:
    samples: int = 0  # rows written to the store
    late_ticks: int = 0  # ticks skipped because the thread woke too late for them
    failed_reads: dict[str, int] = field(default_factory=dict)  # sensor name -> failed reads
    failed_writes: int = 0  # batches the store refused (disk full, I/O error): those samples are lost


class Sampler:
    """Reads `sensors` every 1/`rate_hz` s and appends the rows to `store` (see the module docstring)."""

    def __init__(self, sensors: Sequence[Sensor], store: SampleStore, rate_hz: float, flush_s: float = 1.0) -> None:
        channels = sum(len(s.channels) for s in sensors)
        if not sensors or channels != store.channels:
            raise ValueError(f"the sensors give {channels} channels, the sample store holds {store.channels}")
        if not rate_hz > 0:
            raise ValueError("rate_hz must be positive")
        self.sensors, self.store, self.rate_hz, self.flush_s = list(sensors), store, rate_hz, flush_s
        self.channels = tuple(c for s in sensors for c in s.channels)
        self.counters = SamplerCounters()
        self._held: list[np.ndarray | None] = [None] * len(sensors)
        self._next_read = [0.0] * len(sensors)
        self._read_every = [1.0 / min(rate_hz, max(s.rate_hz, 1e-3)) for s in sensors]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-sampler", daemon=True)

    def start(self) -> Sampler:
        event(log, "sampler.start", rate_hz=self.rate_hz, channels=",".join(self.channels))
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        event(log, "sampler.stop", samples=self.counters.samples, late_ticks=self.counters.late_ticks,
              failed_writes=self.counters.failed_writes,
              **{f"failed_{name}": n for name, n in self.counters.failed_reads.items()})

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def read_row(self, now: float) -> list[np.ndarray] | None:
        """Each sensor's latest sample, or None when a read failed (the tick becomes a gap).

        No checks or conversions here: after a sleep every numpy call costs ~25x its warm price,
        so rows are checked in bulk when flushed.
        """
        for i, sensor in enumerate(self.sensors):
            if self._held[i] is None or now >= self._next_read[i]:
                try:
                    self._held[i] = sensor.read()
                except Exception as exc:  # SensorError, the bus's OSError (EIO), or a driver's bug: a gap, no crash
                    self._failed(sensor.name, exc)
                    self._held[i] = None
                    return None
                self._next_read[i] = now + self._read_every[i]
        return list(self._held)

    def _failed(self, name: str, exc: BaseException | str, count: int = 1) -> None:
        before = self.counters.failed_reads.get(name, 0)
        self.counters.failed_reads[name] = before + count
        if before // LOG_EVERY_FAILURE != (before + count) // LOG_EVERY_FAILURE or before == 0:
            event(log, "sensor.failed", logging.WARNING, sensor=name, failures=before + count, reason=str(exc))

    def _checked(self, times: list[float], rows: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """The rows as one [n, channels] array, without those where a sensor gave a wrong or non-finite value."""
        keep = np.ones(len(rows), dtype=bool)
        columns = []
        for i, sensor in enumerate(self.sensors):
            width = len(sensor.channels)
            try:
                part = np.array([row[i] for row in rows], dtype=np.float32).reshape(len(rows), width)
            except ValueError:  # a driver returned the wrong number of values
                self._failed(sensor.name, f"{sensor.name}: a read did not give {width} values", len(rows))
                return np.empty(0), np.empty((0, self.store.channels), np.float32)
            finite = np.isfinite(part).all(axis=1)
            if not finite.all():
                self._failed(sensor.name, f"{sensor.name}: non-finite values", int((~finite).sum()))
            keep &= finite
            columns.append(part)
        return np.asarray(times)[keep], np.concatenate(columns, axis=1)[keep]

    def _flush(self, times: list[float], rows: list[list[np.ndarray]]) -> None:
        if not rows:
            return
        stamps, values = self._checked(times, rows)
        if not len(values):
            return
        try:
            self.store.append_many(stamps, values)
            self.counters.samples += len(values)
        except Exception as exc:  # a full or failing disk costs these samples, never the sampler
            self.counters.failed_writes += 1
            event(log, "sampler.write_failed", logging.ERROR, samples=len(values), reason=str(exc))

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        times: list[float] = []
        rows: list[list[np.ndarray]] = []
        tick = time.monotonic()
        last_flush = tick
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now - tick > period:  # woke too late: skip the missed ticks, keep the grid
                    missed = int((now - tick) / period)
                    self.counters.late_ticks += missed
                    tick += missed * period
                row = self.read_row(now)
                if row is not None:
                    times.append(time.time())
                    rows.append(row)
                if now - last_flush >= self.flush_s:
                    self._flush(times, rows)
                    times, rows, last_flush = [], [], now
                tick += period
                # time.sleep, not Event.wait: at 50 Hz a timed Event.wait alone cost 0.5 % of a core;
                # stopping waits at most one period.
                time.sleep(max(0.0, tick - time.monotonic()))
        finally:
            self._flush(times, rows)
