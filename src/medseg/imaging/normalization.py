"""Intensity normalization of one image."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import ConfigurationError

if TYPE_CHECKING:
    from medseg.imaging.geometry import CaseGeometry
    from medseg.imaging.io import Volume


def zscore_normalize(
    image: np.ndarray, clip_percentiles: tuple[float, float] | None = None, eps: float = 1e-8
) -> np.ndarray:
    """Per-case z-score: (x - mean) / std over the whole volume, as nnU-Net does for MR.

    Args:
        image: (X, Y, Z) float32.
        clip_percentiles: (low, high) in 0..100; when given, intensities are first clipped to
            those percentiles of the case, which tames bright outliers (vessels, artefacts).
        eps: guards the division for a constant image, which comes back as zeros.

    Returns:
        A new float32 array with mean 0 and std 1 (or all zeros if the image is constant).
    """
    out = image.astype(np.float32, copy=True)
    if clip_percentiles is not None:
        low, high = clip_percentiles
        if not 0 <= low < high <= 100:
            raise ConfigurationError(
                f"data.preprocessing.clip_percentiles={list(clip_percentiles)}: need 0 <= low < high <= 100."
            )
        lo, hi = np.percentile(out, [low, high])
        np.clip(out, lo, hi, out=out)
    mean = float(out.mean(dtype=np.float64))
    std = float(out.std(dtype=np.float64))
    out -= mean
    out /= max(std, eps)
    return out


def image_to_training_grid(
    canonical: Volume, geometry: CaseGeometry, interpolation_order: int, clip_percentiles: tuple[float, float] | None
) -> Volume:
    """The image half of preprocessing, one implementation for training and prediction:
    crop and resample a canonical RAS image onto the training grid that `geometry` planned,
    then z-score it (after clipping to `clip_percentiles` of the case, when given).

    Args:
        canonical: the image in canonical RAS (`medseg.imaging.geometry.to_canonical`).
        geometry: the case's plan (`plan_case_geometry`).
        interpolation_order: spline order of the resampling (1 linear, 3 cubic).
        clip_percentiles: (low, high) in 0..100, or None.

    Returns:
        A float32 volume of `geometry.preprocessed_shape`, mean 0 and std 1.
    """
    from medseg.imaging.geometry import to_training_grid

    volume = to_training_grid(canonical, geometry, order=int(interpolation_order))
    volume.data = zscore_normalize(volume.data, tuple(clip_percentiles) if clip_percentiles else None)
    return volume
