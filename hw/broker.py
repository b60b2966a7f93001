"""An MQTT broker for the emulator and the tests, on a free loopback port.

Mosquitto when it is installed (the real thing, as in the city); otherwise an
embedded Python broker (amqtt), so a laptop without Mosquitto still runs the
demo. The Mosquitto config raises the queue limits that otherwise drop
messages silently (`max_queued_messages 1000`, `max_inflight_messages 20`)
and, because it has a `listener` line, needs `allow_anonymous true`.

`listen=(addr, port)` (Mosquitto only) adds a second listener that other
machines reach, for hardware in the loop (hw/hil.py); the emulator's own
processes keep the loopback one. `allow_anonymous` is global in Mosquitto 2
(`per_listener_settings false`), so that listener is anonymous too.

`bridge_to=(host, port)` (Mosquitto only) bridges BRIDGE_TOPICS both ways to
another broker: the ledger's gossip and the blob exchange (updates and models
fetched by digest), so gateways on bridged brokers reach each other.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

BRIDGE_TOPICS = ("starling/ledger/#", "starling/blobs/#")  # what gateways on bridged brokers share

MOSQUITTO_CONF = """\
# Written by the Starling emulator: loopback only, anonymous, generous queues.
listener {port} 127.0.0.1
allow_anonymous {anonymous}
{persistence}
max_queued_messages 100000
max_queued_bytes 0
max_inflight_messages 0
message_size_limit 0
log_dest file {log}
log_type error
log_type warning
log_type notice
connection_messages true
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_bindable(host: str, port: int) -> None:
    """Raise OSError naming the address if a listener could not be opened there now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto: TIME_WAIT is fine
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror} "
                                     "(another broker there? a port below 1024 needs root)") from None


def find_mosquitto() -> str | None:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class Broker:
    """`with Broker(workdir) as broker:` starts a broker; `broker.port` is where it listens."""

    def __init__(self, workdir: Path, kind: str = "auto", port: int | None = None, persistent: bool = False,
                 bridge_to: tuple[str, int] | None = None, bridge_topics: tuple[str, ...] = BRIDGE_TOPICS,
                 listen: tuple[str, int] | None = None, anonymous: bool = True) -> None:
        """`anonymous=False` (Mosquitto): a broker with no password file that refuses every login, for
        tests of what a refused client does."""
        if kind not in ("auto", "mosquitto", "embedded"):
            raise ValueError(f"broker kind must be auto, mosquitto or embedded, not {kind!r}")
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        exe = find_mosquitto()
        if kind == "mosquitto" and exe is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        self.kind = "mosquitto" if kind != "embedded" and exe else "embedded"
        self._exe = exe
        self.persistent = persistent  # keep sessions, queued and retained messages across a restart
        # A Mosquitto bridge to another broker, for these topics both ways (gateways on two brokers).
        self.bridge_to, self.bridge_topics = bridge_to, bridge_topics
        if bridge_to is not None and self.kind != "mosquitto":
            raise ValueError("a bridge needs Mosquitto")
        self.listen = listen  # a second listener for real devices (hardware in the loop)
        if listen is not None and self.kind != "mosquitto":
            raise ValueError("listening for other machines (--listen) needs Mosquitto: the embedded broker "
                             "serves loopback only (apt-get install mosquitto)")
        if listen is not None and listen[1] == self.port:
            raise ValueError(f"the listen port {listen[1]} is the broker's loopback port; choose another")
        self.anonymous = anonymous
        if not anonymous and self.kind != "mosquitto":
            raise ValueError("a broker that refuses every login needs Mosquitto")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "broker.log"
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            persistence = "persistence false"
            if self.persistent:
                persistence = f"persistence true\npersistence_location {self.workdir}/\nautosave_interval 1"
                if os.geteuid() == 0:  # mosquitto drops to its own user, which cannot write here
                    persistence += "\nuser root"
            text = MOSQUITTO_CONF.format(port=self.port, log=log, persistence=persistence,
                                         anonymous="true" if self.anonymous else "false")
            if self.listen is not None:
                _check_bindable(*self.listen)  # a clear message now, rather than a dead broker and its log
                text += f"listener {self.listen[1]} {self.listen[0]}\n"  # before any bridge section
            if self.bridge_to is not None:
                host, port = self.bridge_to
                text += (f"connection bridge-{self.port}\naddress {host}:{port}\ncleansession false\n"
                         "restart_timeout 1 2\nkeepalive_interval 5\n"
                         + "".join(f"topic {topic} both 1\n" for topic in self.bridge_topics))
            conf.write_text(text)
            cmd = [self._exe, "-c", str(conf)]
        else:
            cmd = [sys.executable, "-m", "hw.embedded_broker", "--port", str(self.port)]
        with open(log, "ab") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_child_env())
        self._wait_listening()

    def _wait_listening(self, timeout: float = 15.0) -> None:
        # Every listener, not only the first: Mosquitto opens them one by one and exits if a later one fails.
        waiting = [(self.host, self.port)]
        if self.listen is not None:
            waiting.append(("127.0.0.1" if self.listen[0] == "0.0.0.0" else self.listen[0], self.listen[1]))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} broker exited with {self.process.returncode}; see {self.workdir / 'broker.log'}")
            try:
                with socket.create_connection(waiting[0], timeout=0.5):
                    waiting.pop(0)
                if not waiting:
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.kind} broker did not listen on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _child_env() -> dict[str, str]:
    """Environment for child processes: the project importable, BLAS on one thread."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
