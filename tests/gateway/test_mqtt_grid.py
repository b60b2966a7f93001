"""MqttGrid under real Flower strategies, with devices answering through the real protocol.

No broker here: the gateway's publish goes to an in-process "fleet" that signs
replies the way agents do and hands them straight to the reply intake (as the
gateway's worker thread would), so these tests pin the Grid's own logic (task
binding, reply conversion, closing exchanges, restarts) quickly and exactly.
The parts are the gateway's own: a `RoundBook` on a real journal, an `Outbox`,
and releases from a real `Lineage` published by a `ModelPublisher`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg, FedMedian
from flwr.supercore.task_identity import TaskIdentity

from gateway.grid import MqttGrid
from gateway.ingest import EVALUATE_METRICS, Accepted, Authenticator, Deferred, Duplicate, Rejected
from gateway.intake import ReplyIntake
from gateway.journal import Interrupted, Journal
from gateway.lineage import Lineage, encode
from gateway.models import ModelPublisher, Release, chunk_count
from gateway.outbox import Outbox
from gateway.releases import Releases
from gateway.rounds import RoundBook
from protocol import envelope, schemas, topics
from protocol.keys import Identity

GATEWAY = Identity.from_seed(b"g" * 32)
DEVICES = [Identity.from_seed(bytes([i]) * 32) for i in range(1, 4)]
WEIGHTS = {"w": np.zeros((4, 2), np.float32), "b": np.zeros(2, np.float32)}
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1


class Fleet:
    """Devices that answer every task at once: train adds (device index) to every weight.

    `answer`: True (all), False (none) or the devices that answer. With `resend`, each device sends its
    reply a second time, as an agent does whose receipt is slow; without `deliver`, replies are only
    recorded (`replies`), for a test to hand in. It is also the grid's view of the
    devices (`online_nodes`, `key_of`)."""

    def __init__(self, online=DEVICES, answer=True, resend=False, deliver=True):
        self.online = {d.node_id: d for d in online}
        self.known = {d.node_id: d for d in DEVICES}
        self.answer = answer
        self.resend = resend
        self.deliver = deliver
        self.intake: ReplyIntake | None = None
        self.after_reply = lambda: None
        self.published: list[tuple[str, bytes]] = []
        self.replies: list[tuple[str, bytes]] = []

    def online_nodes(self) -> dict[int, bytes]:
        return {n: d.public_key for n, d in self.online.items()}

    def key_of(self, node: int) -> bytes | None:
        return self.known[node].public_key if node in self.known else None

    def answers(self, device: Identity) -> bool:
        return self.answer if isinstance(self.answer, bool) else device in self.answer

    def publish(self, topic, payload, retain=False, counted=True):
        self.published.append((topic, payload))
        if "/task/" not in topic:
            return
        device = next(d for d in DEVICES if d.id == topics.device_of(topic))
        if not self.answers(device):
            return
        task_env = envelope.decode(payload)
        task = schemas.Task.from_body(task_env.body)
        index = DEVICES.index(device) + 1
        if task.kind == "train":
            update = schemas.encode_update({k: np.full_like(v, index) for k, v in WEIGHTS.items()},
                                           {"train_loss": 1.0, "steps": 1.0}, task.codec)
        else:
            update = schemas.encode_update({}, {"loss": 1.0, "accuracy": 0.5})
        ctx = envelope.Context(device.public_key, GATEWAY.id, task_env.ctx.round, task_env.ctx.task, task_env.ctx.base)
        wire = envelope.seal(device, "reply", ctx, {"examples": 10 * index}, update)
        self.replies.append((topics.reply(GATEWAY.id, device.id), wire))
        if not self.deliver:
            return
        self.send(topics.reply(GATEWAY.id, device.id), wire)
        if self.resend:
            self.send(topics.reply(GATEWAY.id, device.id), wire)
        self.after_reply()

    def send(self, topic: str, wire: bytes):
        """A reply reaches the gateway (its worker thread runs the intake)."""
        (outcome,) = self.intake.handle([(topic, wire, None)])
        return outcome

    def receipts(self, device: Identity) -> list[tuple[str, schemas.Receipt]]:
        """(task id, receipt) for each receipt the gateway sent this device, in order."""
        out = []
        for topic, payload in self.published:
            if topic == topics.receipt(GATEWAY.id, device.id):
                env = envelope.decode(payload)
                env.verify(GATEWAY.public_key)
                out.append((env.ctx.task, schemas.Receipt.from_body(env.body)))
        return out


class Keeper:
    """The ledger's side of releases (not under test here): what would be recorded."""

    def __init__(self) -> None:
        self.recorded: list = []

    def record_lineage(self, start) -> None:
        self.recorded.append(start)

    def record_aggregate(self, release, strategy, inputs) -> None:
        self.recorded.append(release)


class Gateway:
    """The parts of a gateway the grid works with, wired as gateway/service.py wires them."""

    def __init__(self, fleet: Fleet, tmp_path, deadline_s: float = 5.0, interrupted: Interrupted | None = None,
                 is_revoked=lambda key: False, restore_hook=lambda: None, codec: str = "f32") -> None:
        """`restore_hook()`: called as the book authenticates a journaled reply it restores."""
        self.journal = Journal(tmp_path / "rounds.db")
        self.lineage = Lineage(self.journal)
        publisher = ModelPublisher(GATEWAY, GATEWAY.id, "arch", fleet.publish)
        self.releases = Releases(self.lineage, publisher, Keeper(), "family", tmp_path / "model.npz")
        if self.lineage.head is None:
            self.releases.start(WEIGHTS, "first start")
        self.authenticator = Authenticator(GATEWAY.id, lambda key: any(key == d.public_key for d in DEVICES),
                                           is_revoked)
        def restore_authenticate(topic, payload):
            restore_hook()
            return self.authenticator.authenticate(topic, payload)

        self.book = RoundBook(self.journal.exchanges, restore_authenticate, is_revoked, EVALUATE_METRICS,
                              self.requeue, interrupted)
        self.outbox = Outbox(GATEWAY, GATEWAY.id, fleet.publish)
        self.intake = ReplyIntake(self.authenticator, self.book, self.outbox)
        self.stop = threading.Event()
        # Float32 updates: the fleet's replies hold exact values the tests average (admission refuses a reply
        # in another codec than its task's, `wrong_codec`).
        self.grid = MqttGrid(self.book, self.outbox, self.releases.release_for, fleet, deadline_s, self.stop,
                             codec=codec)
        fleet.intake = self.intake

    def requeue(self, items: list[tuple[str, bytes]]) -> None:
        """Deferred replies back to the intake (the service puts them in its inbox)."""
        self.intake.handle([(topic, payload, None) for topic, payload in items])

    def close(self) -> None:
        self.journal.close()


@pytest.fixture
def gateways(tmp_path):
    made: list[Gateway] = []

    def make(fleet: Fleet, deadline_s: float = 5.0, **kwargs) -> Gateway:
        made.append(Gateway(fleet, tmp_path, deadline_s, **kwargs))
        return made[-1]

    yield make
    for gateway in made:
        gateway.close()


def arrays(value=0.0):
    return ArrayRecord({k: Array(np.full_like(v, value)) for k, v in WEIGHTS.items()})


def test_fedavg_through_the_grid_averages_full_weights_by_example_count(gateways):
    fleet = Fleet()
    grid = gateways(fleet).grid
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3)
    replies = grid.send_and_receive(strategy.configure_train(1, arrays(), ConfigRecord({"lr": 0.1}), grid))
    assert len(replies) == 3 and all(r.metadata.message_id for r in replies)
    aggregated, _ = strategy.aggregate_train(1, replies)
    # deltas 1, 2, 3 claiming 10, 20, 30 examples, weighed by the default WeightRule ("capped" at 1 x the
    # median claim): 10, 20, 20, so (10 + 40 + 60) / 50
    np.testing.assert_allclose(aggregated["w"].numpy(), 110 / 50, rtol=1e-6)


def test_fedmedian_takes_the_median_of_the_devices_weights(gateways):
    fleet = Fleet()
    grid = gateways(fleet).grid
    strategy = FedMedian(min_available_nodes=3, min_train_nodes=3)
    replies = grid.send_and_receive(strategy.configure_train(1, arrays(), ConfigRecord(), grid))
    aggregated, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(aggregated["b"].numpy(), 2.0)


def test_the_model_is_published_once_for_all_devices_and_tasks_name_it(gateways):
    fleet = Fleet()
    grid = gateways(fleet).grid
    grid.send_and_receive(FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(), grid))
    models = [t for t, _ in fleet.published if "/model/" in t]
    tasks = [envelope.decode(p) for t, p in fleet.published if "/task/" in t]
    assert len(models) == 1 and len(tasks) == 3
    assert {t.ctx.base.hex() for t in tasks} == {models[0].rsplit("/", 1)[1]}


def test_a_closed_round_reports_its_traffic_once(gateways):
    fleet = Fleet()
    gateway = gateways(fleet)
    grid = gateway.grid
    grid.send_and_receive(FedAvg(min_available_nodes=3).configure_train(2, arrays(), ConfigRecord(), grid))
    closed = gateway.book.take_closed()
    assert [(t.kind, t.round, len(t.accepted), t.sent) for t in closed] == [("train", 2, 3, 3)]
    assert gateway.book.take_closed() == []  # taken once: nothing of a closed exchange is kept
    assert all(gateway.book.open_task(d.id, closed[0].task) is None for d in DEVICES)


def test_a_sub_typed_message_closes_its_round(gateways):
    fleet = Fleet()
    gateway = gateways(fleet)
    messages = [Message(RecordDict({"arrays": arrays(), "config": ConfigRecord({"server-round": 1})}), d.node_id,
                        "train.custom") for d in DEVICES]
    assert len(list(gateway.grid.send_and_receive(messages))) == 3
    assert [t.kind for t in gateway.book.take_closed()] == ["train"]


def test_a_device_that_went_offline_after_sampling_gets_its_task_without_crashing_the_round(gateways):
    fleet = Fleet()
    grid = gateways(fleet).grid
    messages = FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(), grid)
    del fleet.online[DEVICES[0].node_id]  # its last will arrives between sampling and push
    assert len(list(grid.send_and_receive(messages))) == 3


def test_a_round_without_replies_closes_at_its_deadline(gateways):
    fleet = Fleet(answer=False)
    gateway = gateways(fleet, deadline_s=0.3)
    grid = gateway.grid
    started = time.monotonic()
    replies = grid.send_and_receive(FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(), grid))
    assert list(replies) == []
    assert 0.25 <= time.monotonic() - started < 3
    assert [(len(t.accepted), t.sent) for t in gateway.book.take_closed()] == [(0, 3)]


def test_replies_recorded_in_an_earlier_run_are_refused_after_a_restart(gateways):
    first = Fleet()
    earlier = gateways(first)
    earlier.grid.send_and_receive(FedAvg(min_available_nodes=3).configure_evaluate(0, arrays(), ConfigRecord(),
                                                                                   earlier.grid))
    earlier.close()
    restarted_fleet = Fleet(answer=False)
    restarted = gateways(restarted_fleet, deadline_s=0.5)
    waiter = threading.Thread(target=lambda: restarted.grid.send_and_receive(
        FedAvg(min_available_nodes=3).configure_evaluate(0, arrays(), ConfigRecord(), restarted.grid)))
    waiter.start()
    time.sleep(0.1)
    outcomes = [restarted_fleet.send(topic, wire) for topic, wire in first.replies]
    waiter.join()
    assert [o.reason for o in outcomes] == ["not_selected"] * 3
    assert restarted.grid.run_tag != earlier.grid.run_tag


def test_model_versions_keep_growing_across_restarts(tmp_path):
    journal = Journal(tmp_path / "rounds.db")
    lineage = Lineage(journal)
    assert lineage.start(WEIGHTS, "first start", "arch").version == 0
    step = lineage.advance({k: v + 1 for k, v in WEIGHTS.items()}, 1, "weighted", [], "FedAvg", {}, None, [])
    assert step.version == 1
    journal.close()
    journal = Journal(tmp_path / "rounds.db")  # the gateway restarted
    try:
        again = Lineage(journal)
        assert again.head.version == 1 and again.head.digest == step.digest
        back = again.advance(WEIGHTS, 2, "weighted", [], "FedAvg", {}, None, [])  # the very model of version 0 again
        assert back.version == 2
        assert again.start(WEIGHTS, "reset-model: test", "arch").version == 3  # a new lineage goes on counting
    finally:
        journal.close()


def test_exchanges_without_a_server_round_still_get_their_own_tasks(gateways):
    fleet = Fleet()
    gateway = gateways(fleet)
    task_ids = set()
    for _ in range(2):
        messages = [Message(RecordDict({"arrays": arrays(), "config": ConfigRecord()}), d.node_id, "train")
                    for d in DEVICES]
        assert len(list(gateway.grid.send_and_receive(messages))) == 3
        task_ids |= {t.task for t in gateway.book.take_closed()}
    assert gateway.book.rejections == {} and len(task_ids) == 2


def test_sigterm_ends_flowers_wait_for_nodes(gateways):
    fleet = Fleet(online=[])
    gateway = gateways(fleet)
    gateway.stop.set()
    with pytest.raises(InterruptedError):
        FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(), gateway.grid)


def test_a_model_over_256_kb_is_published_as_retained_chunks_before_its_release(tmp_path):
    fleet = Fleet(answer=False)
    publisher = ModelPublisher(GATEWAY, GATEWAY.id, "arch", fleet.publish, ttl_s=60)

    def release(weights, version) -> Release:
        weights, model, digest = encode(weights)
        return Release(digest, version, 1, version, b"", weights, len(model))

    big = {"w": np.ones((400, 400), np.float32)}  # 640 KB: three chunks
    first = release(big, 1)
    publisher.publish(first)
    assert chunk_count(first.size) == 3
    address = topics.model(GATEWAY.id, first.digest.hex())
    assert [t for t, _ in fleet.published] == [f"{address}/0", f"{address}/1", f"{address}/2", address]
    env = envelope.decode(fleet.published[-1][1])
    env.verify()
    body = schemas.ModelRelease.from_body(env.body)
    assert body.chunks == 3 and env.attachment is None and body.version == 1
    assert 0 < body.expires - time.time() <= 60
    assert b"".join(p for _, p in fleet.published[:3]) == schemas.encode_model(big)
    for i in range(2, 4):  # two newer releases push it out: every piece is cleared
        publisher.publish(release({"w": np.full((2,), float(i), np.float32)}, i))
    cleared = {t for t, p in fleet.published if p == b""}
    assert {address, f"{address}/0", f"{address}/1", f"{address}/2"} <= cleared


def test_a_check_that_fails_in_stage_one_costs_only_its_reply_not_the_rest_of_the_batch(gateways):
    fleet = Fleet(answer=False)
    gateway = gateways(fleet)
    real = gateway.authenticator.authenticate
    calls = {"n": 0}

    def failing_first(topic, payload):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("a bug in a check")
        return real(topic, payload)

    gateway.authenticator.authenticate = failing_first
    outcomes = gateway.intake.handle([("starling/x/reply/a", b"\x00", None), ("starling/x/reply/b", b"\x01", None)])
    assert [o.reason for o in outcomes] == ["internal_error", "schema"]
    assert "KeyError" in outcomes[0].detail and outcomes[0].device_id == "a"
    assert gateway.book.rejections == {"internal_error": 1, "schema": 1}


def test_a_check_that_fails_in_stage_two_costs_only_its_reply_not_the_rest_of_the_batch(gateways):
    calls = {"n": 0}

    def failing_first(key):  # stage 2 first asks whether the sender was revoked meanwhile
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("a bug in a check")
        return False

    fleet = Fleet(deliver=False)  # the devices answer; their replies are handed in below, in one batch
    gateway = gateways(fleet, is_revoked=failing_first)
    gateway.authenticator.is_revoked = lambda key: False  # stage 1 is not the one with the bug
    grid = gateway.grid
    grid.push_messages(FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(), grid))
    assert len(fleet.replies) == 3
    outcomes = gateway.intake.handle([(t, p, None) for t, p in fleet.replies])
    assert isinstance(outcomes[0], Rejected) and outcomes[0].reason == "internal_error"
    assert "KeyError" in outcomes[0].detail and outcomes[0].device_id == topics.device_of(fleet.replies[0][0])
    assert all(isinstance(o, Accepted) for o in outcomes[1:])
    assert gateway.book.rejections == {"internal_error": 1}


def test_a_reply_sent_again_in_its_round_is_acknowledged_again_and_counted_as_a_duplicate(gateways):
    fleet = Fleet(resend=True)
    gateway = gateways(fleet)
    grid = gateway.grid
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3)
    replies = grid.send_and_receive(strategy.configure_train(1, arrays(), ConfigRecord(), grid))
    assert len(replies) == 3  # each device's update counts once
    aggregated, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(aggregated["w"].numpy(), 110 / 50, rtol=1e-6)  # as in the FedAvg test above
    for device in DEVICES:
        (first, r1), (second, r2) = fleet.receipts(device)
        assert first == second and r1.accepted and r2.accepted and r1.reply == r2.reply
    assert gateway.book.duplicates == 3 and gateway.book.rejections == {}
    assert [(t.rejected, t.duplicates) for t in gateway.book.take_closed()] == [({}, 3)]


def test_a_reply_sent_again_after_its_round_is_a_replay_rejection(gateways):
    fleet = Fleet()
    gateway = gateways(fleet)
    grid = gateway.grid
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3)
    grid.send_and_receive(strategy.configure_train(1, arrays(), ConfigRecord(), grid))
    topic, old = fleet.replies[0]
    grid.send_and_receive(strategy.configure_train(2, arrays(), ConfigRecord(), grid))
    outcome = fleet.send(topic, old)
    assert outcome.reason == "replay"
    assert gateway.book.rejections == {"replay": 1} and gateway.book.duplicates == 0
    device = next(d for d in DEVICES if d.id == topics.device_of(topic))
    task, receipt = fleet.receipts(device)[-1]
    assert task == envelope.decode(old).ctx.task and receipt.accepted  # acknowledged: its device stops re-sending


def crash_after_the_first_reply(gateways) -> tuple[str, bytes, Interrupted]:
    """A gateway journals DEVICES[0]'s reply, then dies (here: is stopped) before the round ends; return that
    reply (topic, wire) and what the journal says is to be re-opened."""
    before = Fleet(answer=[DEVICES[0]])
    crashed = gateways(before)
    before.after_reply = crashed.stop.set
    with pytest.raises(InterruptedError):
        crashed.grid.send_and_receive(FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(
            {"lr": 0.3}), crashed.grid))
    (topic, journaled), = before.replies
    head = crashed.lineage.head
    crashed.close()
    probe = Journal(crashed.journal.path)
    try:
        interrupted = probe.exchanges.interrupted(head.lineage, head.digest)
    finally:
        probe.close()
    task = envelope.decode(journaled).ctx
    assert interrupted == Interrupted(task.task, head.lineage, 1, head.digest, sorted(d.node_id for d in DEVICES),
                                      [journaled], closed=False, recorded=False,
                                      config={"epochs": 1, "batch_size": 32, "lr": 0.3, "options": {},
                                              "codec": "f32", "density": 0.1})
    return topic, journaled, interrupted


def test_a_reply_re_sent_across_a_crash_is_a_duplicate_of_the_journaled_one(gateways):
    """The gateway journaled a reply, then died before its receipt left: the device sends it again,
    while the round re-opens. The restored reply counts once; the re-send is acknowledged as a duplicate."""
    early = DEVICES[0]
    topic, journaled, interrupted = crash_after_the_first_reply(gateways)
    task = envelope.decode(journaled).ctx
    # The restart: the journal says which exchange to re-open, with its devices and its accepted reply.
    fleet = Fleet()
    gateway = gateways(fleet, interrupted=interrupted, codec="f16")
    deferred = fleet.send(topic, journaled)  # the re-send, before the round re-opens
    assert isinstance(deferred, Deferred) and gateway.book.rejections == {} and fleet.receipts(early) == []
    # Restarted with another learning rate and codec: the re-opened round still asks for what it began with
    # (its journaled float32 reply is no wrong_codec, nor are the replies of the devices it tasks now).
    replies = gateway.grid.send_and_receive(FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(
        {"lr": 0.05}), gateway.grid))
    assert len(replies) == 3
    assert [t for t, _ in fleet.published if t == topics.task(GATEWAY.id, early.id)] == []  # not re-tasked
    retasked = [schemas.Task.from_body(envelope.decode(p).body) for t, p in fleet.published if "/task/" in t]
    assert len(retasked) == 2 and {(t.config.lr, t.codec) for t in retasked} == {(0.3, "f32")}
    assert [(t, r.accepted) for t, r in fleet.receipts(early)] == [(task.task, True)]
    assert gateway.book.duplicates == 1 and gateway.book.rejections == {}
    (traffic,) = gateway.book.take_closed()
    assert (traffic.task, traffic.restored, len(traffic.accepted), traffic.duplicates) == (task.task, 1, 3, 1)
    assert traffic.config["lr"] == 0.3  # what the round's release will record its updates were trained with


def test_a_round_journaled_without_its_codec_re_opens_asking_the_configured_one(gateways):
    """A journal written before the codec was journaled beside the task config: the re-opened round asks what the
    config says (what that gateway asked, unless its config changed), so its float32 replies are no wrong_codec."""
    topic, journaled, interrupted = crash_after_the_first_reply(gateways)
    older = replace(interrupted, config={k: v for k, v in interrupted.config.items()
                                         if k not in (schemas.CODEC, schemas.DENSITY)})
    fleet = Fleet()
    gateway = gateways(fleet, interrupted=older)  # configured as before: f32
    replies = gateway.grid.send_and_receive(FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(
        {"lr": 0.05}), gateway.grid))
    retasked = [schemas.Task.from_body(envelope.decode(p).body) for t, p in fleet.published if "/task/" in t]
    assert {(t.config.lr, t.codec) for t in retasked} == {(0.3, "f32")}
    assert len(replies) == 3 and gateway.book.rejections == {}


def test_a_re_send_while_the_interrupted_exchange_re_opens_does_not_displace_the_journaled_reply(gateways):
    """The device's re-send arrives (on the worker thread) just as the re-opened exchange restores the journaled
    replies: it waits for the restore, so it is a duplicate of the restored reply, and the device is not tasked
    again for a round it already answered."""
    early = DEVICES[0]
    topic, journaled, interrupted = crash_after_the_first_reply(gateways)
    fleet = Fleet()
    live: dict = {}
    threads: list[threading.Thread] = []

    def re_send_now():
        if not threads:
            threads.append(threading.Thread(target=lambda: live.setdefault("outcome", fleet.send(topic, journaled))))
            threads[0].start()
            threads[0].join(0.3)  # (it may only finish once the restore is done)

    gateway = gateways(fleet, interrupted=interrupted, restore_hook=re_send_now)
    replies = gateway.grid.send_and_receive(FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(),
                                                                                          gateway.grid))
    threads[0].join(5)
    assert len(replies) == 3 and isinstance(live["outcome"], Duplicate)
    assert [t for t, _ in fleet.published if t == topics.task(GATEWAY.id, early.id)] == []  # not re-tasked
    (traffic,) = gateway.book.take_closed()
    assert (traffic.restored, len(traffic.accepted), traffic.duplicates) == (1, 3, 1)
    assert gateway.book.duplicates == 1 and gateway.book.rejections == {}


@pytest.mark.parametrize("case", ["every sampled device is gone", "a resumed exchange that closed with no reply"])
def test_an_exchange_no_device_could_be_tasked_for_closes_at_once_and_is_reported(gateways, case):
    """Nothing to wait for: the exchange is over at once, and its traffic still reaches `take_closed` (which the
    engine needs to finish the exchange in the journal: else a restart would resume it)."""
    fleet = Fleet()
    interrupted = None
    if case != "every sampled device is gone":
        gateway = gateways(fleet)
        head = gateway.lineage.head
        gateway.close()
        interrupted = Interrupted("train-1-dead.1", head.lineage, 1, head.digest, [d.node_id for d in DEVICES], [],
                                  closed=True, recorded=False)
    gateway = gateways(fleet, deadline_s=5.0, interrupted=interrupted)
    grid = gateway.grid
    messages = FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(), grid)
    if interrupted is None:
        fleet.known.clear()  # revoked (or gone) between sampling and push
    started = time.monotonic()
    assert list(grid.send_and_receive(messages)) == []
    assert time.monotonic() - started < 2  # not the deadline
    (traffic,) = gateway.book.take_closed()
    assert (traffic.kind, traffic.round, traffic.sent, traffic.accepted) == ("train", 1, 0, [])
    assert gateway.journal.read("select closed from exchange where task = ?", traffic.task) == [(1,)]
    assert [t for t, _ in fleet.published if "/task/" in t] == []
