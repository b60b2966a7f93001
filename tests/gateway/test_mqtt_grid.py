"""MqttGrid under real Flower strategies, with devices answering through the real protocol.

No broker here: the grid's publish goes to an in-process "fleet" that signs
replies the way agents do, so these tests pin the Grid's own logic (task
binding, reply conversion, closing rounds, restarts) quickly and exactly.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg, FedMedian
from flwr.supercore.task_identity import TaskIdentity

from gateway.grid import MqttGrid
from gateway.ingest import ReplyChecker
from gateway.models import ModelPublisher
from protocol import envelope, schemas, topics
from protocol.keys import Identity

GATEWAY = Identity.from_seed(b"g" * 32)
DEVICES = [Identity.from_seed(bytes([i]) * 32) for i in range(1, 4)]
WEIGHTS = {"w": np.zeros((4, 2), np.float32), "b": np.zeros(2, np.float32)}
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1


class Fleet:
    """Devices that answer every task at once: train adds (device index) to every weight.

    With `resend`, each device sends its reply a second time, as an agent does whose receipt is slow."""

    def __init__(self, online=DEVICES, answer=True, resend=False):
        self.online = {d.node_id: d for d in online}
        self.known = {d.node_id: d for d in DEVICES}
        self.answer = answer
        self.resend = resend
        self.grid: MqttGrid | None = None
        self.published: list[tuple[str, bytes]] = []
        self.replies: list[tuple[str, bytes]] = []

    def publish(self, topic, payload, retain=False, counted=True):
        self.published.append((topic, payload))
        if "/task/" not in topic or not self.answer:
            return
        task_env = envelope.decode(payload)
        device = next(d for d in DEVICES if d.id == topics.device_of(topic))
        task = schemas.Task.from_body(task_env.body)
        index = DEVICES.index(device) + 1
        if task.kind == "train":
            update = schemas.encode_update({k: np.full_like(v, index) for k, v in WEIGHTS.items()},
                                           {"train_loss": 1.0, "steps": 1.0}, "f32")
        else:
            update = schemas.encode_update({}, {"loss": 1.0, "accuracy": 0.5})
        ctx = envelope.Context(device.public_key, GATEWAY.id, task_env.ctx.round, task_env.ctx.task, task_env.ctx.base)
        wire = envelope.seal(device, "reply", ctx, {"examples": 10 * index}, update)
        self.replies.append((topics.reply(GATEWAY.id, device.id), wire))
        self.grid.handle_reply(topics.reply(GATEWAY.id, device.id), wire)
        if self.resend:
            self.grid.handle_reply(topics.reply(GATEWAY.id, device.id), wire)

    def receipts(self, device: Identity) -> list[tuple[str, schemas.Receipt]]:
        """(task id, receipt) for each receipt the gateway sent this device, in order."""
        out = []
        for topic, payload in self.published:
            if topic == topics.receipt(GATEWAY.id, device.id):
                env = envelope.decode(payload)
                env.verify()
                out.append((env.ctx.task, schemas.Receipt.from_body(env.body)))
        return out


def make_grid(fleet: Fleet, tmp_path, deadline_s=5.0) -> MqttGrid:
    checker = ReplyChecker(GATEWAY.id, lambda key: any(key == d.public_key for d in DEVICES))
    models = ModelPublisher(GATEWAY, GATEWAY.id, "arch", fleet.publish, tmp_path / "model_version")
    grid = MqttGrid(GATEWAY, GATEWAY.id, fleet.publish, checker, models,
                    lambda: {n: d.public_key for n, d in fleet.online.items()},
                    lambda n: fleet.known[n].public_key if n in fleet.known else None,
                    deadline_s, schemas.TrainConfig())
    fleet.grid = grid
    return grid


def arrays(value=0.0):
    return ArrayRecord({k: Array(np.full_like(v, value)) for k, v in WEIGHTS.items()})


def test_fedavg_through_the_grid_averages_full_weights_by_example_count(tmp_path):
    fleet = Fleet()
    grid = make_grid(fleet, tmp_path)
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3)
    replies = grid.send_and_receive(strategy.configure_train(1, arrays(), ConfigRecord({"lr": 0.1}), grid))
    assert len(replies) == 3 and all(r.metadata.message_id for r in replies)
    aggregated, _ = strategy.aggregate_train(1, replies)
    # deltas 1, 2, 3 weighted by 10, 20, 30 examples: (10 + 40 + 90) / 60
    np.testing.assert_allclose(aggregated["w"].numpy(), 140 / 60, rtol=1e-6)


def test_fedmedian_takes_the_median_of_the_devices_weights(tmp_path):
    fleet = Fleet()
    grid = make_grid(fleet, tmp_path)
    strategy = FedMedian(min_available_nodes=3, min_train_nodes=3)
    replies = grid.send_and_receive(strategy.configure_train(1, arrays(), ConfigRecord(), grid))
    aggregated, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(aggregated["b"].numpy(), 2.0)


def test_the_model_is_published_once_for_all_devices_and_tasks_name_it(tmp_path):
    fleet = Fleet()
    grid = make_grid(fleet, tmp_path)
    grid.send_and_receive(FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(), grid))
    models = [t for t, _ in fleet.published if "/model/" in t]
    tasks = [envelope.decode(p) for t, p in fleet.published if "/task/" in t]
    assert len(models) == 1 and len(tasks) == 3
    assert {t.ctx.base.hex() for t in tasks} == {models[0].rsplit("/", 1)[1]}


def test_a_closed_round_reports_its_traffic_once(tmp_path):
    fleet = Fleet()
    grid = make_grid(fleet, tmp_path)
    closed = []
    grid.on_closed = closed.append
    grid.send_and_receive(FedAvg(min_available_nodes=3).configure_train(2, arrays(), ConfigRecord(), grid))
    assert [(t.kind, t.round, len(t.accepted), t.sent) for t in closed] == [("train", 2, 3, 3)]
    assert grid.traffic == {}  # nothing of a closed round is kept


def test_a_sub_typed_message_closes_its_round(tmp_path):
    fleet = Fleet()
    grid = make_grid(fleet, tmp_path)
    closed = []
    grid.on_closed = closed.append
    messages = [Message(RecordDict({"arrays": arrays(), "config": ConfigRecord({"server-round": 1})}), d.node_id,
                        "train.custom") for d in DEVICES]
    assert len(list(grid.send_and_receive(messages))) == 3
    assert [t.kind for t in closed] == ["train"]


def test_a_device_that_went_offline_after_sampling_gets_its_task_without_crashing_the_round(tmp_path):
    fleet = Fleet()
    grid = make_grid(fleet, tmp_path)
    messages = FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(), grid)
    del fleet.online[DEVICES[0].node_id]  # its last will arrives between sampling and push
    assert len(list(grid.send_and_receive(messages))) == 3


def test_a_round_without_replies_closes_at_its_deadline(tmp_path):
    fleet = Fleet(answer=False)
    grid = make_grid(fleet, tmp_path, deadline_s=0.3)
    replies = grid.send_and_receive(FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(), grid))
    assert list(replies) == []


def test_replies_recorded_in_an_earlier_run_are_refused_after_a_restart(tmp_path):
    first = Fleet()
    grid = make_grid(first, tmp_path)
    grid.send_and_receive(FedAvg(min_available_nodes=3).configure_evaluate(0, arrays(), ConfigRecord(), grid))
    restarted_fleet = Fleet(answer=False)
    restarted = make_grid(restarted_fleet, tmp_path, deadline_s=0.5)
    waiter = threading.Thread(target=lambda: restarted.send_and_receive(
        FedAvg(min_available_nodes=3).configure_evaluate(0, arrays(), ConfigRecord(), restarted)))
    waiter.start()
    import time

    time.sleep(0.1)
    outcomes = [restarted.handle_reply(topic, wire) for topic, wire in first.replies]
    waiter.join()
    assert [o.reason for o in outcomes] == ["not_selected"] * 3
    assert restarted.run_tag != grid.run_tag


def test_model_versions_keep_growing_across_restarts(tmp_path):
    fleet = Fleet()
    first = ModelPublisher(GATEWAY, GATEWAY.id, "arch", fleet.publish, tmp_path / "v")
    assert first.release(WEIGHTS, 0).version == 0
    assert first.release({k: v + 1 for k, v in WEIGHTS.items()}, 1).version == 1
    again = ModelPublisher(GATEWAY, GATEWAY.id, "arch", fleet.publish, tmp_path / "v")
    assert again.release(WEIGHTS, 0).version == 2


def test_exchanges_without_a_server_round_still_get_their_own_tasks(tmp_path):
    fleet = Fleet()
    grid = make_grid(fleet, tmp_path)
    for _ in range(2):
        messages = [Message(RecordDict({"arrays": arrays(), "config": ConfigRecord()}), d.node_id, "train")
                    for d in DEVICES]
        assert len(list(grid.send_and_receive(messages))) == 3
    assert grid.rejections == {}


def test_sigterm_ends_flowers_wait_for_nodes(tmp_path):
    fleet = Fleet(online=[])
    grid = make_grid(fleet, tmp_path)
    grid.stop.set()
    with pytest.raises(InterruptedError):
        FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(), grid)


def test_a_model_over_256_kb_is_published_as_retained_chunks_before_its_release(tmp_path):
    fleet = Fleet(answer=False)
    publisher = ModelPublisher(GATEWAY, GATEWAY.id, "arch", fleet.publish, tmp_path / "v", ttl_s=60)
    big = {"w": np.ones((400, 400), np.float32)}  # 640 KB: three chunks
    release = publisher.release(big, 1)
    assert release.chunks == 3
    address = topics.model(GATEWAY.id, release.digest.hex())
    assert [t for t, _ in fleet.published] == [f"{address}/0", f"{address}/1", f"{address}/2", address]
    env = envelope.decode(fleet.published[-1][1])
    env.verify()
    body = schemas.ModelRelease.from_body(env.body)
    assert body.chunks == 3 and env.attachment is None
    assert 0 < body.expires - __import__("time").time() <= 60
    assert b"".join(p for _, p in fleet.published[:3]) == schemas.encode_model(big)
    for i in range(2, 4):  # two newer releases push it out: every piece is cleared
        publisher.release({"w": np.full((2,), float(i), np.float32)}, i)
    cleared = {t for t, p in fleet.published if p == b""}
    assert {address, f"{address}/0", f"{address}/1", f"{address}/2"} <= cleared


def test_a_check_that_fails_costs_only_its_reply_not_the_rest_of_the_batch(tmp_path):
    fleet = Fleet(answer=False)
    grid = make_grid(fleet, tmp_path)
    real_check = grid.checker.check
    calls = {"n": 0}

    def failing_first(topic, payload, now=None, first=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("a bug in a check")
        return real_check(topic, payload, now, first)

    grid.checker.check = failing_first
    outcomes = grid.handle_replies([("starling/x/reply/a", b"\x00", None), ("starling/x/reply/b", b"\x01", None)])
    assert [o.reason for o in outcomes] == ["internal_error", "schema"]
    assert "KeyError" in outcomes[0].detail and outcomes[0].device_id == "a"
    assert grid.rejections == {"internal_error": 1, "schema": 1}


def test_a_reply_sent_again_in_its_round_is_acknowledged_again_and_counted_as_a_duplicate(tmp_path):
    fleet = Fleet(resend=True)
    grid = make_grid(fleet, tmp_path)
    closed = []
    grid.on_closed = closed.append
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3)
    replies = grid.send_and_receive(strategy.configure_train(1, arrays(), ConfigRecord(), grid))
    assert len(replies) == 3  # each device's update counts once
    aggregated, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(aggregated["w"].numpy(), 140 / 60, rtol=1e-6)
    for device in DEVICES:
        (first, r1), (second, r2) = fleet.receipts(device)
        assert first == second and r1.accepted and r2.accepted and r1.reply == r2.reply
    assert grid.duplicates == 3 and grid.rejections == {}
    assert [(t.rejected, t.duplicates) for t in closed] == [({}, 3)]


def test_a_reply_sent_again_after_its_round_is_a_replay_rejection(tmp_path):
    fleet = Fleet()
    grid = make_grid(fleet, tmp_path)
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3)
    grid.send_and_receive(strategy.configure_train(1, arrays(), ConfigRecord(), grid))
    topic, old = fleet.replies[0]
    grid.send_and_receive(strategy.configure_train(2, arrays(), ConfigRecord(), grid))
    outcome = grid.handle_reply(topic, old)
    assert outcome.reason == "replay"
    assert grid.rejections == {"replay": 1} and grid.duplicates == 0
    device = next(d for d in DEVICES if d.id == topics.device_of(topic))
    task, receipt = fleet.receipts(device)[-1]
    assert task == envelope.decode(old).ctx.task and receipt.accepted  # acknowledged: its device stops re-sending


def test_a_reply_re_sent_across_a_crash_is_a_duplicate_of_the_journaled_one(tmp_path):
    """The gateway journaled a reply, then died before its receipt left: the device sends it again,
    while the round re-opens. The restored reply counts once; the re-send is acknowledged as a duplicate."""
    from gateway.journal import Resume

    before = Fleet()
    crashed = make_grid(before, tmp_path)
    crashed.send_and_receive(FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(), crashed))
    topic, journaled = before.replies[0]
    task = envelope.decode(journaled).ctx
    device = next(d for d in DEVICES if d.id == topics.device_of(topic))
    fleet = Fleet()
    grid = make_grid(fleet, tmp_path)
    grid.run_tag = crashed.run_tag
    grid.resume = Resume(crashed.run_tag, 1, task.task, task.base, b"", [d.node_id for d in DEVICES], [journaled],
                         closed=False, recorded=False)
    grid.checker.reopening.add(task.task)
    assert grid.handle_reply(topic, journaled).reason == "deferred"  # the re-send, before the round re-opens
    replies = grid.send_and_receive(FedAvg(min_available_nodes=3).configure_train(1, arrays(), ConfigRecord(), grid))
    assert len(replies) == 3
    assert [t for t, _ in fleet.published if t == topics.task(GATEWAY.id, device.id)] == []  # not re-tasked
    assert [(t, r.accepted) for t, r in fleet.receipts(device)] == [(task.task, True)]
    assert grid.duplicates == 1 and grid.rejections == {}
