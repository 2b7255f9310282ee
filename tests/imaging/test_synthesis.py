"""Tests of the synthetic MR-like phantoms (`medseg.synthetic.shapes`)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg.errors import ConfigurationError
from medseg.synthetic.shapes import synthesize_case

N_CASES = 30
SEED = 0
IN_PLANE_SPACING_RANGE = (0.8, 1.2)
SLICE_SPACING_RANGE = (1.5, 3.0)
N_SLICES_RANGE = (24, 40)


@pytest.fixture(scope="module")
def cases() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """30 cases as stored: (image, label, affine)."""
    return [synthesize_case(index, SEED) for index in range(N_CASES)]


@pytest.fixture(scope="module")
def canonical_cases(cases) -> list[tuple[np.ndarray, np.ndarray, nib.Nifti1Image]]:
    """The same cases after `as_closest_canonical`: (image, label, canonical image)."""
    result = []
    for image, label, affine in cases:
        canonical = nib.as_closest_canonical(nib.Nifti1Image(image, affine))
        canonical_label = nib.as_closest_canonical(nib.Nifti1Image(label, affine))
        result.append((np.asanyarray(canonical.dataobj), np.asanyarray(canonical_label.dataobj), canonical))
    return result


def test_same_seed_and_index_give_identical_case():
    first = synthesize_case(3, 42)
    second = synthesize_case(3, 42)
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def test_other_seed_or_index_gives_other_case():
    image, _, _ = synthesize_case(3, 42)
    for other_image, _, _ in (synthesize_case(3, 43), synthesize_case(4, 42)):
        assert other_image.shape != image.shape or not np.array_equal(other_image, image)


def test_dtypes_shapes_and_label_values(cases):
    for image, label, affine in cases:
        assert image.dtype == np.float32
        assert label.dtype == np.uint8
        assert affine.dtype == np.float64 and affine.shape == (4, 4)
        assert image.ndim == 3 and label.shape == image.shape
        assert image.flags.c_contiguous and label.flags.c_contiguous
        assert set(np.unique(label).tolist()) <= {0, 1}
        assert sorted(image.shape)[1:] == [96, 96]


def test_image_is_finite_non_negative_and_mr_like(canonical_cases):
    for image, label, _ in canonical_cases:
        assert np.isfinite(image).all()
        assert image.min() >= 0.0  # Rician magnitude
        air = image[:8, :8, :]
        assert 0.0 < np.median(air) < 60.0  # dark, noisy, not exactly zero
        head = image > 5 * np.median(air)
        assert 300.0 < np.median(image[head & (label == 0)]) < 800.0


def test_head_fills_most_of_the_field_of_view(canonical_cases):
    for image, _, _ in canonical_cases:
        middle = image[:, :, image.shape[2] // 2]
        head = middle > 5 * np.median(image[:8, :8, :])
        columns = np.flatnonzero(head.any(axis=1))
        rows = np.flatnonzero(head.any(axis=0))
        width = (columns[-1] - columns[0] + 1) / middle.shape[0]
        height = (rows[-1] - rows[0] + 1) / middle.shape[1]
        assert 0.55 <= width <= 0.9 and 0.55 <= height <= 0.9


def test_foreground_fraction_within_range(cases):
    fractions = [label.mean() for _, label, _ in cases]
    assert min(fractions) >= 0.003
    assert max(fractions) <= 0.03


def test_one_to_four_lesions_of_plausible_size(canonical_cases):
    counts = set()
    for _, label, canonical in canonical_cases:
        components, count = ndimage.label(label)
        counts.add(count)
        assert 1 <= count <= 4
        voxel_volume = float(np.prod(canonical.header.get_zooms()))
        volumes_mm3 = np.bincount(components.ravel())[1:] * voxel_volume
        # Radii of 3-9 mm, boundary moved by up to 15%, seen through thick slices.
        assert volumes_mm3.min() >= 40.0
        assert volumes_mm3.max() <= 4.0 / 3.0 * np.pi * (9.0 * 1.15) ** 3
    assert len(counts) >= 3  # the count varies between cases


def test_lesions_are_brighter_than_surrounding_tissue(canonical_cases):
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    for image, label, _ in canonical_cases:
        lesion = label > 0
        shell = ndimage.binary_dilation(lesion, structure=in_plane, iterations=3) & ~lesion
        assert image[lesion].mean() >= 1.25 * image[shell].mean()


def test_spacings_within_ranges_and_anisotropic(canonical_cases):
    for _, _, canonical in canonical_cases:
        zoom_x, zoom_y, zoom_z = (float(z) for z in canonical.header.get_zooms())
        assert zoom_x == pytest.approx(zoom_y)
        assert IN_PLANE_SPACING_RANGE[0] <= zoom_x <= IN_PLANE_SPACING_RANGE[1]
        assert SLICE_SPACING_RANGE[0] <= zoom_z <= SLICE_SPACING_RANGE[1]
        assert zoom_z > zoom_x


def test_stored_orientation_varies(cases):
    codes = {nib.aff2axcodes(affine) for _, _, affine in cases[:20]}
    assert len(codes) >= 3
    assert codes <= {("R", "A", "S"), ("L", "A", "S"), ("L", "P", "S"), ("L", "S", "A"), ("P", "S", "R")}
    slice_axes = {int(np.argmax(np.linalg.norm(affine[:3, :3], axis=0))) for _, _, affine in cases[:20]}
    assert slice_axes != {2}  # some cases do not store slices along the third array axis


def test_canonical_case_is_upright_ras_with_slices_last(canonical_cases):
    for image, _, canonical in canonical_cases:
        affine = canonical.affine
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        assert np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3])))  # no flips, no shear
        assert int(np.argmax(canonical.header.get_zooms())) == 2
        assert image.shape[:2] == (96, 96)
        assert N_SLICES_RANGE[0] <= image.shape[2] <= N_SLICES_RANGE[1]
        centre_mm = affine @ np.append((np.asarray(image.shape) - 1) / 2.0, 1.0)
        assert np.all(np.abs(centre_mm[:3]) <= 10.0 + 1e-6)


def test_small_field_of_view_still_meets_the_contract():
    for index in range(10):
        image, label, affine = synthesize_case(index, 1, in_plane_size=32, n_slices_range=(16, 20))
        assert sorted(image.shape)[1:] == [32, 32]
        assert 0.003 <= label.mean() <= 0.03
        assert 1 <= ndimage.label(label)[1] <= 4
        assert np.isfinite(image).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_plane_size": 16},
        {"n_slices_range": (40, 24)},
        {"slice_spacing_range": (0.0, 1.0)},
        {"n_lesions_range": (0, 2)},
    ],
)
def test_unusable_arguments_raise_configuration_error(kwargs):
    with pytest.raises(ConfigurationError, match="synthesize_case"):
        synthesize_case(0, 0, **kwargs)


def test_negative_seed_raises_configuration_error():
    with pytest.raises(ConfigurationError, match="seed"):
        synthesize_case(0, -1)


def test_multi_class_phantoms_are_nested_shells_of_the_same_lesions():
    from scipy import ndimage

    from medseg.synthetic.shapes import synthesize_case

    image1, label1, affine1 = synthesize_case(3, seed=5, in_plane_size=48, n_slices_range=(16, 20))
    image2, label2, affine2 = synthesize_case(3, seed=5, in_plane_size=48, n_slices_range=(16, 20), n_classes=2)
    np.testing.assert_array_equal(affine1, affine2)
    np.testing.assert_array_equal(label2 > 0, label1 > 0)  # same lesions, split into classes
    assert set(np.unique(label2)) == {0, 1, 2} and label2.dtype == np.uint8
    rim, core = (label2 == 1), (label2 == 2)
    assert rim.sum() > 0 and core.sum() > 0 and rim.sum() != core.sum()  # different sizes
    assert not (ndimage.binary_dilation(core) & (label2 == 0)).any()  # the core never touches background
    assert image2[core].mean() > image2[rim].mean() * 1.05  # and it looks different
    np.testing.assert_array_equal(image2[label2 == 0], image1[label1 == 0])  # nothing else moved


def test_lesion_shells_by_depth():
    from medseg.synthetic.shapes import lesion_shells

    mask = np.zeros((9, 9, 9), dtype=bool)
    mask[1:8, 1:8, 1:8] = True  # a 7-voxel cube: depths 1..4 voxels
    shells = lesion_shells(mask, (1.0, 1.0, 1.0), 2)
    assert shells[0, 0, 0] == 0 and shells[1, 1, 1] == 1 and shells[4, 4, 4] == 2
    assert set(np.unique(shells)) == {0, 1, 2}
    np.testing.assert_array_equal(lesion_shells(mask, (1.0, 1.0, 1.0), 1), mask.astype(np.uint8))
