"""The gateway's round journal: what must survive a crash, in SQLite.

An accepted reply is written here (and committed, `synchronous=FULL`)
before its receipt is sent: once a device hears "accepted" it forgets the
reply, so from then on this journal is the only copy. With it, a gateway
killed mid-round (`kill -9`, power cut) restarts into the same round: same
run tag and task ids (devices' pending replies still match), same selected
devices, the already-accepted replies restored, the others re-tasked; and a
round whose updates were already written to the ledger is not written again.

Tables:
    run        one row: run tag, strategy, rounds, status ("running" / "done")
    exchange   a training exchange: task id, round, base digest, selected nodes, closed, recorded
    accepted   (task id, device id) -> the reply's wire bytes (an accepted update, or a signed skip)
    model      digest -> model bytes, for the bases of open rounds
    history    round -> its RoundRecord (JSON), so a resumed run reports the rounds before the crash
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
create table if not exists run (id integer primary key check (id = 1), tag text not null, strategy text not null,
    num_rounds integer not null, status text not null);
create table if not exists exchange (task text primary key, round integer not null, base blob not null,
    nodes text not null, closed integer not null default 0, recorded integer not null default 0);
create table if not exists accepted (task text not null, device text not null, reply blob not null,
    primary key (task, device));
create table if not exists model (digest blob primary key, data blob not null, added integer not null);
create table if not exists history (round integer primary key, record text not null);
"""


@dataclass(frozen=True)
class Resume:
    """Where an unfinished run stopped: its last training exchange."""

    tag: str
    round: int
    task: str
    base: bytes
    model: bytes  # the base model's bytes (schemas.encode_model)
    nodes: list[int]
    replies: list[bytes]
    closed: bool
    recorded: bool


class Journal:
    """One connection, shared by the worker thread (accept) and the round thread (the rest)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=full")  # "accepted" is a promise: it must reach the disk
        self._db.executescript(SCHEMA)

    def _write(self, sql: str, *args) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def resume_point(self, strategy: str, num_rounds: int) -> Resume | None:
        """The last training exchange of an unfinished run of the same strategy, if any."""
        with self._lock:
            run = self._db.execute("select tag, strategy, num_rounds, status from run").fetchone()
            if run is None or run[3] != "running" or run[1] != strategy or run[2] != num_rounds:
                return None
            row = self._db.execute(
                "select task, round, base, nodes, closed, recorded from exchange order by round desc limit 1"
            ).fetchone()
            if row is None:
                return None
            model = self._db.execute("select data from model where digest = ?", (row[2],)).fetchone()
            if model is None:
                return None
            replies = [r[0] for r in self._db.execute("select reply from accepted where task = ?", (row[0],))]
        return Resume(run[0], row[1], row[0], row[2], model[0], json.loads(row[3]), replies, bool(row[4]), bool(row[5]))

    def start_run(self, tag: str, strategy: str, num_rounds: int) -> None:
        with self._lock:
            self._db.execute("begin immediate")
            for table in ("run", "exchange", "accepted", "model", "history"):
                self._db.execute(f"delete from {table}")
            self._db.execute("insert into run values (1, ?, ?, ?, 'running')", (tag, strategy, num_rounds))
            self._db.execute("commit")

    def finish_run(self) -> None:
        self._write("update run set status = 'done'")

    def record_model(self, digest: bytes, data: bytes, keep: int = 3) -> None:
        with self._lock:
            self._db.execute("begin immediate")
            self._db.execute("insert or ignore into model values (?, ?, (select coalesce(max(added), 0) + 1 from model))",
                             (digest, data))
            self._db.execute("delete from model where added <= (select max(added) from model) - ?", (keep,))
            self._db.execute("commit")

    def open_exchange(self, task: str, round_: int, base: bytes, nodes: list[int]) -> None:
        self._write("insert or ignore into exchange (task, round, base, nodes) values (?, ?, ?, ?)",
                    task, round_, base, json.dumps(sorted(nodes)))

    def accept(self, task: str, device: str, reply: bytes) -> None:
        self.accept_many([(task, device, reply)])

    def accept_many(self, rows: list[tuple[str, str, bytes]]) -> None:
        """Journal accepted replies (task, device, wire bytes) in one transaction: one fsync for the batch."""
        if not rows:
            return
        with self._lock:
            self._db.execute("begin immediate")
            try:
                self._db.executemany("insert or ignore into accepted values (?, ?, ?)", rows)
            except BaseException:
                self._db.execute("rollback")
                raise
            self._db.execute("commit")

    def close_exchange(self, task: str) -> None:
        self._write("update exchange set closed = 1 where task = ?", task)

    def mark_recorded(self, task: str) -> None:
        self._write("update exchange set recorded = 1 where task = ?", task)

    def is_recorded(self, task: str) -> bool:
        with self._lock:
            row = self._db.execute("select recorded from exchange where task = ?", (task,)).fetchone()
        return bool(row and row[0])

    def record_round(self, round_: int, record: dict) -> None:
        self._write("insert or replace into history values (?, ?)", round_, json.dumps(record))

    def rounds(self) -> list[dict]:
        """The round records of the current run, in order."""
        with self._lock:
            return [json.loads(r[0]) for r in self._db.execute("select record from history order by round")]

    def close(self) -> None:
        with self._lock:
            self._db.close()
