"""How fast one gateway takes in signed replies through Mosquitto, against the Ed25519 limit.

    python bench/gateway_ingest.py [--replies 5000] [--params 10000]

A real Mosquitto broker and a real `starling-gateway` process (FedAvg, one
round, a synthetic 10k-parameter model). One load-generator connection plays
every device: it enrolls N keys, marks them online, waits for their N
tasks, signs N int8 replies (before the clock starts) and publishes them as
fast as the broker takes them. The gateway's signed receipts are the finish
line: verified_per_s = N / (last positive receipt - first reply sent). The
same run measures one core's raw Ed25519 verify rate; ratio = the two.

Prints one JSON object: {"replies", "verified_per_s", "verify_limit_per_s", "ratio", ...}.
Goal (issue 3): ratio >= 0.5.
"""

from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402

from hw.broker import Broker, _child_env  # noqa: E402
from hw.synthetic import write_manifest  # noqa: E402
from protocol import envelope, schemas, topics  # noqa: E402
from protocol.keys import Identity, verify  # noqa: E402


def verify_rate(seconds: float = 2.0) -> float:
    """Ed25519 verifications per second on this core (PyNaCl), for a 200-byte message."""
    key = Identity.generate()
    message = b"x" * 200
    sig = key.sign(message)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            verify(key.public_key, message, sig)
        count += 200
    return count / (time.perf_counter() - start)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=5000)
    parser.add_argument("--params", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    n = args.replies
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_manifest(tmp / "model", {"w": (args.params // 10, 10)})
        gw = Identity.generate()
        gw.save(tmp / "gw.key")
        with Broker(tmp / "broker", kind="mosquitto") as broker:
            (tmp / "gw.toml").write_text(
                f'[gateway]\nname = "bench"\nkey = "gw.key"\nstate_dir = "state"\n'
                f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
                f'[model]\nmanifest = "{manifest}"\n'
                f'[strategy]\nname = "FedAvg"\nparams = {{ fraction_evaluate = 0.0, min_available_nodes = {n} }}\n'
                f"[rounds]\nnum_rounds = 1\ndeadline_s = {args.timeout}\nmin_devices = {n}\nwait_devices_s = {args.timeout}\n"
                '[enrollment]\npolicy = "open"\n'
            )
            log = open(tmp / "gateway.log", "wb")
            gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(tmp / "gw.toml")],
                                       cwd=ROOT, env=_child_env(), stdout=log, stderr=subprocess.STDOUT)
            inbox: queue.Queue = queue.Queue()
            client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="load")
            client.max_inflight_messages_set(1000)
            client.on_message = lambda _c, _u, m: inbox.put((m.topic, m.payload, time.perf_counter()))
            client.connect(broker.host, broker.port)
            client.subscribe([(topics.task(gw.id, "+"), 1), (topics.receipt(gw.id, "+"), 1)])
            client.loop_start()
            time.sleep(1.0)
            devices = {d.id: d for d in (Identity.from_seed(i.to_bytes(32, "big")) for i in range(1, n + 1))}
            say(f"enrolling {n} devices")
            for device in devices.values():
                ctx = envelope.Context(device.public_key, gw.id, 0, "enroll", b"")
                body = schemas.EnrollRequest("bench", time.time()).to_body()
                client.publish(topics.enroll(gw.id, device.id), envelope.seal(device, "enroll", ctx, body), qos=1)
                client.publish(topics.online(gw.id, device.id), b"1", qos=1)
            tasks: dict[str, envelope.Envelope] = {}
            end = time.monotonic() + args.timeout
            while len(tasks) < n and time.monotonic() < end:
                try:
                    topic, payload, _ = inbox.get(timeout=1.0)
                except queue.Empty:
                    continue
                if "/task/" in topic:
                    tasks[topics.device_of(topic)] = envelope.decode(payload)
            say(f"{len(tasks)} tasks received; signing {n} replies")
            delta = {"w": np.random.default_rng(0).normal(0, 0.01, (args.params // 10, 10)).astype(np.float32)}
            update = schemas.encode_update(delta, {"train_loss": 1.0, "steps": 1.0}, "i8")
            wires = []
            for device_id, task in tasks.items():
                device = devices[device_id]
                ctx = envelope.Context(device.public_key, gw.id, task.ctx.round, task.ctx.task, task.ctx.base)
                wires.append((topics.reply(gw.id, device_id), envelope.seal(device, "reply", ctx, {"examples": 32}, update)))
            say("sending")
            started = time.perf_counter()
            for topic, wire in wires:
                client.publish(topic, wire, qos=1)
            sent = time.perf_counter()
            accepted, rejected, last = 0, 0, started
            while accepted + rejected < len(wires) and time.monotonic() < end:
                try:
                    topic, payload, at = inbox.get(timeout=1.0)
                except queue.Empty:
                    continue
                if "/receipt/" in topic:
                    receipt = schemas.Receipt.from_body(envelope.decode(payload).body)
                    if receipt.reply:
                        accepted += receipt.accepted
                        rejected += not receipt.accepted
                        last = at
            gateway.wait(args.timeout)
            client.loop_stop()
            client.disconnect()
            log.close()
    limit = verify_rate()
    rate = accepted / (last - started) if last > started else 0.0
    print(json.dumps({
        "replies": accepted,
        "rejected": rejected,
        "verified_per_s": round(rate, 1),
        "verify_limit_per_s": round(limit, 1),
        "ratio": round(rate / limit, 3),
        "publish_s": round(sent - started, 3),
        "update_bytes": len(wires[0][1]) if wires else 0,
        "params": args.params,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
