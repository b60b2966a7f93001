"""Emulated network links: latency, bandwidth, loss and outages between devices and their broker.

    profile = LinkProfile(latency_s=0.08, bandwidth_bps=250_000, loss=0.02, outages=((30.0, 45.0),))
    with LinkRelay(("127.0.0.1", broker.port), profile) as link:   # listens on link.port
        ... point the devices that share this profile at 127.0.0.1:link.port ...
        link.stats   # bytes each way, connections, refused, dropped

One relay carries every connection of the devices that share a profile, on
one asyncio thread (hundreds of devices cost one thread, not two each). Per
connection and direction:
  * latency: every chunk is delivered `latency_s` (+ uniform `jitter_s`)
    after it was read, in order;
  * bandwidth: a token bucket of `bandwidth_bps` bytes/s (burst: 1/10 s);
  * loss: TCP never loses bytes, so a lost segment shows up as its
    retransmission: with probability `loss` a chunk waits an extra
    `retransmit_s` (a typical minimum RTO of 200 ms);
  * outages: during each (start, end) window, counted in seconds from
    `start()`, every connection is dropped and new ones are refused — the
    devices' MQTT clients reconnect with backoff afterwards.
A seeded random source makes jitter and loss reproducible. `tap(direction,
nbytes)`, if given, is called on the relay's thread for every chunk read
("up": client -> target, "down"), e.g. to timestamp the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .broker import free_port

CHUNK = 16384


@dataclass(frozen=True)
class LinkProfile:
    latency_s: float = 0.0
    jitter_s: float = 0.0
    bandwidth_bps: float = 0.0  # bytes per second; 0 = unlimited
    loss: float = 0.0  # fraction of chunks that pay a retransmission delay
    retransmit_s: float = 0.2
    outages: tuple[tuple[float, float], ...] = ()  # (start, end) seconds after the relay started

    def __post_init__(self) -> None:
        if min(self.latency_s, self.jitter_s, self.bandwidth_bps, self.retransmit_s) < 0:
            raise ValueError("latency, jitter, bandwidth and retransmit time must not be negative")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        if any(not 0 <= start < end for start, end in self.outages):
            raise ValueError("each outage is (start, end) with 0 <= start < end")


@dataclass
class LinkStats:
    connections: int = 0
    refused: int = 0  # connections refused during an outage
    dropped: int = 0  # connections cut by an outage
    bytes_up: int = 0  # client -> target
    bytes_down: int = 0  # target -> client
    delayed_chunks: int = 0  # chunks that paid a retransmission delay
    outages_seen: list[tuple[float, float]] = field(default_factory=list)


class LinkRelay:
    def __init__(self, target: tuple[str, int], profile: LinkProfile = LinkProfile(), port: int | None = None,
                 seed: int = 0, tap: Callable[[str, int], None] | None = None) -> None:
        self.target, self.profile, self.tap = target, profile, tap
        self.port = port or free_port()
        self.stats = LinkStats()
        self._random = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="link-relay", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._started = 0.0

    # --- lifetime ---------------------------------------------------------------------

    def start(self) -> LinkRelay:
        self._thread.start()
        self._started = time.monotonic()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> LinkRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the relay ----------------------------------------------------------------------

    def in_outage(self) -> bool:
        now = time.monotonic() - self._started
        return any(start <= now < end for start, end in self.profile.outages)

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        if self.profile.outages:
            asyncio.get_running_loop().create_task(self._outages())

    async def _outages(self) -> None:
        for start, end in sorted(self.profile.outages):
            await asyncio.sleep(max(0.0, start - (time.monotonic() - self._started)))
            for writer in list(self._writers):  # the link goes down: every connection drops
                writer.transport.abort()
                self.stats.dropped += 1
            self.stats.outages_seen.append((start, end))

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.in_outage():
            self.stats.refused += 1
            client_writer.transport.abort()
            return
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self.stats.connections += 1
        self._writers.update((client_writer, target_writer))
        try:
            await asyncio.gather(self._pipe(client_reader, target_writer, "up"),
                                 self._pipe(target_reader, client_writer, "down"))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (client_writer, target_writer):
                self._writers.discard(writer)
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        """Read chunks and deliver each after its delay and within the bandwidth, in order."""
        profile, loop = self.profile, asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            tokens, last = 0.0, loop.time()
            while True:
                due, data = await queue.get()
                if not data:
                    writer.close()
                    return
                await asyncio.sleep(max(0.0, due - loop.time()))
                if profile.bandwidth_bps:
                    burst = profile.bandwidth_bps / 10
                    now = loop.time()
                    tokens = min(burst, tokens + (now - last) * profile.bandwidth_bps)
                    last = now
                    tokens -= len(data)
                    if tokens < 0:  # wait until the bucket has paid for this chunk
                        await asyncio.sleep(-tokens / profile.bandwidth_bps)
                        last = loop.time()
                        tokens = 0.0
                writer.write(data)
                await writer.drain()

        sender = loop.create_task(deliver())
        try:
            while True:
                data = await reader.read(CHUNK)
                delay = profile.latency_s + (self._random.uniform(0, profile.jitter_s) if profile.jitter_s else 0.0)
                if data and profile.loss and self._random.random() < profile.loss:
                    delay += profile.retransmit_s
                    self.stats.delayed_chunks += 1
                if direction == "up":
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                if data and self.tap is not None:
                    self.tap(direction, len(data))
                await queue.put((loop.time() + delay, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
