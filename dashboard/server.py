"""The dashboard's HTTP side: the page, its JSON snapshot and a server-sent-events stream.

    GET /            the page (page.py)                GET /app.js, /app.css   its script and style
    GET /api/fleet   view.snapshot() as JSON           GET /events             the snapshot again on every change
    GET /healthz     "ok"

Stdlib only (`ThreadingHTTPServer`): one thread per open page, which is
plenty for a control room. Read-only and unauthenticated: it listens on
loopback by default; put a reverse proxy with authentication in front to
share it. Each `/events` stream sends at most one snapshot per
`MIN_INTERVAL_S` however fast statuses arrive, and one every `REFRESH_S`
even when nothing arrived (time-based alerts age, proxies keep the stream open).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from protocol.logs import event

from . import page
from .fleet import Fleet
from .view import snapshot

log = logging.getLogger("starling.dashboard.http")
MIN_INTERVAL_S = 0.25
REFRESH_S = 10.0
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC = {
    "/": ("text/html; charset=utf-8", page.HTML),
    "/index.html": ("text/html; charset=utf-8", page.HTML),
    "/app.js": ("text/javascript; charset=utf-8", page.JS),
    "/app.css": ("text/css; charset=utf-8", page.CSS),
    "/healthz": ("text/plain; charset=utf-8", "ok\n"),
}


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True  # an open /events stream must not hold the process at exit

    def __init__(self, address: tuple[str, int], fleet: Fleet) -> None:
        super().__init__(address, _Handler)
        self.fleet = fleet
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def stop(self) -> None:
        """End the /events streams, stop serving and close the socket."""
        self.stopping.set()
        with self.fleet.changed:
            self.fleet.changed.notify_all()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:
        pass  # one line per request is noise; errors are logged as events

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in STATIC:
            content_type, text = STATIC[path]
            self._send(200, content_type, text.encode())
        elif path == "/api/fleet":
            body = json.dumps(snapshot(self.server.fleet, time.time())).encode()
            self._send(200, "application/json", body)
        elif path == "/events":
            self._events()
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _events(self) -> None:
        fleet, stopping = self.server.fleet, self.server.stopping
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        sent = -1
        try:
            while not stopping.is_set():
                with fleet.changed:
                    fleet.changed.wait_for(lambda last=sent: fleet.version != last or stopping.is_set(), timeout=REFRESH_S)
                if stopping.is_set():
                    break
                doc = snapshot(fleet, time.time())
                sent = doc["version"]
                self.wfile.write(b"data: " + json.dumps(doc).encode() + b"\n\n")
                self.wfile.flush()
                stopping.wait(MIN_INTERVAL_S)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the page closed or reloaded
        except Exception:  # never let one stream take the server down
            log.exception("http.events_failed")


def serve(fleet: Fleet, host: str, port: int) -> tuple[DashboardServer, threading.Thread]:
    """Start serving in a thread; the server's `url` says where (port 0 picks a free one)."""
    server = DashboardServer((host, port), fleet)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="dashboard-http",
                              daemon=True)
    thread.start()
    event(log, "dashboard.listening", url=server.url)
    return server, thread
