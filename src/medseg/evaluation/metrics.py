"""Evaluation metrics on hard binary masks and on per-case classification scores.

All segmentation metrics take hard masks of one structure: arrays of shape (X, Y, Z) (any
number of dimensions works, as long as `spacing` has one entry per axis) of bool or integer
dtype, where every non-zero voxel is foreground. A float mask is accepted only if it holds
nothing but 0 and 1; threshold probabilities first (`probabilities >= 0.5`).

Spacing is the voxel size in mm per axis, in the same axis order as the array. Distances are
returned in mm, volumes in ml (1 ml = 1000 mm³).

Empty masks follow one convention everywhere (the per-case tables, the summaries, the MLflow
metrics):

=========================  ======  ======  ======  ========  =================  =========  ======
case                       dice    iou     nsd     hd95_mm   hd95_mm_penalized  precision  recall
=========================  ======  ======  ======  ========  =================  =========  ======
both empty                 NaN     NaN     NaN     NaN       NaN                NaN        NaN
only the reference empty   0.0     0.0     0.0     NaN       image diagonal     0.0        NaN
only the prediction empty  0.0     0.0     0.0     NaN       image diagonal     NaN        0.0
=========================  ======  ======  ======  ========  =================  =========  ======

Every per-case row also says which of the two masks was empty (`reference_empty`,
`prediction_empty`), so a reader can tell a NaN "nothing to measure" from a 0.0 "missed".

NaN means "undefined for this case": the summary leaves it out of the mean and counts it as
missing (`medseg.evaluation.reports.summarize_metrics`).

`hd95_mm` keeps MONAI's per-case semantics, so a missed structure (or a structure predicted
where there is none) drops out of its mean, and a model that misses the hard cases gets a
better `hd95_mm` mean than one that finds them roughly. `hd95_mm_penalized` closes that gap:
it equals `hd95_mm` wherever that is defined, and counts a miss as the image diagonal in mm,
``‖shape × spacing‖₂`` of the case's grid (`hd95_miss_penalty_mm`). No two voxels of the
image are further apart than that, so the penalty is at least as large as any HD95 the case
could have had, and its mean never rewards a miss. When both masks are empty there is nothing
to measure, and it is NaN, as Dice is.

`nsd` is the normalized surface Dice at a tolerance τ in mm (Metrics Reloaded's boundary
metric beside Dice; MONAI's `compute_surface_dice`): the share of both masks' surface voxels
that lie within τ of the other mask's surface. It uses the same surfaces and distances as
`hd95_mm`, and counts a distance equal to τ as within it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage, spatial, stats

from medseg.errors import GeometryMismatchError, InvalidLabelError

__all__ = [
    "classification_metrics",
    "dice_score",
    "evaluate_case",
    "hausdorff_distance_95",
    "hausdorff_distance_95_penalized",
    "hd95_miss_penalty_mm",
    "iou_score",
    "normalized_surface_dice",
    "precision_score",
    "recall_score",
    "volume_ml",
]

Spacing = Sequence[float]

# The NSD tolerance when none is given: 1 mm, as nnU-Net's proposal for NSD suggests (its PR
# #3007) and about one voxel of the scans medseg meets. `evaluation.nsd_tolerance_mm` sets it.
DEFAULT_NSD_TOLERANCE_MM = 1.0


def _as_mask(mask: np.ndarray, name: str) -> np.ndarray:
    """Return `mask` as a bool array (non-zero is foreground).

    Raises:
        InvalidLabelError: if `mask` is floating point with values other than 0 and 1.
    """
    array = np.asarray(mask)
    if array.dtype == bool:
        return array
    if np.issubdtype(array.dtype, np.floating) and not np.isin(array, (0.0, 1.0)).all():
        raise InvalidLabelError(
            f"The {name} mask holds values other than 0 and 1 (dtype {array.dtype}). "
            "Pass a hard mask: threshold probabilities first, e.g. `probabilities >= 0.5`."
        )
    return array != 0


def _as_mask_pair(reference: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return both masks as bool arrays after checking that their shapes agree."""
    reference_mask = _as_mask(reference, "reference")
    prediction_mask = _as_mask(prediction, "prediction")
    if reference_mask.shape != prediction_mask.shape:
        raise GeometryMismatchError(
            f"The reference mask has shape {reference_mask.shape} but the prediction has shape "
            f"{prediction_mask.shape}. Map the prediction back to the reference geometry "
            "(undo resampling and reorientation) before evaluating."
        )
    return reference_mask, prediction_mask


def _as_spacing(spacing: Spacing, ndim: int) -> np.ndarray:
    """Return `spacing` as a float64 vector of length `ndim` with positive, finite entries."""
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if values.size != ndim:
        raise GeometryMismatchError(
            f"Spacing {tuple(values.tolist())} has {values.size} entries but the masks have "
            f"{ndim} axes. Give one voxel size in mm per axis, e.g. from the NIfTI header zooms."
        )
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise GeometryMismatchError(
            f"Spacing {tuple(values.tolist())} must be positive and finite (mm per axis). "
            "Check the voxel sizes in the image header."
        )
    return values


def _overlap_counts(reference: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int]:
    """Return (|A|, |B|, |A∩B|) in voxels for bool masks A = reference, B = prediction."""
    n_reference = int(np.count_nonzero(reference))
    n_prediction = int(np.count_nonzero(prediction))
    n_both = int(np.count_nonzero(reference & prediction))
    return n_reference, n_prediction, n_both


def _ratio(numerator: int, denominator: int) -> float:
    """Return numerator / denominator, or NaN when the denominator is 0."""
    return float(numerator / denominator) if denominator else float("nan")


def dice_score(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice similarity coefficient 2|A∩B| / (|A| + |B|) of two hard masks.

    Args:
        reference: ground-truth mask A, shape (X, Y, Z), bool or integer (non-zero = foreground).
        prediction: predicted mask B, same shape as `reference`.

    Returns:
        Dice in [0, 1]. NaN when both masks are empty (undefined, left out of the mean);
        0.0 when exactly one of them is empty.

    Raises:
        GeometryMismatchError: if the shapes differ.
    """
    n_reference, n_prediction, n_both = _overlap_counts(*_as_mask_pair(reference, prediction))
    return _ratio(2 * n_both, n_reference + n_prediction)


def iou_score(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Intersection over union (Jaccard index) |A∩B| / |A∪B| of two hard masks.

    Args:
        reference: ground-truth mask A, shape (X, Y, Z), bool or integer (non-zero = foreground).
        prediction: predicted mask B, same shape as `reference`.

    Returns:
        IoU in [0, 1]. NaN when both masks are empty; 0.0 when exactly one of them is empty.

    Raises:
        GeometryMismatchError: if the shapes differ.
    """
    n_reference, n_prediction, n_both = _overlap_counts(*_as_mask_pair(reference, prediction))
    return _ratio(n_both, n_reference + n_prediction - n_both)


def precision_score(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Voxel precision |A∩B| / |B| (positive predictive value) of a predicted mask.

    Args:
        reference: ground-truth mask A, shape (X, Y, Z), bool or integer (non-zero = foreground).
        prediction: predicted mask B, same shape as `reference`.

    Returns:
        Precision in [0, 1]. NaN when the prediction is empty (nothing was predicted, so
        precision is undefined), whatever the reference holds.

    Raises:
        GeometryMismatchError: if the shapes differ.
    """
    _, n_prediction, n_both = _overlap_counts(*_as_mask_pair(reference, prediction))
    return _ratio(n_both, n_prediction)


def recall_score(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Voxel recall |A∩B| / |A| (sensitivity) of a predicted mask.

    Args:
        reference: ground-truth mask A, shape (X, Y, Z), bool or integer (non-zero = foreground).
        prediction: predicted mask B, same shape as `reference`.

    Returns:
        Recall in [0, 1]. NaN when the reference is empty (there is nothing to find),
        whatever the prediction holds.

    Raises:
        GeometryMismatchError: if the shapes differ.
    """
    n_reference, _, n_both = _overlap_counts(*_as_mask_pair(reference, prediction))
    return _ratio(n_both, n_reference)


def _mask_surface(mask: np.ndarray) -> np.ndarray:
    """Return the surface voxels of a bool mask: the mask minus its erosion.

    The erosion uses scipy's default structuring element (face connectivity, the cross) and
    treats everything outside the array as background, so foreground voxels on the array
    border are surface voxels. This is MONAI's `get_mask_edges` definition.
    """
    return mask & ~ndimage.binary_erosion(mask)


def _joint_bounding_box(
    first: np.ndarray, second: np.ndarray, margin: int
) -> tuple[slice, ...]:
    """Return slices of the smallest box holding both non-empty bool masks, padded by `margin`.

    The padded box is clipped to the array, so a mask touching the array border keeps that
    border (and the erosion keeps treating it as background beyond).
    """
    union = first | second
    box = []
    for axis in range(union.ndim):
        other_axes = tuple(a for a in range(union.ndim) if a != axis)
        indices = np.flatnonzero(union.any(axis=other_axes))
        start = max(int(indices[0]) - margin, 0)
        stop = min(int(indices[-1]) + 1 + margin, union.shape[axis])
        box.append(slice(start, stop))
    return tuple(box)


# At most this many surface voxels go into one k-d tree or one query (the tree holds about 32
# bytes a point, a query's points 48), so a surface of millions of voxels (a poor prediction
# that speckles a CT scan) is measured in slabs of bounded memory.
SURFACE_CHUNK_POINTS = 1 << 20


def _surface_slabs(surface: np.ndarray, max_points: int) -> list[tuple[slice, int]]:
    """Slabs of planes along axis 0 holding at most `max_points` surface voxels each (a single
    plane above it is one slab), as (planes, voxel count), in C order; empty slabs are left out."""
    counts = np.count_nonzero(surface.reshape(surface.shape[0], -1), axis=1)
    slabs, start, running = [], 0, 0
    for plane, count in enumerate(counts.tolist()):
        if running and running + count > max_points:
            slabs.append((slice(start, plane), running))
            start, running = plane, 0
        running += count
    slabs.append((slice(start, len(counts)), running))
    return [(planes, count) for planes, count in slabs if count]


def _slab_points(surface: np.ndarray, planes: slice, spacing: np.ndarray) -> np.ndarray:
    """The surface voxels of one slab, as points in mm (C order)."""
    points = np.argwhere(surface[planes]).astype(np.float64)
    points[:, 0] += planes.start
    points *= spacing
    return points


def _directed_surface_distances(
    source_surface: np.ndarray, target_surface: np.ndarray, spacing: np.ndarray,
    max_points: int = SURFACE_CHUNK_POINTS,
) -> np.ndarray:
    """Return the distance in mm from each source surface voxel to the nearest target one.

    Shape (n_source_surface_voxels,), float64, in C order of the source voxels. `target_surface`
    must not be empty.

    A k-d tree of the target's surface voxels (in mm) answers each source voxel exactly, as a
    Euclidean distance transform of the whole box would, but its memory grows with the
    surfaces, not the box: the transform holds an int32 index per axis and a float64 distance
    for every voxel of the box, gigabytes over a CT scan that a poor prediction fills. Both
    surfaces are taken in slabs along axis 0 of at most `max_points` voxels: a tree per target
    slab, and each source slab queried against it only where it can still come closer than
    the source slab's current farthest answer (the gap between the slabs' planes is a lower
    bound of every distance between them). So the memory beyond the answer (8 bytes a source
    voxel) is bounded by `max_points`, whatever the surfaces, and the answer is the same.
    """
    source_slabs = _surface_slabs(source_surface, max_points)
    offsets = np.cumsum([0] + [count for _, count in source_slabs])
    distances = np.full(int(offsets[-1]), np.inf)
    for target_planes, _ in _surface_slabs(target_surface, max_points):
        # Large leaves and every core: a prediction that fills a CT scan has a surface of
        # hundreds of thousands of voxels far from the reference's, and with the default leaf
        # size (16) that query takes several times longer.
        tree = spatial.cKDTree(_slab_points(target_surface, target_planes, spacing), leafsize=128)
        for (source_planes, _), start, stop in zip(source_slabs, offsets[:-1], offsets[1:]):
            best = distances[start:stop]
            farthest = float(best.max())
            plane_gap = max(target_planes.start - source_planes.stop + 1, source_planes.start - target_planes.stop + 1, 0)
            if plane_gap * spacing[0] >= farthest:
                continue
            found, _ = tree.query(_slab_points(source_surface, source_planes, spacing),
                                  distance_upper_bound=farthest, workers=-1)
            np.minimum(best, found, out=best)
    return distances


def hausdorff_distance_95(
    reference: np.ndarray, prediction: np.ndarray, spacing: Spacing
) -> float:
    """95th-percentile symmetric Hausdorff distance between two mask surfaces, in mm.

    Follows MONAI's `compute_hausdorff_distance(percentile=95, directed=False)`:

    1. the surface of a mask is the mask minus its binary erosion (scipy's default cross
       structuring element; voxels on the array border count as surface);
    2. for every surface voxel of one mask, the Euclidean distance in mm to the nearest
       surface voxel of the other mask (a k-d tree of its surface voxels in mm: the same values
       as `scipy.ndimage.distance_transform_edt` with `sampling=spacing`, without its
       per-voxel arrays);
    3. the 95th percentile (numpy's default linear interpolation) of each direction;
    4. the larger of the two directed values.

    The surfaces are found only inside the bounding box of both masks, padded by one voxel.
    Every surface voxel of both masks lies in that box, so the result is exact, while the
    erosion's memory and time scale with the size of the structures, and the distances' with
    their surfaces, not with the scan (a few hundred MiB at most for a 512×512×160 CT scan).

    Args:
        reference: ground-truth mask, shape (X, Y, Z), bool or integer (non-zero = foreground).
        prediction: predicted mask, same shape as `reference`.
        spacing: voxel size in mm along each axis, e.g. (0.8, 0.8, 2.5) for (X, Y, Z).

    Returns:
        HD95 in mm (0.0 for identical masks). NaN when either mask is empty: with both empty
        the distance is undefined, and with exactly one empty it would be infinite; it is
        reported as missing instead, and the summary counts it under `n_missing`.
        `hausdorff_distance_95_penalized` gives the value that counts a miss instead.

    Raises:
        GeometryMismatchError: if the shapes differ or `spacing` does not have one positive
            entry per axis.
    """
    reference_mask, prediction_mask = _as_mask_pair(reference, prediction)
    distances = _surface_distances(reference_mask, prediction_mask, _as_spacing(spacing, reference_mask.ndim))
    return float("nan") if distances is None else _hd95_of(distances)


def _surface_distances(
    reference_mask: np.ndarray, prediction_mask: np.ndarray, sampling: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Both directed surface distances in mm (reference to prediction, prediction to
    reference), or None when either mask is empty.

    The surfaces are found only inside the bounding box of both masks, padded by one voxel:
    every surface voxel of both lies in it, so the distances are exact, and the erosion's
    memory follows the structures, not the scan.
    """
    if not reference_mask.any() or not prediction_mask.any():
        return None
    box = _joint_bounding_box(reference_mask, prediction_mask, margin=1)
    reference_surface = _mask_surface(reference_mask[box])
    prediction_surface = _mask_surface(prediction_mask[box])
    return (
        _directed_surface_distances(reference_surface, prediction_surface, sampling),
        _directed_surface_distances(prediction_surface, reference_surface, sampling),
    )


def _hd95_of(distances: tuple[np.ndarray, np.ndarray]) -> float:
    """The larger of the two directed 95th percentiles (numpy's linear interpolation)."""
    # overwrite_input: the percentile partitions the distances in place, no copy of them.
    return float(max(np.percentile(d, 95, overwrite_input=True) for d in distances))


def _nsd_of(distances: tuple[np.ndarray, np.ndarray], tolerance_mm: float) -> float:
    """The share of all surface voxels within `tolerance_mm` of the other surface."""
    within = sum(int(np.count_nonzero(d <= tolerance_mm)) for d in distances)
    return within / sum(d.size for d in distances)


def _as_tolerance(tolerance_mm: float) -> float:
    value = float(tolerance_mm)
    if not (np.isfinite(value) and value >= 0):
        raise GeometryMismatchError(
            f"The NSD tolerance {tolerance_mm!r} must be a finite distance in mm, 0 or more "
            f"(evaluation.nsd_tolerance_mm; the default is {DEFAULT_NSD_TOLERANCE_MM:g} mm)."
        )
    return value


def normalized_surface_dice(
    reference: np.ndarray, prediction: np.ndarray, spacing: Spacing,
    tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> float:
    """Normalized surface Dice (NSD) at a tolerance in mm, as MONAI's `compute_surface_dice`.

    ``(|{a ∈ ∂A : d(a, ∂B) ≤ τ}| + |{b ∈ ∂B : d(b, ∂A) ≤ τ}|) / (|∂A| + |∂B|)``, where ∂A and
    ∂B are the surface voxels of the reference and the prediction (the mask minus its
    erosion, as for `hausdorff_distance_95`) and d the Euclidean distance in mm between voxel
    centres. The k-d tree distances are exact in float64, whereas MONAI's are a float32
    distance transform: a distance within float32's rounding of τ can count on one side and
    not on the other.

    Args:
        reference: ground-truth mask, shape (X, Y, Z), bool or integer (non-zero = foreground).
        prediction: predicted mask, same shape as `reference`.
        spacing: voxel size in mm along each axis.
        tolerance_mm: τ, the largest distance in mm that still counts as agreement.

    Returns:
        NSD in [0, 1]: 1.0 for identical masks; NaN when both masks are empty (nothing to
        measure, as Dice); 0.0 when exactly one is empty (no surface voxel agrees).

    Raises:
        GeometryMismatchError: if the shapes differ, `spacing` does not have one positive
            entry per axis, or the tolerance is negative or not finite.
    """
    reference_mask, prediction_mask = _as_mask_pair(reference, prediction)
    sampling = _as_spacing(spacing, reference_mask.ndim)
    tolerance = _as_tolerance(tolerance_mm)
    distances = _surface_distances(reference_mask, prediction_mask, sampling)
    if distances is None:
        return float("nan") if not reference_mask.any() and not prediction_mask.any() else 0.0
    return _nsd_of(distances, tolerance)


def hd95_miss_penalty_mm(shape: Sequence[int], spacing: Spacing) -> float:
    """The HD95 counted for a missed case: the diagonal of the image grid, in mm.

    The diagonal is ``sqrt(sum((shape[i] * spacing[i]) ** 2))``, the length of the grid's
    field of view. Two voxel centres of the grid are never further apart than that, so it
    bounds any HD95 that a non-empty prediction could get on this case.

    Args:
        shape: the grid size in voxels per axis, e.g. (X, Y, Z).
        spacing: voxel size in mm along each axis, in the same order.

    Returns:
        The diagonal in mm.

    Raises:
        GeometryMismatchError: if `spacing` does not have one positive entry per axis.
    """
    sizes = np.asarray(shape, dtype=np.float64).reshape(-1)
    sampling = _as_spacing(spacing, sizes.size)
    return float(np.linalg.norm(sizes * sampling))


def hausdorff_distance_95_penalized(
    reference: np.ndarray, prediction: np.ndarray, spacing: Spacing
) -> float:
    """HD95 in mm, with a miss counted as the image diagonal instead of left out.

    `hausdorff_distance_95` is NaN when exactly one mask is empty (the distance would be
    infinite), so a summary over cases drops the miss and its mean improves. This variant
    returns a finite penalty there, `hd95_miss_penalty_mm(reference.shape, spacing)`, so a
    mean over cases counts every miss.

    Args:
        reference: ground-truth mask, shape (X, Y, Z), bool or integer (non-zero = foreground).
        prediction: predicted mask, same shape as `reference`.
        spacing: voxel size in mm along each axis.

    Returns:
        The HD95 in mm when both masks are non-empty; the image diagonal in mm when exactly one
        of them is empty (a missed structure, or a structure predicted where there is none);
        NaN when both are empty (nothing to measure, as for Dice).

    Raises:
        GeometryMismatchError: if the shapes differ or `spacing` does not have one positive
            entry per axis.
    """
    reference_mask, prediction_mask = _as_mask_pair(reference, prediction)
    sampling = _as_spacing(spacing, reference_mask.ndim)
    return _penalized_hd95(
        hausdorff_distance_95(reference_mask, prediction_mask, sampling),
        reference_empty=not reference_mask.any(),
        prediction_empty=not prediction_mask.any(),
        shape=reference_mask.shape,
        sampling=sampling,
    )


def _penalized_hd95(
    hd95_mm: float,
    *,
    reference_empty: bool,
    prediction_empty: bool,
    shape: Sequence[int],
    sampling: np.ndarray,
) -> float:
    """Return `hd95_mm`, or the miss penalty when exactly one mask is empty."""
    if reference_empty != prediction_empty:
        return hd95_miss_penalty_mm(shape, sampling)
    return hd95_mm


def volume_ml(mask: np.ndarray, spacing: Spacing) -> float:
    """Volume of a mask in ml: foreground voxel count × voxel volume (mm³) / 1000.

    Args:
        mask: shape (X, Y, Z), bool or integer (non-zero = foreground).
        spacing: voxel size in mm along each axis.

    Returns:
        Volume in ml (cm³); 0.0 for an empty mask.

    Raises:
        GeometryMismatchError: if `spacing` does not have one positive entry per axis.
    """
    foreground = _as_mask(mask, "input")
    voxel_volume_mm3 = float(np.prod(_as_spacing(spacing, foreground.ndim)))
    return int(np.count_nonzero(foreground)) * voxel_volume_mm3 / 1000.0


def evaluate_case(
    reference: np.ndarray, prediction: np.ndarray, spacing: Spacing,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> dict[str, float | bool]:
    """All segmentation metrics of one case, as one row of the per-case report.

    Args:
        reference: ground-truth mask, shape (X, Y, Z), bool or integer (non-zero = foreground).
        prediction: predicted mask in the same geometry, same shape as `reference`.
        spacing: voxel size in mm along each axis (of the geometry both masks are in).
        nsd_tolerance_mm: the tolerance τ of `nsd`, in mm.

    Returns:
        A dict with plain Python values:
        `dice`, `iou`, `nsd` (at `nsd_tolerance_mm`), `hd95_mm`, `precision`, `recall`
        (floats, NaN where undefined; see the
        module docstring), `hd95_mm_penalized` (`hd95_mm`, except that a case where exactly
        one mask is empty gets the image diagonal in mm, ‖shape × spacing‖, of this grid),
        `reference_ml`, `predicted_ml` (volumes in ml), and `reference_empty`,
        `prediction_empty` (bools), which tell why a metric is NaN.

    Raises:
        GeometryMismatchError: if the shapes differ (the message gives both shapes) or
            `spacing` does not have one positive entry per axis.
    """
    reference_mask, prediction_mask = _as_mask_pair(reference, prediction)
    sampling = _as_spacing(spacing, reference_mask.ndim)
    n_reference, n_prediction, n_both = _overlap_counts(reference_mask, prediction_mask)
    voxel_volume_ml = float(np.prod(sampling)) / 1000.0
    tolerance = _as_tolerance(nsd_tolerance_mm)
    distances = _surface_distances(reference_mask, prediction_mask, sampling)
    # The NSD first: the HD95's percentile reorders the distances in place.
    nsd = _nsd_of(distances, tolerance) if distances is not None else (0.0 if n_reference or n_prediction else float("nan"))
    hd95_mm = float("nan") if distances is None else _hd95_of(distances)
    return {
        "dice": _ratio(2 * n_both, n_reference + n_prediction),
        "iou": _ratio(n_both, n_reference + n_prediction - n_both),
        "nsd": nsd,
        "hd95_mm": hd95_mm,
        "hd95_mm_penalized": _penalized_hd95(
            hd95_mm,
            reference_empty=n_reference == 0,
            prediction_empty=n_prediction == 0,
            shape=reference_mask.shape,
            sampling=sampling,
        ),
        "precision": _ratio(n_both, n_prediction),
        "recall": _ratio(n_both, n_reference),
        "reference_ml": n_reference * voxel_volume_ml,
        "predicted_ml": n_prediction * voxel_volume_ml,
        "reference_empty": n_reference == 0,
        "prediction_empty": n_prediction == 0,
    }


def evaluate_case_per_class(
    reference: np.ndarray, prediction: np.ndarray, spacing: Spacing, classes: Mapping[int, str],
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> list[dict[str, float | bool | int | str]]:
    """:func:`evaluate_case` for each foreground class of two label maps.

    Args:
        reference, prediction: integer label maps of one shape (the dataset's label values).
        spacing: voxel size in mm along each axis.
        classes: {label value: class name} of the foreground classes (0 is background).
        nsd_tolerance_mm: the tolerance of `nsd`, in mm.

    Returns:
        One row per class, in the order of `classes`: `class` (the name), `label` (the
        value), then every key of :func:`evaluate_case` on the masks `== value`. The empty-mask
        rules apply per class: a class absent from both maps gets NaN Dice and IoU.
    """
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    return [
        {"class": str(name), "label": int(value), **evaluate_case(reference == value, prediction == value, spacing, nsd_tolerance_mm)}
        for value, name in classes.items()
    ]


def _roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC-AUC by the Mann–Whitney U statistic; ties in `y_score` count one half.

    Equals the probability that a random positive scores higher than a random negative.
    NaN when only one class is present.
    """
    n_positive = int(np.count_nonzero(y_true))
    n_negative = y_true.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    ranks = stats.rankdata(y_score)  # average ranks for ties
    u_statistic = ranks[y_true].sum() - n_positive * (n_positive + 1) / 2.0
    return float(u_statistic / (n_positive * n_negative))


def classification_metrics(
    y_true: np.ndarray, y_score: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Accuracy, ROC-AUC and F1 of binary scores, e.g. "does this case contain the structure".

    Args:
        y_true: true labels, shape (N,), values 0/1 or bool.
        y_score: scores or probabilities, shape (N,), finite; higher means more likely positive.
        threshold: a sample is predicted positive when `y_score >= threshold`. Used by
            accuracy and F1; ROC-AUC does not depend on it.

    Returns:
        A dict of plain floats:
        `accuracy`: fraction of correct thresholded predictions (NaN when N = 0);
        `roc_auc`: Mann–Whitney estimate with tied scores counted as one half (average ranks
            from `scipy.stats.rankdata`); NaN when only one class is present in `y_true`;
        `f1`: 2TP / (2TP + FP + FN). 0.0 when positives exist but none is predicted (or none
            of the predicted ones is right); NaN when there are no positives and none is
            predicted (0 / 0).

    Raises:
        ValueError: if the shapes differ, `y_true` is not binary or `y_score` is not finite.
    """
    labels = np.asarray(y_true).reshape(-1)
    scores = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(
            f"y_true has {labels.size} values but y_score has {scores.size}; "
            "give one score per label."
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("y_true must hold only 0 and 1 (or False and True).")
    if not np.isfinite(scores).all():
        raise ValueError("y_score holds NaN or infinite values.")

    positives = labels.astype(bool)
    predicted = scores >= threshold
    true_positive = int(np.count_nonzero(positives & predicted))
    false_positive = int(np.count_nonzero(~positives & predicted))
    false_negative = int(np.count_nonzero(positives & ~predicted))
    return {
        "accuracy": _ratio(int(np.count_nonzero(positives == predicted)), labels.size),
        "roc_auc": _roc_auc(positives, scores),
        "f1": _ratio(2 * true_positive, 2 * true_positive + false_positive + false_negative),
    }
