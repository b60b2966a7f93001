"""One exception family for every way a message can be bad.

Each subclass carries a `reason`: a short snake_case string that gateways use
as the key when they count and log rejections, and that negative receipts
carry back to the device.
"""


class ProtocolError(ValueError):
    """Base class: the input is not a valid Starling message."""

    reason = "protocol_error"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class MalformedCBOR(ProtocolError):
    """The bytes are not well-formed CBOR (truncated, bad header, trailing data ...)."""

    reason = "malformed"


class NonCanonicalCBOR(ProtocolError):
    """Well-formed CBOR, but not in RFC 8949 deterministic encoding."""

    reason = "non_canonical"


class SchemaError(ProtocolError):
    """Decoded fine, but a field is missing, unknown or of the wrong type."""

    reason = "schema"


class LimitExceeded(ProtocolError):
    """A size, shape or count is over the explicit limits of the schema."""

    reason = "limits"


class BadTensor(ProtocolError):
    """A tensor's codec, shape, scale or byte length is inconsistent."""

    reason = "bad_tensor"


class NonFiniteValues(ProtocolError):
    """A tensor or number holds NaN or infinity."""

    reason = "non_finite"


class BadSignature(ProtocolError):
    """The Ed25519 signature does not verify for the named sender."""

    reason = "bad_signature"


class DigestMismatch(ProtocolError):
    """The attached bytes do not hash to the digest that was signed."""

    reason = "digest_mismatch"


class KeyFileError(ProtocolError):
    """A key file is missing, malformed, or readable by others."""

    reason = "key_file"


def _brief(value: object, limit: int = 40) -> str:
    """A short repr of an untrusted value for an error message.

    Never raises (a huge int's repr does) and never copies megabytes into a log line.
    """
    try:
        text = repr(value)
    except Exception:  # e.g. ValueError: int too large to convert to str
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."
