"""Synthetic MR-like 3D phantoms with small hyperintense lesions as the foreground.

Each case is a head-like ellipsoid in dark air: a bright outer rim (scalp fat), a thin dark
band (skull), and inside it two smoothly textured tissue classes (grey matter brighter than
white matter, as on T2-FLAIR). One to four small lesions, brighter than the tissue around
them, are the foreground label. A smooth multiplicative bias field and Rician noise finish
the image.

Every physical size is defined in mm, so a case looks the same at any voxel spacing. The
spacing is anisotropic (thick axial slices) and the stored orientation varies between cases
(RAS, LAS, LPS, LSA, PSR), as it does in real datasets; after
`nibabel.as_closest_canonical` every case is an upright RAS volume with its slices along the
third axis.

The functions are pure: no file I/O, and the same `(seed, index)` gives the same case bit
for bit.
"""

from __future__ import annotations

import numpy as np
from nibabel import orientations
from scipy import ndimage

from medseg.errors import ConfigurationError
from medseg.imaging.components import largest_component

__all__ = ["GENERATOR_VERSION", "synthesize_case"]

# Bump when the phantoms change for the same parameters, so that saved datasets are regenerated.
GENERATOR_VERSION = 1

# Stored orientations drawn per case. LSA and PSR put the slice (S) axis second in the array.
_ORIENTATIONS: tuple[tuple[str, str, str], ...] = (
    ("R", "A", "S"),
    ("L", "A", "S"),
    ("L", "P", "S"),
    ("L", "S", "A"),
    ("P", "S", "R"),
)
_LESION_RADIUS_MM = (3.0, 9.0)
# Upper radius allowed once the usual range has failed, e.g. for a single large-FOV lesion.
_LESION_RADIUS_FALLBACK_MM = 15.0
# Fraction of all voxels that are foreground, enforced on every case.
_FOREGROUND_FRACTION = (0.003, 0.03)
# Narrower target used when drawing lesion sizes, so that the voxelized (perturbed,
# partial-volume) lesions land inside `_FOREGROUND_FRACTION`.
_TARGET_FRACTION = (0.004, 0.025)
# A lesion boundary is moved by up to this fraction of its radius by smooth noise.
_LESION_PERTURBATION = 0.15
_MAX_LESION_ATTEMPTS = 200
_MAX_PLACEMENT_TRIES = 60


def synthesize_case(
    index: int,
    seed: int,
    in_plane_size: int = 96,
    n_slices_range: tuple[int, int] = (24, 40),
    in_plane_spacing_range: tuple[float, float] = (0.8, 1.2),
    slice_spacing_range: tuple[float, float] = (1.5, 3.0),
    n_lesions_range: tuple[int, int] = (1, 4),
    n_classes: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make one synthetic MR-like case: an image, its lesion label and its affine.

    The case is fully determined by `(seed, index)` through
    `np.random.default_rng([seed, index])`: the same inputs give the same arrays bit for bit,
    and different indices are independent streams.

    Args:
        index: Case number within the dataset (>= 0).
        seed: Dataset seed (`data.seed`, >= 0).
        in_plane_size: Number of voxels along each in-plane axis (>= 32). The head fills
            60-85% of the in-plane field of view; scalp and skull thickness scale with it,
            lesion sizes do not (they are in mm).
        n_slices_range: Inclusive range of the number of axial slices, drawn per case.
        in_plane_spacing_range: Range of the in-plane voxel spacing in mm (same for both
            in-plane axes), drawn per case.
        slice_spacing_range: Range of the slice spacing in mm, drawn per case. The defaults
            make every case anisotropic (slices thicker than the in-plane spacing).
        n_lesions_range: Inclusive range of the number of lesions. Lesions are ellipsoids
            with radii of 3-9 mm, randomly rotated, with a slightly irregular boundary,
            never touching each other; each one is a single connected component. Radii
            are capped by what fits in a small head, and may reach 15 mm only when the
            allowed count is too low to cover 0.3% of a large field of view otherwise.
        n_classes: Foreground classes (1-3). With 1, every lesion voxel is 1. With K > 1,
            each lesion is K nested shells by depth inside it, in mm: the rim is class 1
            and the core class K, each shell brighter than the one around it (+12% of the
            lesion's contrast per shell), so that the classes differ in size and look.
            The same `(seed, index)` gives the same geometry whatever `n_classes`.

    Returns:
        `(image, label, affine)`:
        - `image`: float32 array in stored voxel order, MR-like arbitrary units (air ~30,
          tissue ~400-650, scalp fat and lesions ~600-1100). Shape is
          `(in_plane_size, in_plane_size, n_slices)` permuted to the stored orientation.
        - `label`: uint8 array of the same shape with values in {0, 1} (0..K with
          `n_classes` K); non-zero marks lesions, which cover 0.3-3% of all voxels.
        - `affine`: float64 (4, 4) voxel-to-world (mm) matrix whose
          `nibabel.aff2axcodes` is one of RAS, LAS, LPS, LSA, PSR, with the drawn spacings
          and the volume centred within 10 mm of the world origin.

    Raises:
        ConfigurationError: A size or range argument is unusable (for example a field of
            view too small to hold a lesion, or a range whose minimum exceeds its maximum).
            Sizes from 32x32x12 to 128x128x40 voxels work with the default spacings.
    """
    _check_arguments(
        index, seed, in_plane_size, n_slices_range, in_plane_spacing_range,
        slice_spacing_range, n_lesions_range,
    )
    rng = np.random.default_rng([seed, index])
    n_slices = int(rng.integers(n_slices_range[0], n_slices_range[1], endpoint=True))
    in_plane_spacing = float(rng.uniform(*in_plane_spacing_range))
    slice_spacing = float(rng.uniform(*slice_spacing_range))
    shape = (in_plane_size, in_plane_size, n_slices)
    spacing = (in_plane_spacing, in_plane_spacing, slice_spacing)

    if n_classes not in (1, 2, 3):
        raise ConfigurationError(f"data.synthetic.n_classes={n_classes}: use 1, 2 or 3 foreground classes.")
    image, label = _synthesize_ras_volume(rng, shape, spacing, n_lesions_range, n_classes)
    axcodes = _ORIENTATIONS[int(rng.integers(len(_ORIENTATIONS)))]
    offset_mm = rng.uniform(-10.0, 10.0, size=3)
    return _reorient_from_ras(image, label, _centred_ras_affine(shape, spacing, offset_mm), axcodes)


def _check_arguments(
    index: int,
    seed: int,
    in_plane_size: int,
    n_slices_range: tuple[int, int],
    in_plane_spacing_range: tuple[float, float],
    slice_spacing_range: tuple[float, float],
    n_lesions_range: tuple[int, int],
) -> None:
    """Raise `ConfigurationError` on arguments no phantom can be made from."""
    if index < 0 or seed < 0:
        raise ConfigurationError(
            f"synthesize_case: index ({index}) and seed ({seed}) must be >= 0; "
            "set data.seed to a non-negative integer."
        )
    if in_plane_size < 32:
        raise ConfigurationError(
            f"synthesize_case: in_plane_size={in_plane_size} voxels is too small to hold a "
            "head and its lesions; use 32 or more."
        )
    ranges = {
        "n_slices_range": (n_slices_range, 8),
        "in_plane_spacing_range": (in_plane_spacing_range, 1e-3),
        "slice_spacing_range": (slice_spacing_range, 1e-3),
        "n_lesions_range": (n_lesions_range, 1),
    }
    for name, ((low, high), minimum) in ranges.items():
        if not minimum <= low <= high:
            raise ConfigurationError(
                f"synthesize_case: {name}=({low}, {high}) is not a valid range; give "
                f"(min, max) with {minimum} <= min <= max."
            )


def _synthesize_ras_volume(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    n_lesions_range: tuple[int, int],
    n_classes: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the phantom in RAS voxel order.

    Args:
        rng: The case's random generator.
        shape: Volume shape (X, Y, Z) in voxels.
        spacing: Voxel spacing (x, y, z) in mm.
        n_lesions_range: Inclusive range of the number of lesions.
        n_classes: Foreground classes: nested shells of each lesion (see `synthesize_case`).

    Returns:
        `(image, label)`: float32 image and uint8 label, both of shape `shape`.
    """
    coords = _centred_coordinates_mm(shape, spacing)
    coarse = _smooth_noise(rng, shape, spacing, sigma_mm=3.5)
    fine = _smooth_noise(rng, shape, spacing, sigma_mm=1.5)
    lesion_field = _smooth_noise(rng, shape, spacing, sigma_mm=2.0)

    body, depth_mm = _head_geometry(rng, coords, spacing, coarse)
    # Scalp and skull scale with the head (about 3-5 mm and 2-4 mm at the default size).
    head_depth_mm = float(depth_mm.max())
    rim_mm = head_depth_mm * float(rng.uniform(0.09, 0.13))
    skull_mm = head_depth_mm * float(rng.uniform(0.07, 0.11))
    image, tissue_mean = _tissue_intensities(rng, body, depth_mm, coarse, fine, rim_mm, skull_mm)

    label = np.zeros(shape, dtype=np.uint8)
    lesions = _draw_lesions(rng, depth_mm, spacing, rim_mm + skull_mm, lesion_field, n_lesions_range)
    brain = depth_mm >= rim_mm + skull_mm
    for box, soft_mask, mask in lesions:
        _paint_lesion(rng, image, box, soft_mask, brain, lesion_field)
        if n_classes == 1:
            label[box] |= mask.astype(np.uint8)
        else:
            shells = lesion_shells(mask, spacing, n_classes)
            image[box] *= np.float32(1.0) + np.float32(0.12) * (shells.astype(np.float32) - 1) * (shells > 0)
            label[box] = np.maximum(label[box], shells)

    image *= _bias_field(rng, coords)
    snr = float(rng.uniform(15.0, 25.0))
    return _add_rician_noise(rng, image, sigma=tissue_mean / snr), label


def lesion_shells(mask: np.ndarray, spacing: tuple[float, float, float], n_classes: int) -> np.ndarray:
    """Split a lesion mask into `n_classes` nested shells by depth (mm from its surface).

    Args:
        mask: bool (X, Y, Z) lesion mask (its bounding box).
        spacing: voxel spacing in mm.
        n_classes: shells; the outermost is 1, the innermost `n_classes`.

    Returns:
        uint8 (X, Y, Z): 0 outside the lesion, 1..n_classes inside. Depth is divided into
        equal parts of the lesion's largest depth, and the surface voxels are always 1, so
        an inner class never touches the background.
    """
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    deepest = float(depth.max())
    if deepest == 0.0:
        return mask.astype(np.uint8)
    shells = np.minimum(1 + np.floor(depth / deepest * n_classes * (1 - 1e-6)).astype(np.int64), n_classes)
    # Thick slices make depth in mm coarse along z: keep the surface layer in the rim, so that
    # an inner class never touches the background.
    shells[mask & ~ndimage.binary_erosion(mask)] = 1
    return np.where(mask, shells, 0).astype(np.uint8)


def _centred_coordinates_mm(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World coordinates (mm) of voxel centres, relative to the volume centre.

    Returns:
        Three float32 arrays shaped for broadcasting: (X, 1, 1), (1, Y, 1), (1, 1, Z).
    """
    axes = []
    for axis, (n, step) in enumerate(zip(shape, spacing)):
        values = ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(step))
        view_shape = [1, 1, 1]
        view_shape[axis] = n
        axes.append(values.reshape(view_shape))
    return axes[0], axes[1], axes[2]


def _smooth_noise(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    sigma_mm: float,
) -> np.ndarray:
    """Low-pass filtered Gaussian noise with zero mean and unit standard deviation.

    Args:
        rng: Random generator.
        shape: Output shape (X, Y, Z) in voxels.
        spacing: Voxel spacing in mm; the smoothing is isotropic in mm.
        sigma_mm: Gaussian smoothing width in mm (the correlation length of the texture).

    Returns:
        float32 array of shape `shape`.
    """
    noise = rng.standard_normal(shape, dtype=np.float32)
    sigma_voxels = [sigma_mm / step for step in spacing]
    field = ndimage.gaussian_filter(noise, sigma_voxels, truncate=3.0, mode="reflect")
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def _head_geometry(
    rng: np.random.Generator,
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    spacing: tuple[float, float, float],
    coarse: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the head ellipsoid, with a gently irregular outline.

    Args:
        rng: Random generator.
        coords: Centred voxel coordinates in mm, from `_centred_coordinates_mm`.
        spacing: Voxel spacing in mm.
        coarse: Smooth unit noise (X, Y, Z) that perturbs the outline.

    Returns:
        `(body, depth_mm)`: bool mask of the head (X, Y, Z), and the float32 distance (mm)
        from each head voxel to the nearest air voxel (0 in air). The first and last slices
        may cut through the head; the slab ends do not count as air.
    """
    x, y, z = coords
    half_fov = float(min(-x[0, 0, 0], -y[0, 0, 0]))
    half_height = float(-z[0, 0, 0])
    semi_lr = float(rng.uniform(0.60, 0.78)) * half_fov
    semi_ap = min(semi_lr * float(rng.uniform(1.0, 1.15)), 0.85 * half_fov)
    # The head is often taller than the slab, so the first and last slices cut through it.
    semi_si = float(rng.uniform(0.9, 1.4)) * max(half_height, 0.8 * semi_lr)
    centre_ap = float(rng.uniform(-0.05, 0.05)) * half_fov

    radius = (
        (x / np.float32(semi_lr)) ** 2
        + ((y - np.float32(centre_ap)) / np.float32(semi_ap)) ** 2
        + (z / np.float32(semi_si)) ** 2
    )
    np.sqrt(radius, out=radius)
    radius += np.float32(0.012) * coarse
    body = radius < 1.0
    depth_mm = ndimage.distance_transform_edt(body, sampling=spacing).astype(np.float32)
    return body, depth_mm


def _tissue_intensities(
    rng: np.random.Generator,
    body: np.ndarray,
    depth_mm: np.ndarray,
    coarse: np.ndarray,
    fine: np.ndarray,
    rim_mm: float,
    skull_mm: float,
) -> tuple[np.ndarray, float]:
    """Noise-free head intensities: scalp fat, skull, grey and white matter, air.

    Grey matter lies mostly near the outline (cortex) and in smooth islands inside; both
    classes carry a mild fine texture. Class borders are soft (partial volume).

    Args:
        rng: Random generator.
        body, depth_mm: From `_head_geometry`.
        coarse: Smooth unit noise (correlation ~3.5 mm) that shapes the grey-matter islands.
        fine: Smooth unit noise (correlation ~1.5 mm) for the tissue texture.
        rim_mm: Thickness of the bright outer rim in mm.
        skull_mm: Thickness of the dark band under the rim in mm.

    Returns:
        `(image, tissue_mean)`: float32 image (X, Y, Z) with air at 0, and the mean
        intensity of the brain tissue (used to set the noise level).
    """
    white = float(rng.uniform(380.0, 460.0))
    grey = white * float(rng.uniform(1.2, 1.35))
    fat = grey * float(rng.uniform(1.35, 1.6))
    skull = float(rng.uniform(40.0, 90.0))

    inner_edge = rim_mm + skull_mm
    # A cortical band ~4 mm deep under the skull, plus smooth islands deeper in.
    cortex = np.float32(3.0) * np.exp((np.float32(inner_edge) - depth_mm) / np.float32(4.0))
    grey_weight = _sigmoid((coarse - np.float32(0.4) + cortex) / np.float32(0.3))
    image = np.float32(white) + np.float32(grey - white) * grey_weight
    image *= np.float32(1.0) + np.float32(0.04) * fine

    brain_weight = _sigmoid((depth_mm - np.float32(inner_edge)) / np.float32(0.4))
    rim_weight = _sigmoid((np.float32(rim_mm) - depth_mm) / np.float32(0.4))
    tissue_mean = float(image[depth_mm > inner_edge].mean())
    image *= brain_weight
    image += np.float32(skull) * (np.float32(1.0) - brain_weight)
    image += np.float32(fat - skull) * rim_weight * (np.float32(1.0) + np.float32(0.05) * fine)
    image *= body
    return image, tissue_mean


def _sigmoid(values: np.ndarray) -> np.ndarray:
    """Logistic function, float32 in and out."""
    return np.float32(0.5) * (np.tanh(np.float32(0.5) * values) + np.float32(1.0))


def _draw_lesions(
    rng: np.random.Generator,
    depth_mm: np.ndarray,
    spacing: tuple[float, float, float],
    brain_depth_mm: float,
    lesion_field: np.ndarray,
    n_lesions_range: tuple[int, int],
) -> list[tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]]:
    """Draw, place and voxelize the lesions so that they cover 0.3-3% of all voxels.

    Lesion count and radii are drawn, rescaled towards a random target fraction when their
    ellipsoid volume is out of range, placed inside the brain (away from the skull, the
    slab ends and each other), voxelized, and the whole draw is repeated until the voxel
    count is within `_FOREGROUND_FRACTION`. Radii are 3-9 mm; only when half the attempts
    have failed (a non-default `n_lesions_range` such as (1, 1) in a large field of view)
    may they grow up to 15 mm. Radii never exceed what fits in the brain and the slab.

    Args:
        rng: Random generator.
        depth_mm: Distance (mm) of each voxel from the head outline, (X, Y, Z).
        spacing: Voxel spacing in mm.
        brain_depth_mm: Depth (mm) at which the brain tissue starts.
        lesion_field: Smooth unit noise (X, Y, Z) that makes the boundaries irregular.
        n_lesions_range: Inclusive range of the number of lesions.

    Returns:
        One `(box, soft_mask, mask)` per lesion: the slices of its bounding box, a float32
        partial-volume weight in [0, 1] and the bool label inside the box.

    Raises:
        ConfigurationError: No draw fits, because the field of view is too small or too
            large for 1-4 lesions of 3-9 mm to cover 0.3-3% of it.
    """
    total_voxels = depth_mm.size
    total_volume_mm3 = total_voxels * float(np.prod(spacing))
    margin_mm = brain_depth_mm + 1.0
    slab_mm = (depth_mm.shape[2] - 1) * spacing[2]
    # The largest lesion that fits inside the brain and within the slab, in mm.
    max_radius_mm = min(float(depth_mm.max()) - margin_mm, slab_mm / 2.0 - 1.0) / (1 + _LESION_PERTURBATION)
    if max_radius_mm < _LESION_RADIUS_MM[0]:
        raise ConfigurationError(
            f"synthesize_case: a field of view of {depth_mm.shape} voxels at {spacing} mm "
            "is too small to hold a 3 mm lesion; increase in_plane_size or n_slices_range."
        )
    candidates = np.flatnonzero(depth_mm >= margin_mm + _LESION_RADIUS_MM[0] * (1 + _LESION_PERTURBATION))
    for attempt in range(_MAX_LESION_ATTEMPTS):
        # Lesions larger than usual only when too few are allowed to cover 0.3% otherwise.
        upper_mm = _LESION_RADIUS_MM[1] if attempt < _MAX_LESION_ATTEMPTS // 2 else _LESION_RADIUS_FALLBACK_MM
        radius_range = (_LESION_RADIUS_MM[0], min(upper_mm, max_radius_mm))
        radii = _draw_lesion_radii(rng, n_lesions_range, radius_range, total_volume_mm3)
        if radii is None:
            continue
        centres = _place_lesions(rng, radii, candidates, depth_mm, spacing, margin_mm)
        if centres is None:
            continue
        lesions = [
            _voxelize_lesion(rng, centre, radius, spacing, lesion_field)
            for centre, radius in zip(centres, radii)
        ]
        fraction = sum(int(mask.sum()) for _, _, mask in lesions) / total_voxels
        if _FOREGROUND_FRACTION[0] <= fraction <= _FOREGROUND_FRACTION[1]:
            return lesions
    raise ConfigurationError(
        f"synthesize_case: could not fit {n_lesions_range} lesions of 3-9 mm covering "
        f"0.3-3% of a {depth_mm.shape} volume at {spacing} mm; use sizes closer to the "
        "defaults (in_plane_size 48-128, n_slices_range (24, 40))."
    )


def _draw_lesion_radii(
    rng: np.random.Generator,
    n_lesions_range: tuple[int, int],
    radius_range: tuple[float, float],
    total_volume_mm3: float,
) -> np.ndarray | None:
    """Draw lesion count and radii whose ellipsoid volume fits `_TARGET_FRACTION`.

    Radii are drawn uniformly in `radius_range`; a draw out of the target fraction is
    scaled towards a random target within it once, then kept or rejected.

    Args:
        rng: Random generator.
        n_lesions_range: Inclusive range of the number of lesions.
        radius_range: (min, max) semi-axis in mm.
        total_volume_mm3: Volume of the whole field of view in mm^3.

    Returns:
        float (n, 3) radii in mm, largest lesion first, or None when this draw cannot fit.
    """
    n_lesions = int(rng.integers(n_lesions_range[0], n_lesions_range[1], endpoint=True))
    radii = rng.uniform(*radius_range, size=(n_lesions, 3))
    fraction = _ellipsoid_volume(radii) / total_volume_mm3
    if not _TARGET_FRACTION[0] <= fraction <= _TARGET_FRACTION[1]:
        target = float(np.exp(rng.uniform(*np.log(_TARGET_FRACTION))))
        radii = np.clip(radii * (target / fraction) ** (1.0 / 3.0), *radius_range)
        fraction = _ellipsoid_volume(radii) / total_volume_mm3
        if not _TARGET_FRACTION[0] <= fraction <= _TARGET_FRACTION[1]:
            return None
    return radii[np.argsort(-radii.max(axis=1), kind="stable")]


def _ellipsoid_volume(radii: np.ndarray) -> float:
    """Total volume (mm^3) of ellipsoids with semi-axes `radii` (n, 3) in mm."""
    return float(4.0 / 3.0 * np.pi * np.prod(radii, axis=1).sum())


def _place_lesions(
    rng: np.random.Generator,
    radii: np.ndarray,
    candidates: np.ndarray,
    depth_mm: np.ndarray,
    spacing: tuple[float, float, float],
    margin_mm: float,
) -> list[np.ndarray] | None:
    """Pick lesion centres inside the brain, clear of the skull, the slab ends and each other.

    Args:
        rng: Random generator.
        radii: (n, 3) lesion radii in mm.
        candidates: Flat indices of voxels deep enough to hold the smallest lesion.
        depth_mm: Distance (mm) from the head outline, (X, Y, Z).
        spacing: Voxel spacing in mm.
        margin_mm: Minimum distance (mm) between a lesion's edge and the head outline.

    Returns:
        One (3,) centre in voxel indices per lesion, or None when a lesion found no place.
    """
    steps = np.asarray(spacing)
    slab_mm = (depth_mm.shape[2] - 1) * spacing[2]
    # Lesion voxels at least one voxel step apart never touch, so each lesion stays its
    # own connected component.
    gap_mm = max(spacing) + 0.5
    centres: list[np.ndarray] = []
    extents: list[float] = []
    for radius in radii:
        extent = float(radius.max()) * (1 + _LESION_PERTURBATION)
        for _ in range(_MAX_PLACEMENT_TRIES):
            centre = np.array(np.unravel_index(rng.choice(candidates), depth_mm.shape))
            z_mm = centre[2] * spacing[2]
            too_shallow = depth_mm[tuple(centre)] < margin_mm + extent
            if too_shallow or not extent + 1.0 <= z_mm <= slab_mm - extent - 1.0:
                continue
            if all(
                np.linalg.norm((centre - other) * steps) > extent + other_extent + gap_mm
                for other, other_extent in zip(centres, extents)
            ):
                centres.append(centre)
                extents.append(extent)
                break
        else:
            return None
    return centres


def _voxelize_lesion(
    rng: np.random.Generator,
    centre: np.ndarray,
    radius: np.ndarray,
    spacing: tuple[float, float, float],
    lesion_field: np.ndarray,
) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]:
    """Voxelize one randomly rotated ellipsoidal lesion with a noisy boundary.

    Args:
        rng: Random generator (draws the rotation).
        centre: (3,) centre in voxel indices.
        radius: (3,) semi-axes in mm.
        spacing: Voxel spacing in mm.
        lesion_field: Smooth unit noise (X, Y, Z) that moves the boundary by up to
            `_LESION_PERTURBATION` of the radius.

    Returns:
        `(box, soft_mask, mask)`: bounding-box slices, float32 partial-volume weight in
        [0, 1] (0.5 on the boundary), and the bool mask, one connected component.
    """
    extent_mm = float(radius.max()) * (1 + _LESION_PERTURBATION) + max(spacing)
    box = tuple(
        slice(max(int(c - np.ceil(extent_mm / s)), 0), min(int(c + np.ceil(extent_mm / s)) + 1, n))
        for c, s, n in zip(centre, spacing, lesion_field.shape)
    )
    offsets = [
        ((np.arange(b.start, b.stop, dtype=np.float32) - np.float32(c)) * np.float32(s)).reshape(
            [-1 if axis == k else 1 for k in range(3)]
        )
        for axis, (b, c, s) in enumerate(zip(box, centre, spacing))
    ]
    rotation = _random_rotation(rng).astype(np.float32)
    normalized = sum(
        (sum(rotation[row, col] * offsets[col] for col in range(3)) / np.float32(radius[row])) ** 2
        for row in range(3)
    )
    implicit = np.sqrt(normalized) + np.float32(_LESION_PERTURBATION) * np.clip(lesion_field[box], -1, 1)
    mask = largest_component(implicit < 1.0, connectivity=1)
    edge_width = np.float32(min(spacing) / float(radius.mean()))
    soft_mask = np.clip((np.float32(1.0) - implicit) / edge_width + np.float32(0.5), 0.0, 1.0)
    soft_mask[~mask & (soft_mask > 0.5)] = 0.0
    return box, soft_mask.astype(np.float32), mask


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _paint_lesion(
    rng: np.random.Generator,
    image: np.ndarray,
    box: tuple[slice, slice, slice],
    soft_mask: np.ndarray,
    brain: np.ndarray,
    lesion_field: np.ndarray,
) -> None:
    """Blend a hyperintense lesion into `image` in place.

    The lesion is 45-80% brighter than the mean brain tissue around it in its bounding box,
    with its own mild texture (from `lesion_field`, +-8%).

    Args:
        rng: Random generator (draws the contrast).
        image: Noise-free float32 image (X, Y, Z), modified in place.
        box: Lesion bounding box.
        soft_mask: float32 partial-volume weight in [0, 1], shaped like `image[box]`.
        brain: bool mask (X, Y, Z) of brain tissue.
        lesion_field: Smooth unit noise (X, Y, Z).
    """
    region = image[box]
    surrounding = brain[box] & (soft_mask == 0.0)
    local_mean = float(region[surrounding].mean()) if surrounding.any() else float(region.mean())
    contrast = np.float32(rng.uniform(1.45, 1.8))
    lesion = np.float32(local_mean) * contrast * (np.float32(1.0) + np.float32(0.08) * lesion_field[box])
    region += soft_mask * (lesion - region)


def _bias_field(
    rng: np.random.Generator, coords: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> np.ndarray:
    """A smooth multiplicative bias field: 1 plus a random quadratic polynomial in mm.

    The polynomial is scaled so that the field spans 1 +- (10-20%) over the volume.

    Args:
        rng: Random generator.
        coords: Centred voxel coordinates in mm, from `_centred_coordinates_mm`.

    Returns:
        float32 array (X, Y, Z).
    """
    scale = np.float32(max(float(-c.min()) for c in coords))
    x, y, z = (c / scale for c in coords)
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    weights = rng.standard_normal(len(terms)).astype(np.float32)
    field = sum(w * t for w, t in zip(weights, terms))
    field = field - np.float32(0.5) * (field.max() + field.min())
    amplitude = np.float32(rng.uniform(0.10, 0.20))
    field *= amplitude / max(float(np.abs(field).max()), 1e-6)
    return field + np.float32(1.0)


def _add_rician_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Rician noise: the magnitude of the image plus complex Gaussian noise.

    Args:
        rng: Random generator.
        image: Noise-free float32 magnitude image (X, Y, Z), >= 0.
        sigma: Standard deviation of each of the real and imaginary noise parts, in the
            image's units. Air (0) becomes Rayleigh noise with mean ~1.25 sigma.

    Returns:
        float32 image of the same shape.
    """
    real = rng.standard_normal(image.shape, dtype=np.float32)
    real *= np.float32(sigma)
    real += image
    imaginary = rng.standard_normal(image.shape, dtype=np.float32)
    imaginary *= np.float32(sigma)
    return np.hypot(real, imaginary)


def _centred_ras_affine(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], offset_mm: np.ndarray
) -> np.ndarray:
    """RAS voxel-to-world affine with the volume centre at `offset_mm` (mm).

    Returns:
        float64 (4, 4) affine.
    """
    affine = np.diag([*spacing, 1.0])
    centre_voxel = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = np.asarray(offset_mm, dtype=np.float64) - centre_voxel * np.asarray(spacing)
    return affine


def _reorient_from_ras(
    image: np.ndarray, label: np.ndarray, ras_affine: np.ndarray, axcodes: tuple[str, str, str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Store a RAS-ordered case in another orientation, keeping its world geometry.

    Args:
        image: float32 (X, Y, Z) in RAS voxel order.
        label: uint8 (X, Y, Z) in RAS voxel order.
        ras_affine: float64 (4, 4) affine of the RAS arrays.
        axcodes: Target orientation, e.g. ("L", "P", "S").

    Returns:
        `(image, label, affine)` as contiguous arrays in the target voxel order, and the
        affine whose `nibabel.aff2axcodes` is `axcodes`.
    """
    transform = orientations.ornt_transform(
        orientations.axcodes2ornt(("R", "A", "S")), orientations.axcodes2ornt(axcodes)
    )
    affine = ras_affine @ orientations.inv_ornt_aff(transform, image.shape)
    image = np.ascontiguousarray(orientations.apply_orientation(image, transform), dtype=np.float32)
    label = np.ascontiguousarray(orientations.apply_orientation(label, transform), dtype=np.uint8)
    return image, label, affine
