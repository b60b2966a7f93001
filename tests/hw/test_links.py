"""Emulated links: the delays, rates and outages a device's connection sees, measured from outside."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from hw.links import LinkProfile, LinkRelay


class Echo:
    """A TCP echo server on loopback: what goes in comes back."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def echo():
    server = Echo()
    yield server
    server.close()


def round_trip(port: int, payload: bytes = b"ping") -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += sock.recv(65536)
        return time.monotonic() - started


def test_latency_is_paid_each_way(echo):
    with LinkRelay(("127.0.0.1", echo.port), LinkProfile(latency_s=0.1)) as link:
        rtt = round_trip(link.port)
    assert 0.2 <= rtt < 0.5
    assert link.stats.connections == 1 and link.stats.bytes_up == link.stats.bytes_down == 4


def test_bandwidth_limits_the_rate(echo):
    payload = b"x" * 60_000
    with LinkRelay(("127.0.0.1", echo.port), LinkProfile(bandwidth_bps=100_000)) as link:
        took = round_trip(link.port, payload)
    assert 0.5 <= took < 2.0  # 60 KB at 100 KB/s less a 10 KB burst; the echo runs alongside, not after


def test_loss_shows_up_as_retransmission_delays_never_as_lost_bytes(echo):
    profile = LinkProfile(loss=0.5, retransmit_s=0.05)
    with LinkRelay(("127.0.0.1", echo.port), profile, seed=1) as link:
        for _ in range(10):
            assert round_trip(link.port) < 2.0  # every byte came back
    assert 4 <= link.stats.delayed_chunks <= 16  # of 20 chunks, about half


def test_an_outage_drops_connections_refuses_new_ones_and_then_lets_them_in(echo):
    with LinkRelay(("127.0.0.1", echo.port), LinkProfile(outages=((0.5, 1.5),))) as link:
        sock = socket.create_connection(("127.0.0.1", link.port), timeout=5)
        sock.sendall(b"a")
        assert sock.recv(10) == b"a"
        time.sleep(0.8)  # the outage began
        sock.settimeout(2)
        assert sock.recv(10) == b""  # dropped
        sock.close()
        with socket.create_connection(("127.0.0.1", link.port), timeout=5) as refused:
            refused.settimeout(2)
            assert refused.recv(10) == b""
        time.sleep(1.0)  # the outage ended
        assert round_trip(link.port) < 1.0
    assert link.stats.dropped >= 1 and link.stats.refused >= 1 and link.stats.outages_seen == [(0.5, 1.5)]


def test_mqtt_goes_through_a_slow_link(tmp_path):
    import paho.mqtt.client as mqtt

    from hw.broker import Broker

    with Broker(tmp_path / "broker", kind="mosquitto") as broker, \
            LinkRelay((broker.host, broker.port), LinkProfile(latency_s=0.05, bandwidth_bps=50_000)) as link:
        got = threading.Event()
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="slow")
        client.on_message = lambda c, u, m: got.set()
        client.connect("127.0.0.1", link.port)
        client.loop_start()
        try:
            client.subscribe("t", qos=1)
            time.sleep(0.3)
            client.publish("t", b"z" * 20_000, qos=1)
            assert got.wait(10)
        finally:
            client.disconnect()
            client.loop_stop()
    assert link.stats.bytes_up > 20_000 and link.stats.bytes_down > 20_000


@pytest.mark.parametrize("bad", [{"loss": 1.0}, {"latency_s": -1}, {"outages": ((5.0, 2.0),)}])
def test_an_impossible_profile_is_refused(bad):
    with pytest.raises(ValueError):
        LinkProfile(**bad)
