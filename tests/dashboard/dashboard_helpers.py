"""Shared material for the dashboard tests: the messages of a real run, replayed.

`data/run_messages.json` holds every status, device status and ledger
version-vector message a real 3-round emulator run (1 gateway, 3 watch
subjects, FedAvg) published, in arrival order, as captured from Mosquitto:
JSON payloads as JSON, CBOR payloads as hex.
"""

from __future__ import annotations

import json
from pathlib import Path

from dashboard.fleet import Fleet

DATA = Path(__file__).resolve().parent / "data"


def run_messages() -> list[tuple[str, bytes]]:
    out = []
    for item in json.loads((DATA / "run_messages.json").read_text()):
        payload = bytes.fromhex(item["payload_hex"]) if "payload_hex" in item else json.dumps(item["payload"]).encode()
        out.append((item["topic"], payload))
    return out


def gateway_id() -> str:
    return next(t.split("/")[1] for t, _ in run_messages() if t.endswith("/status"))


def last_status() -> dict:
    return json.loads(next(p for t, p in reversed(run_messages()) if t.endswith("/status")))


def replay(start: float = 1000.0) -> Fleet:
    """A fleet model fed the whole real run, one message per second from `start`."""
    fleet = Fleet()
    fleet.set_connection(True, start - 1.0, "test")
    for i, (topic, payload) in enumerate(run_messages()):
        assert fleet.apply(topic, payload, start + i) is None, topic
    return fleet
