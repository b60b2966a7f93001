"""Local learning: train or evaluate the task's base model and build the update.

Kept free of MQTT so it can be tested and timed on its own. Training runs
mini-batches of the model's fixed batch size, epoch by epoch, and stops early
when the task's deadline is near, reporting only what it really did.

Strategy options the device honours:
- `proximal-mu` (FedProx): every step also follows the gradient of the
  proximal term mu/2 * ||w - base||^2, w -= lr * mu * (w - base). Models
  built with an anchor (`supports_proximal`) do it in the graph: the base is
  set as the anchor once per round and `mu` passed to each step; older models
  get the same step in numpy after each train call.
- `clipping_norm` (Flower's client-side DP wrappers): the update is scaled
  to at most that L2 norm over all arrays, and `norm_bit` (1 if it had to be
  clipped) is reported for adaptive clipping.

The task's codec: i8 (the default), f16 or f32 send every entry; topk sends
the task's `density` of each tensor's largest entries, with error feedback
(agent/error_feedback.py): the residual kept from earlier rounds is added to
this round's delta before clipping and selection, and what is not sent of the
result comes back in `Outcome.residual` for the caller to keep.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from protocol import schemas
from protocol.fields import is_finite_number
from protocol.tensors import TOPK

from .samples import LocalData

DEADLINE_MARGIN_S = 2.0


@dataclass(frozen=True)
class Outcome:
    """What a device sends back: the update attachment and its example count."""

    attachment: bytes
    examples: int
    metrics: dict[str, float]
    residual: dict[str, np.ndarray] | None = None  # topk: what was not sent, for the next round (error feedback)


class BadOption(ValueError):
    """A strategy option this device cannot honour; the task is refused."""

    reason = "bad_option"


def _option(task: schemas.Task, key: str) -> float | None:
    value = task.config.options.get(key)
    if value is None:
        return None
    if not is_finite_number(value) or value < 0:
        raise BadOption(f"option {key} must be a finite non-negative number, got {value!r}")
    return float(value)


def clip(delta: dict[str, np.ndarray], norm: float) -> tuple[dict[str, np.ndarray], bool]:
    """Scale `delta` to an L2 norm (over all arrays) of at most `norm`; say whether it was scaled."""
    total = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))
    if total <= norm or total == 0.0:
        return delta, False
    factor = norm / total
    return {k: (v * factor).astype(np.float32) for k, v in delta.items()}, True


def train(model, base: dict[str, np.ndarray], data: LocalData, task: schemas.Task, rng: np.random.Generator,
          max_seconds: float = 0.0, max_samples: int = 0, residual: dict[str, np.ndarray] | None = None) -> Outcome:
    """Train from `base` and return the weight delta encoded with the task's codec.

    Within the device's budget: at most `max_samples` windows (drawn afresh each round) and
    `max_seconds` of training (0: no limit but the task's deadline). `residual`: with the topk codec,
    what earlier rounds did not send (ignored by the dense codecs, and when it does not fit `base`).
    """
    model.set_weights(base)
    in_graph = bool(getattr(model, "supports_proximal", False))
    if in_graph:
        model.set_anchor(base)  # FedProx pulls toward this round's base (a no-op while mu is 0)
    unlabelled = getattr(model, "task", "classification") != "classification"
    cfg = task.config
    mu = _option(task, "proximal-mu") or 0.0
    clipping_norm = _option(task, "clipping_norm")
    batch = model.batch_size
    if max_samples and len(data.x_train) > max_samples:
        chosen = np.sort(rng.choice(len(data.x_train), max_samples, replace=False))
        data = LocalData(data.x_train[chosen], data.y_train[chosen], data.x_test, data.y_test)
    n = len(data.x_train)
    stop_at = cfg.deadline - DEADLINE_MARGIN_S if cfg.deadline else float("inf")
    if max_seconds:
        stop_at = min(stop_at, time.time() + max_seconds)
    losses: list[float] = []
    seen = 0
    for epoch in range(cfg.epochs):
        for idx in epoch_batches(rng, n, batch):
            if time.time() > stop_at:
                break
            y = None if unlabelled else data.y_train[idx]  # a self-supervised model learns from x alone
            if in_graph:
                losses.append(float(model.train_step(data.x_train[idx], y, cfg.lr, mu)))
            else:
                before = model.get_weights() if mu else None
                losses.append(float(model.train_step(data.x_train[idx], y, cfg.lr)))
                if mu:
                    after = model.get_weights()
                    model.set_weights({k: after[k] - cfg.lr * mu * (before[k] - base[k]) for k in after})
            if epoch == 0:
                seen = min(n, seen + len(idx))  # a wrapped last batch repeats windows already counted
    new = model.get_weights()
    delta = {name: new[name] - base[name] for name in base}
    sparse = task.codec == TOPK
    if sparse and residual is not None and fits(residual, delta):
        delta = {name: (delta[name] + residual[name]).astype(np.float32) for name in delta}
    per_epoch = -(-n // batch)
    metrics = {"train_loss": float(np.mean(losses[-per_epoch:])) if losses else 0.0, "steps": float(len(losses))}
    if clipping_norm is not None:
        delta, clipped = clip(delta, clipping_norm)
        metrics["norm_bit"] = float(clipped)
    examples = seen  # windows actually trained on: fewer than n only when time ran out in the first epoch
    attachment = schemas.encode_update(delta, metrics, task.codec, task.density)
    if not sparse:
        return Outcome(attachment, examples, metrics)
    sent, _ = schemas.decode_update(attachment)  # exactly what the gateway will add to the base
    left = {name: (delta[name] - sent[name]).astype(np.float32) for name in delta}
    return Outcome(attachment, examples, metrics, left)


def device_seed(node_id: int) -> int:
    """The seed of a device's training shuffles: its node id (derived from its key), in 32 bits."""
    return node_id % 2**32


def round_rng(seed: int, round_: int) -> np.random.Generator:
    """The generator of one round's training (its shuffles, its `max_samples` draw).

    Seeded by the device and the round rather than drawn on from one stream, so a round's training
    does not depend on what the device did before (rounds it skipped, a restart): the same data in
    the same round gives the same update. Flower's ClientApp in bench/flower_app seeds its shuffles
    the same way, which pairs the two sides' runs of bench/vs_flower.py.
    """
    return np.random.default_rng([seed, round_])


def epoch_batches(rng: np.random.Generator, n: int, batch: int) -> list[np.ndarray]:
    """One epoch's batches of window indices, cut as `TrainableModel.train_epochs` cuts them.

    A fresh permutation of the n windows, in full batches; a short last batch is completed with the
    first windows of the same permutation, so every step sees `batch` distinct real windows (fewer
    only when the device holds fewer than `batch`). The same generator state gives the same batches
    as the runtime's own loop: a side by side that seeds both alike trains both alike.
    """
    order = rng.permutation(n)
    steps = -(-n // batch)
    if n >= batch:
        order = np.resize(order, steps * batch)
    return [order[s * batch : (s + 1) * batch] for s in range(steps)]


def fits(residual: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> bool:
    """Whether a kept residual has the delta's tensors, names and shapes."""
    return residual.keys() == delta.keys() and all(np.shape(residual[k]) == np.shape(delta[k]) for k in delta)


def evaluate(model, base: dict[str, np.ndarray], data: LocalData) -> Outcome:
    """Evaluate `base` on the device's local test windows (no weights sent back)."""
    model.set_weights(base)
    if getattr(model, "task", "classification") == "classification":
        loss, accuracy = model.evaluate(data.x_test, data.y_test)
        metrics = {"loss": float(loss), "accuracy": float(accuracy)}
    else:  # a self-supervised model: its reconstruction loss and error figures
        metrics = {k: float(v) for k, v in model.metrics(data.x_test).items()}
    return Outcome(schemas.encode_update({}, metrics), len(data.x_test), metrics)
