"""The auditor starts no check while this gateway's city epoch runs (`hold`), and catches up once it ends."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import SimpleNamespace

from gateway.blob_exchange import Fetched
from gateway.city_audit import CityAuditor
from ledger.kinds import AGGREGATE

PEER = "peer-gateway"


@dataclass
class FakeLedger:
    """What the auditor reads: one peer aggregate arrives; members are this gateway and the peer."""

    vertices: list = field(default_factory=list)

    def arrived_since(self, mark, *kinds):
        if mark < len(self.vertices):
            return self.vertices[mark + 1 if mark >= 0 else 0:], len(self.vertices) - 1
        return [], mark

    def speaks_as(self, creator):
        return creator

    def member_ids(self):
        return {"k1": "me", "k2": PEER}


class FakeBlobs:
    """Records every fetch; nothing is at hand (so a check ends as missing inputs, retried)."""

    settings = SimpleNamespace(fetch_timeout_s=1.0)

    def __init__(self) -> None:
        self.fetches: list[tuple[bytes, float]] = []

    def fetch(self, digest, holders, tag):
        self.fetches.append((digest, time.monotonic()))
        future: Future = Future()
        future.set_result(Fetched(digest, None, "not at hand", None))
        return future


def aggregate_vertex() -> SimpleNamespace:
    body = {"round": 1, "strategy": "FedAvg", "base": b"\x01" * 32, "inputs": [], "output": b"\x02" * 32}
    return SimpleNamespace(kind=AGGREGATE, creator=PEER, body=body, id=b"\x03" * 32, id_hex="03" * 32)


def test_no_check_starts_while_the_epoch_holds_the_auditor_and_the_check_follows_the_epoch():
    ledger, blobs, holding = FakeLedger(), FakeBlobs(), threading.Event()
    holding.set()
    auditor = CityAuditor(ledger, "me", {"me"}, blobs, 1.0, lambda: 1, 100_000, hold=holding.is_set)
    try:
        ledger.vertices.append(aggregate_vertex())
        deadline = time.monotonic() + 10
        while auditor.report()["pending"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert auditor.report()["pending"] == 1  # taken in ...
        time.sleep(1.0)
        assert blobs.fetches == []  # ... but not fetched or recomputed while the epoch runs
        released = time.monotonic()
        holding.clear()
        while not blobs.fetches and time.monotonic() < deadline:
            time.sleep(0.02)
        assert blobs.fetches and blobs.fetches[0][1] >= released
        assert blobs.fetches[0][0] == b"\x01" * 32  # the aggregate's base model, from the peer
    finally:
        auditor.close()
