"""Devices that roam: when the home gateway is gone, which member gateway becomes home.

A device trusts the city, not one gateway: the operator's root key (`[gateway]
root_key`) and, through it, the member gateways and their keys
(`protocol.membership.City`, from `[city] genesis` or learned from the
gateways' retained membership documents). The agent (agent/service.py) asks
this module two questions, and does the move itself:

Is the home gone? (`HomeWatch`) The home is gone once this device, connected
to the broker, has heard nothing from it for `[city] rehome_after_s`: no
message the home signed (a task, a model, a receipt) and no status saying it
serves. A gateway's retained status (`starling/<gw>/status`) says `starting`,
`waiting`, `running` or `idle` while it serves; the broker publishes
`offline` (the gateway's last will) when it vanishes, and it says `stopped`,
`done` or `failed` when it ends. Statuses are tens of KB and change several
times a round, so a device does not follow its home's all the time: only once
the home has been quiet for half the timeout does it subscribe (the retained
status answers at once); one that says the home serves counts as hearing from
it, and the device lets go of the topic until the home is quiet again. An idle
gateway thus costs each of its devices one status every half timeout, a busy
one nothing, and a dead one is left between one and one and a half timeouts
after it last spoke. Each reconnect of the device counts as hearing from the
home (a device that was cut off cannot tell how long the gateway has been
away), and a gateway that stops for an upgrade and comes back within the
timeout keeps its devices. A home that the operator retired from the city
(`gateway.leave`) is left without waiting. A status that is not the JSON a
gateway publishes counts as no status (a cleared retained message, or
garbage: the broker's ACLs must keep these topics the gateways'); any other
state a newer gateway may say counts as serving, so a device never flees a
gateway it does not understand.

Where to? (`choose_home`) Among the other members whose status says they
serve (the device subscribes to theirs, retained, once its home has been
quiet for three quarters of the timeout, so they are in when it runs out):
the first of `[city] prefer` that is, else the one ranked highest by
rendezvous hashing of the device id and the gateway id. That choice is
deterministic, needs no coordination, spreads a dead gateway's devices evenly
over the others, and moves no device that need not move when the member set
changes. The new home admits the device under its own policy, by the
device's enrollment on the ledger (or the device's own request, which the
agent sends again): a revoked device is refused there as everywhere.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable

ENDED = frozenset({"offline", "stopped", "done", "failed"})
MAX_STATUS_BYTES = 1 << 20  # a gateway's status is tens of KB; anything far bigger is not one


def status_state(payload: bytes) -> str | None:
    """The `state` of a gateway's status JSON; None for anything else (a cleared retained message included)."""
    if not payload or len(payload) > MAX_STATUS_BYTES:
        return None
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    state = doc.get("state") if isinstance(doc, dict) else None
    return state if isinstance(state, str) and state else None


def serves(state: str | None) -> bool:
    """Whether a status in this state says the gateway is there (unknown states: yes, see the module doc)."""
    return state is not None and state not in ENDED


class HomeWatch:
    """When the device last heard from its home, in the caller's monotonic seconds. Thread-safe: the worker
    notes the home's signed messages, the agent's loop its statuses and reconnects, and asks `quiet_for`."""

    def __init__(self, now: float) -> None:
        self._lock = threading.Lock()
        self._heard_at = now  # nothing heard yet: the count starts now

    def heard(self, now: float) -> None:
        """The home spoke: a message it signed, a status saying it serves; or this device (re)connected, so
        whatever the home did meanwhile is not held against it."""
        with self._lock:
            self._heard_at = max(self._heard_at, now)

    def quiet_for(self, now: float) -> float:
        """Seconds since the home last spoke."""
        with self._lock:
            return max(0.0, now - self._heard_at)


def rank(device: str, gateway: str) -> bytes:
    """The rendezvous-hashing weight of `gateway` for `device`: the highest one is the device's choice."""
    return hashlib.sha256(f"starling-home\x00{device}\x00{gateway}".encode()).digest()


def choose_home(device: str, candidates: Iterable[str], prefer: Iterable[str] = ()) -> str | None:
    """The new home among `candidates` (member gateways that serve, the old home left out): the first of
    `prefer` among them, else the highest `rank`; None if there is none."""
    pool = set(candidates)
    for gateway in prefer:
        if gateway in pool:
            return gateway
    return max(pool, key=lambda gateway: rank(device, gateway), default=None)


class Sightings:
    """The latest status payload of each watched gateway, kept by MQTT's thread and read by the agent's loop
    (only the newest matters; parsing waits for the loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fresh: dict[str, bytes] = {}

    def put(self, gateway: str, payload: bytes) -> None:
        with self._lock:
            self._fresh[gateway] = payload

    def take(self) -> dict[str, bytes]:
        """What arrived since the last call, newest per gateway."""
        with self._lock:
            fresh, self._fresh = self._fresh, {}
        return fresh
