"""systemd's notify protocol (what sd_notify(3) sends), without libsystemd.

Under `Type=notify` systemd gives the service $NOTIFY_SOCKET (a unix datagram
socket; a leading "@" means the abstract namespace) and, with `WatchdogSec=`,
$WATCHDOG_USEC. The agent says READY=1 once it runs, WATCHDOG=1 while its
loops are alive (at half the watchdog interval), STOPPING=1 on SIGTERM.
Outside systemd the variables are unset and every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 else None
        self._last_ping = 0.0

    @property
    def active(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> bool:
        """Send "KEY=value" lines; False (never an exception) when there is nobody to tell."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """Ping the watchdog if half its interval has passed since the last ping."""
        if self.watchdog_s is None:
            return False
        now = time.monotonic()
        if now - self._last_ping < self.watchdog_s / 2:
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")
