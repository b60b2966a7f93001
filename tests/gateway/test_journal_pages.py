"""The journal's page size: 64 KB for a new file (a ~10 KB reply is no chain of overflow pages), and
a journal written before keeps its own, with everything in it."""

from __future__ import annotations

import sqlite3

from gateway.journal import PAGE_SIZE, Journal


def page_size(journal: Journal) -> int:
    return journal.db.execute("pragma page_size").fetchone()[0]


def test_a_new_journal_has_large_pages_and_stays_in_wal_with_full_sync(tmp_path):
    journal = Journal(tmp_path / "rounds.db")
    try:
        assert page_size(journal) == PAGE_SIZE == 65536
        assert journal.db.execute("pragma journal_mode").fetchone()[0] == "wal"
        assert journal.db.execute("pragma synchronous").fetchone()[0] == 2  # FULL: "accepted" reaches the disk
        journal.exchanges.open("t", 1, 0, b"\0" * 32, [1])
        journal.exchanges.accept_many([("t", "d", b"x" * 10_000)])
    finally:
        journal.close()
    again = Journal(tmp_path / "rounds.db")
    try:
        assert page_size(again) == PAGE_SIZE
        assert again.read("select reply from accepted") == [(b"x" * 10_000,)]
    finally:
        again.close()


def test_a_journal_written_with_small_pages_keeps_them_and_its_replies(tmp_path):
    path = tmp_path / "rounds.db"
    conn = sqlite3.connect(path)  # as SQLite's default made it for older gateways
    conn.execute("pragma page_size=4096")
    conn.execute("create table keep (x)")
    conn.commit()
    conn.close()
    journal = Journal(path)
    try:
        assert page_size(journal) == 4096
        journal.exchanges.open("t", 1, 0, b"\0" * 32, [1])
        journal.exchanges.accept_many([("t", "d", b"y" * 10_000)])
        assert journal.read("select reply from accepted") == [(b"y" * 10_000,)]
    finally:
        journal.close()
