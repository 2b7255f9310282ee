"""The fused batch normalization: Keras's layer, with a fused kernel in mixed-precision training."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from medseg.models import build_unet2d, build_unet3d
from medseg.models.normalization import FusedBatchNormalization, as_keras_layers, inference_network
from medseg.pipelines.evaluation import export_model


def _pair(dtype: str, shape: tuple[int, ...]):
    keras_layer = layers.BatchNormalization(momentum=0.9, dtype=dtype)
    fused = FusedBatchNormalization(momentum=0.9, dtype=dtype)
    keras_layer.build(shape)
    fused.build(shape)
    # Same non-trivial weights in both, so that gamma and beta take part.
    rng = np.random.default_rng(3)
    weights = [rng.uniform(0.5, 2.0, shape[-1]), rng.normal(size=shape[-1]), np.zeros(shape[-1]), np.ones(shape[-1])]
    keras_layer.set_weights(weights)
    fused.set_weights(weights)
    return keras_layer, fused


def _op_types(layer, shape) -> set[str]:
    """The TensorFlow operations of the layer's training call, traced."""
    traced = tf.function(lambda x: layer(x, training=True)).get_concrete_function(tf.TensorSpec(shape, tf.float32))
    return {op.type for op in traced.graph.get_operations()}


def _train_step(layer, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
    dx, dgamma = tape.gradient(loss, [x, layer.gamma])
    return y, dx.numpy(), dgamma.numpy()


# 5 channels normalize in float32, 16 in bfloat16; a 3D activation goes to the kernel as 4D.
@pytest.mark.parametrize("shape", [(4, 12, 10, 6), (2, 8, 6, 4, 5), (2, 6, 4, 4, 16)], ids=["2d", "3d", "3d-16"])
def test_bfloat16_training_matches_keras_batch_normalization(shape):
    x = tf.constant((np.random.default_rng(0).normal(size=shape) * 3.0 + 1.0).astype("float32"))
    keras_layer, fused = _pair("mixed_bfloat16", shape)
    y_keras, dx_keras, dgamma_keras = _train_step(keras_layer, x)
    y_fused, dx_fused, dgamma_fused = _train_step(fused, x)
    assert y_fused.dtype == tf.bfloat16
    assert "FusedBatchNormV3" in _op_types(fused, shape)
    assert "FusedBatchNormV3" not in _op_types(keras_layer, shape)
    # The normalized output agrees to bfloat16's resolution (8 bits of mantissa).
    np.testing.assert_allclose(tf.cast(y_fused, tf.float32), tf.cast(y_keras, tf.float32), rtol=1 / 128, atol=1 / 64)
    # The moving statistics are float32 in both: the population variance, as Keras keeps it.
    np.testing.assert_allclose(fused.moving_mean.numpy(), keras_layer.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance.numpy(), keras_layer.moving_variance.numpy(), rtol=1e-5)
    assert not np.allclose(fused.moving_variance.numpy(), 1.0)  # the update happened
    scale = np.abs(dx_keras).max()
    np.testing.assert_allclose(dx_fused, dx_keras, atol=scale / 64)
    np.testing.assert_allclose(dgamma_fused, dgamma_keras, rtol=1e-2)


def test_float32_training_and_inference_are_keras_own_bit_for_bit():
    shape = (4, 12, 10, 6)
    x = tf.constant(np.random.default_rng(1).normal(size=shape).astype("float32"))
    keras_layer, fused = _pair("float32", shape)
    for training in (True, False):
        np.testing.assert_array_equal(fused(x, training=training).numpy(), keras_layer(x, training=training).numpy())
    np.testing.assert_array_equal(fused.moving_variance.numpy(), keras_layer.moving_variance.numpy())
    assert "FusedBatchNormV3" not in _op_types(fused, shape)
    bf16_keras, bf16_fused = _pair("mixed_bfloat16", shape)
    np.testing.assert_array_equal(bf16_fused(x, training=False).numpy(), bf16_keras(x, training=False).numpy())


def test_a_saved_unet_reloads_with_it_and_exports_with_keras_layers_only(tmp_path):
    model = build_unet2d((16, 16, 1), 4, 2)
    assert sum(isinstance(layer, FusedBatchNormalization) for layer in model.layers) == 10
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path, compile=False)
    assert [type(layer) for layer in reloaded.layers] == [type(layer) for layer in model.layers]

    exported, architecture, _ = export_model(model)
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in exported.layers)
    assert "FusedBatchNormalization" not in json.dumps(architecture)
    assert "medseg" not in json.dumps(architecture)  # plain Keras loads it
    x = np.random.default_rng(2).normal(size=(2, 16, 16, 1)).astype("float32")
    np.testing.assert_array_equal(exported.predict_on_batch(x), model.predict_on_batch(x))
    assert as_keras_layers(exported) is exported


def _with_statistics(model: keras.Model, seed: int = 4) -> keras.Model:
    """Non-trivial gamma, beta and moving statistics in every normalization, as training leaves them."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2.0, c), rng.normal(size=c) * 0.3, rng.normal(size=c) * 0.3,
                               rng.uniform(0.5, 2.0, c)])
    return model


@pytest.mark.parametrize("build, shape", [
    (lambda: build_unet2d((16, 16, 1), 4, 2), (3, 16, 16, 1)),
    (lambda: build_unet3d((8, 8, 8, 1), 4, 2), (2, 8, 8, 8, 1)),
], ids=["2d", "3d"])
def test_the_inference_network_folds_each_normalization_into_its_convolution(build, shape):
    model = _with_statistics(build())
    x = np.random.default_rng(5).normal(size=shape).astype("float32")
    before = model.predict_on_batch(x)
    folded = inference_network(model)

    assert not any(isinstance(layer, layers.BatchNormalization) for layer in folded.layers)
    assert [layer.name for layer in folded.layers[1:]] == [layer.name for layer in model.layers[1:]]
    convolutions = [layer for layer in folded.layers if isinstance(layer, (layers.Conv2D, layers.Conv3D))]
    assert all(layer.use_bias for layer in convolutions)
    # Keras's own convolutions, whose forward graph oneDNN fuses (NarrowConv3D differs in training only)
    assert {type(layer) for layer in convolutions} <= {layers.Conv2D, layers.Conv3D}
    np.testing.assert_allclose(folded.predict_on_batch(x), before, rtol=0, atol=1e-5)
    # the model itself is untouched: it is what the segmenter saves and trains on
    assert sum(isinstance(layer, layers.BatchNormalization) for layer in model.layers) == 10
    np.testing.assert_array_equal(model.predict_on_batch(x), before)


def test_the_inference_network_keeps_a_normalization_it_cannot_fold():
    inputs = keras.Input((8, 8, 2))
    activated = layers.Conv2D(3, 3, padding="same", activation="relu", name="activated")(inputs)
    shared = layers.Conv2D(3, 3, padding="same", name="shared")(inputs)
    outputs = layers.Concatenate()([
        layers.BatchNormalization(name="after_relu")(activated),
        layers.BatchNormalization(name="after_shared")(shared),
        shared,  # a second consumer of the convolution: folding would change it
    ])
    model = _with_statistics(keras.Model(inputs, outputs))
    assert inference_network(model) is model  # nothing to fold: the same model, no copy

    folded_one = keras.Model(inputs, layers.BatchNormalization(name="plain")(layers.Conv2D(3, 1, name="conv")(inputs)))
    _with_statistics(folded_one)
    x = np.random.default_rng(6).normal(size=(2, 8, 8, 2)).astype("float32")
    np.testing.assert_allclose(inference_network(folded_one).predict_on_batch(x), folded_one.predict_on_batch(x), atol=1e-5)
    assert inference_network(object) is object  # a stand-in network passes through
