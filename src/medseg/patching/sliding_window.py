"""Sliding-window inference: the window grid, Gaussian importance weights and stitching.

A 3D model trained on patches is run on a whole volume by tiling it with overlapping windows,
predicting each window and blending the overlaps with a Gaussian importance map, so that voxels
near a window's border (where the model sees little context) count less than voxels near its
centre. This follows nnU-Net's `compute_gaussian` / `predict_sliding_window_return_logits` and
MONAI's `sliding_window_inference`.

It is the one inference engine of both models: the 3D model's windows are its training patches,
and the 2D U-Net's whole-slice inference is the same loop with a window of one padded axial
slice, (X', Y', 1), no overlap and constant weights (see
`medseg.inference.slices.predict_axial_slices`), as MONAI's `SlidingWindowInferer` does it.

How many windows go through the model at once comes from a memory budget, not a fixed count
(`windows_per_batch`): the activations of one forward pass grow with the window's voxels and
the model's width, and a CT slice of 512×512 costs a 2D U-Net of 32 filters as much as 64
training slices of 64×64.

All shapes are in voxels. Volumes are (X, Y, Z) arrays without a channel axis; windows handed to
the model are channels-last, (B, wx, wy, wz, 1).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from medseg.errors import ConfigurationError
from medseg.patching._checks import (
    check_fraction,
    check_positive_int,
    check_shape,
    check_volume,
)

PredictBatch = Callable[[np.ndarray], np.ndarray]

# Peak memory of a traced (graph-mode) Keras forward pass, in bytes per value of
# `unet_features_per_voxel` × voxels: a bound that covers both the 2D and the 3D U-Net, taken
# from measurements on CPU (the README gives them). It holds for a traced call only: an eager
# call (`model(x)` outside `tf.function`) keeps every layer's output alive until it returns and
# needs several times more, which is why the networks run traced.
ACTIVATION_BYTES_PER_FEATURE = 16.0
GIB = 2**30

# `planning.memory_gb` is a process's peak, not only the activations': the runtime (Python
# with TensorFlow, Keras, Kedro and MLflow loaded, the network built and traced) and the
# case's arrays come off it first (`activation_budget_gb`), for inference and for the planned
# training batch. RUNTIME_GB: a bare process with the 3D U-Net traced measured 0.73-0.74 GiB
# and the served segmenter 0.96 GiB warm (Intel Xeon, 2 cores); 1.25 covers them and the 6 %
# by which ACTIVATION_BYTES_PER_FEATURE fell short of the 3D U-Net's measured 17 bytes at
# 32x32x16 (README, "The figures behind constants in the code").
RUNTIME_GB = 1.25
# What is left for the activations never goes below this: a budget smaller than the runtime
# still predicts, one window or slice at a time, and the log says the budget is too small.
MIN_ACTIVATION_GB = 0.0625


def case_arrays_bytes(spatial_shape: Sequence[int], in_channels: int, out_channels: int, mirrored: bool) -> int:
    """The float32 arrays a whole-volume prediction holds besides the batch (bytes).

    The input (X, Y, Z, in_channels), and with mirroring its flipped copy; the weighted sum
    (X, Y, Z, out_channels) and the weight sum of `sliding_window_predict`, and with mirroring
    the plain prediction and the running mean over the flips; the probabilities mapped back to
    the scan's grid and the best class so far (`probabilities_to_label_map`), taken at the
    training grid's size.
    """
    voxels = math.prod(int(n) for n in spatial_shape[:3])
    inputs = in_channels * (2 if mirrored else 1)
    outputs = out_channels * (3 if mirrored else 1) + 1
    return 4 * voxels * (inputs + outputs + 2)


def activation_budget_gb(memory_gb: float, held_bytes: int = 0, runtime_gb: float = RUNTIME_GB) -> float:
    """The share of `memory_gb` left for one forward pass's activations: the budget less the
    runtime (`RUNTIME_GB`) and the arrays held (`case_arrays_bytes`), at least
    `MIN_ACTIVATION_GB`. A function of the plan and the volume's shape only, never of the
    memory in use, so the same scan gets the same batches (and masks) in every process."""
    return max(MIN_ACTIVATION_GB, float(memory_gb) - float(runtime_gb) - float(held_bytes) / GIB)


def unet_features_per_voxel(base_filters: int, depth: int, spatial_rank: int) -> float:
    """Feature-map values per input voxel of a U-Net, summed over its resolution levels.

    Level l (0 = full resolution, `depth` = the bottleneck) has `base_filters·2^l` channels on
    `1 / 2^(rank·l)` of the voxels, so the sum is `base_filters · Σ_l (2 / 2^rank)^l`: below
    2·base_filters in 2D and 4/3·base_filters in 3D, whatever the depth. This is the model
    width that `windows_per_batch` multiplies by the window's voxels.

    Args:
        base_filters: channels of the first stage (`<model>.model.base_filters`), >= 1.
        depth: pooling stages, >= 0 (0: one level, a plain convolutional network).
        spatial_rank: 2 (slices) or 3 (patches).

    Returns:
        E.g. 60.0 for the default 2D U-Net (32 filters, depth 3: 32·(1 + 1/2 + 1/4 + 1/8)) and
        10.5 for the default 3D U-Net (8 filters, depth 2: 8·(1 + 1/4 + 1/16)).
    """
    base_filters = check_positive_int(base_filters, "base_filters")
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 0:
        raise ConfigurationError(f"depth={depth!r} is invalid: pass an integer >= 0.")
    if spatial_rank not in (2, 3):
        raise ConfigurationError(f"spatial_rank={spatial_rank!r} is invalid: pass 2 (slices) or 3 (patches).")
    ratio = 2.0 / 2**spatial_rank
    return float(base_filters * sum(ratio**level for level in range(int(depth) + 1)))


def windows_per_batch(
    window_shape: Sequence[int],
    features_per_voxel: float,
    memory_gb: float,
    n_windows: int | None = None,
    bytes_per_feature: float = ACTIVATION_BYTES_PER_FEATURE,
) -> int:
    """How many windows (or whole slices) one forward pass may take within a memory budget.

    One window costs `prod(window_shape) × features_per_voxel × bytes_per_feature` bytes of
    activations; the batch is as many as fit in `memory_gb`, at least 1 (a window bigger than
    the budget still runs, alone) and at most `n_windows`. The budget covers the forward pass
    only: the volume, the accumulators of `sliding_window_predict` and the model's weights
    come on top.

    Args:
        window_shape: voxels, e.g. (32, 32, 16), or (512, 512, 1) for one axial slice.
        features_per_voxel: the model's width, e.g. `unet_features_per_voxel(...)`.
        memory_gb: the budget in GiB (2**30 bytes), > 0 (`planning.memory_gb`).
        n_windows: the number of windows to predict, if known: the batch never exceeds it.
        bytes_per_feature: activation bytes per feature value, `ACTIVATION_BYTES_PER_FEATURE`
            (16) by default.

    Returns:
        Windows per batch, >= 1. With the defaults and 1 GiB: 4 slices of 512×512 for the
        2D U-Net (240 MiB each), 121 slices of 96×96; 390 windows of 32×32×16 for the 3D U-Net.
    """
    window_shape = check_shape(window_shape, "window_shape")
    try:
        budget = float(memory_gb)
        width = float(features_per_voxel) * float(bytes_per_feature)
    except (TypeError, ValueError):
        budget = width = float("nan")
    if not budget > 0 or not math.isfinite(budget):
        raise ConfigurationError(f"memory_gb={memory_gb!r} is invalid: pass a number of GiB > 0, e.g. planning.memory_gb=1.")
    if not width > 0 or not math.isfinite(width):
        raise ConfigurationError(
            f"features_per_voxel={features_per_voxel!r} and bytes_per_feature={bytes_per_feature!r} must be numbers > 0."
        )
    per_window = math.prod(window_shape) * width
    batch = max(1, int(budget * GIB // per_window))
    if n_windows is not None:
        batch = min(batch, check_positive_int(n_windows, "n_windows"))
    return batch


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
        volume: (X, Y, Z) array.
        starts: window corners, e.g. from `sliding_window_grid(volume.shape, window_shape)`. A
            window may reach past the volume (a negative start, or past the end): that part is
            zero, as if the volume had been zero-padded, without a padded copy of the volume.
        window_shape: (wx, wy, wz), voxels.

    Returns:
        float32 array (N, wx, wy, wz, 1), N = len(starts), channels-last.
    """
    volume = _spatial_volume(volume)
    window_shape = check_shape(window_shape, "window_shape", ndim=3)
    channels = volume.shape[3] if volume.ndim == 4 else 1
    batch = np.empty((len(starts), *window_shape, channels), dtype=np.float32)
    for i, start in enumerate(starts):
        inside, within = _clipped_slices(start, window_shape, volume.shape[:3])
        if any(s.stop - s.start != w for s, w in zip(within, window_shape)):
            batch[i] = 0.0
        if volume.ndim == 4:
            batch[(i, *within)] = volume[inside]
        else:
            batch[(i, *within, 0)] = volume[inside]
    return batch


def _spatial_volume(volume: np.ndarray) -> np.ndarray:
    """An (X, Y, Z) image, or (X, Y, Z, C) with its channels last (a cascade's image and the
    earlier stage's probabilities), checked."""
    volume = np.asarray(volume)
    return check_volume(volume, "volume", ndim=4 if volume.ndim == 4 else 3)


def sliding_window_predict(
    volume: np.ndarray,
    predict_batch: PredictBatch,
    window_shape: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 4,
    sigma_scale: float = 0.125,
    weighting: Literal["gaussian", "constant"] = "gaussian",
    padding: Literal["centre", "end"] = "centre",
) -> np.ndarray:
    """Predict a whole volume by weighted blending of overlapping windows.

    output = sum_windows(w * p) / sum_windows(w), with w = `gaussian_importance_map` (nnU-Net,
    MONAI's mode="gaussian") or w = 1 (MONAI's mode="constant"). A voxel that only one window
    covers gets that window's prediction exactly, with either weighting.

    Memory: besides the input, one float32 accumulator of the volume's shape (two with Gaussian
    weights), one batch of windows and its prediction. Windows are cut and predicted batch by
    batch, never all at once, and an axis shorter than the window is zero-padded window by
    window, not by copying the volume. Choose `batch_size` from a memory budget with
    `windows_per_batch`.

    Args:
        volume: (X, Y, Z) image, or (X, Y, Z, C) with channels last (a cascade's image and
            context), cast to float32 (no copy when it is float32 already).
        predict_batch: callable mapping a float32 array (B, wx, wy, wz, 1) to probabilities
            (B, wx, wy, wz, 1) or (B, wx, wy, wz), anything `np.asarray` accepts (e.g.
            `model.predict_on_batch`, or `lambda x: model(x, training=False)`). B <= batch_size;
            the last batch may be smaller.
        window_shape: (wx, wy, wz), voxels; normally the training patch shape.
        overlap: fraction of a window shared with its neighbour, in [0, 1). Default 0.5.
        batch_size: windows per `predict_batch` call, >= 1. Default 4.
        sigma_scale: Gaussian sigma as a fraction of the window, see `gaussian_importance_map`.
        weighting: "gaussian" (default) or "constant" (every voxel of a window counts the same;
            no second accumulator: the normaliser is the product of per-axis window counts).
        padding: where the zeros go on an axis shorter than the window: "centre" (default,
            split evenly, the extra voxel after, as MONAI does) or "end" (all after, so the
            volume keeps its origin: whole-slice inference pads to a multiple of 2**depth so).

    Returns:
        float32 array of `volume.shape`, or `volume.shape + (C,)` when `predict_batch` returns
        C > 1 channels (K + 1 class probabilities: one accumulator per channel); the padding is
        cropped away, so any volume size works.

    Raises:
        ConfigurationError: bad arguments, or `predict_batch` returns the wrong shape.
    """
    volume = _spatial_volume(volume).astype(np.float32, copy=False)
    spatial = volume.shape[:3]
    window_shape = check_shape(window_shape, "window_shape", ndim=3)
    batch_size = check_positive_int(batch_size, "batch_size")
    if weighting not in ("gaussian", "constant"):
        raise ConfigurationError(f"weighting={weighting!r} is invalid: pass 'gaussian' or 'constant'.")
    if padding not in ("centre", "end"):
        raise ConfigurationError(f"padding={padding!r} is invalid: pass 'centre' or 'end'.")

    # Windows are placed on the grid of the padded volume, then shifted back by the padding
    # before the volume: they reach past the volume where it is padded.
    missing = [max(0, w - s) for s, w in zip(spatial, window_shape)]
    before = [m // 2 if padding == "centre" else 0 for m in missing]
    padded_shape = [s + m for s, m in zip(spatial, missing)]
    per_axis = [
        [start - shift for start in sliding_window_starts(size, window, overlap)]
        for size, window, shift in zip(padded_shape, window_shape, before)
    ]
    grid = itertools.product(*per_axis)
    n_windows = math.prod(len(starts) for starts in per_axis)

    weighted_sum = None  # (X, Y, Z) or (X, Y, Z, C): allocated once the channels are known
    if weighting == "gaussian":
        weights = gaussian_importance_map(window_shape, sigma_scale)
        weight_sum = np.zeros(spatial, dtype=np.float32)

    for _ in range(0, n_windows, batch_size):
        starts = list(itertools.islice(grid, batch_size))
        probabilities = _predict_windows(predict_batch, extract_windows(volume, starts, window_shape))
        if weighted_sum is None:
            weighted_sum = np.zeros(spatial + probabilities.shape[4:], dtype=np.float32)
        channels = (Ellipsis,) if probabilities.ndim == 4 else (Ellipsis, None)
        for start, probability in zip(starts, probabilities):
            inside, within = _clipped_slices(start, window_shape, spatial)
            if weighting == "gaussian":
                weighted_sum[inside] += weights[within][channels] * probability[within]
                weight_sum[inside] += weights[within]
            else:
                weighted_sum[inside] += probability[within]

    if weighting == "gaussian":
        weighted_sum /= weight_sum if weighted_sum.ndim == 3 else weight_sum[..., None]
        return weighted_sum
    # Constant weights: the number of windows over a voxel is the product of its per-axis
    # counts. Divide axis by axis, skipping axes covered once (x / 1 is x, bit for bit).
    for axis, (size, window, starts) in enumerate(zip(spatial, window_shape, per_axis)):
        count = np.zeros(size, dtype=np.float32)
        for start in starts:
            count[max(0, start) : max(0, start + window)] += 1.0
        if np.any(count != 1.0):
            view = [None] * weighted_sum.ndim
            view[axis] = slice(None)
            weighted_sum /= count[tuple(view)]
    return weighted_sum


def _predict_windows(predict_batch: PredictBatch, windows: np.ndarray) -> np.ndarray:
    """Run `predict_batch` on (B, wx, wy, wz, 1) windows; return float32 (B, wx, wy, wz), or
    (B, wx, wy, wz, C) for a model with C > 1 output channels (class probabilities)."""
    probabilities = np.asarray(predict_batch(windows), dtype=np.float32)
    if probabilities.shape == windows.shape[:-1]:
        return probabilities
    if probabilities.ndim == 5 and probabilities.shape[:4] == windows.shape[:4]:
        return probabilities[..., 0] if probabilities.shape[-1] == 1 else probabilities
    raise ConfigurationError(
        f"predict_batch returned shape {probabilities.shape} for windows of shape {windows.shape}; "
        f"it must return {(*windows.shape[:-1], 1)} or {windows.shape[:-1]} (one probability per voxel, "
        "or (B, wx, wy, wz, C) class probabilities)."
    )


def _clipped_slices(
    start: Sequence[int], window_shape: Sequence[int], volume_shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The part of a window that lies inside the volume: (slices of the volume, of the window)."""
    inside, within = [], []
    for s, w, n in zip(start, window_shape, volume_shape):
        lo, hi = max(s, 0), min(s + w, n)
        inside.append(slice(lo, hi))
        within.append(slice(lo - s, hi - s))
    return tuple(inside), tuple(within)
