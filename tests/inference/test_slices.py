"""Whole-slice 2D inference: batches from a memory budget, results independent of the batch."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.inference.slices import axial_window, predict_axial_slices, slice_predictor, slices_per_batch
from medseg.models import build_unet2d, with_input_shape


@pytest.fixture(scope="module")
def any_size_unet():
    import keras

    keras.utils.set_random_seed(3)
    model = build_unet2d((16, 16, 1), base_filters=4, depth=2)
    return with_input_shape(model, (None, None, 1))


@pytest.fixture(scope="module")
def volume():
    # In-plane sizes that are not multiples of 2**depth = 4, so slices are padded.
    return np.random.default_rng(0).normal(size=(21, 30, 7)).astype(np.float32)


def test_axial_window_pads_each_axis_up_to_the_multiple():
    assert axial_window((21, 30), 4) == (24, 32, 1)
    assert axial_window((512, 512, 160), 8) == (512, 512, 1)
    assert axial_window((1, 9), 8) == (8, 16, 1)


@pytest.mark.parametrize(
    ("slice_shape", "base_filters", "depth", "memory_gb", "n_slices", "expected"),
    [
        # 512*512 px * (32+16+8+4) features * 16 B = 251,658,240 B per slice; 2**30 / that = 4.27
        ((512, 512), 32, 3, 1.0, None, 4),
        ((512, 512), 32, 3, 4.0, None, 17),  # 17.07
        # padded to 504 x 512: 258,048 px * 60 * 16 = 247,726,080 B; 4.33
        ((500, 510), 32, 3, 1.0, None, 4),
        # 96*96 * 60 * 16 = 8,847,360 B; 121.4, or the volume's 40 slices
        ((96, 96), 32, 3, 1.0, None, 121),
        ((96, 96), 32, 3, 1.0, 40, 40),
        # 8 filters, depth 3: 15 features; 512*512 * 15 * 16 = 62,914,560 B; 17.07
        ((512, 512), 8, 3, 1.0, None, 17),
    ],
)
def test_slices_per_batch_by_hand(slice_shape, base_filters, depth, memory_gb, n_slices, expected):
    assert slices_per_batch(slice_shape, 2**depth, base_filters, depth, memory_gb, n_slices) == expected


def test_the_result_does_not_depend_on_the_batch_size(any_size_unet, volume):
    predict = slice_predictor(any_size_unet)
    outputs = [predict_axial_slices(predict, volume, 4, batch_size) for batch_size in (1, 2, 5, 7, 100)]
    assert all(out.shape == volume.shape and out.dtype == np.float32 for out in outputs)
    for output in outputs[1:]:
        np.testing.assert_allclose(output, outputs[0], rtol=0, atol=1e-6)


def test_each_slice_is_the_model_on_the_zero_padded_slice(any_size_unet, volume):
    """The engine's result is what the model gives on each slice padded at its end (the
    behaviour before the engine was shared), computed here by an eager call per slice."""
    output = predict_axial_slices(any_size_unet, volume, 4, 3)
    for z in range(volume.shape[2]):
        padded = np.zeros((1, 24, 32, 1), np.float32)
        padded[0, :21, :30, 0] = volume[:, :, z]
        expected = np.asarray(any_size_unet(padded, training=False))[0, :21, :30, 0]
        np.testing.assert_allclose(output[:, :, z], expected, rtol=0, atol=1e-6)


def test_the_model_never_sees_more_than_one_batch(any_size_unet, volume):
    predict = slice_predictor(any_size_unet)
    seen = []

    def recording(windows):
        seen.append(windows.shape)
        return predict(windows)

    predict_axial_slices(recording, volume, 4, 3)
    assert [shape[0] for shape in seen] == [3, 3, 1]
    assert all(shape[1:] == (24, 32, 1, 1) for shape in seen)


def test_one_traced_predictor_serves_every_slice_size(any_size_unet):
    predict = slice_predictor(any_size_unet)
    for shape in ((8, 8, 3), (17, 9, 2), (40, 12, 5)):
        image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
        out = predict_axial_slices(predict, image, 4, 2)
        assert out.shape == shape and np.all((out >= 0) & (out <= 1))
