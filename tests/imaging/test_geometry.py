import nibabel as nib
import numpy as np
import pytest

from medseg.evaluation import dice_score
from medseg.imaging.geometry import (
    CaseGeometry,
    nonzero_bounding_box,
    plan_case_geometry,
    resample_to_shape,
    restore_original_geometry,
    shape_for_spacing,
    to_canonical,
    to_training_grid,
)
from medseg.imaging.io import Volume
from medseg.synthetic.shapes import synthesize_case


def _affine(codes, spacing, origin=(10.0, -20.0, 5.0)):
    """An affine whose axis codes are `codes` (e.g. 'LSA') and voxel sizes `spacing`."""
    ornt = nib.orientations.axcodes2ornt(tuple(codes))
    affine = np.zeros((4, 4))
    for axis, (world, flip) in enumerate(ornt):
        affine[int(world), axis] = flip * spacing[axis]
    affine[:3, 3] = origin
    affine[3, 3] = 1
    return affine


@pytest.mark.parametrize("codes", ["RAS", "LAS", "LSA", "PSR", "LPI"])
def test_to_canonical_matches_nibabel(codes):
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    affine = _affine(codes, (0.9, 2.0, 1.3))
    ours = to_canonical(Volume(data, affine))
    theirs = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    np.testing.assert_array_equal(ours.data, np.asanyarray(theirs.dataobj))
    np.testing.assert_allclose(ours.affine, theirs.affine)
    assert nib.aff2axcodes(ours.affine) == ("R", "A", "S")
    assert ours.data.dtype == np.float32


def test_resample_keeps_field_of_view_and_world_position():
    canonical = Volume(np.zeros((10, 10, 6), np.float32), np.diag([1.0, 1.0, 3.0, 1.0]))
    geometry = plan_case_geometry((10, 10, 6), canonical.affine, (2.0, 2.0, 1.5))
    assert geometry.preprocessed_shape == (5, 5, 12)
    grid = to_training_grid(canonical, geometry, order=1)
    # The first voxel's edge stays at the original first voxel's edge: world x = -0.5 mm.
    corner = grid.affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    np.testing.assert_allclose(corner[:3], [-0.5, -0.5, -1.5])
    assert grid.spacing == pytest.approx((2.0, 2.0, 1.5))


def test_resample_to_shape_exact_and_dtype():
    label = (np.random.default_rng(1).random((7, 9, 5)) > 0.5).astype(np.uint8)
    out = resample_to_shape(label, (13, 4, 11), order=0)
    assert out.shape == (13, 4, 11) and out.dtype == np.uint8
    assert resample_to_shape(label, label.shape, order=0) is label


@pytest.mark.parametrize("factor", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("index", range(6))
def test_label_round_trip_restores_shape_affine_and_mask(index, factor):
    """Preprocessing and back keeps shape and affine exactly and the mask at Dice >= 0.98.

    The training grid is as fine as the case or finer (factor <= 1): a coarser grid loses
    lesions a few voxels wide, which no inverse can bring back.
    """
    image, label, affine = synthesize_case(index, seed=3, in_plane_size=64, n_slices_range=(16, 28))
    canonical = to_canonical(Volume(label, affine))
    target = tuple(s * factor for s in canonical.spacing)
    geometry = plan_case_geometry(label.shape, affine, target_spacing=target)
    on_grid = to_training_grid(canonical, geometry, order=0)
    assert on_grid.data.shape == geometry.preprocessed_shape
    back = restore_original_geometry(on_grid.data, geometry, order=0)
    assert back.shape == label.shape and back.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(geometry.original_affine), affine)
    assert dice_score(label, back) >= 0.98


def test_round_trip_with_crop():
    data = np.zeros((20, 18, 10), np.float32)
    data[4:15, 3:12, 2:8] = 1.0
    affine = _affine("LSA", (1.0, 2.0, 0.8))
    canonical = to_canonical(Volume(data, affine))
    box = nonzero_bounding_box(canonical.data, margin=1)
    geometry = plan_case_geometry(data.shape, affine, (1.0, 1.0, 1.0), crop_box=box)
    assert geometry.cropped_shape != geometry.canonical_shape
    grid = to_training_grid(canonical, geometry, order=0)
    back = restore_original_geometry(grid.data, geometry, order=0)
    np.testing.assert_array_equal(back, data)


def test_geometry_serialises():
    geometry = plan_case_geometry((4, 5, 6), _affine("LAS", (1, 1, 2)), (1.0, 1.0, 1.0))
    assert CaseGeometry.from_dict(geometry.to_dict()) == geometry


def test_shape_for_spacing_never_zero():
    assert shape_for_spacing((3, 100, 1), (1.0, 1.0, 1.0), (10.0, 0.5, 5.0)) == (1, 200, 1)


def test_bounding_box_of_empty_volume_is_whole_volume():
    assert nonzero_bounding_box(np.zeros((3, 4, 5))) == ((0, 0, 0), (3, 4, 5))


def _two_class_label(shape=(48, 40, 24)):
    """A structure of two classes: an ellipsoid (class 2, its core) inside a larger one (1)."""
    x, y, z = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    radius = (x / 14) ** 2 + (y / 11) ** 2 + (z / 7) ** 2
    label = np.zeros(shape, dtype=np.uint8)
    label[radius <= 1] = 1
    label[radius <= 0.3] = 2
    return label


@pytest.mark.parametrize("factor", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("codes", ["RAS", "LPS", "PSR"])
def test_two_class_label_round_trip_keeps_each_class(codes, factor):
    """One-hot linear resampling there and back keeps each class at Dice >= 0.98 when the
    training grid is as fine as the case or finer."""
    from medseg.imaging.geometry import label_to_training_grid, restore_label_map

    label = _two_class_label()
    affine = _affine(codes, (0.9, 1.1, 2.5))
    canonical = to_canonical(Volume(label, affine))
    geometry = plan_case_geometry(label.shape, affine, target_spacing=tuple(s * factor for s in canonical.spacing))
    on_grid = label_to_training_grid(canonical, geometry)
    assert on_grid.data.shape == geometry.preprocessed_shape and on_grid.data.dtype == np.uint8
    back = restore_label_map(on_grid.data, geometry)
    assert back.shape == label.shape and back.dtype == np.uint8
    for value in (1, 2):
        assert dice_score(label == value, back == value) >= 0.98, value


def test_label_downsampled_8_to_4_stays_on_the_linearly_resampled_image():
    """Nearest neighbour takes the second of each pair of voxels: half a voxel off."""
    from medseg.imaging.geometry import resample_label_map

    label = np.zeros((8, 6, 6), dtype=np.uint8)
    label[1:5] = 2  # a block from x = 1 to 4: its centre is at x = 3.0 (voxel edges)
    image = label.astype(np.float32) / 2
    small_image = resample_to_shape(image, (4, 3, 3), order=1)
    small_label = resample_label_map(label, (4, 3, 3))
    np.testing.assert_array_equal(small_label == 2, small_image > 0.5)
    assert set(np.unique(small_label)) == {0, 2}  # the dataset's own values
    centre = lambda mask, size: (np.nonzero(mask)[0] + 0.5).mean() * size  # noqa: E731 (in source voxels)
    assert centre(small_label[:, 0, 0] == 2, 2) == centre(label[:, 0, 0] == 2, 1) == 3.0
    nearest = resample_to_shape(label, (4, 3, 3), order=0)
    assert centre(nearest[:, 0, 0] == 2, 2) != 3.0  # what one-hot resampling fixes
