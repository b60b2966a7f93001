"""A ledger peer process: one gateway's ledger and gossip, driven line by line on stdin.

For tests and benchmarks of gossip with several real processes on a real
broker, without the rest of a gateway:

    python -m hw.ledger_peer --db g1.db --key g1.key --genesis genesis.cbor --host 127.0.0.1 --port 1883

Commands (one per line; each answers one JSON line on stdout):

    enroll N          write N device.enroll vertices and push them     -> {"ids": [hex, ...]}
    equivocate        sign two different vertices with the same seq and push both (a lying gateway)
    checkpoint        write a checkpoint vertex and push it                        -> {"id": hex}
    status            -> the gossip status (version vector, height, finality, equivocators,
                         refusals, state digest) plus "ids" (every vertex id held)
    arrivals          -> {vertex id: unix time it was applied here}
    quit              stop cleanly (SIGTERM does the same)
"""

from __future__ import annotations

import argparse
import json
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from gateway.ledger_sync import LedgerSync
from ledger.kinds import DEVICE_ENROLL
from ledger.store import Ledger
from ledger.vertex import Vertex, sign
from protocol import logs
from protocol.keys import Identity


def make_city(workdir: Path, gateways: int, name: str = "city") -> tuple[list[Identity], Path]:
    """Gateway keys (saved as g<i>.key) and a genesis signed by a fresh root key (genesis.cbor)."""
    workdir.mkdir(parents=True, exist_ok=True)
    keys = [Identity.generate() for _ in range(gateways)]
    for i, key in enumerate(keys):
        key.save(workdir / f"g{i}.key")
    root = Identity.generate()
    genesis = sign(root, "genesis", 0, [], {"name": name, "gateways": sorted(k.public_key for k in keys)})
    (workdir / "genesis.cbor").write_bytes(genesis.encode())
    return keys, workdir / "genesis.cbor"


class PeerProcess:
    """A `hw.ledger_peer` child process and its command line."""

    def __init__(self, workdir: Path, index: int, genesis: Path, host: str, port: int,
                 vv_interval: float = 0.5, bootstrap_s: float = 0.0) -> None:
        from .broker import _child_env

        self.index = index
        self.log = open(workdir / f"g{index}.log", "ab")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hw.ledger_peer", "--db", str(workdir / f"g{index}.db"),
             "--key", str(workdir / f"g{index}.key"), "--genesis", str(genesis), "--host", host,
             "--port", str(port), "--vv-interval", str(vv_interval), "--bootstrap-s", str(bootstrap_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=_child_env(), text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def ask(self, command: str, timeout: float = 30.0) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"peer {self.index} did not answer {command!r} within {timeout} s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"peer {self.index} exited with {self.process.poll()}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
                self.process.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--key", required=True, type=Path)
    parser.add_argument("--genesis", required=True, type=Path, help="the encoded genesis vertex")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--vv-interval", type=float, default=0.5)
    parser.add_argument("--bootstrap-s", type=float, default=0.0,
                        help="with only genesis, wait this long for a peer's checkpoint before replaying history")
    args = parser.parse_args(argv)
    logs.setup("ledger-peer", "WARNING")
    identity = Identity.load(args.key)
    arrivals: dict[str, float] = {}
    lock = threading.Lock()
    with Ledger.open(args.db, identity) as ledger:
        if not ledger.is_initialized:
            ledger.insert_vertex(Vertex.decode(args.genesis.read_bytes()))
        for vertex in ledger.vertices():
            arrivals[vertex.id_hex] = 0.0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with LedgerSync(ledger, identity.id, args.host, args.port, vv_interval_s=args.vv_interval,
                        bootstrap_s=args.bootstrap_s) as sync:

            def applied(vertex: Vertex) -> None:
                with lock:
                    arrivals.setdefault(vertex.id_hex, time.time())

            sync.on_applied = applied

            def answer(doc: object) -> None:
                print(json.dumps(doc), flush=True)

            for line in sys.stdin:
                if stop.is_set():
                    break
                words = line.split()
                if not words:
                    continue
                if words[0] == "enroll":
                    ids = []
                    for _ in range(int(words[1])):
                        vertex = ledger.enroll_device(secrets.token_bytes(32), "peer", "open")
                        with lock:
                            arrivals[vertex.id_hex] = time.time()
                        sync.announce(vertex)
                        ids.append(vertex.id_hex)
                    answer({"ids": ids})
                elif words[0] == "equivocate":
                    seq = ledger.last_seq(identity.id) + 1
                    tips = ledger.tips()
                    twins = [sign(identity, DEVICE_ENROLL, seq, tips,
                                  {"device": secrets.token_bytes(32), "name": f"twin-{i}", "policy": "open"})
                             for i in range(2)]
                    ledger.insert_vertex(twins[0])
                    for twin in twins:
                        sync.announce(twin)
                    answer({"ids": [t.id_hex for t in twins]})
                elif words[0] == "checkpoint":
                    vertex = ledger.write_checkpoint()
                    sync.announce(vertex)
                    answer({"id": vertex.id_hex})
                elif words[0] == "status":
                    doc = sync.gossip.status(with_state_digest=True)
                    doc["ids"] = sorted(v.hex() for v in ledger.ids())
                    doc["bootstrapped_from"] = sync.gossip.bootstrapped_from
                    doc["full_vertices"] = sum(1 for _ in ledger.vertices())
                    answer(doc)
                elif words[0] == "arrivals":
                    with lock:
                        answer(dict(arrivals))
                elif words[0] == "quit":
                    break
                else:
                    answer({"error": f"unknown command {words[0]!r}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
