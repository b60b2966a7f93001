"""The on-device trainable graph around a family's forward pass (build time, TensorFlow).

One `tf.Module` per model, whose tf.functions become the TFLite signatures.
All of them share the resource variables, so a `train` call changes what
`infer` and `get_weights` see:

  train(x, y, lr, mu) -> {loss, proximal}      classification
  train(x, lr, mu)    -> {loss, proximal}      reconstruction (no labels)
      One SGD step on one fixed-size batch with the FedProx term:
          w <- w - lr * (dLoss/dw + mu * (w - anchor))
      which is the gradient step on  loss + mu/2 * ||w - anchor||^2.
      `loss` is the data loss before the step (what the agent reports);
      `proximal` is mu/2 * ||w - anchor||^2 before the step. mu = 0 is
      plain SGD (FedAvg); `lr` and `mu` are inputs, so every call may
      use other values.
  infer(x)            -> {logits, probs}  or  {reconstruction, error}
  get_weights()       -> {name: weight}
  set_weights(**w)    -> {ok}
  set_anchor(**w)     -> {ok}    the FedProx anchor (the round's global
      weights), kept in a second set of variables of the same names and
      shapes; the anchor starts equal to the initial weights.

Weights move through signatures instead of TF's checkpoint ops, which are
Flex-only. The input normalization is a constant of the graph, not a
weight: it is part of the model's contract with the sensors and federated
averaging must never move it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from firmware_models.family import CLASSIFICATION, Family

SIGNATURE_KEYS = ("train", "infer", "get_weights", "set_weights", "set_anchor")


def make_module(family: Family, opts: Mapping[str, Any], init: Mapping[str, np.ndarray],
                mean: np.ndarray, std: np.ndarray) -> Any:
    """The `tf.Module` for `family` with `init` weights and the (x - mean) / std normalization."""
    import tensorflow as tf

    from firmware_models import layers

    names = [name for name, _ in family.weight_layout(opts)]
    shape = (family.batch_size, *family.input_shape(opts))
    classify = family.task == CLASSIFICATION
    num_classes = family.num_classes(opts)
    # per-channel constants broadcast over the last axis of the input
    bshape = (1,) * (len(shape) - 1) + (shape[-1],)
    scale = tf.constant((1.0 / std).reshape(bshape), tf.float32)
    shift = tf.constant((-mean / std).reshape(bshape), tf.float32)
    std_c = tf.constant(std.reshape(bshape), tf.float32)
    mean_c = tf.constant(mean.reshape(bshape), tf.float32)
    reduce_axes = list(range(1, len(shape)))

    x_spec = tf.TensorSpec(shape, tf.float32, name="x")
    y_spec = tf.TensorSpec([family.batch_size], tf.int32, name="y")
    lr_spec = tf.TensorSpec([], tf.float32, name="lr")
    mu_spec = tf.TensorSpec([], tf.float32, name="mu")
    w_specs = {n: tf.TensorSpec(init[n].shape, tf.float32, name=n) for n in names}

    class Trainable(tf.Module):
        def __init__(self) -> None:
            super().__init__(name=family.name)
            self.w = {n: tf.Variable(init[n], name=n, dtype=tf.float32) for n in names}
            self.anchor = {n: tf.Variable(init[n], name=f"anchor_{n}", dtype=tf.float32) for n in names}

        def normalized(self, x):
            return x * scale + shift

        def _sgd(self, data_loss, lr, mu):
            """Run one proximal SGD step on `data_loss()`; returns the output dict."""
            variables = [self.w[n] for n in names]
            with tf.GradientTape() as tape:
                loss = data_loss()
            grads = tape.gradient(loss, variables)
            proximal = tf.constant(0.0, tf.float32)
            for n, var, grad in zip(names, variables, grads, strict=True):
                # the proximal gradient is written out: mu * (w - anchor), at the weights before the step
                diff = var - self.anchor[n]
                proximal += tf.reduce_sum(diff * diff)
                var.assign_sub(lr * (grad + mu * diff))
            return {"loss": loss, "proximal": 0.5 * mu * proximal}

        def _reconstruction_loss(self, x):
            xn = self.normalized(x)
            err = family.forward(self.w, xn, opts) - xn
            return tf.reduce_mean(err * err)

        if classify:
            @tf.function(input_signature=[x_spec, y_spec, lr_spec, mu_spec])
            def train(self, x, y, lr, mu):
                onehot = tf.one_hot(y, num_classes, dtype=tf.float32)
                return self._sgd(
                    lambda: layers.softmax_xent(family.forward(self.w, self.normalized(x), opts), onehot), lr, mu)

            @tf.function(input_signature=[x_spec])
            def infer(self, x):
                logits = family.forward(self.w, self.normalized(x), opts)
                return {"logits": logits, "probs": tf.nn.softmax(logits, axis=-1)}
        else:
            @tf.function(input_signature=[x_spec, lr_spec, mu_spec])
            def train(self, x, lr, mu):
                return self._sgd(lambda: self._reconstruction_loss(x), lr, mu)

            @tf.function(input_signature=[x_spec])
            def infer(self, x):
                xn = self.normalized(x)
                rec = family.forward(self.w, xn, opts)
                err = rec - xn
                return {"reconstruction": rec * std_c + mean_c,
                        "error": tf.reduce_mean(err * err, axis=reduce_axes)}

        @tf.function(input_signature=[])
        def get_weights(self):
            return {n: tf.identity(self.w[n]) for n in names}

        @tf.function(input_signature=[w_specs])
        def set_weights(self, weights):
            for n in names:
                self.w[n].assign(weights[n])
            return {"ok": tf.constant(1, tf.int32)}

        @tf.function(input_signature=[w_specs])
        def set_anchor(self, weights):
            for n in names:
                self.anchor[n].assign(weights[n])
            return {"ok": tf.constant(1, tf.int32)}

    return Trainable()
