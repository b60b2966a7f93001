"""Write the replay corpus: one real message per rejection reason the project defines.

    PYTHONPATH=. python tests/hostile/make_corpus.py     # rewrites tests/hostile/corpus/

Deterministic: fixed keys (world.py), fixed times, no randomness; Ed25519
signatures are deterministic, so the same bytes come out on every run. Each
file is checked here against the state it is meant for (the `*_state`
functions below, which test_corpus.py uses too) before it is written, and
`corpus/index.json` lists, per file, the surface, the topic, the reason,
any messages that must go first (a replay needs the original accepted first)
and, for a reply, the round the gateway moved on to before the file arrives
(`moved_on_to`: the same reply in its own round is an honest duplicate, not a
replay).

Surfaces: `reply` (gateway/ingest.py's reasons: stage 1 `Authenticator`, stage 2
`admission.admit` on a `RoundBook`, through the `ReplyIntake`), `enroll` (gateway/devices.py
`Enrollment`), `gossip` (ledger gossip refusals: ledger/errors.py reasons
and decoding reasons), `agent` (task, receipt and model-release refusals).
Reasons no message can produce are listed in `index.json` under
"not_producible" with why.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cbor2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import world

from gateway.devices import DeviceRegistry, Enrollment
from gateway.ingest import EVALUATE_METRICS, Authenticator, OpenTask, Outcome
from gateway.intake import ReplyIntake
from gateway.outbox import Outbox
from gateway.rounds import RoundBook
from ledger import gossip as g
from ledger.store import Ledger
from ledger.vertex import sign as sign_vertex
from protocol import cbor, envelope, schemas, topics
from protocol.digest import sha256

CORPUS = HERE / "corpus"
VERTEX_TIME = 1_800_000_000.0

NOT_PRODUCIBLE = {
    "reply/internal_error": "the intake's and the round book's catch-all for a bug in a check itself: no "
                            "well-behaved check raises, so no message produces it (the floods assert it never "
                            "appears)",
    "enroll/digest_mismatch": "an enroll body may not carry `digest`, so a request with an attachment is refused "
                              "as schema before its attachment is ever hashed",
    "reply/deferred": "not a rejection: a reply to a round a crash interrupted, kept until the round re-opens "
                      "(it needs a journal with an interrupted round, not a message)",
    "reply/duplicate": "not a rejection: reply/replay.cbor sent again while its round is still the current one "
                       "(an agent's at-least-once re-send) is acknowledged again and counted as a duplicate",
    "gossip/internal": "the catch-all for a bug in Gossip (bug 1, a want beyond SQLite integers, reached it; fixed)",
    "gossip/store": "an SQLite failure (disk full, locked database), not a property of a message",
    "gossip/pending_overflow": "producible only by volume: 20,001 signed vertices whose parents never come",
    "gossip/missing_parent, not_initialized": "not refusals: such vertices wait in `pending` for their parents",
    "gossip/equivocation": "not a refusal: a second vertex with a used seq is admitted as evidence and flagged",
    "gossip/no_identity, already_initialized (local)": "raised by local calls on a store, not by gossip "
                                                       "(a second genesis from the network is covered)",
    "agent/model_unavailable": "no message: the release never arrives within MODEL_WAIT_S (test_corpus.py "
                               "checks it with a short wait and no release)",
}


# --- the states each surface's files are made for ------------------------------------------------


class _Link:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic, payload, retain=False, counted=True):
        self.sent.append((topic, payload))


@dataclass
class ReplyState:
    """The gateway's reply path (stage 1, the round book, the intake with its receipts) in one state."""

    book: RoundBook
    intake: ReplyIntake
    link: _Link

    def open(self, round_: int, task: str, deadlines: dict) -> None:
        """An exchange of `round_`, as the grid opens it when it pushes that round's tasks."""
        self.book.open("train", round_, task, world.BASE, 1, [
            OpenTask(f"m-{device.id}-{task}", device.id, device.public_key, "train", round_, task, world.BASE,
                     world.BASE_WEIGHTS, deadline) for device, deadline in deadlines.items()])


def reply_state() -> ReplyState:
    """A gateway in round 3: DEVICE has an open train task, HOSTILE one whose deadline passed."""
    enrolled = {world.DEVICE.public_key, world.HOSTILE.public_key, world.REVOKED.public_key}
    is_revoked = lambda key: key == world.REVOKED.public_key
    authenticator = Authenticator(world.GATEWAY.id, enrolled.__contains__, is_revoked, max_reply_bytes=64 * 1024)
    book = RoundBook(None, authenticator.authenticate, is_revoked, EVALUATE_METRICS, lambda items: None)
    link = _Link()
    state = ReplyState(book, ReplyIntake(authenticator, book, Outbox(world.GATEWAY, world.GATEWAY.id, link.publish)),
                       link)
    # The gateway's clock is the real one: PAST is a deadline that always passed, FAR one that never does.
    state.open(world.ROUND, world.TASK, {world.DEVICE: world.FAR, world.HOSTILE: world.PAST})
    return state


def check_reply(state: ReplyState, topic: str, payload: bytes) -> Outcome:
    (outcome,) = state.intake.handle([(topic, payload, None)])
    return outcome


def replay_reply(entry: dict, by_file: dict[str, dict], payload_of: Callable[[str], bytes]) -> tuple[Outcome, ReplyState]:
    """A reply file's outcome in a fresh `reply_state`, and that state: after the messages that go first and,
    if the entry says so, after the gateway moved on to a later round (it pushed that round's tasks)."""
    state = reply_state()
    for name in entry["before"]:
        check_reply(state, by_file[name]["topic"], payload_of(name))
    if "moved_on_to" in entry:
        later = entry["moved_on_to"]
        state.open(later, f"train-{later}-hostile", {world.DEVICE: world.FAR})
    return check_reply(state, entry["topic"], payload_of(entry["file"])), state


def reply_outcome(entry: dict, by_file: dict[str, dict], payload_of: Callable[[str], bytes]) -> Outcome:
    return replay_reply(entry, by_file, payload_of)[0]


@dataclass
class EnrollState:
    """A gateway's enrollment handler with its device registry, its ledger and a recording publish."""

    enrollment: Enrollment
    registry: DeviceRegistry
    ledger: Ledger
    link: _Link

    def close(self) -> None:
        self.ledger.close()


def enroll_state(folder: Path, policy: str) -> EnrollState:
    """The gateway's enrollment (not a running gateway: its enroll handler only) with the voucher or
    allow-list policy; REVOKED was enrolled once and revoked."""
    folder.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(folder / "ledger.db", world.GATEWAY)
    ledger.init_genesis("gw", [world.GATEWAY.public_key])
    registry = DeviceRegistry()
    registry.revoke(world.REVOKED.public_key)
    link = _Link()
    enrollment = Enrollment(world.GATEWAY.id, policy, (world.DEVICE.public_key,), (world.OPERATOR.public_key,),
                            registry, Outbox(world.GATEWAY, world.GATEWAY.id, link.publish), ledger.enroll_device)
    return EnrollState(enrollment, registry, ledger, link)


def enroll_outcome(state: EnrollState, topic: str, payload: bytes) -> str:
    before = dict(state.enrollment.rejections)
    state.enrollment.handle(topic, payload)
    new = {k: v - before.get(k, 0) for k, v in state.enrollment.rejections.items() if v != before.get(k, 0)}
    return next(iter(new)) if new else "accepted"


class _FixedClock:
    """Stands in for the `time` module in ledger/vertex.py while the corpus ledgers are written, so
    their vertices (whose ids cover their timestamps) come out the same on every run."""

    def __init__(self) -> None:
        self.now = VERTEX_TIME

    def time(self) -> float:
        self.now += 1.0
        return self.now


def gossip_state(folder: Path):
    import ledger.vertex

    real, ledger.vertex._time = ledger.vertex._time, _FixedClock()
    try:
        return _gossip_state(folder)
    finally:
        ledger.vertex._time = real


def _gossip_state(folder: Path):
    """Ledger A (this gateway, the root) and B (a member peer): B enrolled DEVICE and HOSTILE, recorded one
    update and revoked HOSTILE; A has all of it. Returns (A, its Gossip, B, the genesis)."""
    folder.mkdir(parents=True, exist_ok=True)
    a = Ledger(folder / "a.db", world.GATEWAY)
    genesis = a.init_genesis("city", [world.GATEWAY.public_key, world.PEER.public_key])
    b = Ledger(folder / "b.db", world.PEER)
    b.insert_vertex(genesis)
    b.enroll_device(world.DEVICE.public_key, "dev", "open")
    b.enroll_device(world.HOSTILE.public_key, "hostile", "open")
    sealed = envelope.open_verified(world.reply(world.DEVICE, gateway=world.PEER.id), "reply")
    b.record_updates(world.PEER.id, world.ROUND, world.TASK, world.BASE,
                     [(world.DEVICE.public_key, sealed.body["digest"], 16, sealed.sig)])
    b.revoke_device(world.HOSTILE.public_key, "stolen")
    gossip = g.Gossip(a, world.GATEWAY.id, lambda *args: None)
    for vertex in b.vertices():
        gossip.handle(g.vertex_topic(world.PEER.id), vertex.encode())
    assert not gossip.refused and not gossip.pending
    return a, gossip, b, genesis


def gossip_outcome(gossip, topic: str, payload: bytes) -> str:
    before = dict(gossip.refused)
    gossip.handle(topic, payload)
    new = {k: v - before.get(k, 0) for k, v in gossip.refused.items() if v != before.get(k, 0)}
    return next(iter(new)) if new else "not refused"


# --- the files --------------------------------------------------------------------------------------


def _reencode(wire: bytes, change) -> bytes:
    doc = cbor2.loads(wire)
    change(doc)
    return cbor.dumps(doc)


def _unsorted(wire: bytes) -> bytes:
    """The same envelope with its map keys in reverse order: well-formed, not deterministic CBOR."""
    doc = cbor2.loads(wire)
    return cbor2.dumps(dict(reversed(list(doc.items()))))


def _update(delta=None, metrics=None, codec="i8") -> bytes:
    return schemas.encode_update(world.delta() if delta is None else delta,
                                 world.TRAIN_METRICS if metrics is None else metrics, codec)


def reply_files() -> list[dict]:
    d = world.DEVICE
    me, topic_of = world.reply(d), lambda who: topics.reply(world.GATEWAY.id, who.id)
    bad_tensor = cbor2.loads(_update(codec="f32"))
    bad_tensor["tensors"][0]["data"] = bad_tensor["tensors"][0]["data"][:-4]
    nan_doc = cbor2.loads(_update(codec="f32"))  # the encoder refuses NaN: put it in by hand
    nan_doc["tensors"][0]["data"] = np.full(12, np.nan, "<f4").tobytes()
    nan_update = cbor.dumps(nan_doc)
    files = [
        ("malformed", d, b"\xff\x00not cbor"),
        ("non_canonical", d, _unsorted(me)),
        ("schema", d, cbor.dumps({"hello": "gateway"})),
        ("topic_mismatch", d, world.reply(world.HOSTILE)),
        ("wrong_gateway", d, world.reply(d, gateway=world.PEER.id)),
        ("revoked", world.REVOKED, world.reply(world.REVOKED)),
        ("unknown_device", world.STRANGER, world.reply(world.STRANGER)),
        ("bad_signature", d, _reencode(me, lambda doc: doc.__setitem__("sig", bytes(64)))),
        ("digest_mismatch", d, _reencode(me, lambda doc: doc.__setitem__("att", _update(world.delta(0.5))))),
        ("limits", d, world.reply(d, examples=schemas.MAX_EXAMPLES + 1)),
        ("bad_tensor", d, world.reply(d, update=cbor.dumps(bad_tensor))),
        ("non_finite", d, world.reply(d, update=nan_update)),
        ("conflicting_reply", d, world.reply(d, update=_update(world.delta(0.5))), ["reply/accepted.cbor"]),
        ("replay", d, me, ["reply/accepted.cbor"], world.ROUND + 1),  # in round 3 itself: a duplicate
        ("stale_round", d, world.reply(d, round_=world.ROUND - 1, task="train-2-old")),
        ("not_selected", d, world.reply(d, task="train-3-other")),
        ("wrong_round", d, world.reply(d, round_=world.ROUND + 1)),
        ("wrong_base", d, world.reply(d, base=bytes(32))),
        ("late", world.HOSTILE, world.reply(world.HOSTILE)),
        ("wrong_shape", d, world.reply(d, update=_update({"w": np.zeros((3, 3), np.float32),
                                                          "b": np.zeros(3, np.float32)}))),
        ("wrong_metrics", d, world.reply(d, update=_update(metrics={"train_loss": 0.5}))),
        ("wrong_codec", d, world.reply(d, update=_update(codec="f16"))),  # the task asked for i8
    ]
    out = [{"surface": "reply", "file": "reply/accepted.cbor", "topic": topic_of(d), "reason": "accepted",
            "bytes": me, "before": []}]
    for reason, sender, payload, *rest in files:
        entry = {"surface": "reply", "file": f"reply/{reason}.cbor", "topic": topic_of(sender), "reason": reason,
                 "bytes": payload, "before": rest[0] if rest else []}
        if len(rest) > 1:
            entry["moved_on_to"] = rest[1]
        out.append(entry)
    return out


def enroll_files() -> list[dict]:
    def on(who):
        return topics.enroll(world.GATEWAY.id, who.id)

    s = world.STRANGER
    good = world.enroll(s, voucher_bytes=world.voucher(s))
    files = [
        ("malformed", "voucher", on(s), b"\x9f\x01"),
        ("non_canonical", "voucher", on(s), _unsorted(good)),
        ("schema", "voucher", on(s), world.reply(s)),  # a reply on the enroll topic
        ("limits", "voucher", on(s), world.enroll(s, name="x" * 64, voucher_bytes=b"")[:0] + cbor.dumps(
            {"pad": bytes(5000)})),
        ("non_finite", "voucher", on(s), _reencode_enroll_time(s, float("nan"))),
        ("bad_signature", "voucher", on(s), _reencode(good, lambda doc: doc.__setitem__("sig", bytes(64)))),
        ("topic_mismatch", "voucher", on(world.DEVICE), good),
        ("wrong_gateway", "voucher", on(s), world.enroll(s, gateway=world.PEER.id, voucher_bytes=world.voucher(s))),
        ("revoked", "voucher", on(world.REVOKED), world.enroll(world.REVOKED, voucher_bytes=world.voucher(
            world.REVOKED))),
        ("not_allowed", "allowlist", on(s), world.enroll(s)),
        ("no_voucher", "voucher", on(s), world.enroll(s)),
        ("bad_voucher", "voucher", on(s), world.enroll(s, voucher_bytes=world.voucher(s, operator=world.ROGUE))),
    ]
    return [{"surface": "enroll", "file": f"enroll/{reason}.cbor", "policy": policy, "topic": topic,
             "reason": reason, "bytes": payload, "before": []} for reason, policy, topic, payload in files]


def _reencode_enroll_time(identity, when: float) -> bytes:
    """A request whose signed time is NaN (sealed by hand: the builder would refuse)."""
    ctx = envelope.Context(identity.public_key, world.GATEWAY.id, 0, "enroll", b"")
    body = {"name": "dev", "time": when}
    sig = identity.sign(envelope.DOMAIN + cbor2.dumps({"v": 1, "type": "enroll", "ctx": ctx.to_wire(),
                                                       "body": body}, canonical=True))
    return cbor2.dumps({"v": 1, "type": "enroll", "ctx": ctx.to_wire(), "body": body, "sig": sig}, canonical=True)


def gossip_files(folder: Path) -> list[dict]:
    import ledger.vertex

    real, ledger.vertex._time = ledger.vertex._time, _FixedClock()
    try:
        return _gossip_files(folder)
    finally:
        ledger.vertex._time = real


def _gossip_files(folder: Path) -> list[dict]:
    a, _, b, genesis = _gossip_state(folder)
    last = list(b.vertices())[-1]
    seq, parents = last.seq + 1, [last.id]
    by_kind = {}
    for vertex in b.vertices():
        by_kind.setdefault(vertex.kind, vertex)  # the first of each kind: DEVICE's enrollment
    peer_vertex = lambda kind, body, **kw: sign_vertex(world.PEER, kind, kw.get("seq", seq),
                                                       kw.get("parents", parents), body, VERTEX_TIME).encode()
    updates = by_kind["updates"].body
    record = list(updates["records"][0])
    forged = [record[0], sha256(b"another update"), record[2], record[3]]  # the device never signed this digest
    scratch = Ledger(folder / "scratch.db", world.PEER)  # templates for bodies the real ledgers cannot write
    scratch.init_genesis("scratch", [world.PEER.public_key])
    join_body = scratch.join_gateway(world.ROGUE.public_key, "rogue").body
    scratch.enroll_device(world.STRANGER.public_key, "s", "open")
    checkpoint_body = dict(scratch.write_checkpoint().body)
    checkpoint_body["count"] = checkpoint_body["count"] + 100
    vertex_doc = cbor2.loads(last.encode())
    too_many_parents = dict(vertex_doc, parents=[bytes([i // 256, i % 256]) + bytes(30) for i in range(300)])
    nan_time = dict(vertex_doc, time=float("nan"))
    root_join = sign_vertex(world.GATEWAY, "gateway.join", 1, sorted([genesis.id, last.id]),
                            {"gateway": world.PEER.public_key, "name": "again"}, VERTEX_TIME).encode()
    rogue = sign_vertex(world.ROGUE, "device.enroll", 0, [genesis.id], by_kind["device.enroll"].body,
                        VERTEX_TIME).encode()
    files = [
        ("malformed", g.vertex_topic(world.PEER.id), last.encode()[:-7]),
        ("non_canonical", g.vertex_topic(world.PEER.id), cbor2.dumps(dict(reversed(list(vertex_doc.items()))))),
        ("schema", g.vertex_topic(world.PEER.id), cbor.dumps(dict(vertex_doc, kind="device.adopt"))),
        ("limits", g.vertex_topic(world.PEER.id), cbor.dumps(too_many_parents)),
        ("non_finite", g.vertex_topic(world.PEER.id), cbor2.dumps(nan_time, canonical=True)),
        ("bad_signature", g.vertex_topic(world.PEER.id), cbor.dumps(dict(cbor2.loads(peer_vertex(
            "device.enroll", {"device": world.STRANGER.public_key, "name": "s", "policy": "open"})), sig=bytes(64)))),
        ("not_a_gateway", g.vertex_topic(world.ROGUE.id), rogue),
        ("bad_sequence", g.vertex_topic(world.PEER.id), peer_vertex("device.enroll", {
            "device": world.STRANGER.public_key, "name": "s", "policy": "open"}, seq=seq + 1)),
        ("invalid_vertex", g.vertex_topic(world.PEER.id), peer_vertex("device.enroll", {
            "device": world.STRANGER.public_key, "name": "s", "policy": "open"}, parents=[])),
        ("already_initialized", g.vertex_topic(world.ROGUE.id), sign_vertex(
            world.ROGUE, "genesis", 0, [], dict(genesis.body), VERTEX_TIME).encode()),
        ("already_enrolled", g.vertex_topic(world.PEER.id), peer_vertex("device.enroll",
                                                                         dict(by_kind["device.enroll"].body))),
        ("revoked", g.vertex_topic(world.PEER.id), peer_vertex("device.enroll", {
            "device": world.HOSTILE.public_key, "name": "back", "policy": "open"})),
        ("unknown_device", g.vertex_topic(world.PEER.id), peer_vertex("device.revoke", {
            "device": world.STRANGER.public_key, "reason": "never enrolled"})),
        ("already_revoked", g.vertex_topic(world.PEER.id), peer_vertex("device.revoke", {
            "device": world.HOSTILE.public_key, "reason": "again"})),
        ("duplicate_update", g.vertex_topic(world.PEER.id), peer_vertex("updates", dict(updates))),
        ("bad_device_signature", g.vertex_topic(world.PEER.id), peer_vertex("updates", dict(
            updates, records=[forged]))),
        ("wrong_gateway", g.vertex_topic(world.PEER.id), peer_vertex("updates", dict(updates,
                                                                                      gateway=world.GATEWAY.id))),
        ("unknown_input", g.vertex_topic(world.PEER.id), peer_vertex("aggregate", {
            "round": world.ROUND, "strategy": "FedAvg", "base": world.BASE, "inputs": [sha256(b"nobody's")],
            "output": sha256(b"out")})),
        ("not_root", g.vertex_topic(world.PEER.id), peer_vertex("gateway.join", dict(join_body))),
        ("membership", g.vertex_topic(world.GATEWAY.id), root_join),
        ("bad_checkpoint", g.vertex_topic(world.PEER.id), peer_vertex("checkpoint", checkpoint_body)),
    ]
    a.close()
    b.close()
    scratch.close()
    return [{"surface": "gossip", "file": f"gossip/{reason}.cbor", "topic": topic, "reason": reason,
             "bytes": payload, "before": []} for reason, topic, payload in files]


def agent_files() -> list[dict]:
    d = world.DEVICE
    other = schemas.encode_model({"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)})
    wrong_shape = schemas.encode_model({"w": np.ones((2, 2), np.float32)})
    shape_task = world.task(d, task_id="train-3-shape", base=sha256(wrong_shape))
    fresh = world.task(d, task_id="train-3-fresh")
    tasks = [
        ("malformed", "task", b"\x00\x01"),
        ("schema", "task", cbor.dumps({"not": "an envelope"})),
        ("protocol_error", "task", world.receipt(d)),  # a receipt on the task topic
        ("not_from_gateway", "task", world.task(d, signer=world.ROGUE)),
        ("wrong_gateway", "task", world.task(d, gateway=world.PEER.id)),
        ("bad_signature", "task", _reencode(fresh, lambda doc: doc.__setitem__("sig", bytes(64)))),
        ("not_for_this_device", "task", world.task(world.STRANGER)),
        ("deadline_passed", "task", world.task(d, task_id="train-3-old", deadline=world.PAST)),
        ("not_for_this_device", "receipt", world.receipt(world.STRANGER)),
    ]
    out = [{"surface": "agent", "file": f"agent/{reason}{'' if kind == 'task' else '_receipt'}.cbor",
            "topic": kind, "reason": reason, "bytes": payload, "before": []} for reason, kind, payload in tasks]
    releases = [
        ("bad_option", fresh[:0] + world.task(d, task_id="train-3-mu", options={"proximal-mu": -1.0}), None),
        ("model_digest_mismatch", fresh, world.release(model=other)),
        ("model_expired", fresh, world.release(expires=world.PAST)),
        ("model_architecture_mismatch", fresh, world.release(architecture="ff" * 32)),
        ("model_rollback", fresh, world.release(version=1)),
        ("model_shape_mismatch", shape_task, world.release(model=wrong_shape)),
    ]
    for reason, task, release in releases:
        entry = {"surface": "agent", "file": f"agent/{reason}.cbor", "topic": "task", "reason": reason,
                 "bytes": task, "before": []}
        if reason == "bad_option":  # the task itself is the hostile message; the real release goes with it
            entry["release"] = "agent/good_release.cbor"
        else:
            entry["file"], entry["bytes"] = f"agent/{reason}.release.cbor", release
            entry["task"] = f"agent/{reason}.task.cbor"
            entry["task_bytes"] = task
        out.append(entry)
    out.append({"surface": "agent-support", "file": "agent/good_release.cbor", "bytes": world.release()})
    return out


def build(folder: Path) -> list[dict]:
    return reply_files() + enroll_files() + gossip_files(folder / "gossip") + agent_files()


def verify(entries: list[dict], folder: Path) -> None:
    """Every file is refused for its reason in the state it was made for (the test does this again)."""
    by_file = {e["file"]: e for e in entries}
    for e in entries:
        if e["surface"] == "reply" and e["reason"] != "accepted":
            outcome = reply_outcome(e, by_file, lambda name: by_file[name]["bytes"])
            assert getattr(outcome, "reason", "accepted") == e["reason"], (e["file"], outcome)
        elif e["surface"] == "enroll":
            state = enroll_state(folder / "enroll" / e["reason"], e["policy"])
            got = enroll_outcome(state, e["topic"], e["bytes"])
            state.close()
            assert got == e["reason"], (e["file"], got)
        elif e["surface"] == "gossip":
            a, gossip, b, _ = gossip_state(folder / "verify" / e["reason"])
            got = gossip_outcome(gossip, e["topic"], e["bytes"])
            a.close()
            b.close()
            assert got == e["reason"], (e["file"], got, gossip.refused, len(gossip.pending))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        entries = build(Path(tmp))
        verify(entries, Path(tmp))
    index = []
    for e in entries:
        for key, data_key in (("file", "bytes"), ("task", "task_bytes")):
            if key in e:
                path = CORPUS / e[key]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(e[data_key])
        index.append({k: v for k, v in e.items() if k not in ("bytes", "task_bytes")})
    doc = {"generated_by": "tests/hostile/make_corpus.py", "entries": index, "not_producible": NOT_PRODUCIBLE}
    (CORPUS / "index.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(index)} entries to {CORPUS}")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"{time.monotonic() - started:.1f} s")
