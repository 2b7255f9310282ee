"""Orientation, resampling and cropping, and their exact inverse.

Preprocessing takes a case from its file's voxel grid to the training grid in three steps:
reorient to canonical RAS, crop (optional) and resample to the target spacing. Each step is
recorded in a :class:`CaseGeometry`, so :func:`restore_original_geometry` can take a prediction
back to the file's shape, affine and orientation, the way nnU-Net exports its predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from medseg.imaging.io import Volume, voxel_spacing


@dataclass
class CaseGeometry:
    """Everything needed to undo preprocessing for one case. JSON-serialisable via `to_dict`.

    Attributes:
        original_shape: (X, Y, Z) of the source file, after squeezing a channel axis.
        original_affine: (4, 4) affine of the source file.
        canonical_shape: shape after reorientation to RAS.
        crop_start, crop_stop: the crop box in canonical voxels (the whole volume if no crop).
        target_spacing: training-grid spacing in mm along RAS axes.
        preprocessed_shape: shape of the training grid.
    """

    original_shape: tuple[int, int, int]
    original_affine: list[list[float]]
    canonical_shape: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    target_spacing: tuple[float, float, float]
    preprocessed_shape: tuple[int, int, int]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "CaseGeometry":
        return cls(**{key: record[key] for key in cls.__dataclass_fields__})

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        return tuple(int(b - a) for a, b in zip(self.crop_start, self.crop_stop))

    @property
    def original_spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(np.asarray(self.original_affine))


@dataclass(frozen=True)
class PreprocessingPlan:
    """The preprocessing plan (`geometry.json`), read once: each case's :class:`CaseGeometry`,
    all on one training-grid spacing.

    Attributes:
        cases: {case_id: CaseGeometry}.
    """

    cases: dict[str, CaseGeometry]

    @classmethod
    def from_json(cls, records: Mapping[str, Mapping]) -> "PreprocessingPlan":
        """From `geometry.json`'s content, {case_id: CaseGeometry as a dict}."""
        return cls({str(case_id): CaseGeometry.from_dict(dict(record)) for case_id, record in records.items()})

    def to_json(self) -> dict[str, dict]:
        """`geometry.json`'s content (what its hash and the incremental keys are made of)."""
        return {case_id: geometry.to_dict() for case_id, geometry in self.cases.items()}

    def __getitem__(self, case_id: str) -> CaseGeometry:
        return self.cases[case_id]

    @property
    def target_spacing(self) -> tuple[float, float, float]:
        """The training grid's spacing in mm (RAS), the same for every case.

        Raises:
            ValueError: the plan holds no case, or cases on different spacings.
        """
        spacings = {tuple(float(s) for s in geometry.target_spacing) for geometry in self.cases.values()}
        if len(spacings) != 1:
            raise ValueError(
                f"geometry.json holds {len(spacings)} target spacings {sorted(spacings)}; it must hold one. "
                "Run the data pipeline again."
            )
        return spacings.pop()


def to_canonical(volume: Volume) -> Volume:
    """Reorient a volume to the closest canonical RAS orientation (no interpolation).

    Only axis flips and permutations are applied, as nibabel's `as_closest_canonical` does,
    so the voxel values are unchanged and the dtype is kept.
    """
    ornt = io_orientation(volume.affine)
    data = np.ascontiguousarray(apply_orientation(volume.data, ornt))
    affine = volume.affine @ inv_ornt_aff(ornt, volume.data.shape)
    return Volume(data=data, affine=affine, header=None)


def from_canonical(data: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Put an array in canonical RAS order back into the voxel order of `original_affine`."""
    ornt = io_orientation(original_affine)
    back = ornt_transform(np.array([[0, 1], [1, 1], [2, 1]]), ornt)
    return np.ascontiguousarray(apply_orientation(data, back))


def shape_for_spacing(
    shape: tuple[int, ...], spacing: tuple[float, ...], target_spacing: tuple[float, ...]
) -> tuple[int, int, int]:
    """Grid size that covers the same field of view at `target_spacing` (at least 1 voxel)."""
    return tuple(
        max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing)
    )


def resample_to_shape(data: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample a 3-D array to `shape`, keeping the field of view (voxel edges aligned).

    Args:
        data: (X, Y, Z) array.
        shape: output shape.
        order: spline order: 0 nearest neighbour (labels), 1 linear, 3 cubic (images).

    Returns:
        float32 for order > 0, the input dtype for order 0. Same array if the shape is unchanged.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(data.shape) == shape:
        return data
    zoom = [n_out / n_in for n_out, n_in in zip(shape, data.shape)]
    source = data if order == 0 else data.astype(np.float32, copy=False)
    out = ndimage.zoom(source, zoom, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    if out.shape != shape:  # zoom rounds; guard against an off-by-one
        out = out[tuple(slice(0, s) for s in shape)]
        out = np.pad(out, [(0, s - o) for s, o in zip(shape, out.shape)], mode="edge")
    return out


def resample_label_map(label: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resample an integer label map to `shape` as nnU-Net does: each class one-hot,
    interpolated linearly, then the most probable class per voxel.

    Nearest neighbour is biased by half a source voxel when downsampling (by 2, each output
    voxel takes one of the two source voxels it covers), so labels would land off an image
    resampled linearly. One class at a time is held in memory (a running maximum), not K + 1
    channels.

    Args:
        label: (X, Y, Z) integer label map (any label values).
        shape: output shape.

    Returns:
        (shape) uint8 label map with the input's values. Ties go to the lower value
        (background first). Same array if the shape is unchanged.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(label.shape) == shape:
        return label
    values = np.unique(label)
    best = np.full(shape, -1.0, dtype=np.float32)
    out = np.zeros(shape, dtype=np.uint8)
    for value in values:
        probability = resample_to_shape((label == value).astype(np.float32), shape, order=1)
        wins = probability > best
        out[wins] = value
        best[wins] = probability[wins]
    return out


def resampled_affine(affine: np.ndarray, shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> np.ndarray:
    """Affine of a grid resampled by :func:`resample_to_shape` over the same field of view."""
    scale = np.array(shape_in, dtype=np.float64) / np.array(shape_out, dtype=np.float64)
    voxel_map = np.eye(4)
    voxel_map[:3, :3] = np.diag(scale)
    voxel_map[:3, 3] = (scale - 1.0) / 2.0  # voxel centres, with edges aligned
    return affine @ voxel_map


def nonzero_bounding_box(data: np.ndarray, margin: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Start and stop (exclusive) of the box around the nonzero voxels, grown by `margin`.

    An all-zero volume gives the whole volume, so a crop never empties a case.
    """
    nonzero = np.nonzero(data)
    if nonzero[0].size == 0:
        return (0, 0, 0), tuple(int(s) for s in data.shape)
    start = tuple(max(0, int(ix.min()) - margin) for ix in nonzero)
    stop = tuple(min(n, int(ix.max()) + 1 + margin) for ix, n in zip(nonzero, data.shape))
    return start, stop


def crop(data: np.ndarray, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
    return data[tuple(slice(a, b) for a, b in zip(start, stop))]


def plan_case_geometry(
    original_shape: tuple[int, ...],
    original_affine: np.ndarray,
    target_spacing: tuple[float, float, float],
    crop_box: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> CaseGeometry:
    """Decide the preprocessing of one case from its header geometry (no voxel data needed).

    Args:
        original_shape: (X, Y, Z) of the source file.
        original_affine: (4, 4) affine of the source file.
        target_spacing: spacing in mm of the training grid, along RAS axes.
        crop_box: start and stop in canonical voxels, or None for no crop.
    """
    original_affine = np.asarray(original_affine, dtype=np.float64)
    ornt = io_orientation(original_affine)
    canonical_shape = tuple(int(original_shape[int(axis)]) for axis in np.argsort(ornt[:, 0]))
    canonical_affine = original_affine @ inv_ornt_aff(ornt, original_shape)
    start, stop = crop_box if crop_box is not None else ((0, 0, 0), canonical_shape)
    cropped = tuple(int(b - a) for a, b in zip(start, stop))
    target = shape_for_spacing(cropped, voxel_spacing(canonical_affine), target_spacing)
    return CaseGeometry(
        original_shape=tuple(int(s) for s in original_shape),
        original_affine=original_affine.tolist(),
        canonical_shape=canonical_shape,
        crop_start=tuple(int(a) for a in start),
        crop_stop=tuple(int(b) for b in stop),
        target_spacing=tuple(float(t) for t in target_spacing),
        preprocessed_shape=target,
    )


def to_training_grid(canonical: Volume, geometry: CaseGeometry, order: int) -> Volume:
    """Crop and resample a canonical image onto the training grid that `geometry` planned.

    Args:
        canonical: the case in canonical RAS (output of :func:`to_canonical`).
        geometry: the case's plan.
        order: spline order (1 linear or 3 cubic; 0 nearest neighbour). Labels go through
            :func:`label_to_training_grid` instead.

    Returns:
        The volume on the training grid, with an affine that keeps it in the same world place.
    """
    return _onto_training_grid(canonical, geometry, lambda data, shape: resample_to_shape(data, shape, order=order))


def label_to_training_grid(canonical: Volume, geometry: CaseGeometry) -> Volume:
    """Crop and resample a canonical label map onto the training grid, one-hot and linearly
    (:func:`resample_label_map`), so that it stays aligned with the linearly resampled image."""
    return _onto_training_grid(canonical, geometry, resample_label_map)


def _onto_training_grid(canonical: Volume, geometry: CaseGeometry, resample: Callable) -> Volume:
    cropped = crop(canonical.data, geometry.crop_start, geometry.crop_stop)
    crop_shift = np.eye(4)
    crop_shift[:3, 3] = geometry.crop_start
    cropped_affine = canonical.affine @ crop_shift
    data = resample(cropped, geometry.preprocessed_shape)
    affine = resampled_affine(cropped_affine, cropped.shape, geometry.preprocessed_shape)
    return Volume(data=data, affine=affine)


def restore_original_geometry(data: np.ndarray, geometry: CaseGeometry, order: int = 1) -> np.ndarray:
    """Map an array on the training grid back to the source file's voxel grid.

    Undoes, in reverse order, the resampling, the crop (padding with zeros) and the
    reorientation. With `order=1` a probability map is interpolated linearly; threshold it
    afterwards for a mask (better than nearest neighbour on the mask itself). A label map
    goes through :func:`restore_label_map`.

    Args:
        data: (X, Y, Z) array of shape `geometry.preprocessed_shape`, in canonical RAS order.
        geometry: the case's plan.
        order: spline order used to undo the resampling (0 for a hard mask).

    Returns:
        An array of `geometry.original_shape`, aligned with `geometry.original_affine`.
    """
    _check_on_training_grid(data, geometry)
    return _uncrop_and_reorient(resample_to_shape(data, geometry.cropped_shape, order=order), geometry)


def restore_label_map(label: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    """Map a label map on the training grid back to the source grid: one-hot, linearly, then
    the most probable class (:func:`resample_label_map`). Returns uint8 of the original shape."""
    _check_on_training_grid(label, geometry)
    return _uncrop_and_reorient(resample_label_map(label, geometry.cropped_shape), geometry)


def _check_on_training_grid(data: np.ndarray, geometry: CaseGeometry) -> None:
    if tuple(data.shape) != tuple(geometry.preprocessed_shape):
        raise ValueError(
            f"array shape {data.shape} is not the planned training grid {geometry.preprocessed_shape}"
        )


def _uncrop_and_reorient(cropped: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    canonical = np.zeros(geometry.canonical_shape, dtype=cropped.dtype)
    canonical[tuple(slice(a, b) for a, b in zip(geometry.crop_start, geometry.crop_stop))] = cropped
    return from_canonical(canonical, np.asarray(geometry.original_affine))
