"""Ingest workers: several processes share one gateway's reply topic (MQTT 5 shared subscription).

With `[ingest] workers = N` the gateway does not subscribe to its reply topic
itself. N worker processes subscribe to

    $share/starling-<gateway id>/starling/<gateway id>/reply/+

and the broker hands each reply to one of them. A worker runs stage 1 of the
reply check (`Authenticator`: decode, sender, Ed25519 signature, the update's
tensors), the part that costs CPU, and sends `(topic, payload, outcome)` to
the gateway in batches over a pipe. The gateway runs stage 2 (round state),
journals and sends receipts exactly as without workers, so the guarantees do
not change: nothing is accepted before it is journaled, nothing is lost that
a device was told was accepted.

Each worker holds a copy of the enrolled and revoked key sets; the gateway
sends every change down the same pipe. A copy that lags costs nothing: stage
2 checks revocation again, and a reply refused as `unknown_device` gets no
receipt, so its device sends it again. A worker that dies is started again
under the same MQTT client id, and its persistent session gives it what the
broker queued meanwhile.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import mqttlink
from protocol import topics
from protocol.logs import event
from protocol.transport import BrokerAuth

from . import ingest_profile
from .ingest import Authenticator

log = logging.getLogger("starling.gateway.ingest")
SEND_BATCH = 128  # outcomes per pipe message: one pickle for many replies
SESSION_EXPIRY_S = 3600  # a restarted worker gets the replies queued for it within this time
READY_WAIT_S = 30.0  # how long the gateway waits at start for its workers to hold the shared subscription
READY = ("ready",)  # a worker's first message on its pipe, once the broker acknowledged its subscription


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process needs (it pickles: workers are spawned, not forked)."""

    gateway_id: str
    host: str
    port: int
    auth: BrokerAuth
    max_reply_bytes: int
    log_level: int

    def client_id(self, index: int) -> str:
        return f"gw-{self.gateway_id}-ingest-{index}"

    @property
    def subscription(self) -> str:
        return f"$share/starling-{self.gateway_id}/{topics.reply(self.gateway_id, '+')}"


def worker_main(index: int, settings: WorkerSettings, enrolled: list[bytes], revoked: list[bytes],
                conn: Connection) -> None:
    """A worker process: stage 1 for every reply the broker gives it, outcomes to the gateway."""
    from protocol import logs

    logs.setup(f"gateway.ingest-{index}", settings.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway stops its workers itself
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    enrolled_keys, revoked_keys = set(enrolled), set(revoked)
    checker = Authenticator(settings.gateway_id, enrolled_keys.__contains__, revoked_keys.__contains__,
                            settings.max_reply_bytes)
    outbox: queue.Queue = queue.Queue()
    handled = [0]
    profile = ingest_profile.PROFILE  # with STARLING_INGEST_PROFILE: this worker's own file beside the gateway's
    if profile is not None:
        profile.path = profile.path.with_name(f"{profile.path.stem}-worker{index}{profile.path.suffix}")

    def deliver(message: mqttlink.Message) -> None:  # on paho's thread: stage 1 is this process's whole job
        handled[0] += 1
        if profile is not None:
            profile.begin()
        try:
            outbox.put((message.topic, message.payload, checker.authenticate(message.topic, message.payload)))
        except Exception:  # never expected (outcomes are values); never fatal either
            log.exception("ingest.failed topic=%s", message.topic)
        if profile is not None:
            profile.counted(1)

    broker = mqttlink.Connection(mqttlink.ConnectionOptions(
        client_id=settings.client_id(index), host=settings.host, port=settings.port, auth=settings.auth,
        mqtt5=True, session_expiry_s=SESSION_EXPIRY_S, subscriptions=((settings.subscription, 1),),
        log_name=f"starling.gateway.ingest-{index}"), deliver=deliver)
    broker.start()  # connects in the background, and again after any drop
    if broker.subscribed.wait(READY_WAIT_S):  # a shared subscription nobody holds yet drops what is sent to it
        conn.send(READY)
    try:
        while not stop.is_set():
            while conn.poll(0):  # key set changes from the gateway
                what, key = conn.recv()
                if what == "stop":
                    stop.set()
                elif what == "enroll":
                    enrolled_keys.add(key)
                elif what == "revoke":
                    revoked_keys.add(key)
                    enrolled_keys.discard(key)
            try:
                batch = [outbox.get(timeout=0.05)]
            except queue.Empty:
                continue
            while len(batch) < SEND_BATCH:
                try:
                    batch.append(outbox.get_nowait())
                except queue.Empty:
                    break
            conn.send(batch)
        broker.close()  # nothing more arrives; what did was acknowledged to the broker: hand it over
        rest = []
        while not outbox.empty():
            rest.append(outbox.get_nowait())
        if rest:
            conn.send(rest)
    except (EOFError, BrokenPipeError, OSError):  # the gateway is gone: nothing to hand replies to
        pass
    finally:
        broker.close()
        if profile is not None and profile.replies:
            profile.write()
        event(log, "ingest.stopped", worker=index, replies=handled[0])


class IngestWorkers:
    """The gateway's side: starts the workers, feeds their outcomes into `inbox`, keeps them alive.

    Use as a context manager; `enroll` and `revoke` keep the workers' key sets current.
    """

    def __init__(self, count: int, settings: WorkerSettings, inbox: queue.Queue,
                 keys: Callable[[], tuple[list[bytes], list[bytes]]]) -> None:
        """`keys()`: the gateway's (enrolled, revoked) keys now, what a worker (re)starts from."""
        self.count = count
        self.settings = settings
        self.inbox = inbox
        self.bytes_in = 0
        self._keys = keys
        self._context = multiprocessing.get_context("spawn")  # the gateway has threads: never fork it
        self._workers: list[tuple[multiprocessing.Process, Connection]] = []
        self._send_lock = threading.Lock()
        self._stopping = threading.Event()
        self._ready = threading.Semaphore(0)  # one release per worker that holds its subscription
        self.restarts = 0

    def _start(self, index: int) -> tuple[multiprocessing.Process, Connection]:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=worker_main, name=f"starling-ingest-{index}", daemon=True,
            args=(index, self.settings, *self._keys(), theirs),
        )
        process.start()
        theirs.close()
        threading.Thread(target=self._read, args=(ours,), name=f"ingest-reader-{index}", daemon=True).start()
        return process, ours

    def _read(self, conn: Connection) -> None:
        """Outcomes from one worker into the gateway's inbox, until its pipe closes."""
        while True:
            try:
                batch = conn.recv()
            except (EOFError, OSError):
                return
            if batch == READY:
                self._ready.release()
                continue
            for topic, payload, outcome in batch:
                self.bytes_in += len(payload)
                self.inbox.put((topic, payload, outcome))

    def _broadcast(self, message: tuple[str, bytes]) -> None:
        with self._send_lock:
            for _, conn in self._workers:
                try:
                    conn.send(message)
                except (BrokenPipeError, OSError):
                    pass  # a dead worker is restarted by watch(), with the current sets

    def enroll(self, key: bytes) -> None:
        self._broadcast(("enroll", key))

    def revoke(self, key: bytes) -> None:
        self._broadcast(("revoke", key))

    def watch(self) -> None:
        """Start again any worker that died (called now and then by the gateway's worker thread)."""
        if self._stopping.is_set():
            return
        with self._send_lock:
            for index, (process, conn) in enumerate(self._workers):
                if not process.is_alive():
                    event(log, "ingest.restart", logging.WARNING, worker=index, exitcode=process.exitcode)
                    conn.close()
                    self._workers[index] = self._start(index)
                    self.restarts += 1

    def __enter__(self) -> IngestWorkers:
        """Start the workers and wait (at most READY_WAIT_S) until each holds the shared subscription: the
        broker drops replies sent to a share group nobody has joined yet, so no round may start before."""
        with self._send_lock:
            self._workers = [self._start(i) for i in range(self.count)]
        end = time.monotonic() + READY_WAIT_S
        ready = sum(self._ready.acquire(timeout=max(0.0, end - time.monotonic())) for _ in range(self.count))
        event(log, "ingest.workers", logging.INFO if ready == self.count else logging.WARNING, count=self.count,
              ready=ready, subscription=self.settings.subscription)
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self._broadcast(("stop", b""))
        end = time.monotonic() + 10
        for process, conn in self._workers:
            process.join(max(0.1, end - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(2)
            conn.close()
