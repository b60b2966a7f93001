"""Enrollment vouchers: an operator's signed word that a device key may join.

Under the `voucher` enrollment policy a gateway admits a device only if its
enrollment request carries a voucher, signed by an operator key the gateway
trusts, naming that device's public key (and this gateway, or any gateway),
not yet expired. Operators issue vouchers offline (`starling-ledger voucher`)
and flash them onto the device with its config.

Wire form (deterministic CBOR): {"device": pk, "gateway": str ("" = any),
"expires": unix seconds, "operator": pk, "sig": bytes(64)}; the signature
covers the domain tag and the map without "sig".
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import cbor
from .errors import BadSignature, ProtocolError, SchemaError
from .keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, verify

DOMAIN = b"starling/voucher/v1\x00"
MAX_VOUCHER_BYTES = 512


class VoucherRefused(ProtocolError):
    """The voucher is well-formed and signed, but does not admit this device here and now."""

    reason = "bad_voucher"


@dataclass(frozen=True)
class Voucher:
    device: bytes
    gateway: str
    expires: float
    operator: bytes
    sig: bytes = b""

    def _unsigned(self) -> dict[str, Any]:
        return {"device": self.device, "gateway": self.gateway, "expires": float(self.expires), "operator": self.operator}

    def signed_bytes(self) -> bytes:
        return DOMAIN + cbor.dumps(self._unsigned())

    def encode(self) -> bytes:
        return cbor.dumps({**self._unsigned(), "sig": self.sig})

    @classmethod
    def decode(cls, data: bytes) -> Voucher:
        doc = cbor.loads(data, max_bytes=MAX_VOUCHER_BYTES)
        if not isinstance(doc, dict) or set(doc) != {"device", "gateway", "expires", "operator", "sig"}:
            raise SchemaError("a voucher is a map of device, gateway, expires, operator, sig")
        device, gateway, expires, operator, sig = (doc[k] for k in ("device", "gateway", "expires", "operator", "sig"))
        if not isinstance(device, bytes) or len(device) != PUBLIC_KEY_BYTES:
            raise SchemaError("voucher.device must be a 32-byte public key")
        if not isinstance(operator, bytes) or len(operator) != PUBLIC_KEY_BYTES:
            raise SchemaError("voucher.operator must be a 32-byte public key")
        if not isinstance(gateway, str) or len(gateway) > 64:
            raise SchemaError("voucher.gateway must be a gateway id or empty")
        if not isinstance(expires, float):
            raise SchemaError("voucher.expires must be a float (unix seconds)")
        if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
            raise SchemaError("voucher.sig must be 64 bytes")
        return cls(device, gateway, expires, operator, sig)

    def check(self, trusted_operators: Iterable[bytes], device: bytes, gateway: str, now: float | None = None) -> None:
        """Raise unless this voucher, signed by a trusted operator, admits `device` at `gateway` now."""
        if self.operator not in set(trusted_operators):
            raise VoucherRefused("signed by an operator key this gateway does not trust")
        try:
            verify(self.operator, self.signed_bytes(), self.sig)
        except BadSignature as exc:
            raise VoucherRefused("the operator's signature does not verify") from exc
        if self.device != device:
            raise VoucherRefused("the voucher names another device key")
        if self.gateway not in ("", gateway):
            raise VoucherRefused(f"the voucher is for gateway {self.gateway}")
        if (time.time() if now is None else now) > self.expires:
            raise VoucherRefused("the voucher has expired")


def issue(operator: Identity, device: bytes, gateway: str = "", valid_s: float = 30 * 86400) -> Voucher:
    """A voucher signed by `operator` admitting `device` (at `gateway`, or anywhere) for `valid_s` seconds."""
    unsigned = Voucher(device, gateway, float(time.time() + valid_s), operator.public_key)
    return Voucher(device, gateway, unsigned.expires, operator.public_key, operator.sign(unsigned.signed_bytes()))
