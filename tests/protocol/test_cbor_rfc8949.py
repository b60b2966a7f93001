"""RFC 8949 Appendix A examples and the section 4.2.1 key order, against `protocol.cbor`.

Three kinds of example:
* PREFERRED: the table's encoding is the deterministic one. Decoding gives the
  value, `dumps(value)` gives exactly those bytes, and strict `loads` accepts them.
* NON_PREFERRED: well-formed, but not the deterministic encoding (the 32- and
  64-bit encodings of infinities and NaN). Lenient `loads` decodes them,
  strict `loads` refuses them with NonCanonicalCBOR.
* INDEFINITE: indefinite-length items. `loads` never accepts them
  (cbor2's allow_indefinite is off), canonical or not: MalformedCBOR.
"""

from __future__ import annotations

import datetime
import math

import cbor2
import pytest

from protocol import cbor
from protocol.errors import MalformedCBOR, NonCanonicalCBOR
from protocol_helpers import strict_equal

INF = float("inf")
NAN = float("nan")

# (diagnostic notation, hex, Python value as cbor2 decodes it)
PREFERRED = [
    ("0", "00", 0),
    ("1", "01", 1),
    ("10", "0a", 10),
    ("23", "17", 23),
    ("24", "1818", 24),
    ("25", "1819", 25),
    ("100", "1864", 100),
    ("1000", "1903e8", 1000),
    ("1000000", "1a000f4240", 1000000),
    ("1000000000000", "1b000000e8d4a51000", 1000000000000),
    ("18446744073709551615", "1bffffffffffffffff", 18446744073709551615),
    ("18446744073709551616", "c249010000000000000000", 18446744073709551616),
    ("-18446744073709551616", "3bffffffffffffffff", -18446744073709551616),
    ("-18446744073709551617", "c349010000000000000000", -18446744073709551617),
    ("-1", "20", -1),
    ("-10", "29", -10),
    ("-100", "3863", -100),
    ("-1000", "3903e7", -1000),
    ("0.0", "f90000", 0.0),
    ("-0.0", "f98000", -0.0),
    ("1.0", "f93c00", 1.0),
    ("1.1", "fb3ff199999999999a", 1.1),
    ("1.5", "f93e00", 1.5),
    ("65504.0", "f97bff", 65504.0),
    ("100000.0", "fa47c35000", 100000.0),
    ("3.4028234663852886e+38", "fa7f7fffff", 3.4028234663852886e38),
    ("1.0e+300", "fb7e37e43c8800759c", 1.0e300),
    ("5.960464477539063e-8", "f90001", 5.960464477539063e-8),
    ("0.00006103515625", "f90400", 0.00006103515625),
    ("-4.0", "f9c400", -4.0),
    ("-4.1", "fbc010666666666666", -4.1),
    ("Infinity", "f97c00", INF),
    ("NaN", "f97e00", NAN),
    ("-Infinity", "f9fc00", -INF),
    ("false", "f4", False),
    ("true", "f5", True),
    ("null", "f6", None),
    ("undefined", "f7", cbor2.undefined),
    ("simple(16)", "f0", cbor2.CBORSimpleValue(16)),
    ("simple(255)", "f8ff", cbor2.CBORSimpleValue(255)),
    (
        '0("2013-03-21T20:04:00Z")',
        "c074323031332d30332d32315432303a30343a30305a",
        datetime.datetime(2013, 3, 21, 20, 4, 0, tzinfo=datetime.timezone.utc),
    ),
    ("23(h'01020304')", "d74401020304", cbor2.CBORTag(23, b"\x01\x02\x03\x04")),
    ("24(h'6449455446')", "d818456449455446", cbor2.CBORTag(24, b"dIETF")),
    (
        '32("http://www.example.com")',
        "d82076687474703a2f2f7777772e6578616d706c652e636f6d",
        cbor2.CBORTag(32, "http://www.example.com"),
    ),
    ("h''", "40", b""),
    ("h'01020304'", "4401020304", b"\x01\x02\x03\x04"),
    ('""', "60", ""),
    ('"a"', "6161", "a"),
    ('"IETF"', "6449455446", "IETF"),
    ('"\\"\\\\"', "62225c", '"\\'),
    ('"\\u00fc"', "62c3bc", "\u00fc"),
    ('"\\u6c34"', "63e6b0b4", "\u6c34"),
    ('"\\ud800\\udd51"', "64f0908591", "\U00010151"),
    ("[]", "80", []),
    ("[1, 2, 3]", "83010203", [1, 2, 3]),
    ("[1, [2, 3], [4, 5]]", "8301820203820405", [1, [2, 3], [4, 5]]),
    (
        "[1, 2, ..., 25]",
        "98190102030405060708090a0b0c0d0e0f101112131415161718181819",
        list(range(1, 26)),
    ),
    ("{}", "a0", {}),
    ("{1: 2, 3: 4}", "a201020304", {1: 2, 3: 4}),
    ('{"a": 1, "b": [2, 3]}', "a26161016162820203", {"a": 1, "b": [2, 3]}),
    ('["a", {"b": "c"}]', "826161a161626163", ["a", {"b": "c"}]),
    (
        '{"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"}',
        "a56161614161626142616361436164614461656145",
        {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"},
    ),
]

# Deterministic per RFC 8949, but cbor2 maps tag 1 (epoch time) to a datetime,
# which it re-encodes as tag 0 (a text date): `dumps` cannot reproduce these
# bytes, so strict `loads` refuses them. Only the lenient decode is checked.
EPOCH_TIMES = [
    ("1(1363896240)", "c11a514b67b0", datetime.datetime(2013, 3, 21, 20, 4, 0, tzinfo=datetime.timezone.utc)),
    (
        "1(1363896240.5)",
        "c1fb41d452d9ec200000",
        datetime.datetime(2013, 3, 21, 20, 4, 0, 500000, tzinfo=datetime.timezone.utc),
    ),
]

NON_PREFERRED = [
    ("Infinity as float32", "fa7f800000", INF, "f97c00"),
    ("NaN as float32", "fa7fc00000", NAN, "f97e00"),
    ("-Infinity as float32", "faff800000", -INF, "f9fc00"),
    ("Infinity as float64", "fb7ff0000000000000", INF, "f97c00"),
    ("NaN as float64", "fb7ff8000000000000", NAN, "f97e00"),
    ("-Infinity as float64", "fbfff0000000000000", -INF, "f9fc00"),
]

INDEFINITE = [
    ("(_ h'0102', h'030405')", "5f42010243030405ff"),
    ('(_ "strea", "ming")', "7f657374726561646d696e67ff"),
    ("[_ ]", "9fff"),
    ("[_ 1, [2, 3], [_ 4, 5]]", "9f018202039f0405ffff"),
    ("[_ 1, [2, 3], [4, 5]]", "9f01820203820405ff"),
    ("[1, [2, 3], [_ 4, 5]]", "83018202039f0405ff"),
    ("[1, [_ 2, 3], [4, 5]]", "83019f0203ff820405"),
    ("[_ 1, 2, 3, ..., 25]", "9f0102030405060708090a0b0c0d0e0f101112131415161718181819ff"),
    ('{_ "a": 1, "b": [_ 2, 3]}', "bf61610161629f0203ffff"),
    ('["a", {_ "b": "c"}]', "826161bf61626163ff"),
    ('{_ "Fun": true, "Amt": -2}', "bf6346756ef563416d7421ff"),
]


def _ids(rows):
    return [row[0] for row in rows]


@pytest.mark.parametrize(("diag", "hexstr", "value"), PREFERRED, ids=_ids(PREFERRED))
def test_lenient_loads_decodes_the_appendix_example(diag, hexstr, value):
    assert strict_equal(cbor.loads(bytes.fromhex(hexstr), canonical=False), value)


@pytest.mark.parametrize(("diag", "hexstr", "value"), PREFERRED, ids=_ids(PREFERRED))
def test_dumps_gives_exactly_the_preferred_encoding(diag, hexstr, value):
    assert cbor.dumps(value).hex() == hexstr


@pytest.mark.parametrize(("diag", "hexstr", "value"), PREFERRED, ids=_ids(PREFERRED))
def test_strict_loads_accepts_the_preferred_encoding(diag, hexstr, value):
    assert strict_equal(cbor.loads(bytes.fromhex(hexstr)), value)


@pytest.mark.parametrize(("diag", "hexstr", "value"), EPOCH_TIMES, ids=_ids(EPOCH_TIMES))
def test_lenient_loads_decodes_epoch_times(diag, hexstr, value):
    assert cbor.loads(bytes.fromhex(hexstr), canonical=False) == value


@pytest.mark.parametrize(("diag", "hexstr", "value"), EPOCH_TIMES, ids=_ids(EPOCH_TIMES))
def test_strict_loads_refuses_epoch_times_that_cbor2_cannot_reencode(diag, hexstr, value):
    with pytest.raises(NonCanonicalCBOR):
        cbor.loads(bytes.fromhex(hexstr))


@pytest.mark.parametrize(("diag", "hexstr", "value", "preferred"), NON_PREFERRED, ids=_ids(NON_PREFERRED))
def test_lenient_loads_decodes_non_preferred_floats(diag, hexstr, value, preferred):
    assert strict_equal(cbor.loads(bytes.fromhex(hexstr), canonical=False), value)


@pytest.mark.parametrize(("diag", "hexstr", "value", "preferred"), NON_PREFERRED, ids=_ids(NON_PREFERRED))
def test_strict_loads_refuses_non_preferred_floats(diag, hexstr, value, preferred):
    with pytest.raises(NonCanonicalCBOR):
        cbor.loads(bytes.fromhex(hexstr))


@pytest.mark.parametrize(("diag", "hexstr", "value", "preferred"), NON_PREFERRED, ids=_ids(NON_PREFERRED))
def test_dumps_writes_the_half_precision_form_instead(diag, hexstr, value, preferred):
    assert cbor.dumps(value).hex() == preferred


@pytest.mark.parametrize(("diag", "hexstr"), INDEFINITE, ids=_ids(INDEFINITE))
@pytest.mark.parametrize("canonical", [True, False], ids=["strict", "lenient"])
def test_loads_refuses_indefinite_lengths(diag, hexstr, canonical):
    with pytest.raises(MalformedCBOR):
        cbor.loads(bytes.fromhex(hexstr), canonical=canonical)


# Other non-deterministic encodings of values from the table.
OTHER_NON_DETERMINISTIC = [
    ("0 in one extra byte", "1800", 0),
    ("23 in one extra byte", "1817", 23),
    ("24 in two bytes", "190018", 24),
    ("1000 in four bytes", "1a000003e8", 1000),
    ("1000000 in eight bytes", "1b00000000000f4240", 1000000),
    ("-1 in one extra byte", "3800", -1),
    ("1.0 as float32", "fa3f800000", 1.0),
    ("1.0 as float64", "fb3ff0000000000000", 1.0),
    ("1.5 as float64", "fb3ff8000000000000", 1.5),
    ("100000.0 as float64", "fb40f86a0000000000", 100000.0),
    ("-0.0 as float32", "fa80000000", -0.0),
    ("'a' with a one-byte length", "780161", "a"),
    ("h'01' with a one-byte length", "580101", b"\x01"),
    ("[1] with a one-byte length", "980101", [1]),
    ("{1: 2} with a one-byte length", "b8010102", {1: 2}),
    ("{3: 4, 1: 2}: keys out of order", "a203040102", {1: 2, 3: 4}),
    ('{"b": 1, "a": 2}: keys out of order', "a2616201616102", {"a": 2, "b": 1}),
    ("bignum 1 (fits major type 0)", "c24101", 1),
    ("bignum 2**64 with a leading zero byte", "c24a00010000000000000000", 2**64),
    ("NaN with a payload", "f97e01", NAN),
]


@pytest.mark.parametrize(
    ("diag", "hexstr", "value"),
    OTHER_NON_DETERMINISTIC,
    ids=_ids(OTHER_NON_DETERMINISTIC),
)
def test_lenient_loads_decodes_other_non_deterministic_encodings(diag, hexstr, value):
    assert strict_equal(cbor.loads(bytes.fromhex(hexstr), canonical=False), value)


@pytest.mark.parametrize(
    ("diag", "hexstr", "value"),
    OTHER_NON_DETERMINISTIC,
    ids=_ids(OTHER_NON_DETERMINISTIC),
)
def test_strict_loads_refuses_other_non_deterministic_encodings(diag, hexstr, value):
    with pytest.raises(NonCanonicalCBOR):
        cbor.loads(bytes.fromhex(hexstr))


# --- RFC 8949 section 4.2.1: map keys sorted by the bytewise order of their encodings ---

# The section's example, in its order: 10, 100, -1, "z", "aa", [100], [-1], false.
# Python cannot use a list as a dict key; `dumps` encodes a tuple as a CBOR array.
RFC_KEY_ORDER = [10, 100, -1, "z", "aa", (100,), (-1,), False]
RFC_KEY_ENCODINGS = ["0a", "1864", "20", "617a", "626161", "811864", "8120", "f4"]


def _map_with_keys(keys_in_order):
    return {key: i for i, key in enumerate(keys_in_order)}


def test_each_example_key_encodes_as_expected():
    assert [cbor.dumps(k).hex() for k in RFC_KEY_ORDER] == RFC_KEY_ENCODINGS


@pytest.mark.parametrize("rotation", range(len(RFC_KEY_ORDER)))
def test_map_keys_come_out_in_the_rfc_8949_order_whatever_the_insertion_order(rotation):
    inserted = RFC_KEY_ORDER[rotation:] + RFC_KEY_ORDER[:rotation]
    inserted = inserted[::-1] if rotation % 2 else inserted
    value = {key: None for key in inserted}
    expected = "a8" + "".join(enc + "f6" for enc in RFC_KEY_ENCODINGS)
    assert cbor.dumps(value).hex() == expected


def test_bytewise_order_differs_from_the_old_length_first_order():
    # RFC 7049 "canonical" sorted shorter encodings first (-1, 0x20, before 100, 0x1864);
    # RFC 8949 compares bytes (0x18 < 0x20), so 100 comes first.
    encoded = cbor.dumps({-1: 0, 100: 0, 10: 0})
    assert encoded.hex() == "a30a00186400" + "2000"


def test_scalar_keys_of_the_example_round_trip_through_strict_loads():
    scalar_keys = [k for k in RFC_KEY_ORDER if not isinstance(k, tuple)]
    value = _map_with_keys(scalar_keys)
    encoded = cbor.dumps(value)
    decoded = cbor.loads(encoded)
    assert strict_equal(decoded, value)
    assert list(decoded) == scalar_keys  # cbor2 keeps the wire order


def test_strict_loads_refuses_the_example_keys_out_of_order():
    scalar = ["0a", "1864", "20", "617a", "626161", "f4"]
    good = "a6" + "".join(k + "00" for k in scalar)
    swapped = "a6" + "".join(k + "00" for k in [scalar[1], scalar[0], *scalar[2:]])
    assert cbor.loads(bytes.fromhex(good)) == {10: 0, 100: 0, -1: 0, "z": 0, "aa": 0, False: 0}
    with pytest.raises(NonCanonicalCBOR):
        cbor.loads(bytes.fromhex(swapped))
    assert cbor.loads(bytes.fromhex(swapped), canonical=False) == cbor.loads(bytes.fromhex(good))


def test_dumps_refuses_two_keys_with_the_same_encoding():
    # Two NaN objects are two distinct Python keys, but both encode as f97e00.
    value = {float("nan"): 1, float("nan"): 2}
    assert len(value) == 2
    with pytest.raises(ValueError):
        cbor.dumps(value)


@pytest.mark.parametrize("canonical", [True, False], ids=["strict", "lenient"])
@pytest.mark.parametrize(
    "hexstr",
    ["a201020103", "a2616101616102", "a20102f93c0003"],  # {1: 2, 1: 3}, {"a": 1, "a": 2}, {1: 2, 1.0: 3}
)
def test_loads_refuses_duplicate_keys(hexstr, canonical):
    with pytest.raises(MalformedCBOR):
        cbor.loads(bytes.fromhex(hexstr), canonical=canonical)


def test_nan_and_signed_zero_round_trip_bit_exactly():
    assert math.isnan(cbor.loads(cbor.dumps(NAN)))
    assert math.copysign(1.0, cbor.loads(cbor.dumps(-0.0))) == -1.0
