"""`largest_component`: the region kept, by connectivity, on masks small enough to count by hand."""

import numpy as np
import pytest

from medseg.imaging.components import largest_component


def _mask(*voxels, shape=(5, 5, 5)):
    mask = np.zeros(shape, np.uint8)
    for voxel in voxels:
        mask[voxel] = 1
    return mask


# Three voxels on a diagonal line, touching only by corners, and a face-connected pair.
CORNERS = [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
PAIR = [(4, 4, 0), (4, 4, 1)]


def test_full_connectivity_joins_voxels_that_touch_by_a_corner():
    kept = largest_component(_mask(*CORNERS, *PAIR), connectivity=3)
    assert kept.dtype == bool
    assert sorted(map(tuple, np.argwhere(kept))) == CORNERS  # 3 voxels beat 2


def test_face_connectivity_splits_them_and_keeps_the_pair():
    kept = largest_component(_mask(*CORNERS, *PAIR), connectivity=1)
    assert sorted(map(tuple, np.argwhere(kept))) == PAIR  # 2 voxels beat three singles


def test_edge_connectivity_joins_voxels_that_share_an_edge():
    # (0,0,0)-(1,1,0) share an edge; (2,2,2) alone; with faces only all three are single.
    mask = _mask((0, 0, 0), (1, 1, 0), (2, 2, 2))
    assert sorted(map(tuple, np.argwhere(largest_component(mask, connectivity=2)))) == [(0, 0, 0), (1, 1, 0)]
    assert sorted(map(tuple, np.argwhere(largest_component(mask, connectivity=1)))) == [(0, 0, 0)]  # tie: first


def test_a_tie_keeps_the_first_region_in_scan_order():
    mask = _mask((2, 0, 0), (2, 0, 1), (0, 2, 0), (0, 2, 1))
    assert sorted(map(tuple, np.argwhere(largest_component(mask)))) == [(0, 2, 0), (0, 2, 1)]


def test_an_empty_mask_stays_empty_and_one_region_is_kept_whole():
    assert not largest_component(np.zeros((2, 3, 4), np.uint8)).any()
    assert largest_component(np.zeros((2, 3, 4), np.uint8)).shape == (2, 3, 4)
    one = _mask(*PAIR)
    assert np.array_equal(largest_component(one), one.astype(bool))


def test_a_2d_mask_with_full_connectivity():
    mask = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    assert largest_component(mask).sum() == 2
    assert largest_component(mask, connectivity=1).sum() == 1


@pytest.mark.parametrize("connectivity", [0, 4])
def test_a_connectivity_outside_1_to_3_is_refused(connectivity):
    with pytest.raises(ValueError, match="connectivity must be 1, 2 or 3"):
        largest_component(np.ones((2, 2, 2)), connectivity=connectivity)
