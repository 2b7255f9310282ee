"""The 3D convolution whose kernel gradient runs the swapped convolution: Keras's Conv3D otherwise."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from medseg.models import build_unet2d, build_unet3d, compile_segmentation_model
from medseg.models import convolution
from medseg.models.convolution import NarrowConv3D
from medseg.models.normalization import as_keras_layers


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """The swap is for oneDNN: these tests see no GPU, whichever TensorFlow build runs them."""
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [] if kind == "GPU" else real(kind))


def _pair(channels_in: int, channels_out: int, dtype: str = "float32", **kwargs):
    """Keras's Conv3D and NarrowConv3D with the same (non-trivial) weights."""
    shape = (2, 7, 6, 5, channels_in)
    kwargs = {"kernel_size": 3, **kwargs}
    keras_layer = layers.Conv3D(channels_out, padding="same", dtype=dtype, **kwargs)
    narrow = NarrowConv3D(channels_out, padding="same", dtype=dtype, **kwargs)
    keras_layer.build(shape)
    narrow.build(shape)
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=w.shape).astype("float32") for w in keras_layer.weights]
    keras_layer.set_weights(weights)
    narrow.set_weights(weights)
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    return keras_layer, narrow, x


def _gradients(layer, x):
    """The layer's output and the gradients of a loss that weighs every output voxel differently
    (so that a kernel flipped the wrong way, or channels swapped, would show)."""
    weights = tf.constant(np.random.default_rng(2).normal(size=(*x.shape[:-1], layer.filters)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * weights)
    dx, dkernel = tape.gradient(loss, [x, layer.kernel])
    return y.numpy(), dx.numpy(), dkernel.numpy()


def _swapped_calls(monkeypatch) -> list:
    """Records each kernel gradient computed the swapped way."""
    calls = []
    original = convolution._kernel_gradient_swapped

    def recorded(x, dy, kernel_shape):
        calls.append((tuple(x.shape), tuple(dy.shape)))
        return original(x, dy, kernel_shape)

    monkeypatch.setattr(convolution, "_kernel_gradient_swapped", recorded)
    return calls


@pytest.mark.parametrize("kernel_size", [(3, 3, 3), (5, 3, 1)], ids=["3x3x3", "5x3x1"])
def test_a_narrowing_layer_has_keras_outputs_and_gradients_through_the_swapped_convolution(monkeypatch, kernel_size):
    keras_layer, narrow, x = _pair(16, 8, kernel_size=kernel_size)
    assert narrow._swaps()
    calls = _swapped_calls(monkeypatch)
    y_keras, dx_keras, dkernel_keras = _gradients(keras_layer, x)
    assert calls == []
    y_narrow, dx_narrow, dkernel_narrow = _gradients(narrow, x)
    assert calls == [((2, 7, 6, 5, 16), (2, 7, 6, 5, 8))]
    np.testing.assert_array_equal(y_narrow, y_keras)
    np.testing.assert_allclose(dx_narrow, dx_keras, rtol=1e-5, atol=1e-5)
    # The same sums in another order: float32 rounding only.
    np.testing.assert_allclose(dkernel_narrow, dkernel_keras, rtol=1e-4, atol=1e-4 * np.abs(dkernel_keras).max())
    # and not a flipped or transposed kernel that happens to look alike:
    assert np.abs(dkernel_keras - np.flip(dkernel_keras, axis=(0, 1, 2))).max() > 0.1 * np.abs(dkernel_keras).max()


def test_in_bfloat16_the_kernel_gradient_agrees_to_bfloat16s_rounding(monkeypatch):
    keras_layer, narrow, x = _pair(12, 4, "mixed_bfloat16")
    _, _, dkernel_keras = _gradients(keras_layer, x)
    calls = _swapped_calls(monkeypatch)
    _, _, dkernel_narrow = _gradients(narrow, x)
    assert calls == [((2, 7, 6, 5, 12), (2, 7, 6, 5, 4))]  # in bfloat16, the swapped way
    assert dkernel_narrow.dtype == np.float32  # the variable's gradient, as Keras gives it
    # bfloat16 keeps 8 bits of mantissa; the two ways round 30 x 7 x 6 x 5 products in other orders.
    np.testing.assert_allclose(dkernel_narrow, dkernel_keras, rtol=0.03, atol=0.02 * np.abs(dkernel_keras).max())


@pytest.mark.parametrize("channels_in, channels_out, kwargs", [
    (8, 16, {}),  # widening: the direct kernel gradient is the faster (module docstring)
    (8, 8, {}),  # as fast either way
    (32, 16, {}),  # a full block of output channels
    (16, 8, {"strides": 2}),  # the identity needs unit strides,
    (16, 8, {"dilation_rate": 2}),  # unit dilations,
    (16, 8, {"kernel_size": 2}),  # and an odd kernel (a centre)
], ids=["widening", "equal", "full-block", "strided", "dilated", "even-kernel"])
def test_every_other_convolution_is_keras_own(channels_in, channels_out, kwargs):
    kwargs = {"kernel_size": 3, **kwargs}
    layer = NarrowConv3D(channels_out, padding="same", **kwargs)
    layer.build((1, 8, 8, 8, channels_in))
    assert not layer._swaps()
    valid = NarrowConv3D(8, 3, padding="valid")
    valid.build((1, 8, 8, 8, 16))
    assert not valid._swaps()


def test_where_a_gpu_is_visible_every_convolution_is_keras_own(monkeypatch):
    layer = NarrowConv3D(8, 3, padding="same")
    layer.build((1, 8, 8, 8, 16))
    assert layer._swaps()
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else real(kind))
    assert not layer._swaps()


def test_the_3d_unet_blocks_use_it_the_2d_unet_and_heads_do_not(tmp_path, monkeypatch):
    model = build_unet3d((8, 8, 8, 1), 4, 2)
    narrow = [layer.name for layer in model.layers if isinstance(layer, NarrowConv3D)]
    assert len(narrow) == 2 * (2 * 2 + 1)  # two per block: 2 encoder, the bottleneck, 2 decoder
    # The decoders' first convolutions narrow: 8 + 8 → 8 and 4 + 4 → 4 channels.
    assert [name for name in narrow if model.get_layer(name)._swaps()] == ["dec1_conv1", "dec0_conv1"]
    assert type(model.get_layer("mask")) is layers.Conv3D
    assert not any(isinstance(layer, NarrowConv3D) for layer in build_unet2d((16, 16, 1), 4, 2).layers)

    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path, compile=False)
    assert isinstance(reloaded.get_layer("dec0_conv1"), NarrowConv3D)
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 8, 1)).astype("float32")
    plain = as_keras_layers(model)
    assert "medseg" not in json.dumps(json.loads(plain.to_json()))  # plain Keras loads it
    np.testing.assert_array_equal(plain.predict_on_batch(x), model.predict_on_batch(x))

    # and a compiled training step (traced, as model.fit runs it) takes their gradients the swapped way.
    calls = _swapped_calls(monkeypatch)
    compile_segmentation_model(model, "adam", 1e-3, "bce+dice")
    x = np.random.default_rng(4).normal(size=(2, 8, 8, 8, 1)).astype("float32")
    model.train_on_batch(x, (x > 0).astype("float32"))
    assert sorted(set(calls)) == [((2, 4, 4, 4, 16), (2, 4, 4, 4, 8)), ((2, 8, 8, 8, 8), (2, 8, 8, 8, 4))]
