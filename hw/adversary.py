"""Adversarial devices for the emulator: the real agent with one thing changed.

    python -m hw.adversary --attack sign_flip --config agent.toml
    python -m hw.adversary --attack scaling --scale 10 --config agent.toml
    python -m hw.adversary --attack gaussian_noise --sigma 1.0 --config agent.toml
    python -m hw.adversary --attack sybil --sybil-payload sign_flip --config agent.toml

The config is the same agent TOML as `starling-agent run --config`, and the
start-up mirrors `agent.cli._run` (replay file or live sensors through
`agent.data_source.open_data`). From the emulator:

    cmd = adversary_command("sign_flip", conf)            # -> [python, "-m", "hw.adversary", ...]
    subprocess.Popen(cmd, env=hw.broker._child_env(), ...)

and in-process (tests): `AdversarialAgent(config, identity, model, data, make_attack("replay")).run(stop)`.

Each attack is one small class that hooks the agent at the narrowest point:

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

The update attacks (sign_flip, scaling, gaussian_noise, free_rider) wrap
`agent.learner.train`: `agent.service` is given a view of `agent.learner`
(`_LearnerView`) whose `train` applies the attack of the agent whose worker
thread is calling, and is the real `train` for every other agent, so honest
and adversarial agents can share one process. The update is decoded with
`schemas.decode_update`, transformed, and re-encoded with the task's codec,
then sealed and signed by the unchanged agent code.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent import learner as _learner
from agent import service as _service
from agent.config import AgentConfig
from agent.samples import LocalData
from agent.service import Agent
from protocol import cbor, envelope, schemas
from protocol.keys import Identity
from protocol.logs import event

log = logging.getLogger("starling.adversary")

ATTACKS = ("sign_flip", "scaling", "gaussian_noise", "label_flip", "free_rider", "replay", "forged_signature", "sybil")
# What a sybil does once a gateway with policy "open" has enrolled it.
SYBIL_PAYLOADS = ("none", "sign_flip", "scaling", "gaussian_noise", "label_flip", "free_rider")
SYBIL_RETRY_S = 0.5  # how often a sybil asks to enroll (and pushes an update) again

# What the gateway should do with each attacker's replies, for the emulator's per-attack report:
# "accepted" (validly signed: only the strategy can defend), or the rejection reasons expected.
EXPECTED = {
    "sign_flip": ("accepted",),
    "scaling": ("accepted",),
    "gaussian_noise": ("accepted",),
    "label_flip": ("accepted",),
    "free_rider": ("accepted",),
    "replay": ("replay", "stale_round"),
    "forged_signature": ("bad_signature",),
    "sybil": ("unknown_device",),  # and its enrollment: no_voucher / not_allowed (accepted under "open")
}

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

    def intercept_task(self, agent: AdversarialAgent, payload: bytes) -> bool:
        """Handle a task instead of the agent (True), or leave it to the agent (False)."""
        return False

    def after_task(self, agent: AdversarialAgent, payload: bytes) -> None:
        """Called after the agent answered a task."""

    def after_enroll(self, agent: AdversarialAgent) -> None:
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
        out = tamper(honest, self.transform, task.codec)
        self.sent.append((honest.attachment, out.attachment))
        return out


def tamper(outcome: _learner.Outcome, transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
           codec: str) -> _learner.Outcome:
    """`outcome` with its delta decoded, transformed and re-encoded in `codec` (metrics and count kept)."""
    delta, metrics = schemas.decode_update(outcome.attachment)
    changed = {k: np.asarray(v, np.float32) for k, v in transform(delta).items()}
    return _learner.Outcome(schemas.encode_update(changed, metrics, codec), outcome.examples, outcome.metrics)


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
    return _learner.Outcome(schemas.encode_update(delta, metrics, task.codec), n, metrics)


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


def make_attack(name: str, *, scale: float = 10.0, sigma: float = 1.0, num_classes: int | None = None,
                payload: str = "sign_flip", seed: int | None = None) -> Attack:
    """The attack called `name` (one of ATTACKS). `num_classes` is needed by label_flip (also as a
    sybil payload); `payload` is what a sybil does once enrolled ("none": train honestly)."""
    if name == "sign_flip":
        return SignFlip()
    if name == "scaling":
        return Scaling(scale)
    if name == "gaussian_noise":
        return GaussianNoise(sigma, seed)
    if name == "free_rider":
        return FreeRider()
    if name == "label_flip":
        if num_classes is None:
            raise ValueError("label_flip needs the model's number of classes")
        return LabelFlip(num_classes)
    if name == "replay":
        return Replay()
    if name == "forged_signature":
        return ForgedSignature()
    if name == "sybil":
        if payload not in SYBIL_PAYLOADS:
            raise ValueError(f"a sybil's payload must be one of {SYBIL_PAYLOADS}, not {payload!r}")
        inner = None if payload == "none" else make_attack(payload, scale=scale, sigma=sigma,
                                                            num_classes=num_classes, seed=seed)
        return Sybil(inner)
    raise ValueError(f"unknown attack {name!r}: one of {', '.join(ATTACKS)}")


# --- the agent with an attack --------------------------------------------------------------

_current = threading.local()  # the attack of the agent whose worker thread is running


class _LearnerView:
    """What `agent.service` sees as `agent.learner`: the real module, except that `train`, called
    from an adversarial agent's worker thread, goes through that agent's attack."""

    def __init__(self, real) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def train(self, *args, **kwargs) -> _learner.Outcome:
        attack = getattr(_current, "attack", None)
        if attack is None:
            return self._real.train(*args, **kwargs)
        return attack.train(self._real.train, *args, **kwargs)


def _install_view() -> None:
    if not isinstance(_service.learner, _LearnerView):
        _service.learner = _LearnerView(_service.learner)


class AdversarialAgent(Agent):
    """`Agent` with an `Attack`: `AdversarialAgent(config, identity, model, data, attack).run(stop)`."""

    def __init__(self, config: AgentConfig, identity: Identity, model, data, attack: Attack,
                 architecture: str = "", seed: int = 0) -> None:
        _install_view()
        self.attack = attack
        super().__init__(attack.config(config), attack.identity(identity), model, data, architecture, seed)

    def _handle_task(self, payload: bytes, saved: str = "") -> None:
        _current.attack = self.attack
        try:
            if self.attack.intercept_task(self, payload):
                return
            super()._handle_task(payload, saved)
            self.attack.after_task(self, payload)
        finally:
            _current.attack = None

    def _local_data(self, kind: str) -> LocalData:
        data = super()._local_data(kind)
        return self.attack.train_data(data) if kind == "train" else data

    def _send_enroll(self) -> None:
        super()._send_enroll()
        self.attack.after_enroll(self)


# --- command line --------------------------------------------------------------------------


def adversary_command(attack: str, config_path: str | Path, *, scale: float | None = None,
                      sigma: float | None = None, payload: str | None = None, log_level: str = "INFO",
                      python: str = sys.executable) -> list[str]:
    """The command line that runs one adversarial device (an agent TOML, as for `starling-agent run`)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}: one of {', '.join(ATTACKS)}")
    cmd = [python, "-m", "hw.adversary", "--attack", attack, "--config", str(config_path), "--log-level", log_level]
    if scale is not None:
        cmd += ["--scale", repr(float(scale))]
    if sigma is not None:
        cmd += ["--sigma", repr(float(sigma))]
    if payload is not None:
        cmd += ["--sybil-payload", payload]
    return cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hw.adversary",
                                     description="Run a Starling agent that attacks the federation (emulator only).")
    parser.add_argument("--attack", required=True, choices=ATTACKS)
    parser.add_argument("--config", required=True, help="agent TOML config file (as for starling-agent run)")
    parser.add_argument("--scale", type=float, default=10.0, help="scaling: the factor (default 10)")
    parser.add_argument("--sigma", type=float, default=1.0, help="gaussian_noise: the standard deviation (default 1)")
    parser.add_argument("--sybil-payload", default="sign_flip", choices=SYBIL_PAYLOADS,
                        help="sybil: what it does if a gateway enrolls it (default sign_flip)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Like `starling-agent run`, with `--attack`."""
    from agent.config import ConfigError, load_config
    from agent.data_source import DataError, needs_labels, num_classes, open_data
    from protocol import logs
    from protocol.errors import KeyFileError
    from protocol.keys import load_or_create

    args = build_parser().parse_args(argv)
    logs.setup("agent", args.log_level)
    prog = "hw.adversary"
    try:
        config = load_config(args.config)
        identity = load_or_create(config.key)
    except (ConfigError, KeyFileError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.attack != "sybil" and config.voucher is not None and not config.voucher.is_file():
        print(f"{prog}: device.voucher: {config.voucher} does not exist", file=sys.stderr)
        return 2
    import firmware_models
    from firmware_models.runtime import TrainableModel

    manifest = firmware_models.load_manifest(config.model)
    flips = args.attack == "label_flip" or (args.attack == "sybil" and args.sybil_payload == "label_flip")
    if flips and not needs_labels(manifest):
        print(f"{prog}: label_flip needs a classifier; {config.model} learns without labels", file=sys.stderr)
        return 2
    try:
        attack = make_attack(args.attack, scale=args.scale, sigma=args.sigma, payload=args.sybil_payload,
                             num_classes=num_classes(manifest) if needs_labels(manifest) else None,
                             seed=identity.node_id % 2**32)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    model = TrainableModel(firmware_models.model_dir(config.model) / "model.tflite")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    event(log, "attack.start", attack=args.attack, device=identity.id)
    try:
        with open_data(config, manifest) as data:
            AdversarialAgent(config, identity, model, data, attack, architecture=manifest["sha256"],
                             seed=identity.node_id % 2**32).run(stop)
    except DataError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
