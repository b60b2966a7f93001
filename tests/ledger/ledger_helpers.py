"""Helpers shared by the ledger tests: signed replies, the real CLI, writers in other processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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
    device: Identity, gateway: str, round: int, task: str = TASK, base: bytes = BASE, examples: int = 32,
    update: bytes | None = None,
) -> Record:
    """An update record taken from a real reply envelope, sealed by the device with its update attached
    (`update`: the encoded update delta; by default 64 random bytes stand in for one)."""
    update = os.urandom(64) if update is None else update
    ctx = Context(sender=device.public_key, gateway=gateway, round=round, task=task, base=base)
    sealed = envelope.seal(device, "reply", ctx, {"examples": examples}, attachment=update)
    reply = envelope.open_verified(sealed, "reply")
    assert reply.body == {"digest": sha256(update), "examples": examples}
    return (device.public_key, reply.body["digest"], examples, reply.sig)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`starling-ledger ARGS` through the real console entry, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "ledger.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
        timeout=60,
    )


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def run_cli_many(*argvs: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Several `starling-ledger` runs at once (they are independent), in the order given."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ledger.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
            cwd=REPO,
        )
        for argv in argvs
    ]
    results = []
    for argv, proc in zip(argvs, procs, strict=True):
        out, err = proc.communicate(timeout=60)
        results.append(subprocess.CompletedProcess([*argv], proc.returncode, out, err))
    return results


def start_writer(
    db: Path, key_file: Path, label: str, other: str, count: int, go: Path
) -> subprocess.Popen[str]:
    """A separate process appending to `db` as the gateway in `key_file` (see `interleaved_writer`)."""
    code = "import sys; from ledger_helpers import interleaved_writer; interleaved_writer(*sys.argv[1:])"
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env["PYTHONPATH"]])
    return subprocess.Popen(
        [sys.executable, "-c", code, str(db), str(key_file), label, other, str(count), str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def interleaved_writer(db: str, key_file: str, label: str, other: str, count: str, go: str) -> None:
    """Append `count` rounds to the ledger, in step with the writer `other` in another process.

    Round i enrolls a device named "<label>-<i>", records an update of it if
    i % 3 == 0 and revokes it if i % 4 == 1. Round 0 starts once `go` exists;
    round i > 0 once `other` has finished round i - 1 (marker files next to
    `go`), so the two always contend for the lock, however the OS schedules them.
    """
    from ledger.store import Ledger

    def wait_for(marker: str) -> None:
        deadline = time.monotonic() + 30
        while not Path(marker).exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"{label}: waited 30 s for {marker}")
            time.sleep(0.001)

    identity = Identity.load(key_file)
    with Ledger.open(db, identity) as ledger:
        Path(f"{go}.{label}").touch()  # the file is open: ready
        wait_for(go)
        for i in range(int(count)):
            if i:
                wait_for(f"{go}.{other}.{i - 1}")
            device = Identity.generate()
            ledger.enroll_device(device.public_key, f"{label}-{i}", "open")
            if i % 3 == 0:
                ledger.record_updates(identity.id, i, TASK, BASE, [signed_reply(device, identity.id, i)])
            if i % 4 == 1:
                ledger.revoke_device(device.public_key, f"{label} revokes {i}")
            Path(f"{go}.{label}.{i}").touch()
