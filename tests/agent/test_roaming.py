"""Devices that roam: the city's members as the root key says, when the home is gone, where to go, what is kept.

Pure parts first (the membership reader, the choice, the watch, the state files, the config), then the
decision (`Roaming`, time given by the test) and what an agent that is not running makes of it, then a
running agent on a real broker with two hand-driven gateways: A goes offline and the device moves to B,
takes B's lineage and trains there, and wakes up at B after a restart.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import roaming_helpers as rh

from agent.config import AgentConfig, ConfigError, parse_config
from agent.roaming import HomeCheck, HomeWatch, Move, Roaming, choose_home, serves, status_state
from agent.samples import LocalData
from agent.service import REHOME, Agent
from agent.state import AgentState, Home, StateStore
from firmware_models.runtime import TrainableModel
from hw.broker import Broker
from mqttlink import Message
from protocol import cbor, envelope, schemas, topics
from protocol.keys import Identity
from protocol.membership import City, MembershipRefused

ROOT = Identity.from_seed(b"R" * 32)
FORGER = Identity.from_seed(b"F" * 32)
A, B, C, C2 = (Identity.from_seed(bytes([i]) * 32) for i in (65, 66, 67, 68))


def refused(data: bytes, root: Identity = ROOT, genesis: bytes | None = None) -> str:
    with pytest.raises(MembershipRefused) as caught:
        City.from_document(data, root.public_key, genesis)
    return caught.value.reason


# --- the membership document ---------------------------------------------------------------------------


def test_joins_rotations_and_leaves_make_the_members_in_the_roots_order_whatever_the_documents_order():
    vertices = [rh.genesis(ROOT, [A, B]), rh.join(ROOT, C, 1, "north"), rh.rotate(ROOT, C, C2, 2),
                rh.leave(ROOT, B, 3)]
    city = City.from_document(rh.document(*vertices), ROOT.public_key)
    shuffled = City.from_document(rh.document(*reversed(vertices)), ROOT.public_key)
    assert city.members == shuffled.members and city.name == "harbour"
    assert set(city.members) == {A.id, C.id} and city.departed == {B.id}
    assert city.members[C.id].key == C2.public_key and city.members[C.id].retired == (C.public_key,)


def test_documents_merge_so_a_stale_one_never_takes_back_what_a_newer_one_said():
    first = City.from_document(rh.document(rh.genesis(ROOT, [A, B]), rh.leave(ROOT, B, 1)), ROOT.public_key)
    stale = City.from_document(rh.document(rh.genesis(ROOT, [A, B])), ROOT.public_key)
    merged = stale.merge(first)
    assert set(merged.members) == {A.id} and merged.departed == {B.id}
    assert merged.ids() == first.merge(stale).ids()
    assert City.from_document(merged.encode(), ROOT.public_key).ids() == merged.ids()  # kept and re-read
    rejoined = merged.merge(City.from_document(rh.document(rh.genesis(ROOT, [A, B]), rh.join(ROOT, B, 2)),
                                               ROOT.public_key))
    assert B.id not in rejoined.members  # a key that was a member never comes back


def test_a_document_is_refused_whole_with_a_reason_when_any_part_is_not_the_roots():
    good = rh.genesis(ROOT, [A, B])
    assert refused(rh.document(rh.genesis(FORGER, [A, B]))) == "members_not_root"
    assert refused(rh.document(good, rh.join(FORGER, C, 1))) == "members_not_root"
    forged = rh.vertex(FORGER, "gateway.join", 1, {"gateway": C.public_key, "name": ""}, creator=ROOT.public_key)
    assert refused(rh.document(good, forged)) == "members_bad_signature"  # claims the root made it
    doc = cbor.loads(rh.join(ROOT, C, 1))
    doc["body"]["name"] = "tampered"
    assert refused(rh.document(good, cbor.dumps(doc))) == "members_bad_signature"
    assert refused(rh.document(rh.join(ROOT, C, 1))) == "members_no_genesis"
    assert refused(rh.document(good, rh.genesis(ROOT, [C]))) == "members_no_genesis"
    other_city = rh.genesis(ROOT, [A, B], name="elsewhere")
    pinned = City.from_document(rh.document(good), ROOT.public_key).genesis.id
    assert refused(rh.document(other_city), genesis=pinned) == "members_other_city"
    enroll = rh.vertex(ROOT, "device.enroll", 1, {"device": C.public_key, "name": "", "policy": "open"})
    for bad in (b"", b"\xff" * 10, cbor.dumps([1, 2]), cbor.dumps({"v": 1, "vertices": []}),
                cbor.dumps({"v": 2, "vertices": [good]}), cbor.dumps({"v": 1, "vertices": ["text"]}),
                rh.document(good, enroll), rh.document(good, rh.vertex(ROOT, "gateway.join", 0, {
                    "gateway": C.public_key, "name": ""})),
                rh.document(good, rh.vertex(ROOT, "gateway.join", 1, {"gateway": b"short", "name": ""})),
                rh.document(good, b"\x00" * 9000)):
        assert refused(bad) == "members_malformed", bad[:40]


# --- choosing the new home, watching the old one --------------------------------------------------------


def test_the_choice_is_deterministic_honours_prefer_and_spreads_devices_evenly_and_stably():
    gateways = [f"{i:032x}" for i in range(4)]
    devices = [f"{i:032x}" for i in range(1000, 3000)]
    chosen = {d: choose_home(d, gateways) for d in devices}
    assert chosen == {d: choose_home(d, list(reversed(gateways))) for d in devices}
    assert all(350 <= list(chosen.values()).count(g) <= 650 for g in gateways)  # 500 each, give or take
    without = {d: choose_home(d, gateways[1:]) for d in devices}
    assert all(without[d] == chosen[d] for d in devices if chosen[d] != gateways[0])  # only g0's devices move
    assert choose_home(devices[0], gateways, prefer=["f" * 32, gateways[2]]) == gateways[2]
    assert choose_home(devices[0], []) is None


def test_the_home_is_quiet_since_it_last_spoke_or_this_device_last_connected():
    watch = HomeWatch(now=100.0)
    assert watch.quiet_for(101.0) == 1.0  # nothing heard yet: from the start
    watch.heard(150.0)
    watch.heard(120.0)  # a late note of something older changes nothing
    assert watch.quiet_for(160.0) == 10.0
    assert watch.quiet_for(140.0) == 0.0


@pytest.mark.parametrize("payload, state", [
    (b'{"state": "running", "round": 3}', "running"), (b'{"state": "offline"}', "offline"),
    (b"", None), (b"not json", None), (b"[1]", None), (b'{"state": 5}', None), (b"\xff\xfe", None),
    (b'{"state": ""}', None), (b"[" * 100000, None), (b"{}" + b" " * (1 << 20), None)])
def test_a_status_says_a_state_or_nothing(payload, state):
    assert status_state(payload) == state


def test_ended_states_and_silence_do_not_serve_anything_else_does():
    assert [serves(s) for s in ("idle", "waiting", "running", "starting", "migrating")] == [True] * 5
    assert [serves(s) for s in ("offline", "stopped", "done", "failed", None)] == [False] * 5


# --- what is kept on disk --------------------------------------------------------------------------------


def test_the_home_round_trips_and_is_forgotten_for_another_configured_gateway_or_when_mangled(tmp_path):
    store = StateStore(tmp_path)
    home = Home(B.id, B.public_key.hex(), A.id, 1.8e9, A.id)
    store.save_home(home)
    assert StateStore(tmp_path).load_home(A.id) == home
    assert store.load_home(C.id) is None  # the device was configured for another gateway since: start over
    assert (tmp_path / "home.json").stat().st_mode & 0o777 == 0o600
    for mangled in ("{", json.dumps({**json.loads((tmp_path / "home.json").read_text()), "key": "zz"}),
                    json.dumps({"gateway": B.id, "configured": A.id})):
        (tmp_path / "home.json").write_text(mangled)
        assert store.load_home(A.id) is None


def test_replies_pending_for_another_gateway_are_dropped(tmp_path):
    store = StateStore(tmp_path)
    device = Identity.generate()
    for gateway, key in ((A.id, "000001-a"), (B.id, "000002-b")):
        ctx = envelope.Context(device.public_key, gateway, 1, key, b"\0" * 32)
        store.put_pending(key, envelope.seal(device, "reply", ctx, {"examples": 1}))
    store.put_pending("000003-junk", b"not an envelope")
    from agent.service import _gateway_of

    assert store.drop_pending_not_for(B.id, _gateway_of) == 2
    assert store.pending_keys() == ["000002-b"]


# --- the config ------------------------------------------------------------------------------------------


GOOD = {"device": {"name": "d", "key": "k", "state_dir": "s"},
        "gateway": {"id": A.id, "public_key": A.public_key.hex(), "root_key": ROOT.public_key.hex()},
        "data": {"replay": "x.npz"}}


def with_city(**city) -> dict:
    return {**GOOD, "city": city}


def test_roaming_is_on_with_the_root_key_by_default_and_configurable(tmp_path):
    config = parse_config(GOOD, tmp_path)
    assert config.roams and config.rehome_after_s == 600.0 and config.city_genesis is None
    assert not parse_config(with_city(rehome_after_s=0), tmp_path).roams
    no_root = {**GOOD, "gateway": {k: v for k, v in GOOD["gateway"].items() if k != "root_key"}}
    assert not parse_config(no_root, tmp_path).roams
    (tmp_path / "genesis.cbor").write_bytes(rh.genesis(ROOT, [A, B]))
    config = parse_config(with_city(genesis="genesis.cbor", prefer=[B.id], rehome_after_s=30), tmp_path)
    assert config.city_genesis == (tmp_path / "genesis.cbor").read_bytes() and config.prefer == (B.id,)
    assert config.rehome_after_s == 30.0


@pytest.mark.parametrize("city, match", [
    ({"rehome_after_s": 0.5}, "city.rehome_after_s"), ({"rehome_after_s": -1}, "city.rehome_after_s"),
    ({"prefer": ["nope"]}, "city.prefer"), ({"prefer": "x"}, "city.prefer"),
    ({"genesis": "missing.cbor"}, "city.genesis"), ({"genesis": "forged.cbor"}, "city.genesis"),
])
def test_a_bad_city_setting_is_refused_naming_it(tmp_path, city, match):
    (tmp_path / "forged.cbor").write_bytes(rh.genesis(FORGER, [A, B]))
    with pytest.raises(ConfigError, match=match):
        parse_config(with_city(**city), tmp_path)


def test_a_city_table_without_the_root_key_is_refused(tmp_path):
    no_root = {**GOOD, "gateway": {k: v for k, v in GOOD["gateway"].items() if k != "root_key"},
               "city": {"rehome_after_s": 60.0}}
    with pytest.raises(ConfigError, match="root_key"):
        parse_config(no_root, tmp_path)


# --- the agent's decision, on an agent that is not running ------------------------------------------


@pytest.fixture(scope="module")
def model():
    return TrainableModel.from_package()


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 128, 6)).astype(np.float32)
    y = rng.integers(0, 7, size=64).astype(np.int32)
    return LocalData(x, y, x[:16], y[:16])


def config_for(state_dir: Path, host: str = "127.0.0.1", port: int = 1, **city) -> AgentConfig:
    return AgentConfig(name="roamer", key=state_dir / "k", state_dir=state_dir, gateway_id=A.id,
                       gateway_public_key=A.public_key, broker_host=host, broker_port=port, replay=None,
                       resend_s=0.5, enroll_retry_s=0.3, gateway_root_key=ROOT.public_key, **city)


def status(state: str) -> bytes:
    return json.dumps({"state": state, "round": 1}).encode()


def roaming_for(state_dir: Path, *members: Identity, **city) -> Roaming:
    """A roaming device's `Roaming`: its city is `members` (its genesis), its home A last spoke at 0 (the
    test's clock)."""
    config = config_for(state_dir, city_genesis=rh.genesis(ROOT, list(members)), **city)
    return Roaming(config, StateStore(config.state_dir), Identity.generate().id, now=0.0)


def watching(*gateways: Identity) -> list[tuple[str, int]]:
    return [(topics.status(g.id), 0) for g in sorted(gateways, key=lambda g: g.id)]


def test_the_device_looks_at_statuses_only_while_the_home_is_quiet_and_moves_at_the_timeout(tmp_path, caplog):
    roaming = roaming_for(tmp_path / "dev", A, B, C, rehome_after_s=10.0)
    assert roaming.check_home(4.0) == HomeCheck()  # a busy home costs nothing
    assert roaming.check_home(5.0) == HomeCheck(subscribe=watching(A))  # half the timeout: the home's status
    assert roaming.keep_status(topics.status(A.id), status("idle"))
    assert roaming.check_home(5.5) == HomeCheck(unsubscribe=[topics.status(A.id)])  # an idle home speaks ...
    assert roaming.quiet_for(5.5) == 0.0
    assert roaming.check_home(6.0) == HomeCheck()  # ... and is let go of until it is quiet again
    assert roaming.check_home(11.0) == HomeCheck(subscribe=watching(A))  # quiet again since 5.5: its status ...
    roaming.keep_status(topics.status(A.id), status("offline"))
    assert roaming.check_home(12.5) == HomeCheck()  # ... which says it is gone (a status that does not serve)
    assert roaming.check_home(13.0) == HomeCheck(subscribe=watching(B, C))  # three quarters: the others' too
    roaming.keep_status(topics.status(B.id), status("stopped"))
    roaming.keep_status(topics.status(C.id), b"garbage")
    caplog.set_level("INFO", logger="starling.agent")
    assert roaming.check_home(15.5) == HomeCheck(refused=["status_malformed"])  # the timeout, nowhere to go
    roaming.check_home(15.6)
    assert roaming.decided_move is None and caplog.text.count("reason=no_member_serving") == 1  # said once
    roaming.keep_status(topics.status(C.id), status("idle"))
    assert roaming.check_home(16.0) == HomeCheck(move=True)
    assert roaming.decided_move == Move(C.id, "quiet", 10.5)
    assert roaming.check_home(30.0) == HomeCheck()  # decided: the worker is on it


def test_a_home_that_says_it_serves_is_never_left_and_one_the_operator_retired_is_left_at_once(tmp_path):
    roaming = roaming_for(tmp_path / "dev", A, B, rehome_after_s=10.0)
    for now in range(5, 10_000, 5):
        roaming.check_home(float(now))
        roaming.keep_status(topics.status(A.id), status("running"))
        roaming.check_home(now + 0.5)
    assert roaming.decided_move is None
    roaming.learn_members(rh.document(rh.genesis(ROOT, [A, B]), rh.leave(ROOT, A, 1)))
    assert roaming.check_home(10_000.0) == HomeCheck(subscribe=watching(B))  # asks for B's status at once
    roaming.keep_status(topics.status(B.id), status("idle"))
    assert roaming.check_home(10_000.5).move
    assert roaming.decided_move == Move(B.id, "left_city", 5.0)
    roaming.learn_members(rh.document(rh.genesis(ROOT, [A, B]), rh.leave(ROOT, A, 1), rh.leave(ROOT, B, 2)))
    assert roaming.next_move() is None and roaming.decided_move is None  # B left too: the loop decides again


def decide_to_move(roaming: Roaming, to: Identity) -> None:
    """Make `roaming` decide to move to `to`: its home quiet for much longer than the timeout, `to` serving."""
    later = time.monotonic() + 3600.0
    roaming.check_home(later)  # asks for the members' statuses
    roaming.keep_status(topics.status(to.id), status("idle"))
    assert roaming.check_home(later).move and roaming.decided_move.to == to.id


def test_the_agent_counts_refused_statuses_and_asks_its_worker_to_move(tmp_path, model, data):
    config = config_for(tmp_path / "dev", rehome_after_s=10.0, city_genesis=rh.genesis(ROOT, [A, B]))
    agent = Agent(config, Identity.generate(), model, data)
    later = time.monotonic() + 3600.0
    agent._roam(later)  # quiet for the whole timeout: A's and B's statuses are asked for
    agent._on_message(Message(topics.status(A.id), b"garbage", time.time()))
    agent._on_message(Message(topics.status(B.id), status("idle"), time.time()))
    assert agent._inbox.empty()  # statuses are the loop's, not the worker's
    agent._roam(later + 0.5)
    assert agent.counters.refused_tasks == {"status_malformed": 1}
    assert agent.roaming.decided_move.to == B.id and agent._inbox.get_nowait()[0] == REHOME


def test_the_move_keeps_the_new_home_and_a_fresh_state_on_disk_and_a_restart_wakes_up_there(tmp_path, model, data):
    config = config_for(tmp_path / "dev", rehome_after_s=10.0)
    StateStore(config.state_dir).save(AgentState(A.id, True, 9, ["000009-t"], "ab" * 32, 2e9))
    device = Identity.generate()
    ctx = envelope.Context(device.public_key, A.id, 9, "train-9", b"\0" * 32)
    StateStore(config.state_dir).put_pending("000009-t", envelope.seal(device, "reply", ctx, {"examples": 1}))
    agent = Agent(config, device, model, data)
    agent._handle_members(rh.document(rh.genesis(ROOT, [A, B]), rh.rotate(ROOT, B, C2, 1)))
    decide_to_move(agent.roaming, B)
    try:
        agent._rehome()
    finally:
        agent.conn.close()
    assert (agent.roaming.home, agent.gateway_key, agent.t_task) == (B.id, C2.public_key, topics.task(B.id, device.id))
    assert agent.state == AgentState(B.id, retired_keys=[B.public_key.hex()])  # B's lineage: from any version
    assert agent.store.pending_keys() == []  # A's reply: nobody can take it now
    assert agent.roaming.decided_move is None  # made
    again = Agent(config, device, model, data)
    assert (again.roaming.home, again.gateway_key, again.state.gateway) == (B.id, C2.public_key, B.id)
    moved = json.loads((config.state_dir / "home.json").read_text())
    assert (moved["gateway"], moved["previous"], moved["configured"]) == (B.id, A.id, A.id)


# --- a running agent on a real broker, two gateways played by hand ----------------------------------------


class TwoGateways:
    """Gateways A and B played by hand: retained statuses and membership, B's signed releases and tasks."""

    def __init__(self, broker: Broker) -> None:
        self.seen: queue.Queue = queue.Queue()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="city")
        self.client.on_message = lambda _c, _u, m: self.seen.put((m.topic, m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe([(f"starling/{B.id}/+/+", 1)])  # B's side: enroll, online, reply
        time.sleep(0.2)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def status(self, gateway: Identity, state: str) -> None:
        self.publish(topics.status(gateway.id), status(state), retain=True)

    def next(self, kind: str, timeout: float = 20.0) -> tuple[str, bytes]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                topic, payload = self.seen.get(timeout=0.2)
            except queue.Empty:
                continue
            if topic.split("/")[2] == kind:
                return topic, payload
        raise AssertionError(f"no {kind} at B within {timeout} s")

    def train_at_b(self, device: Identity, weights, version: int) -> None:
        model = schemas.encode_model(weights)
        body = {"version": version, "architecture": "", "size": len(model), "chunks": 1, "expires": time.time() + 3600}
        release = envelope.seal(B, "model", envelope.Context(B.public_key, B.id, version, "model", b""), body, model)
        digest = envelope.decode(release).body["digest"]
        self.publish(topics.model(B.id, digest.hex()), release, retain=True)
        config = schemas.TrainConfig(epochs=1, batch_size=32, lr=0.1, deadline=time.time() + 60)
        task = schemas.Task("train", device.id, config, "i8").to_body()
        self.publish(topics.task(B.id, device.id),
                     envelope.seal(B, "task", envelope.Context(B.public_key, B.id, 1, "train-1", digest), task))

    def close(self) -> None:
        for gateway in (A, B):  # retained messages outlive the test otherwise
            self.publish(topics.status(gateway.id), b"", retain=True)
            self.publish(topics.members(gateway.id), b"", retain=True)
        self.client.loop_stop()
        self.client.disconnect()


def wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, what
        time.sleep(0.05)


def test_a_device_whose_gateway_goes_offline_rehomes_takes_the_new_lineage_and_trains_there(tmp_path, model, data):
    with Broker(tmp_path / "broker") as broker:
        city = TwoGateways(broker)
        device = Identity.generate()
        config = config_for(tmp_path / "dev", broker.host, broker.port, rehome_after_s=1.0)
        StateStore(config.state_dir).save(AgentState(A.id, enrolled=True, trusted_version=9))
        city.status(A, "running")
        city.status(B, "offline")
        forged = rh.document(rh.genesis(FORGER, [A, B]))
        city.publish(topics.members(A.id), forged, retain=True)
        agent = Agent(config, device, model, data)
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        thread.start()
        try:
            wait_for(lambda: agent.counters.refused_tasks.get("members_not_root") == 1, 10, "forgery counted")
            assert agent.roaming.city is None and not (config.state_dir / "members.cbor").exists()
            city.publish(topics.members(A.id), rh.document(rh.genesis(ROOT, [A, B])), retain=True)
            wait_for(lambda: agent.roaming.city is not None, 10, "the root's document taken")
            gone = time.monotonic()
            city.status(A, "offline")
            time.sleep(2.0)
            assert agent.roaming.home == A.id  # nobody else serves: the device waits
            city.status(B, "idle")
            wait_for(lambda: agent.roaming.home == B.id, 10, "re-homed to B")
            assert time.monotonic() - gone >= 1.0
            assert city.next("online") == (topics.online(B.id, device.id), b"1")  # its birth, and its will, at B
            _, request = city.next("enroll")  # enrolled at A, it asks B afresh: B's policy decides
            assert envelope.decode(request).ctx.gateway == B.id
            city.train_at_b(device, model.get_weights(), version=1)  # B's lineage is at 1; A's was at 9
            _, reply = city.next("reply", timeout=30)
            assert envelope.decode(reply).ctx.gateway == B.id
            assert agent.counters.refused_tasks == {"members_not_root": 1}
        finally:
            stop.set()
            thread.join(20)
            city.close()
    assert StateStore(config.state_dir).load(B.id).trusted_version == 1
    assert Agent(config, device, model, data).roaming.home == B.id  # a restart wakes up at the new home
