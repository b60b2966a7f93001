"""The gateway service: one broker connection, one worker thread, one strategy.

Lifetimes, top-down:

    Gateway(config).run(stop)
      ├─ Link (MQTT)            paho thread: counts bytes, queues messages
      ├─ worker thread          the only thread that touches the ledger (SQLite):
      │                         ledger jobs first, then replies -> MqttGrid.handle_reply,
      │                         enrollments, online status
      └─ caller's thread        waits for devices, evaluates round 0, runs
                                strategy.start(grid=MqttGrid(...)), writes result.json

Ledger records: a `device.enroll` vertex per admitted device, an `updates`
vertex per training round (the batch of accepted replies with their device
signatures), and an `aggregate` vertex per new global model.
"""

from __future__ import annotations

import hashlib
import io
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

from ledger.vertex import Vertex
from protocol import envelope, schemas, topics
from protocol.atomic import write_atomic
from protocol.errors import ProtocolError
from protocol.keys import Identity, identity_id, node_id
from protocol.logs import event
from protocol.vouchers import Voucher

from .config import GatewayConfig
from .grid import MqttGrid, RoundTraffic
from .ingest import EVALUATE_METRICS_BY_TASK, Accepted, Duplicate, ReplyChecker, Skipped
from .ingest_workers import IngestWorkers, WorkerSettings
from .journal import Journal
from .ledger_sync import LedgerSync
from .link import Link
from .mcu import McuExporter
from .models import ModelPublisher, Release

log = logging.getLogger("starling.gateway")
MAX_ENROLL_BYTES = 4096
LEDGER_SYNC_S = 1.0
LEDGER_CALL_TIMEOUT_S = 120.0
INGEST_BATCH = 256  # messages taken from the inbox at once
MAX_STATUS_REVOKED = 1000  # revoked device ids listed in the status (the count is always exact)
EXPORT_WAIT_S = 120.0  # at the end of a run, how long the last MCU export may still take


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
    skipped: int = 0  # devices that sat the round's training out, saying why (see the status' device topics)


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
    def __init__(self, config: GatewayConfig, identity: Identity) -> None:
        self.config = config
        self.identity = identity
        self.id = identity.id
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger_path = config.state_dir / "ledger.db"
        self.manifest, self.initial_weights = load_initial_weights(config.manifest or default_manifest())
        self.enrolled: dict[bytes, str] = {}  # public key -> name
        self.by_node: dict[int, bytes] = {}  # Flower node id -> public key
        self.by_id: dict[str, bytes] = {}  # device id -> public key
        self.online: set[str] = set()
        self.revoked: set[bytes] = set()
        self.device_stats: dict[str, dict[str, Any]] = {}  # enrolled device id -> last seen, accepted, rejected
        self._stats_changed: set[str] = set()
        self._stats_lock = threading.Lock()
        self.enroll_rejections: dict[str, int] = {}
        self.history: dict[int, RoundRecord] = {}
        self.state = "starting"
        self._jobs: queue.Queue = queue.Queue()
        self._ledger = None
        self._round_start: dict[int, tuple[float, int, int]] = {}
        self._pending_aggregate: tuple[int, bytes, list[bytes]] | None = None
        self.ingest: IngestWorkers | None = None  # with [ingest] workers: processes that authenticate replies
        self.sync: LedgerSync | None = None  # ledger gossip with the other gateways
        self.mcu: McuExporter | None = None  # with [model] mcu_python: int8 exports of each release
        self._ledger_writes = -1

    def _bytes_in(self) -> int:
        """Bytes received from devices: through the gateway's own connection and its ingest workers."""
        return self.link.bytes_in + (self.ingest.bytes_in if self.ingest is not None else 0)

    # --- worker thread: the ledger and all inbound messages ---------------------------

    def _call(self, fn, *args):
        """Run `fn(*args)` on the worker thread (the ledger's only thread) and return its result."""
        future: Future = Future()
        self._jobs.put((fn, args, future))
        return future.result(timeout=LEDGER_CALL_TIMEOUT_S)

    def _admit(self, key: bytes, name: str) -> None:
        if self.ingest is not None and key not in self.enrolled:
            self.ingest.enroll(key)
        self.enrolled[key] = name
        self.by_node[node_id(key)] = key
        self.by_id[identity_id(key)] = key

    def _worker(self, stop: threading.Event) -> None:
        from ledger.store import Ledger

        try:
            self._ledger = Ledger(self.ledger_path, self.identity)
            if not self._ledger.is_initialized:
                if self.config.genesis is not None:  # the city's ledger, rooted in the operator's key
                    self._ledger.insert_vertex(Vertex.decode(self.config.genesis.read_bytes()))
                else:  # a ledger of its own: this gateway is its root and only member
                    self._ledger.init_genesis(self.config.name, [self.identity.public_key])
            if self.config.gossip:
                cfg = self.config
                self.sync = LedgerSync(self._ledger, self.id, cfg.broker_host, cfg.broker_port,
                                       cfg.broker_auth, bootstrap_s=cfg.bootstrap_s).__enter__()
                self._ledger.on_append = self.sync.announce
            if self.identity.public_key not in self._ledger.gateways():
                raise RuntimeError(f"this gateway ({self.id}) is not a member of the ledger: the operator admits it "
                                   "with `starling-ledger join`")
            self._sync_ledger()
            if self.config.ingest_workers:
                self.ingest = IngestWorkers(self.config.ingest_workers, self._worker_settings(), self.link.inbox,
                                            self.enrolled, self.revoked).__enter__()
        except Exception as exc:  # reported by run(): a gateway without its ledger must not start
            self._worker_error = exc
            if self.sync is not None:
                self.sync.__exit__(None, None, None)
            return
        finally:
            self._worker_ready.set()
        try:
            self._work(stop)
        finally:
            if self.ingest is not None:
                self.ingest.__exit__(None, None, None)
            if self.sync is not None:
                self.sync.__exit__(None, None, None)
            self._ledger.close()

    def _worker_settings(self) -> WorkerSettings:
        cfg = self.config
        return WorkerSettings(self.id, cfg.broker_host, cfg.broker_port, cfg.broker_auth,
                              self.grid.checker.authenticator.max_reply_bytes, logging.getLogger().level)

    def _work(self, stop: threading.Event) -> None:
        prefix = f"{topics.ROOT}/{self.id}/"
        next_sync = time.monotonic() + LEDGER_SYNC_S
        while not stop.is_set():
            if time.monotonic() >= next_sync:  # operators enroll and revoke with starling-ledger, elsewhere
                self._sync_ledger()
                self._maybe_checkpoint()
                if self.ingest is not None:
                    self.ingest.watch()
                next_sync = time.monotonic() + LEDGER_SYNC_S
            # Ledger jobs first: a flood of device messages must not starve round bookkeeping.
            while not self._jobs.empty():
                fn, args, future = self._jobs.get()
                try:
                    future.set_result(fn(*args))
                except Exception as exc:  # handed back to the caller
                    future.set_exception(exc)
            try:
                batch = [self.link.inbox.get(timeout=0.05)]
            except queue.Empty:
                continue
            while len(batch) < INGEST_BATCH:  # whatever else already waits: one journal commit for all its replies
                try:
                    batch.append(self.link.inbox.get_nowait())
                except queue.Empty:
                    break
            # In arrival order; consecutive replies go through the grid together.
            replies: list[tuple[str, bytes, object]] = []
            for topic, payload, first in batch:
                if topic.startswith(prefix + "reply/"):
                    replies.append((topic, payload, first))
                    continue
                self._ingest_replies(replies)
                replies = []
                self._handle_other(prefix, topic, payload)
            self._ingest_replies(replies)

    def _ingest_replies(self, replies: list[tuple[str, bytes, object]]) -> None:
        if not replies:
            return
        try:
            for outcome in self.grid.handle_replies(replies):
                self._note_device(outcome)
        except Exception:  # nothing a device sends may stop the gateway
            log.exception("worker.failed topic=%s", replies[0][0])

    def _handle_other(self, prefix: str, topic: str, payload: bytes) -> None:
        try:
            if topic.startswith(prefix + "enroll/"):
                self._handle_enroll(topic, payload)
            elif topic.startswith(prefix + "online/"):
                device = topics.device_of(topic)
                if device in self.by_id:  # liveness of strangers is nobody's business
                    (self.online.add if payload == b"1" else self.online.discard)(device)
                    self._note_device(None, device)
        except Exception:  # nothing a device sends may stop the gateway
            log.exception("worker.failed topic=%s", topic)

    def _note_device(self, outcome, device: str | None = None) -> None:
        """Per-device status: last seen, accepted, rejected by reason (enrolled devices only: bounded)."""
        if device is None:
            device = outcome.task.device_id if isinstance(outcome, Accepted) else outcome.device_id
        if device not in self.by_id:
            return
        with self._stats_lock:
            stats = self.device_stats.setdefault(device, {"device": device, "name": self.enrolled.get(
                self.by_id[device], ""), "last_seen": 0.0, "accepted": 0, "rejected": {}})
            stats["last_seen"] = round(time.time(), 3)
            stats["online"] = device in self.online
            reason = getattr(outcome, "reason", None)
            if isinstance(outcome, Skipped):
                stats.setdefault("skipped", {})[reason] = stats.get("skipped", {}).get(reason, 0) + 1
            elif isinstance(outcome, Duplicate):  # a re-send of an accepted reply: neither accepted twice nor refused
                stats["duplicates"] = stats.get("duplicates", 0) + 1
            elif reason is not None:
                stats["rejected"][reason] = stats["rejected"].get(reason, 0) + 1
            elif outcome is not None:
                stats["accepted"] += 1
            self._stats_changed.add(device)

    def _publish_device_status(self) -> None:
        """Retained JSON per device that changed since the last time (starling/<gw>/status/device/<id>)."""
        with self._stats_lock:
            changed, self._stats_changed = self._stats_changed, set()
            docs = [dict(self.device_stats[d], rejected=dict(self.device_stats[d]["rejected"]),
                         skipped=dict(self.device_stats[d].get("skipped", {}))) for d in changed]
        for doc in docs:
            self.link.publish(topics.device_status(self.id, doc["device"]), json.dumps(doc).encode(), retain=True,
                              counted=False)

    def _sync_ledger(self) -> None:
        """Take in enrollments and revocations that reached the ledger from elsewhere: an operator's
        `starling-ledger` (another process) or another gateway (gossip)."""
        elsewhere = self._ledger.changed_elsewhere()
        if not elsewhere and self._ledger.writes == self._ledger_writes:
            return
        self._ledger_writes = self._ledger.writes
        for key, name in self._ledger.enrolled_devices().items():
            if key not in self.enrolled:
                self._admit(key, name)
                if self.state != "starting":
                    event(log, "device.enrolled", device=identity_id(key), name=name, by="ledger")
        self._sync_revocations()

    def _maybe_checkpoint(self) -> None:
        """Commit to the ledger's state every `checkpoint_every` vertices (new gateways start from it)."""
        every = self.config.checkpoint_every
        if not every or (self.sync is not None and self.sync.gossip.bootstrapping):
            return
        try:
            if self._ledger.since_checkpoint() >= every:
                vertex = self._ledger.write_checkpoint()
                event(log, "ledger.checkpoint", vertex=vertex.id_hex[:16], count=vertex.body["count"])
        except Exception:  # a checkpoint is an optimisation: never worth stopping the gateway for
            log.exception("ledger.checkpoint_failed")

    def _sync_revocations(self) -> None:
        """Drop devices the ledger says are revoked: their next reply is refused as `revoked`."""
        for key, reason in self._ledger.revoked_devices().items():
            if key in self.revoked:
                continue
            self.revoked.add(key)
            if self.ingest is not None:
                self.ingest.revoke(key)
            self.enrolled.pop(key, None)
            self.by_node.pop(node_id(key), None)
            device = identity_id(key)
            self.by_id.pop(device, None)
            self.online.discard(device)
            event(log, "device.revoked", device=device, reason=reason)

    def _handle_enroll(self, topic: str, payload: bytes) -> None:
        def refuse(reason: str, detail: str, env: envelope.Envelope | None = None) -> None:
            self.enroll_rejections[reason] = self.enroll_rejections.get(reason, 0) + 1
            event(log, "enroll.rejected", logging.WARNING, device=topics.device_of(topic), reason=reason, detail=detail)
            if env is not None:  # only a verified sender gets a signed answer
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
        if key in self.revoked:
            return refuse("revoked", "this key was revoked; a device needs a new key", env)
        if self.config.policy == "allowlist" and key not in self.config.allowlist:
            return refuse("not_allowed", "key is not on the allow-list", env)
        if self.config.policy == "voucher" and key not in self.enrolled:
            if not request.voucher:
                return refuse("no_voucher", "the voucher policy needs an operator's voucher", env)
            try:
                Voucher.decode(request.voucher).check(self.config.operator_keys, key, self.id)
            except ProtocolError as exc:
                return refuse(exc.reason, exc.detail, env)
        if key not in self.enrolled:
            self._ledger.enroll_device(key, request.name, self.config.policy)
            self._admit(key, request.name)
            self.online.add(env.ctx.sender_id)  # it is connected: it just sent this request
            event(log, "enroll.accepted", device=env.ctx.sender_id, name=request.name, policy=self.config.policy)
        self._enroll_receipt(env.ctx.sender_id, True, "")

    def _enroll_receipt(self, device_id: str, accepted: bool, reason: str) -> None:
        ctx = envelope.Context(self.identity.public_key, self.id, 0, "enroll", b"")
        body = schemas.Receipt(device_id, b"", accepted, reason).to_body()
        self.link.publish(topics.receipt(self.id, device_id), envelope.seal(self.identity, "receipt", ctx, body))

    # --- round bookkeeping (caller's thread) ----------------------------------------

    def online_nodes(self) -> dict[int, bytes]:
        return {node_id(self.by_id[d]): self.by_id[d] for d in list(self.online) if d in self.by_id}

    def _on_release(self, release: Release, round_: int) -> None:
        event(log, "model.released", digest=release.digest.hex()[:16], version=release.version, bytes=release.size)
        self.journal.record_model(release.digest, schemas.encode_model(release.weights))
        if self.mcu is not None:  # exported on its own thread: the round goes on
            self.mcu.submit(release.digest, release.version, release.weights)
        if self._pending_aggregate is not None:
            self._record_aggregate(release.digest)

    def _record_aggregate(self, output: bytes) -> None:
        round_, base, inputs = self._pending_aggregate
        self._pending_aggregate = None
        if output != base:
            self._call(self._ledger.record_aggregate, round_, self.config.strategy, base, inputs, output)

    def _record_updates(self, traffic: RoundTraffic) -> list[bytes]:
        """Write the round's accepted updates as one `updates` vertex; return the recorded digests,
        each once (two devices may send byte-identical updates: a free rider's zeros, a replayed file).

        If the ledger refuses the batch (it should not: every reply was checked), the records are
        tried one by one, so one bad record costs only itself, never the round.
        """
        from ledger.errors import LedgerError

        records = [(a.envelope.ctx.sender, a.envelope.body["digest"], a.examples, a.envelope.sig)
                   for a in traffic.accepted]
        if not records:
            return []
        if self.journal.is_recorded(traffic.task):  # written before a crash: never count an update twice
            return list(dict.fromkeys(r[1] for r in records))
        args = (self.id, traffic.round, traffic.task, traffic.base)
        try:
            self._call(self._ledger.record_updates, *args, records, True)  # each signature verified at ingest
            self.journal.mark_recorded(traffic.task)
            return list(dict.fromkeys(r[1] for r in records))
        except LedgerError as exc:
            event(log, "ledger.batch_refused", logging.ERROR, round=traffic.round, reason=str(exc))
        kept = []
        for record in records:
            try:
                self._call(self._ledger.record_updates, *args, [record])
                kept.append(record[1])
            except LedgerError as exc:
                event(log, "ledger.record_refused", logging.ERROR, device=identity_id(record[0]), reason=str(exc))
        self.journal.mark_recorded(traffic.task)
        return list(dict.fromkeys(kept))

    def _on_closed(self, traffic: RoundTraffic) -> None:
        r = traffic.round
        record = self.history.get(r)
        if record is None:
            record = self.history[r] = RoundRecord(r, None, None, 0, 0, 0, 0, 0.0)
        record.rejected += sum(traffic.rejected.values())
        if traffic.kind == "train":
            record.participants = len(traffic.accepted)
            record.skipped = sum(traffic.skipped.values())
            inputs = self._record_updates(traffic)
            if inputs:
                self._pending_aggregate = (r, traffic.base, inputs)
        else:
            total = sum(a.examples for a in traffic.accepted)
            if total:  # accuracy on the devices' local test windows, weighted by their number
                if all("accuracy" in a.metrics for a in traffic.accepted):  # a self-supervised model has none
                    record.accuracy = sum(a.metrics["accuracy"] * a.examples for a in traffic.accepted) / total
                record.loss = sum(a.metrics["loss"] * a.examples for a in traffic.accepted) / total
        started, bytes_in, bytes_out = self._round_start.setdefault(r, (traffic.started, 0, 0))
        record.bytes_up = self._bytes_in() - bytes_in
        record.bytes_down = self.link.bytes_out - bytes_out
        record.seconds = round(time.time() - started, 3)
        # The next round starts where this one's last exchange ended (its evaluation, if any).
        self._round_start[r + 1] = (time.time(), self._bytes_in(), self.link.bytes_out)
        self.journal.record_round(r, asdict(record))
        if traffic.kind != "train":
            event(log, "round.done", round=r, accuracy="-" if record.accuracy is None else record.accuracy,
                  participants=record.participants, rejected=record.rejected, seconds=record.seconds)
        self._publish_status()

    def _save_model(self, release: Release | None) -> Path | None:
        """The last released global model as `state_dir/model.npz` (for operators and `export-mcu`)."""
        if release is None:
            return None
        buffer = io.BytesIO()
        np.savez(buffer, **release.weights)
        path = self.config.state_dir / "model.npz"
        try:
            write_atomic(path, buffer.getvalue())
        except OSError as exc:  # the run's record matters more than this copy
            event(log, "model.not_saved", logging.ERROR, reason=str(exc))
            return None
        return path

    def _ledger_status(self) -> dict[str, Any] | None:
        """Height, finality and peers of the ledger, for the status topic (None before it opened)."""
        try:
            if self.sync is not None:
                doc = self.sync.gossip.status()
                doc.pop("vv", None)
                doc.pop("gateway", None)
                return doc
            return self._ledger.finality() if self._ledger is not None else None
        except Exception:  # a status must never fail the round
            log.exception("status.ledger_failed")
            return None

    def status(self) -> dict[str, Any]:
        """What the retained status topic carries (README: Status topics)."""
        history = [asdict(self.history[r]) for r in sorted(self.history)]
        revoked = sorted(identity_id(key) for key in list(self.revoked))
        return {
            "gateway": self.id,
            "name": self.config.name,
            "state": self.state,
            "round": history[-1]["round"] if history else None,
            "num_rounds": self.config.num_rounds,
            "enrolled": len(self.enrolled),
            "online": len(self.online),
            "rejections": dict(self.grid.rejections),
            "duplicates": self.grid.duplicates,  # honest re-sends of accepted replies: not rejections
            "ledger": self._ledger_status(),
            "history": history,
            "revoked": {"count": len(revoked), "devices": revoked[:MAX_STATUS_REVOKED]},
            "time": time.time(),
        }

    def _publish_status(self) -> None:
        self._publish_device_status()
        self.link.publish(topics.status(self.id), json.dumps(self.status()).encode(), retain=True, counted=False)

    # --- the run ------------------------------------------------------------------------

    def _wait_for_devices(self, stop: threading.Event) -> None:
        end = time.monotonic() + self.config.wait_devices_s
        while len(self.online_nodes()) < self.config.min_devices:
            if stop.is_set():
                raise InterruptedError("stopped while waiting for devices")
            if time.monotonic() > end:
                raise TimeoutError(
                    f"only {len(self.online_nodes())} of {self.config.min_devices} devices enrolled and online "
                    f"after {self.config.wait_devices_s:.0f} s"
                )
            stop.wait(0.2)

    def _rounds(self, strategy, stop: threading.Event) -> None:
        from flwr.app import Array, ArrayRecord, ConfigRecord

        cfg = self.config
        resume = self._resume
        self._wait_for_devices(stop)
        self.state = "running"
        num_rounds = cfg.num_rounds
        if resume is not None:
            # A crash interrupted round `resume.round`: go on from its base model with its devices and replies.
            self.grid.run_tag, self.grid.resume, self.grid.round_offset = resume.tag, resume, resume.round - 1
            weights = schemas.decode_model(resume.model)
            num_rounds = cfg.num_rounds - resume.round + 1
            self._round_start[resume.round] = (time.time(), self._bytes_in(), self.link.bytes_out)
            for doc in self.journal.rounds():  # the rounds before the crash, for status and result.json
                if doc["round"] < resume.round:
                    self.history[doc["round"]] = RoundRecord(**doc)
            event(log, "gateway.resume", round=resume.round, accepted=len(resume.replies), run=resume.tag)
        else:
            weights = self.initial_weights
            self.journal.start_run(self.grid.run_tag, cfg.strategy, cfg.num_rounds)
        initial = ArrayRecord({k: Array(v) for k, v in weights.items()})
        if resume is None:
            self._round_start[0] = (time.time(), self._bytes_in(), self.link.bytes_out)
            # Round 0: the initial model, evaluated by the devices like every later one.
            replies = self.grid.send_and_receive(strategy.configure_evaluate(0, initial, ConfigRecord(), self.grid))
            strategy.aggregate_evaluate(0, replies)
        train_config = ConfigRecord({"epochs": cfg.epochs, "batch-size": cfg.batch_size, "lr": cfg.lr})
        result = strategy.start(grid=self.grid, initial_arrays=initial, num_rounds=num_rounds,
                                timeout=cfg.deadline_s, train_config=train_config)
        if result.arrays is not None:
            self.grid.models.release({k: v.numpy() for k, v in result.arrays.items()}, cfg.num_rounds)
            if self._pending_aggregate is not None:
                self._record_aggregate(self.grid.models.current.digest)
        self.journal.finish_run()

    def run(self, stop: threading.Event) -> dict[str, Any]:
        """Run every round, write `result.json` in the state folder and return it.

        Whatever happens (SIGTERM, too few devices, a strategy error), the
        worker stops, the status says so and `result.json` is written.
        """
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        cfg = self.config
        strategy = cfg.make_strategy()
        # The gateway is the ServerApp task of its run: Flower's Message() reads this identity.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
        prefix = f"{topics.ROOT}/{self.id}"
        # With ingest workers, replies reach the gateway through them (a shared subscription), not directly.
        replies = [] if cfg.ingest_workers else [f"{prefix}/reply/+"]
        self.link = Link(f"gw-{self.id}", cfg.broker_host, cfg.broker_port,
                         [*replies, f"{prefix}/enroll/+", f"{prefix}/online/+"], topics.status(self.id), cfg.broker_auth)
        # The largest honest reply is an f32 delta of the whole model plus small change.
        model_bytes = sum(w.nbytes for w in self.initial_weights.values())
        task = self.manifest.get("task", "classification")
        if task not in EVALUATE_METRICS_BY_TASK:
            raise ValueError(f"model task {task!r} is not one of {sorted(EVALUATE_METRICS_BY_TASK)}")
        checker = ReplyChecker(self.id, lambda key: key in self.enrolled, max_reply_bytes=model_bytes + 64 * 1024,
                               is_revoked=lambda key: key in self.revoked,
                               evaluate_metrics=EVALUATE_METRICS_BY_TASK[task])
        publisher = ModelPublisher(self.identity, self.id, self.manifest["sha256"], self.link.publish,
                                   cfg.state_dir / "model_version", cfg.release_ttl_s)
        publisher.on_release = self._on_release
        if cfg.mcu_python is not None:
            model_dir = (cfg.manifest or default_manifest()).parent
            self.mcu = McuExporter(cfg.mcu_python, model_dir, self.identity, self.id, self.link.publish)
        self.grid = MqttGrid(self.identity, self.id, self.link.publish, checker, publisher, self.online_nodes,
                             self.by_node.get, cfg.deadline_s, schemas.TrainConfig(cfg.epochs, cfg.batch_size, cfg.lr))
        self.grid.on_closed = self._on_closed
        self.grid.stop = stop
        self.journal = Journal(cfg.state_dir / "rounds.db")
        self.grid.journal = self.journal
        # Before the broker hands over what queued for us while we were down: replies to an
        # interrupted round must wait for it to re-open, not be refused.
        self._resume = self.journal.resume_point(cfg.strategy, cfg.num_rounds)
        if self._resume is not None:
            checker.reopening.add(self._resume.task)
        self._worker_ready = threading.Event()
        self._worker_error: Exception | None = None
        worker_stop = threading.Event()
        started = time.time()
        height = None
        failure = None
        with self.link:
            worker = threading.Thread(target=self._worker, args=(worker_stop,), name="gateway-worker", daemon=True)
            worker.start()
            try:
                if not self._worker_ready.wait(30):
                    raise RuntimeError("the ledger did not open within 30 s")
                if self._worker_error is not None:
                    raise RuntimeError(f"cannot open the ledger {self.ledger_path}: {self._worker_error}")
                event(log, "gateway.start", id=self.id, name=cfg.name, strategy=cfg.strategy,
                      rounds=cfg.num_rounds, ledger=str(self.ledger_path), run=self.grid.run_tag)
                self.state = "waiting"
                self._publish_status()
                self._rounds(strategy, stop)
                self.state = "done"
            except InterruptedError as exc:
                self.state = "stopped"
                event(log, "gateway.stopped", logging.WARNING, reason=str(exc))
            except Exception as exc:  # too few devices, a strategy's own error ...: say so, keep the record
                self.state, failure = "failed", f"{type(exc).__name__}: {exc}"
                log.exception("gateway.failed reason=%s", json.dumps(failure))
            finally:
                try:
                    height = self._call(lambda: self._ledger.height) if worker.is_alive() else None
                except Exception:
                    log.exception("gateway.ledger_unavailable")
                if self.mcu is not None:  # a finished run waits for its last export (what MCUs get); a stop does not
                    self.mcu.close(timeout=EXPORT_WAIT_S, abort=self.state != "done")
                self._publish_status()
                worker_stop.set()
                worker.join(timeout=30)
        model_path = self._save_model(publisher.current)
        result_doc = {
            "gateway": {"id": self.id, "name": cfg.name, "public_key": self.identity.public_key.hex()},
            "state": self.state,
            "failure": failure,
            "rounds": [asdict(self.history[r]) for r in sorted(self.history)],
            "rejections": dict(self.grid.rejections),
            "duplicates": self.grid.duplicates,  # honest re-sends of accepted replies: not rejections
            "enroll_rejections": dict(self.enroll_rejections),
            "ledger": {"path": str(self.ledger_path), "height": height},
            "model": {"digest": publisher.current.digest.hex() if publisher.current else None,
                      "version": publisher.current.version if publisher.current else None,
                      "path": str(model_path) if model_path else None,
                      "mcu_exports": None if self.mcu is None else {"published": self.mcu.exported,
                                                                     "failed": self.mcu.failed}},
            "seconds": round(time.time() - started, 2),
        }
        write_atomic(cfg.state_dir / "result.json", json.dumps(result_doc, indent=2).encode())
        self.journal.close()
        event(log, "gateway.stop", state=self.state, rounds=len(self.history))
        return result_doc
