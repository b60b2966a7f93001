"""`gateway.blob_exchange.BlobExchange`: blobs fetched by digest between gateways through a real Mosquitto.

Each exchange has its own store and connection; "liar" and "attacker" peers are plain `mqttlink`
connections publishing on the blob topics. Timeouts are shortened so that every test takes seconds.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time

import numpy as np
import pytest
from required_tools import needs

from gateway.blob_exchange import BlobExchange, ExchangeSettings
from gateway.blobs import BlobStore
from hw.broker import Broker, find_mosquitto
from mqttlink import Connection, ConnectionOptions
from protocol import cbor, topics
from protocol.blob_messages import MAX_WANT, Absent, Chunk, Want, split
from protocol.digest import sha256
from protocol.keys import Identity

pytestmark = needs(find_mosquitto() is not None, "needs mosquitto (hw/install-system.sh)")

WAIT = 10.0
FAST = ExchangeSettings(fetch_timeout_s=3.0, idle_s=0.4)
_seeds = itertools.count(1)


def node_id() -> str:
    return Identity.from_seed(next(_seeds).to_bytes(32, "big")).id


def blob(n: int, size: int = 600 * 1024) -> bytes:
    return np.random.default_rng(n).bytes(size)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker"), kind="mosquitto") as running:
        yield running


@pytest.fixture
def exchanges(broker, tmp_path):
    """`make(settings=FAST)` starts an exchange with a store of its own; all are closed at the end."""
    made: list[BlobExchange] = []

    def make(settings: ExchangeSettings = FAST) -> BlobExchange:
        ident = node_id()
        exchange = BlobExchange(BlobStore(tmp_path / ident), ident, broker.host, broker.port, settings=settings)
        made.append(exchange.start())
        return exchange

    yield make
    for exchange in made:
        exchange.close()


class RawPeer:
    """A bare connection on the blob topics: what a misbehaving peer or an attacker publishes."""

    def __init__(self, broker, *subscriptions: str) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.conn = Connection(ConnectionOptions(f"raw-{next(_seeds)}", broker.host, broker.port, clean_session=True,
                                                 max_inflight=1000, subscriptions=tuple((s, 1) for s in subscriptions)))
        self.conn.connect()
        assert self.conn.subscribed.wait(WAIT)

    def send(self, topic: str, payload: bytes) -> None:
        self.conn.publish(topic, payload)

    def close(self) -> None:
        self.conn.close()


def test_a_multi_chunk_blob_is_fetched_checked_and_stored(exchanges, caplog):
    holder, requester = exchanges(), exchanges()
    data = blob(1)  # 600 KB: 3 chunks of 256 KB
    digest = holder.store.put(data, tag=7)
    with caplog.at_level(logging.INFO, logger="starling.gateway.blobs"):
        fetched = requester.fetch(digest, [holder.node_id], tag=9).result(WAIT)
    assert fetched.ok and fetched.reason == "ok" and fetched.data == data and fetched.holder == holder.node_id
    assert fetched.tried == ((holder.node_id, "ok"),) and 0 < fetched.seconds < WAIT
    assert requester.store.get(digest) == data and requester.store.tags() == [9]
    assert f"blob.served digest={digest.hex()[:16]} to={requester.node_id} bytes={len(data)} chunks=3" in caplog.text
    assert f"blob.fetched digest={digest.hex()[:16]} holder={holder.node_id}" in caplog.text
    again = requester.fetch(digest, [holder.node_id], tag=10).result(WAIT)
    assert again.reason == "local" and again.data == data and requester.store.tags() == [9, 10]
    assert holder.status()["served"] == 1 and requester.status()["fetched"] == 1
    assert holder.status()["refused"] == {} and requester.status()["refused"] == {}


def test_two_fetches_of_one_digest_share_one_transfer(exchanges):
    holder, requester = exchanges(), exchanges()
    digest = holder.store.put(blob(2), tag=0)
    first, second = (requester.fetch(digest, [holder.node_id], tag=0) for _ in range(2))
    assert first.result(WAIT).ok and second.result(WAIT).data == blob(2)
    assert holder.status()["served"] == 1


def test_a_digest_nobody_holds_ends_with_a_clear_result(exchanges):
    holder, requester = exchanges(), exchanges()
    unknown = sha256(b"never stored anywhere")
    started = time.monotonic()
    missing = requester.fetch(unknown, [holder.node_id], tag=0).result(WAIT)
    assert missing.reason == "missing" and missing.data is None and not missing.ok
    assert missing.tried == ((holder.node_id, "missing"),) and time.monotonic() - started < 1.0  # no waiting
    gone = node_id()  # a holder that is not there: nobody answers
    timed_out = requester.fetch(unknown, [gone], tag=0).result(WAIT)
    assert timed_out.reason == "timeout" and timed_out.tried == ((gone, "timeout"), (gone, "timeout"))
    assert 0.7 < timed_out.seconds < 1.5  # two idle attempts of 0.4 s
    assert not requester.fetch(unknown, [], tag=0).result(WAIT).ok  # no holder to ask: "no_holder"
    assert requester.status()["failed"] == {"missing": 1, "timeout": 1, "no_holder": 1}
    assert not requester.store.has(unknown)


def test_a_silent_holder_is_passed_over_for_the_next(exchanges):
    holder, requester = exchanges(), exchanges()
    digest = holder.store.put(blob(3), tag=0)
    gone = node_id()
    fetched = requester.fetch(digest, [gone, holder.node_id], tag=0).result(WAIT)
    assert fetched.ok and fetched.tried == ((gone, "timeout"), (holder.node_id, "ok"))


def liar(broker, size: int) -> tuple[str, RawPeer, threading.Event]:
    """A peer that answers every want with chunks of the right sizes and the wrong bytes."""
    ident = node_id()
    peer = RawPeer(broker, topics.blob_want(ident))
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                message = peer.conn.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            want = Want.decode(message.payload)
            for digest in want.digests:
                for chunk in split(ident, digest, blob(666, size)):
                    peer.send(topics.blob_give(want.sender), chunk.encode())

    threading.Thread(target=answer, daemon=True).start()
    return ident, peer, stop


def test_wrong_bytes_are_refused_by_the_digest_and_asked_of_another_holder(exchanges, broker):
    holder, requester = exchanges(), exchanges()
    data = blob(4)
    digest = holder.store.put(data, tag=0)
    liar_id, peer, stop = liar(broker, len(data))
    try:
        lied = requester.fetch(digest, [liar_id], tag=0).result(WAIT)
        assert lied.reason == "mismatch" and lied.data is None
        assert lied.tried == ((liar_id, "mismatch"), (liar_id, "mismatch"))
        assert not requester.store.has(digest) and requester.store.status()["blobs"] == 0
        assert requester.status()["refused"]["digest_mismatch"] == 2
        fetched = requester.fetch(digest, [liar_id, holder.node_id], tag=0).result(WAIT)
        assert fetched.ok and fetched.data == data and requester.store.get(digest) == data
        assert fetched.tried == ((liar_id, "mismatch"), (holder.node_id, "ok"))
    finally:
        stop.set()
        peer.close()


def test_chunks_a_third_party_slips_in_cost_one_attempt_at_most(exchanges, broker):
    holder, requester = exchanges(), exchanges()
    data = blob(7)
    digest = holder.store.put(data, tag=0)
    gone = node_id()  # asked first: the forger's chunks arrive while that attempt waits
    attacker = RawPeer(broker)
    try:
        fetching = requester.fetch(digest, [gone, holder.node_id], tag=0)
        while requester.status()["active"] == 0:  # asked `gone` already
            time.sleep(0.005)
        give = topics.blob_give(requester.node_id)
        attacker.send(give, Chunk(gone, digest, 0, 3, len(data), blob(8, 256 * 1024)).encode())  # fixes a size
        attacker.send(give, Chunk(gone, digest, 0, 1, 10, bytes(10)).encode())  # another size: refused
        fetched = fetching.result(WAIT)
    finally:
        attacker.close()
    assert fetched.ok and fetched.data == data and requester.store.get(digest) == data
    assert fetched.tried == ((gone, "timeout"), (holder.node_id, "ok"))  # the next attempt began from nothing
    assert requester.status()["refused"] == {"inconsistent": 1}


def test_a_holder_over_its_serving_budget_says_busy(exchanges):
    holder = exchanges(ExchangeSettings(give_bytes_per_s=1.0, give_burst_bytes=700 * 1024))
    requester = exchanges()
    first, second = holder.store.put(blob(5), 0), holder.store.put(blob(6), 0)
    assert requester.fetch(first, [holder.node_id], tag=0).result(WAIT).ok
    busy = requester.fetch(second, [holder.node_id], tag=0).result(WAIT)
    assert busy.reason == "busy" and busy.tried == ((holder.node_id, "busy"), (holder.node_id, "busy"))
    assert holder.status()["refused"]["busy"] == 2


def test_fetches_are_bounded_and_the_rest_refused_at_once(exchanges):
    requester = exchanges(ExchangeSettings(max_active=2, max_waiting=3, idle_s=0.6, fetch_timeout_s=3.0,
                                          attempts_per_holder=1))
    gone = node_id()  # nobody answers: the fetches stay in flight
    futures = [requester.fetch(sha256(bytes([i])), [gone], tag=0) for i in range(6)]
    overloaded = futures[5].result(WAIT)
    assert overloaded.reason == "overloaded" and overloaded.seconds == 0
    status = requester.status()
    assert status["active"] == 2 and status["waiting"] == 3
    assert [f.result(WAIT).reason for f in futures[:5]] == ["timeout"] * 5
    assert requester.status()["active"] == requester.status()["waiting"] == 0


def test_a_stopped_exchange_resolves_every_fetch(broker, tmp_path):
    ident = node_id()
    exchange = BlobExchange(BlobStore(tmp_path / "s"), ident, broker.host, broker.port, settings=FAST)
    assert exchange.fetch(sha256(b"a"), [node_id()], tag=0).result(WAIT).reason == "stopped"  # not started
    exchange.start()
    pending = exchange.fetch(sha256(b"b"), [node_id()], tag=0)
    exchange.close()
    assert pending.result(WAIT).reason == "stopped"
    assert exchange.fetch(sha256(b"c"), [node_id()], tag=0).result(WAIT).reason == "stopped"


def hostile_messages(target: str, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Malformed, oversize, forged and unwanted messages for `target`'s want and give topics, each refused once."""
    want, give = topics.blob_want(target), topics.blob_give(target)
    victim, d = node_id(), sha256(b"some digest")
    out: list[tuple[str, bytes]] = []
    for i in range(150):
        out += [
            (want, rng.bytes(int(rng.integers(0, 200)))),  # noise
            (give, rng.bytes(int(rng.integers(0, 200)))),
            (want, cbor.dumps({"from": victim, "want": [d] * (MAX_WANT + 1)})),  # too many digests
            (want, cbor.dumps({"from": "../../#", "want": [d]})),  # an id that is no topic segment
            (want, cbor.dumps({"from": victim, "want": [b"short"]})),
            (want, cbor.dumps([victim, d])),  # not a map
            (want, b"\xa0" * 5000),  # over the size of any want, refused before parsing
            (give, b"\x00" * (300 * 1024)),  # over one chunk
            (give, cbor.dumps({"from": victim, "digest": d, "chunk": 0, "chunks": 1, "size": 10, "data": b"x"})),
            (give, cbor.dumps({"from": victim, "digest": d, "chunk": 5, "chunks": 3, "size": 600_000,
                               "data": b""})),
            (give, cbor.dumps({"from": victim, "digest": d, "chunk": True, "chunks": 1, "size": 1, "data": b"x"})),
            (give, cbor.dumps({"from": victim, "digest": d, "absent": "gone fishing"})),
            (give, Chunk(victim, sha256(bytes([i % 256, 1])), 0, 1, 4, b"junk").encode()),  # never asked for
            (give, Absent(victim, sha256(bytes([i % 256, 2])), "missing").encode()),  # never asked for
        ]
    return out


def test_a_flood_of_hostile_messages_is_counted_and_changes_nothing(exchanges, broker, caplog):
    # Default timeouts: the real fetch waits in the broker's queues behind ~90 MB of flood.
    holder, requester = exchanges(ExchangeSettings()), exchanges(ExchangeSettings())
    kept = {holder.store.put(blob(10 + i, 300 * 1024), tag=i): blob(10 + i, 300 * 1024) for i in range(3)}
    attacker = RawPeer(broker)
    flood = [hostile_messages(peer.node_id, np.random.default_rng(0)) for peer in (holder, requester)]
    started = time.monotonic()

    def refused_all() -> bool:
        return all(sum(peer.status()["refused"].values()) >= len(flood[0]) for peer in (holder, requester))

    with caplog.at_level(logging.INFO):
        digest, data = next(iter(kept.items()))
        fetching = None
        for i, messages in enumerate(zip(*flood)):
            for topic, payload in messages:
                attacker.send(topic, payload)
            if i == len(flood[0]) // 2:  # a real fetch through the same topics, mid-flood
                fetching = requester.fetch(digest, [holder.node_id], tag=0)
        fetched = fetching.result(WAIT)
        while not refused_all() and time.monotonic() - started < WAIT:
            time.sleep(0.05)
    attacker.close()
    for peer in (holder, requester):  # each message refused exactly once, by reason (the noise is seeded)
        assert peer.status()["refused"] == {"malformed": 300, "limits": 600, "schema": 900, "unwanted": 300}
    assert time.monotonic() - started < WAIT
    assert fetched.ok and fetched.data == data
    assert holder.store.scrub() == 0 and all(holder.store.get(d) == b for d, b in kept.items())
    assert holder.store.status()["blobs"] == 3 and requester.store.status()["blobs"] == 1
    assert "Traceback" not in caplog.text
    refusal_lines = [r for r in caplog.records if "blob.refused" in r.getMessage()]
    assert len(refusal_lines) <= 2 * 4  # counted, not logged one by one: a line per reason per 10 s per peer


def test_a_pushed_blob_reaches_every_member_once_and_a_fetch_takes_it_without_asking(exchanges, broker):
    sender, first, second = exchanges(), exchanges(), exchanges()
    data = blob(40)  # 3 chunks
    digest = sha256(data)
    sender.push(data)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not all(e.status()["received_pushes"] for e in (first, second)):
        time.sleep(0.05)
    assert [e.status()["received_pushes"] for e in (first, second)] == [1, 1]
    assert sender.status()["pushed_bytes"] == len(data) and sender.status()["received_pushes"] == 0
    for exchange in (first, second):  # no holder named: the push is the only way it can be had
        fetched = exchange.fetch(digest, [], tag=3).result(WAIT)
        assert (fetched.reason, fetched.holder, fetched.data) == ("ok", "push", data)
        assert exchange.store.get(digest) == data and exchange.status()["served"] == 0
    assert sender.status()["served"] == 0  # nobody had to ask

    # A forged push (bytes that do not hash to the digest its chunks claim) is refused and kept nowhere.
    forged, liar = blob(41, 1000), RawPeer(broker)
    try:
        for chunk in split(node_id(), sha256(b"something else"), forged):
            liar.send(topics.blob_push(chunk.sender), chunk.encode())
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and not first.status()["refused"].get("digest_mismatch"):
            time.sleep(0.05)
        assert first.status()["refused"].get("digest_mismatch") == 1
        assert first.fetch(sha256(b"something else"), [], tag=3).result(WAIT).data is None
    finally:
        liar.close()
