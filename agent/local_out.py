"""Where the device's inference results go: local clients on a Unix socket, and an MQTT topic if configured.

    out = SocketOut(path).open()       # clients connect with e.g. `socat - UNIX-CONNECT:<path>`
    out.send(b'{"class": 3, ...}\\n')   # one JSON line to every client connected now
    out.serve(0.5)                      # accept clients, flush what they have not read, notice who left
    out.close()                         # disconnect everyone, remove the socket file

`SocketOut` never blocks its caller: the listening socket and every client are
non-blocking, and `serve` waits in `select` at most the time it is given. Each
client has its own bounded backlog of unsent bytes; a client that lets it grow
past `MAX_BACKLOG_BYTES` (it stopped reading) is disconnected (its last line
may be cut short), so one stuck reader costs neither memory nor the other
clients their lines. A client that
connects gets the lines sent from then on (no history), may send nothing (what
it sends is read and dropped) and may leave at any time. At most `MAX_CLIENTS`
are served at once; one more is closed at once. The socket file is mode 0660
(the agent's user and group): results say what happens around the device.

`MqttOut` publishes the same lines on a broker the integrator chose, through
`mqttlink.Connection` (reconnects with backoff on its own thread). Publishing
never waits: offline, paho keeps at most `MQTT_QUEUED` lines and drops the rest.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import stat
from pathlib import Path
from typing import Any, Protocol

from mqttlink import Connection, ConnectionOptions
from protocol.logs import event

from .config import LocalMqtt

log = logging.getLogger("starling.agent")  # the agent's logger: these are the agent's events

MAX_CLIENTS = 16
MAX_BACKLOG_BYTES = 256 * 1024  # unsent bytes per client: minutes of results at the default rate
SOCKET_MODE = 0o660
MQTT_QUEUED = 100  # lines paho keeps while the broker is away (a stream: newer lines replace older ones)
DEFAULT_TOPIC = "starling/inference/{device}"


class Sink(Protocol):
    """Where results go (`SocketOut`, `MqttOut`): whole JSON lines, never blocking the caller."""

    where: str  # for the log: unix:<path>, mqtt://host:port/topic

    def open(self) -> Any: ...
    def send(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class SocketOut:
    """A Unix stream socket that hands each line to every connected client (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"unix:{path}"
        self._listener: socket.socket | None = None
        self._clients: dict[socket.socket, bytearray] = {}  # client -> bytes it has not taken yet
        self.dropped = 0  # clients disconnected because they stopped reading

    def open(self) -> SocketOut:
        """Bind and listen; a socket file left by an earlier run is replaced (anything else there is refused)."""
        try:
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()  # a power cut left it: nobody listens on it any more
        except FileNotFoundError:
            pass
        self.path.parent.mkdir(parents=True, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))  # raises if the path holds a file that is not a socket
            os.chmod(self.path, SOCKET_MODE)  # before listen: nobody can connect until then
            listener.listen(MAX_CLIENTS)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        return self

    @property
    def clients(self) -> int:
        return len(self._clients)

    def send(self, data: bytes) -> None:
        """Queue `data` (whole lines) for every client and push what each will take now."""
        self._accept()
        for client in list(self._clients):
            backlog = self._clients[client]
            if len(backlog) + len(data) > MAX_BACKLOG_BYTES:
                self.dropped += 1
                self._drop(client, "slow")
                continue
            backlog += data
            self._flush(client)

    def serve(self, timeout: float) -> None:
        """Wait up to `timeout` s for clients: accept new ones, flush backlogs, drop those that left."""
        if self._listener is None:
            return
        readers = [self._listener, *self._clients]
        writers = [c for c, backlog in self._clients.items() if backlog]
        try:
            readable, writable, _ = select.select(readers, writers, [], max(0.0, timeout))
        except (OSError, ValueError):  # a client closed under us: the next round sees it gone
            return
        for sock in readable:
            if sock is self._listener:
                self._accept()
            elif sock in self._clients:
                self._read(sock)
        for sock in writable:
            if sock in self._clients:
                self._flush(sock)

    def close(self) -> None:
        for client in list(self._clients):
            self._drop(client, "")
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the agent goes on, the client is not served
                event(log, "inference.client_refused", logging.WARNING, reason=str(exc))
                return
            if len(self._clients) >= MAX_CLIENTS:
                client.close()
                event(log, "inference.client_refused", logging.WARNING, reason="too_many_clients")
                continue
            client.setblocking(False)
            self._clients[client] = bytearray()
            event(log, "inference.client", clients=len(self._clients))

    def _read(self, client: socket.socket) -> None:
        """Whatever a client sends is dropped; an empty read means it left."""
        try:
            if client.recv(4096):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._drop(client, "")

    def _flush(self, client: socket.socket) -> None:
        backlog = self._clients[client]
        try:
            while backlog:
                sent = client.send(backlog, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
                del backlog[:sent]
        except (BlockingIOError, InterruptedError):
            return  # its buffer is full: the rest waits in the backlog
        except OSError as exc:  # EPIPE, ECONNRESET: it left
            self._drop(client, "" if exc.errno in (errno.EPIPE, errno.ECONNRESET) else str(exc))

    def _drop(self, client: socket.socket, reason: str) -> None:
        self._clients.pop(client, None)
        client.close()
        if reason:
            event(log, "inference.client_dropped", logging.WARNING, reason=reason, clients=len(self._clients))


class MqttOut:
    """The results on `[inference.mqtt]`'s topic, through one `mqttlink.Connection` of its own."""

    def __init__(self, settings: LocalMqtt, device_id: str) -> None:
        self.topic = settings.topic or DEFAULT_TOPIC.format(device=device_id)
        self.qos = settings.qos
        options = ConnectionOptions(
            client_id=f"starling-inference-{device_id}",
            host=settings.host,
            port=settings.port,
            auth=settings.auth,
            clean_session=True,  # nothing to keep while away: results are a stream
            reconnect_min_s=1.0,
            reconnect_max_s=60.0,
            max_queued=MQTT_QUEUED,
            log_name=log.name,
        )
        self.conn = Connection(options, deliver=lambda _message: None)  # it subscribes to nothing
        self.where = f"{options.broker}/{self.topic}"

    def open(self) -> MqttOut:
        self.conn.start()  # connects in the background; the agent does not wait for this broker
        return self

    def send(self, data: bytes) -> None:
        for line in data.splitlines():
            self.conn.publish(self.topic, line, qos=self.qos)

    def close(self) -> None:
        self.conn.close()
