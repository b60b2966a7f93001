"""The emulator's attacks: each one small class that hooks the real agent at the narrowest point
(`hw.adversary` makes one by name and runs the agent with it).

    attack            hook                                   what the gateway does (reason)
    sign_flip         the trained delta, decoded and negated  accepts it (validly signed); robust strategies
    scaling           ... multiplied by --scale (10)          accepts it; robust strategies / norm bounds
    gaussian_noise    ... replaced by N(0, sigma) noise       accepts it; robust strategies
    label_flip        training labels y -> C-1-y              accepts it; robust strategies
    free_rider        a zero delta, plausible example count   accepts it; contribution accounting in the ledger
    replay            re-sends its first accepted reply       `replay` (while the gateway remembers that round,
                      instead of answering later rounds        REMEMBER_ROUNDS = 2), then `stale_round`
    forged_signature  one byte of each reply's signature      `bad_signature` (no receipt: the device re-sends)
    sybil             a fresh key, no voucher; pushes         enroll: `no_voucher` / `not_allowed`; its pushed
                      unsolicited updates while unenrolled     updates: `unknown_device`. Under policy "open" it
                                                               is enrolled and acts as its payload attack.
    inflate_examples  the training reply's example count      accepts it (the claim is in the signed reply);
                      (--claim, 10,000,000) and a sign flip    the [aggregation] weights rule caps what it
                      boosted --scale times (default 4)        weighs ("capped": 2 x the median claim)
    crafted           "A little is enough" (Baruch et al.     accepts it; it hides inside the honest spread:
                      2019): the colluders' coordinate-wise    robust rules and norm bounds barely see it
                      mean minus z x their std, z from the
                      paper's formula (--fleet-size) or --z
    under_bound       -0.99 x --bound-multiple x its honest   accepts it; a [defense] median_multiple bound of
                      delta: flipped, just inside the bound    that multiple does not cut it (robust rules may)

The update attacks (sign_flip, scaling, gaussian_noise, free_rider) wrap
`agent.learner.train`: `agent.service` is given a view of `agent.learner`
(`_LearnerView`) whose `train` applies the attack of the agent whose worker
thread is calling, and is the real `train` for every other agent, so honest
and adversarial agents can share one process. The update is decoded with
`schemas.decode_update`, transformed, and re-encoded with the task's codec,
then sealed and signed by the unchanged agent code.

inflate_examples changes the `examples` of the outcome its `train` returns:
the agent signs `{"examples": outcome.examples}`, so the inflated claim is
what the device signs (only training replies; its evaluation replies claim
their true counts, so the run's accuracy stays the fleet's). crafted needs
its colluders' honest deltas: each writes its own to the rendezvous folder
`--collude DIR` (`<DIR>/<round>-<task>/<device id>.npz`, atomically), waits
until `--colluders` of them are there or COLLUDE_WAIT_S passed, and computes
mu and sigma over what it finds (`Crafted` says what it does alone).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from agent import learner as _learner
from agent import service as _service
from agent.config import AgentConfig
from agent.samples import LocalData
from agent.service import Agent
from protocol import cbor, envelope, schemas
from protocol.atomic import write_atomic
from protocol.keys import Identity
from protocol.logs import event

log = logging.getLogger("starling.adversary")

SYBIL_RETRY_S = 0.5  # how often a sybil asks to enroll (and pushes an update) again
INFLATED_CLAIM = 10_000_000  # protocol.schemas.MAX_EXAMPLES: the largest claim a reply may carry
INFLATE_SCALE = 4.0  # inflate_examples sends -INFLATE_SCALE x its honest delta (boosted, as attacks.toml)
COLLUDE_WAIT_S = 5.0  # crafted: how long a colluder waits for the others' deltas
BOUND_MULTIPLE = 2.0  # under_bound: the gateway's default [defense] median_multiple
Train = Callable[..., _learner.Outcome]


# --- the attacks ---------------------------------------------------------------------------


class Attack:
    """An honest device: every hook leaves the agent as it is. Subclasses change one thing."""

    name = "none"

    def identity(self, identity: Identity) -> Any:
        """The identity the agent signs with."""
        return identity

    def config(self, config: AgentConfig) -> AgentConfig:
        """The config the agent runs with."""
        return config

    def train_data(self, data: LocalData) -> LocalData:
        """The windows (and labels) a training round uses."""
        return data

    def train(self, real_train: Train, model, base, data, task: schemas.Task, rng, max_seconds: float = 0.0,
              max_samples: int = 0) -> _learner.Outcome:
        """The outcome of a training task (default: the honest learner's)."""
        return real_train(model, base, data, task, rng, max_seconds, max_samples)

    def intercept_task(self, agent: Agent, payload: bytes) -> bool:
        """Handle a task instead of the agent (True), or leave it to the agent (False)."""
        return False

    def begin_task(self, exchange: str) -> None:
        """Called before the agent handles a task: its exchange, `<round>-<task id>` ("" if unreadable)."""

    def after_task(self, agent: Agent, payload: bytes) -> None:
        """Called after the agent answered a task."""

    def after_enroll(self, agent: Agent) -> None:
        """Called after the agent sent an enrollment request (every enroll_retry_s while unenrolled)."""


class UpdateAttack(Attack):
    """Changes the delta a device sends; the honest agent code seals and signs it.

    `trains`: whether the device really trains first (False: a plausible outcome without the cost).
    `sent` keeps the last few (honest attachment, sent attachment) pairs, for tests and reports.
    """

    trains = True

    def __init__(self) -> None:
        self.sent: deque[tuple[bytes, bytes]] = deque(maxlen=8)

    def transform(self, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def train(self, real_train: Train, model, base, data, task, rng, max_seconds=0.0, max_samples=0):
        if self.trains:
            honest = real_train(model, base, data, task, rng, max_seconds, max_samples)
        else:
            honest = plausible_outcome(model, base, data, task, max_samples)
        out = tamper(honest, self.transform, task)
        self.sent.append((honest.attachment, out.attachment))
        return out


def tamper(outcome: _learner.Outcome, transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
           task: schemas.Task) -> _learner.Outcome:
    """`outcome` with its delta decoded, transformed and re-encoded in the task's codec (and topk density;
    metrics and count kept)."""
    delta, metrics = schemas.decode_update(outcome.attachment)
    changed = {k: np.asarray(v, np.float32) for k, v in transform(delta).items()}
    return _learner.Outcome(encode_for(task, changed, metrics), outcome.examples, outcome.metrics)


def encode_for(task: schemas.Task, delta: dict[str, np.ndarray], metrics: dict[str, float]) -> bytes:
    """An update attachment as `task` asks for it: its codec, and its density under topk."""
    return schemas.encode_update(delta, metrics, task.codec, task.density)


def plausible_outcome(model, base: dict[str, np.ndarray], data: LocalData, task: schemas.Task,
                      max_samples: int = 0) -> _learner.Outcome:
    """What an honest device would report for this task, without training: a zero delta, the example
    count and step count training would have had, and the base model's loss on one batch."""
    n = min(len(data.x_train), max_samples) if max_samples else len(data.x_train)
    batch = int(getattr(model, "batch_size", 32))
    metrics = {"train_loss": _base_loss(model, base, data, batch), "steps": float(task.config.epochs * -(-n // batch))}
    if "clipping_norm" in task.config.options:
        metrics["norm_bit"] = 0.0
    delta = {k: np.zeros_like(np.asarray(v, np.float32)) for k, v in base.items()}
    return _learner.Outcome(encode_for(task, delta, metrics), n, metrics)


def _base_loss(model, base, data: LocalData, batch: int) -> float:
    try:  # one forward pass: cheap, and a loss in the right range
        model.set_weights(base)
        x, y = data.x_train[:batch], data.y_train[:batch]
        if getattr(model, "task", "classification") == "classification":
            loss = float(model.evaluate(x, y)[0])
        else:
            loss = float(model.metrics(x)["loss"])
        return loss if math.isfinite(loss) and loss >= 0 else 1.0
    except Exception:  # a loss is only decoration here
        return 1.0


class SignFlip(UpdateAttack):
    """Sends -1 x its honest delta: pushes the global model away from the optimum.

    Validly signed, so the gateway accepts it; FedAvg is dragged backwards, while Krum, median or
    trimmed-mean strategies should discard or outvote it."""

    name = "sign_flip"

    def transform(self, delta):
        return {k: -v for k, v in delta.items()}


class Scaling(UpdateAttack):
    """Sends `scale` x its honest delta (model boosting / replacement): one device dominates a mean.

    Accepted by the gateway; robust aggregation or a server-side norm bound (clipping) should limit it.
    It ignores a client-side `clipping_norm` (it scales after the honest learner clipped)."""

    name = "scaling"

    def __init__(self, scale: float = 10.0) -> None:
        super().__init__()
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
        self.scale = float(scale)

    def transform(self, delta):
        return {k: v * np.float32(self.scale) for k, v in delta.items()}


class GaussianNoise(UpdateAttack):
    """Sends N(0, sigma) noise instead of a delta, without training: a broken or malicious device
    that adds noise. Accepted by the gateway; robust strategies should discard it."""

    name = "gaussian_noise"
    trains = False

    def __init__(self, sigma: float = 1.0, seed: int | None = None) -> None:
        super().__init__()
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be a finite non-negative number, got {sigma}")
        self.sigma = float(sigma)
        self.rng = np.random.default_rng(seed)

    def transform(self, delta):
        return {k: self.rng.normal(0.0, self.sigma, size=v.shape).astype(np.float32) for k, v in delta.items()}


class FreeRider(UpdateAttack):
    """Sends a zero delta with a plausible example count and loss, never training: it takes the
    global model (and any reward for contributing) for free. Accepted by the gateway (a zero update
    is a valid update); it dilutes FedAvg by its example count, and the ledger's contribution records
    (identical zero-update digests across rounds and devices) are how an auditor finds it."""

    name = "free_rider"
    trains = False

    def transform(self, delta):
        return delta  # plausible_outcome's delta is already all zeros


def flip_labels(data: LocalData, num_classes: int) -> LocalData:
    """The training labels mapped y -> num_classes - 1 - y; test windows untouched."""
    return dataclasses.replace(data, y_train=(num_classes - 1 - np.asarray(data.y_train)).astype(data.y_train.dtype))


class LabelFlip(Attack):
    """Trains honestly on wrong labels (y -> C-1-y): data poisoning, as from a mislabelled or
    malicious sensor. Its update is an honest update of a poisoned model, validly signed: the
    gateway accepts it and only robust aggregation can limit its pull."""

    name = "label_flip"

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"label_flip needs at least 2 classes, got {num_classes}")
        self.num_classes = int(num_classes)

    def train_data(self, data):
        return flip_labels(data, self.num_classes)


def _task_key(agent: Agent, payload: bytes) -> tuple[str, schemas.Task]:
    env = agent._open_from_gateway(payload, "task")  # a bad task raises as it would for the agent itself
    return f"{env.ctx.round:06d}-{env.ctx.task}", schemas.Task.from_body(env.body)


class Replay(Attack):
    """Answers its first training task honestly, keeps that signed reply, and re-sends it in place
    of every later training reply (a device that saves effort, or an attacker replaying captured
    traffic). The signature binds the reply to its round, task and base model: the gateway refuses
    it `replay` while it remembers the accepted original, `stale_round` once it forgot that round,
    and the device's later tasks go unanswered until their deadlines."""

    name = "replay"

    def __init__(self) -> None:
        self.captured: bytes | None = None
        self.replayed = 0

    def intercept_task(self, agent, payload):
        if self.captured is None:
            return False
        key, task = _task_key(agent, payload)
        if task.kind != "train" or task.device != agent.identity.id or key in agent.state.answered:
            return False
        agent.counters.tasks += 1
        agent.state.answered = [*agent.state.answered, key][-_service.ANSWERED_KEPT:]
        agent.store.save(agent.state)  # a redelivered task is not replayed twice
        agent.conn.publish(agent.t_reply, self.captured, qos=1)
        agent.counters.replies_sent += 1
        self.replayed += 1
        old = envelope.decode(self.captured).ctx
        event(log, "attack.replay", task=key, replayed_round=old.round, replayed_task=old.task)
        return True

    def after_task(self, agent, payload):
        if self.captured is not None:
            return
        key, task = _task_key(agent, payload)
        wire = agent.store.read_pending(key) if task.kind == "train" else None
        if wire is not None and envelope.decode(wire).attachment is not None:  # a real update, not a skip
            self.captured = wire


class _ForgingIdentity:
    """Signs like the device, but one byte of every reply signature is flipped."""

    def __init__(self, real: Identity) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sign(self, message: bytes) -> bytes:
        sig = self._real.sign(message)
        return forge(sig) if signed_type(message) == "reply" else sig


def forge(sig: bytes) -> bytes:
    """`sig` with its first byte flipped: the same length, and it no longer verifies."""
    return bytes([sig[0] ^ 0xFF]) + sig[1:]


def signed_type(message: bytes) -> str:
    """The message type inside the bytes an envelope signature covers ("" if they are not those)."""
    if not message.startswith(envelope.DOMAIN):
        return ""
    try:
        doc = cbor.loads(message[len(envelope.DOMAIN):])
    except Exception:
        return ""
    return doc.get("type", "") if isinstance(doc, dict) else ""


class ForgedSignature(Attack):
    """Trains honestly but every reply's signature fails to verify (one byte flipped): models an
    update tampered with in transit, or sent in an enrolled device's name without its key. The
    gateway refuses it `bad_signature` before any other use, sends no receipt (it cannot know who
    sent it), and the device keeps re-sending it every resend_s. Enrollment stays validly signed."""

    name = "forged_signature"

    def identity(self, identity):
        return _ForgingIdentity(identity)


class Sybil(Attack):
    """A fresh, unenrolled identity with no voucher (one of many an attacker can mint).

    Where the gateway's policy needs a voucher (or an allow-list), its enrollment is refused
    (`no_voucher` / `not_allowed`), it gets no tasks, and the updates it pushes anyway on every
    enrollment retry are refused `unknown_device` (stage 1, no signature check spent, no receipt).
    Under policy "open" (emulator only) it is enrolled and then behaves as its `payload` attack:
    its updates are validly signed and accepted, which is why open enrollment is emulator-only.
    """

    name = "sybil"

    def __init__(self, payload: Attack | None = None) -> None:
        self.payload = payload or Attack()
        self.enroll_attempts = 0
        self.pushed = 0

    def config(self, config):
        # An attacker hammers: it asks again twice a second, where an honest device waits enroll_retry_s.
        return dataclasses.replace(self.payload.config(config), voucher=None,
                                   enroll_retry_s=min(config.enroll_retry_s, SYBIL_RETRY_S))

    def identity(self, identity):
        return self.payload.identity(identity)

    def train_data(self, data):
        return self.payload.train_data(data)

    def train(self, real_train, model, base, data, task, rng, max_seconds=0.0, max_samples=0):
        return self.payload.train(real_train, model, base, data, task, rng, max_seconds, max_samples)

    def intercept_task(self, agent, payload):
        return self.payload.intercept_task(agent, payload)

    def after_task(self, agent, payload):
        self.payload.after_task(agent, payload)

    def after_enroll(self, agent):
        self.enroll_attempts += 1
        if self.enroll_attempts < 2 or agent.state.enrolled:
            return  # the first request may well be admitted (policy "open"): push only once refused
        self.pushed += 1
        agent.conn.publish(agent.t_reply, unsolicited_reply(agent.identity, agent.config.gateway_id,
                                                              agent.weight_shapes, self.pushed), qos=1)
        event(log, "attack.sybil_push", n=self.pushed)


def unsolicited_reply(identity, gateway_id: str, shapes: dict[str, tuple[int, ...]], round_: int) -> bytes:
    """A signed training reply nobody asked for: small random delta, plausible metrics."""
    rng = np.random.default_rng(round_)
    delta = {k: rng.normal(0.0, 0.1, size=s).astype(np.float32) for k, s in shapes.items()}
    attachment = schemas.encode_update(delta, {"train_loss": 1.0, "steps": 2.0}, "i8")
    ctx = envelope.Context(identity.public_key, gateway_id, round_, f"train-{round_}-sybil", b"")
    return envelope.seal(identity, "reply", ctx, {"examples": 64}, attachment)


# --- trust: weights and bounds -------------------------------------------------------------


class InflateExamples(UpdateAttack):
    """Claims `claim` examples (default 10,000,000, the most a reply may carry) for every training reply
    and sends -`scale` x its honest delta (a sign flip, boosted when scale > 1).

    The claim is the reply's `examples`, which the device's signature covers: the agent seals
    `{"examples": outcome.examples}` of the outcome this attack returns, so the gateway gets a validly
    signed inflated claim and accepts it. Under `[aggregation] weights = "reported"` (Flower's default)
    FedAvg weighs it ~claim / (claim + the fleet's honest examples), ~1: the flipped update replaces
    the round's model step. Under "capped" it weighs at most 2 x the median claim. Evaluation replies
    keep their true counts (the run's accuracy stays a fleet-wide figure)."""

    name = "inflate_examples"

    def __init__(self, scale: float = INFLATE_SCALE, claim: int = INFLATED_CLAIM) -> None:
        super().__init__()
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number (it sends -scale x its delta), got {scale}")
        if not 1 <= claim <= schemas.MAX_EXAMPLES:
            raise ValueError(f"claim must be between 1 and {schemas.MAX_EXAMPLES}, got {claim}")
        self.scale = float(scale)
        self.claim = int(claim)

    def transform(self, delta):
        return {k: v * np.float32(-self.scale) for k, v in delta.items()}

    def train(self, real_train, model, base, data, task, rng, max_seconds=0.0, max_samples=0):
        out = super().train(real_train, model, base, data, task, rng, max_seconds, max_samples)
        return _learner.Outcome(out.attachment, self.claim, out.metrics)


def alie_z(devices: int, attackers: int) -> float:
    """Baruch et al. 2019's z_max for `devices` participants of which `attackers` collude: with
    s = floor(n/2 + 1) - m honest devices needed as "supporters", z_max = Phi^-1((n - s) / n)."""
    if not 1 <= attackers <= devices:
        raise ValueError(f"need 1 <= attackers <= devices, got {attackers} of {devices}")
    supporters = devices // 2 + 1 - attackers
    share = (devices - supporters) / devices
    return float(NormalDist().inv_cdf(min(max(share, 1e-6), 1 - 1e-6)))


class Crafted(UpdateAttack):
    """"A little is enough" (Baruch, Baruch and Goldberg, NeurIPS 2019): the colluders send the
    honest updates' coordinate-wise mean shifted against their spread, `mu - z * sigma`, which stays
    inside the spread of honest updates (each coordinate within z standard deviations of the mean),
    so median, trimmed-mean, Krum and norm-bound defences hardly tell it from an honest update.

    mu and sigma (the population std, coordinate-wise) come from the colluders' own honestly trained
    deltas: each writes its delta to `<collude>/<exchange>/<device>.npz` (atomically), waits until
    `colluders` deltas are there or `wait_s` passed, and uses what it finds. Alone (no folder, or no
    other delta arrived in time) it takes its own delta d as mu and |d| as sigma (one sample has no
    spread; on non-IID data honest deltas differ about as much as their own size, coordinate by
    coordinate), so it sends d - z|d|. `z`: given, else the paper's z_max for `fleet` devices and
    `colluders` attackers (`alie_z`), else 1.0."""

    name = "crafted"

    def __init__(self, collude: str | Path | None = None, colluders: int = 1, z: float | None = None,
                 fleet: int | None = None, wait_s: float = COLLUDE_WAIT_S, device: str = "") -> None:
        super().__init__()
        if colluders < 1:
            raise ValueError(f"colluders must be at least 1, got {colluders}")
        if z is not None and not (math.isfinite(z) and z >= 0):
            raise ValueError(f"z must be a finite number >= 0, got {z}")
        self.collude = Path(collude) if collude else None
        self.colluders = int(colluders)
        self.z = float(z) if z is not None else alie_z(fleet, colluders) if fleet else 1.0
        self.wait_s = float(wait_s)
        self.device = device or secrets.token_hex(8)
        self.exchange = ""
        self.seen: list[int] = []  # how many colluders' deltas each crafted update was computed from

    def begin_task(self, exchange):
        self.exchange = exchange

    def transform(self, delta):
        deltas = self.gather(delta)
        self.seen.append(len(deltas))
        return craft(deltas, self.z)

    def gather(self, delta: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Every colluder's honest delta for this exchange (this device's first), as far as they arrive in time."""
        if self.collude is None or not self.exchange:
            return [delta]
        folder = self.collude / self.exchange.replace("/", "_")
        buffer = io.BytesIO()
        np.savez(buffer, **delta)
        write_atomic(folder / f"{self.device}.npz", buffer.getvalue())
        end = time.monotonic() + self.wait_s
        while len(list(folder.glob("*.npz"))) < self.colluders and time.monotonic() < end:
            time.sleep(0.05)
        out = [delta]
        for path in sorted(folder.glob("*.npz")):
            if path.stem == self.device:
                continue
            try:
                with np.load(path) as npz:
                    other = {k: np.asarray(npz[k], np.float32) for k in delta}
            except (OSError, KeyError, ValueError):  # not ours, or not this model's: ignore it
                continue
            if all(other[k].shape == np.shape(delta[k]) for k in delta):
                out.append(other)
        event(log, "attack.collude", exchange=self.exchange, deltas=len(out), z=round(self.z, 4))
        return out


def craft(deltas: list[dict[str, np.ndarray]], z: float) -> dict[str, np.ndarray]:
    """`mu - z * sigma` coordinate-wise over `deltas` (the population std); one delta d: d - z|d|."""
    out = {}
    for k in deltas[0]:
        stack = np.stack([np.asarray(d[k], np.float64) for d in deltas])
        mu = stack.mean(axis=0)
        sigma = stack.std(axis=0) if len(deltas) > 1 else np.abs(stack[0])
        out[k] = (mu - z * sigma).astype(np.float32)
    return out


class UnderBound(UpdateAttack):
    """A sign flip scaled to just under the gateway's norm bound: sends `-0.99 * multiple * d` (norm
    0.99 x multiple x |d|), where `multiple` is the `[defense] median_multiple` it assumes (the README
    names the default, 2.0) and its own honest |d| is its estimate of the round's median update norm.
    A norm bound of that multiple lets it through uncut: it is the strongest flip the bound admits."""

    name = "under_bound"

    def __init__(self, multiple: float = BOUND_MULTIPLE, margin: float = 0.99) -> None:
        super().__init__()
        if not (math.isfinite(multiple) and multiple > 0):
            raise ValueError(f"bound multiple must be a positive number, got {multiple}")
        self.multiple = float(multiple)
        self.margin = float(margin)

    def transform(self, delta):
        return {k: v * np.float32(-self.margin * self.multiple) for k, v in delta.items()}
