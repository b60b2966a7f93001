"""The dashboard's surfaces without a browser: chart, snapshot, HTTP server, command line, TLS broker, imports."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from dashboard_helpers import gateway_id, run_messages
from required_tools import needs

from dashboard.chart import accuracy_svg
from dashboard.cli import main, parse_listen
from dashboard.feed import parse_broker_url
from dashboard.fleet import Fleet
from dashboard.server import serve
from dashboard.view import snapshot
from hw.broker import find_mosquitto

ROOT = Path(__file__).resolve().parents[2]
GW = gateway_id()


# --- chart and snapshot ------------------------------------------------------------------------


def test_the_chart_draws_one_point_per_evaluated_round_on_a_fixed_axis():
    svg = accuracy_svg([(0, 0.1), (1, 0.5), (2, 1.7)])
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<circle") == 3 and "<polyline" in svg
    assert "round 2: 1.000" in svg  # clamped to the axis
    assert "no evaluation yet" in accuracy_svg([])
    assert "style=" not in svg  # the page's CSP allows no inline style


def test_the_snapshot_lists_troubled_devices_first_and_keeps_network_text_out_of_markup(replayed):
    hostile = "<img src=x onerror=alert(1)>"
    replayed.apply(f"starling/{GW}/status", json.dumps({"state": "running", "name": hostile}).encode(), 3000.0)
    replayed.apply(f"starling/{GW}/status/device/{'f' * 32}",
                   json.dumps({"accepted": 1, "rejected": {"malformed": 3}}).encode(), 3000.0)
    doc = snapshot(replayed, 3000.0)
    assert doc["devices"][0]["device"] == "f" * 32 and doc["devices_total"] == 4
    [gw] = doc["gateways"]
    assert gw["name"] == hostile and "<img" not in gw["accuracy_svg"]
    assert gw["accuracy"] == pytest.approx(gw["accuracy_series"][-1][1]) and len(gw["accuracy_series"]) == 4
    json.dumps(doc)  # all of it is JSON


# --- HTTP ----------------------------------------------------------------------------------------


@pytest.fixture
def served():
    fleet = Fleet()
    server, thread = serve(fleet, "127.0.0.1", 0)
    yield fleet, server
    server.stop()
    thread.join(5)


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_server_serves_the_page_its_assets_and_the_snapshot_under_a_strict_csp(served):
    fleet, server = served
    for topic, payload in run_messages():
        fleet.apply(topic, payload, time.time())
    status, headers, body = _get(server.url)
    assert status == 200 and b'<script src="/app.js"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"] and "unsafe-inline" not in body.decode()
    assert _get(server.url + "app.js")[0] == 200 and _get(server.url + "app.css")[0] == 200
    status, headers, body = _get(server.url + "api/fleet")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["gateways"][0]["id"] == GW
    assert _get(server.url + "nothing-here")[0] == 404


def test_the_event_stream_sends_a_snapshot_at_once_and_another_on_change_and_ends_on_stop(served):
    fleet, server = served
    events: list[dict] = []
    ended = threading.Event()

    def listen() -> None:
        with urllib.request.urlopen(server.url + "events", timeout=10) as stream:
            for line in stream:
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
        ended.set()

    threading.Thread(target=listen, daemon=True).start()
    end = time.monotonic() + 10
    while not events and time.monotonic() < end:
        time.sleep(0.05)
    assert events and events[0]["gateways"] == []
    fleet.apply(f"starling/{GW}/status", b'{"state": "running", "name": "gw-1"}', time.time())
    while len(events) < 2 and time.monotonic() < end:
        time.sleep(0.05)
    assert events[-1]["gateways"][0]["name"] == "gw-1"
    server.stopping.set()
    with fleet.changed:
        fleet.changed.notify_all()
    assert ended.wait(5), "an open stream must not outlive the server"


# --- command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("mqtt://127.0.0.1", ("127.0.0.1", 1883, False)),
    ("mqtts://broker.city.example", ("broker.city.example", 8883, True)),
    ("mqtts://[::1]:9883/", ("::1", 9883, True)),
])
def test_broker_urls_name_host_port_and_tls(url, expected):
    broker = parse_broker_url(url)
    assert (broker.host, broker.port, broker.tls) == expected


@pytest.mark.parametrize("url", ["http://x", "mqtt://", "mqtt://h:99999", "mqtt://u:p@h", "mqtt://h/topic", "h:1883"])
def test_other_broker_urls_are_refused(url):
    with pytest.raises(ValueError):
        parse_broker_url(url)


def test_listen_addresses():
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8080", "host:", "host:http", ":80"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_bad_options_exit_2_with_a_message(tmp_path, capsys):
    assert main(["--broker", "mqtt://127.0.0.1:1883", "--tls-ca", str(tmp_path / "ca.crt")]) == 2
    assert "--tls-ca needs an mqtts://" in capsys.readouterr().err
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    assert main(["--broker", "mqtt://127.0.0.1:1883", "--username", "dashboard", "--password-file", str(secret)]) == 2
    assert "readable by others" in capsys.readouterr().err


def test_the_dashboard_imports_only_protocol_mqttlink_paho_and_the_standard_library():
    code = (
        "import sys; before = set(sys.modules)\n"
        "import dashboard.cli, dashboard.server, dashboard.feed, dashboard.view, dashboard.alerts\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(','.join(sorted(new - set(sys.stdlib_module_names) - {'dashboard', 'protocol', 'mqttlink', 'paho', 'numpy',"
        " 'cbor2', '_cbor2', 'nacl', '_cffi_backend', 'cffi', '_sodium'})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


# --- a real broker, with TLS and a password, and the ACL lines the dashboard's user needs -----------


DASHBOARD_ACL = """\
user dashboard
topic read starling/+/status
topic read starling/+/status/device/+
topic read starling/ledger/vv/+
topic read starling/ledger/vertex/+
user writer
topic write starling/#
"""


def _tls_broker(tmp_path: Path) -> tuple[subprocess.Popen, int, Path, Path]:
    """Mosquitto on a free loopback port: TLS only, no anonymous clients, users `dashboard` and `writer`."""
    from hw.broker import find_mosquitto, free_port

    conf_dir = tmp_path / "broker"
    subprocess.run(["bash", str(ROOT / "hw" / "mosquitto" / "make-certs.sh"), str(conf_dir), "127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    passwd = conf_dir / "passwd"
    passwd.touch(mode=0o600)
    for user in ("dashboard", "writer"):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, f"{user}-secret"], check=True, timeout=30)
    (conf_dir / "acl").write_text(DASHBOARD_ACL)
    port = free_port()
    user = "root" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    (conf_dir / "mosquitto.conf").write_text(
        f"user {user}\nper_listener_settings false\nallow_anonymous false\npassword_file {passwd}\n"
        f"acl_file {conf_dir / 'acl'}\nlistener {port} 127.0.0.1\ncafile {conf_dir / 'ca.crt'}\n"
        f"certfile {conf_dir / 'server.crt'}\nkeyfile {conf_dir / 'server.key'}\ntls_version tlsv1.2\n"
        f"log_dest file {conf_dir / 'mosquitto.log'}\n")
    broker = subprocess.Popen([find_mosquitto(), "-c", str(conf_dir / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    password = tmp_path / "dashboard.password"
    password.write_text("dashboard-secret\n")
    password.chmod(0o600)
    return broker, port, conf_dir / "ca.crt", password


@needs(find_mosquitto() is not None and shutil.which("mosquitto_passwd") is not None
       and shutil.which("openssl") is not None, "needs mosquitto, mosquitto_passwd and openssl (hw/install-system.sh)")
def test_over_tls_with_a_password_the_dashboard_reads_the_status_topics_and_stops_on_sigterm(tmp_path):
    import paho.mqtt.client as mqtt

    from hw.dashboard_demo import start_dashboard, wait_for

    broker, port, ca, password = _tls_broker(tmp_path)
    dashboard = None
    try:
        dashboard = start_dashboard(f"mqtts://127.0.0.1:{port}", tmp_path / "dashboard.log",
                                    extra=["--tls-ca", str(ca), "--username", "dashboard", "--password-file",
                                           str(password)])
        wait_for(lambda: dashboard.fleet()["broker"]["connected"], 20, "the dashboard's TLS connection")
        writer = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="writer")
        writer.tls_set(ca_certs=str(ca))
        writer.username_pw_set("writer", "writer-secret")
        writer.connect("127.0.0.1", port)
        writer.loop_start()
        topic, payload = next((t, p) for t, p in reversed(run_messages()) if t.endswith("/status"))
        writer.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
        writer.publish(topic, b"not json", qos=1).wait_for_publish(10)
        writer.disconnect()
        writer.loop_stop()
        doc = wait_for(lambda: (d := dashboard.fleet())["gateways"] and d["malformed"]["total"] and d, 20,
                       "the status and the malformed message")
        assert doc["gateways"][0]["state"] == "done" and doc["malformed"]["by_reason"] == {"not_json": 1}
        dashboard.process.send_signal(signal.SIGTERM)
        assert dashboard.process.wait(15) == 0
        log = dashboard.log.read_text()
        assert "mqtt.connected broker=mqtts://127.0.0.1" in log and "dashboard.stop" in log
        assert "status.malformed reason=not_json" in log and "Traceback" not in log
    finally:
        if dashboard is not None and dashboard.process.poll() is None:
            dashboard.process.kill()
        broker.terminate()
        broker.wait(10)
