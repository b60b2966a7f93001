"""The agent speaks systemd's notify protocol: READY, WATCHDOG while alive, STOPPING on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent.systemd import Notifier
from hw.broker import Broker, _child_env
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.5)
    yield path, sock
    sock.close()


def received(sock: socket.socket, until: str, timeout: float = 20.0) -> list[str]:
    got, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            got.extend(sock.recv(4096).decode().splitlines())
        except TimeoutError:
            continue
        if until in got:
            return got
    raise AssertionError(f"{until} never came; got {got}")


def test_the_notifier_sends_datagrams_and_paces_the_watchdog(notify_socket):
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
    assert notifier.ready("starting") and received(sock, "READY=1")
    assert notifier.watchdog() and not notifier.watchdog()  # at most once per half interval (1 s)
    assert received(sock, "WATCHDOG=1")
    assert not Notifier({}).ready() and not Notifier({}).watchdog()  # outside systemd: nothing, no error


def test_the_abstract_namespace_address_is_understood():
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"starling-test-{os.getpid()}"
    server.bind("\0" + name)
    server.settimeout(2)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert server.recv(100) == b"STOPPING=1"
    finally:
        server.close()


def test_the_real_agent_process_is_ready_pings_the_watchdog_and_says_it_stops(notify_socket, tmp_path):
    path, sock = notify_socket
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x_train=rng.normal(size=(4, 128, 6)).astype(np.float32), y_train=np.zeros(4, np.int64),
             x_test=rng.normal(size=(2, 128, 6)).astype(np.float32), y_test=np.zeros(2, np.int64))
    gateway = Identity.generate()
    with Broker(tmp_path / "broker") as broker:
        conf = tmp_path / "agent.toml"
        conf.write_text(
            f'[device]\nname = "d"\nkey = "{tmp_path / "device.key"}"\nstate_dir = "{tmp_path / "state"}"\n'
            f'[gateway]\nid = "{gateway.id}"\npublic_key = "{gateway.public_key.hex()}"\n'
            f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n[data]\nreplay = "{data}"\n'
        )
        env = {**_child_env(), "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
        agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(conf)], cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            got = received(sock, "READY=1")
            got += received(sock, "WATCHDOG=1")
            agent.send_signal(signal.SIGTERM)
            got += received(sock, "STOPPING=1")
            assert agent.wait(30) == 0
        finally:
            if agent.poll() is None:
                agent.kill()
    assert got.index("READY=1") < got.index("WATCHDOG=1") < got.index("STOPPING=1")
