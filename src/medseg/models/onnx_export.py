"""A trained network as ONNX, for the `onnxruntime` engine (`medseg.inference.engines`).

On the TensorFlow backend Keras 3 exports ONNX through tf2onnx; medseg calls tf2onnx itself,
on a float32 clone of the network traced by a `tf.function` with a named input signature:

- tf2onnx 1.17 under TensorFlow 2.21 converts both U-Nets from a `tf.function`. The
  `mixed_bfloat16` network converts too, but onnxruntime refuses to load it: it has no
  bfloat16 convolution on a CPU. So the export is always float32, and its parity with the
  TensorFlow network (which may run in bfloat16) is checked on the masks, not assumed.
- medseg's `FusedBatchNormalization` (a `tf.raw_ops.FusedBatchNormV3` call) becomes Keras's
  own `BatchNormalization` with the same weights (`as_keras_layers`), which tf2onnx folds.
- tf2onnx's `reshape_optimizer` is left out: Keras 3 wraps each convolution of a free batch in
  Unsqueeze, Reshape and Squeeze, and in about one conversion in seven (the same network, the
  order of its passes varying between runs) that optimizer drops the last Squeeze, so the graph
  returns an extra leading axis. Without it, 0 of 60 conversions did. Every export is also run
  once against the network on a probe (`_check_probe`), so a wrong graph is never kept.

The graph has one input, `image`, and one output, `probabilities`, with the network's own
shapes: (B, H, W, 1) of any H, W for a 2D model (whole slices), (B, X, Y, Z, C) for a patch
model, and the batch size free in both.
"""

from __future__ import annotations

import contextlib
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
        out = network(image, training=False)
        return {OUTPUT_NAME: out[0] if isinstance(out, (list, tuple)) else out}  # one tensor, whatever the outputs' nesting

    with _without_optimizer("reshape_optimizer"):
        proto, _ = tf2onnx.convert.from_function(forward, input_signature=signature, opset=OPSET)
    serialized = proto.SerializeToString()
    _check_probe(serialized, network, (1, 64, 64, 1) if slices else (1, *(n or 32 for n in network.input_shape[1:])))
    return serialized


@contextlib.contextmanager
def _without_optimizer(name: str):
    """tf2onnx's graph optimizer `name` left out while the block runs (tf2onnx keeps them in a
    module-level ordered mapping, `tf2onnx.optimizer._optimizers`; pinned at 1.17.0)."""
    from tf2onnx import optimizer

    every = dict(optimizer._optimizers)
    optimizer._optimizers.pop(name, None)
    try:
        yield
    finally:
        optimizer._optimizers.clear()
        optimizer._optimizers.update(every)  # in their order again


def _check_probe(serialized: bytes, network: keras.Model, shape: tuple[int, ...]) -> None:
    """Run the export and the network on one probe of `shape`: the same output shape and
    values within 1e-3, or a ValueError that says what differs (the caller records it)."""
    import numpy as np
    import onnxruntime

    probe = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    session = onnxruntime.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    exported = session.run(None, {INPUT_NAME: probe})[0]
    expected = network(probe, training=False)
    expected = np.asarray(expected[0] if isinstance(expected, (list, tuple)) else expected)
    if exported.shape != expected.shape:
        raise ValueError(f"the ONNX graph returns shape {exported.shape} where the network returns {expected.shape}")
    difference = float(np.max(np.abs(exported - expected)))
    if difference > 1e-3:
        raise ValueError(f"the ONNX graph's probabilities differ from the network's by up to {difference:.2g} on a probe")
