"""Layers for graphs that train under a plain TFLite interpreter (build time, TensorFlow).

The on-device `train` signature is TensorFlow's own gradient of the forward
pass, converted to TFLite with builtin ops only: LiteRT and tflite-runtime
have no Flex (Select TF) ops. Several standard ops have gradients that exist
only as Flex ops, so these layers are written with ops whose gradients are
builtins:

  * `relu` has a custom gradient (`tf.nn.relu`'s gradient is `ReluGrad`);
  * `conv1d_same` is one matmul over patches gathered with pad + slice +
    concat (`tf.nn.conv1d`'s gradients are `Conv2DBackprop*`, and
    strided-slice gradients are `StridedSliceGrad`);
  * `max_pool` is reshape + `reduce_max` (`MaxPoolGrad` is Flex);
  * `upsample` repeats steps with concat + reshape (resize ops have no
    builtin gradient);
  * `softmax_xent` writes the cross-entropy out with its gradient
    (softmax - one_hot).

The build lists every operator code of the converted model and refuses to
write it if a Flex or custom op slipped in anyway. TensorFlow is imported
inside each function, so importing this module is free.
"""

from __future__ import annotations

from typing import Any


def _tf() -> Any:
    import tensorflow as tf

    return tf


def relu(x: Any) -> Any:
    """max(x, 0) whose gradient is a multiply by the (x > 0) mask."""
    tf = _tf()

    @tf.custom_gradient
    def _relu(v):
        mask = tf.cast(v > 0.0, tf.float32)

        def grad(dy):
            return dy * mask

        return v * mask, grad

    return _relu(x)


def softmax_xent(logits: Any, onehot: Any) -> Any:
    """Mean softmax cross-entropy over the batch; gradient (softmax - onehot) / batch."""
    tf = _tf()
    batch = int(logits.shape[0])

    @tf.custom_gradient
    def _xent(z, target):
        shifted = z - tf.stop_gradient(tf.reduce_max(z, axis=1, keepdims=True))
        exp = tf.exp(shifted)
        total = tf.reduce_sum(exp, axis=1, keepdims=True)
        log_probs = shifted - tf.math.log(total)
        loss = -tf.reduce_mean(tf.reduce_sum(target * log_probs, axis=1))
        probs = exp / total

        def grad(dy):
            return dy * (probs - target) / float(batch), tf.zeros_like(target)

        return loss, grad

    return _xent(logits, onehot)


def dense(x: Any, w: Any, b: Any) -> Any:
    return _tf().matmul(x, w) + b


def conv1d_same(x: Any, w: Any, b: Any) -> Any:
    """'same'-padded, stride-1 conv over `[batch, length, in]` with kernel `[k, in, out]`.

    Gathers the k shifted views of the padded input side by side and does
    one matmul, so the gradient is matmuls, slices and pads.
    """
    tf = _tf()
    k, cin, cout = (int(d) for d in w.shape)
    batch, length = int(x.shape[0]), int(x.shape[1])
    left = (k - 1) // 2
    xp = tf.pad(x, [[0, 0], [left, k - 1 - left], [0, 0]])
    cols = [tf.slice(xp, [0, i, 0], [batch, length, cin]) for i in range(k)]
    patches = tf.reshape(tf.concat(cols, axis=2), [batch * length, k * cin])
    y = tf.matmul(patches, tf.reshape(w, [k * cin, cout])) + b
    return tf.reshape(y, [batch, length, cout])


def max_pool(x: Any, pool: int) -> Any:
    """Non-overlapping max pooling over time: `[b, l, c]` -> `[b, l // pool, c]`."""
    tf = _tf()
    batch, length, ch = (int(d) for d in x.shape)
    return tf.reduce_max(tf.reshape(x, [batch, length // pool, pool, ch]), axis=2)


def upsample(x: Any, factor: int) -> Any:
    """Nearest-neighbour upsampling over time: every step repeated `factor` times."""
    tf = _tf()
    batch, length, ch = (int(d) for d in x.shape)
    steps = tf.reshape(x, [batch, length, 1, ch])
    return tf.reshape(tf.concat([steps] * factor, axis=2), [batch, length * factor, ch])


# ---------------------------------------------------------------------------
# The same layers with the ordinary ops TFLite Micro runs (inference only).


def mcu_conv1d_same(x: Any, w: Any, b: Any, activation: bool = True) -> Any:
    """Conv over `[1, length, 1, in]` as a CONV_2D with a `[k, 1]` kernel (TF 'SAME' pads k-1 split left-first)."""
    tf = _tf()
    k, cin, cout = (int(d) for d in w.shape)
    y = tf.nn.conv2d(x, tf.reshape(w, [k, 1, cin, cout]), strides=1, padding="SAME") + b
    return tf.nn.relu(y) if activation else y


def mcu_max_pool(x: Any, pool: int) -> Any:
    return _tf().nn.max_pool2d(x, ksize=[pool, 1], strides=[pool, 1], padding="VALID")


def mcu_upsample(x: Any, factor: int) -> Any:
    """RESIZE_NEAREST_NEIGHBOR over time on `[1, length, 1, ch]` (an integer factor: every step repeated)."""
    tf = _tf()
    length = int(x.shape[1])
    return tf.image.resize(x, [length * factor, 1], method="nearest")
