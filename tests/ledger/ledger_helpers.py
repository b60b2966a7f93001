"""Helpers shared by the ledger tests: real device-signed replies and the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from protocol import envelope
from protocol.digest import sha256
from protocol.envelope import Context
from protocol.keys import Identity

Record = tuple[bytes, bytes, int, bytes]
TASK = "task-7"
BASE = sha256(b"global model v6")
REPO = Path(__file__).resolve().parents[2]


def signed_reply(
    device: Identity, gateway: str, round: int, task: str = TASK, base: bytes = BASE, examples: int = 32
) -> Record:
    """An update record taken from a real reply envelope, sealed by the device with its update attached."""
    update = os.urandom(64)  # stands in for the encoded update delta
    ctx = Context(sender=device.public_key, gateway=gateway, round=round, task=task, base=base)
    sealed = envelope.seal(device, "reply", ctx, {"examples": examples}, attachment=update)
    reply = envelope.open_verified(sealed, "reply")
    assert reply.body == {"digest": sha256(update), "examples": examples}
    return (device.public_key, reply.body["digest"], examples, reply.sig)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`starling-ledger ARGS` through the real console entry, in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "ledger.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
