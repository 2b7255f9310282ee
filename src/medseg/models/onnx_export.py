"""A trained network as ONNX, for the `onnxruntime` engine (`medseg.inference.engines`).

On the TensorFlow backend Keras 3 exports ONNX through tf2onnx; medseg calls tf2onnx itself,
on a float32 clone of the network traced by a `tf.function` with a named input signature:

- tf2onnx 1.17 under TensorFlow 2.21 converts both U-Nets from a `tf.function`. The
  `mixed_bfloat16` network converts too, but onnxruntime refuses to load it: it has no
  bfloat16 convolution on a CPU. So the export is always float32, and its parity with the
  TensorFlow network (which may run in bfloat16) is checked on the masks, not assumed.
- medseg's `FusedBatchNormalization` (a `tf.raw_ops.FusedBatchNormV3` call) becomes Keras's
  own `BatchNormalization` with the same weights (`as_keras_layers`), which tf2onnx folds.

The graph has one input, `image`, and one output, `probabilities`, with the network's own
shapes: (B, H, W, 1) of any H, W for a 2D model (whole slices), (B, X, Y, Z, C) for a patch
model, and the batch size free in both.
"""

from __future__ import annotations

import logging

import keras

from medseg.models.normalization import as_keras_layers
from medseg.models.precision import with_precision

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
# Opset 17 (onnxruntime >= 1.13) has every operator the U-Nets use; a higher one buys nothing.
OPSET = 17


def float32_network(model: keras.Model) -> keras.Model:
    """`model` computing in float32 with Keras's own batch normalization: the network that
    is exported (same weights)."""
    return as_keras_layers(with_precision(model, "float32"))


def export_onnx(model: keras.Model, slices: bool) -> bytes:
    """The serialized ONNX model of `model`'s float32 clone.

    Args:
        model: the segmenter's network.
        slices: a 2D model over whole slices: its height and width are left free; otherwise
            the model's own input shape (a patch) is kept, and only the batch is free.

    Returns:
        The ONNX model's bytes (`OPSET`, input `INPUT_NAME`, output `OUTPUT_NAME`).

    Raises:
        Whatever tf2onnx raises for a graph it cannot convert: the caller records it.
    """
    import tensorflow as tf

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    import tf2onnx

    network = float32_network(model)
    shape = (None, None, None, 1) if slices else (None, *network.input_shape[1:])
    signature = [tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)]

    @tf.function(input_signature=signature)
    def forward(image):
        return {OUTPUT_NAME: network(image, training=False)}

    proto, _ = tf2onnx.convert.from_function(forward, input_signature=signature, opset=OPSET)
    return proto.SerializeToString()
