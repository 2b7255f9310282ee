"""Postprocessing of predictions: test-time mirroring and the largest connected component.

Both follow nnU-Net: mirroring averages the model's probabilities over every combination of
flips along the chosen axes (`predict_sliding_window_return_logits` with `use_mirroring`), and
the largest-component filter keeps, for each foreground class, only its largest 26-connected
region (`remove_all_but_largest_component`). Both are off unless a parameter turns them on,
and the test-split evaluation reports Dice with and without each one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medseg.errors import ConfigurationError
from medseg.imaging.components import largest_component
from medseg.imaging.geometry import CaseGeometry, restore_original_geometry
from medseg.imaging.io import Volume, voxel_spacing


def mirror_combinations(axes: Iterable[int]) -> list[tuple[int, ...]]:
    """Every subset of `axes`, the empty one (no flip) first: 2**len(axes) flips.

    Args:
        axes: spatial axes in 0..2 of an (X, Y, Z) volume in canonical RAS.

    Returns:
        E.g. [(), (0,), (1,), (0, 1)] for axes (0, 1).
    """
    axes = sorted(set(int(a) for a in axes))
    if any(a not in (0, 1, 2) for a in axes):
        raise ConfigurationError(f"mirror axes {axes} are invalid: pass axes in 0..2 (x, y, z of the RAS volume).")
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


def predict_with_mirroring(
    predict_volume: Callable[[np.ndarray], np.ndarray], image: np.ndarray, axes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities of a volume, plain and averaged over its mirrored copies.

    Each flip of the image is predicted and flipped back; the mean over all flips (the
    unflipped one included) is the test-time-augmented prediction. The unflipped prediction
    comes back too, so one pass yields both sides of the with/without comparison.

    Args:
        predict_volume: maps (X, Y, Z) to (X, Y, Z) probabilities or (X, Y, Z, C) class
            probabilities (e.g. `sliding_window_predict` bound to a model).
        image: (X, Y, Z) float32, preprocessed, or (X, Y, Z, C) with channels last (a cascade's
            image and context); only the spatial axes are flipped.
        axes: spatial axes to mirror; empty: no mirroring.

    Returns:
        (plain, mirrored): float32 arrays of the prediction's shape; `mirrored` is None when
        `axes` is empty. Memory: the plain prediction, one running sum and one flipped pass.
    """
    combos = mirror_combinations(axes)
    plain = np.asarray(predict_volume(image), dtype=np.float32)
    if len(combos) == 1:
        return plain, None
    total = plain.copy()
    for flip in combos[1:]:
        flipped = np.ascontiguousarray(np.flip(image, axis=flip))
        total += np.flip(np.asarray(predict_volume(flipped), dtype=np.float32), axis=flip)
    total /= len(combos)
    return plain, total


def keep_largest_component(labels: np.ndarray, class_values: Iterable[int]) -> np.ndarray:
    """Keep only the largest 26-connected region of each foreground class.

    Args:
        labels: (X, Y, Z) integer label map (0 is background).
        class_values: the foreground values to filter; other values are left as they are.

    Returns:
        A new label map of the same dtype; the removed voxels become 0. A class with no voxel
        stays empty; ties between equally large regions keep the first in scan order.
    """
    out = np.array(labels, copy=True)
    for value in class_values:
        region = out == value
        out[region & ~largest_component(region, connectivity=3)] = 0
    return out


def probabilities_to_label_map(
    probability: np.ndarray, geometry: CaseGeometry, threshold: float, class_values: Sequence[int]
) -> np.ndarray:
    """A label map on the source file's grid from probabilities on the training grid.

    One sigmoid channel: the probability is resampled linearly to the source grid, then
    thresholded (smoother than nearest neighbour on a hard mask). K + 1 class probabilities:
    each one is resampled linearly, then the most probable class wins (background on ties),
    one channel in memory at a time.

    Args:
        probability: (X, Y, Z) or (X, Y, Z, 1) foreground probabilities, or (X, Y, Z, K + 1)
            class probabilities, on `geometry.preprocessed_shape`.
        geometry: the case's plan.
        threshold: for one channel, the foreground threshold.
        class_values: the label value of each foreground channel, 1..K.

    Returns:
        uint8 (`geometry.original_shape`) holding 0 and `class_values`.
    """
    if probability.ndim == 3 or probability.shape[-1] == 1:
        foreground = probability if probability.ndim == 3 else probability[..., 0]
        original = restore_original_geometry(foreground, geometry, order=1)
        return (original >= threshold).astype(np.uint8) * np.uint8(class_values[0])
    best = restore_original_geometry(np.ascontiguousarray(probability[..., 0]), geometry, order=1)
    labels = np.zeros(best.shape, dtype=np.uint8)
    for index, value in enumerate(class_values, start=1):
        channel = restore_original_geometry(np.ascontiguousarray(probability[..., index]), geometry, order=1)
        wins = channel > best
        best[wins] = channel[wins]
        labels[wins] = value
    return labels


def probabilities_on_source_grid(probability: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    """Probabilities on the training grid mapped back to the source file's grid, each channel
    resampled linearly as `probabilities_to_label_map` does before its threshold or argmax: the
    space in which an ensemble of models with different grids averages them.

    Returns:
        float32, `geometry.original_shape` (one sigmoid channel) or that shape + (K + 1,).
    """
    if probability.ndim == 3 or probability.shape[-1] == 1:
        foreground = probability if probability.ndim == 3 else probability[..., 0]
        return restore_original_geometry(np.asarray(foreground, dtype=np.float32), geometry, order=1).astype(np.float32, copy=False)
    channels = [restore_original_geometry(np.ascontiguousarray(probability[..., c], dtype=np.float32), geometry, order=1)
                for c in range(probability.shape[-1])]
    return np.stack(channels, axis=-1).astype(np.float32, copy=False)


def source_label_map(probability: np.ndarray, threshold: float, class_values: Sequence[int]) -> np.ndarray:
    """A uint8 label map from probabilities already on the source grid: one channel
    thresholded, or the most probable of K + 1 classes (background on ties), exactly as
    `probabilities_to_label_map` decides after its resampling."""
    if probability.ndim == 3 or probability.shape[-1] == 1:
        foreground = probability if probability.ndim == 3 else probability[..., 0]
        return (foreground >= threshold).astype(np.uint8) * np.uint8(class_values[0])
    best = np.array(probability[..., 0], dtype=np.float32)
    labels = np.zeros(best.shape, dtype=np.uint8)
    for index, value in enumerate(class_values, start=1):
        channel = probability[..., index]
        wins = channel > best
        best[wins] = channel[wins]
        labels[wins] = value
    return labels


@dataclass(frozen=True)
class LabelMapper:
    """Probabilities on the training grid to a uint8 label map on the scan's grid: the inverse
    geometry, the threshold (or the most probable class) and the largest-component filter.

    Everything a segmenter does after its network, with no network in it: it pickles in
    bytes, so that a Dask worker can do this part while the driver runs the network.
    """

    threshold: float
    class_values: tuple[int, ...]
    keep_largest_component: bool = False

    def __call__(self, probability: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
        """uint8 (`geometry.original_shape`) from (X, Y, Z[, C]) probabilities on
        `geometry.preprocessed_shape` (:func:`probabilities_to_label_map`)."""
        labels = probabilities_to_label_map(probability, geometry, self.threshold, self.class_values)
        return keep_largest_component(labels, self.class_values) if self.keep_largest_component else labels

    def volume(self, probability: np.ndarray, geometry: CaseGeometry) -> Volume:
        """The label map as a :class:`medseg.imaging.io.Volume` with the scan's own affine."""
        return Volume(self(probability, geometry), np.asarray(geometry.original_affine, dtype=np.float64))

    def from_parts(self, parts: tuple[np.ndarray, CaseGeometry]) -> Volume:
        """`volume(*parts)`, for the (probability, geometry) a segmenter's `network_part` gives."""
        return self.volume(*parts)


def volumes_ml(mask: Volume, classes: Mapping[str, str]) -> dict[str, float]:
    """`volume_ml` (all foreground, in millilitres) and, with several classes,
    `volume_ml_<name>` for each {label value: name} of `classes`."""
    voxel_ml = float(np.prod(voxel_spacing(mask.affine))) / 1000.0
    out = {"volume_ml": float(np.count_nonzero(mask.data)) * voxel_ml}
    if len(classes) > 1:
        for value, name in classes.items():
            out[f"volume_ml_{name}"] = float(np.count_nonzero(mask.data == int(value))) * voxel_ml
    return out
