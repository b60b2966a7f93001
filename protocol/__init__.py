"""What crosses the wire between Starling devices, gateways and ledgers.

Everything here depends only on numpy, cbor2 and PyNaCl, so a 512 MB device
can import it. Every decoder turns bad input into a `ProtocolError` subclass
whose `reason` is a short, stable string that gateways count rejections by.
"""

from .errors import ProtocolError

__all__ = ["ProtocolError"]
