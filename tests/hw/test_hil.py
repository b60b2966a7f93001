"""Hardware in the loop (hw/hil.py, Broker(listen=...)): the pieces a real device joins with.

A real Mosquitto with a second listener on 127.0.0.2 (all of 127.0.0.0/8 is
loopback on Linux) stands in for the LAN address; the join kit's agent.toml
is loaded by the agent's own config loader, and its vouchers are checked
by protocol.vouchers, as the gateway does.
"""

from __future__ import annotations

import json
import queue
import shlex
import socket
import stat
import time

import paho.mqtt.client as mqtt
import pytest
from required_tools import needs

from agent.config import load_config
from hw.broker import Broker, find_mosquitto
from hw.hil import VoucherDesk, advertised_address, instructions, parse_listen, write_join_kit
from protocol.keys import Identity
from protocol.vouchers import Voucher, VoucherRefused

needs_mosquitto = needs(find_mosquitto() is not None, "needs mosquitto (hw/install-system.sh)")


@pytest.mark.parametrize("text, expected", [
    ("0.0.0.0:1883", ("0.0.0.0", 1883)),
    ("192.168.1.20:1883", ("192.168.1.20", 1883)),
    ("192.168.1.20", ("192.168.1.20", 1883)),
    (":1884", ("0.0.0.0", 1884)),
    (" 10.0.0.7:65535 ", ("10.0.0.7", 65535)),
])
def test_parse_listen_accepts_host_port_forms(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text, problem", [
    ("", "empty"),
    ("300.1.1.1:1883", "not an IPv4 address"),
    ("mypi.local:1883", "not an IPv4 address"),
    ("192.168.1.20:0", "out of range"),
    ("192.168.1.20:70000", "out of range"),
    ("192.168.1.20:mqtt", "not a number"),
    ("192.168.1.20:", "not a number"),
    ("[::]:1883", "IPv6"),
    ("::1", "IPv6"),
])
def test_parse_listen_refuses_garbage_naming_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_listen(text)


def test_advertised_address_is_the_host_or_a_reachable_address_for_all_interfaces():
    assert advertised_address("192.168.1.20") == "192.168.1.20"
    address = advertised_address("0.0.0.0")
    assert address and address != "0.0.0.0" and not address.startswith("127.")


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _client(host: str, port: int, client_id: str):
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    inbox: queue.Queue = queue.Queue()
    connected = queue.Queue()
    c.on_connect = lambda _c, _u, _f, reason, _p: connected.put(reason)
    c.on_message = lambda _c, _u, msg: inbox.put((msg.topic, msg.payload))
    c.connect(host, port, keepalive=10)
    c.loop_start()
    assert not connected.get(timeout=5).is_failure  # anonymous, accepted
    return c, inbox


@needs_mosquitto
def test_mosquitto_serves_anonymous_clients_on_loopback_and_the_listen_address(tmp_path):
    listen = ("127.0.0.2", _free_port("127.0.0.2"))
    with Broker(tmp_path, kind="mosquitto", listen=listen) as broker:
        conf = (tmp_path / "mosquitto.conf").read_text()
        assert f"listener {broker.port} 127.0.0.1" in conf and f"listener {listen[1]} 127.0.0.2" in conf
        local, local_inbox = _client(broker.host, broker.port, "emulated")
        remote, remote_inbox = _client(*listen, "real-device")
        try:
            for c in (local, remote):
                c.subscribe("starling/hil/#", qos=1)
            time.sleep(0.3)
            remote.publish("starling/hil/up", b"from the pi", qos=1).wait_for_publish(5)
            local.publish("starling/hil/down", b"from the laptop", qos=1).wait_for_publish(5)
            for inbox in (local_inbox, remote_inbox):
                got = {inbox.get(timeout=5), inbox.get(timeout=5)}
                assert got == {("starling/hil/up", b"from the pi"), ("starling/hil/down", b"from the laptop")}
        finally:
            for c in (local, remote):
                c.disconnect()
                c.loop_stop()


@needs_mosquitto
def test_a_listen_address_in_use_is_refused_with_its_address(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.2", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = Broker(tmp_path, kind="mosquitto", listen=("127.0.0.2", port))
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.2:{port}"):
            broker.start()
        assert broker.process is None  # refused before Mosquitto was started


def test_the_embedded_broker_cannot_listen_for_other_machines(tmp_path):
    with pytest.raises(ValueError, match="needs Mosquitto"):
        Broker(tmp_path, kind="embedded", listen=("0.0.0.0", 1883))


def test_the_desks_voucher_admits_that_device_at_that_gateway_only(tmp_path):
    desk = VoucherDesk(tmp_path / "desk")
    assert stat.S_IMODE((tmp_path / "desk" / "operator.key").stat().st_mode) == 0o600
    assert VoucherDesk(tmp_path / "desk").public_key == desk.public_key  # loaded, not made again
    device, other, gateway = Identity.generate(), Identity.generate(), Identity.generate()
    voucher = Voucher.decode(desk.issue(device.public_key, gateway.id, days=1))
    trusted = [bytes.fromhex(k) for k in desk.enrollment_table()["operator_keys"]]
    voucher.check(trusted, device.public_key, gateway.id)
    with pytest.raises(VoucherRefused, match="another device"):
        voucher.check(trusted, other.public_key, gateway.id)
    with pytest.raises(VoucherRefused, match="for gateway"):
        voucher.check(trusted, device.public_key, Identity.generate().id)
    with pytest.raises(VoucherRefused, match="expired"):
        voucher.check(trusted, device.public_key, gateway.id, now=time.time() + 2 * 86400)
    anywhere = Voucher.decode(desk.write_voucher(tmp_path / "v.cbor", device.public_key).read_bytes())
    anywhere.check(trusted, device.public_key, Identity.generate().id)
    with pytest.raises(ValueError, match="days"):
        desk.issue(device.public_key, gateway.id, days=0)


def test_the_enrollment_table_is_a_valid_gateway_voucher_policy(tmp_path):
    from gateway.config import parse_config

    desk = VoucherDesk(tmp_path / "desk")
    config = parse_config({"gateway": {"name": "gw-1", "key": "gw.key", "state_dir": "state"},
                           "enrollment": desk.enrollment_table()}, tmp_path)
    assert config.policy == "voucher" and config.operator_keys == (desk.public_key,)


def _gateways() -> tuple[list[dict[str, str]], list[Identity]]:
    keys = [Identity.generate(), Identity.generate()]
    return [{"name": f"gw-{i + 1}", "id": k.id, "public_key": k.public_key.hex()}
            for i, k in enumerate(keys)], keys


def test_the_join_kit_config_loads_on_the_device_and_its_voucher_admits_the_device(tmp_path):
    gateways, keys = _gateways()
    device = Identity.generate()
    desk = VoucherDesk(tmp_path / "desk")
    pi = tmp_path / "pi"  # the device's / (as hw/install.sh's STARLING_ROOT)
    kit = write_join_kit(tmp_path / "kit", "192.168.1.20", 1883, gateways, "imu_cnn", device.public_key.hex(),
                         desk, gateway="gw-2", root=pi)
    files = sorted(p.name for p in kit.folder.iterdir())
    assert files == ["JOIN.txt", "agent.toml", "operator.pub", "voucher.cbor"]
    assert (kit.folder / "operator.pub").read_text().strip() == desk.public_key.hex()
    # What hw/install.sh and the steps put on the device: the key, the state folder, the voucher.
    device.save(pi / "var/lib/starling/device.key")
    (pi / "etc/starling").mkdir(parents=True)
    (pi / "etc/starling/voucher.cbor").write_bytes(kit.voucher.read_bytes())
    config = load_config(kit.config)
    assert Identity.load(config.key).public_key == device.public_key
    assert config.state_dir == pi / "var/lib/starling" and config.voucher.is_file()
    assert (config.gateway_id, config.gateway_public_key) == (keys[1].id, keys[1].public_key)
    assert (config.broker_host, config.broker_port, config.model) == ("192.168.1.20", 1883, "imu_cnn")
    assert config.replay is None and [s["kind"] for s in config.sensors] == ["mpu6050"]
    assert config.sampling.labels == pi / "var/lib/starling/labels.csv"
    Voucher.decode(config.voucher.read_bytes()).check([desk.public_key], device.public_key, config.gateway_id)
    text = instructions(kit)
    assert "192.168.1.20:1883" in text and keys[1].id in text and keys[1].public_key.hex() in text
    assert str(kit.voucher) in text and device.id in text


def test_a_kit_without_sensors_replays_recorded_windows(tmp_path):
    gateways, _ = _gateways()
    kit = write_join_kit(tmp_path / "kit", "10.0.0.5", 1884, gateways, "imu_cnn", None,
                         VoucherDesk(tmp_path / "d"), sensors=(), root=tmp_path / "pi")
    config = load_config(kit.config)
    assert config.replay == tmp_path / "pi/var/lib/starling/replay.npz" and config.sensors == ()
    assert "--replay" in kit.steps.read_text()


def test_without_a_device_key_the_printed_command_mints_a_voucher_that_works(tmp_path, capsys):
    from agent.cli import main as agent_main
    from ledger.cli import main as ledger_main

    gateways, keys = _gateways()
    desk = VoucherDesk(tmp_path / "desk")
    kit = write_join_kit(tmp_path / "kit", "10.0.0.5", 1883, gateways, "imu_cnn", None, desk)
    assert kit.voucher is None and not (kit.folder / "voucher.cbor").exists()
    text = instructions(kit)
    assert "--device <PUBLIC_KEY>" in text and "device.json" in text
    # On the device: `starling-agent keygen` prints the public key (hw/install.sh keeps it as device.json).
    assert agent_main(["keygen", "--key", str(tmp_path / "device.key")]) == 0
    public_key = json.loads(capsys.readouterr().out)["public_key"]
    command = next(line.strip() for line in text.splitlines() if "starling-ledger voucher" in line)
    argv = shlex.split(command.replace("<PUBLIC_KEY>", public_key))
    assert argv[0] == "starling-ledger" and ledger_main(argv[1:]) == 0
    voucher = Voucher.decode((kit.folder / "voucher.cbor").read_bytes())
    voucher.check([desk.public_key], bytes.fromhex(public_key), keys[0].id)


def test_the_device_key_may_be_the_json_that_keygen_prints(tmp_path):
    gateways, keys = _gateways()
    device = Identity.generate()
    (tmp_path / "device.json").write_text(json.dumps({"id": device.id, "public_key": device.public_key.hex()}))
    desk = VoucherDesk(tmp_path / "desk")
    kit = write_join_kit(tmp_path / "kit", "10.0.0.5", 1883, gateways, "imu_cnn", tmp_path / "device.json",
                         desk)
    Voucher.decode(kit.voucher.read_bytes()).check([desk.public_key], device.public_key, keys[0].id)


def test_the_kit_refuses_to_hold_the_operator_key_or_bad_inputs(tmp_path):
    gateways, _ = _gateways()
    desk = VoucherDesk(tmp_path / "hil")
    with pytest.raises(ValueError, match="private key"):
        write_join_kit(tmp_path / "hil", "10.0.0.5", 1883, gateways, "imu_cnn", None, desk)
    with pytest.raises(ValueError, match="private key"):
        write_join_kit(tmp_path, "10.0.0.5", 1883, gateways, "imu_cnn", None, desk)
    with pytest.raises(ValueError, match="no gateway 'gw-9'"):
        write_join_kit(tmp_path / "kit", "10.0.0.5", 1883, gateways, "imu_cnn", None, desk, gateway="gw-9")
    with pytest.raises(ValueError, match="neither a public key"):
        write_join_kit(tmp_path / "kit", "10.0.0.5", 1883, gateways, "imu_cnn", "abc", desk)
