"""Operator vouchers admit one device key, at one gateway or any, until they expire."""

from __future__ import annotations

import time

import pytest

from protocol.errors import ProtocolError
from protocol.keys import Identity
from protocol.vouchers import Voucher, VoucherRefused, issue

OPERATOR = Identity.from_seed(b"o" * 32)
DEVICE = Identity.from_seed(b"d" * 32)


def test_a_voucher_round_trips_and_admits_its_device():
    voucher = Voucher.decode(issue(OPERATOR, DEVICE.public_key, "gw1").encode())
    voucher.check([OPERATOR.public_key], DEVICE.public_key, "gw1")


def test_a_voucher_for_any_gateway_admits_everywhere():
    issue(OPERATOR, DEVICE.public_key).check([OPERATOR.public_key], DEVICE.public_key, "any-gateway")


@pytest.mark.parametrize("case", ["untrusted operator", "other device", "other gateway", "expired", "forged"])
def test_a_voucher_that_does_not_fit_is_refused(case):
    voucher = issue(OPERATOR, DEVICE.public_key, "gw1")
    trusted, device, gateway, now = [OPERATOR.public_key], DEVICE.public_key, "gw1", time.time()
    if case == "untrusted operator":
        trusted = [Identity.generate().public_key]
    elif case == "other device":
        device = Identity.generate().public_key
    elif case == "other gateway":
        gateway = "gw2"
    elif case == "expired":
        now = voucher.expires + 1
    else:
        voucher = Voucher(voucher.device, "", voucher.expires, voucher.operator, voucher.sig)  # widened after signing
    with pytest.raises(VoucherRefused):
        voucher.check(trusted, device, gateway, now)


def test_garbage_is_a_protocol_error():
    good = issue(OPERATOR, DEVICE.public_key).encode()
    for data in (b"", b"\xa0", good[:-1], good + b"\x00", b"\xff" * 600):
        with pytest.raises(ProtocolError):
            Voucher.decode(data)
