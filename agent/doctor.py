"""`starling-agent doctor`: check what an installed agent needs, and say plainly what is wrong.

    starling-agent doctor --config /etc/starling/agent.toml [--json]

One line per check, `ok` or `FAIL` with the reason and what to do; exit 0
when everything is fine, 1 otherwise. Checks, in order (later ones are
skipped when the config itself is bad):

    config       the file parses and every field is valid
    key          the device key exists, is mode 0600 and loads
    state        the state folder is writable
    interpreter  LiteRT or tflite-runtime imports (and which), numpy's version
    model        the model ([model] name, or a built folder's [model] path) matches
                 its manifest and its signatures run; says its input shape and task
    data         the replay file loads with the model's shape; or the sensors'
                 channels fit the model and the label file (when needed) reads
    sensor[i]    each [[sensor]] opens and gives one finite sample
    broker       TCP, then TLS (certificate checked against the host) when
                 configured, then an MQTT CONNECT with the device's credentials
    inference.socket  with [inference] (and a socket): its folder exists and is
                 writable, or can be made; its path is free or an (old) socket
    inference.mqtt    with [inference.mqtt]: that broker, checked as `broker` is
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import stat
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from protocol.errors import KeyFileError
from protocol.keys import Identity
from protocol.transport import BrokerAuth

from .config import AgentConfig, ConfigError, InferenceSettings, load_config
from .model_source import model_source

BROKER_TIMEOUT_S = 5.0
MQTT_LOG = "starling.agent.doctor"
# The report says how the broker answered: no `mqtt.refused` line on stderr too (Python's last-resort handler).
logging.getLogger(MQTT_LOG).addHandler(logging.NullHandler())


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _check(name: str, fn: Callable[[], str]) -> Check:
    try:
        return Check(name, True, fn())
    except Exception as exc:  # the point is to report it, whatever it is
        return Check(name, False, str(exc) or type(exc).__name__)


def run_checks(config_path: Path) -> list[Check]:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [Check("config", False, f"{config_path}: {exc}")]
    checks = [Check("config", True, str(config_path))]
    checks.append(_check("key", lambda: _key(config)))
    checks.append(_check("state", lambda: _state(config)))
    checks.append(_check("interpreter", _interpreter))
    checks.append(_check("model", lambda: _model(config)))
    checks.append(_check("data", lambda: _data(config)))
    for i, sensor in enumerate(config.sensors):
        checks.append(_check(f"sensor[{i}]", lambda sensor=sensor: _sensor(sensor)))
    checks.append(_check("broker", lambda: _broker(config)))
    inference = config.inference
    if inference is not None and inference.socket is not None:
        checks.append(_check("inference.socket", lambda: _inference_socket(inference)))
    if inference is not None and inference.mqtt is not None:
        checks.append(_check("inference.mqtt", lambda: _inference_mqtt(inference)))
    if config.personalization is not None:
        checks.append(_check("personalization", lambda: _personalization(config)))
    return checks


def _key(config: AgentConfig) -> str:
    path = config.key
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: make it with `starling-agent keygen --key {path}`")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"{path} is mode {mode:o}: others can read the device's secret key; chmod 600 it")
    try:
        identity = Identity.load(path)
    except KeyFileError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return f"{path} (device {identity.id})"


def _state(config: AgentConfig) -> str:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=config.state_dir, prefix=".doctor-"):
        pass
    return f"{config.state_dir} is writable"


def _interpreter() -> str:
    import numpy as np

    from firmware_models.runtime import load_interpreter_class

    return f"{load_interpreter_class().__module__.split('.')[0]}, numpy {np.__version__}"


def _model(config: AgentConfig) -> str:
    source = model_source(config)  # what `starling-agent run` loads: [model] name or path
    weights = source.load().get_weights()  # the file's sha256 checked against the manifest first
    return f"{source.describe()}; {sum(w.size for w in weights.values())} parameters, signatures run"


def _personalization(config: AgentConfig) -> str:
    """What `starling-agent run` would tune (it refuses to start when this fails)."""
    from .personalize import tuned_weights

    names = tuned_weights(config.personalization, model_source(config).load())
    return f"{config.personalization.steps} steps at lr {config.personalization.lr:g} on {', '.join(names)}"


def _data(config: AgentConfig) -> str:
    import math

    from .data_source import needs_labels, num_classes
    from .labels import LabelSource
    from .samples import load_replay
    from .sensors import open_sensor

    manifest = model_source(config).manifest
    shape = tuple(manifest["input_shape"])
    if config.replay is not None:
        data = load_replay(config.replay, shape)
        return f"{config.replay}: {len(data.x_train)} train and {len(data.x_test)} test windows"
    channels = []
    for options in config.sensors:
        options = dict(options)
        sensor = open_sensor(options.pop("kind"), **options)
        channels.extend(sensor.channels)
        sensor.close()
    length = shape[0] if len(shape) == 2 else 1
    if length * len(channels) != math.prod(shape):
        raise ValueError(f"the sensors give {len(channels)} channels ({', '.join(channels)}), "
                         f"model {config.model} takes {shape}")
    detail = f"live: {len(channels)} channels at {config.sampling.rate_hz:g} Hz"
    if needs_labels(manifest):
        if config.sampling.labels is None:
            raise ValueError(f"data.labels is not set: {config.model} is a classifier and learns from labels")
        if LabelSource(config.sampling.labels, num_classes(manifest)).check():
            detail += f", labels {config.sampling.labels}"
        else:
            detail += f", labels {config.sampling.labels} not written yet (rounds are skipped until then)"
    return detail


def _sensor(options: dict[str, Any]) -> str:
    import numpy as np

    from .sensors import open_sensor

    options = dict(options)
    sensor = open_sensor(options.pop("kind"), **options)
    try:
        sample = sensor.read()
    finally:
        sensor.close()
    if not np.all(np.isfinite(sample)):
        raise ValueError(f"{sensor.name} gave non-finite values {sample.tolist()}")
    values = ", ".join(f"{c}={v:.3g}" for c, v in zip(sensor.channels, sample.tolist()))
    return f"{sensor.name}: {values}"


def _broker(config: AgentConfig) -> str:
    return _mqtt(config.broker_host, config.broker_port, config.broker_auth, "is it the device id, with the right "
                 "password?")


def _inference_socket(settings: InferenceSettings) -> str:
    """The socket inference serves on can be made: its folder is (or can be) there and writable, and the path
    is free or holds a socket (one an earlier run left is replaced; a file of another kind is not)."""
    path = settings.socket
    try:
        mode = path.lstat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (the folder may not be there either)
        mode = None
    if mode is not None and not stat.S_ISSOCK(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a symlink" if stat.S_ISLNK(mode) else "a file"
        raise FileExistsError(f"{path} is {kind}, not a socket: the agent cannot listen there; remove it or set "
                              "another [inference] socket")
    folder = path.parent
    if folder.is_dir():
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".doctor-"):
            pass
        where = f"{folder} is writable"
    else:
        existing = next(p for p in folder.parents if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"{folder} does not exist and cannot be made ({existing} is not a writable "
                                  "folder): create it for the agent's user, or set another [inference] socket")
        where = f"{folder} will be made (in {existing}, writable)"
    if mode is None:
        return f"{path}: {where}"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        state = "a running agent serves on it"
    except OSError:
        state = "an old socket, replaced when the agent starts"
    finally:
        probe.close()
    return f"{path}: {state}; {where}"


def _inference_mqtt(settings: InferenceSettings) -> str:
    mqtt = settings.mqtt
    return _mqtt(mqtt.host, mqtt.port, mqtt.auth, "are [inference.mqtt] username and password_file right?")


def _mqtt(host: str, port: int, auth: BrokerAuth, login_hint: str) -> str:
    """TCP to host:port, TLS when `auth` says so, then an MQTT CONNECT with its credentials (each within
    BROKER_TIMEOUT_S); the reason in plain words when one fails."""
    from mqttlink import ConnectError, Connection, ConnectionOptions

    try:
        with socket.create_connection((host, port), timeout=BROKER_TIMEOUT_S) as sock:
            if auth.tls:
                context = ssl.create_default_context(cafile=str(auth.tls_ca))
                if auth.tls_cert:
                    context.load_cert_chain(str(auth.tls_cert), str(auth.tls_key))
                with context.wrap_socket(sock, server_hostname=host) as tls:
                    protocol = tls.version()
    except ssl.SSLCertVerificationError as exc:
        raise ConnectionError(f"TLS to {host}:{port}: the broker's certificate does not check out ({exc.verify_message}); "
                              f"is {auth.tls_ca} the CA that signed it, and does it name {host}?") from exc
    except ssl.SSLError as exc:
        raise ConnectionError(f"TLS to {host}:{port} failed ({exc.reason}): does the broker speak TLS on this port?") \
            from exc
    except OSError as exc:
        raise ConnectionError(f"cannot reach {host}:{port} ({exc.strerror or exc}): broker down, wrong address or "
                              "a firewall") from exc
    # A clean session under its own client id: the check leaves nothing behind at the broker, and does
    # not push the running agent's own connection (client id dev-<id>) off it.
    options = ConnectionOptions(f"doctor-{os.getpid()}", host, port, auth=auth, clean_session=True,
                                keepalive_s=10, connect_timeout_s=BROKER_TIMEOUT_S, log_name=MQTT_LOG)
    try:
        with Connection(options):
            pass
    except ConnectError as exc:
        if exc.refused:
            hint = f"username {auth.username or '-'}: {login_hint}"
            raise PermissionError(f"the broker refused the login: {exc.refused} ({hint})") from None
        raise ConnectionError(f"{host}:{port} accepted the connection but sent no MQTT CONNACK") from None
    return f"{host}:{port}" + (f" over {protocol}" if auth.tls else " (plain MQTT, no TLS)") + ", MQTT login accepted"


def report(checks: list[Check], as_json: bool) -> str:
    if as_json:
        return json.dumps({"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]})
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<{width}}  {c.detail}" for c in checks)
