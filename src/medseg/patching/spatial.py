"""nnU-Net's spatial augmentation (v2, `nnUNetTrainer.get_training_transforms`): rotation and
scaling, applied where a training patch is cut, in numpy/scipy (TensorFlow has no 3D resampling op).

| transform | applied to a sample with probability | parameters |
| --- | --- | --- |
| rotation | 0.2 | 3D patches: an angle ~ U(-30°, 30°) about each axis; 2D slices: one in-plane angle ~ U(-180°, 180°) |
| scaling | 0.2 | one factor ~ U(0.7, 1.4) for every axis (> 1 takes in more of the scan: the anatomy looks smaller) |

A transformed patch samples the volume at its own voxel grid rotated and scaled about the patch's
centre, so its corners read real neighbours, not padding; where they leave the volume they read
0, as `extract_patch` pads. The image is interpolated linearly (nnU-Net: cubic; linear costs a
quarter as much and the difference is below the intensity augmentation's noise), the label by
nearest neighbour, so its values stay the dataset's labels. Rotation is in voxel space, as in
nnU-Net. The draws come from the sampler's own generator, so a seed gives the same patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROTATION_PROBABILITY = 0.2
SCALING_PROBABILITY = 0.2
ROTATION_3D_DEGREES = 30.0
ROTATION_2D_DEGREES = 180.0
SCALING_RANGE = (0.7, 1.4)
SPATIAL_AUGMENTATIONS = ("none", "nnunet")


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """The 3x3 rotation by `angles` (radians) about the x, then y, then z axis."""
    ax, ay, az = (float(a) for a in angles)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def draw_transform(rng: np.random.Generator, in_plane: bool) -> np.ndarray | None:
    """One sample's transform as nnU-Net draws it: a 3x3 matrix (rotation times scale) from
    patch offsets to volume offsets, or None when neither rotation nor scaling applies (64 %
    of samples). `in_plane`: a 2D slice, rotated about the slice axis (z) only."""
    rotate = rng.random() < ROTATION_PROBABILITY
    scale = rng.random() < SCALING_PROBABILITY
    if not (rotate or scale):
        return None
    matrix = np.eye(3)
    if rotate:
        if in_plane:
            limit = np.deg2rad(ROTATION_2D_DEGREES)
            matrix = rotation_matrix((0.0, 0.0, rng.uniform(-limit, limit)))
        else:
            limit = np.deg2rad(ROTATION_3D_DEGREES)
            matrix = rotation_matrix(rng.uniform(-limit, limit, size=3))
    if scale:
        matrix = matrix * rng.uniform(*SCALING_RANGE)
    return matrix


def patch_coordinates(center: Sequence[int], patch_shape: Sequence[int], matrix: np.ndarray) -> np.ndarray:
    """The volume coordinates (3, voxels) that a `patch_shape` patch about `center` reads, its
    grid mapped by `matrix` (offsets from the patch centre, voxel `p // 2` on each axis, as
    `extract_patch` centres it). One set serves the label and every image channel."""
    shape = np.asarray(patch_shape)
    offsets = np.indices(tuple(int(p) for p in shape), dtype=np.float64).reshape(3, -1) - (shape // 2)[:, None]
    return np.asarray(matrix, dtype=np.float64) @ offsets + np.asarray(center, dtype=np.float64)[:, None]


def read_at(volume: np.ndarray, coordinates: np.ndarray, patch_shape: Sequence[int], order: int) -> np.ndarray:
    """`volume` (X, Y, Z) at `coordinates` (`patch_coordinates`), as a `patch_shape` patch:
    spline `order` 1 for images, 0 for labels; 0 outside the volume."""
    from scipy.ndimage import map_coordinates

    values = map_coordinates(volume, coordinates, order=order, mode="constant", cval=0.0, prefilter=False)
    return values.reshape(tuple(int(p) for p in patch_shape))


def transformed_patch(volume: np.ndarray, center: Sequence[int], patch_shape: Sequence[int], matrix: np.ndarray,
                      order: int) -> np.ndarray:
    """The `patch_shape` patch of `volume` (X, Y, Z) about `center`, its grid mapped by `matrix`;
    spline `order` 1 for images, 0 for labels; 0 outside the volume."""
    return read_at(volume, patch_coordinates(center, patch_shape, matrix), patch_shape, order)
