"""Hardware in the loop: what a real device needs to join an emulated fleet.

`starling-emulate --listen ADDR` exposes the run's broker to the network
(hw/broker.py's second listener) so that a real Raspberry Pi running
`starling-agent` trains alongside the emulated devices. The Pi needs four
things: where the broker is, which gateway to trust (its id and public key),
a config that says so, and an operator's voucher for its own key, because
the emulated gateways enroll under the `voucher` policy, as in a city: the
exposed listener is anonymous, so vouchers are what keep strangers out.

    desk = VoucherDesk(workdir / "hil" / "operator")   # the run's operator key
    gateway_doc["enrollment"] = desk.enrollment_table()
    kit = write_join_kit(workdir / "hil" / "kit", advertised_address(host), port, gateways, "imu_cnn",
                         None, desk)
    print(instructions(kit))

The kit folder is what gets copied to the Pi (agent.toml, the operator's
public key, JOIN.txt with the steps, voucher.cbor once the device's key is
known; `model/`, a copy of the folder, when the run's model is a built
model's folder rather than a model of the zoo: the kit's agent.toml names it
by `[model] path`). The operator's private key stays in the desk folder on this machine;
a kit is refused inside it. docs/hardware-in-the-loop.md walks through it.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import shlex
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from protocol.atomic import write_atomic
from protocol.keys import Identity, identity_id, load_or_create
from protocol.vouchers import issue

from .toml_files import toml_value

__all__ = ["DEFAULT_PORT", "JoinKit", "VoucherDesk", "advertised_address", "instructions", "parse_listen",
           "write_join_kit"]

DEFAULT_PORT = 1883  # plain MQTT: the exposed listener has no TLS
MAX_VOUCHER_DAYS = 3650.0  # as `starling-ledger voucher`
# Where hw/install.sh puts things on the device; the kit's agent.toml names these.
DEVICE_ETC = PurePosixPath("/etc/starling")
DEVICE_STATE = PurePosixPath("/var/lib/starling")
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
# Destinations for the UDP routing question in advertised_address: private, never broadcast addresses.
_ROUTE_PROBES = ("10.254.254.254", "192.168.254.254", "172.16.254.254")


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST[:PORT]` or `:PORT` as (IPv4 address, port); an empty host means all interfaces (0.0.0.0)."""
    spec = text.strip()
    if not spec:
        raise ValueError("listen address is empty: give HOST[:PORT], e.g. 0.0.0.0:1883")
    if spec.startswith("[") or spec.count(":") > 1:
        raise ValueError(f"listen address {text!r}: IPv6 is not supported here; give an IPv4 address "
                         "such as 0.0.0.0:1883")
    host, colon, port_text = spec.partition(":")
    host = host or "0.0.0.0"
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"listen address {text!r}: {host!r} is not an IPv4 address (an address of this "
                         "machine, as `hostname -I` shows, or 0.0.0.0 for all)") from None
    if not colon:
        return str(address), DEFAULT_PORT
    if not port_text.isdigit():
        raise ValueError(f"listen address {text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"listen address {text!r}: port {port} is out of range (1-65535)")
    return str(address), port


def advertised_address(host: str) -> str:
    """The address other machines use to reach a listener on `host` (0.0.0.0: this machine's LAN address)."""
    if host != "0.0.0.0":
        return host
    for probe in _ROUTE_PROBES:
        # Connecting a UDP socket sends nothing: the kernel only picks the source address of its route.
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.connect((probe, 9))
                address = sock.getsockname()[0]
        except OSError:
            continue
        if not ipaddress.IPv4Address(address).is_loopback and address != "0.0.0.0":
            return address
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return name
    return name if ipaddress.IPv4Address(address).is_loopback else address


class VoucherDesk:
    """An operator key of the emulator's own, and the vouchers it signs for real devices.

    Gateways given `enrollment_table()` admit exactly the devices this key
    vouches for. Keep the folder across runs and a voucher minted once stays
    good (until it expires) for every gateway it names.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.key_path = self.folder / "operator.key"
        self.identity: Identity = load_or_create(self.key_path)  # Identity.save: atomic, mode 0600

    @property
    def public_key(self) -> bytes:
        return self.identity.public_key

    def enrollment_table(self) -> dict[str, Any]:
        """The gateway config's `[enrollment]` table: vouchers signed by this desk admit devices."""
        return {"policy": "voucher", "operator_keys": [self.public_key.hex()]}

    def issue(self, device_public_key: bytes, gateway_id: str = "", days: float = 30) -> bytes:
        """An encoded voucher admitting `device_public_key` at `gateway_id` ("" = any gateway) for `days`."""
        if not isinstance(device_public_key, bytes) or len(device_public_key) != 32:
            raise ValueError("a device public key is 32 bytes")
        if gateway_id and not _HEX_ID.fullmatch(gateway_id):
            raise ValueError(f"gateway id {gateway_id!r} is not 32 lowercase hex characters")
        if not (math.isfinite(days) and 0 < days <= MAX_VOUCHER_DAYS):
            raise ValueError(f"days must be more than 0 and at most {MAX_VOUCHER_DAYS:g}, not {days:g}")
        return issue(self.identity, device_public_key, gateway_id, days * 86400).encode()

    def write_voucher(self, path: Path, device_public_key: bytes, gateway_id: str = "",
                      days: float = 30) -> Path:
        """`issue` into the file `path` (mode 644: the agent's service user reads it)."""
        write_atomic(path, self.issue(device_public_key, gateway_id, days), mode=0o644)
        return Path(path)


@dataclass(frozen=True)
class JoinKit:
    """A written join kit: the folder to copy to the device, and what `instructions` prints."""

    folder: Path
    address: str
    port: int
    gateway: dict[str, str]  # name, id, public_key (hex) of the gateway the device trusts
    operator_key: Path  # the desk's private key: on this machine only, to mint vouchers
    operator_public_key: str
    device_public_key: str = ""  # "" until the device's key is known
    voucher: Path | None = None  # the kit's voucher.cbor, when there is a device key

    @property
    def config(self) -> Path:
        return self.folder / "agent.toml"

    @property
    def steps(self) -> Path:
        return self.folder / "JOIN.txt"

    def mint_command(self, device: str = "<PUBLIC_KEY>") -> str:
        """The operator's command, on this machine, that vouches for `device` at this kit's gateway."""
        key, out = (shlex.quote(str(p)) for p in (self.operator_key, self.folder / "voucher.cbor"))
        return (f"starling-ledger voucher --operator-key {key} --device {device} "
                f"--gateway {self.gateway['id']} --out {out}")


def write_join_kit(folder: Path, address: str, port: int, gateways: list[dict[str, str]], model: str,
                   device_key: bytes | str | Path | None, desk: VoucherDesk, *, gateway: str = "",
                   sensors: tuple[str, ...] = ("mpu6050",), name: str = "pi-hil",
                   root: str | Path = "/") -> JoinKit:
    """Write what a real device needs to join into `folder`; return the kit.

    `gateways`: the run's gateways as {"name", "id", "public_key" (hex)};
    the device trusts the one named by `gateway` (its name or id), else the
    first. `device_key`: the device's public key (32 bytes or 64 hex), or a
    JSON file holding `public_key` (what `starling-agent keygen` prints, or
    a key file), or None: then the kit has no voucher yet and says how to
    mint one. `sensors`: the [[sensor]] kinds on the device; empty means
    recorded windows instead (`[data] replay`). `root` prefixes every
    on-device path, as hw/install.sh's STARLING_ROOT (tests, images).
    """
    folder = Path(folder).resolve()
    if folder in desk.key_path.resolve().parents:  # the kit is copied whole to the device
        raise ValueError(f"the join kit {folder} would hold the operator's private key {desk.key_path}: "
                         "give the kit a folder of its own")
    chosen = _choose_gateway(gateways, gateway)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not a TCP port")
    device = _device_public_key(device_key)
    etc, state = (PurePosixPath(root) / p.relative_to("/") for p in (DEVICE_ETC, DEVICE_STATE))
    folder.mkdir(parents=True, exist_ok=True)
    kit = JoinKit(folder, address, port, chosen, desk.key_path.resolve(), desk.public_key.hex(),
                  device.hex() if device else "", folder / "voucher.cbor" if device else None)
    if device is not None:
        desk.write_voucher(folder / "voucher.cbor", device, chosen["id"])
    else:
        (folder / "voucher.cbor").unlink(missing_ok=True)  # a kit rewritten without a device key: none stale
    write_atomic(folder / "operator.pub", (kit.operator_public_key + "\n").encode())
    model_lines = _kit_model(folder, model, etc)
    write_atomic(kit.config, _agent_toml(kit, model_lines, sensors, name, etc, state).encode())
    write_atomic(kit.steps, _join_text(kit, model, sensors).encode())
    return kit


KIT_MODEL = "model"  # the kit's copy of a built model's folder, installed as <etc>/model on the device


def _kit_model(kit: Path, model: str, etc: PurePosixPath) -> list[str]:
    """The agent.toml's [model] lines for `model`: a model of the zoo by name; a built model's folder (any other
    `model`, its path) copied into the kit (its manifest and the files it names), named by path on the device."""
    import firmware_models
    from agent.model_source import read_folder

    copy = kit / KIT_MODEL
    if model in firmware_models.MODELS:
        shutil.rmtree(copy, ignore_errors=True)  # a kit rewritten for a packaged model: no stale folder
        return [f"name = {toml_value(model)}"]
    source = read_folder(Path(model))  # a folder that is no built model: refused before anything is copied
    copy.mkdir(exist_ok=True)
    for file in ("manifest.json", source.manifest.get("file", "model.tflite"),
                 source.manifest.get("weights_file", "weights.npz")):
        if (source.folder / file).is_file():
            shutil.copyfile(source.folder / file, copy / file)
    return [f"path = {toml_value(str(etc / KIT_MODEL))}   # a built model's folder: the kit's {KIT_MODEL}/ "
            "(see JOIN.txt)"]


def instructions(kit: JoinKit) -> str:
    """The lines the emulator prints so that someone at the device can join it to the run."""
    gw = kit.gateway
    lines = [
        f"hardware in the loop: real devices connect to {kit.address}:{kit.port} "
        "(anonymous MQTT: a trusted lab network only)",
        f"  gateway {gw.get('name', '')} id {gw['id']}",
        f"  gateway public key {gw['public_key']}",
        f"  join kit (agent.toml, JOIN.txt step by step): {kit.folder}",
    ]
    if kit.voucher is not None:
        device = identity_id(bytes.fromhex(kit.device_public_key))
        lines.append(f"  voucher for device {device}: {kit.voucher} "
                     f"(to {DEVICE_ETC / 'voucher.cbor'} on the device)")
    else:
        lines += [
            f"  voucher: on the device, `sudo cat {DEVICE_STATE / 'device.json'}` (written by hw/install.sh)",
            "  shows its public_key; mint its voucher here with:",
            f"    {kit.mint_command()}",
        ]
    return "\n".join(lines)


def _choose_gateway(gateways: list[dict[str, str]], wanted: str) -> dict[str, str]:
    if not gateways:
        raise ValueError("a join kit needs at least one gateway")
    for gw in gateways:
        if not (_HEX_ID.fullmatch(str(gw.get("id", "")))
                and _HEX_KEY.fullmatch(str(gw.get("public_key", "")))):
            raise ValueError(f"gateway {gw.get('name', '?')!r}: id must be 32 hex and public_key 64 hex "
                             "characters")
    if not wanted:
        return dict(gateways[0])
    for gw in gateways:
        if wanted in (gw["id"], gw.get("name")):
            return dict(gw)
    known = ", ".join(g.get("name", g["id"]) for g in gateways)
    raise ValueError(f"no gateway {wanted!r} in this run (gateways: {known})")


def _device_public_key(device_key: bytes | str | Path | None) -> bytes | None:
    if device_key is None:
        return None
    if isinstance(device_key, bytes):
        if len(device_key) != 32:
            raise ValueError("a device public key is 32 bytes")
        return device_key
    if isinstance(device_key, str) and _HEX_KEY.fullmatch(device_key.strip()):
        return bytes.fromhex(device_key.strip())
    path = Path(device_key)
    if not path.is_file():
        raise ValueError(f"device key {device_key!r} is neither a public key (64 hex) nor a file")
    try:  # only the public half is read: a private key never needs to leave the device
        text = json.loads(path.read_text())["public_key"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: no public_key in it ({exc})") from None
    if not isinstance(text, str) or not _HEX_KEY.fullmatch(text):
        raise ValueError(f"{path}: public_key is not 64 hex characters")
    return bytes.fromhex(text)


def _agent_toml(kit: JoinKit, model_lines: list[str], sensors: tuple[str, ...], name: str,
                etc: PurePosixPath, state: PurePosixPath) -> str:
    # Laid out by hand (the comments are for the person at the device); every value through the one writer.
    q = toml_value
    lines = [
        "# A real device in an emulated Starling fleet: copy to /etc/starling/agent.toml (see JOIN.txt).",
        "# The gateway's keys are new in every emulator run: copy this file again for each run.",
        "[device]",
        f"name = {q(name)}",
        f"key = {q(str(state / 'device.key'))}",
        f"state_dir = {q(str(state))}",
        f"voucher = {q(str(etc / 'voucher.cbor'))}   # the operator's voucher for this device's key",
        "",
        "[gateway]",
        # (the name as one line: a line break in it would end the comment and start a line of TOML)
        f"id = {q(kit.gateway['id'])}   # {' '.join(str(kit.gateway.get('name', '')).split())}",
        f"public_key = {q(kit.gateway['public_key'])}",
        "",
        "[broker]   # the emulator's exposed listener: plain MQTT, anonymous",
        f"host = {q(kit.address)}",
        f"port = {q(kit.port)}",
        "",
        "[model]",
        *model_lines,
        "",
        "[data]",
    ]
    if sensors:
        lines += [
            "rate_hz = 50.0",
            f"labels = {q(str(state / 'labels.csv'))}   # start,end,label lines; a classifier skips rounds "
            "without it",
            f"# replay = {q(str(state / 'replay.npz'))}   # instead of the sensors: recorded windows",
        ]
        for kind in sensors:
            lines += ["", "[[sensor]]", f"kind = {q(kind)}", "i2c_bus = 1"]
    else:
        lines += [
            f"replay = {q(str(state / 'replay.npz'))}   # recorded windows: x_train, y_train, x_test, y_test",
            "",
            "# Live sensors instead of the replay: drop `replay` above, then",
            "# rate_hz = 50.0",
            f"# labels = {q(str(state / 'labels.csv'))}",
            "# [[sensor]]",
            '# kind = "mpu6050"   # or "bme280"',
            "# i2c_bus = 1",
        ]
    lines += [
        "",
        "# Another sensor (any number of [[sensor]] tables; `starling-agent doctor` reads each once):",
        "# [[sensor]]",
        '# kind = "bme280"',
        "# i2c_bus = 1",
        "# address = 0x76",
        "",
    ]
    return "\n".join(lines)


def _join_text(kit: JoinKit, model: str, sensors: tuple[str, ...]) -> str:
    import firmware_models

    gw = kit.gateway
    packaged = model in firmware_models.MODELS
    install_model = f" --model {model}" if packaged else ""  # a built folder: installed in step 2, by path
    model_steps = [] if packaged else [
        "   and the model the run trains (a built model's folder, the kit's model/; agent.toml names it):",
        f"       sudo rm -rf {DEVICE_ETC / KIT_MODEL} && "
        f"sudo cp -r ~/starling-hil/{KIT_MODEL} {DEVICE_ETC / KIT_MODEL}",
    ]
    data = " ".join(f"--sensor {kind}" for kind in sensors) or "--replay ~/replay.npz"
    etc, state = DEVICE_ETC, DEVICE_STATE
    voucher_steps = (
        [f"3. The voucher for device {identity_id(bytes.fromhex(kit.device_public_key))} is in this folder."]
        if kit.voucher is not None else [
            "3. Vouch for the device. On the Pi, its public key:",
            f"       sudo cat {state}/device.json   # {{\"id\": ..., \"public_key\": \"<64 hex>\", ...}}",
            "   On the emulator's machine, with that public key:",
            f"       {kit.mint_command()}",
            "   and copy that voucher.cbor into ~/starling-hil/ on the Pi.",
        ])
    return "\n".join([
        "Join a real device to the emulated Starling fleet",
        "=================================================",
        "",
        f"broker   {kit.address}:{kit.port}   (plain, anonymous MQTT: use a trusted lab network only)",
        f"gateway  {gw.get('name', '')}  id {gw['id']}",
        f"         public key {gw['public_key']}",
        f"operator public key {kit.operator_public_key} (operator.pub; the gateways trust its vouchers)",
        "",
        "On the Raspberry Pi, with a Starling checkout in ~/starling and this folder in ~/starling-hil:",
        "",
        "1. Only once per Pi: install the agent (a venv, the device key, the systemd unit), not started yet:",
        f"       sudo ~/starling/hw/install.sh --gateway-id {gw['id']} \\",
        f"           --gateway-key {gw['public_key']} \\",
        f"           --broker {kit.address}:{kit.port} {data}{install_model} --no-start",
        *([] if sensors else ["   (replay.npz: recorded windows, e.g. a file from the run folder's data/)"]),
        "",
        "2. Use this run's config (the gateway's keys are new in every emulator run):",
        f"       sudo install -m 0640 -g starling ~/starling-hil/agent.toml {etc}/agent.toml",
        *model_steps,
        "",
        *voucher_steps,
        "",
        "4. Put the voucher in place:",
        f"       sudo install -m 0644 ~/starling-hil/voucher.cbor {etc}/voucher.cbor",
        "",
        "5. Check everything (config, key, model, sensors, the broker):",
        f"       sudo /opt/starling/venv/bin/starling-agent doctor --config {etc}/agent.toml",
        "",
        "6. Start it, and follow its log:",
        "       sudo systemctl enable starling-agent && sudo systemctl restart starling-agent",
        "       journalctl -u starling-agent -f",
        "",
        "7. See it from the emulator's machine (enrolled, online, accepted, rejected, skipped):",
        f"       mosquitto_sub -h {kit.address} -p {kit.port} -t 'starling/{gw['id']}/status/device/+' -v",
        "",
        "More: docs/hardware-in-the-loop.md",
        "",
    ])
