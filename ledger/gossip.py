"""Gossip: how gateways learn each other's vertices over MQTT (anti-entropy with version vectors).

Transport-agnostic: `Gossip` is given a `publish(topic, payload, retain)`
function and fed every message of its `subscriptions()`; a gateway (or a
replica) runs it on its own MQTT connection. Topics, under `starling/ledger/`:

    vertex/<creator id>   a new vertex, pushed once by its creator (encoded vertex)
    vv/<gateway id>       retained: what this gateway holds, as a version vector
                          {creator id: highest seq}, plus height, finality and equivocators
    want/<gateway id>     a request to that gateway: {"from": id, "creator": id, "seq": first seq},
                          or {"from": id, "checkpoint": true}
    give/<gateway id>     vertices sent to that gateway in answer (encoded vertex)
    snapshot/<gateway id> the answer to a checkpoint request, in chunks:
                          {"checkpoint": vertex, "chunk": i, "chunks": n, "data": bytes}

A gateway whose ledger holds only its genesis first asks its peers for their
newest final checkpoint and starts from it (`Ledger.bootstrap`); only if none
comes within `bootstrap_s` does it replay the history from genesis.

A vertex whose parents have not arrived waits in `pending` and is applied
when they do; a gateway that sees, in a peer's version vector, a creator's
seq beyond its own asks that peer for the rest. Nothing is dropped: what a
lost push or a partition withheld comes back through the version vectors.
Every message from the network is treated as hostile: it is decoded
strictly, and anything refused is counted by reason, never raised.

Works the same across bridged brokers (bridge `starling/ledger/#` both ways).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from protocol import cbor
from protocol.errors import ProtocolError, SchemaError
from protocol.logs import event

from .errors import LedgerError, MissingParent, NotInitialized
from .store import Ledger
from .vertex import MAX_SEQ, MAX_VERTEX_BYTES, Vertex

log = logging.getLogger("starling.ledger.gossip")
ROOT = "starling/ledger"
MAX_CONTROL_BYTES = 64 * 1024  # a version vector or a request
MAX_SNAPSHOT_MESSAGE = 256 * 1024 * 1024  # a whole snapshot (about 40 bytes per update record)
SNAPSHOT_CHUNK = 512 * 1024  # per message, under the shipped broker's 1 MB message limit
MAX_PENDING = 20_000  # vertices waiting for parents; beyond this, the oldest go (re-fetched later)
GIVE_BATCH = 256  # vertices sent per request
WANT_INTERVAL_S = 0.5  # do not ask a peer for the same creator more often
ID_LENGTH = 32


def vertex_topic(creator_id: str) -> str:
    return f"{ROOT}/vertex/{creator_id}"


def vv_topic(gateway_id: str) -> str:
    return f"{ROOT}/vv/{gateway_id}"


def want_topic(gateway_id: str) -> str:
    return f"{ROOT}/want/{gateway_id}"


def give_topic(gateway_id: str) -> str:
    return f"{ROOT}/give/{gateway_id}"


def snapshot_topic(gateway_id: str) -> str:
    return f"{ROOT}/snapshot/{gateway_id}"


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and len(value) == ID_LENGTH and all(c in "0123456789abcdef" for c in value)


def _is_seq(value: Any) -> bool:
    """A vertex sequence number: an int (not a bool) a vertex can carry, so SQLite can hold it."""
    return type(value) is int and 0 <= value <= MAX_SEQ


class Gossip:
    """One gateway's side of ledger gossip. Not thread-safe: feed it from one thread."""

    def __init__(self, ledger: Ledger, gateway_id: str, publish: Callable[[str, bytes, bool], Any],
                 vv_interval_s: float = 1.0, bootstrap_s: float = 0.0) -> None:
        self.ledger = ledger
        self.gateway_id = gateway_id
        self.publish = publish
        self.vv_interval_s = vv_interval_s
        self.pending: dict[bytes, Vertex] = {}  # id -> vertex waiting for parents
        self.refused: dict[str, int] = {}  # reason -> count
        self.applied = 0
        self.peers: dict[str, dict[str, Any]] = {}  # gateway id -> its last version vector message
        self._asked: dict[tuple[str, str], float] = {}  # (peer, creator) -> when
        self._next_vv = 0.0
        self.on_applied: Callable[[Vertex], None] | None = None  # e.g. the gateway syncing revocations
        # Until this moment, a ledger holding only genesis waits for a checkpoint instead of replaying history.
        self._bootstrap_until = time.monotonic() + bootstrap_s if bootstrap_s > 0 and ledger.height == 1 else 0.0
        self.bootstrapped_from: str | None = None
        self._chunks: dict[bytes, dict[int, bytes]] = {}  # checkpoint id -> snapshot chunks received

    def subscriptions(self) -> list[str]:
        return [f"{ROOT}/vertex/+", f"{ROOT}/vv/+", want_topic(self.gateway_id), give_topic(self.gateway_id),
                snapshot_topic(self.gateway_id)]

    @property
    def bootstrapping(self) -> bool:
        if self._bootstrap_until and time.monotonic() >= self._bootstrap_until:
            self._bootstrap_until = 0.0
            event(log, "gossip.bootstrap_timeout", logging.WARNING, detail="no checkpoint offered: syncing from genesis")
        return bool(self._bootstrap_until)

    # --- outgoing ----------------------------------------------------------------------

    def announce(self, vertex: Vertex) -> None:
        """Push a vertex this gateway just wrote (or received first) to everyone."""
        self.publish(vertex_topic(vertex.creator_id), vertex.encode(), False)

    def status(self, with_state_digest: bool = False) -> dict[str, Any]:
        """What the version vector message carries; `with_state_digest` adds the (costly, O(ledger))
        digest of the derived state that tests and benchmarks compare across gateways."""
        finality = self.ledger.finality()
        doc = {
            "gateway": self.gateway_id,
            "vv": self.ledger.version_vector(),
            **finality,
            "pending": len(self.pending),
            "peers": sorted(self.peers),
            "equivocators": sorted(self.ledger.equivocators()),
            "equivocations": self.ledger.equivocators(),  # creator -> seqs: twins are not visible in a max seq
            "refused": dict(self.refused),
            "time": round(time.time(), 3),
        }
        if with_state_digest:
            doc["state"] = self.ledger.state_digest()
        return doc

    def tick(self, now: float | None = None) -> None:
        """Call often (every ~100 ms): publishes the version vector every `vv_interval_s`."""
        now = time.monotonic() if now is None else now
        if now >= self._next_vv:
            self._next_vv = now + self.vv_interval_s
            self.publish(vv_topic(self.gateway_id), cbor.dumps(self.status()), True)

    # --- incoming ----------------------------------------------------------------------

    def _refuse(self, reason: str, detail: str, topic: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        event(log, "gossip.refused", logging.WARNING, reason=reason, topic=topic, detail=detail[:200])

    def handle(self, topic: str, payload: bytes) -> None:
        """One message from the network. Never raises."""
        try:
            if topic.startswith(f"{ROOT}/vertex/") or topic == give_topic(self.gateway_id):
                self._on_vertex(topic, payload)
            elif topic.startswith(f"{ROOT}/vv/"):
                self._on_vv(topic, payload)
            elif topic == want_topic(self.gateway_id):
                self._on_want(topic, payload)
            elif topic == snapshot_topic(self.gateway_id):
                self._on_snapshot(topic, payload)
        except Exception as exc:  # a bug must not take the gateway down; it is counted and logged
            self._refuse("internal", f"{type(exc).__name__}: {exc}", topic)
            log.exception("gossip.failed topic=%s", topic)

    def _on_vertex(self, topic: str, payload: bytes) -> None:
        if len(payload) > MAX_VERTEX_BYTES:
            return self._refuse("limits", f"{len(payload)} bytes", topic)
        try:
            vertex = Vertex.decode(payload)
        except ProtocolError as exc:
            return self._refuse(exc.reason, exc.detail, topic)
        if vertex.id in self.pending or self.ledger.holds(vertex.id):
            return None
        self._admit(vertex, topic)
        return None

    def _admit(self, vertex: Vertex, topic: str) -> None:
        """Insert, or hold until its parents arrive; then try what was waiting for it."""
        ready = [vertex]
        while ready:
            current = ready.pop()
            try:
                inserted = self.ledger.insert_vertex(current)
            except (MissingParent, NotInitialized):
                self._hold(current)
                continue
            except LedgerError as exc:
                self.pending.pop(current.id, None)
                self._refuse(exc.reason, exc.detail, topic)
                continue
            self.pending.pop(current.id, None)
            if inserted:
                self.applied += 1
                if self.on_applied is not None:
                    self.on_applied(current)
                ready.extend(v for v in list(self.pending.values()) if current.id in v.parents)

    def _hold(self, vertex: Vertex) -> None:
        if vertex.id not in self.pending and len(self.pending) >= MAX_PENDING:
            oldest = next(iter(self.pending))
            del self.pending[oldest]  # it comes back through the version vectors
            self.refused["pending_overflow"] = self.refused.get("pending_overflow", 0) + 1
        self.pending[vertex.id] = vertex
        if self.bootstrapping:
            return  # its parents come with the checkpoint, or through the version vectors after
        # Its creator surely has its own earlier vertices: ask it for what is missing.
        mine = self.ledger.last_seq(vertex.creator_id)
        if vertex.seq > mine + 1:
            self._ask(vertex.creator_id, vertex.creator_id, mine + 1)

    def _ask(self, peer: str, creator: str, seq: int) -> None:
        if peer == self.gateway_id:
            return
        now = time.monotonic()
        if now - self._asked.get((peer, creator), -1e9) < WANT_INTERVAL_S:
            return
        self._asked[(peer, creator)] = now
        request = {"from": self.gateway_id, "creator": creator, "seq": seq}
        self.publish(want_topic(peer), cbor.dumps(request), False)

    def _control(self, topic: str, payload: bytes) -> dict[str, Any] | None:
        if len(payload) > MAX_CONTROL_BYTES:
            self._refuse("limits", f"{len(payload)} bytes", topic)
            return None
        try:
            doc = cbor.loads(payload, max_bytes=MAX_CONTROL_BYTES)
        except ProtocolError as exc:
            self._refuse(exc.reason, exc.detail, topic)
            return None
        if not isinstance(doc, dict):
            self._refuse("schema", "not a map", topic)
            return None
        return doc

    def _on_vv(self, topic: str, payload: bytes) -> None:
        peer = topic.rsplit("/", 1)[-1]
        if peer == self.gateway_id or not payload:  # our own, or a cleared retained message
            return
        doc = self._control(topic, payload)
        if doc is None:
            return
        theirs = doc.get("vv")
        if not _is_id(peer) or doc.get("gateway") != peer or not isinstance(theirs, dict):
            return self._refuse("schema", "version vector without gateway id or vv map", topic)
        self.peers[peer] = doc
        if self.bootstrapping:  # ask for a checkpoint first, not for the whole history
            now = time.monotonic()
            if now - self._asked.get((peer, "checkpoint"), -1e9) >= WANT_INTERVAL_S:
                self._asked[(peer, "checkpoint")] = now
                self.publish(want_topic(peer), cbor.dumps({"from": self.gateway_id, "checkpoint": True}), False)
            return None
        mine = self.ledger.version_vector()
        for creator, seq in theirs.items():
            if not _is_id(creator) or not _is_seq(seq):
                return self._refuse("schema", "bad version vector entry", topic)
            if seq > mine.get(creator, -1):
                self._ask(peer, creator, mine.get(creator, -1) + 1)
        twins = doc.get("equivocations", {})
        if not isinstance(twins, dict):
            return self._refuse("schema", "equivocations must be a map", topic)
        known = self.ledger.equivocators()
        for creator, seqs in twins.items():
            if not _is_id(creator) or not isinstance(seqs, list) or not all(_is_seq(q) for q in seqs):
                return self._refuse("schema", "bad equivocations entry", topic)
            missing = sorted(set(seqs) - set(known.get(creator, [])))
            if missing:  # the peer holds a twin we lack: a max seq cannot show that
                self._ask(peer, creator, missing[0])
        return None

    def _on_want(self, topic: str, payload: bytes) -> None:
        doc = self._control(topic, payload)
        if doc is None:
            return
        if doc.get("checkpoint") is True:
            if not _is_id(doc.get("from")):
                return self._refuse("schema", "checkpoint want without a requester id", topic)
            served = self.ledger.latest_final_checkpoint()
            if served is not None:  # in chunks: a broker caps message sizes (1 MB in hw/mosquitto)
                checkpoint, snapshot = served
                parts = [snapshot[i:i + SNAPSHOT_CHUNK] for i in range(0, len(snapshot), SNAPSHOT_CHUNK)] or [b""]
                for index, part in enumerate(parts):
                    answer = {"checkpoint": checkpoint.encode(), "chunk": index, "chunks": len(parts), "data": part}
                    self.publish(snapshot_topic(doc["from"]), cbor.dumps(answer), False)
            return None
        requester, creator, seq = doc.get("from"), doc.get("creator"), doc.get("seq")
        if not (_is_id(requester) and _is_id(creator) and _is_seq(seq)):
            return self._refuse("schema", "want needs from, creator and seq", topic)
        for data in self.ledger.encoded_from(creator, seq, GIVE_BATCH):
            self.publish(give_topic(requester), data, False)
        return None

    def _on_snapshot(self, topic: str, payload: bytes) -> None:
        """One chunk of a peer's checkpoint snapshot; with the last one, start from it."""
        if not self.bootstrapping:
            return None  # too late (or never asked): the history is arriving the normal way
        try:
            doc = cbor.loads(payload, max_bytes=SNAPSHOT_CHUNK + MAX_VERTEX_BYTES)
            if not isinstance(doc, dict) or set(doc) != {"checkpoint", "chunk", "chunks", "data"}:
                raise SchemaError("a snapshot chunk is {checkpoint, chunk, chunks, data}")
            chunk, chunks, data = doc["chunk"], doc["chunks"], doc["data"]
            if not (type(chunks) is int and type(chunk) is int and 0 <= chunk < chunks  # not bool
                    and chunks * SNAPSHOT_CHUNK <= MAX_SNAPSHOT_MESSAGE and isinstance(data, bytes)):
                raise SchemaError("bad chunk numbering or data")
            checkpoint = Vertex.decode(doc["checkpoint"])
        except ProtocolError as exc:
            return self._refuse(exc.reason, exc.detail, topic)
        parts = self._chunks.setdefault(checkpoint.id, {})
        if len(self._chunks) > 4:  # several peers answered: keep the newest few only
            self._chunks.pop(next(iter(self._chunks)))
        parts[chunk] = data
        if len(parts) < chunks:
            return None
        snapshot = b"".join(parts[i] for i in range(chunks))
        self._chunks.pop(checkpoint.id, None)
        genesis = next(self.ledger.vertices())
        try:
            self.ledger.bootstrap(genesis, checkpoint, snapshot)
        except LedgerError as exc:
            return self._refuse(exc.reason, exc.detail, topic)
        self._bootstrap_until = 0.0
        self.bootstrapped_from = checkpoint.id_hex
        for waiting in list(self.pending.values()):  # pushed while we waited: their parents may be here now
            if waiting.id in self.pending:
                self._admit(waiting, topic)
        event(log, "gossip.bootstrapped", checkpoint=checkpoint.id_hex[:16], creator=checkpoint.creator_id,
              count=checkpoint.body["count"])
        return None
