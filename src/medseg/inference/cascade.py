"""nnU-Net's `3d_cascade_fullres`: a full-resolution network that also sees what networks at a
low resolution predicted, as extra input channels.

The low-resolution stage runs on the full-resolution training grid's image resampled to the
planned low-resolution spacing (the same field of view, fewer voxels), so that one patch sees
the whole structure; its class probabilities are resampled back to the full-resolution grid
and stacked after the image: (X, Y, Z, 1 + C). Training and inference build that input the
same way, from the same full-resolution image (`context_channels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.imaging.geometry import resample_to_shape


def context_shape(shape: Sequence[int], spacing: Sequence[float], context_spacing: Sequence[float]) -> tuple[int, int, int]:
    """The grid of the same field of view at `context_spacing`."""
    return tuple(max(1, int(round(n * s / c))) for n, s, c in zip(shape[:3], spacing, context_spacing))


def resample_to(array: np.ndarray, shape: Sequence[int], order: int = 1) -> np.ndarray:
    """`array` (X, Y, Z) or (X, Y, Z, C) resampled to the spatial `shape`, voxel edges aligned
    (the same field of view: `medseg.imaging.geometry.resample_to_shape`), channels kept; float32."""
    shape = tuple(int(n) for n in shape[:3])
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3:
        return resample_to_shape(array, shape, order)
    return np.stack([resample_to_shape(array[..., c], shape, order) for c in range(array.shape[-1])], axis=-1)


def stage_probabilities(stage, image: np.ndarray) -> np.ndarray:
    """One low-resolution network's probabilities on its grid, (x, y, z, C) with C >= 1."""
    probabilities = stage.predict_volume(image)
    return probabilities[..., None] if probabilities.ndim == 3 else probabilities


def context_channels(stages: Sequence[Any], image: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The low-resolution stages' mean class probabilities for a full-resolution image, on its
    grid: (X, Y, Z, C) float32.

    Args:
        stages: segmenters of the low-resolution stage (`medseg.inference.Segmenter`, their
            plan's `target_spacing` the low resolution); their probabilities are averaged.
        image: the z-scored (X, Y, Z) image on the full-resolution training grid.
        spacing: that grid's spacing (mm).
    """
    low_shape = context_shape(image.shape, spacing, stages[0].plan.target_spacing)
    low = resample_to(image, low_shape)
    total = None
    for stage in stages:
        probabilities = stage_probabilities(stage, low)
        total = probabilities if total is None else total + probabilities
    return resample_to(total / len(stages), image.shape[:3])


def with_context(image: np.ndarray, context: np.ndarray) -> np.ndarray:
    """The network's input: the image, then the context's channels, (X, Y, Z, 1 + C)."""
    return np.concatenate([np.asarray(image, np.float32)[..., None], np.asarray(context, np.float32)], axis=-1)


def fold_cases(case_ids: Sequence[str], n_folds: int, seed: int) -> list[list[str]]:
    """The training cases in `n_folds` folds, shuffled by `seed`, sizes within one of each other."""
    order = np.random.default_rng(int(seed)).permutation(sorted(case_ids))
    return [sorted(str(case) for case in order[fold::n_folds]) for fold in range(n_folds)]
