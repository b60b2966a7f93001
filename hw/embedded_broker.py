"""A small MQTT 3.1.1 broker in pure Python, for machines without Mosquitto.

The emulator prefers Mosquitto; this broker exists so that `starling-emulate`
still runs on a laptop where Mosquitto is not installed. (amqtt, the
maintained Python broker, pins typer and click versions that conflict with
Flower's and sqlite-utils', so it cannot share an environment with them.)

It implements what Starling's clients use: CONNECT with will and persistent
sessions, PUBLISH at QoS 0 and 1 with retained messages, SUBSCRIBE and
UNSUBSCRIBE with `+` and `#` wildcards, PINGREQ and DISCONNECT. QoS 2 is
downgraded to 1. Messages for an offline persistent session are queued (up
to `MAX_QUEUED` per session). It is not a production broker: no TLS, no
authentication, loopback only.

    python -m hw.embedded_broker --port 1883
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("starling.embedded_broker")
MAX_QUEUED = 100_000
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT wildcard match: `+` is one level, a final `#` is any number of levels."""
    p, t = pattern.split("/"), topic.split("/")
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(p) == len(t)


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    length, out = len(body), bytearray([kind << 4 | flags])
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + body


def _str(data: bytes, at: int) -> tuple[bytes, int]:
    n = int.from_bytes(data[at : at + 2], "big")
    return data[at + 2 : at + 2 + n], at + 2 + n


def _publish_packet(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int) -> bytes:
    body = len(topic.encode()).to_bytes(2, "big") + topic.encode()
    if qos:
        body += packet_id.to_bytes(2, "big")
    return _packet(PUBLISH, (qos << 1) | int(retain), body + payload)


@dataclass
class Session:
    client_id: str
    persistent: bool
    subscriptions: dict[str, int] = field(default_factory=dict)
    queue: deque = field(default_factory=lambda: deque(maxlen=MAX_QUEUED))
    writer: asyncio.StreamWriter | None = None
    next_id: int = 0

    def send(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        if self.writer is None:
            if self.persistent and qos:
                self.queue.append((topic, payload, qos))
            return
        self.next_id = self.next_id % 65535 + 1
        self.writer.write(_publish_packet(topic, payload, qos, retain, self.next_id))


class EmbeddedBroker:
    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.retained: dict[str, bytes] = {}

    def route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for session in self.sessions.values():
            granted = max((q for pattern, q in session.subscriptions.items() if topic_matches(pattern, topic)), default=-1)
            if granted >= 0:
                session.send(topic, payload, min(qos, granted))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session: Session | None = None
        will: tuple[str, bytes, int, bool] | None = None
        try:
            while True:
                header = await reader.readexactly(1)
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length += (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                    if shift > 21:
                        raise ValueError("remaining length too long")
                data = await reader.readexactly(length)
                kind, flags = header[0] >> 4, header[0] & 0x0F
                if session is None and kind != CONNECT:
                    raise ValueError("first packet is not CONNECT")
                if kind == CONNECT:
                    _, at = _str(data, 0)
                    connect_flags, at = data[at + 1], at + 4  # level byte, flags byte, keepalive
                    client_id, at = _str(data, at)
                    cid = client_id.decode() or f"anon-{id(writer)}"
                    if connect_flags & 0x04:
                        will_topic, at = _str(data, at)
                        will_payload, at = _str(data, at)
                        will = (will_topic.decode(), will_payload, min((connect_flags >> 3) & 3, 1), bool(connect_flags & 0x20))
                    clean = bool(connect_flags & 0x02)
                    old = self.sessions.get(cid)
                    if old and old.writer is not None:
                        old.writer.close()
                    present = bool(old and not clean and old.persistent)
                    session = old if present else Session(cid, not clean)
                    session.writer = writer
                    self.sessions[cid] = session
                    writer.write(_packet(CONNACK, 0, bytes([int(present), 0])))
                    while session.queue:
                        session.send(*session.queue.popleft())
                elif kind == PUBLISH:
                    qos, retain = min((flags >> 1) & 3, 1), bool(flags & 1)
                    topic, at = _str(data, 0)
                    if (flags >> 1) & 3:
                        packet_id, at = data[at : at + 2], at + 2
                        writer.write(_packet(PUBACK, 0, packet_id))
                    self.route(topic.decode(), data[at:], qos, retain)
                elif kind == SUBSCRIBE:
                    packet_id, at, granted, new = data[:2], 2, bytearray(), []
                    while at < len(data):
                        pattern, at = _str(data, at)
                        qos, at = min(data[at], 1), at + 1
                        session.subscriptions[pattern.decode()] = qos
                        granted.append(qos)
                        new.append((pattern.decode(), qos))
                    writer.write(_packet(SUBACK, 0, packet_id + bytes(granted)))
                    for pattern, qos in new:
                        for topic, payload in list(self.retained.items()):
                            if topic_matches(pattern, topic):
                                session.send(topic, payload, qos, retain=True)
                elif kind == UNSUBSCRIBE:
                    at = 2
                    while at < len(data):
                        pattern, at = _str(data, at)
                        session.subscriptions.pop(pattern.decode(), None)
                    writer.write(_packet(UNSUBACK, 0, data[:2]))
                elif kind == PINGREQ:
                    writer.write(_packet(PINGRESP, 0, b""))
                elif kind == DISCONNECT:
                    will = None
                    break
                # PUBACKs from clients need no action: delivery is at least once.
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
            pass
        finally:
            if session is not None and session.writer is writer:
                session.writer = None
                if not session.persistent:
                    self.sessions.pop(session.client_id, None)
            if will is not None:
                self.route(*will)
            writer.close()


async def serve(host: str, port: int) -> None:
    broker = EmbeddedBroker()
    server = await asyncio.start_server(broker.handle, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("embedded_broker.listening host=%s port=%d", host, port)
    async with server:
        await stop.wait()
    log.info("embedded_broker.stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hw.embedded_broker", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
