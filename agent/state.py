"""What the agent must remember across power cuts, written atomically.

    <state_dir>/state.json          enrolled flag, highest model version trusted (and its digest), newest
                                    release expiry seen, tasks answered lately, the gateway's current
                                    key and the keys its rotations retired
    <state_dir>/tasks/*.task        tasks received and not answered yet (saved before MQTT acks them)
    <state_dir>/pending/*.reply     signed replies not yet acknowledged by a receipt
    <state_dir>/home.json           where the device lives after it re-homed (agent/roaming.py): the gateway,
                                    the key that signed for it then, the configured gateway it left
    <state_dir>/members.cbor        the city's membership vertices it verified (protocol/membership.py)

A task is on disk before the broker hears it arrived, so a power cut during
training re-does that task at restart instead of losing it. A reply is on
disk (and its task marked answered) before the task file goes and before the
reply is first published; it is deleted only when a signed receipt for it
arrives. So a power cut at any instant either loses nothing or re-sends a
reply the gateway already has (which it acknowledges again), and a task is
never answered twice with different replies. The state belongs to one gateway: a device pointed at
another gateway starts over (enrolls again, trusts no model version yet). So does a device that
re-homed: model versions count per gateway lineage, so it takes its new home's lineage (the city's
model) from whatever version that gateway is at, and its rollback and freeze guards start again from
there. `home.json` is written (atomically) before anything else of the move, so a power cut during a
re-home leaves the device either still at its old home or at its new one with a fresh state; replies
still pending for the old home are dropped (`drop_pending_not_for`): no other gateway can take them.
A state file written before a field existed still loads: the missing field
takes its default (`trusted_digest` "": the next release at `trusted_version`
is taken as that version's digest; `newest_expires` 0: no freeze bound yet;
`gateway_key` "": the configured gateway key, no rotation followed yet).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from protocol.atomic import write_atomic

ANSWERED_KEPT = 64  # answered task keys remembered (a redelivered task is never answered twice)
TASKS_KEPT = 64  # saved, unanswered tasks at most (the gateway sends one per exchange)


@dataclass
class AgentState:
    gateway: str = ""  # the gateway id this state is about
    enrolled: bool = False
    trusted_version: int = -1  # highest model version accepted so far (rollback guard)
    answered: list[str] = field(default_factory=list)  # keys of the latest tasks answered
    trusted_digest: str = ""  # hex digest of the release accepted at trusted_version ("": not known yet)
    newest_expires: float = 0.0  # the latest expiry of any release accepted from this gateway (freeze bound)
    gateway_key: str = ""  # hex key that signs for the gateway after its key rotations ("": the configured one)
    retired_keys: list[str] = field(default_factory=list)  # hex keys the gateway's rotations retired


def _digest_hex(value: object) -> str:
    """A digest kept as hex: "" or 64 lowercase hex characters (anything else is nonsense: ValueError)."""
    if not isinstance(value, str) or value and (len(value) != 64 or bytes.fromhex(value).hex() != value):
        raise ValueError(f"not a digest: {value!r:.80}")
    return value


def _key_hex(value: object) -> str:
    """A public key kept as hex: "" or 64 lowercase hex characters (anything else: ValueError)."""
    return _digest_hex(value)  # the same shape as a digest's


@dataclass(frozen=True)
class Home:
    """Where the device lives when it re-homed away from its configured gateway (`home.json`)."""

    gateway: str  # the gateway's id
    key: str  # hex: the key that signed for it when the device moved there (later rotations: AgentState.gateway_key)
    configured: str  # the configured gateway it roamed from: a device configured for another one starts over
    since: float = 0.0  # unix time of the move
    previous: str = ""  # the gateway it left


def _gateway_id(value: object) -> str:
    if not isinstance(value, str) or len(value) != 32 or bytes.fromhex(value).hex() != value:
        raise ValueError(f"not a gateway id: {value!r:.80}")
    return value


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.pending_dir = state_dir / "pending"
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.tasks_dir = state_dir / "tasks"
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        self._state_file = state_dir / "state.json"
        self._home_file = state_dir / "home.json"
        self._members_file = state_dir / "members.cbor"

    def load(self, gateway: str) -> AgentState:
        """The state kept for `gateway`; a fresh one if there is none or it is about another gateway."""
        try:
            doc = json.loads(self._state_file.read_text())
            state = AgentState(str(doc["gateway"]), bool(doc["enrolled"]), int(doc["trusted_version"]),
                               [str(k) for k in doc.get("answered", [])][-ANSWERED_KEPT:],
                               _digest_hex(doc.get("trusted_digest", "")), float(doc.get("newest_expires", 0.0)),
                               _key_hex(doc.get("gateway_key", "")), [_key_hex(k) for k in doc.get("retired_keys", [])])
            if not math.isfinite(state.newest_expires):
                raise ValueError("newest_expires is not finite")
        except (OSError, ValueError, KeyError, TypeError):
            # Missing, or hand-edited into nonsense (atomic writes never tear it): start over.
            return AgentState(gateway)
        return state if state.gateway == gateway else AgentState(gateway)

    def save(self, state: AgentState) -> None:
        write_atomic(self._state_file, json.dumps(asdict(state)).encode(), mode=0o600)

    def load_home(self, configured: str) -> Home | None:
        """The home this device re-homed to from the `configured` gateway; None if it never did (or the file is
        about another configured gateway, or mangled: then the configured gateway is home again)."""
        try:
            doc = json.loads(self._home_file.read_text())
            home = Home(_gateway_id(doc["gateway"]), _key_hex(doc["key"]), _gateway_id(doc["configured"]),
                        float(doc.get("since", 0.0)), str(doc.get("previous", "")))
            if not home.key:
                raise ValueError("no key")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return home if home.configured == configured else None

    def save_home(self, home: Home) -> None:
        write_atomic(self._home_file, json.dumps(asdict(home)).encode(), mode=0o600)

    def load_members(self) -> bytes | None:
        """The membership document kept (unverified bytes: the caller checks them against the root key)."""
        try:
            return self._members_file.read_bytes()
        except OSError:
            return None

    def save_members(self, document: bytes) -> None:
        write_atomic(self._members_file, document, mode=0o600)

    def drop_pending_not_for(self, gateway: str, gateway_of: Callable[[bytes], str]) -> int:
        """Drop pending replies addressed to another gateway than `gateway` (`gateway_of(wire)` names a reply's,
        "" if it cannot tell: dropped too, nobody can take it); return how many went."""
        dropped = 0
        for key in self.pending_keys():
            wire = self.read_pending(key)
            if wire is not None and gateway_of(wire) != gateway:
                self.drop_pending(key)
                dropped += 1
        return dropped

    def put_task(self, wire: bytes) -> str:
        """Save a received task (named by its hash: the bytes are not verified yet); return the name."""
        name = hashlib.sha256(wire).hexdigest()[:32]
        saved = self._saved_oldest_first()
        for old in saved[: max(0, len(saved) - TASKS_KEPT + 1)]:  # bounded, whoever floods the topic
            old.unlink(missing_ok=True)
        write_atomic(self.tasks_dir / f"{name}.task", wire, mode=0o600)
        return name

    def drop_task(self, name: str) -> None:
        (self.tasks_dir / f"{name}.task").unlink(missing_ok=True)

    def _saved_oldest_first(self) -> list[Path]:
        """Saved task files by age; one the worker drops meanwhile is simply left out."""
        dated = []
        for path in self.tasks_dir.glob("*.task"):
            try:
                dated.append((path.stat().st_mtime, path))
            except FileNotFoundError:  # answered and dropped while we looked
                continue
        return [path for _, path in sorted(dated)]

    def saved_tasks(self) -> list[tuple[str, bytes]]:
        """Tasks saved and not answered, oldest first."""
        out = []
        for path in self._saved_oldest_first():
            try:
                out.append((path.stem, path.read_bytes()))
            except FileNotFoundError:
                continue
        return out

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
