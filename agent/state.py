"""What the agent must remember across power cuts, written atomically.

    <state_dir>/state.json          enrolled flag and the highest model version trusted
    <state_dir>/pending/*.reply     signed replies not yet acknowledged by a receipt

A reply is written to disk before it is first published, and deleted only
when a signed receipt for it arrives, so a power cut at any instant either
loses nothing or re-sends a reply the gateway already has (which it then
acknowledges again).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from protocol.atomic import write_atomic


@dataclass
class AgentState:
    enrolled: bool = False
    trusted_version: int = -1  # highest model version accepted so far (rollback guard)


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.pending_dir = state_dir / "pending"
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self._state_file = state_dir / "state.json"

    def load(self) -> AgentState:
        try:
            doc = json.loads(self._state_file.read_text())
            return AgentState(enrolled=bool(doc["enrolled"]), trusted_version=int(doc["trusted_version"]))
        except FileNotFoundError:
            return AgentState()
        except (ValueError, KeyError, TypeError):
            # A torn file cannot happen with atomic writes; a hand-edited one starts over.
            return AgentState()

    def save(self, state: AgentState) -> None:
        write_atomic(self._state_file, json.dumps(asdict(state)).encode(), mode=0o600)

    def put_pending(self, key: str, wire: bytes) -> None:
        write_atomic(self.pending_dir / f"{key}.reply", wire, mode=0o600)

    def drop_pending(self, key: str) -> None:
        try:
            os.unlink(self.pending_dir / f"{key}.reply")
        except FileNotFoundError:
            pass

    def pending(self) -> dict[str, bytes]:
        out = {}
        for path in sorted(self.pending_dir.glob("*.reply")):
            out[path.stem] = path.read_bytes()
        return out
