"""What the agent must remember across power cuts, written atomically.

    <state_dir>/state.json          enrolled flag and the highest model version trusted
    <state_dir>/pending/*.reply     signed replies not yet acknowledged by a receipt

A reply is written to disk before it is first published, and deleted only
when a signed receipt for it arrives, so a power cut at any instant either
loses nothing or re-sends a reply the gateway already has (which it then
acknowledges again). The state belongs to one gateway: a device pointed at
another gateway starts over (enrolls again, trusts no model version yet).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from protocol.atomic import write_atomic


@dataclass
class AgentState:
    gateway: str = ""  # the gateway id this state is about
    enrolled: bool = False
    trusted_version: int = -1  # highest model version accepted so far (rollback guard)


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.pending_dir = state_dir / "pending"
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self._state_file = state_dir / "state.json"

    def load(self, gateway: str) -> AgentState:
        """The state kept for `gateway`; a fresh one if there is none or it is about another gateway."""
        try:
            doc = json.loads(self._state_file.read_text())
            state = AgentState(str(doc["gateway"]), bool(doc["enrolled"]), int(doc["trusted_version"]))
        except (OSError, ValueError, KeyError, TypeError):
            # Missing, or hand-edited into nonsense (atomic writes never tear it): start over.
            return AgentState(gateway)
        return state if state.gateway == gateway else AgentState(gateway)

    def save(self, state: AgentState) -> None:
        write_atomic(self._state_file, json.dumps(asdict(state)).encode(), mode=0o600)

    def put_pending(self, key: str, wire: bytes) -> None:
        write_atomic(self.pending_dir / f"{key}.reply", wire, mode=0o600)

    def drop_pending(self, key: str) -> None:
        try:
            os.unlink(self.pending_dir / f"{key}.reply")
        except FileNotFoundError:
            pass

    def pending_keys(self) -> list[str]:
        return sorted(path.stem for path in self.pending_dir.glob("*.reply"))

    def read_pending(self, key: str) -> bytes | None:
        try:
            return (self.pending_dir / f"{key}.reply").read_bytes()
        except FileNotFoundError:  # its receipt arrived meanwhile
            return None

    def pending(self) -> dict[str, bytes]:
        out = {}
        for path in sorted(self.pending_dir.glob("*.reply")):
            try:
                out[path.stem] = path.read_bytes()
            except FileNotFoundError:  # its receipt arrived meanwhile
                continue
        return out
