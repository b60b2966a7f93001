"""What `starling-ledger audit --recompute` loads: a recompute of `aggregate` and `city` vertices from blobs.

The ledger package imports neither the gateway nor Flower, so the gateway
plugs this in from above (entry point "aggregate" of the group
"starling.recompute", pyproject.toml): recompute.py checks a round's
aggregate, city_merge.py a city epoch's merge.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .blob_exchange import BlobExchange
from .blobs import BlobStore
from .city_merge import verify_city
from .recompute import verify_body


class Auditor:
    """The recompute `starling-ledger audit --recompute` loads: the entry point "aggregate" of the group
    "starling.recompute" (pyproject.toml). The ledger package imports neither the gateway nor Flower, so the
    gateway plugs its recompute in from above.

        check = Auditor([folder, ...], broker=(host, port), holders=[gateway id, ...])
        check(body)      # an `aggregate` or `city` vertex body -> Verdict.to_json() (ok, status, expected, ...)
        check.close()

    `folders`: blob folders (a gateway's `<state_dir>/blobs`, one per gateway of the city if at hand), opened
    read-only (safe beside a running gateway: nothing is written, swept or removed). With `broker`, a blob in
    none of them is fetched over MQTT (the blob exchange: starling/blobs/want|give) from `holders` in turn,
    checked against its digest and kept in a scratch folder for the audit's life. FileNotFoundError when a
    folder is not there, ImportError when Flower is not installed."""

    def __init__(self, folders: list[str | Path], broker: tuple[str, int] | None = None,
                 holders: list[str] = (), timeout_s: float = 30.0) -> None:
        import flwr.serverapp.strategy  # noqa: F401 - without Flower nothing recomputes: ImportError here

        # Flower logs a line per aggregate_train at INFO: an audit's output is its JSON, not thousands of those.
        logging.getLogger("flwr").setLevel(logging.WARNING)
        self._stores = [BlobStore(Path(f), read_only=True) for f in folders]
        self._holders = list(holders)
        self._timeout_s = timeout_s
        self._exchange = None
        self._scratch = None
        if broker is not None:
            import secrets
            import tempfile

            self._scratch = tempfile.TemporaryDirectory(prefix="starling-audit-")
            self._exchange = BlobExchange(BlobStore(Path(self._scratch.name)), secrets.token_hex(16),
                                          broker[0], broker[1]).start()

    def fetch(self, digest: bytes) -> bytes | None:
        for store in self._stores:
            data = store.get(digest)
            if data is not None:
                return data
        if self._exchange is None or not self._holders:
            return None
        return self._exchange.fetch(digest, self._holders, 0).result(timeout=self._timeout_s + 5).data

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        if "epoch" in body:  # a city merge (ledger.kinds `city`)
            return verify_city(body, self.fetch).to_json()
        return verify_body(body, self.fetch).to_json()

    def close(self) -> None:
        if self._exchange is not None:
            self._exchange.close()
        if self._scratch is not None:
            self._scratch.cleanup()
