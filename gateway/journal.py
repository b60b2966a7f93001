"""The gateway's journal (`<state_dir>/rounds.db`): what must survive a crash, a stop or an upgrade.

An accepted reply is written here (and committed, `synchronous=FULL`) before
its receipt is sent: once a device hears "accepted" it forgets the reply, so
from then on this journal is the only copy. Each global model release is
written here, with its parent, before it is published. With both, a gateway
killed mid-round (`kill -9`, power cut) or stopped (SIGTERM) restarts from its
last release and re-opens the round it left: same task ids (devices' pending
replies still match), same selected devices, the accepted replies restored,
the others re-tasked; and no round's updates are written to the ledger twice.

`Journal` is the database (one connection, its pragmas, one `atomic()`
transaction idiom, registered migrations: sqlite-utils `Migrations`); the
table objects read and write it:

    Exchanges     exchange  a training exchange: task id, lineage, round, base digest, selected nodes, the
                            task config its devices got, closed (no more replies), recorded (its updates
                            are on the ledger), finished (aggregated: the round's release, if any, is written),
                            buffered (one device's task of a buffered run, gateway/buffered.py: many are
                            unfinished at once, on several bases, and a restart keeps them all)
                  accepted  (task id, device id) -> the reply's wire bytes (an update, or a signed skip)
    RoundHistory  round_record  (lineage, round) -> the round's record (JSON), for status and result.json
    lineage.py    lineage, release, model, strategy_state: the chain of released models

Migrations are registered below, oldest first; each runs once, in a transaction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from . import ingest_profile

BUSY_TIMEOUT_S = 10.0
HISTORY_KEPT = 10_000  # round records kept per lineage (a round a minute is a week of them)
PAGE_SIZE = 65536  # of a journal created from now on (SQLite's largest); older files keep theirs
EXCHANGES_KEPT = 2  # finished training exchanges kept (their replies only matter until aggregated)

MIGRATIONS = Migrations("starling-gateway-journal")


@MIGRATIONS(name="001_rounds")
def _rounds(db: Database) -> None:
    """The journal as the first gateways wrote it (kept so their files upgrade through 002)."""
    for statement in (
        "create table if not exists run (id integer primary key check (id = 1), tag text not null, "
        "strategy text not null, num_rounds integer not null, status text not null)",
        "create table if not exists exchange (task text primary key, round integer not null, base blob not null, "
        "nodes text not null, closed integer not null default 0, recorded integer not null default 0)",
        "create table if not exists accepted (task text not null, device text not null, reply blob not null, "
        "primary key (task, device))",
        "create table if not exists model (digest blob primary key, data blob not null, added integer not null)",
        "create table if not exists history (round integer primary key, record text not null)",
    ):
        db.execute(statement)


@MIGRATIONS(name="002_lineage")
def _lineage(db: Database) -> None:
    """Continuous operation: exchanges and round records belong to a model lineage; releases are kept.

    A file written by the first gateways holds one run: it becomes lineage 1 (lineage.py adopts its
    newest model as that lineage's first release). Of its exchanges only the newest of an unfinished
    run can still be resumed.
    """
    running = db.execute("select 1 from run where status = 'running'").fetchone() is not None
    db.execute("alter table exchange add column lineage integer not null default 1")
    db.execute("alter table exchange add column finished integer not null default 1")
    if running:
        db.execute("update exchange set finished = 0 where round = (select max(round) from exchange)")
    db.execute("create table round_record (lineage integer not null, round integer not null, record text not null, "
               "primary key (lineage, round))")
    db.execute("insert into round_record select 1, round, record from history")
    db.execute("drop table history")
    db.execute("drop table run")
    db.execute("create table lineage (id integer primary key, root blob not null, version integer not null, "
               "reason text not null, previous blob not null, architecture text not null, started real not null, "
               "on_ledger integer not null default 0)")
    db.execute("create table release (version integer primary key, digest blob not null, lineage integer not null, "
               "round integer not null, parent blob not null, size integer not null, strategy text not null, "
               "config text not null, inputs text not null, time real not null, step integer not null, "
               "on_ledger integer not null default 0)")
    db.execute("create index release_digest on release (digest)")
    db.execute("create table strategy_state (version integer primary key, data blob not null)")


@MIGRATIONS(name="003_exchange_config")
def _exchange_config(db: Database) -> None:
    """The task config an exchange's devices got: a re-opened round asks the rest of them for the same,
    and its release records what its updates were trained with."""
    db.execute("alter table exchange add column config text not null default '{}'")


@MIGRATIONS(name="004_buffered")
def _buffered(db: Database) -> None:
    """Buffered rounds (gateway/buffered.py): their exchanges are told apart, since a restart resumes every
    unfinished one of them, not only the newest."""
    db.execute("alter table exchange add column buffered integer not null default 0")


@MIGRATIONS(name="005_release_delta")
def _release_delta(db: Database) -> None:
    """The head's delta from its parent ([training] download): a restarted gateway publishes its head with it,
    so devices holding the parent download the step, not the whole model. Only the newest step's is kept."""
    db.execute("create table release_delta (version integer primary key, base blob not null, codec text not null, "
               "data blob not null)")


class Journal:
    """The database: one connection shared by the gateway's threads under one lock.

    `with journal.atomic():` is one transaction (nested blocks are savepoints); every write goes
    through it, so a crash leaves each step either done or not done.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        self.db = Database(conn, execute_plugins=False)
        if conn.execute("pragma page_count").fetchone()[0] == 0:  # a new file: only now can its page size be set
            # A reply is ~10 KB and more: on 4 KB pages each one is a chain of overflow pages, which costs
            # the journal 2-3x the CPU and write time of 64 KB pages (bench/gateway_ingest.py's profile).
            conn.execute(f"pragma page_size={PAGE_SIZE}")
        self.db.enable_wal()
        self.db.execute("pragma synchronous=full")  # "accepted" is a promise: it must reach the disk
        MIGRATIONS.apply(self.db)
        self.exchanges = Exchanges(self)
        self.history = RoundHistory(self)

    @contextmanager
    def atomic(self) -> Iterator[Database]:
        with self._lock, self.db.atomic():
            yield self.db

    def read(self, sql: str, *args) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self.db.close()


@dataclass(frozen=True)
class Interrupted:
    """A training exchange a crash or a stop left unfinished: what its round needs to re-open."""

    task: str
    lineage: int
    round: int
    base: bytes
    nodes: list[int]
    replies: list[bytes]  # accepted replies (and signed skips), as they arrived
    closed: bool  # it had closed: only the replies it had then count
    recorded: bool  # its updates are on the ledger already
    config: dict = field(default_factory=dict)  # the task config its devices got (TrainConfig wire, no deadline)


class Exchanges:
    """Training exchanges and their accepted replies (the round book writes them)."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def open(self, task: str, lineage: int, round_: int, base: bytes, nodes: list[int], config: dict | None = None,
             buffered: bool = False) -> None:
        with self._journal.atomic() as db:
            db.execute("insert or ignore into exchange (task, lineage, round, base, nodes, config, finished, buffered) "
                       "values (?, ?, ?, ?, ?, ?, 0, ?)",
                       [task, lineage, round_, base, json.dumps(sorted(nodes)), json.dumps(config or {}, sort_keys=True),
                        int(buffered)])

    def accept_many(self, rows: list[tuple[str, str, bytes]]) -> None:
        """Journal accepted replies (task, device, wire bytes) in one transaction: one fsync for the batch."""
        if rows:
            profile = ingest_profile.PROFILE
            t, wall = (profile.now(), time.perf_counter()) if profile is not None else (0.0, 0.0)
            with self._journal.atomic() as db:
                db.conn.executemany("insert or ignore into accepted values (?, ?, ?)", rows)
            if profile is not None:
                profile.add("journal", t)
                profile.add_wall("journal", time.perf_counter() - wall)

    def close(self, task: str) -> None:
        with self._journal.atomic() as db:
            db.execute("update exchange set closed = 1 where task = ?", [task])

    def mark_recorded(self, task: str) -> None:
        with self._journal.atomic() as db:
            db.execute("update exchange set recorded = 1 where task = ?", [task])

    def is_recorded(self, task: str) -> bool:
        rows = self._journal.read("select recorded from exchange where task = ?", task)
        return bool(rows and rows[0][0])

    def finish(self, task: str) -> None:
        """The exchange is aggregated (called inside the transaction that writes the round's release)."""
        with self._journal.atomic() as db:
            db.execute("update exchange set finished = 1 where task = ?", [task])

    def prune(self) -> None:
        """Drop the replies of all but the newest finished exchanges: they only matter until aggregated, and
        a round of a big fleet holds many megabytes of them. (Off the round's critical path.)"""
        with self._journal.atomic() as db:
            old = [r[0] for r in db.execute("select task from exchange where finished = 1 order by round desc, "
                                             "rowid desc limit -1 offset ?", [EXCHANGES_KEPT]).fetchall()]
            for name in old:
                db.execute("delete from accepted where task = ?", [name])
                db.execute("delete from exchange where task = ?", [name])

    def interrupted(self, lineage: int, base: bytes) -> Interrupted | None:
        """The newest unfinished training exchange of `lineage` built on `base` (the lineage's head).

        Unfinished exchanges on another base (an older model, another lineage) can never be resumed:
        they are marked finished here.
        """
        with self._journal.atomic() as db:
            rows = db.execute("select task, lineage, round, base, nodes, closed, recorded, config from exchange "
                              "where finished = 0 and buffered = 0 order by round desc, rowid desc").fetchall()
            resumable = [r for r in rows if r[1] == lineage and r[3] == base]
            for row in rows:
                if not resumable or row[0] != resumable[0][0]:
                    db.execute("update exchange set finished = 1 where task = ?", [row[0]])
            if not resumable:
                return None
            task, lineage_, round_, base_, nodes, closed, recorded, config = resumable[0]
            replies = [r[0] for r in db.execute("select reply from accepted where task = ?", [task]).fetchall()]
        return Interrupted(task, lineage_, round_, base_, json.loads(nodes), replies, bool(closed), bool(recorded),
                           json.loads(config))

    def buffered(self, lineage: int) -> list[Interrupted]:
        """Every unfinished buffered exchange of `lineage`, oldest first, with its journaled replies: what a
        buffered run had accepted but not aggregated yet when it stopped. Those of other lineages can never
        be aggregated: they are marked finished here."""
        with self._journal.atomic() as db:
            db.execute("update exchange set finished = 1 where finished = 0 and buffered = 1 and lineage != ?",
                       [lineage])
            rows = db.execute("select task, lineage, round, base, nodes, closed, recorded, config from exchange "
                              "where finished = 0 and buffered = 1 and lineage = ? order by round, rowid",
                              [lineage]).fetchall()
            out = []
            for task, lineage_, round_, base, nodes, closed, recorded, config in rows:
                replies = [r[0] for r in db.execute("select reply from accepted where task = ?", [task]).fetchall()]
                out.append(Interrupted(task, lineage_, round_, base, json.loads(nodes), replies, bool(closed),
                                       bool(recorded), json.loads(config)))
        return out

    def last_round(self, lineage: int) -> int:
        rows = self._journal.read("select max(round) from exchange where lineage = ?", lineage)
        return rows[0][0] if rows and rows[0][0] is not None else -1


class RoundHistory:
    """Each round's record, per lineage: a restarted gateway reports the rounds before it."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def record(self, lineage: int, round_: int, record: dict) -> None:
        with self._journal.atomic() as db:
            db.execute("insert or replace into round_record values (?, ?, ?)", [lineage, round_, json.dumps(record)])
            db.execute("delete from round_record where lineage = ? and round <= ?", [lineage, round_ - HISTORY_KEPT])

    def rounds(self, lineage: int, last: int = HISTORY_KEPT) -> list[dict]:
        """The newest `last` round records of `lineage`, oldest first."""
        rows = self._journal.read("select record from round_record where lineage = ? order by round desc limit ?",
                                  lineage, last)
        return [json.loads(r[0]) for r in reversed(rows)]

    def last_round(self, lineage: int) -> int:
        rows = self._journal.read("select max(round) from round_record where lineage = ?", lineage)
        return rows[0][0] if rows and rows[0][0] is not None else -1
