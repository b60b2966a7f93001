"""The gateway service: one broker connection, one worker thread, one strategy.

Lifetimes, top-down:

    Gateway(config).run(stop)
      ├─ Link (MQTT)            paho thread: counts bytes, queues messages
      ├─ worker thread          the only thread that touches the ledger (SQLite):
      │                         replies -> MqttGrid.handle_reply, enrollments, online status
      └─ caller's thread        waits for devices, evaluates round 0, runs
                                strategy.start(grid=MqttGrid(...)), writes result.json

Ledger records: a `device.enroll` vertex per admitted device, an `updates`
vertex per training round (the batch of accepted replies with their device
signatures), and an `aggregate` vertex per new global model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocol import envelope, schemas, topics
from protocol.atomic import write_atomic
from protocol.errors import ProtocolError
from protocol.keys import load_or_create, node_id
from protocol.logs import event

from .config import GatewayConfig
from .grid import MqttGrid, RoundTraffic
from .ingest import ReplyChecker
from .link import Link
from .models import ModelPublisher, Release

log = logging.getLogger("starling.gateway")
MAX_ENROLL_BYTES = 4096


@dataclass
class RoundRecord:
    round: int
    accuracy: float | None
    loss: float | None
    participants: int
    rejected: int
    bytes_up: int
    bytes_down: int
    seconds: float


def default_manifest() -> Path:
    """The shipped IMU CNN's manifest (an artifact lookup; no model code is imported)."""
    from importlib.resources import files

    return Path(str(files("firmware_models") / "imu_cnn" / "manifest.json"))


def load_initial_weights(manifest_path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest and the initial weights beside it, checked against the manifest."""
    manifest = json.loads(manifest_path.read_text())
    weights_path = manifest_path.parent / "weights.npz"
    raw = weights_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest["weights_sha256"]:
        raise ValueError(f"{weights_path} does not match weights_sha256 in {manifest_path}")
    with np.load(weights_path) as npz:
        weights = {w["name"]: npz[w["name"]].astype(np.float32) for w in manifest["weights"]}
    return manifest, weights


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.identity = load_or_create(config.key)
        self.id = self.identity.id
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger_path = config.state_dir / "ledger.db"
        self.manifest, self.initial_weights = load_initial_weights(config.manifest or default_manifest())
        self.enrolled: dict[bytes, str] = {}
        self.online: set[str] = set()
        self.enroll_rejections: dict[str, int] = {}
        self.history: list[RoundRecord] = []
        self.state = "starting"
        self.round = 0
        self._jobs: queue.Queue = queue.Queue()
        self._ledger = None
        self._round_start: dict[int, tuple[float, int, int]] = {}
        self._pending_aggregate: tuple[int, bytes, list[bytes]] | None = None
        self._traffic: dict[tuple[str, int], RoundTraffic] = {}

    # --- worker thread: the ledger and all inbound messages ---------------------------

    def _call(self, fn, *args):
        """Run `fn(*args)` on the worker thread (the ledger's only thread) and return its result."""
        future: Future = Future()
        self.link.inbox.put(("", (fn, args, future)))
        return future.result(timeout=60)

    def _worker(self, stop: threading.Event) -> None:
        from ledger.store import Ledger

        self._ledger = Ledger(self.ledger_path, self.identity)
        if not self._ledger.is_initialized:
            self._ledger.init_genesis(self.config.name, [self.identity.public_key])
        self.enrolled = dict(self._ledger.enrolled_devices())
        self._worker_ready.set()
        prefix = f"{topics.ROOT}/{self.id}/"
        while not stop.is_set():
            try:
                topic, payload = self.link.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if topic == "":
                    fn, args, future = payload
                    try:
                        future.set_result(fn(*args))
                    except Exception as exc:  # handed back to the caller
                        future.set_exception(exc)
                elif topic.startswith(prefix + "reply/"):
                    self.grid.handle_reply(topic, payload)
                elif topic.startswith(prefix + "enroll/"):
                    self._handle_enroll(topic, payload)
                elif topic.startswith(prefix + "online/"):
                    device = topics.device_of(topic)
                    (self.online.add if payload == b"1" else self.online.discard)(device)
            except Exception:  # nothing a device sends may stop the gateway
                log.exception("worker.failed topic=%s", topic)
        self._ledger.close() if hasattr(self._ledger, "close") else None

    def _handle_enroll(self, topic: str, payload: bytes) -> None:
        def refuse(reason: str, detail: str, env: envelope.Envelope | None = None) -> None:
            self.enroll_rejections[reason] = self.enroll_rejections.get(reason, 0) + 1
            event(log, "enroll.rejected", logging.WARNING, device=topics.device_of(topic), reason=reason, detail=detail)
            if env is not None and env.ctx.sender_id == topics.device_of(topic):
                self._enroll_receipt(env.ctx.sender_id, False, reason)

        try:
            env = envelope.decode(payload, max_bytes=MAX_ENROLL_BYTES)
            if env.type != "enroll":
                raise schemas.SchemaError(f"a {env.type!r} message on an enroll topic")
            request = schemas.EnrollRequest.from_body(env.body)
        except ProtocolError as exc:
            return refuse(exc.reason, exc.detail)
        if env.ctx.sender_id != topics.device_of(topic):
            return refuse("topic_mismatch", "signed by another key")
        if env.ctx.gateway != self.id:
            return refuse("wrong_gateway", env.ctx.gateway)
        try:
            env.verify()
        except ProtocolError as exc:
            return refuse(exc.reason, exc.detail)
        key = env.ctx.sender
        if self.config.policy == "allowlist" and key not in self.config.allowlist:
            return refuse("not_allowed", "key is not on the allow-list", env)
        if key not in self.enrolled:
            self._ledger.enroll_device(key, request.name, self.config.policy)
            self.enrolled[key] = request.name
            event(log, "enroll.accepted", device=env.ctx.sender_id, name=request.name, policy=self.config.policy)
        self._enroll_receipt(env.ctx.sender_id, True, "")

    def _enroll_receipt(self, device_id: str, accepted: bool, reason: str) -> None:
        ctx = envelope.Context(self.identity.public_key, self.id, 0, "enroll", b"")
        body = schemas.Receipt(device_id, b"", accepted, reason).to_body()
        self.link.publish(topics.receipt(self.id, device_id), envelope.seal(self.identity, "receipt", ctx, body))

    # --- round bookkeeping (caller's thread) ----------------------------------------

    def nodes(self) -> dict[int, bytes]:
        return {node_id(key): key for key in list(self.enrolled) if envelope.Context(key, "x").sender_id in self.online}

    def _on_release(self, release: Release, round_: int) -> None:
        event(log, "model.released", digest=release.digest.hex()[:16], version=release.version, bytes=release.size)
        if self._pending_aggregate is not None:
            self._record_aggregate(release.digest)

    def _record_aggregate(self, output: bytes) -> None:
        round_, base, inputs = self._pending_aggregate
        self._pending_aggregate = None
        if output != base:
            self._call(self._ledger.record_aggregate, round_, self.config.strategy, base, inputs, output)

    def _on_closed(self, traffic: RoundTraffic) -> None:
        self._traffic[(traffic.kind, traffic.round)] = traffic
        if traffic.kind == "train":
            records = [
                (a.envelope.ctx.sender, a.envelope.body["digest"], a.examples, a.envelope.sig) for a in traffic.accepted
            ]
            if records:
                self._call(self._ledger.record_updates, self.id, traffic.round, f"train-{traffic.round}", traffic.base, records)
                self._pending_aggregate = (traffic.round, traffic.base, [r[1] for r in records])
        else:
            self._finish_round(traffic)
        self._publish_status()

    def _finish_round(self, evaluation: RoundTraffic) -> None:
        r = evaluation.round
        train = self._traffic.get(("train", r))
        total = sum(a.examples for a in evaluation.accepted)
        accuracy = loss = None
        if total:
            accuracy = sum(a.metrics["accuracy"] * a.examples for a in evaluation.accepted) / total
            loss = sum(a.metrics["loss"] * a.examples for a in evaluation.accepted) / total
        started, bytes_in, bytes_out = self._round_start.get(r, (evaluation.started, 0, 0))
        rejected = sum(evaluation.rejected.values()) + (sum(train.rejected.values()) if train else 0)
        record = RoundRecord(
            round=r,
            accuracy=accuracy,
            loss=loss,
            participants=len(train.accepted) if train else 0,
            rejected=rejected,
            bytes_up=self.link.bytes_in - bytes_in,
            bytes_down=self.link.bytes_out - bytes_out,
            seconds=round(time.time() - started, 3),
        )
        self.history.append(record)
        self._round_start[r + 1] = (time.time(), self.link.bytes_in, self.link.bytes_out)
        event(log, "round.done", round=r, accuracy=accuracy if accuracy is not None else "-",
              participants=record.participants, rejected=rejected, seconds=record.seconds)

    def _publish_status(self) -> None:
        status = {
            "gateway": self.id,
            "name": self.config.name,
            "state": self.state,
            "round": self.history[-1].round if self.history else None,
            "num_rounds": self.config.num_rounds,
            "enrolled": len(self.enrolled),
            "online": len(self.online),
            "rejections": dict(self.grid.rejections) if hasattr(self, "grid") else {},
            "history": [asdict(r) for r in self.history],
            "time": time.time(),
        }
        self.link.publish(topics.status(self.id), json.dumps(status).encode(), retain=True, counted=False)

    # --- the run ------------------------------------------------------------------------

    def _wait_for_devices(self, stop: threading.Event) -> None:
        end = time.monotonic() + self.config.wait_devices_s
        while len(self.nodes()) < self.config.min_devices:
            if stop.is_set():
                raise InterruptedError("stopped while waiting for devices")
            if time.monotonic() > end:
                raise TimeoutError(
                    f"only {len(self.nodes())} of {self.config.min_devices} devices enrolled and online "
                    f"after {self.config.wait_devices_s:.0f} s"
                )
            stop.wait(0.2)

    def run(self, stop: threading.Event) -> dict[str, Any]:
        """Run every round, write `result.json` in the state folder and return it."""
        from flwr.app import Array, ArrayRecord, ConfigRecord
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        cfg = self.config
        strategy = cfg.make_strategy()
        # The gateway is the ServerApp task of its run: Flower's Message() reads this identity.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
        prefix = f"{topics.ROOT}/{self.id}"
        self.link = Link(f"gw-{self.id}", cfg.broker_host, cfg.broker_port,
                         [f"{prefix}/reply/+", f"{prefix}/enroll/+", f"{prefix}/online/+"], topics.status(self.id))
        # The largest honest reply is an f32 delta of the whole model plus small change.
        model_bytes = sum(w.nbytes for w in self.initial_weights.values())
        checker = ReplyChecker(self.id, lambda key: key in self.enrolled, max_reply_bytes=model_bytes + 64 * 1024)
        publisher = ModelPublisher(self.identity, self.id, self.manifest["sha256"], self.link.publish)
        publisher.on_release = self._on_release
        train_defaults = schemas.TrainConfig(cfg.epochs, cfg.batch_size, cfg.lr)
        self.grid = MqttGrid(self.identity, self.id, self.link.publish, checker, publisher, self.nodes,
                             cfg.deadline_s, train_defaults)
        self.grid.on_closed = self._on_closed
        self.grid.stop = stop
        self._worker_ready = threading.Event()
        worker_stop = threading.Event()
        started = time.time()
        with self.link:
            worker = threading.Thread(target=self._worker, args=(worker_stop,), name="gateway-worker", daemon=True)
            worker.start()
            try:
                if not self._worker_ready.wait(30):
                    raise RuntimeError("the ledger did not open within 30 s")
                event(log, "gateway.start", id=self.id, name=cfg.name, strategy=cfg.strategy,
                      rounds=cfg.num_rounds, ledger=str(self.ledger_path))
                self.state = "waiting"
                self._publish_status()
                self._wait_for_devices(stop)
                self.state = "running"
                initial = ArrayRecord({k: Array(v) for k, v in self.initial_weights.items()})
                self._round_start[0] = (time.time(), self.link.bytes_in, self.link.bytes_out)
                # Round 0: the initial model, evaluated by the devices like every later one.
                replies = self.grid.send_and_receive(strategy.configure_evaluate(0, initial, ConfigRecord(), self.grid))
                strategy.aggregate_evaluate(0, replies)
                train_config = ConfigRecord({"epochs": cfg.epochs, "batch-size": cfg.batch_size, "lr": cfg.lr})
                result = strategy.start(grid=self.grid, initial_arrays=initial, num_rounds=cfg.num_rounds,
                                        timeout=cfg.deadline_s, train_config=train_config)
                if result.arrays is not None:
                    final = publisher.release({k: v.numpy() for k, v in result.arrays.items()}, cfg.num_rounds)
                    if self._pending_aggregate is not None:
                        self._record_aggregate(final.digest)
                self.state = "done"
            except InterruptedError as exc:
                self.state = "stopped"
                event(log, "gateway.stopped", logging.WARNING, reason=str(exc))
            except TimeoutError as exc:
                self.state = "failed"
                event(log, "gateway.failed", logging.ERROR, reason=str(exc))
            finally:
                height = self._call(lambda: self._ledger.height) if worker.is_alive() else None
                self._publish_status()
                worker_stop.set()
                worker.join(timeout=10)
        result_doc = {
            "gateway": {"id": self.id, "name": cfg.name, "public_key": self.identity.public_key.hex()},
            "state": self.state,
            "rounds": [asdict(r) for r in self.history],
            "rejections": dict(self.grid.rejections),
            "enroll_rejections": dict(self.enroll_rejections),
            "ledger": {"path": str(self.ledger_path), "height": height},
            "model": {"digest": publisher.current.digest.hex() if publisher.current else None,
                      "version": publisher.current.version if publisher.current else None},
            "seconds": round(time.time() - started, 2),
        }
        write_atomic(cfg.state_dir / "result.json", json.dumps(result_doc, indent=2).encode())
        event(log, "gateway.stop", state=self.state, rounds=len(self.history))
        return result_doc
