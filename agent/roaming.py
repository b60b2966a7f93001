"""Devices that roam: when the home gateway is gone, which member gateway becomes home.

A device trusts the city, not one gateway: the operator's root key (`[gateway]
root_key`) and, through it, the member gateways and their keys
(`protocol.membership.City`, from `[city] genesis` or learned from the
gateways' retained membership documents). `Roaming` is the one object that
keeps all of it for the agent (agent/service.py): the city verified so far
(kept in `members.cbor`), the home gateway with its key and topics (kept in
`home.json` once the device moved), when the home last spoke, which statuses
are watched, and the move decided on. The members and their keys come only
from root-signed vertices: a document any part of which is not the root's is
refused whole, counted by its reason (`Roaming.learn_members`). `Roaming`
answers two questions (`Roaming.check_home`, every half second), and the agent
makes the move itself, on its connection and its per-gateway state:

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
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from protocol import topics
from protocol.digest import sha256
from protocol.errors import ProtocolError
from protocol.logs import event
from protocol.membership import City, Member

from .config import AgentConfig
from .state import Home, StateStore

log = logging.getLogger("starling.agent")  # the agent's logger: these are the agent's events

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


@dataclass(frozen=True)
class HomeTopics:
    """This device's topics at its home gateway (all of them change when it re-homes)."""

    gateway: str  # the home's id
    task: str
    receipt: str
    reply: str
    online: str
    enroll: str
    keys: str
    members: str

    @classmethod
    def at(cls, gateway: str, device: str) -> HomeTopics:
        return cls(gateway, topics.task(gateway, device), topics.receipt(gateway, device),
                   topics.reply(gateway, device), topics.online(gateway, device), topics.enroll(gateway, device),
                   topics.keys(gateway), topics.members(gateway))


@dataclass(frozen=True)
class Move:
    """A move `Roaming.check_home` decided on, for the agent's worker to make."""

    to: str  # the member gateway that becomes home
    why: str  # "quiet" (the home was gone for `rehome_after_s`) or "left_city" (the operator retired it)
    quiet_s: float  # how long the home had been quiet by then


@dataclass(frozen=True)
class HomeCheck:
    """What the agent must do after `Roaming.check_home`: its connection's status subscriptions, the refusals
    to count, and whether to ask its worker to move the device (`Roaming.next_move`)."""

    unsubscribe: list[str] = field(default_factory=list)
    subscribe: list[tuple[str, int]] = field(default_factory=list)  # QoS 0: a persistent session need not queue
    refused: list[str] = field(default_factory=list)  # reasons, one per status refused
    move: bool = False


class Roaming:
    """Where this device lives, and when and where it moves: `Roaming(config, store, device_id, now)`.

    Without the root key the configured gateway is home for good and the city is unknown (None). With it,
    home is the configured gateway until the device re-homed (then `home.json` names it). Threads: MQTT's
    network thread only files statuses (`keep_status`); the agent's loop calls `check_home`; its worker
    notes what the home signed (`heard`), takes membership documents (`learn_members`) and makes the move
    (`next_move`, `move_to`, `arrived`). All times are the caller's monotonic seconds.
    """

    def __init__(self, config: AgentConfig, store: StateStore, device: str, now: float) -> None:
        self._config = config
        self._store = store
        self._device = device
        self._city = self._load_city()
        # Only a device that knows the root key ever moves; without it, the config is all there is.
        home = store.load_home(config.gateway_id) if config.gateway_root_key is not None else None
        self._home_key = bytes.fromhex(home.key) if home else config.gateway_public_key  # before its rotations
        self._home_topics = HomeTopics.at(home.gateway if home else config.gateway_id, device)
        self._watch = HomeWatch(now)
        self._sightings = Sightings()  # the latest statuses of the gateways watched (while the home is quiet)
        self._member_states: dict[str, str | None] = {}  # the other members' states, while watched
        self._watched: set[str] = set()  # the gateways whose status topics are subscribed now
        self._decided: Move | None = None  # decided by the loop, not made by the worker yet
        self._waiting = ""  # why the device cannot re-home yet, as last logged
        self._members_taken = b""  # the digest of the last membership document taken

    # --- what the agent reads -------------------------------------------------------

    @property
    def city(self) -> City | None:
        """The city as far as this device verified it (None: no root key, or nothing learned yet)."""
        return self._city

    @property
    def home(self) -> str:
        """The home gateway's id."""
        return self._home_topics.gateway

    @property
    def home_key(self) -> bytes:
        """The key that signed for the home when the device moved there (or the configured one); the
        home's later rotations are the agent's per-gateway state."""
        return self._home_key

    @property
    def home_topics(self) -> HomeTopics:
        return self._home_topics

    @property
    def decided_move(self) -> Move | None:
        """The move `check_home` decided on, while the worker has not made it."""
        return self._decided

    def subscriptions(self) -> tuple[tuple[str, int], ...]:
        """The home's topics a connection subscribes to (statuses only while the home is quiet: `check_home`)."""
        here = self._home_topics
        subscriptions = ((here.task, 1), (here.receipt, 1), (here.keys, 1))
        if self._config.roams:
            subscriptions += ((here.members, 1),)
        return subscriptions

    def subscribed_topics(self) -> list[str]:
        """Every topic subscribed for the home now: its own and the statuses watched."""
        return [t for t, _ in self.subscriptions()] + [topics.status(g) for g in sorted(self._watched)]

    # --- the home's signs of life ---------------------------------------------------

    def keep_status(self, topic: str, payload: bytes) -> bool:
        """MQTT's thread: file a gateway's status for the loop (only the newest counts: `check_home` reads
        it). True when `topic` is a status topic, which a roaming device takes nothing else from."""
        if not (self._config.roams and topic.endswith("/status")):
            return False
        gateway = topic[len(topics.ROOT) + 1:-len("/status")]
        if topic == topics.status(gateway):
            self._sightings.put(gateway, payload)
        return True

    def heard(self, now: float) -> None:
        """The home spoke (a message it signed), or the device (re)connected: see `HomeWatch.heard`."""
        self._watch.heard(now)

    def quiet_for(self, now: float) -> float:
        return self._watch.quiet_for(now)

    def check_home(self, now: float) -> HomeCheck:
        """The loop's look at the home (every half second), as the module doc says: once it has been quiet
        for half the timeout, its status; at three quarters, the other members'; at the timeout (at once for
        a home the operator retired), decide to move the device to the one `choose_home` picks."""
        refused = []
        for gateway, payload in self._sightings.take().items():
            if gateway not in self._watched:
                continue  # a late one, let go of already
            state = status_state(payload)
            if payload and state is None:
                refused.append("status_malformed")
                event(log, "status.refused", logging.WARNING, gateway=gateway, reason="status_malformed")
            if gateway == self.home:
                if serves(state):
                    self._watch.heard(now)
            else:
                self._member_states[gateway] = state
        if self._decided is not None:
            return HomeCheck(refused=refused)  # the worker is on it
        city, after, home = self._city, self._config.rehome_after_s, self.home
        retired = city is not None and home in city.departed
        quiet = self._watch.quiet_for(now)
        others = sorted(g for g in city.members if g != home) if city is not None else []
        unsubscribe, subscribe = self._watch_statuses(([home] if quiet >= after / 2 else [])
                                                      + (others if retired or quiet >= after * 3 / 4 else []))
        if not retired and quiet < after:
            self._waiting = ""
            return HomeCheck(unsubscribe, subscribe, refused)
        serving = [g for g in others if serves(self._member_states.get(g))]
        target = choose_home(self._device, serving, self._config.prefer)
        if target is None:
            why = "no_membership" if city is None else "no_member_serving"
            if why != self._waiting:  # once per reason, not every half second
                event(log, "agent.rehome_waiting", logging.WARNING, gateway=home, reason=why,
                      quiet_s=round(quiet, 1), members=len(others))
                self._waiting = why
            return HomeCheck(unsubscribe, subscribe, refused)
        self._decided = Move(target, "left_city" if retired else "quiet", quiet)
        return HomeCheck(unsubscribe, subscribe, refused, move=True)

    def _watch_statuses(self, gateways: list[str]) -> tuple[list[str], list[tuple[str, int]]]:
        """Watch exactly these gateways' statuses from now on: the topics to unsubscribe and to subscribe
        (QoS 0: a persistent session need not queue stale ones; retained: each says at once where it stands)."""
        wanted = set(gateways)
        gone, new = self._watched - wanted, wanted - self._watched
        for gateway in gone:
            self._member_states.pop(gateway, None)
        self._watched = wanted
        return [topics.status(g) for g in sorted(gone)], [(topics.status(g), 0) for g in sorted(new)]

    # --- the city -------------------------------------------------------------------

    def _load_city(self) -> City | None:
        """The city as far as this device knows it: `[city] genesis` and the membership kept from before, both
        checked against the root key (a kept document that no longer checks out is dropped, and learned again)."""
        root = self._config.gateway_root_key
        if root is None:
            return None
        city = City.from_genesis(self._config.city_genesis, root) if self._config.city_genesis else None
        kept = self._store.load_members()
        if kept is not None:
            try:
                learned = City.from_document(kept, root, city.genesis.id if city else None)
                city = learned if city is None else city.merge(learned)
            except ProtocolError as exc:
                event(log, "members.discarded", logging.WARNING, reason=exc.reason, detail=exc.detail)
        return city

    def learn_members(self, payload: bytes) -> None:
        """A gateway's membership document (retained, not empty; the agent refuses one without the root key):
        what it adds to the city this device knows, if the root key signed every part of it (else
        `MembershipRefused`, counted by its reason)."""
        root = self._config.gateway_root_key
        digest = sha256(payload)
        if digest == self._members_taken:
            return  # the same retained document again (every reconnect brings it): checked once is enough
        city = self._city
        learned = City.from_document(payload, root, city.genesis.id if city else None)
        merged = learned if city is None else city.merge(learned)
        self._members_taken = digest
        if city is not None and merged.ids() == city.ids():
            return
        self._store.save_members(merged.encode())
        self._city = merged
        event(log, "city.members", city=merged.name, members=",".join(sorted(merged.members)),
              departed=",".join(sorted(merged.departed)) or "-", vertices=len(merged.vertices))

    # --- the move (the agent's worker, between two messages) ---------------------------

    def next_move(self) -> tuple[Move, Member] | None:
        """The move decided on, with its member gateway as the city says now; None if it left the city
        meanwhile (the decision is dropped then: the loop decides again)."""
        move = self._decided or Move("", "", 0.0)
        member = self._city.members.get(move.to) if self._city is not None else None
        if member is None:
            self._decided = None
            return None
        return move, member

    def move_to(self, move: Move, member: Member) -> None:
        """Make `member` home: on disk first (from here on a power cut wakes the device up there), then its
        key and topics. The agent then renews its per-gateway state and its connection, and calls `arrived`."""
        self._store.save_home(Home(move.to, member.key.hex(), self._config.gateway_id, time.time(), self.home))
        self._home_key = member.key
        self._home_topics = HomeTopics.at(move.to, self._device)

    def arrived(self, now: float) -> None:
        """The device is connecting at its new home: the home's quiet counts from now, no status is watched,
        and the loop may decide again."""
        self._watch = HomeWatch(now)
        self._watched, self._member_states, self._waiting = set(), {}, ""
        self._decided = None
