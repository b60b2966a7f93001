"""The agent's MQTT loop: enroll, take signed tasks, answer with signed replies.

Threads: paho's network thread (inside `mqttlink.Connection`) only saves tasks
to disk and queues; one worker thread does the slow things (fetching and
checking models, training, signing); the caller's thread re-sends
unacknowledged replies until `stop` is set.

Trust: every task, model and receipt must be signed by the gateway's key
(`Agent._check_gateway_key`, the one place that says which key counts: the one
in the config, or where the gateway's key rotations led) and bound to this
gateway and this device; a key a rotation retired is refused (`key_rotated`).
Rotations come retained on the gateway's keys topic and are followed only when
signed by the city's root key in the config (`protocol.rotation`); a model must hash to the
digest the task names, and its signed release must pass `Agent._check_release`:
it expires (`model_no_expiry`, from the schema) and has not expired
(`model_expired`), fits this device's model (`model_architecture_mismatch`), is
not older than the version already trusted (`model_rollback`), names the digest
already trusted under its version (`model_version_conflict`), and was not signed
long before the newest release this device knows (`model_frozen`: its expiry is
more than `[model] freeze_window_s` older than the newest expiry accepted).

Downloads: a task whose model has a published delta names its base (`Task.delta_base`); a device holding
that model (the one it keeps in memory, `_models`) fetches the signed delta (`schemas.ModelDelta`, which
passes every release check above), rebuilds the model (`tensors.apply_delta`) and keeps it only if it
hashes to the task's digest. Any other device, and one whose delta fails in any way, fetches the full
release as before: a failed delta is counted by reason (`Counters.delta_refused`) and logged once, never
a refused task.

Roaming (agent/roaming.py): with the root key, "the gateway" is the device's home, the configured gateway
or the member it re-homed to. `Roaming` keeps the city, the home and the decision to leave it; the agent
carries that decision out on its connection and its state (`Agent._roam`, `Agent._rehome`). The move is one
step of the worker thread, between two messages: the new home and its key on disk first, a fresh
per-gateway state (the new home's model lineage is taken from whatever version it is at), replies still
pending for the old home dropped, and a new MQTT connection whose subscriptions, online flag and last will
are the new home's; then the device enrolls there again, and the new home admits it under its own policy
(a revoked device is refused there too: the ledger says so).

Inference (agent/inference.py, with `[inference]`): its own thread and its own model instance. The worker
hands it each release it accepts (`_fetch_model`), whole; the inference thread swaps it in between two runs,
so no run sees half a release, and training never touches the weights inference runs with. After a re-home
it runs the old home's release until the new home's first one arrives.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mqttlink import Connection, ConnectionOptions, Message, Will
from protocol import envelope, schemas, topics
from protocol.digest import sha256
from protocol.errors import ProtocolError
from protocol.keys import Identity, identity_id
from protocol.logs import event
from protocol.rotation import Chain
from protocol.tensors import TOPK, apply_delta

from . import learner
from .config import AgentConfig
from .error_feedback import ErrorFeedback
from .inference import Inference
from .live_data import LiveData, NoData
from .roaming import Roaming
from .samples import LocalData
from .state import ANSWERED_KEPT, AgentState, StateStore
from .systemd import Notifier

log = logging.getLogger("starling.agent")

MODEL_WAIT_S = 30.0
DELTA_WAIT_S = 10.0  # a delta the task names is retained already; if it is not there, the full model is
REHOME = "agent/rehome"  # not an MQTT topic: the loop's request that the worker move the device (`_rehome`)


@dataclass
class Counters:
    tasks: int = 0
    replies_sent: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    refused_tasks: dict[str, int] = field(default_factory=dict)
    downloads: dict[str, int] = field(default_factory=dict)  # models fetched: "delta" or "full"
    delta_refused: dict[str, int] = field(default_factory=dict)  # deltas given up for the full model, by reason


class Agent:
    """One device: `Agent(config, identity, model, data).run(stop_event)`.

    `data` is fixed `LocalData` (a replay file) or `LiveData` (the sample store), cut afresh each round.
    `inference`, when given, runs from `run` to its end and gets every release the device accepts.
    """

    def __init__(
        self, config: AgentConfig, identity: Identity, model, data: LocalData | LiveData, architecture: str = "",
        seed: int = 0, inference: Inference | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.model = model
        self.data = data
        self.seed = seed  # each round's training shuffles come from (seed, round): learner.round_rng
        self.store = StateStore(config.state_dir)
        self.feedback = ErrorFeedback(config.state_dir)  # topk uploads: what earlier rounds did not send
        self.roaming = Roaming(config, self.store, identity.id, time.monotonic())  # where the device lives
        self.state = self.store.load(self.roaming.home)
        self._moving = threading.Lock()  # held while the worker moves the device: the loop sends nothing then
        self._sent_at: dict[str, float] = {}  # pending key -> when it was last published
        self.counters = Counters()
        self.architecture = architecture
        self.weight_shapes = {name: w.shape for name, w in model.get_weights().items()}
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._models = self._own_model(model)
        self._model_arrived = threading.Condition()
        self._raw_models: dict[int, bytes] = {}  # -1: the release; 0..n-1: its chunks
        self._wanted: bytes | None = None
        self._wanted_delta: bytes | None = None  # the model whose delta is awaited ...
        self._raw_delta: bytes | None = None  # ... and its signed message, once here
        self.inference = inference
        self.conn = self._make_connection()

    def _own_model(self, model) -> dict[bytes, dict[str, np.ndarray]]:
        """The model cache a device starts with: the weights it was flashed with, by their digest, while it
        trusts no release yet. A gateway's lineage starts from the same family's initial weights, so a new
        device needs no download for the first model, and takes the next one as a delta from it. A device
        that trusts a release starts empty: each model it is asked for again passes the release checks
        (a rollback to the initial model among them)."""
        state = self.state
        if state.trusted_version > 0 or state.trusted_digest or state.newest_expires:
            return {}
        weights = model.get_weights()
        return {sha256(schemas.encode_model(weights)): weights}

    # --- MQTT plumbing -------------------------------------------------------------

    # The home's topics this device talks on, as `Roaming` names them now (hw/attacks.py publishes on them).
    t_task = property(lambda self: self.roaming.home_topics.task)
    t_receipt = property(lambda self: self.roaming.home_topics.receipt)
    t_reply = property(lambda self: self.roaming.home_topics.reply)

    def _make_connection(self) -> Connection:
        # Backoff with per-device jitter: after a broker restart, a fleet must not reconnect in lockstep.
        jitter = random.Random(self.identity.id)
        options = ConnectionOptions(
            client_id=f"dev-{self.identity.id}",
            host=self.config.broker_host,
            port=self.config.broker_port,
            auth=self.config.broker_auth,  # TLS and the device's MQTT credentials, when configured
            clean_session=False,  # a persistent session keeps QoS 1 tasks while we are away
            subscriptions=self.roaming.subscriptions(),
            will=Will(self.roaming.home_topics.online, b"0"),
            birth=Will(self.roaming.home_topics.online, b"1"),
            reconnect_min_s=1 + jitter.randint(0, 2),
            reconnect_max_s=30 + jitter.randint(0, 30),
            max_queued=1000,
            log_name=log.name,
        )
        return Connection(options, deliver=self._on_message)

    def _on_message(self, msg: Message) -> None:
        # Never do real work on paho's thread: queue it, or file a model piece (or a status) we wait for.
        if self.roaming.keep_status(msg.topic, msg.payload):
            return
        here = self.roaming.home_topics
        prefix = topics.model(here.gateway, "")
        if msg.topic == here.task:
            try:  # on disk before paho acknowledges it (when this returns): a power cut cannot lose it
                name = self.store.put_task(msg.payload)
            except OSError as exc:
                event(log, "task.not_saved", logging.ERROR, reason=str(exc))
                name = ""
            self._inbox.put((msg.topic, msg.payload, name))
            return
        if not msg.topic.startswith(prefix):
            self._inbox.put((msg.topic, msg.payload, ""))
            return
        digest_hex, _, index = msg.topic[len(prefix):].partition("/")
        if digest_hex == topics.DELTA:
            with self._model_arrived:
                if self._wanted_delta is not None and index == self._wanted_delta.hex() and msg.payload:
                    self._raw_delta = msg.payload
                    self._model_arrived.notify_all()
            return
        with self._model_arrived:
            if self._wanted is None or digest_hex != self._wanted.hex() or not msg.payload:
                return  # not the model we wait for (or a cleared retained message): memory is scarce
            if index == "":
                self._raw_models[-1] = msg.payload  # the signed release
            elif index.isdigit() and int(index) < schemas.MAX_CHUNKS:
                self._raw_models[int(index)] = msg.payload
            self._model_arrived.notify_all()

    # --- checks ----------------------------------------------------------------------

    @property
    def gateway_key(self) -> bytes:
        """The key that signs for the gateway now: the configured one, or where its rotations led."""
        return bytes.fromhex(self.state.gateway_key) if self.state.gateway_key else self.roaming.home_key

    def _check_gateway_key(self, key: bytes) -> None:
        """Refuse (raise `_Refused`) a message not signed by the gateway's current key."""
        if key == self.gateway_key:
            return
        if key.hex() in self.state.retired_keys:
            raise _Refused("key_rotated")  # the operator's root key replaced it: perhaps stolen
        raise _Refused("not_from_gateway")

    def _open_from_gateway(self, payload: bytes, expected_type: str) -> envelope.Envelope:
        env = envelope.decode(payload)
        if env.type != expected_type:
            raise ProtocolError(f"expected {expected_type}, got {env.type}")
        self._check_gateway_key(env.ctx.sender)
        if env.ctx.gateway != self.roaming.home:
            raise _Refused("wrong_gateway")
        env.verify()
        self.roaming.heard(time.monotonic())  # the home signed it: it is there
        return env

    def _wait_for(self, pieces: Callable[[], bool], deadline: float, reason: str = "model_unavailable") -> None:
        with self._model_arrived:
            while not pieces():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Refused(reason)
                self._model_arrived.wait(left)

    def _fetch_model(self, digest: bytes, delta_base: bytes = b"") -> dict[str, np.ndarray]:
        """The weights with content address `digest`: from cache, rebuilt from the delta the task names when
        this device holds its base (`delta_base`), else from the retained release (and chunks)."""
        if digest in self._models:
            return self._models[digest]
        if delta_base and delta_base in self._models:
            try:
                weights, release, received = self._fetch_delta(digest, delta_base)
            except (ProtocolError, _Refused) as exc:
                self.counters.delta_refused[exc.reason] = self.counters.delta_refused.get(exc.reason, 0) + 1
                event(log, "model.delta_refused", logging.WARNING, digest=digest.hex()[:16], reason=exc.reason,
                      detail=str(exc), then="full")
            else:
                return self._keep(digest, weights, release, "delta", received)
        weights, release, received = self._fetch_full(digest)
        return self._keep(digest, weights, release, "full", received)

    def _keep(self, digest: bytes, weights: dict[str, np.ndarray], release: schemas.ModelRelease,
              how: str, received: int) -> dict[str, np.ndarray]:
        """An accepted model: trusted, cached (only the newest: memory is scarce), handed to inference."""
        event(log, "model.fetched", digest=digest.hex()[:16], version=release.version, how=how, bytes=received)
        self._remember(release)
        self._models = {digest: weights}
        self.counters.downloads[how] = self.counters.downloads.get(how, 0) + 1
        if self.inference is not None and digest.hex() == self.state.trusted_digest:  # the newest one trusted
            self.inference.install(weights, release.version, digest.hex())
        return weights

    def _fetch_delta(self, digest: bytes, base: bytes) -> tuple[dict[str, np.ndarray], schemas.ModelRelease, int]:
        """Model `digest` rebuilt from its signed delta on the cached model `base`; raises `_Refused` or
        `ProtocolError` (the caller falls back to the full model) for anything amiss."""
        address = topics.model_delta(self.roaming.home, digest.hex())
        with self._model_arrived:
            self._wanted_delta, self._raw_delta = digest, None
        self.conn.subscribe([(address, 1)])
        try:
            self._wait_for(lambda: self._raw_delta is not None, time.monotonic() + DELTA_WAIT_S, "delta_unavailable")
            received = len(self._raw_delta)
            env = self._open_from_gateway(self._raw_delta, "delta")  # signature, key, gateway, attachment digest
        finally:
            self.conn.unsubscribe([address])
            with self._model_arrived:
                self._wanted_delta, self._raw_delta = None, None
        delta = schemas.ModelDelta.from_body(env.body)
        release = delta.release()
        self._check_release(release, digest)  # expiry, architecture, rollback, version conflict, freeze window
        if delta.base != base:
            raise _Refused("delta_base_mismatch")  # not a step from the model this device holds
        if env.attachment is None or len(env.attachment) != delta.size:
            raise _Refused("delta_size_mismatch")
        step = schemas.decode_delta(env.attachment, delta.codec)
        if {k: v.shape for k, v in step.items()} != self.weight_shapes:
            raise _Refused("delta_shape_mismatch")
        weights = apply_delta(self._models[base], step)
        if sha256(schemas.encode_model(weights)) != digest:
            raise _Refused("delta_digest_mismatch")  # signed, yet it does not rebuild the model the task names
        return weights, release, received

    def _fetch_full(self, digest: bytes) -> tuple[dict[str, np.ndarray], schemas.ModelRelease, int]:
        """The model `digest` from its retained release (and chunks), every release check passed; with the
        bytes received."""
        address = topics.model(self.roaming.home, digest.hex())
        with self._model_arrived:
            self._wanted, self._raw_models = digest, {}
        # Offline (a task saved before a power cut), the connection subscribes once it is up.
        self.conn.subscribe([(address, 1), (address + "/+", 1)])
        deadline = time.monotonic() + MODEL_WAIT_S
        try:
            self._wait_for(lambda: -1 in self._raw_models, deadline)
            env = self._open_from_gateway(self._raw_models[-1], "model")
            release = schemas.ModelRelease.from_body(env.body)  # expires == 0: NoExpiry, "model_no_expiry"
            self._check_release(release, digest)
            if release.chunks == 1:
                model = env.attachment
            else:
                self._wait_for(lambda: all(i in self._raw_models for i in range(release.chunks)), deadline)
                model = b"".join(self._raw_models[i] for i in range(release.chunks))
            if model is None or len(model) != release.size or sha256(model) != digest:
                raise _Refused("model_digest_mismatch")
            received = len(self._raw_models[-1]) + (len(model) if release.chunks > 1 else 0)
        finally:
            self.conn.unsubscribe([address, address + "/+"])
            with self._model_arrived:
                self._wanted, self._raw_models = None, {}
        weights = schemas.decode_model(model)
        if {k: v.shape for k, v in weights.items()} != self.weight_shapes:
            raise _Refused("model_shape_mismatch")
        return weights, release, received

    def _check_release(self, release: schemas.ModelRelease, digest: bytes) -> None:
        """Refuse (raise `_Refused`) a gateway-signed release this device must not act on, each for its reason.

        The freeze window (`model_frozen`): the rollback rule and one digest per version already keep a
        device from being moved back to an older model, and an honest gateway signs versions in order, so a
        stale release of a higher version still carries a newer model than the device trusts: the window
        guards no model choice of its own. What it adds is a staleness bound that does not rest on the
        device's clock (a Pi has no battery-backed clock: booted behind, it takes an expired release for a
        live one): a release whose expiry is more than `freeze_window_s` older than the newest expiry this
        device accepted from its gateway was signed that long before a release it already knows, so it is
        refused at any version: an old signed copy a broker replays, or a release from a gateway whose clock
        went back. A gateway with a sane clock and a constant `release_ttl_s` that signs its models in
        version order never trips it (README, "Enrollment, revocation, releases", says what does).
        """
        state = self.state
        if release.digest != digest:
            raise _Refused("model_digest_mismatch")  # not the model the task names
        if time.time() > release.expires:
            raise _Refused("model_expired")
        if self.architecture and release.architecture != self.architecture:
            raise _Refused("model_architecture_mismatch")
        if release.version < state.trusted_version:
            raise _Refused("model_rollback")
        if release.version == state.trusted_version and state.trusted_digest not in ("", release.digest.hex()):
            raise _Refused("model_version_conflict")
        if release.expires < state.newest_expires - self.config.freeze_window_s:
            raise _Refused("model_frozen")

    def _remember(self, release: schemas.ModelRelease) -> None:
        """An accepted release: trust its version and digest, and keep the newest expiry seen (on disk)."""
        state = self.state
        before = (state.trusted_version, state.trusted_digest, state.newest_expires)
        if release.version > state.trusted_version or not state.trusted_digest:  # "": a state from before digests
            state.trusted_version, state.trusted_digest = release.version, release.digest.hex()
        state.newest_expires = max(state.newest_expires, release.expires)
        if (state.trusted_version, state.trusted_digest, state.newest_expires) != before:
            self.store.save(state)  # only on a change: a republished release with the same expiry writes nothing

    # --- handlers --------------------------------------------------------------------

    def _handle_task(self, payload: bytes, saved: str = "") -> None:
        self.counters.tasks += 1
        env = self._open_from_gateway(payload, "task")
        task = schemas.Task.from_body(env.body)
        if task.device != self.identity.id:
            raise _Refused("not_for_this_device")
        key = f"{env.ctx.round:06d}-{env.ctx.task}"
        pending = self.store.read_pending(key)
        if pending is not None:  # asked again while our reply has no receipt: a restarted gateway lacks it
            self._sent_at[key] = time.monotonic()
            self.conn.publish(self.t_reply, pending, qos=1)  # now, not at the next resend period
            event(log, "reply.resent", key=key, why="task_again")
            return
        if key in self.state.answered:
            event(log, "task.duplicate", round=env.ctx.round, task=env.ctx.task)  # answered once: never again
            return
        if task.config.deadline and time.time() > task.config.deadline:
            raise _Refused("deadline_passed")
        ctx = envelope.Context(self.identity.public_key, env.ctx.gateway, env.ctx.round, env.ctx.task, env.ctx.base)
        skip = self.config.budget.skip_reason() if task.kind == "train" else ""
        started = time.monotonic()
        data = None
        if not skip:
            try:
                data = self._local_data(task.kind)
            except NoData as exc:  # too little (or no labelled) data yet: say so instead of training on nothing
                skip = exc.reason
                event(log, "data.short", logging.WARNING, reason=exc.reason, detail=str(exc))
        if skip:  # sit this round out, and say why: the gateway need not wait for us
            outcome = learner.Outcome(b"", 0, {})
            wire = envelope.seal(self.identity, "reply", ctx, schemas.Reply(schemas.SKIP_DIGEST, 0, skip).to_body())
            event(log, "task.skipped", round=env.ctx.round, task=env.ctx.task, reason=skip)
        else:
            base = self._fetch_model(env.ctx.base, task.delta_base)
            if task.kind == "train":
                budget = self.config.budget
                residual = (self.feedback.load(self.weight_shapes, self._lineage(), self.state.trusted_version)
                            if task.codec == TOPK else None)
                rng = learner.round_rng(self.seed, env.ctx.round)
                outcome = learner.train(self.model, base, data, task, rng, budget.max_train_s, budget.max_samples,
                                        residual)
            else:
                outcome = learner.evaluate(self.model, base, data)
            wire = envelope.seal(self.identity, "reply", ctx, {"examples": outcome.examples}, outcome.attachment)
        # Marked as sent before it is pending: the resend loop (another thread) must not see it pending
        # and unsent while the fsyncs below run, or it sends the reply twice.
        self._sent_at[key] = time.monotonic()
        self.store.put_pending(key, wire)  # on disk before it leaves the device ...
        if task.kind == "train" and not skip:  # the residual this reply leaves (None: a dense codec, dropped)
            self.feedback.keep(outcome.residual, self._lineage(), self.state.trusted_version)
        self.state.answered = [*self.state.answered, key][-ANSWERED_KEPT:]
        self.store.save(self.state)  # ... and the task marked answered: a redelivery is not trained again
        if saved:
            self.store.drop_task(saved)
        self.conn.publish(self.t_reply, wire, qos=1)
        self.counters.replies_sent += 1
        event(
            log, "reply.sent", round=env.ctx.round, task=env.ctx.task, kind=task.kind,
            examples=outcome.examples, bytes=len(wire), seconds=round(time.monotonic() - started, 2),
            **{k: round(v, 4) for k, v in outcome.metrics.items()},
        )

    def _lineage(self) -> str:
        """What a kept residual belongs to: this home gateway's model lineage and this model architecture."""
        return f"{self.roaming.home}:{self.architecture}"

    def _local_data(self, kind: str) -> LocalData:
        """This round's windows; raises NoData when there is nothing to learn or test on."""
        data = self.data.snapshot() if isinstance(self.data, LiveData) else self.data
        if kind == "train" and not len(data.x_train):
            raise NoData("not_enough_data", "no training windows")
        if kind != "train" and not len(data.x_test):
            raise NoData("not_enough_data", "no test windows")
        return data

    def _handle_receipt(self, payload: bytes) -> None:
        env = self._open_from_gateway(payload, "receipt")
        receipt = schemas.Receipt.from_body(env.body)
        if receipt.device != self.identity.id:
            raise _Refused("not_for_this_device")
        if env.ctx.task == "enroll":
            if receipt.accepted and not self.state.enrolled:
                self.state.enrolled = True
                self.store.save(self.state)
                event(log, "enroll.accepted", gateway=env.ctx.gateway)
            elif not receipt.accepted:
                event(log, "enroll.refused", logging.WARNING, reason=receipt.reason)
            return
        key = f"{env.ctx.round:06d}-{env.ctx.task}"
        pending = self.store.read_pending(key)
        if pending is None:
            return  # a receipt for a reply already settled: nothing to do
        if receipt.reply and receipt.reply != envelope.decode(pending).body.get("digest"):
            return  # a receipt for some other reply with this key
        self.store.drop_pending(key)
        self._sent_at.pop(key, None)
        if receipt.accepted:
            self.counters.accepted += 1
            event(log, "receipt.accepted", round=env.ctx.round, task=env.ctx.task)
        else:
            self.counters.rejected[receipt.reason] = self.counters.rejected.get(receipt.reason, 0) + 1
            event(log, "receipt.rejected", logging.WARNING, round=env.ctx.round, task=env.ctx.task, reason=receipt.reason)

    def _worker(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                topic, payload, saved = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            here = self.roaming.home_topics
            kind = {here.task: "task", here.keys: "keys", here.members: "members",
                    REHOME: "rehome"}.get(topic, "receipt")
            try:
                if kind == "task":
                    self._handle_task(payload, saved)
                elif kind == "keys":
                    self._handle_keys(payload)
                elif kind == "members":
                    self._handle_members(payload)
                elif kind == "rehome":
                    self._rehome()
                else:
                    self._handle_receipt(payload)
            except (ProtocolError, _Refused, learner.BadOption) as exc:
                self._count(exc.reason)
                event(log, f"{kind}.refused", logging.WARNING, reason=exc.reason, detail=str(exc))
            except Exception:  # an agent must outlive any single bad message
                log.exception("%s.failed unexpected error", kind)
            if saved:  # answered, refused or failed: done with it either way
                self.store.drop_task(saved)

    def _handle_keys(self, payload: bytes) -> None:
        """The gateway's rotation chain (retained): follow it from the key trusted now, if the root signed it."""
        if not payload:
            return  # a cleared retained message
        if self.config.gateway_root_key is None:
            raise _Refused("no_root_key")  # this device trusts one gateway key, configured: nothing to follow
        current = self.gateway_key
        new, retired = Chain.decode(payload).follow(current, [self.config.gateway_root_key])
        if new == current:
            return
        self.state.gateway_key = new.hex()
        self.state.retired_keys = [*self.state.retired_keys, *(k.hex() for k in retired)]
        self.store.save(self.state)
        event(log, "gateway.key_rotated", retired=",".join(identity_id(k) for k in retired), key=identity_id(new))

    # --- roaming (what `Roaming` decides, done to the connection and the state) --------------

    def _handle_members(self, payload: bytes) -> None:
        """A gateway's membership document (retained): `Roaming.learn_members` checks it against the root key."""
        if not payload:
            return  # a cleared retained message
        if self.config.gateway_root_key is None:
            raise _Refused("no_root_key")
        self.roaming.learn_members(payload)

    def _roam(self, now: float) -> None:
        """The loop's look at the home (every half second): `Roaming.check_home` decides which statuses to
        watch and whether to move; this counts what it refused and asks the worker to move the device."""
        check = self.roaming.check_home(now)
        for reason in check.refused:
            self._count(reason)
        if check.unsubscribe:
            self.conn.unsubscribe(check.unsubscribe)
        if check.subscribe:
            self.conn.subscribe(check.subscribe)
        if check.move:
            self._inbox.put((REHOME, b"", ""))

    def _rehome(self) -> None:
        """Move the device to the member `Roaming.check_home` chose (the worker thread, between two messages)."""
        chosen = self.roaming.next_move()
        if chosen is None:  # it left the city meanwhile: the loop chooses again
            return
        move, member = chosen
        with self._moving:
            old, old_conn, old_online = self.roaming.home, self.conn, self.roaming.home_topics.online
            old_topics = self.roaming.subscribed_topics()
            self.roaming.move_to(move, member)  # on disk first: a power cut from here on wakes up there
            self.state = AgentState(move.to, retired_keys=[k.hex() for k in member.retired])
            self.store.save(self.state)
            dropped = self.store.drop_pending_not_for(move.to, _gateway_of)
            self._sent_at.clear()
            self._models = {}
            old_conn.unsubscribe(old_topics)  # the persistent session must not keep the old home's topics
            old_conn.close(goodbye=Will(old_online, b"0"))  # the old home, back one day, sees the device gone
            self.conn = self._make_connection()
            self.conn.start()
            self.roaming.arrived(time.monotonic())
        event(log, "agent.rehomed", **{"from": old}, to=move.to, after_s=round(move.quiet_s, 1),
              reason=move.why, key=identity_id(member.key), dropped_replies=dropped)

    def _count(self, reason: str) -> None:
        self.counters.refused_tasks[reason] = self.counters.refused_tasks.get(reason, 0) + 1

    def _send_enroll(self) -> None:
        here = self.roaming.home_topics
        ctx = envelope.Context(self.identity.public_key, here.gateway, 0, "enroll", b"")
        voucher = self.config.voucher.read_bytes() if self.config.voucher else b""
        body = schemas.EnrollRequest(self.config.name, time.time(), voucher).to_body()
        wire = envelope.seal(self.identity, "enroll", ctx, body)
        self.conn.publish(here.enroll, wire, qos=1)
        event(log, "enroll.sent", device=self.identity.id, name=self.config.name)

    def _resend_pending(self) -> None:
        """Re-send replies without a receipt for `resend_s` (all of them after a restart)."""
        now = time.monotonic()
        for key in self.store.pending_keys():  # names only: a reply is read from disk when it is due
            if now - self._sent_at.get(key, float("-inf")) < self.config.resend_s:
                continue
            wire = self.store.read_pending(key)
            if wire is None:
                continue
            self._sent_at[key] = now
            self.conn.publish(self.t_reply, wire, qos=1)
            event(log, "reply.resent", key=key)

    # --- lifetime --------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Run until `stop` is set; then say goodbye on the online topic and disconnect."""
        if isinstance(self.data, LiveData):
            event(log, "agent.start", device=self.identity.id, name=self.config.name, data="live",
                  samples=len(self.data.store))
        else:
            event(log, "agent.start", device=self.identity.id, name=self.config.name, data="replay",
                  train_windows=len(self.data.x_train), test_windows=len(self.data.x_test))
        home = self.roaming.home
        if home != self.config.gateway_id:
            event(log, "agent.home", gateway=home, configured=self.config.gateway_id)
            # A power cut in the middle of a move may have left replies for the old home: nobody can take them.
            self.store.drop_pending_not_for(home, _gateway_of)
        self.conn.start()
        if self.inference is not None:
            self.inference.start()  # before the worker: a release it accepts finds the inference ready
        for name, wire in self.store.saved_tasks():  # received before a power cut, not answered then
            self._inbox.put((self.t_task, wire, name))
        worker = threading.Thread(target=self._worker, args=(stop,), name="agent-worker", daemon=True)
        worker.start()
        systemd = Notifier()
        systemd.ready(f"device {self.identity.id}")
        next_enroll = next_resend = time.monotonic()
        connected = False
        try:
            while not stop.wait(0.5):
                # A dead worker (or inference thread) stops the pings: systemd's watchdog restarts us.
                if worker.is_alive() and (self.inference is None or self.inference.alive()):
                    systemd.watchdog()
                was_connected, connected = connected, self.conn.connected.is_set()
                if not connected:
                    continue
                now = time.monotonic()
                if not was_connected:  # (re)connected: the home gets the whole timeout from now
                    self.roaming.heard(now)
                if self.config.roams:
                    self._roam(now)
                if not self._moving.acquire(blocking=False):
                    continue  # the worker is moving the device: nothing goes to either home meanwhile
                try:
                    if not self.state.enrolled and now >= next_enroll:
                        self._send_enroll()
                        next_enroll = now + self.config.enroll_retry_s
                    if now >= next_resend:  # the first pass resumes what a power cut left behind
                        try:
                            self._resend_pending()
                        except OSError as exc:  # a full or failing disk must not stop the service
                            event(log, "reply.resend_failed", logging.ERROR, reason=str(exc))
                        next_resend = now + min(1.0, self.config.resend_s)
                finally:
                    self._moving.release()
        finally:
            systemd.stopping()
            worker.join(timeout=30)
            if self.inference is not None:
                self.inference.stop()  # the socket file goes, the threshold stays
            goodbye = Will(self.roaming.home_topics.online, b"0")
            self.conn.close(goodbye=goodbye)  # waited for briefly; else the will says it
            event(log, "agent.stop", tasks=self.counters.tasks, replies=self.counters.replies_sent,
                  accepted=self.counters.accepted)


def _gateway_of(wire: bytes) -> str:
    """The gateway a signed message of this device's is addressed to ("" if it does not decode)."""
    try:
        return envelope.decode(wire).ctx.gateway
    except ProtocolError:
        return ""


class _Refused(Exception):
    """A well-formed message this device will not act on, with a short reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
