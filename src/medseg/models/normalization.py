"""Batch normalization whose mixed-precision training step runs TensorFlow's fused kernel.

Keras 3 normalizes with separate operations (moments, then the affine map), and under a
mixed-precision policy it first casts the bfloat16 (or float16) input to float32 and the result
back. On a CPU those element-wise passes over every activation cost more than the
convolutions gain: batch normalization took 37 % of a bfloat16 training step of the 2D U-Net
(96×96, batch 16, AMD EPYC with `avx512_bf16`), against 16 % in float32. TensorFlow's
`FusedBatchNormV3` reads the bfloat16 input and keeps the statistics in float32 in one pass,
which is what mixed precision asks of batch normalization.

How the kernel is fed, measured on a bfloat16 3D U-Net training step (64³ patches, batch 4, AMD
EPYC with `avx512_bf16`, 2 cores; the profiler's `FusedBatchNormGradV3` was 20 % of the busy time):
- oneDNN's fused kernel takes only 4D tensors; on a 5D one TensorFlow runs its generic kernel
  (forward and backward of a (4, 32, 32, 32, 16) activation 7.0 ms, through oneDNN 2.0 ms).
  Normalizing over the channels does not care how the voxels are arranged, so a 3D activation
  is fed as (B·X, Y, Z, C).
- Below 16 channels (oneDNN's bfloat16 block) its bfloat16 kernel is slower than float32's:
  (4, 64, 64, 64, 8) takes 56 ms as 5D bfloat16, 130 ms as 4D bfloat16, 18 ms cast to float32
  as 4D, casts included. So narrow layers normalize in float32 and cast back.

Only that path changes: float32 layers, inference (the moving statistics) and masked inputs
run Keras's own code, so float32 training and the layer's predictions are unchanged, bit for
bit. (The segmenter predicts with `inference_network`, which folds each normalization into
its convolution: the same function up to rounding.) The
weights (gamma, beta, moving mean and variance) and the configuration are Keras's, so a
trained model's weights load into a plain `keras.layers.BatchNormalization` (`as_keras_layers`
does that for the exported Keras model).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from medseg.models.cloning import clone_with_layers
from medseg.models.convolution import NarrowConv3D

_FUSED_RANKS = (4, 5)
_HALF = {"bfloat16", "float16"}
# Fewer channels than oneDNN's bfloat16 block: the fused kernel runs in float32 (module docstring).
_NARROW_CHANNELS = 16
_CONVOLUTIONS = (layers.Conv1D, layers.Conv2D, layers.Conv3D)


@keras.saving.register_keras_serializable(package="medseg")
class FusedBatchNormalization(layers.BatchNormalization):
    """`keras.layers.BatchNormalization` (same arguments, weights and inference), whose
    training under a bfloat16 or float16 compute dtype runs the fused kernel."""

    def _fusable(self, inputs, training, mask) -> bool:
        rank = len(inputs.shape)
        return (
            bool(training) and self.trainable and mask is None and not self.renorm
            and keras.backend.standardize_dtype(inputs.dtype) in _HALF
            and rank in _FUSED_RANKS and self.axis in (-1, rank - 1)
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        scale = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones((channels,), tf.float32)
        offset = tf.cast(self.beta, tf.float32) if self.center else tf.zeros((channels,), tf.float32)
        shape = tf.shape(inputs)
        flat = inputs if len(inputs.shape) == 4 else tf.reshape(inputs, tf.concat([[-1], shape[2:]], 0))
        if channels < _NARROW_CHANNELS:
            flat = tf.cast(flat, tf.float32)
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            flat, scale, offset, epsilon=self.epsilon, data_format="NHWC", is_training=True
        )
        outputs = tf.reshape(outputs, shape)
        # The kernel returns the batch variance with Bessel's correction; Keras's moving
        # variance averages the population variance (tf.nn.moments), as the kernel normalizes by.
        count = tf.cast(tf.size(inputs, out_type=tf.int64) // channels, tf.float32)
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(outputs, self.compute_dtype)


def _keras_class(layer: layers.Layer) -> type[layers.Layer] | None:
    """The Keras layer a medseg layer computes (same config, weights and outputs), or None."""
    if isinstance(layer, FusedBatchNormalization):
        return layers.BatchNormalization
    if isinstance(layer, NarrowConv3D):
        return layers.Conv3D
    return None


def as_keras_layers(model: keras.Model) -> keras.Model:
    """A copy of `model` with every medseg layer (`FusedBatchNormalization`, `NarrowConv3D`) the
    plain Keras one it computes (same config and weights): a model that loads with Keras alone."""
    if not any(_keras_class(layer) for layer in model.layers):
        return model

    def clone(layer):
        return (_keras_class(layer) or layer.__class__).from_config(layer.get_config())

    return clone_with_layers(model, clone)


class _Folded(layers.Layer):
    """Where a batch normalization was, once `inference_network` folded it into its convolution."""

    def call(self, inputs, training=None, mask=None):
        return inputs


def inference_network(model: keras.Model) -> keras.Model:
    """`model` as inference runs it: each batch normalization that follows a convolution (with
    no activation of its own, and no other consumer) folded into that convolution's kernel and
    bias, with the moving statistics: scale = gamma / sqrt(variance + epsilon), kernel × scale,
    (bias − mean) × scale + beta.

    The same function, without a pass over every activation: Keras's inference normalization
    is a multiply and an add, and under a mixed-precision policy a cast to float32 and back
    around them; folded, oneDNN fuses the bias and the ReLU into the convolution. Measured on
    the AMD EPYC (`avx512_bf16`, 2 cores): a batch of four 64³ windows of the 3D U-Net 185 ->
    129 ms in bfloat16 (261 -> 221 ms in float32), sixteen 96² slices of the 2D U-Net 130 ->
    103 ms (211 -> 195 ms). In float32 the probabilities move by rounding (about 1e-7); in
    bfloat16 the folded kernel is rounded to bfloat16 once, so masks stay within the project's
    tolerance (`medseg.inference.engines.masks_agree`, tested on a trained segmenter).

    A copy for inference only (never saved; the segmenter keeps and saves `model`). Anything
    that is not a Keras model with such a pair (a stand-in network in a test) is returned as is.
    """
    if not isinstance(model, keras.Model):
        return model
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
            continue
        source = layer.input._keras_history.operation
        foldable = (
            isinstance(source, _CONVOLUTIONS) and source.activation is keras.activations.linear
            and len(source._inbound_nodes) == 1 and len(source._outbound_nodes) == 1  # used once, by this layer
            and layer.axis in (-1, len(layer.input.shape) - 1)
        )
        if foldable:
            pairs[source.name] = layer
    if not pairs:
        return model
    folded = {bn.name for bn in pairs.values()}

    def clone(layer):
        # medseg's layers differ from Keras's in training only: the copy has Keras's (so the
        # forward graph is the one oneDNN fuses, convolution, bias and ReLU).
        kind = _keras_class(layer) or type(layer)
        if layer.name in pairs:
            return kind.from_config({**layer.get_config(), "use_bias": True})
        if layer.name in folded:
            return _Folded(name=layer.name, dtype=layer.dtype_policy)
        return kind.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if not layer.weights:  # the input layer, which the clone renames, and weightless layers
            continue
        target = copy.get_layer(layer.name)
        if layer.name in pairs:
            bn = pairs[layer.name]
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else 0.0
            gamma = keras.ops.convert_to_numpy(bn.gamma) if bn.scale else 1.0
            beta = keras.ops.convert_to_numpy(bn.beta) if bn.center else 0.0
            scale = gamma / np.sqrt(keras.ops.convert_to_numpy(bn.moving_variance) + bn.epsilon)
            target.set_weights([kernel * scale, (bias - keras.ops.convert_to_numpy(bn.moving_mean)) * scale + beta])
        elif layer.name not in folded:
            target.set_weights(layer.get_weights())
    return copy
