"""`starling-dashboard`: subscribe to the gateways' status topics and serve the operators' page.

    starling-dashboard --broker mqtt://127.0.0.1:1883
    starling-dashboard --broker mqtts://broker.city.example --tls-ca /etc/starling/ca.crt \\
        --username dashboard --password-file /etc/starling/dashboard.password --listen 127.0.0.1:8080

Runs until SIGTERM or SIGINT, then closes the page streams and the broker
connection and exits 0. Logs one line per event (protocol/logs.py), e.g.
`dashboard.listening url=http://127.0.0.1:8080/`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from protocol import logs
from protocol.logs import event
from protocol.transport import BrokerAuth

from .feed import Feed, parse_broker_url
from .fleet import Fleet
from .server import serve

log = logging.getLogger("starling.dashboard")


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT`; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def _auth(args: argparse.Namespace, tls: bool) -> BrokerAuth:
    if args.tls_ca and not tls:
        raise ValueError("--tls-ca needs an mqtts:// broker URL")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        raise ValueError("--tls-cert needs --tls-ca")
    if args.password_file and not args.username:
        raise ValueError("--password-file needs --username")
    for name in ("tls_ca", "tls_cert", "tls_key", "password_file"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise ValueError(f"--{name.replace('_', '-')}: {path} is not a file")
    auth = BrokerAuth(args.tls_ca, args.tls_cert, args.tls_key, args.username or "", args.password_file)
    try:
        auth.password()  # refuses a password file others can read
    except PermissionError as exc:
        raise ValueError(f"--password-file: {exc}") from exc
    return auth


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="starling-dashboard",
                                     description="The operators' web dashboard, fed from the MQTT status topics.")
    parser.add_argument("--broker", required=True, help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)")
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT to serve the page on "
                        "(default 127.0.0.1:8080; port 0 picks a free one)")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate to verify the broker with (mqtts://; "
                        "default: the system's trusted CAs)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate, if the broker asks for one")
    parser.add_argument("--tls-key", type=Path, help="the client certificate's key")
    parser.add_argument("--username", help="MQTT username (its ACL must allow reading the status topics)")
    parser.add_argument("--password-file", type=Path, help="file whose first line is the MQTT password (mode 0600)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup("dashboard", args.log_level.upper())
    try:
        broker = parse_broker_url(args.broker)
        host, port = parse_listen(args.listen)
        auth = _auth(args, broker.tls)
    except ValueError as exc:
        print(f"starling-dashboard: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fleet = Fleet()
    try:
        server, thread = serve(fleet, host, port)
    except OSError as exc:
        event(log, "dashboard.cannot_listen", logging.ERROR, listen=args.listen, reason=str(exc))
        return 1
    feed = Feed(fleet, broker, auth)
    feed.start()
    event(log, "dashboard.start", broker=str(broker), url=server.url)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        feed.close()
        server.stop()
        thread.join(timeout=5)
        event(log, "dashboard.stop", messages=fleet.messages, malformed=sum(fleet.malformed.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
