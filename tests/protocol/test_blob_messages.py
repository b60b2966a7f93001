"""The blob exchange's wire messages (protocol/blob_messages.py) and topics: round trips and strict refusals."""

from __future__ import annotations

import pytest

from protocol import cbor, topics
from protocol.blob_messages import (
    MAX_WANT,
    Absent,
    Chunk,
    Want,
    chunk_count,
    decode_give,
    split,
)
from protocol.digest import sha256
from protocol.errors import ProtocolError
from protocol.schemas import CHUNK_BYTES

NODE = "0123456789abcdef" * 2
D = sha256(b"blob")


def test_topics_name_the_holder_and_the_requester():
    assert topics.blob_want(NODE) == f"starling/blobs/want/{NODE}"
    assert topics.blob_give(NODE) == f"starling/blobs/give/{NODE}"


def test_a_want_round_trips_and_names_each_digest_once():
    want = Want.decode(Want(NODE, (D, D, sha256(b"other"))).encode())
    assert want == Want(NODE, (D, sha256(b"other")))


@pytest.mark.parametrize("size", [0, 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES - 7])
def test_a_blob_splits_into_chunks_that_decode_and_join_back(size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    chunks = split(NODE, sha256(data), data)
    assert len(chunks) == chunk_count(size)
    decoded = [decode_give(c.encode()) for c in chunks]
    assert decoded == chunks and b"".join(c.data for c in decoded) == data


def test_an_absent_answer_round_trips():
    assert decode_give(Absent(NODE, D, "busy").encode()) == Absent(NODE, D, "busy")


def chunk_doc(**changes):
    doc = {"from": NODE, "digest": D, "chunk": 0, "chunks": 2, "size": CHUNK_BYTES + 5, "data": bytes(CHUNK_BYTES)}
    doc.update(changes)
    return cbor.dumps({k: v for k, v in doc.items() if v is not None})


@pytest.mark.parametrize(("payload", "reason"), [
    (chunk_doc(chunks=3), "schema"),  # numbering that disagrees with the size
    (chunk_doc(chunk=1), "schema"),  # the last chunk must be 5 bytes
    (chunk_doc(chunk=2), "limits"),
    (chunk_doc(chunk=True), "schema"),  # a bool is no index
    (chunk_doc(size=17 * 1024 * 1024, chunks=68), "limits"),  # over the largest honest blob
    (chunk_doc(digest=b"short"), "schema"),
    (chunk_doc(**{"from": "Not-An-Id"}), "schema"),
    (chunk_doc(data=None), "schema"),  # a field missing
    (cbor.dumps({"from": NODE, "digest": D, "absent": "gone"}), "schema"),
    (b"\x00" * (CHUNK_BYTES + 1024), "limits"),  # refused by its length, before parsing
    (b"\xff\x00", "malformed"),
])
def test_a_bad_give_is_refused_with_its_reason(payload, reason):
    with pytest.raises(ProtocolError) as refused:
        decode_give(payload)
    assert refused.value.reason == reason


def test_a_give_can_be_held_to_a_smaller_blob_limit():
    with pytest.raises(ProtocolError):
        decode_give(Chunk(NODE, D, 0, 1, 100, bytes(100)).encode(), max_blob_bytes=99)


@pytest.mark.parametrize(("doc", "reason"), [
    ({"from": NODE, "want": []}, "limits"),
    ({"from": NODE, "want": [D] * (MAX_WANT + 1)}, "limits"),
    ({"from": NODE, "want": [b"x" * 31]}, "schema"),
    ({"from": "ab" * 17, "want": [D]}, "schema"),
    ({"from": NODE, "want": [D], "extra": 1}, "schema"),
])
def test_a_bad_want_is_refused_with_its_reason(doc, reason):
    with pytest.raises(ProtocolError) as refused:
        Want.decode(cbor.dumps(doc))
    assert refused.value.reason == reason
