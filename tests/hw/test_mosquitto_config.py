"""The shipped Mosquitto templates (`hw/mosquitto/`) do what they claim, on the REAL Mosquitto.

Every broker here is rendered from the templates by `hw.mosquitto.render`,
listens with TLS on 127.0.0.1 and a free port, uses certificates from
`make-certs.sh` and a password file with two devices and one gateway made by
`add_user`, and is stopped by its fixture. Mosquitto drops unauthorised
publishes and reads silently, so non-delivery is always asserted after a
message sent later on the same path has arrived (Mosquitto keeps the order
from one publisher to one subscriber), plus a short quiet period.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import queue
import re
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from required_tools import needs

from hw.broker import find_mosquitto, free_port
from hw.mosquitto.render import add_user, render

pytestmark = needs(
    find_mosquitto() is not None and shutil.which("mosquitto_passwd") is not None and shutil.which("openssl") is not None,
    "needs mosquitto, mosquitto_passwd and openssl (hw/install-system.sh)",
)

REPO = Path(__file__).resolve().parents[2]
MAKE_CERTS = REPO / "hw" / "mosquitto" / "make-certs.sh"
HOST = "127.0.0.1"

GW = "5a1e" + "0" * 27 + "1"
DEV_A = "a0" * 16
DEV_B = "b0" * 16
GW_USER = f"gw-{GW}"
AGENT_KEY_SEED = b"starling-test-agent-tls-device!!"  # a real device key: its id is its MQTT username
PASSWORDS = {user: secrets.token_urlsafe(12) for user in (DEV_A, DEV_B, GW_USER)}

WAIT = 5.0  # upper bound for anything that should happen
QUIET = 0.3  # extra time given to a message that must NOT arrive


def t(kind: str, device: str | None = None) -> str:
    return f"starling/{GW}/{kind}" + (f"/{device}" if device else "")


# --- broker fixtures -------------------------------------------------------------------------


def _broker_account() -> tuple[int, int] | None:
    """The uid/gid Mosquitto switches to when started as root (then it reads keys, passwd, ACL as them)."""
    if os.geteuid() != 0:
        return None
    for name in ("mosquitto", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    return None


def _hand_over(path: Path, account: tuple[int, int] | None) -> None:
    if account is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, *account)
        for name in dirs + files:
            os.chown(os.path.join(root, name), *account)


@pytest.fixture(scope="module")
def workroot(tmp_path_factory):
    """A folder the broker can use.

    Started as root, Mosquitto drops to its own user, which cannot enter pytest's 0700 tmp folders.
    """
    account = _broker_account()
    if account is None:
        yield tmp_path_factory.mktemp("mosquitto"), None
        return
    root = Path(tempfile.mkdtemp(prefix="starling-mosquitto-test-"))
    os.chown(root, *account)
    try:
        yield root, account
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pki(workroot):
    """CA, server certificate for 127.0.0.1, client certificates for the cert-mode test, a password file."""
    root, _ = workroot
    certs = root / "pki"
    for client in ("", DEV_A, GW_USER):
        subprocess.run(["bash", str(MAKE_CERTS), "-d", "2", str(certs), HOST, *([client] if client else [])],
                       check=True, capture_output=True, timeout=30)
    from protocol.keys import Identity

    PASSWORDS.setdefault(Identity.from_seed(AGENT_KEY_SEED).id, secrets.token_urlsafe(12))
    for user, password in PASSWORDS.items():
        add_user(certs / "passwd", user, password)
    return certs


@dataclass
class RunningBroker:
    port: int
    conf: Path
    log: Path
    ca: Path
    pki: Path
    process: subprocess.Popen


def _start_broker(folder: Path, pki: Path, account, *, edit=None) -> RunningBroker:
    """Render the templates into `folder` (`edit` may change the conf), start Mosquitto, wait for it."""
    folder.mkdir(parents=True)
    for name in ("ca.crt", "server.crt", "server.key", "passwd"):
        shutil.copy2(pki / name, folder / name)
    (folder / "data").mkdir()
    port = free_port()
    conf = render(folder, port=port, gateway_id=GW, listen=HOST, conf_dir=folder,
                  data_dir=folder / "data", log_file=folder / "mosquitto.log")
    if edit is not None:
        conf.write_text(edit(conf.read_text()))
    _hand_over(folder, account)
    out = open(folder / "stderr.txt", "wb")
    process = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    out.close()
    broker = RunningBroker(port, conf, folder / "mosquitto.log", folder / "ca.crt", pki, process)
    end = time.monotonic() + WAIT
    while True:
        if process.poll() is not None:
            raise AssertionError(f"mosquitto exited with {process.returncode}:\n{_logs(broker)}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return broker
        except OSError:
            if time.monotonic() > end:
                _stop(process)
                raise AssertionError(f"mosquitto did not listen on {port}:\n{_logs(broker)}") from None
            time.sleep(0.02)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _logs(broker: RunningBroker) -> str:
    files = (broker.log, broker.conf.parent / "stderr.txt")
    parts = [p.read_text(errors="replace") for p in files if p.exists()]
    return "\n".join(parts)


@pytest.fixture
def broker_factory(workroot, pki, request):
    root, account = workroot
    started: list[RunningBroker] = []

    def start(edit=None) -> RunningBroker:
        folder = root / f"{request.node.name}-{len(started)}"
        broker = _start_broker(folder, pki, account, edit=edit)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        _stop(broker.process)


@pytest.fixture
def broker(broker_factory):
    return broker_factory()


# --- client helpers -----------------------------------------------------------------------------


class Client:
    """A paho client with its CONNACK, SUBACKs and messages in queues; the `clients` fixture closes it."""

    def __init__(self, broker: RunningBroker, username: str | None, password: str | None = None, *,
                 client_id: str = "", clean: bool = True, will: tuple[str, bytes] | None = None,
                 host: str = HOST, cert: str | None = None, protocol=mqtt.MQTTv311) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.connacks: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.session_present: bool | None = None
        self.code: mqtt.ReasonCode | None = None
        # No automatic reconnection: a refused or dropped client must stay down.
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                        clean_session=clean if protocol != mqtt.MQTTv5 else None, reconnect_on_failure=False)
        c.on_connect = self._on_connect
        # A connection closed before any CONNACK (e.g. a TLS alert after the handshake) shows up as None.
        c.on_disconnect = lambda _c, _u, _flags, _rc, _p: self.connacks.put(None)
        c.on_message = lambda _c, _u, msg: self.inbox.put((msg.topic, msg.payload, bool(msg.retain)))
        c.on_subscribe = lambda _c, _u, mid, codes, _p: self.subacks.put((mid, [int(x.value) for x in codes]))
        if username is not None:
            c.username_pw_set(username, password)
        certfile = keyfile = None
        if cert is not None:
            certfile, keyfile = str(broker.pki / f"{cert}.crt"), str(broker.pki / f"{cert}.key")
        c.tls_set(ca_certs=str(broker.ca), certfile=certfile, keyfile=keyfile, cert_reqs=ssl.CERT_REQUIRED)
        c.tls_insecure_set(False)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.max_inflight_messages_set(200)
        self.mqtt = c
        self._host, self._port = host, broker.port

    def _on_connect(self, _c, _u, flags, reason_code, _props) -> None:
        self.session_present = bool(flags.session_present)
        self.connacks.put(reason_code)

    def connect(self) -> mqtt.ReasonCode | None:
        """Connect; return the CONNACK reason code, or None if the broker hung up without one."""
        self.mqtt.connect(self._host, self._port, keepalive=30)
        self.mqtt.loop_start()
        try:
            code = self.connacks.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError("no CONNACK") from None
        self.code = code
        if code is None or code.is_failure:
            self.close()
        return code

    def subscribe(self, *topics: str) -> list[int]:
        """Subscribe at QoS 1 and return the SUBACK codes (1 = granted QoS 1, 128 = refused)."""
        result, mid = self.mqtt.subscribe([(topic, 1) for topic in topics])
        assert result == mqtt.MQTT_ERR_SUCCESS
        got_mid, codes = self.subacks.get(timeout=WAIT)
        assert got_mid == mid
        return codes

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the PUBACK (which Mosquitto also sends for a denied publish)."""
        info = self.mqtt.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def expect(self, count: int, timeout: float = WAIT) -> list[tuple[str, bytes, bool]]:
        got = []
        end = time.monotonic() + timeout
        while len(got) < count:
            try:
                got.append(self.inbox.get(timeout=max(0.0, end - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"expected {count} messages, got {len(got)}: {got}") from None
        return got

    def assert_quiet(self, wait: float = QUIET) -> None:
        time.sleep(wait)
        extra = []
        while not self.inbox.empty():
            extra.append(self.inbox.get_nowait())
        assert not extra, f"unexpected deliveries: {extra}"

    def drop_connection(self) -> None:
        """Vanish without DISCONNECT, like a device losing power: the broker then publishes the will."""
        sock = self.mqtt.socket()
        if sock is not None:
            # No MQTT DISCONNECT, no TLS close_notify; this also wakes paho's loop, which then ends.
            sock.shutdown(socket.SHUT_RDWR)
        self.mqtt.loop_stop()

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


@pytest.fixture
def clients(request):
    """`connect(user, ...)` returns a connected Client (password from PASSWORDS); all are closed afterwards.

    Clients go to the test's `broker` fixture unless `target=` names another one.
    """
    made: list[Client] = []

    def connect(username: str | None, password: str | None = None, *, target: RunningBroker | None = None,
                expect_ok: bool = True, **kwargs) -> Client:
        if password is None and username is not None:
            password = PASSWORDS.get(username)
        client = Client(target or request.getfixturevalue("broker"), username, password, **kwargs)
        made.append(client)
        code = client.connect()
        if expect_ok:
            assert code is not None and not code.is_failure, f"{username} was refused: {code}"
        return client

    yield connect
    for client in made:
        try:
            client.close()
        except Exception:
            pass


# --- the gateway's own clients (protocol.transport.BrokerAuth) -----------------------------------


def _gateway_auth(broker, tmp_path: Path, password: str | None = None):
    from protocol.transport import BrokerAuth

    secret = tmp_path / "gw.password"
    secret.write_text((password or PASSWORDS[GW_USER]) + "\n")
    secret.chmod(0o600)
    return BrokerAuth(tls_ca=broker.ca, username=GW_USER, password_file=secret)


def test_the_gateway_connection_goes_over_tls_with_its_password_file_and_hears_a_device(broker, clients, tmp_path):
    from mqttlink import Connection, ConnectionOptions

    options = ConnectionOptions(GW_USER, HOST, broker.port, _gateway_auth(broker, tmp_path),
                                subscriptions=((t("reply", "+"), 1),))
    with Connection(options) as link:  # as the gateway's service makes its connection
        assert isinstance(link.client.socket(), ssl.SSLSocket)
        assert link.subscribed.wait(WAIT)
        clients(DEV_A).publish(t("reply", DEV_A), b"update")
        message = link.inbox.get(timeout=WAIT)
        assert (message.topic, message.payload) == (t("reply", DEV_A), b"update")


def test_the_gateway_connection_with_a_wrong_password_does_not_connect(broker, tmp_path):
    from mqttlink import ConnectError, Connection, ConnectionOptions

    with pytest.raises(ConnectError) as refused:
        with Connection(ConnectionOptions(GW_USER, HOST, broker.port, _gateway_auth(broker, tmp_path, "wrong"))):
            pass
    assert refused.value.refused  # the broker said no (not a timeout)


def test_the_agent_connects_over_tls_as_its_device_id_and_its_enroll_request_reaches_the_gateway(
        broker, clients, tmp_path):
    import threading

    from agent.config import AgentConfig
    from agent.service import Agent
    from hw.synthetic import SyntheticModel, synthetic_data
    from protocol import envelope
    from protocol.keys import Identity
    from protocol.transport import BrokerAuth

    device = Identity.from_seed(AGENT_KEY_SEED)
    gateway = clients(GW_USER)
    assert gateway.subscribe(f"starling/{GW}/enroll/+", f"starling/{GW}/online/+") == [1, 1]
    secret = tmp_path / "device.password"
    secret.write_text(PASSWORDS[device.id])
    secret.chmod(0o600)
    auth = BrokerAuth(tls_ca=broker.ca, username=device.id, password_file=secret)
    config = AgentConfig(name="tls", key=tmp_path / "d.key", state_dir=tmp_path / "state", gateway_id=GW,
                         gateway_public_key=bytes(32), broker_host=HOST, broker_port=broker.port,
                         replay=tmp_path / "none.npz", enroll_retry_s=0.5, broker_auth=auth)
    agent = Agent(config, device, SyntheticModel({"w": (3,)}, seed=1), synthetic_data(8))
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        got = {topic: payload for topic, payload, _ in gateway.expect(2, timeout=15)}
    finally:
        stop.set()
        thread.join(20)
    assert got[t("online", device.id)] == b"1"
    assert envelope.decode(got[t("enroll", device.id)]).ctx.sender == device.public_key


def test_ingest_workers_share_the_reply_topic_through_tls_and_the_acl(broker, clients, tmp_path):
    import logging

    from gateway.ingest_workers import IngestWorkers, WorkerSettings

    inbox: queue.Queue = queue.Queue()
    settings = WorkerSettings(GW, HOST, broker.port, _gateway_auth(broker, tmp_path), 1 << 20, logging.INFO)
    with IngestWorkers(2, settings, inbox, lambda: ([], [])):
        time.sleep(2.0)  # spawned, connected over TLS, subscribed
        device = clients(DEV_A)
        for i in range(6):
            device.publish(t("reply", DEV_A), b"not an envelope %d" % i)
        got = [inbox.get(timeout=WAIT) for _ in range(6)]
    assert sorted(payload for _, payload, _ in got) == [b"not an envelope %d" % i for i in range(6)]
    assert all(outcome.reason == "malformed" for _, _, outcome in got)


# --- TLS and authentication ----------------------------------------------------------------------


def test_mosquitto_accepts_the_rendered_config_and_serves_tls_to_a_device_with_its_password(broker, clients):
    text = broker.conf.read_text() + (broker.conf.parent / "acl.conf").read_text()
    assert not re.search(r"@[A-Z_]+@", text), "a placeholder was left unfilled"
    device = clients(DEV_A)
    tls = device.mqtt.socket()
    assert isinstance(tls, ssl.SSLSocket)
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert tls.getpeercert()["subjectAltName"] == (("IP Address", HOST),)
    end = time.monotonic() + 10  # Mosquitto writes its log a moment after the CONNACK (later under load)
    while f"u'{DEV_A}'" not in broker.log.read_text() and time.monotonic() < end:
        time.sleep(0.05)
    log = broker.log.read_text()
    assert "running" in log and "Error" not in log
    assert f"u'{DEV_A}'" in log, "connection messages are logged with the username"


def test_client_rejects_a_broker_certificate_that_does_not_name_the_host(broker):
    # The server certificate names 127.0.0.1 only: with hostname checking on, "localhost" must fail.
    client = Client(broker, DEV_A, PASSWORDS[DEV_A], host="localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        client.mqtt.connect("localhost", broker.port)


def test_anonymous_client_is_refused(clients):
    client = clients(None, expect_ok=False)
    assert client.code.is_failure and int(client.code.value) == 135  # Not authorized (CONNACK 5)


def test_wrong_password_is_refused(clients):
    client = clients(DEV_A, "not-" + PASSWORDS[DEV_A], expect_ok=False)
    assert client.code.is_failure and int(client.code.value) == 135


def test_unknown_user_is_refused(clients):
    client = clients("c0" * 16, PASSWORDS[DEV_A], expect_ok=False)
    assert client.code.is_failure


def _mqtt_connect_packet(client_id: str, username: str, password: str) -> bytes:
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("!H", len(raw)) + raw

    flags = 0b1100_0010  # username, password, clean session
    body = s("MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + s(client_id) + s(username) + s(password)
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


def test_plain_tcp_connection_is_refused_even_with_valid_credentials(broker):
    with socket.create_connection((HOST, broker.port), timeout=WAIT) as sock:
        sock.sendall(_mqtt_connect_packet("plain", DEV_A, PASSWORDS[DEV_A]))
        try:
            answer = sock.recv(64)
        except ConnectionResetError:
            answer = b""
    # An MQTT CONNACK would start with 0x20; the TLS listener answers with at most a TLS alert and closes.
    assert not answer.startswith(b"\x20"), answer
    assert answer == b"" or answer[0] == 0x15, answer  # 0x15: TLS alert record


# --- ACL: what a device may publish --------------------------------------------------------------


def test_device_publishes_its_own_reply_enroll_and_online_and_the_gateway_receives_them(clients):
    gateway = clients(GW_USER)
    assert gateway.subscribe(f"starling/{GW}/#") == [1]
    device = clients(DEV_A)
    sent = [(t("reply", DEV_A), b"reply"), (t("enroll", DEV_A), b"enroll"), (t("online", DEV_A), b"1")]
    for topic, payload in sent:
        device.publish(topic, payload)
    assert [(topic, payload) for topic, payload, _ in gateway.expect(3)] == sent
    gateway.assert_quiet()


def test_device_cannot_publish_for_another_device_or_as_the_gateway(clients):
    gateway = clients(GW_USER)
    assert gateway.subscribe("starling/#") == [1]
    device = clients(DEV_A)
    device.publish(t("reply", DEV_A), b"first")  # delivery works ...
    assert gateway.expect(1)[0][:2] == (t("reply", DEV_A), b"first")
    forbidden = [t("reply", DEV_B), t("enroll", DEV_B), t("online", DEV_B), t("task", DEV_A),
                 t("receipt", DEV_A), t("model", "00" * 32), t("status"), "starling/ledger/vertex",
                 f"starling/{GW}",
                 f"starling/{GW}/extra/reply/{DEV_A}"]  # `+` in the ACL matches one level only
    for topic in forbidden:
        device.publish(topic, b"forged")  # ... Mosquitto PUBACKs these (MQTT 3.1.1) and drops them
    device.publish(t("reply", DEV_A), b"last")
    # Same publisher, same subscriber: a forged message would have arrived before this one.
    assert gateway.expect(1)[0][:2] == (t("reply", DEV_A), b"last")
    gateway.assert_quiet()


def test_the_gateway_asks_for_and_serves_blobs_by_digest_and_a_device_can_do_neither(clients):
    """starling/blobs/want/<holder> and give/<requester>: a gateway writes both to anyone, reads only those
    addressed to it; a device neither asks nor reads another's answers (updates are the devices' own)."""
    gateway = clients(GW_USER)
    assert gateway.subscribe(f"starling/blobs/want/{GW}", f"starling/blobs/give/{GW}") == [1, 1]
    device = clients(DEV_A)
    device.subscribe("starling/blobs/#")
    device.publish(f"starling/blobs/want/{GW}", b"a device's want")  # PUBACKed and dropped
    device.publish(f"starling/blobs/give/{GW}", b"a device's give")
    gateway.publish(f"starling/blobs/want/{'b' * 32}", b"want of another holder")  # allowed; no device reads it
    gateway.publish(f"starling/blobs/give/{'b' * 32}", b"answer to another requester")
    gateway.publish(f"starling/blobs/want/{GW}", b"want")
    gateway.publish(f"starling/blobs/give/{GW}", b"give")
    assert [(topic, payload) for topic, payload, _ in gateway.expect(2)] == [
        (f"starling/blobs/want/{GW}", b"want"), (f"starling/blobs/give/{GW}", b"give")]
    gateway.assert_quiet()
    device.assert_quiet(0)


def test_mqtt5_device_is_told_its_forbidden_publish_was_not_authorised(clients):
    device = clients(DEV_A, protocol=mqtt.MQTTv5)
    acks: queue.Queue = queue.Queue()
    device.mqtt.on_publish = lambda _c, _u, mid, code, _p: acks.put((mid, int(code.value)))
    ok = device.mqtt.publish(t("reply", DEV_A), b"x", qos=1)
    bad = device.mqtt.publish(t("reply", DEV_B), b"x", qos=1)
    codes = dict(acks.get(timeout=WAIT) for _ in range(2))
    assert codes[ok.mid] in (0, 16)  # 16: accepted, "no matching subscribers"
    assert codes[bad.mid] == 135  # Not authorized


# --- ACL: what a device may read -----------------------------------------------------------------


def test_device_reads_only_its_own_task_and_receipt(clients):
    gateway = clients(GW_USER)
    device_a = clients(DEV_A)
    device_b = clients(DEV_B)
    device_a.subscribe(t("task", DEV_A), t("receipt", DEV_A))
    # B tries the other device's topics by name and through wildcards. Mosquitto 2.0.11 grants even
    # these subscriptions (SUBACK QoS 1) and enforces the ACL per message, at delivery; a broker
    # that refused them (128) would be fine too.
    codes = device_b.subscribe(t("task", DEV_A), t("receipt", DEV_A), t("task", "+"), "starling/#", "#")
    assert all(code in (1, 128) for code in codes), codes
    gateway.publish(t("task", DEV_A), b"task for A")
    gateway.publish(t("receipt", DEV_A), b"receipt for A")
    device_a.publish(t("reply", DEV_A), b"A's reply")
    gateway.publish(t("task", DEV_B), b"task for B")  # the marker: B must get this and nothing before it
    assert [(topic, payload) for topic, payload, _ in device_a.expect(2)] == [
        (t("task", DEV_A), b"task for A"), (t("receipt", DEV_A), b"receipt for A")]
    got_b = device_b.expect(1)
    assert got_b[0][:2] == (t("task", DEV_B), b"task for B")
    device_b.assert_quiet()
    device_a.assert_quiet(0)


def test_both_devices_read_the_retained_model_and_status(clients):
    gateway = clients(GW_USER)
    model = b"model release chunk" * 100
    model_topic = t("model", hashlib.sha256(model).hexdigest())
    status = json.dumps({"state": "training", "round": 3}).encode()
    gateway.publish(model_topic, model, retain=True)
    gateway.publish(t("status"), status, retain=True)
    for device_id in (DEV_A, DEV_B):
        device = clients(device_id)
        assert device.subscribe(t("model", "+"), "starling/+/status") == [1, 1]
        got = {topic: (payload, retained) for topic, payload, retained in device.expect(2)}
        assert got == {model_topic: (model, True), t("status"): (status, True)}


# --- last will --------------------------------------------------------------------------------------


def test_device_last_will_on_its_online_topic_reaches_the_gateway(clients):
    gateway = clients(GW_USER)
    gateway.subscribe(t("online", "+"))
    device = clients(DEV_A, client_id=DEV_A, will=(t("online", DEV_A), b"0"))
    device.publish(t("online", DEV_A), b"1", retain=True)
    assert gateway.expect(1)[0] == (t("online", DEV_A), b"1", False)
    device.drop_connection()
    assert gateway.expect(1)[0][:2] == (t("online", DEV_A), b"0")
    # The will is retained: whoever asks later learns that A is offline.
    late = clients(GW_USER)
    late.subscribe(t("online", DEV_A))
    assert late.expect(1)[0] == (t("online", DEV_A), b"0", True)


def test_device_last_will_on_another_devices_online_topic_is_not_delivered(clients):
    gateway = clients(GW_USER)
    gateway.subscribe(t("online", "+"))
    forger = clients(DEV_B, client_id=DEV_B, will=(t("online", DEV_A), b"0"), expect_ok=False)
    if forger.code is not None and not forger.code.is_failure:
        forger.drop_connection()  # Mosquitto 2.0.11 accepts the CONNECT; the will is dropped when it fires
    honest = clients(DEV_A)
    honest.publish(t("online", DEV_A), b"1")
    assert gateway.expect(1)[0][:2] == (t("online", DEV_A), b"1")
    gateway.assert_quiet()


# --- queues -------------------------------------------------------------------------------------


BACKLOG = 3000


def _backlog_delivered(clients, broker: RunningBroker) -> list[int]:
    """A persistent gateway session is offline while a device publishes BACKLOG QoS 1 replies.

    Returns the message numbers the session then receives, in order.
    """
    ingest_id = f"{GW_USER}-ingest"
    gateway = clients(GW_USER, client_id=ingest_id, clean=False, target=broker)
    assert gateway.subscribe(t("reply", "+")) == [1]
    gateway.close()
    device = clients(DEV_A, target=broker)
    acked = queue.Queue()
    device.mqtt.on_publish = lambda _c, _u, mid, _rc, _p: acked.put(mid)
    payload = bytes(1000)
    for i in range(BACKLOG):
        info = device.mqtt.publish(t("reply", DEV_A), struct.pack("!I", i) + payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
    end = time.monotonic() + 10.0
    for i in range(BACKLOG):
        try:
            acked.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"only {i} of {BACKLOG} publishes were acknowledged") from None
    back = clients(GW_USER, client_id=ingest_id, clean=False, target=broker)
    assert back.session_present, "the persistent session did not survive the disconnect"
    seen: list[int] = []
    end = time.monotonic() + 10.0
    while len(seen) < BACKLOG and time.monotonic() < end:
        try:
            _, body, _ = back.inbox.get(timeout=0.5)  # 0.5 s of silence: the queue has drained
        except queue.Empty:
            break
        seen.append(struct.unpack("!I", body[:4])[0])
    return seen


def test_offline_persistent_subscriber_receives_a_backlog_of_3000_qos1_messages(broker, clients):
    seen = _backlog_delivered(clients, broker)
    assert len(seen) == BACKLOG and set(seen) == set(range(BACKLOG)), \
        f"received {len(set(seen))} distinct of {BACKLOG}"
    assert seen == sorted(seen), "the backlog arrived out of order"


def test_with_mosquittos_default_queue_limit_the_same_backlog_loses_messages(broker_factory, clients):
    # Control for the test above: it really detects the default (1000) limit.
    default = broker_factory(edit=lambda text: re.sub(r"(?m)^max_queued_messages .*\n", "", text))
    seen = _backlog_delivered(clients, default)
    assert 1000 <= len(set(seen)) < BACKLOG


# --- client certificates (the switch the conf describes in a comment) ----------------------------


def test_client_certificate_mode_uses_the_certificate_cn_as_username(broker_factory, clients):
    def cert_mode(text: str) -> str:
        assert "\nrequire_certificate false\n" in text
        switched = "\nrequire_certificate true\nuse_identity_as_username true\n"
        return text.replace("\nrequire_certificate false\n", switched)

    broker = broker_factory(edit=cert_mode)
    gateway = clients(None, None, target=broker, cert=GW_USER)
    assert gateway.subscribe(t("reply", "+")) == [1]
    device = clients(None, None, target=broker, cert=DEV_A)
    device.publish(t("reply", DEV_B), b"forged")
    device.publish(t("reply", DEV_A), b"signed reply")
    assert gateway.expect(1)[0][:2] == (t("reply", DEV_A), b"signed reply")
    gateway.assert_quiet()
    # A password alone no longer gets in: the TLS handshake needs a client certificate.
    assert _refused(Client(broker, DEV_A, PASSWORDS[DEV_A]))


def _refused(client: Client) -> bool:
    """True when the broker does not let `client` in (TLS failure, dropped connection or a failed CONNACK)."""
    try:
        client.mqtt.connect(HOST, client._port)
    except (ssl.SSLError, OSError):
        return True
    client.mqtt.loop_start()
    try:
        code = client.connacks.get(timeout=WAIT)
        return code is None or code.is_failure
    finally:
        client.close()


# --- render and add_user ------------------------------------------------------------------------


def test_render_rejects_bad_values(tmp_path):
    good = dict(port=8883, gateway_id=GW, conf_dir=tmp_path, data_dir=tmp_path / "d", log_file=tmp_path / "l")
    for bad in (dict(gateway_id=GW.upper()), dict(gateway_id=GW[:-1]), dict(port=0), dict(port=70000),
                dict(port=True), dict(listen="0.0.0.0\nallow_anonymous true"), dict(listen="a b"),
                dict(conf_dir=tmp_path / "with space"), dict(log_file=Path("/tmp/x\ny"))):
        with pytest.raises(ValueError):
            render(tmp_path / "out", **{**good, **bad})
    assert not (tmp_path / "out" / "starling.conf").exists()


def test_render_cli_writes_both_files_with_defaults_for_production(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    help_text = subprocess.run([sys.executable, "-m", "hw.mosquitto.render", "--help"], env=env,
                               capture_output=True, text=True, check=True).stdout
    assert "--gateway-id" in help_text and "device id" in help_text
    cli = [sys.executable, "-m", "hw.mosquitto.render", "--dest", str(tmp_path)]
    run = dict(env=env, capture_output=True, text=True)
    out = subprocess.run([*cli, "--gateway-id", GW], check=True, **run).stdout
    conf = Path(out.strip())
    assert conf == tmp_path / "starling.conf"
    text = conf.read_text()
    assert re.search(r"(?m)^listener 8883 0\.0\.0\.0$", text)
    assert re.search(rf"(?m)^cafile {re.escape(str(tmp_path))}/ca\.crt$", text)
    assert re.search(r"(?m)^persistence_location /var/lib/mosquitto/$", text)
    assert re.search(rf"(?m)^user gw-{GW}$", (tmp_path / "acl.conf").read_text())
    bad = subprocess.run([*cli, "--gateway-id", "x"], **run)
    assert bad.returncode == 2 and "32 lowercase hex" in bad.stderr


def test_add_user_creates_a_private_password_file_and_updates_users(tmp_path):
    passwd = tmp_path / "passwd"
    add_user(passwd, DEV_A, "one")
    assert passwd.stat().st_mode & 0o777 == 0o600
    first = passwd.read_text()
    add_user(passwd, DEV_B, "two")
    add_user(passwd, DEV_A, "three")
    users = [line.split(":", 1)[0] for line in passwd.read_text().splitlines() if line]
    assert sorted(users) == sorted([DEV_A, DEV_B])
    assert first.splitlines()[0] not in passwd.read_text(), "the password of A was not changed"
    for bad in ("", "a:b", "a b", "dev/1", "+", "#"):
        with pytest.raises(ValueError):
            add_user(passwd, bad, "pw")
    with pytest.raises(ValueError):
        add_user(passwd, DEV_A, "line\nbreak")
