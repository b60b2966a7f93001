"""The agent's MQTT loop: enroll, take signed tasks, answer with signed replies.

Threads: paho's network thread (inside `mqttlink.Connection`) only saves tasks
to disk and queues, or files a model piece a fetch waits for (`Downloads.file`);
one worker thread does the slow things (fetching and checking models, training,
signing); the caller's thread re-sends unacknowledged replies until `stop` is set.

Trust: every task, model and receipt must be signed by the gateway's key
(`Agent._check_gateway_key`, the one place that says which key counts: the one
in the config, or where the gateway's key rotations led) and bound to this
gateway and this device; a key a rotation retired is refused (`key_rotated`).
Rotations come retained on the gateway's keys topic and are followed only when
signed by the city's root key in the config (`protocol.rotation`); a model must hash to the
digest the task names, and its signed release must pass the release checks (`Downloads.check_release`).

Downloads (agent/downloads.py): `Downloads.fetch` gives the model a task names: held, rebuilt or whole.

Roaming (agent/roaming.py): with the root key, "the gateway" is the device's home, the configured gateway
or the member it re-homed to. `Roaming` keeps the city, the home and the decision to leave it; the agent
carries that decision out on its connection and its state (`Agent._roam`, `Agent._rehome`). The move is one
step of the worker thread, between two messages: the new home and its key on disk first, a fresh
per-gateway state (the new home's model lineage is taken from whatever version it is at), replies still
pending for the old home dropped, and a new MQTT connection whose subscriptions, online flag and last will
are the new home's; then the device enrolls there again, and the new home admits it under its own policy
(a revoked device is refused there too: the ledger says so).

Inference (agent/inference.py, with `[inference]`): its own thread and its own model instance. The worker
hands it each release it accepts (`Downloads.fetch`), whole; the inference thread swaps it in between two runs,
so no run sees half a release, and training never touches the weights inference runs with. After a re-home
it runs the old home's release until the new home's first one arrives.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field

from mqttlink import Connection, ConnectionOptions, Message, Will
from protocol import envelope, schemas, topics
from protocol.errors import ProtocolError
from protocol.keys import Identity, identity_id
from protocol.logs import event
from protocol.rotation import Chain
from protocol.tensors import TOPK

from . import learner
from .config import AgentConfig
from .downloads import Downloads, Refused
from .error_feedback import ErrorFeedback
from .inference import Inference
from .live_data import LiveData, NoData
from .roaming import Roaming
from .samples import LocalData
from .state import ANSWERED_KEPT, AgentState, StateStore
from .systemd import Notifier

log = logging.getLogger("starling.agent")

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
    `downloads` (agent/downloads.py) holds the model in memory and fetches the ones tasks name.
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
        self.inference = inference
        self.downloads = Downloads(  # the models tasks name; the home, connection and state as they are now
            home=lambda: self.roaming.home, connection=lambda: self.conn, open_signed=self._open_from_gateway,
            state=lambda: self.state, store=self.store, counters=self.counters, weight_shapes=self.weight_shapes,
            architecture=architecture, freeze_window_s=config.freeze_window_s, flashed=model,
            install=inference.install if inference is not None else None,
        )
        self.conn = self._make_connection()

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
        if msg.topic.startswith(prefix):
            self.downloads.file(msg.topic[len(prefix):], msg.payload)
            return
        self._inbox.put((msg.topic, msg.payload, ""))

    # --- checks ----------------------------------------------------------------------

    @property
    def gateway_key(self) -> bytes:
        """The key that signs for the gateway now: the configured one, or where its rotations led."""
        return bytes.fromhex(self.state.gateway_key) if self.state.gateway_key else self.roaming.home_key

    def _check_gateway_key(self, key: bytes) -> None:
        """Refuse (raise `Refused`) a message not signed by the gateway's current key."""
        if key == self.gateway_key:
            return
        if key.hex() in self.state.retired_keys:
            raise Refused("key_rotated")  # the operator's root key replaced it: perhaps stolen
        raise Refused("not_from_gateway")

    def _open_from_gateway(self, payload: bytes, expected_type: str) -> envelope.Envelope:
        env = envelope.decode(payload)
        if env.type != expected_type:
            raise ProtocolError(f"expected {expected_type}, got {env.type}")
        self._check_gateway_key(env.ctx.sender)
        if env.ctx.gateway != self.roaming.home:
            raise Refused("wrong_gateway")
        env.verify()
        self.roaming.heard(time.monotonic())  # the home signed it: it is there
        return env

    # --- handlers --------------------------------------------------------------------

    def _handle_task(self, payload: bytes, saved: str = "") -> None:
        self.counters.tasks += 1
        env = self._open_from_gateway(payload, "task")
        task = schemas.Task.from_body(env.body)
        if task.device != self.identity.id:
            raise Refused("not_for_this_device")
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
            raise Refused("deadline_passed")
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
            base = self.downloads.fetch(env.ctx.base, task.delta_base)
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
            raise Refused("not_for_this_device")
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
            except (ProtocolError, Refused, learner.BadOption) as exc:
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
            raise Refused("no_root_key")  # this device trusts one gateway key, configured: nothing to follow
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
            raise Refused("no_root_key")
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
            self.downloads.forget()
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
