"""Unit tests of the sliding-window grid, the Gaussian importance map and stitching."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from medseg.errors import ConfigurationError
from medseg.patching import (
    extract_windows,
    gaussian_importance_map,
    pad_to_window,
    sliding_window_grid,
    sliding_window_predict,
    sliding_window_starts,
)

WINDOW = (8, 6, 5)
# Smaller than, equal to, a multiple of, and not a multiple of the window, on every axis.
VOLUME_SHAPES = list(itertools.product((3, 8, 13, 16, 29), (1, 6, 11, 12), (4, 5, 9, 17)))


def _coverage(volume_shape, window_shape, grid):
    count = np.zeros(volume_shape, dtype=np.int32)
    for start in grid:
        count[tuple(slice(s, s + w) for s, w in zip(start, window_shape))] += 1
    return count


@pytest.mark.parametrize(
    ("size", "window", "overlap", "expected"),
    [
        (10, 4, 0.5, [0, 2, 4, 6]),
        (11, 4, 0.5, [0, 2, 4, 6, 7]),
        (12, 4, 0.0, [0, 4, 8]),
        (13, 4, 0.0, [0, 4, 8, 9]),
        (6, 4, 0.99, [0, 1, 2]),
        (4, 4, 0.5, [0]),
        (3, 4, 0.5, [0]),
        (1, 1, 0.5, [0]),
    ],
)
def test_starts_values(size, window, overlap, expected):
    assert sliding_window_starts(size, window, overlap) == expected


def test_grid_covers_every_voxel_with_last_window_flush():
    for volume_shape, overlap in itertools.product(VOLUME_SHAPES, (0.0, 0.25, 0.5, 0.75)):
        padded_shape = tuple(max(s, w) for s, w in zip(volume_shape, WINDOW))
        grid = sliding_window_grid(volume_shape, WINDOW, overlap)
        count = _coverage(padded_shape, WINDOW, grid)
        assert count.min() >= 1, (volume_shape, overlap)
        starts = np.array(grid)
        for axis, (size, window) in enumerate(zip(padded_shape, WINDOW)):
            assert starts[:, axis].min() == 0
            assert starts[:, axis].max() == size - window, (volume_shape, overlap, axis)
        assert len(set(grid)) == len(grid)


def test_grid_is_cartesian_product_of_starts():
    grid = sliding_window_grid((20, 9, 5), (8, 4, 5), 0.5)
    expected = list(itertools.product([0, 4, 8, 12], [0, 2, 4, 5], [0]))
    assert grid == expected


@pytest.mark.parametrize(
    "call",
    [
        lambda: sliding_window_starts(10, 4, 1.0),
        lambda: sliding_window_starts(10, 4, -0.1),
        lambda: sliding_window_starts(10, 0, 0.5),
        lambda: sliding_window_grid((10, 10, 10), (4, 4), 0.5),
        lambda: sliding_window_grid((10, 10, 10), (4, 0, 4), 0.5),
        lambda: gaussian_importance_map((4, 4, 4), sigma_scale=0.0),
    ],
)
def test_bad_arguments_raise_configuration_error(call):
    with pytest.raises(ConfigurationError):
        call()


def test_configuration_error_names_the_parameter():
    with pytest.raises(ConfigurationError, match="overlap"):
        sliding_window_grid((10, 10, 10), (4, 4, 4), overlap=1.5)


@pytest.mark.parametrize("window_shape", [(9, 11, 13), (8, 10, 12), (7, 4, 1)])
def test_gaussian_map_shape_peak_symmetry_positivity(window_shape):
    weights = gaussian_importance_map(window_shape)
    assert weights.shape == window_shape
    assert weights.dtype == np.float32
    assert weights.max() == 1.0
    central = tuple(slice((w - 1) // 2, w // 2 + 1) for w in window_shape)
    assert np.all(weights[central] == 1.0)
    assert np.count_nonzero(weights == 1.0) == weights[central].size
    for axis in range(3):
        np.testing.assert_array_equal(weights, np.flip(weights, axis=axis))
    assert weights.min() > 0.0


def test_gaussian_sigma_is_sigma_scale_times_window():
    window, sigma_scale = 33, 4 / 33  # sigma = 4 voxels
    weights = gaussian_importance_map((window, window, window), sigma_scale)
    c = window // 2
    for offset in (-4, 4):
        assert weights[c + offset, c, c] == pytest.approx(math.exp(-0.5), rel=1e-5)
        assert weights[c, c, c + offset] == pytest.approx(math.exp(-0.5), rel=1e-5)
    profile = weights[c, :, c]
    offsets = np.arange(window) - c
    np.testing.assert_allclose(profile, np.exp(-0.5 * (offsets / 4.0) ** 2), rtol=1e-5, atol=0)


def test_gaussian_underflow_is_clamped_to_smallest_positive_value():
    weights = gaussian_importance_map((64, 64, 64), sigma_scale=0.02)
    assert weights.min() >= np.finfo(np.float32).tiny
    # The corners underflowed and were raised to the smallest value that did not.
    assert weights[0, 0, 0] == weights.min()
    assert np.count_nonzero(weights == weights.min()) > 1


def test_pad_to_window_pads_evenly_and_crops_back():
    volume = np.arange(3 * 8 * 2, dtype=np.float32).reshape(3, 8, 2)
    padded, crop = pad_to_window(volume, (6, 4, 5))
    assert padded.shape == (6, 8, 5)
    np.testing.assert_array_equal(padded[crop], volume)
    assert crop[0] == slice(1, 4) and crop[2] == slice(1, 3)
    same, crop = pad_to_window(volume, (3, 8, 2))
    assert same is volume


def test_extract_windows_matches_grid_slices():
    rng = np.random.default_rng(0)
    volume = rng.random((12, 10, 9), dtype=np.float32)
    grid = sliding_window_grid(volume.shape, (6, 6, 6), 0.5)
    windows = extract_windows(volume, grid, (6, 6, 6))
    assert windows.shape == (len(grid), 6, 6, 6, 1) and windows.dtype == np.float32
    for window, (x, y, z) in zip(windows, grid):
        np.testing.assert_array_equal(window[..., 0], volume[x : x + 6, y : y + 6, z : z + 6])


class _Recorder:
    """Identity predictor that records the batches it is given."""

    def __init__(self, drop_channel: bool = False):
        self.batch_shapes: list[tuple[int, ...]] = []
        self.drop_channel = drop_channel

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32
        self.batch_shapes.append(batch.shape)
        return batch[..., 0].copy() if self.drop_channel else batch.copy()


@pytest.mark.parametrize(
    ("volume_shape", "window_shape", "overlap", "batch_size"),
    [
        ((13, 7, 21), (8, 8, 8), 0.5, 4),  # not a multiple, and smaller on y
        ((5, 3, 6), (8, 8, 8), 0.5, 4),  # smaller than the window on every axis
        ((8, 8, 8), (8, 8, 8), 0.5, 2),  # exactly one window
        ((17, 9, 30), (16, 8, 12), 0.25, 3),
        ((20, 20, 11), (6, 6, 6), 0.75, 1),
    ],
)
@pytest.mark.parametrize("drop_channel", [False, True])
def test_identity_predictor_is_stitched_back_to_the_input(
    volume_shape, window_shape, overlap, batch_size, drop_channel
):
    volume = np.random.default_rng(1).normal(size=volume_shape).astype(np.float32)
    predictor = _Recorder(drop_channel)
    output = sliding_window_predict(volume, predictor, window_shape, overlap, batch_size)
    assert output.shape == volume_shape and output.dtype == np.float32
    np.testing.assert_allclose(output, volume, rtol=0, atol=1e-5)

    padded_shape = tuple(max(s, w) for s, w in zip(volume_shape, window_shape))
    n_windows = len(sliding_window_grid(padded_shape, window_shape, overlap))
    assert len(predictor.batch_shapes) == math.ceil(n_windows / batch_size)
    assert all(shape[0] <= batch_size and shape[1:] == (*window_shape, 1) for shape in predictor.batch_shapes)
    assert sum(shape[0] for shape in predictor.batch_shapes) == n_windows


@pytest.mark.parametrize("volume_shape", [(30, 17, 11), (4, 20, 9)])
def test_constant_predictor_has_no_seams(volume_shape):
    volume = np.random.default_rng(2).random(volume_shape, dtype=np.float32)
    output = sliding_window_predict(volume, lambda batch: np.full(batch.shape, 0.7, np.float32), (8, 8, 8))
    np.testing.assert_allclose(output, 0.7, rtol=0, atol=1e-6)


def test_blending_weights_window_centres_more_than_borders():
    # Two windows along x (size 12, window 8, starts 0 and 4) predicting 0 and 1: in the
    # overlap the output moves from 0 (near the first window's centre) to 1 (the second's).
    volume = np.zeros((12, 8, 8), np.float32)
    calls = iter([0.0, 1.0])
    output = sliding_window_predict(
        volume, lambda batch: np.full(batch.shape, next(calls), np.float32), (8, 8, 8), batch_size=1
    )
    profile = output[:, 4, 4]
    np.testing.assert_allclose(profile[:4], 0.0, atol=1e-6)
    np.testing.assert_allclose(profile[8:], 1.0, atol=1e-6)
    assert np.all(np.diff(profile[3:9]) > 0)
    assert profile[5] + profile[6] == pytest.approx(1.0, abs=1e-6)  # symmetric about the middle


def test_predictor_with_wrong_output_shape_raises():
    with pytest.raises(ConfigurationError, match="predict_batch"):
        sliding_window_predict(np.zeros((8, 8, 8), np.float32), lambda batch: batch[:, :4], (8, 8, 8))


def test_volume_must_be_three_dimensional_with_or_without_channels():
    for shape in ((8, 8), (8, 8, 8, 1, 1)):
        with pytest.raises(ConfigurationError, match="volume"):
            sliding_window_predict(np.zeros(shape, np.float32), lambda batch: batch, (8, 8, 8))


def test_a_volume_with_channels_gives_each_window_all_of_them():
    """(X, Y, Z, C) input, as a cascade feeds its image and the earlier stage's probabilities:
    every window carries the C channels of its voxels, and the blended output is per voxel."""
    rng = np.random.default_rng(3)
    volume = rng.normal(size=(13, 11, 9, 3)).astype(np.float32)
    seen = []

    def weighted_sum_of_channels(windows):
        seen.append(windows.shape)
        return windows @ np.array([1.0, 10.0, 100.0], np.float32)[:, None]  # (B, wx, wy, wz, 1)

    out = sliding_window_predict(volume, weighted_sum_of_channels, (8, 8, 8), overlap=0.5, batch_size=3)
    assert out.shape == (13, 11, 9)
    assert all(shape[1:] == (8, 8, 8, 3) for shape in seen)
    # Any blend of identical per-voxel values is that value: the channels reached their voxel.
    np.testing.assert_allclose(out, volume @ np.array([1.0, 10.0, 100.0], np.float32), rtol=1e-5, atol=1e-4)
