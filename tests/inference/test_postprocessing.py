"""Test-time mirroring and the largest-component filter, on hand-computed cases."""

import numpy as np
import pytest

from medseg.errors import ConfigurationError
from medseg.inference import keep_largest_component, mirror_combinations, predict_with_mirroring


def test_mirror_combinations_are_every_subset_identity_first():
    assert mirror_combinations([1, 0]) == [(), (0,), (1,), (0, 1)]
    assert mirror_combinations([]) == [()]
    assert len(mirror_combinations([0, 1, 2])) == 8
    with pytest.raises(ConfigurationError, match="0..2"):
        mirror_combinations([3])


def test_mirroring_averages_the_flipped_predictions_flipped_back():
    # A "model" that is not flip-equivariant: it returns the x index of each voxel, scaled.
    # Flipped along x and back, it gives (n - 1 - x); the mean over {(), (0,)} is (n - 1) / 2.
    image = np.zeros((4, 3, 2), dtype=np.float32)
    ramp = lambda volume: np.broadcast_to(np.arange(volume.shape[0], dtype=np.float32)[:, None, None], volume.shape)  # noqa: E731
    plain, mirrored = predict_with_mirroring(ramp, image, [0])
    np.testing.assert_array_equal(plain, ramp(image))
    np.testing.assert_allclose(mirrored, np.full(image.shape, 1.5, dtype=np.float32))
    # Along y the ramp does not change: averaging changes nothing.
    _, along_y = predict_with_mirroring(ramp, image, [1])
    np.testing.assert_array_equal(along_y, ramp(image))


def test_mirroring_keeps_class_channels_in_place_and_is_off_without_axes():
    image = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
    # Two "class probabilities" that depend on the voxel's value only: flip-equivariant.
    two_channels = lambda volume: np.stack([1 / (1 + np.exp(volume)), 1 / (1 + np.exp(-volume))], axis=-1)  # noqa: E731
    plain, mirrored = predict_with_mirroring(two_channels, image, [0, 1, 2])
    assert mirrored.shape == (5, 4, 3, 2)
    np.testing.assert_allclose(mirrored, plain, rtol=1e-6)
    assert predict_with_mirroring(two_channels, image, [])[1] is None


def test_keep_largest_component_per_class():
    labels = np.zeros((10, 10, 3), dtype=np.uint8)
    labels[0:3, 0:3, 0] = 1  # 9 voxels of class 1
    labels[6:8, 6:8, 2] = 1  # 4 voxels of class 1, not touching
    labels[0, 9, 0] = 2      # 1 voxel of class 2
    labels[9, 0, 2] = 2      # 1 voxel of class 2: a tie, the first in scan order stays
    labels[5, 5, 1] = 7      # another value, not filtered
    out = keep_largest_component(labels, [1, 2])
    assert out.dtype == np.uint8
    assert np.count_nonzero(out == 1) == 9 and out[6, 6, 2] == 0
    assert np.count_nonzero(out == 2) == 1 and out[0, 9, 0] == 2
    assert out[5, 5, 1] == 7
    assert np.array_equal(labels[labels != 0].size, 16)  # the input is left alone


def test_components_touching_at_a_corner_are_one_region():
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = 1  # 26-connected
    labels[3, 3, 3] = 1
    out = keep_largest_component(labels, [1])
    assert out[0, 0, 0] == out[1, 1, 1] == 1 and out[3, 3, 3] == 0
