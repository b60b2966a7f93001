"""Fill the Starling Mosquitto templates (`starling.conf`, `acl.conf`) and manage broker users.

    python -m hw.mosquitto.render --dest /etc/starling/mosquitto --gateway-id <32 hex>

writes `starling.conf` and `acl.conf` into the destination folder. TLS
material goes next to them as `ca.crt`, `server.crt`, `server.key` (a lab can
make throwaway ones with `hw/mosquitto/make-certs.sh`), and the users into
`passwd`:

    from hw.mosquitto.render import add_user
    add_user(Path("/etc/starling/mosquitto/passwd"), device_id, password)
    add_user(Path("/etc/starling/mosquitto/passwd"), "gw-" + gateway_id, password)

A device's MQTT username MUST be its device id (32 lowercase hex): the ACL
grants each device its own topics through `%u`, so a device registered under
any other name can publish and read nothing of its own. A gateway's username
is `gw-<gateway id>`.

Mosquitto 2.0 started as root drops to the `mosquitto` user *before* it reads
the key file, the password file and the ACL file and before it opens the log
and the persistence database, so all of them must be accessible to that user.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from protocol.fields import is_int

TEMPLATE_DIR = Path(__file__).resolve().parent
TEMPLATES = ("starling.conf", "acl.conf")

DEFAULT_PORT = 8883
DEFAULT_LISTEN = "0.0.0.0"
DEFAULT_DEST = Path("/etc/starling/mosquitto")
DEFAULT_DATA_DIR = Path("/var/lib/mosquitto")
DEFAULT_LOG_FILE = Path("/var/log/mosquitto/starling.log")

_ID = re.compile(r"[0-9a-f]{32}")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")
# Mosquitto config values are split on whitespace and '#' only starts a comment
# at the beginning of a line; anything outside printable, non-blank ASCII in a
# value could silently change the meaning of the line (or add one).
_SAFE_VALUE = re.compile(r"[!-~]+")


def render(
    dest: Path,
    *,
    port: int,
    gateway_id: str,
    listen: str = DEFAULT_LISTEN,
    conf_dir: Path,
    data_dir: Path,
    log_file: Path,
) -> Path:
    """Write `starling.conf` and `acl.conf` into `dest` with every placeholder filled; return the conf path.

    `conf_dir` is where the broker will find `ca.crt`, `server.crt`,
    `server.key`, `passwd` and `acl.conf` (normally `dest` itself);
    relative paths are made absolute against the current directory.
    """
    if not is_int(port) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer in 1..65535, not {port!r}")
    if not isinstance(gateway_id, str) or not _ID.fullmatch(gateway_id):
        raise ValueError(f"gateway id must be 32 lowercase hex characters, not {gateway_id!r}")
    _check_listen(listen)
    values = {
        "@PORT@": str(port),
        "@LISTEN@": listen,
        "@CONF_DIR@": _path_value("conf_dir", conf_dir),
        "@DATA_DIR@": _path_value("data_dir", data_dir),
        "@LOG_FILE@": _path_value("log_file", log_file),
        "@GATEWAY_ID@": gateway_id,
    }
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in TEMPLATES:
        text = (TEMPLATE_DIR / name).read_text(encoding="utf-8")
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        left = sorted(set(_PLACEHOLDER.findall(text)))
        if left:
            raise RuntimeError(f"template {name} has placeholders render() does not know: {', '.join(left)}")
        _write(dest / name, text)
    return dest / "starling.conf"


def add_user(password_file: Path, username: str, password: str) -> None:
    """Add `username` (or change its password) in a Mosquitto password file, creating the file if missing.

    Devices' usernames must be their device id (32 lowercase hex), the
    gateway's `gw-<gateway id>`: `acl.conf` grants topics by username. Runs
    `mosquitto_passwd -b`, so the password is briefly visible in the process
    list of this machine; run it where that is acceptable (the broker host,
    at provisioning time). A new file gets mode 0600; make it readable by
    the user Mosquitto runs as (`chown mosquitto: passwd`), then reload the
    broker (SIGHUP) for changes to take effect.
    """
    if not isinstance(username, str) or not username or not _SAFE_VALUE.fullmatch(username) \
            or any(c in username for c in ":+#/"):
        raise ValueError(f"username must be printable ASCII without blanks, ':', '+', '#', '/': {username!r}")
    if not isinstance(password, str) or not password or any(c in password for c in "\r\n\0"):
        raise ValueError("password must be a non-empty string without line breaks or NUL")
    candidates = (shutil.which("mosquitto_passwd"), "/usr/bin/mosquitto_passwd",
                  "/usr/local/bin/mosquitto_passwd")
    exe = next((p for p in candidates if p and os.access(p, os.X_OK)), None)
    if exe is None:
        raise FileNotFoundError("mosquitto_passwd is not installed (apt-get install mosquitto)")
    password_file = Path(password_file)
    create = not password_file.exists()
    cmd = [exe, *(["-c"] if create else []), "-b", str(password_file), username, password]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise RuntimeError(f"mosquitto_passwd failed ({result.returncode}) for user {username!r}: {detail}")
    if create:
        os.chmod(password_file, 0o600)


def _check_listen(listen: str) -> None:
    if not isinstance(listen, str):
        raise ValueError(f"listen must be an IP address or host name, not {listen!r}")
    try:
        ipaddress.ip_address(listen)
    except ValueError:
        if not _HOSTNAME.fullmatch(listen):
            raise ValueError(f"listen must be an IP address or host name, not {listen!r}") from None


def _path_value(what: str, path: Path) -> str:
    text = str(Path(path).absolute())
    if not _SAFE_VALUE.fullmatch(text):
        raise ValueError(f"{what} must be a path without blanks or control characters: {text!r}")
    return text.rstrip("/") or "/"


def _write(path: Path, text: str) -> None:
    """Replace `path` atomically, so a broker reloading meanwhile never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hw.mosquitto.render",
        description="Write a Starling Mosquitto config (starling.conf) and ACL (acl.conf) for one gateway.",
        epilog="Users: hw.mosquitto.render.add_user(passwd, device_id, password); a device's username "
               "MUST be its device id, the gateway's gw-<gateway id>. "
               "Lab TLS material: hw/mosquitto/make-certs.sh.",
    )
    parser.add_argument("--dest", type=Path, required=True,
                        help=f"folder to write starling.conf and acl.conf into (normally {DEFAULT_DEST})")
    parser.add_argument("--gateway-id", required=True, help="the gateway's id (32 lowercase hex)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TLS listener port (default {DEFAULT_PORT})")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help=f"bind address (default {DEFAULT_LISTEN})")
    parser.add_argument("--conf-dir", type=Path, default=None,
                        help="where the broker finds ca.crt, server.crt, server.key, passwd and acl.conf "
                             "(default: the --dest folder)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help=f"persistence folder (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--log-file", type=Path, default=DEFAULT_LOG_FILE,
                        help=f"broker log file (default {DEFAULT_LOG_FILE})")
    args = parser.parse_args(argv)
    try:
        conf = render(args.dest, port=args.port, gateway_id=args.gateway_id, listen=args.listen,
                      conf_dir=args.conf_dir if args.conf_dir is not None else args.dest,
                      data_dir=args.data_dir, log_file=args.log_file)
    except (ValueError, OSError) as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 2
    print(conf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
