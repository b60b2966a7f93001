"""Digests (SHA-256) and MQTT topic names."""

from __future__ import annotations

import pytest

from protocol import digest, topics
from protocol.keys import Identity


def test_sha256_matches_the_fips_180_abc_vector():
    assert digest.sha256(b"abc").hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert len(digest.sha256(b"")) == digest.DIGEST_BYTES == 32


def test_short_gives_a_hex_prefix():
    d = digest.sha256(b"abc")
    assert digest.short(d) == "ba7816bf8f01"
    assert digest.short(d, 4) == "ba78"


GW = Identity.from_seed(bytes(32)).id
DEV = Identity.from_seed(bytes(range(32))).id


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (topics.task(GW, DEV), f"starling/{GW}/task/{DEV}"),
        (topics.reply(GW, DEV), f"starling/{GW}/reply/{DEV}"),
        (topics.receipt(GW, DEV), f"starling/{GW}/receipt/{DEV}"),
        (topics.enroll(GW, DEV), f"starling/{GW}/enroll/{DEV}"),
        (topics.online(GW, DEV), f"starling/{GW}/online/{DEV}"),
        (topics.model(GW, "ab" * 32), f"starling/{GW}/model/{'ab' * 32}"),
        (topics.status(GW), f"starling/{GW}/status"),
    ],
)
def test_topic_layout(topic, expected):
    assert topic == expected
    assert not set("+#") & set(topic)


@pytest.mark.parametrize("make", [topics.task, topics.reply, topics.receipt, topics.enroll, topics.online])
def test_device_of_recovers_the_device_id(make):
    assert topics.device_of(make(GW, DEV)) == DEV


def test_ids_are_safe_topic_segments():
    for seed in range(50):
        ident = Identity.from_seed(bytes([seed]) * 32).id
        assert len(ident) >= 16 and set(ident) <= set("0123456789abcdef")
