"""The device's bounded sample store: a ring buffer of sensor samples in SQLite.

    with SampleStore(state_dir / "samples.db", channels=6, capacity=200_000) as store:
        store.append_many(times, values)            # one transaction per batch
        windows = store.windows(length=128, stride=64)

Samples are (time, float32 values) rows, appended in time order. After every
append the oldest rows beyond `capacity`, and the oldest rows up to the first
one within `retention_s`, are deleted in the same transaction, so the file
stays bounded however long the device runs offline.
`windows` cuts the newest samples into model windows and never lets a window
straddle a gap (the sensor stopped, the device was off): a gap is a step of
more than `max_gap_s` between two samples.

Plain sqlite3 (WAL, synchronous=NORMAL: losing the last batch to a power cut
costs samples, never the file), no other dependency: it runs on the device.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

SCHEMA = "create table if not exists samples (seq integer primary key, t real not null, v blob not null)"


class SampleStore:
    def __init__(self, path: str | Path, channels: int, capacity: int = 200_000,
                 retention_s: float = 7 * 86400.0) -> None:
        if channels < 1 or capacity < 1 or retention_s <= 0:
            raise ValueError("channels and capacity must be at least 1, retention_s positive")
        self.path, self.channels, self.capacity, self.retention_s = Path(path), channels, capacity, retention_s
        self._lock = threading.Lock()  # the sampler appends while the learner reads windows
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=normal")
        self._db.execute(SCHEMA)

    def append(self, t: float, values: np.ndarray) -> None:
        self.append_many(np.array([t]), np.asarray(values, dtype=np.float32).reshape(1, -1))

    def append_many(self, times: np.ndarray, values: np.ndarray) -> None:
        """Add samples (times [n], values [n, channels]); drop what is beyond capacity or retention."""
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] != self.channels or len(times) != len(values):
            raise ValueError(f"expected {len(times)} samples of {self.channels} channels, got {values.shape}")
        if not np.all(np.isfinite(values)):
            raise ValueError("samples must be finite")
        rows = [(float(t), v.tobytes()) for t, v in zip(times, values)]
        with self._lock:
            self._db.execute("begin immediate")
            try:
                self._db.executemany("insert into samples (t, v) values (?, ?)", rows)
                self._db.execute("delete from samples where seq <= (select max(seq) from samples) - ?",
                                 (self.capacity,))
                # Rows arrive in time order: scan from the oldest and stop at the first one young enough,
                # instead of reading the whole table (which cost a 50 Hz device 1 % CPU at 120k rows).
                self._db.execute("delete from samples where seq < coalesce((select seq from samples where t >= ? "
                                 "order by seq limit 1), (select max(seq) + 1 from samples))",
                                 (time.time() - self.retention_s,))
            except BaseException:
                self._db.execute("rollback")
                raise
            self._db.execute("commit")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("select count(*) from samples").fetchone()[0]

    def latest(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The newest `count` samples, oldest first: (times [n], values [n, channels])."""
        times = np.empty(count, dtype=np.float64)
        values = np.empty((count, self.channels), dtype=np.float32)
        n = 0
        with self._lock:
            cursor = self._db.execute("select t, v from samples order by seq desc limit ?", (count,))
            # In chunks: a device must not hold tens of thousands of row tuples at once (it cost 10 MB).
            while rows := cursor.fetchmany(4096):
                times[n:n + len(rows)] = [t for t, _ in rows]
                values[n:n + len(rows)] = np.frombuffer(b"".join(v for _, v in rows), np.float32).reshape(
                    len(rows), self.channels)
                n += len(rows)
        return times[:n][::-1].copy(), values[:n][::-1].copy()

    def windows(self, length: int = 128, stride: int = 64, max_windows: int = 1000,
                max_gap_s: float = 1.0) -> np.ndarray:
        """Up to `max_windows` of the newest windows [n, length, channels], none across a gap."""
        return self.windows_with_times(length, stride, max_windows, max_gap_s)[0]

    def windows_with_times(self, length: int = 128, stride: int = 64, max_windows: int = 1000,
                           max_gap_s: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As `windows`, with each window's first and last sample time: (windows, starts, ends), oldest first."""
        times, values = self.latest(max_windows * stride + length)
        firsts: list[int] = []
        breaks = np.flatnonzero(np.diff(times) > max_gap_s) + 1
        for run in np.split(np.arange(len(times)), breaks):
            firsts.extend(int(run[start]) for start in range(0, len(run) - length + 1, stride))
        firsts = firsts[-max_windows:]
        if not firsts:
            return np.empty((0, length, self.channels), np.float32), np.empty(0), np.empty(0)
        index = np.asarray(firsts)[:, None] + np.arange(length)
        return values[index], times[index[:, 0]], times[index[:, -1]]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
