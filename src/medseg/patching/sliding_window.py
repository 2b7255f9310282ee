"""Sliding-window inference: the window grid, Gaussian importance weights and stitching.

A 3D model trained on patches is run on a whole volume by tiling it with overlapping windows,
predicting each window and blending the overlaps with a Gaussian importance map, so that voxels
near a window's border (where the model sees little context) count less than voxels near its
centre. This follows nnU-Net's `compute_gaussian` / `predict_sliding_window_return_logits` and
MONAI's `sliding_window_inference`.

All shapes are in voxels. Volumes are (X, Y, Z) arrays without a channel axis; windows handed to
the model are channels-last, (B, wx, wy, wz, 1).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from medseg.errors import ConfigurationError
from medseg.patching._checks import (
    check_fraction,
    check_positive_int,
    check_shape,
    check_volume,
)

PredictBatch = Callable[[np.ndarray], np.ndarray]


def sliding_window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis.

    Windows advance by `max(1, int(window * (1 - overlap)))` voxels; the last window is placed
    flush with the border (start = size - window), so every voxel is covered even when `size`
    is not a multiple of the step.

    Args:
        size: length of the axis, voxels (>= 1).
        window: window length along the axis, voxels (>= 1).
        overlap: fraction of the window shared by neighbours, in [0, 1). 0.5 (nnU-Net's and
            MONAI's usual choice at inference) means each voxel is seen by about 2 windows per axis.

    Returns:
        Sorted, distinct starts. `[0]` when `size <= window`: the axis is covered by one window
        (the caller pads the volume up to the window, see `pad_to_window`).
    """
    size = check_positive_int(size, "size")
    window = check_positive_int(window, "window")
    overlap = check_fraction(overlap, "overlap", upper_inclusive=False)
    if size <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    last = size - window
    starts = list(range(0, last + 1, step))
    if starts[-1] != last:
        starts.append(last)
    return starts


def sliding_window_grid(
    volume_shape: Sequence[int], window_shape: Sequence[int], overlap: float = 0.5
) -> list[tuple[int, ...]]:
    """Start corners of all windows tiling a volume: the cartesian product of per-axis starts.

    Args:
        volume_shape: (X, Y, Z) (any number of axes), voxels.
        window_shape: the window, same number of axes, voxels.
        overlap: fraction in [0, 1), the same along every axis. Default 0.5.

    Returns:
        One start tuple per window, in C order (last axis fastest). Together the windows cover
        every voxel of the volume for any size; on an axis shorter than the window the single
        start is 0 and the window reaches past the volume (pad before extracting).
    """
    volume_shape = check_shape(volume_shape, "volume_shape")
    window_shape = check_shape(window_shape, "window_shape", ndim=len(volume_shape))
    per_axis = [
        sliding_window_starts(size, window, overlap)
        for size, window in zip(volume_shape, window_shape)
    ]
    return list(itertools.product(*per_axis))


def gaussian_importance_map(
    window_shape: Sequence[int], sigma_scale: float = 0.125
) -> np.ndarray:
    """Gaussian weight of each voxel of a window, for blending overlapping predictions.

    The Gaussian is centred at the middle of the window ((w - 1) / 2 on each axis, between two
    voxels for an even w, so the map is exactly symmetric under flips) with
    sigma = sigma_scale * w per axis. nnU-Net's default sigma_scale of 1/8 puts the border at
    4 sigma, where the weight is about exp(-8) per axis.

    Args:
        window_shape: window size per axis, voxels.
        sigma_scale: sigma as a fraction of the window size, > 0. Default 0.125.

    Returns:
        float32 array of `window_shape`, maximum exactly 1 (at the centre voxel, or the 2^k
        central voxels for even sizes). Values that underflow float32 (zero or subnormal, which
        happens for small `sigma_scale`) are raised to the smallest normal value in the map, as
        nnU-Net does, so every weight is > 0 and the blended sum is never divided by zero.
    """
    window_shape = check_shape(window_shape, "window_shape")
    try:
        valid_sigma = float(sigma_scale) > 0.0
    except (TypeError, ValueError):
        valid_sigma = False
    if not valid_sigma:
        raise ConfigurationError(f"sigma_scale={sigma_scale!r} is invalid: pass a number > 0, e.g. 0.125.")
    weights = np.ones((), dtype=np.float64)
    for axis_size in window_shape:
        offsets = np.arange(axis_size, dtype=np.float64) - (axis_size - 1) / 2.0
        profile = np.exp(-0.5 * (offsets / (sigma_scale * axis_size)) ** 2)
        weights = np.multiply.outer(weights, profile)
    weights = (weights / weights.max()).astype(np.float32)
    normal = weights >= np.finfo(np.float32).tiny
    weights[~normal] = weights[normal].min()
    return weights


def pad_to_window(
    volume: np.ndarray, window_shape: Sequence[int]
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad a volume with zeros so that it is at least `window_shape` on every axis.

    Padding is split evenly between both sides (the extra voxel, if any, after), as MONAI does.

    Args:
        volume: (X, Y, Z) array (any number of axes).
        window_shape: window size, same number of axes, voxels.

    Returns:
        (padded, crop): `padded[crop]` is `volume`. `padded` is `volume` itself, not a copy,
        when no axis is shorter than the window.
    """
    window_shape = check_shape(window_shape, "window_shape", ndim=volume.ndim)
    missing = [max(0, w - s) for s, w in zip(volume.shape, window_shape)]
    pads = [(m // 2, m - m // 2) for m in missing]
    crop = tuple(slice(before, before + s) for (before, _), s in zip(pads, volume.shape))
    if not any(missing):
        return volume, crop
    return np.pad(volume, pads, mode="constant", constant_values=0), crop


def extract_windows(
    volume: np.ndarray, starts: Sequence[Sequence[int]], window_shape: Sequence[int]
) -> np.ndarray:
    """Stack the windows at `starts` into one model input batch.

    Used by `sliding_window_predict` one batch at a time, and by benchmarks that feed exactly
    the same windows to `model.predict` at once.

    Args:
        volume: (X, Y, Z) array, at least `window_shape` on every axis (see `pad_to_window`).
        starts: window corners, e.g. from `sliding_window_grid(volume.shape, window_shape)`.
        window_shape: (wx, wy, wz), voxels.

    Returns:
        float32 array (N, wx, wy, wz, 1), N = len(starts), channels-last.
    """
    volume = check_volume(volume, "volume", ndim=3)
    window_shape = check_shape(window_shape, "window_shape", ndim=3)
    batch = np.empty((len(starts), *window_shape, 1), dtype=np.float32)
    for i, start in enumerate(starts):
        batch[i, ..., 0] = volume[_window_slices(start, window_shape)]
    return batch


def sliding_window_predict(
    volume: np.ndarray,
    predict_batch: PredictBatch,
    window_shape: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 4,
    sigma_scale: float = 0.125,
) -> np.ndarray:
    """Predict a whole volume by Gaussian-weighted blending of overlapping windows.

    output = sum_windows(w * p) / sum_windows(w), with w = `gaussian_importance_map`.

    Memory: besides the input, two float32 accumulators of the (padded) volume's shape, one
    batch of windows and its prediction; the padded copy only when the volume is smaller than
    the window. Windows are cut and predicted batch by batch, never all at once.

    Args:
        volume: (X, Y, Z) image, cast to float32.
        predict_batch: callable mapping a float32 array (B, wx, wy, wz, 1) to probabilities
            (B, wx, wy, wz, 1) or (B, wx, wy, wz), anything `np.asarray` accepts (e.g.
            `model.predict_on_batch`, or `lambda x: model(x, training=False)`). B <= batch_size;
            the last batch may be smaller.
        window_shape: (wx, wy, wz), voxels; normally the training patch shape.
        overlap: fraction of a window shared with its neighbour, in [0, 1). Default 0.5.
        batch_size: windows per `predict_batch` call, >= 1. Default 4.
        sigma_scale: Gaussian sigma as a fraction of the window, see `gaussian_importance_map`.

    Returns:
        float32 array of `volume.shape`. An axis shorter than the window is zero-padded (evenly
        on both sides) up to the window and cropped back, so any volume size works.

    Raises:
        ConfigurationError: bad arguments, or `predict_batch` returns the wrong shape.
    """
    volume = check_volume(volume, "volume", ndim=3).astype(np.float32, copy=False)
    window_shape = check_shape(window_shape, "window_shape", ndim=3)
    batch_size = check_positive_int(batch_size, "batch_size")
    weights = gaussian_importance_map(window_shape, sigma_scale)

    padded, crop = pad_to_window(volume, window_shape)
    grid = sliding_window_grid(padded.shape, window_shape, overlap)
    weighted_sum = np.zeros(padded.shape, dtype=np.float32)
    weight_sum = np.zeros(padded.shape, dtype=np.float32)

    for first in range(0, len(grid), batch_size):
        starts = grid[first : first + batch_size]
        probabilities = _predict_windows(predict_batch, extract_windows(padded, starts, window_shape))
        for start, probability in zip(starts, probabilities):
            region = _window_slices(start, window_shape)
            weighted_sum[region] += weights * probability
            weight_sum[region] += weights

    weighted_sum /= weight_sum
    if padded is volume:
        return weighted_sum
    return np.ascontiguousarray(weighted_sum[crop])


def _predict_windows(predict_batch: PredictBatch, windows: np.ndarray) -> np.ndarray:
    """Run `predict_batch` on (B, wx, wy, wz, 1) windows; return float32 (B, wx, wy, wz)."""
    probabilities = np.asarray(predict_batch(windows), dtype=np.float32)
    if probabilities.shape == windows.shape:
        return probabilities[..., 0]
    if probabilities.shape == windows.shape[:-1]:
        return probabilities
    raise ConfigurationError(
        f"predict_batch returned shape {probabilities.shape} for windows of shape {windows.shape}; "
        f"it must return {windows.shape} or {windows.shape[:-1]} (one probability per voxel, "
        "a single output channel)."
    )


def _window_slices(start: Sequence[int], window_shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + w) for s, w in zip(start, window_shape))
