"""The models a task names: fetched from the home gateway, checked, kept (`Downloads`).

A task names its base model by digest. `Downloads.fetch` returns its weights: from memory when this device
holds that model, else downloaded, checked, trusted (`Downloads.remember`, in the agent's state on disk) and
handed to inference. It raises `Refused` (or `ProtocolError`) with the reason the agent counts and logs for
the task.

Release checks: a model must hash to the digest the task names, and its gateway-signed release must pass
`Downloads.check_release`: it expires (`model_no_expiry`, from the schema) and has not expired
(`model_expired`), fits this device's model (`model_architecture_mismatch`), is
not older than the version already trusted (`model_rollback`), names the digest
already trusted under its version (`model_version_conflict`), and was not signed
long before the newest release this device knows (`model_frozen`: its expiry is
more than `[model] freeze_window_s` older than the newest expiry accepted).

Downloads: a task whose model has a published delta names its base (`Task.delta_base`); a device holding
that model (the one it keeps in memory, `Downloads.cached`) fetches the signed delta (`schemas.ModelDelta`,
which passes every release check above), rebuilds the model (`tensors.apply_delta`) and keeps it only if it
hashes to the task's digest. Any other device, and one whose delta fails in any way, fetches the full
release as before: a failed delta is counted by reason (`Counters.delta_refused`) and logged once, never
a refused task.

Threads: the worker thread fetches; paho's network thread only files the pieces it waits for
(`Downloads.file`) and wakes it. Pieces arrive on the home's retained topics, subscribed to for one fetch:
`model/<digest>` (the signed release, with the model attached when it is one chunk), `model/<digest>/<i>`
(its chunks) and `model/delta/<digest>`. Anything else under `model/` is dropped: memory is scarce.

What it uses of the agent is handed to it, never reached for: the home and the connection (both replaced
when the device re-homes, so asked for at each fetch), the opening of a gateway-signed envelope, and the
agent's current state, of which it alone writes the release trust (`trusted_version`, `trusted_digest`,
`newest_expires`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from mqttlink import Connection
from protocol import envelope, schemas, topics
from protocol.digest import sha256
from protocol.errors import ProtocolError
from protocol.logs import event
from protocol.tensors import apply_delta

from .state import AgentState, StateStore

log = logging.getLogger("starling.agent")

MODEL_WAIT_S = 30.0
DELTA_WAIT_S = 10.0  # a delta the task names is retained already; if it is not there, the full model is

Weights = dict[str, np.ndarray]


class Refused(Exception):
    """A well-formed message this device will not act on, with a short reason (the agent's every refusal)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Downloads:
    """The model cache (only the newest model: memory is scarce) and the pieces of the one being fetched.

    `home()` and `connection()` are the home gateway's id and the MQTT connection now; `open_signed(payload,
    type)` opens a message the home signed (raising `Refused` or `ProtocolError`); `state()` is the agent's
    state now, saved with `store`. Each fetch is tallied in `counters` (`downloads`, `delta_refused`), and
    each accepted release that is the newest trusted goes to `install(weights, version, digest_hex)`.
    `flashed` is the model the device was flashed with: while the state trusts no release, its weights are
    the model cached (`_flashed_cache`).
    """

    def __init__(
        self, *, home: Callable[[], str], connection: Callable[[], Connection],
        open_signed: Callable[[bytes, str], envelope.Envelope], state: Callable[[], AgentState],
        store: StateStore, counters, weight_shapes: dict[str, tuple[int, ...]], architecture: str,
        freeze_window_s: float, flashed, install: Callable[[Weights, int, str], None] | None = None,
    ) -> None:
        self._home = home
        self._connection = connection
        self._open_signed = open_signed
        self._state = state
        self._store = store
        self._counters = counters
        self._weight_shapes = weight_shapes
        self._architecture = architecture
        self._freeze_window_s = freeze_window_s
        self._install = install
        self._models = _flashed_cache(flashed, state())  # digest -> weights: the worker's alone
        self._arrived = threading.Condition()  # guards what paho's thread files below, and wakes the worker
        self._raw_models: dict[int, bytes] = {}  # -1: the release; 0..n-1: its chunks
        self._wanted: bytes | None = None
        self._wanted_delta: bytes | None = None  # the model whose delta is awaited ...
        self._raw_delta: bytes | None = None  # ... and its signed message, once here

    # --- what the agent calls ---------------------------------------------------------------

    @property
    def awaited(self) -> bytes | None:
        """The digest of the model whose full release is being fetched now (None while none is)."""
        with self._arrived:
            return self._wanted

    @property
    def cached(self) -> list[bytes]:
        """The digests of the models held in memory (at most one)."""
        return list(self._models)

    def forget(self) -> None:
        """Drop the models held in memory (a new home: its lineage is fetched afresh)."""
        self._models = {}

    def file(self, rest: str, payload: bytes) -> None:
        """A message under the home's model topics (paho's thread; `rest`: its topic after `model/`): kept,
        and the worker woken, when it is a piece of what is being fetched; dropped otherwise."""
        digest_hex, _, index = rest.partition("/")
        if digest_hex == topics.DELTA:
            with self._arrived:
                if self._wanted_delta is not None and index == self._wanted_delta.hex() and payload:
                    self._raw_delta = payload
                    self._arrived.notify_all()
            return
        with self._arrived:
            if self._wanted is None or digest_hex != self._wanted.hex() or not payload:
                return  # not the model we wait for (or a cleared retained message): memory is scarce
            if index == "":
                self._raw_models[-1] = payload  # the signed release
            elif index.isdigit() and int(index) < schemas.MAX_CHUNKS:
                self._raw_models[int(index)] = payload
            self._arrived.notify_all()

    def fetch(self, digest: bytes, delta_base: bytes = b"") -> Weights:
        """The weights with content address `digest`: from cache, rebuilt from the delta the task names when
        this device holds its base (`delta_base`), else from the retained release (and chunks)."""
        if digest in self._models:
            return self._models[digest]
        if delta_base and delta_base in self._models:
            try:
                weights, release, received = self._fetch_delta(digest, delta_base)
            except (ProtocolError, Refused) as exc:
                self._counters.delta_refused[exc.reason] = self._counters.delta_refused.get(exc.reason, 0) + 1
                event(log, "model.delta_refused", logging.WARNING, digest=digest.hex()[:16], reason=exc.reason,
                      detail=str(exc), then="full")
            else:
                return self._keep(digest, weights, release, "delta", received)
        weights, release, received = self._fetch_full(digest)
        return self._keep(digest, weights, release, "full", received)

    # --- fetching ----------------------------------------------------------------------------

    def _fetch_delta(self, digest: bytes, base: bytes) -> tuple[Weights, schemas.ModelRelease, int]:
        """Model `digest` rebuilt from its signed delta on the cached model `base`; raises `Refused` or
        `ProtocolError` (the caller falls back to the full model) for anything amiss."""
        address = topics.model_delta(self._home(), digest.hex())
        with self._arrived:
            self._wanted_delta, self._raw_delta = digest, None
        conn = self._connection()
        conn.subscribe([(address, 1)])
        try:
            self._wait_for(lambda: self._raw_delta is not None, time.monotonic() + DELTA_WAIT_S, "delta_unavailable")
            received = len(self._raw_delta)
            env = self._open_signed(self._raw_delta, "delta")  # signature, key, gateway, attachment digest
        finally:
            conn.unsubscribe([address])
            with self._arrived:
                self._wanted_delta, self._raw_delta = None, None
        delta = schemas.ModelDelta.from_body(env.body)
        release = delta.release()
        self.check_release(release, digest)  # expiry, architecture, rollback, version conflict, freeze window
        if delta.base != base:
            raise Refused("delta_base_mismatch")  # not a step from the model this device holds
        if env.attachment is None or len(env.attachment) != delta.size:
            raise Refused("delta_size_mismatch")
        step = schemas.decode_delta(env.attachment, delta.codec)
        if {k: v.shape for k, v in step.items()} != self._weight_shapes:
            raise Refused("delta_shape_mismatch")
        weights = apply_delta(self._models[base], step)
        if sha256(schemas.encode_model(weights)) != digest:
            raise Refused("delta_digest_mismatch")  # signed, yet it does not rebuild the model the task names
        return weights, release, received

    def _fetch_full(self, digest: bytes) -> tuple[Weights, schemas.ModelRelease, int]:
        """The model `digest` from its retained release (and chunks), every release check passed; with the
        bytes received."""
        address = topics.model(self._home(), digest.hex())
        with self._arrived:
            self._wanted, self._raw_models = digest, {}
        # Offline (a task saved before a power cut), the connection subscribes once it is up.
        conn = self._connection()
        conn.subscribe([(address, 1), (address + "/+", 1)])
        deadline = time.monotonic() + MODEL_WAIT_S
        try:
            self._wait_for(lambda: -1 in self._raw_models, deadline)
            env = self._open_signed(self._raw_models[-1], "model")
            release = schemas.ModelRelease.from_body(env.body)  # expires == 0: NoExpiry, "model_no_expiry"
            self.check_release(release, digest)
            if release.chunks == 1:
                model = env.attachment
            else:
                self._wait_for(lambda: all(i in self._raw_models for i in range(release.chunks)), deadline)
                model = b"".join(self._raw_models[i] for i in range(release.chunks))
            if model is None or len(model) != release.size or sha256(model) != digest:
                raise Refused("model_digest_mismatch")
            received = len(self._raw_models[-1]) + (len(model) if release.chunks > 1 else 0)
        finally:
            conn.unsubscribe([address, address + "/+"])
            with self._arrived:
                self._wanted, self._raw_models = None, {}
        weights = schemas.decode_model(model)
        if {k: v.shape for k, v in weights.items()} != self._weight_shapes:
            raise Refused("model_shape_mismatch")
        return weights, release, received

    def _keep(self, digest: bytes, weights: Weights, release: schemas.ModelRelease, how: str,
              received: int) -> Weights:
        """An accepted model: trusted, cached (only the newest: memory is scarce), handed to inference."""
        event(log, "model.fetched", digest=digest.hex()[:16], version=release.version, how=how, bytes=received)
        self.remember(release)
        self._models = {digest: weights}
        self._counters.downloads[how] = self._counters.downloads.get(how, 0) + 1
        if self._install is not None and digest.hex() == self._state().trusted_digest:  # the newest one trusted
            self._install(weights, release.version, digest.hex())
        return weights

    def _wait_for(self, pieces: Callable[[], bool], deadline: float, reason: str = "model_unavailable") -> None:
        with self._arrived:
            while not pieces():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Refused(reason)
                self._arrived.wait(left)

    # --- trusting releases ---------------------------------------------------------------------

    def check_release(self, release: schemas.ModelRelease, digest: bytes) -> None:
        """Refuse (raise `Refused`) a gateway-signed release this device must not act on, each for its reason.

        The freeze window (`model_frozen`): the rollback rule and one digest per version already keep a
        device from being moved back to an older model, and an honest gateway signs versions in order, so a
        stale release of a higher version still carries a newer model than the device trusts: the window
        guards no model choice of its own. What it adds is a staleness bound that does not rest on the
        device's clock (a Pi has no battery-backed clock: booted behind, it takes an expired release for a
        live one): a release whose expiry is more than `freeze_window_s` older than the newest expiry this
        device accepted from its gateway was signed that long before a release it already knows, so it is
        refused at any version: an old signed copy a broker replays, or a release from a gateway whose clock
        went back. A gateway with a sane clock and a constant `release_ttl_s` that signs its models in
        version order never trips it (README, "Enrollment, revocation, releases", says what does).
        """
        state = self._state()
        if release.digest != digest:
            raise Refused("model_digest_mismatch")  # not the model the task names
        if time.time() > release.expires:
            raise Refused("model_expired")
        if self._architecture and release.architecture != self._architecture:
            raise Refused("model_architecture_mismatch")
        if release.version < state.trusted_version:
            raise Refused("model_rollback")
        if release.version == state.trusted_version and state.trusted_digest not in ("", release.digest.hex()):
            raise Refused("model_version_conflict")
        if release.expires < state.newest_expires - self._freeze_window_s:
            raise Refused("model_frozen")

    def remember(self, release: schemas.ModelRelease) -> None:
        """An accepted release: trust its version and digest, and keep the newest expiry seen (on disk)."""
        state = self._state()
        before = (state.trusted_version, state.trusted_digest, state.newest_expires)
        if release.version > state.trusted_version or not state.trusted_digest:  # "": a state from before digests
            state.trusted_version, state.trusted_digest = release.version, release.digest.hex()
        state.newest_expires = max(state.newest_expires, release.expires)
        if (state.trusted_version, state.trusted_digest, state.newest_expires) != before:
            self._store.save(state)  # only on a change: a republished release with the same expiry writes nothing


def _flashed_cache(model, state: AgentState) -> dict[bytes, Weights]:
    """The model cache a device starts with: the weights it was flashed with, by their digest, while it
    trusts no release yet. A gateway's lineage starts from the same family's initial weights, so a new
    device needs no download for the first model, and takes the next one as a delta from it. A device
    that trusts a release starts empty: each model it is asked for again passes the release checks
    (a rollback to the initial model among them)."""
    if state.trusted_version > 0 or state.trusted_digest or state.newest_expires:
        return {}
    weights = model.get_weights()
    return {sha256(schemas.encode_model(weights)): weights}
