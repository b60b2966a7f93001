"""Fetch blobs by digest over MQTT between member gateways (or an auditor), want/give like the ledger's gossip.

    with BlobExchange(store, identity.id, host, port, auth) as exchange:
        fetched = exchange.fetch(digest, holders=[gw_b, gw_c], tag=epoch).result()
        if fetched.ok: ...fetched.data, checked against the digest and kept in the store

Topics (protocol/topics.py) and messages (protocol/blob_messages.py):

    starling/blobs/want/<holder>     a requester names digests and itself
    starling/blobs/give/<requester>  the holder's answer: the blob in 256 KB chunks, or "missing" / "busy"
    starling/blobs/push/<sender>     a blob every member will want (a city offer's model), sent once to all

Pushing (`push(data)`): what every member will fetch anyway goes out once, on
the sender's push topic, in the same chunks; every exchange listens to all
push topics, reassembles (at most MAX_PUSH_PARTS blobs at once) and keeps
the blobs that hash to their digest in memory (at most MAX_PUSHED_BYTES, the
oldest dropped first), where a later `fetch` of that digest finds it (`holder`
"push") without asking anyone. A push that never comes costs nothing: the
fetch asks the holders as usual.

Asking (one holder at a time, in the caller's order): a want goes to the
first holder; each chunk that arrives extends the attempt's life by `idle_s`;
an attempt that goes quiet, answers "missing" or "busy", or whose bytes do not
hash to the digest goes on to the next holder, each holder up to
`attempts_per_holder` times, all within `fetch_timeout_s`. Each attempt starts
from no chunks: what a forger sent must not outlive its attempt. Only a blob
that hashes to its digest is stored and returned; the future then resolves
with a `Fetched` whose `reason` says what happened ("ok", "local", "missing",
"timeout", "mismatch", "busy", "overloaded", "no_holder", "not_stored",
"stopped", "internal").

Bounds: at most `max_active` blobs are reassembled at once, so partial blobs
hold at most max_active x max_blob_bytes (8 x 16 MB by default); up to
`max_waiting` more fetches queue behind them, and more than that are answered
"overloaded" at once. Two fetches of one digest share one transfer. Serving
is paced by a byte budget (`give_bytes_per_s`, a token bucket): a want beyond
it is answered "busy" so the requester asks someone else, and the same blob
goes to the same requester at most once per `repeat_s`.

Hostile input: every message is decoded strictly and bounded
(blob_messages.py); anything refused is counted by reason (`status()`) and
logged as `blob.refused` (at most once per reason per 10 s, with the count),
never raised. A forged chunk can only make a fetch fail or retry.

Threads: paho's thread only queues what arrives (mqttlink); one worker thread
owns every fetch, the store writes of what it fetched, and the serving. The
futures resolve on that thread: callbacks added to them must only queue.
The connection has a clean session: wants and chunks are worth nothing after
a restart (the requester asks again), so the broker should not keep them.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from mqttlink import Connection, ConnectionOptions, Message
from protocol import topics
from protocol.blob_messages import NODE_ID, Absent, Chunk, Want, decode_give, split
from protocol.digest import DIGEST_BYTES, sha256
from protocol.errors import ProtocolError
from protocol.logs import event
from protocol.transport import BrokerAuth

from .blobs import BlobStore, BlobTooLarge, check_tag

log = logging.getLogger("starling.gateway.blobs")
TICK_S = 0.05  # how often timeouts are looked at
BATCH = 256  # messages handled between two looks at the timeouts
LOG_EVERY_S = 10.0  # one `blob.refused` line per reason at most this often (a flood must not flood the log)
RECENT = 256  # finished digests remembered, so their late chunks are ignored rather than refused
SUBSCRIBE_WAIT_S = 10.0
ABSENT_COST = 128  # budget bytes an absent answer costs (its size, rounded up)
MAX_PUSH_PARTS = 8  # pushed blobs being reassembled at once (the oldest partial one gives way)
MAX_PUSHED_BYTES = 64 * 1024 * 1024  # pushed blobs kept in memory until fetched (the oldest go first)


@dataclass(frozen=True)
class ExchangeSettings:
    fetch_timeout_s: float = 30.0  # a fetch's whole life, every holder tried
    idle_s: float = 3.0  # an attempt with no new chunk for this long goes on to the next holder
    attempts_per_holder: int = 2
    max_active: int = 8  # blobs reassembled at once: partial bytes <= max_active x the store's max_blob_bytes
    max_waiting: int = 1024  # fetches queued behind the active ones; beyond: "overloaded"
    give_bytes_per_s: float = 64e6  # serving budget, refilled continuously ...
    give_burst_bytes: int = 32 * 1024 * 1024  # ... up to this (at least one max-size blob, or it is never served)
    repeat_s: float = 0.5  # one blob to one requester at most this often (a want repeated in a loop costs nothing)

    def __post_init__(self) -> None:
        if min(self.fetch_timeout_s, self.idle_s, self.give_burst_bytes) <= 0 or min(
                self.attempts_per_holder, self.max_active) < 1 or min(self.max_waiting, self.give_bytes_per_s,
                                                                      self.repeat_s) < 0:
            raise ValueError(f"exchange settings out of range: {self}")


@dataclass(frozen=True)
class Fetched:
    digest: bytes
    data: bytes | None  # the blob, hashing to `digest`; None when the fetch failed
    reason: str
    holder: str | None  # who gave it ("local": it was already in the store; "push": its holder pushed it)
    tried: tuple[tuple[str, str], ...] = ()  # (holder, outcome) per attempt, in order
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.data is not None


@dataclass
class _Fetch:
    digest: bytes
    tags: list[int]  # every tag a caller asked for: the blob is kept under each
    holders: list[str]
    deadline: float
    started: float
    futures: list[Future] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # the holders to ask, in turn
    holder: str | None = None  # asked in the current attempt
    idle_until: float = 0.0
    size: int | None = None  # as the current attempt's first chunk claimed it
    parts: dict[int, bytes] = field(default_factory=dict)
    tried: list[tuple[str, str]] = field(default_factory=list)
    said_missing: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Push:
    data: bytes


@dataclass(frozen=True)
class _Request:
    digest: bytes
    holders: tuple[str, ...]
    tag: int
    timeout_s: float
    future: Future


class BlobExchange:
    def __init__(self, store: BlobStore, node_id: str, host: str, port: int, auth: BrokerAuth | None = None,
                 settings: ExchangeSettings = ExchangeSettings(), client_id: str | None = None) -> None:
        if not NODE_ID.fullmatch(node_id):
            raise ValueError("a node id is 32 lowercase hex characters (an identity's id)")
        self.store, self.node_id, self.settings = store, node_id, settings
        self._work: queue.Queue[Message | _Request | _Push] = queue.Queue()
        self.connection = Connection(ConnectionOptions(
            client_id=client_id or f"gw-{node_id}-blobs", host=host, port=port, auth=auth or BrokerAuth(),
            clean_session=True, max_inflight=64, reconnect_min_s=0.2, reconnect_max_s=5,
            subscriptions=((topics.blob_want(node_id), 1), (topics.blob_give(node_id), 1), (topics.BLOB_PUSHES, 1)),
            log_name="starling.gateway.blobs"), deliver=self._work.put)
        self._thread = threading.Thread(target=self._run, name="blob-exchange", daemon=True)
        self._stop = threading.Event()
        self._gate = threading.Lock()  # `fetch` against `close`: no request is queued after the worker ends
        self._closed = False
        self._fetches: dict[bytes, _Fetch] = {}  # digest -> active or waiting
        self._active: dict[bytes, _Fetch] = {}
        self._waiting: collections.deque[_Fetch] = collections.deque()
        self._recent: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._served: dict[tuple[str, bytes], float] = {}  # (requester, digest) -> when
        self._tokens = float(settings.give_burst_bytes)
        self._refilled = time.monotonic()
        self._logged: dict[str, float] = {}  # refusal reason -> when last logged
        self._stats_lock = threading.Lock()
        self._stats = {"fetched": 0, "fetched_bytes": 0, "served": 0, "served_bytes": 0, "pushed": 0,
                       "pushed_bytes": 0, "received_pushes": 0, "received_push_bytes": 0}
        self._incoming: collections.OrderedDict[bytes, dict[int, bytes]] = collections.OrderedDict()  # partial pushes
        self._pushed: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()  # whole, checked, unfetched
        self._failed: dict[str, int] = {}
        self._refused: dict[str, int] = {}

    # --- the callers' side (any thread) ----------------------------------------------------------

    def fetch(self, digest: bytes, holders: list[str] | tuple[str, ...], tag: int,
              timeout_s: float | None = None) -> Future:
        """A future `Fetched` for this digest, asked of `holders` in order; stored under `tag` when it arrives."""
        if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
            raise ValueError(f"a blob digest is {DIGEST_BYTES} bytes (SHA-256)")
        if not all(isinstance(h, str) and NODE_ID.fullmatch(h) for h in holders):
            raise ValueError("holders are node ids (32 lowercase hex characters)")
        check_tag(tag)
        future: Future = Future()
        request = _Request(digest, tuple(holders), tag, self.settings.fetch_timeout_s if timeout_s is None
                           else timeout_s, future)
        with self._gate:
            if self._closed or not self._thread.is_alive():
                future.set_result(Fetched(digest, None, "stopped", None))
            else:
                self._work.put(request)
        return future

    def push(self, data: bytes) -> None:
        """Send a blob once to every member (its digest is its SHA-256); they keep it until they fetch it."""
        with self._gate:
            if not self._closed:
                self._work.put(_Push(bytes(data)))

    def status(self) -> dict[str, object]:
        with self._stats_lock:
            return {**self._stats, "failed": dict(self._failed), "refused": dict(self._refused),
                    "active": len(self._active), "waiting": len(self._waiting)}

    def start(self) -> BlobExchange:
        """Connect (mqttlink.ConnectError if no broker within 10 s), wait for the subscriptions, serve and fetch."""
        self.connection.connect()
        self.connection.subscribed.wait(SUBSCRIBE_WAIT_S)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._gate:
            self._closed = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.connection.close()
        for fetch in list(self._fetches.values()):
            self._finish(fetch, None, "stopped", time.monotonic())
        while True:  # requests that came in as the worker stopped
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Request):
                item.future.set_result(Fetched(item.digest, None, "stopped", None))

    def __enter__(self) -> BlobExchange:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the worker thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:  # what is there (a batch at most: a flood must not keep the timeouts from being looked at)
                self._handle(self._work.get(timeout=TICK_S))
                for _ in range(BATCH - 1):
                    self._handle(self._work.get_nowait())
            except queue.Empty:
                pass
            self._tick(time.monotonic())

    def _handle(self, item: Message | _Request) -> None:
        now = time.monotonic()
        try:
            if isinstance(item, _Request):
                self._on_request(item, now)
            elif isinstance(item, _Push):
                self._push(item.data)
            elif item.topic.startswith(topics.blob_push("")):
                self._on_push(item.payload, now)
            elif item.topic == topics.blob_give(self.node_id):
                self._on_give(item.payload, now)
            elif item.topic == topics.blob_want(self.node_id):
                self._on_want(item.payload, now)
        except Exception as exc:  # a bug must cost one message, never the exchange
            self._refuse("internal", f"{type(exc).__name__}: {exc}", now)
            log.exception("blob.failed")
            if isinstance(item, _Request) and not item.future.done():  # nobody waits forever
                item.future.set_result(Fetched(item.digest, None, "internal", None))

    def _refuse(self, reason: str, detail: str, now: float) -> None:
        with self._stats_lock:
            count = self._refused[reason] = self._refused.get(reason, 0) + 1
        if now - self._logged.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[reason] = now
            event(log, "blob.refused", logging.WARNING, reason=reason, count=count, detail=detail[:200])

    # asking

    def _on_request(self, request: _Request, now: float) -> None:
        known = self._fetches.get(request.digest)
        if known is not None:  # one transfer for both; the newcomer's holders are worth asking too
            known.futures.append(request.future)
            known.tags += [] if request.tag in known.tags else [request.tag]
            more = [h for h in dict.fromkeys(request.holders) if h != self.node_id and h not in known.holders]
            known.holders += more
            known.order += more * self.settings.attempts_per_holder
            return
        if self.store.has(request.digest):
            data = self.store.get(request.digest)  # re-checked: a damaged copy is removed and fetched anew
            if data is not None:
                self.store.retag(request.digest, request.tag)
                request.future.set_result(Fetched(request.digest, data, "local", "local"))
                return
        pushed = self._pushed.pop(request.digest, None)
        if pushed is not None:  # sent to all by its holder before anyone asked
            fetch = _Fetch(request.digest, [request.tag], [], now, now, [request.future])
            return self._keep(fetch, pushed, "push", now)
        holders = [h for h in dict.fromkeys(request.holders) if h != self.node_id]
        fetch = _Fetch(request.digest, [request.tag], holders, now + request.timeout_s, now, [request.future])
        self._fetches[fetch.digest] = fetch
        if len(self._active) < self.settings.max_active:
            self._activate(fetch, now)
        elif len(self._waiting) < self.settings.max_waiting:
            self._waiting.append(fetch)
        else:
            self._finish(fetch, None, "overloaded", now)

    def _activate(self, fetch: _Fetch, now: float) -> None:
        fetch.order = fetch.holders * self.settings.attempts_per_holder
        self._active[fetch.digest] = fetch
        self._next_attempt(fetch, now, "no_holder")

    def _next_attempt(self, fetch: _Fetch, now: float, failure: str) -> None:
        """Ask the next holder, or end the fetch with `failure` (the last attempt's outcome)."""
        while fetch.order and now < fetch.deadline:
            holder = fetch.order.pop(0)
            if holder in fetch.said_missing:
                continue
            fetch.holder, fetch.idle_until = holder, now + self.settings.idle_s
            fetch.parts, fetch.size = {}, None  # a forged first chunk must not fix the size for later attempts
            self.connection.publish(topics.blob_want(holder), Want(self.node_id, (fetch.digest,)).encode())
            return
        if fetch.said_missing and fetch.said_missing >= set(fetch.holders):
            failure = "missing"  # every holder said so: clearer than the last one's timeout
        self._finish(fetch, None, failure if now < fetch.deadline else "timeout", now)

    def _fail_attempt(self, fetch: _Fetch, outcome: str, now: float) -> None:
        fetch.tried.append((fetch.holder or "-", outcome))
        fetch.holder = None
        self._next_attempt(fetch, now, outcome)

    def _on_give(self, payload: bytes, now: float) -> None:
        try:
            message = decode_give(payload, self.store.max_blob_bytes)
        except ProtocolError as exc:
            return self._refuse(exc.reason, exc.detail, now)
        fetch = self._active.get(message.digest)
        if fetch is None:
            if message.digest not in self._recent:  # late chunks of a finished fetch are expected, not hostile
                self._refuse("unwanted", f"digest {message.digest.hex()[:16]} is not being fetched", now)
            return None
        if isinstance(message, Absent):
            if message.sender == fetch.holder:  # an answer from a holder given up on already changes nothing
                if message.reason == "missing":
                    fetch.said_missing.add(message.sender)
                self._fail_attempt(fetch, message.reason, now)
            return None
        return self._on_chunk(fetch, message, now)

    def _on_chunk(self, fetch: _Fetch, chunk: Chunk, now: float) -> None:
        if fetch.size is None:
            fetch.size = chunk.size
        elif chunk.size != fetch.size:  # one of them is forged; the digest check will tell which bytes were right
            return self._refuse("inconsistent", f"chunk claims {chunk.size} bytes, not {fetch.size}", now)
        fetch.parts[chunk.index] = chunk.data
        fetch.idle_until = now + self.settings.idle_s
        if len(fetch.parts) < chunk.count:
            return None
        data = b"".join(fetch.parts[i] for i in range(chunk.count))
        if sha256(data) != fetch.digest:
            self._refuse("digest_mismatch", f"{len(data)} bytes from {chunk.sender} do not hash to "
                                            f"{fetch.digest.hex()[:16]}", now)
            return self._fail_attempt(fetch, "mismatch", now)
        fetch.tried.append((chunk.sender, "ok"))
        return self._keep(fetch, data, chunk.sender, now)

    def _keep(self, fetch: _Fetch, data: bytes, holder: str, now: float) -> None:
        """Checked bytes: stored under every tag asked for, and the fetch ends."""
        try:
            self.store.put(data, fetch.tags[0])
            for tag in fetch.tags[1:]:
                self.store.retag(fetch.digest, tag)
        except (OSError, BlobTooLarge) as exc:  # the bytes are right; keeping them failed (disk full?)
            event(log, "blob.not_stored", logging.ERROR, digest=fetch.digest.hex()[:16], reason=str(exc))
            return self._finish(fetch, data, "not_stored", now, holder)
        return self._finish(fetch, data, "ok", now, holder)

    def _finish(self, fetch: _Fetch, data: bytes | None, reason: str, now: float, holder: str | None = None) -> None:
        self._fetches.pop(fetch.digest, None)
        self._active.pop(fetch.digest, None)
        self._recent[fetch.digest] = None
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        seconds = round(now - fetch.started, 4)
        result = Fetched(fetch.digest, data, reason, holder, tuple(fetch.tried), seconds)
        with self._stats_lock:
            if data is not None:
                self._stats["fetched"] += 1
                self._stats["fetched_bytes"] += len(data)
            else:
                self._failed[reason] = self._failed.get(reason, 0) + 1
        if data is not None:
            event(log, "blob.fetched", digest=fetch.digest.hex()[:16], holder=holder, bytes=len(data),
                  seconds=seconds, attempts=len(fetch.tried), reason=reason)
        else:
            event(log, "blob.fetch_failed", logging.WARNING, digest=fetch.digest.hex()[:16], reason=reason,
                  seconds=seconds, tried=",".join(f"{h[:8]}:{o}" for h, o in fetch.tried) or "-")
        for future in fetch.futures:
            if not future.done():
                future.set_result(result)

    def _promote(self, now: float) -> None:
        """Waiting fetches take the places finished ones left (a loop, not recursion: a thousand waiting
        fetches with no holder to ask end one after another here)."""
        while self._waiting and len(self._active) < self.settings.max_active:
            waiting = self._waiting.popleft()
            if waiting.digest in self._fetches:
                self._activate(waiting, now)

    def _tick(self, now: float) -> None:
        for fetch in list(self._active.values()):
            if now >= fetch.deadline:
                fetch.tried.append((fetch.holder or "-", "timeout"))
                self._finish(fetch, None, "timeout", now)
            elif now >= fetch.idle_until:
                self._fail_attempt(fetch, "timeout", now)
        for waiting in [w for w in self._waiting if now >= w.deadline]:  # never got a turn
            self._waiting.remove(waiting)
            self._finish(waiting, None, "timeout", now)
        self._promote(now)
        if len(self._served) > 1024:
            self._served = {k: t for k, t in self._served.items() if now - t < self.settings.repeat_s}

    # pushing

    def _push(self, data: bytes) -> None:
        digest = sha256(data)
        chunks = split(self.node_id, digest, data)
        for chunk in chunks:
            self.connection.publish(topics.blob_push(self.node_id), chunk.encode())
        with self._stats_lock:
            self._stats["pushed"] += 1
            self._stats["pushed_bytes"] += len(data)
        event(log, "blob.pushed", digest=digest.hex()[:16], bytes=len(data), chunks=len(chunks))

    def _on_push(self, payload: bytes, now: float) -> None:
        try:
            chunk = decode_give(payload, self.store.max_blob_bytes)
        except ProtocolError as exc:
            return self._refuse(exc.reason, exc.detail, now)
        if isinstance(chunk, Absent):
            return self._refuse("unwanted", "an absent answer on a push topic", now)
        if chunk.sender == self.node_id or chunk.digest in self._pushed or self.store.has(chunk.digest):
            return None  # our own, or had already
        parts = self._incoming.setdefault(chunk.digest, {})
        self._incoming.move_to_end(chunk.digest)
        while len(self._incoming) > MAX_PUSH_PARTS:
            self._incoming.popitem(last=False)
        parts[chunk.index] = chunk.data
        if len(parts) < chunk.count:
            return None
        del self._incoming[chunk.digest]
        data = b"".join(parts.get(i, b"") for i in range(chunk.count))
        if len(data) != chunk.size or sha256(data) != chunk.digest:
            return self._refuse("digest_mismatch", f"a push from {chunk.sender} does not hash to "
                                                   f"{chunk.digest.hex()[:16]}", now)
        with self._stats_lock:
            self._stats["received_pushes"] += 1
            self._stats["received_push_bytes"] += len(data)
        fetch = self._fetches.get(chunk.digest)
        if fetch is not None:  # asked for already: the push answers it
            if fetch in self._waiting:
                self._waiting.remove(fetch)
            fetch.tried.append((chunk.sender, "push"))
            return self._keep(fetch, data, "push", now)
        self._pushed[chunk.digest] = data
        while sum(map(len, self._pushed.values())) > MAX_PUSHED_BYTES:
            self._pushed.popitem(last=False)
        return None

    # serving

    def _on_want(self, payload: bytes, now: float) -> None:
        try:
            want = Want.decode(payload)
        except ProtocolError as exc:
            return self._refuse(exc.reason, exc.detail, now)
        if want.sender == self.node_id:
            return None
        rate, burst = self.settings.give_bytes_per_s, self.settings.give_burst_bytes
        self._tokens = min(burst, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        for digest in want.digests:
            if now - self._served.get((want.sender, digest), -self.settings.repeat_s) < self.settings.repeat_s:
                continue  # just sent: the chunks are on their way
            size = self.store.size(digest)  # a stat: the budget is checked before anything is read
            if size is not None and size > self._tokens:
                self._absent(want.sender, digest, "busy", now)
                continue
            data = None if size is None else self.store.get(digest)  # None if damaged: then missing here too
            if data is None:
                self._absent(want.sender, digest, "missing", now)
            else:
                self._served[(want.sender, digest)] = now
                self._give(want.sender, digest, data)
        return None

    def _absent(self, requester: str, digest: bytes, reason: str, now: float) -> None:
        """Say why not; every answer is paid from the budget, so a flood of wants cannot turn this gateway into
        an amplifier: when even this is over budget, nothing is sent."""
        if reason == "busy":
            self._refuse("busy", f"serving budget spent: {requester} asked for {digest.hex()[:16]}", now)
        if self._tokens >= ABSENT_COST:
            self._tokens -= ABSENT_COST
            self.connection.publish(topics.blob_give(requester), Absent(self.node_id, digest, reason).encode())

    def _give(self, requester: str, digest: bytes, data: bytes) -> None:
        self._tokens -= len(data)
        answer_to = topics.blob_give(requester)
        chunks = split(self.node_id, digest, data)
        for chunk in chunks:
            self.connection.publish(answer_to, chunk.encode())
        with self._stats_lock:
            self._stats["served"] += 1
            self._stats["served_bytes"] += len(data)
        event(log, "blob.served", digest=digest.hex()[:16], to=requester, bytes=len(data), chunks=len(chunks))
