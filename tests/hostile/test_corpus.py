"""The replay corpus: each file in tests/hostile/corpus/ is a real message refused for exactly its reason.

`make_corpus.py` wrote the files (deterministically) and `corpus/index.json`
names each one's surface, topic and reason; here each file is replayed into a
fresh copy of the state it was made for and must be refused with that reason,
counted once, and nothing else. Every reason the project defines is either in
the corpus or listed in the index as not producible by a message, with why.
"""

from __future__ import annotations

import json
from pathlib import Path

import make_corpus
import pytest
import world
from agent_rig import Rig, make_agent
from test_gateway_over_broker import ENROLL_REASONS
from test_gateway_replies import REPLY_REASONS

CORPUS = Path(__file__).parent / "corpus"
INDEX = json.loads((CORPUS / "index.json").read_text())
ENTRIES = [e for e in INDEX["entries"] if e["surface"] in ("reply", "enroll", "gossip", "agent")
           and e["reason"] != "accepted"]
BY_FILE = {e["file"]: e for e in INDEX["entries"]}
AGENT_REASONS = {"malformed", "schema", "protocol_error", "bad_signature", "not_from_gateway", "wrong_gateway",
                 "not_for_this_device", "deadline_passed", "bad_option", "model_unavailable",
                 "model_digest_mismatch", "model_expired", "model_architecture_mismatch", "model_rollback",
                 "model_shape_mismatch"}
GOSSIP_LEDGER_REASONS = {"bad_signature", "not_a_gateway", "bad_sequence", "invalid_vertex", "already_initialized",
                         "already_enrolled", "revoked", "unknown_device", "already_revoked", "duplicate_update",
                         "bad_device_signature", "wrong_gateway", "unknown_input", "not_root", "membership",
                         "bad_checkpoint"}


def read(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def replay_agent(entry: dict, tmp_path: Path) -> dict[str, int]:
    agent = make_agent(tmp_path / "dev")
    agent.state.trusted_version = 5  # it already trusts release 5: version 1 is a rollback
    rig = Rig(agent)
    try:
        if "task" in entry:  # the hostile message is the release answering this task's model fetch
            rig.deliver(agent.t_task, read(entry["task"]))
            rig.answer_fetch(read(entry["file"]), digest=None)
        else:
            rig.deliver(agent.t_receipt if entry["topic"] == "receipt" else agent.t_task, read(entry["file"]))
            if "release" in entry:
                rig.answer_fetch(read(entry["release"]), digest=None)
        rig.wait_refused(1, timeout=15)
        rig.idle()
    finally:
        rig.close()
    assert agent.counters.replies_sent == 0
    return dict(agent.counters.refused_tasks)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_each_corpus_file_is_refused_for_exactly_its_reason(entry, tmp_path):
    reason, payload = entry["reason"], read(entry["file"])
    if entry["surface"] == "reply":
        outcome, state = make_corpus.replay_reply(entry, BY_FILE, read)
        assert getattr(outcome, "reason", "accepted") == reason, outcome
        assert reason in REPLY_REASONS
        assert state.book.rejections == {reason: 1} and state.book.duplicates == 0  # counted once, nothing else
    elif entry["surface"] == "enroll":
        state = make_corpus.enroll_state(tmp_path, entry["policy"])
        try:
            make_corpus.enroll_outcome(state, entry["topic"], payload)
            assert state.enrollment.rejections == {reason: 1}
            assert state.registry.keys()[0] == [] and state.ledger.enrolled_devices() == {}  # nobody enrolled
        finally:
            state.close()
    elif entry["surface"] == "gossip":
        a, gossip, b, _ = make_corpus.gossip_state(tmp_path)
        try:
            ids = a.ids()
            gossip.handle(entry["topic"], payload)
            assert gossip.refused == {reason: 1} and not gossip.pending
            assert a.ids() == ids
        finally:
            a.close()
            b.close()
    else:
        assert replay_agent(entry, tmp_path) == {reason: 1}


def test_the_replayed_reply_in_its_own_round_is_a_duplicate_not_a_rejection():
    from gateway.ingest import Duplicate

    entry = {k: v for k, v in BY_FILE["reply/replay.cbor"].items() if k != "moved_on_to"}
    outcome, state = make_corpus.replay_reply(entry, BY_FILE, read)
    assert isinstance(outcome, Duplicate)
    assert state.book.duplicates == 1 and state.book.rejections == {}


def test_a_model_that_never_arrives_is_refused_as_unavailable(tmp_path, monkeypatch):
    import agent.downloads

    monkeypatch.setattr(agent.downloads, "MODEL_WAIT_S", 0.3)
    agent_ = make_agent(tmp_path / "dev")
    rig = Rig(agent_)
    try:
        rig.deliver(agent_.t_task, world.task(world.DEVICE, task_id="train-3-fresh"))
        rig.wait_refused(1, timeout=10)
    finally:
        rig.close()
    assert agent_.counters.refused_tasks == {"model_unavailable": 1}


def test_every_reason_the_project_defines_is_in_the_corpus_or_explained():
    covered = {(e["surface"], e["reason"]) for e in ENTRIES} | {("agent", "model_unavailable")}
    explained = " ".join(INDEX["not_producible"])
    for surface, reasons in (("reply", REPLY_REASONS), ("enroll", ENROLL_REASONS),
                             ("agent", AGENT_REASONS), ("gossip", GOSSIP_LEDGER_REASONS)):
        missing = {r for r in reasons if (surface, r) not in covered and r not in explained}
        assert not missing, (surface, missing)


def test_the_corpus_on_disk_is_what_make_corpus_writes(tmp_path):
    """Deterministic: regenerating the corpus gives the same bytes (fixed keys, fixed times, Ed25519)."""
    for entry in make_corpus.build(tmp_path):
        for key, data in (("file", "bytes"), ("task", "task_bytes")):
            if key in entry:
                assert read(entry[key]) == entry[data], entry[key]
