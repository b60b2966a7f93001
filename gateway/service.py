"""The gateway service: its parts, its threads, and the loop that feeds them.

    Gateway(config, identity).run(stop)      -> what it writes to result.json

Parts (each the one owner of its state):

    DeviceRegistry, Enrollment   devices.py       who is enrolled, revoked, online; enrollment requests
    RoundBook                    rounds.py        the exchanges in flight (+ their journal writes)
    ReplyIntake                  intake.py        replies -> stage 1 -> the book -> receipts
    MqttGrid                     grid.py          Flower's Grid on the book
    Lineage, Releases            lineage.py ...   the model chain: journaled, published, on the ledger
    LedgerKeeper                 ledger_keeper.py the ledger and its gossip
    BlobKeeper                   blob_keeper.py   every update and model the ledger names, by digest; served
    CityTier, CityAuditor        city.py ...      the city's merges every few rounds; peers' work recomputed
    StatusBoard                  status.py        status topics and result.json
    RoundEngine                  engine.py        the rounds, one after another (BufferedEngine, buffered.py:
                                                  [rounds] mode = "buffered", a step every K arrived updates)

Threads:

    connection (paho)    queues what arrives (mqttlink)
    worker               the inbox: replies to the intake, enrollments, online flags; every second the
                         ledger's news (enrollments, revocations made elsewhere), checkpoints, ingest workers
    caller's             the round engine
    gossip               the ledger's own connection (ledger_sync.py)
    blob-writer          the blob store's writes, retags and prunes, off the rounds' critical path
    blob-exchange        the blob exchange's own connection: answers wants (blob_exchange.py)
    city-audit           recomputes the peers' aggregates and merges as they arrive (city_audit.py)

A restart (SIGTERM, kill -9, power loss, upgrade) goes on from the journal:
the last release, the round an interruption left open, the strategy's state.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mqttlink import Connection, ConnectionOptions, Will
from protocol import topics
from protocol.atomic import write_atomic
from protocol.keys import Identity, identity_id
from protocol.logs import event
from protocol.rotation import own_chain
from protocol.tensors import TOPK

from .blob_keeper import BlobKeeper, BlobSettings
from .buffered import BufferedEngine
from .city import CityTier
from .city_audit import CityAuditor
from .config import GatewayConfig
from .devices import DeviceRegistry, Enrollment
from .engine import Beginning, RoundEngine, Schedule
from .grid import BATCH_SIZE, EPOCHS, LR, MqttGrid
from .ingest import EVALUATE_METRICS_BY_TASK, Authenticator
from .ingest_workers import IngestWorkers, WorkerSettings
from .intake import ReplyIntake
from .journal import Interrupted, Journal
from .ledger_keeper import LedgerKeeper
from .lineage import ADOPTED, Lineage, model_family
from .mcu import McuExporter
from .models import KEEP_RETAINED, ModelPublisher
from .outbox import Outbox
from .privacy import report as privacy_report
from .provenance import SelectionRecorder
from .releases import Releases
from .rounds import RoundBook
from .status import StatusBoard

log = logging.getLogger("starling.gateway")
LEDGER_SYNC_S = 1.0
SUBSCRIBE_WAIT_S = 10.0
DRAIN_S = 5.0  # at a stop, how long the worker may still take in what already arrived
STATUS_WAIT_S = 2.0  # at a stop, how long the last status may take to reach the broker
INGEST_BATCH = 256  # messages taken from the inbox at once: one journal commit for all their replies
EXPORT_WAIT_S = 120.0  # at the end of a run, how long the last MCU export may still take
RECONNECTED = ""  # an inbox item that is no topic: the gateway's connection is back (its status is said again)
FIRST_START = "first start"
NEW_FAMILY = "the model family changed"


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


def blob_settings(config: GatewayConfig) -> BlobSettings:
    """The blob store's settings: a tag is a model version, so with the city tier `[blobs] keep` counts city
    epochs, each worth `every` rounds' versions, the city model's and one spare (a strategy's extra release)."""
    if config.city is None:
        return config.blobs
    return replace(config.blobs, keep=config.blobs.keep * (config.city.every + 2))


class StateFolderBusy(RuntimeError):
    """Another gateway process (or `reset-model`) holds the state folder."""


class StateLock:
    """An exclusive lock on `<state_dir>/gateway.lock` for as long as a gateway (or a reset) uses the folder:
    two processes writing one journal and one ledger as the same gateway would fork its lineage."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "gateway.lock"
        self._fd: int | None = None

    def __enter__(self) -> StateLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateFolderBusy(f"another gateway process is using {self.path.parent}") from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def where_to_begin(lineage: Lineage, journal: Journal, architecture: str) -> tuple[Beginning, Interrupted | None]:
    """A new lineage (and why), or the round to go on with and the exchange to re-open, if any."""
    start, head = lineage.current, lineage.head
    if head is None:
        return Beginning(FIRST_START, 0), None
    if start.architecture != architecture:
        return Beginning(NEW_FAMILY, 0), None
    interrupted = journal.exchanges.interrupted(start.id, head.digest)
    if interrupted is not None:
        return Beginning(None, interrupted.round), interrupted
    recorded = journal.history.last_round(start.id)
    if head.round == 0 and recorded < 0:  # the first model was never evaluated: round 0 first
        return Beginning(None, 0), None
    return Beginning(None, max(head.round, recorded) + 1), None


class Gateway:
    """One gateway: `Gateway(config, identity).run(stop)`. Its parts exist once `run` has built them."""

    def __init__(self, config: GatewayConfig, identity: Identity) -> None:
        self.config = config
        self.identity = identity
        # After key rotations (the operator's, `starling-ledger rotate`) the gateway keeps its first key's id:
        # its devices and topics know it by that. Raises `RotationRefused` for a chain that is not its own.
        self.chain = own_chain(config.rotations, identity.public_key)
        self.id = self.chain.gateway_id(identity.public_key)
        self.manifest_path = config.manifest or default_manifest()
        self.manifest, self.initial_weights = load_initial_weights(self.manifest_path)
        task = self.manifest.get("task", "classification")
        if task not in EVALUATE_METRICS_BY_TASK:
            raise ValueError(f"model task {task!r} is not one of {sorted(EVALUATE_METRICS_BY_TASK)}")
        self.evaluate_metrics = EVALUATE_METRICS_BY_TASK[task]
        self.ledger_path = config.state_dir / "ledger.db"
        self.board: StatusBoard | None = None
        self.registry: DeviceRegistry | None = None
        self.book: RoundBook | None = None
        self.enrollment: Enrollment | None = None
        self.keeper: LedgerKeeper | None = None
        self.blobs: BlobKeeper | None = None
        self.city: CityTier | None = None
        self.auditor: CityAuditor | None = None
        self._final_city: dict[str, Any] | None = None
        self.strategy: Any = None  # the configured Flower strategy, once built
        self.engine: RoundEngine | None = None  # the rounds, once they can start
        self._ingest: IngestWorkers | None = None

    @property
    def state(self) -> str:
        return self.board.state if self.board is not None else "starting"

    def run(self, stop: threading.Event) -> dict[str, Any]:
        """Run rounds until done or stopped; write `result.json` in the state folder and return it.

        Whatever happens (SIGTERM, too few devices, a strategy error, no broker), the status says so
        and `result.json` is written.
        """
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        # The gateway is the ServerApp task of its run: Flower's Message() reads this identity.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        with StateLock(self.config.state_dir):
            journal = Journal(self.config.state_dir / "rounds.db")
            try:
                return self._run(journal, stop)
            finally:
                journal.close()

    def _run(self, journal: Journal, stop: threading.Event) -> dict[str, Any]:
        cfg = self.config
        architecture = model_family(self.manifest)
        lineage = Lineage(journal)
        if lineage.adopt_legacy(cfg.state_dir / "model_version", architecture) is not None:
            event(log, "lineage.adopted", version=lineage.head.version, round=lineage.head.round, reason=ADOPTED)
        beginning, interrupted = where_to_begin(lineage, journal, architecture)
        inbox: queue.Queue = queue.Queue()
        prefix = f"{topics.ROOT}/{self.id}"
        # With ingest workers, replies reach the gateway through them (a shared subscription), not directly.
        replies = [] if cfg.ingest_workers else [f"{prefix}/reply/+"]
        connection = Connection(ConnectionOptions(
            client_id=f"gw-{self.id}", host=cfg.broker_host, port=cfg.broker_port, auth=cfg.broker_auth,
            subscriptions=tuple((t, 1) for t in [*replies, f"{prefix}/enroll/+", f"{prefix}/online/+"]),
            will=Will(topics.status(self.id), b'{"state": "offline"}'), max_inflight=200,
            log_name="starling.gateway"), deliver=lambda m: inbox.put((m.topic, m.payload, None)),
            # After a reconnect the broker holds the last will ("offline") as the retained status: the worker says
            # it again at once, or devices that roam would leave a gateway that is only between two rounds.
            on_state=lambda up, _detail: up and inbox.put((RECONNECTED, b"", None)))
        self.registry = registry = DeviceRegistry(on_change=self._tell_ingest_workers)
        outbox = Outbox(self.identity, self.id, connection.publish)
        # The largest honest reply is an f32 delta of the whole model plus small change.
        max_reply = sum(w.nbytes for w in self.initial_weights.values()) + 64 * 1024
        authenticator = Authenticator(self.id, registry.is_enrolled, registry.is_revoked, max_reply)
        # Before the broker hands over what queued for us while we were down: replies to an interrupted
        # exchange must wait for it to re-open, not be refused.
        self.book = book = RoundBook(journal.exchanges, authenticator.authenticate, registry.is_revoked,
                                     self.evaluate_metrics, lambda items: [inbox.put((t, p, None)) for t, p in items],
                                     interrupted, buffered=cfg.buffered is not None)
        self.enrollment = Enrollment(self.id, cfg.policy, cfg.allowlist, cfg.operator_keys, registry, outbox,
                                     lambda key, name, policy, evidence: self.keeper.enroll(key, name, policy,
                                                                                            evidence))
        self.board = board = StatusBoard(
            self.id, cfg.name, cfg.num_rounds, connection.publish, registry, book, journal.history,
            meter=lambda: (connection.bytes_in + (self._ingest.bytes_in if self._ingest else 0), connection.bytes_out),
            ledger_status=lambda: self.keeper.status() if self.keeper is not None else None,
            enroll_rejections=lambda: dict(self.enrollment.rejections), weights=cfg.weights,
            privacy=lambda: privacy_report(self.strategy),
            blobs=lambda: self.blobs.status() if self.blobs is not None else None,
            city=self._city_report, training=self._training_report)
        intake = ReplyIntake(authenticator, book, outbox, board.note)
        if interrupted is not None:
            event(log, "gateway.resume", round=interrupted.round, accepted=len(interrupted.replies),
                  task=interrupted.task)
        failure, mcu, worker, worker_stop = None, None, None, threading.Event()
        started = time.time()
        try:
            connection.connect()
            connection.subscribed.wait(SUBSCRIBE_WAIT_S)  # replies sent before the broker routes them to us are lost
            self.keeper = LedgerKeeper(self.ledger_path, self.identity, cfg.name, cfg.genesis, cfg.gossip,
                                       (cfg.broker_host, cfg.broker_port, cfg.broker_auth), cfg.bootstrap_s,
                                       cfg.checkpoint_every, policy=cfg.policy, allowlist=cfg.allowlist,
                                       operator_keys=cfg.operator_keys, chain=self.chain)
            self.keeper.sync(registry, quiet=True)
            self.blobs = BlobKeeper(cfg.state_dir / "blobs", blob_settings(cfg), self.id,
                                    (cfg.broker_host, cfg.broker_port, cfg.broker_auth))
            if cfg.city is not None:
                own_ids = {self.identity.id, self.id, *(identity_id(k) for k in self.chain.keys())}
                self.city = CityTier(cfg.city, self.keeper.ledger, self.id, own_ids, self.blobs, stop)
                self.auditor = CityAuditor(self.keeper.ledger, self.id, own_ids, self.blobs, cfg.city.audit_share,
                                           lambda: lineage.head.version if lineage.head else 0,
                                           cfg.city.max_examples, hold=self.city.in_epoch)
            if self.chain.rotations:  # retained: devices that know the root key follow it to this key
                connection.publish(topics.keys(self.id), self.chain.encode(), retain=True)
                event(log, "gateway.keys_published", rotations=len(self.chain.rotations), key=self.identity.id)
            from .membership import MembershipPublisher  # retained: the city's members, for devices that roam

            MembershipPublisher(self.keeper.ledger, self.id, connection.publish, worker_stop).start()
            if cfg.ingest_workers:
                self._ingest = IngestWorkers(cfg.ingest_workers, WorkerSettings(
                    self.id, cfg.broker_host, cfg.broker_port, cfg.broker_auth, max_reply, logging.getLogger().level),
                    inbox, registry.keys).__enter__()
            worker = threading.Thread(target=self._serve, args=(inbox, intake, board, worker_stop),
                                      name="gateway-worker", daemon=True)
            worker.start()
            if cfg.mcu_python is not None:
                mcu = McuExporter(cfg.mcu_python, self.manifest_path.parent, self.identity, self.id, connection.publish)
            self.engine = engine = self._engine(journal, lineage, book, outbox, beginning, mcu, connection, stop)
            event(log, "gateway.start", id=self.id, name=cfg.name, strategy=cfg.strategy,
                  rounds=cfg.num_rounds or "-", ledger=str(self.ledger_path), next_round=beginning.next_round,
                  lineage=beginning.new_lineage or "continues")
            board.set_state("waiting")
            final = engine.run()
        except InterruptedError as exc:
            final = "stopped"
            event(log, "gateway.stopped", logging.WARNING, reason=str(exc))
        except Exception as exc:  # too few devices, a strategy's own error, no broker ...: say so, keep the record
            final, failure = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("gateway.failed reason=%s", json.dumps(failure))
        height = self._close(final, mcu, worker, worker_stop, connection)
        result = self._result(final, failure, height, lineage, mcu, started)
        write_atomic(cfg.state_dir / "result.json", json.dumps(result, indent=2).encode())
        event(log, "gateway.stop", state=final, rounds=len(result["rounds"]))
        return result

    def _engine(self, journal: Journal, lineage: Lineage, book: RoundBook, outbox: Outbox, beginning: Beginning,
                mcu: McuExporter | None, connection: Connection, stop: threading.Event) -> RoundEngine:
        cfg = self.config
        publisher = ModelPublisher(self.identity, self.id, self.manifest["sha256"], connection.publish,
                                   cfg.release_ttl_s, retained=lineage.recent(KEEP_RETAINED))
        releases = Releases(lineage, publisher, self.keeper, model_family(self.manifest), cfg.state_dir / "model.npz",
                            on_step=(lambda r: mcu.submit(r.digest, r.version, r.weights)) if mcu else (lambda r: None),
                            blobs=self.blobs, download=cfg.download)
        grid = MqttGrid(book, outbox, releases.release_for, self.registry, cfg.deadline_s, stop, cfg.weights,
                        codec=cfg.codec, density=cfg.density)
        schedule = Schedule(cfg.num_rounds, cfg.interval_s, cfg.min_devices, cfg.wait_devices_s, cfg.evaluate_every,
                            cfg.deadline_s)
        train = {EPOCHS: cfg.epochs, BATCH_SIZE: cfg.batch_size, LR: cfg.lr}
        release_config = {"strategy": cfg.strategy, "params": cfg.strategy_params, "dp": cfg.strategy_dp}
        recorder = SelectionRecorder()  # the strategy tells it which replies it aggregated (provenance.py)
        # (a DP run's privacy accountant reports the devices enrolled here as its population: privacy.py)
        self.strategy = cfg.make_strategy(recorder, population=lambda: self.registry.counts()[0])
        parts = (self.strategy, cfg.strategy, grid, book, releases, self.keeper, journal.exchanges, self.board,
                 self.registry, schedule, train, release_config, self.initial_weights, beginning, stop, recorder,
                 self.blobs, self.city)
        if cfg.buffered is not None:  # [rounds] mode = "buffered": a step every K arrived updates
            return BufferedEngine(*parts, settings=cfg.buffered, weights=cfg.weights)
        return RoundEngine(*parts)

    # --- the worker thread ---------------------------------------------------------------------

    def _serve(self, inbox: queue.Queue, intake: ReplyIntake, board: StatusBoard, stop: threading.Event) -> None:
        """Route what arrives; every second take in the ledger's news. Nothing a device sends stops it.

        Once `stop` is set it goes on until the inbox is empty (at most DRAIN_S): what arrived was
        acknowledged to the broker already, so it is journaled and answered now or lost until the
        device re-sends it."""
        prefix = f"{topics.ROOT}/{self.id}/"
        next_sync = time.monotonic() + LEDGER_SYNC_S
        drain_until = None
        while True:
            if stop.is_set():
                drain_until = drain_until or time.monotonic() + DRAIN_S
                if inbox.empty() or time.monotonic() > drain_until:
                    return
            if time.monotonic() >= next_sync:  # operators enroll and revoke with starling-ledger, elsewhere
                try:
                    self.keeper.sync(self.registry)
                    self.keeper.maybe_checkpoint()
                    if self._ingest is not None:
                        self._ingest.watch()
                except Exception:  # the ledger's news can wait a second; the replies cannot
                    log.exception("worker.sync_failed")
                next_sync = time.monotonic() + LEDGER_SYNC_S
            try:
                batch = [inbox.get(timeout=0.05)]
            except queue.Empty:
                continue
            while len(batch) < INGEST_BATCH:
                try:
                    batch.append(inbox.get_nowait())
                except queue.Empty:
                    break
            replies: list[tuple[str, bytes, object]] = []  # consecutive replies go to the intake together
            for topic, payload, first in batch:
                if topic.startswith(prefix + "reply/"):
                    replies.append((topic, payload, first))
                    continue
                self._intake(intake, replies)
                replies = []
                self._other(prefix, topic, payload, board)
            self._intake(intake, replies)

    @staticmethod
    def _intake(intake: ReplyIntake, replies: list[tuple[str, bytes, object]]) -> None:
        if not replies:
            return
        try:
            intake.handle(replies)
        except Exception:  # nothing a device sends may stop the gateway
            log.exception("worker.failed topic=%s", replies[0][0])

    def _other(self, prefix: str, topic: str, payload: bytes, board: StatusBoard) -> None:
        try:
            if topic == RECONNECTED:
                board.publish()
            elif topic.startswith(prefix + "enroll/"):
                self.enrollment.handle(topic, payload)
            elif topic.startswith(prefix + "online/"):
                device = topics.device_of(topic)
                if self.registry.set_online(device, payload == b"1"):
                    board.seen(device)
        except Exception:  # nothing a device sends may stop the gateway
            log.exception("worker.failed topic=%s", topic)

    def _city_report(self) -> dict[str, Any] | None:
        """The status's and result's `city` section: the tier's epochs and flags, the auditor's counts."""
        if self.city is None:
            return None
        return {**self.city.report(), "audits": self.auditor.report() if self.auditor is not None else None}

    def _training_report(self) -> dict[str, Any]:
        """The status's `training` section: the round mode (a buffered engine's account with it) and how updates
        ([training] codec, density under topk) and models ([training] download) travel."""
        cfg = self.config
        doc: dict[str, Any] = {"mode": "sync" if cfg.buffered is None else "buffered", "codec": cfg.codec,
                               "download": cfg.download}
        if cfg.codec == TOPK:
            doc["density"] = cfg.density
        if isinstance(self.engine, BufferedEngine):
            doc["buffered"] = self.engine.report()
        return doc

    def _tell_ingest_workers(self, what: str, key: bytes) -> None:
        if self._ingest is not None:
            (self._ingest.enroll if what == "enroll" else self._ingest.revoke)(key)

    # --- the end ---------------------------------------------------------------------------------

    def _close(self, final: str, mcu: McuExporter | None, worker: threading.Thread | None,
               worker_stop: threading.Event, connection: Connection) -> int | None:
        """Say how it ended, then stop everything; return the ledger's height."""
        height = None
        try:
            height = self.keeper.height if self.keeper is not None else None
        except Exception:  # noqa: BLE001 (the record of the run comes first)
            log.exception("gateway.ledger_unavailable")
        if mcu is not None:  # a finished run waits for its last export (what MCUs get); a stop does not
            mcu.close(timeout=EXPORT_WAIT_S, abort=final != "done")
        if self._ingest is not None:  # first: they hand over what they took from the broker
            self._ingest.__exit__(None, None, None)
        worker_stop.set()  # the worker takes in what already arrived, then ends
        if worker is not None:
            worker.join(timeout=DRAIN_S + 30)
        if self.auditor is not None:  # before the blob exchange it fetches through
            self.auditor.close()
        try:
            self._final_city = self._city_report()
        except Exception:  # noqa: BLE001 (the record of the run comes first)
            log.exception("gateway.city_report_failed")
        if self.blobs is not None:  # what is queued goes to disk; then no more serving
            self.blobs.close()
        last = self.board.set_state(final)
        with contextlib.suppress(Exception):  # its acknowledgement says the broker has every receipt before it
            last.wait_for_publish(timeout=STATUS_WAIT_S)
        if self.keeper is not None:
            self.keeper.close()
        connection.close()
        return height

    def _result(self, final: str, failure: str | None, height: int | None, lineage: Lineage,
                mcu: McuExporter | None, started: float) -> dict[str, Any]:
        head = lineage.head
        return {
            "gateway": {"id": self.id, "name": self.config.name, "public_key": self.identity.public_key.hex()},
            "state": final,
            "reason": self.board.reason,  # why the rounds ended early ("privacy_budget_spent"), or None
            "failure": failure,
            "rounds": self.board.history(),
            "lineage": self.board.lineage(),
            "rejections": self.book.rejections,
            "duplicates": self.book.duplicates,  # honest re-sends of accepted replies: not rejections
            "enroll_rejections": dict(self.enrollment.rejections),
            "privacy": privacy_report(self.strategy),  # a DP run's privacy spent (gateway/privacy.py), or None
            "training": self._training_report(),  # the round mode (and a buffered run's stale count), the codecs
            "ledger": {"path": str(self.ledger_path), "height": height},
            "blobs": self.blobs.status() if self.blobs is not None else None,
            "city": self._final_city,  # taken before the ledger closed
            "model": {"digest": head.digest.hex() if head else None,
                      "version": head.version if head else None,
                      "path": str(self.config.state_dir / "model.npz") if head else None,
                      "mcu_exports": None if mcu is None else {"published": mcu.exported, "failed": mcu.failed}},
            "seconds": round(time.time() - started, 2),
        }


def reset_model(config: GatewayConfig, identity: Identity, reason: str) -> dict[str, Any]:
    """Start a new lineage from the model family's initial weights (`starling-gateway reset-model`).

    Only while the gateway is stopped (the state lock says so). The start is journaled, logged and
    recorded on the ledger at once (if the ledger cannot take it now, the gateway records it at its
    next start); the next `run` evaluates the new first model as round 0 and trains from it.
    """
    from ledger.store import Ledger

    manifest_path = config.manifest or default_manifest()
    manifest, weights = load_initial_weights(manifest_path)
    with StateLock(config.state_dir):
        journal = Journal(config.state_dir / "rounds.db")
        try:
            lineage = Lineage(journal)
            previous = lineage.head
            head = lineage.start(weights, f"reset-model: {reason}", model_family(manifest))
            event(log, "lineage.start", lineage=head.lineage, digest=head.digest.hex()[:16], version=head.version,
                  reason=f"reset-model: {reason}")
            recorded = False
            ledger_path = config.state_dir / "ledger.db"
            if ledger_path.exists():
                with Ledger.open(ledger_path, identity) as ledger:
                    if ledger.is_initialized:
                        for item in lineage.unrecorded():
                            if item.start is not None:
                                ledger.record_lineage(item.start.root, item.start.version, item.start.previous,
                                                      item.start.reason, item.start.architecture)
                                lineage.mark_recorded(item)
                                recorded = True
            return {"lineage": head.lineage, "model": head.digest.hex(), "version": head.version,
                    "previous": previous.digest.hex() if previous else None, "on_ledger": recorded}
        finally:
            journal.close()
