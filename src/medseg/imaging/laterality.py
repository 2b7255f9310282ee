"""Which classes keep to one side of the body: a flip across the midline would swap them.

A left and a right structure (left and right hippocampus, say) can only be told apart by their
side. A left-right flip augmentation keeps the label "left" on what now is the right side, and
the model can no longer learn the side. nnU-Net leaves mirroring on for such data; medseg
detects it from the data and turns the left-right flip off.

Volumes are in canonical RAS: the first axis runs from the patient's left (index 0) to their
right.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

LEFT_RIGHT_AXIS = 0  # canonical RAS


def body_midline(image: np.ndarray) -> float:
    """The body's midline along the left-right axis, in voxels: the middle of the extent of
    the voxels brighter than the image's 10th percentile (the background of an MR or CT is the
    darkest tenth or more of a volume that holds a body)."""
    body = image > np.percentile(image, 10)
    columns = np.flatnonzero(body.any(axis=(1, 2)))
    if columns.size == 0:
        return (image.shape[LEFT_RIGHT_AXIS] - 1) / 2
    return (columns[0] + columns[-1]) / 2


def right_fractions(label: np.ndarray, midline: float) -> dict[int, float]:
    """For each foreground class present, the fraction of its voxels right of `midline`.

    Args:
        label: (X, Y, Z) canonical RAS label map.
        midline: voxel position along X (see :func:`body_midline`).

    Returns:
        {label value: fraction in [0, 1]} for the values above 0 that occur.
    """
    fractions = {}
    for value in np.unique(label[label > 0]):
        x = np.nonzero(label == value)[LEFT_RIGHT_AXIS]
        fractions[int(value)] = float((x > midline).mean())
    return fractions


def lateralized_classes(per_case: Iterable[Mapping[int, float]], tolerance: float = 0.05) -> list[int]:
    """The classes that lie on one and the same side in every case where they occur.

    Args:
        per_case: :func:`right_fractions` of each case.
        tolerance: a class counts as on one side when at most this fraction of its voxels
            crosses the midline (a structure touching the midline, or a slightly tilted head).

    Returns:
        Sorted label values. A class that is on the left in some cases and on the right in
        others (lesions anywhere) is not lateralized.
    """
    sides: dict[int, set[str]] = {}
    for fractions in per_case:
        for value, right in fractions.items():
            side = "right" if right >= 1 - tolerance else "left" if right <= tolerance else "both"
            sides.setdefault(int(value), set()).add(side)
    return sorted(value for value, seen in sides.items() if len(seen) == 1 and "both" not in seen)


def safe_flip_axes(flip_axes: Iterable[int], lateralized: Iterable[int]) -> tuple[int, ...]:
    """`flip_axes` without the left-right axis when any class is lateralized."""
    axes = tuple(sorted(set(int(a) for a in flip_axes)))
    return tuple(a for a in axes if a != LEFT_RIGHT_AXIS) if list(lateralized) else axes
