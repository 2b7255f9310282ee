"""nnU-Net's spatial augmentation (medseg.patching.spatial): the transforms against hand-made
cases, the draws' probabilities, and the stream that applies them where patches are cut."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medseg.errors import ConfigurationError
from medseg.patching import Augmentation, extract_patch, patch_stream, slice_stream
from medseg.patching.spatial import draw_transform, rotation_matrix, transformed_patch


def _volume(shape=(20, 18, 16), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_rotation_matrices_by_hand():
    np.testing.assert_allclose(rotation_matrix((0, 0, np.pi / 2)) @ [1, 0, 0], [0, 1, 0], atol=1e-12)  # x -> y about z
    np.testing.assert_allclose(rotation_matrix((np.pi / 2, 0, 0)) @ [0, 1, 0], [0, 0, 1], atol=1e-12)  # y -> z about x
    matrix = rotation_matrix((0.3, -0.5, 1.1))
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(matrix) == pytest.approx(1.0)


def test_the_identity_is_extract_patch_inside_and_where_it_pads():
    volume = _volume()
    for center in ((10, 9, 8), (1, 17, 2)):  # inside; near corners, where the patch leaves the volume
        for order in (0, 1):
            np.testing.assert_allclose(transformed_patch(volume, center, (7, 6, 5), np.eye(3), order),
                                       extract_patch(volume, center, (7, 6, 5)), atol=1e-6)


def test_a_quarter_turn_in_plane_is_rot90_and_a_scale_of_2_takes_every_other_voxel():
    volume = _volume()
    center, shape = (10, 9, 8), (7, 7, 1)
    quarter = transformed_patch(volume, center, shape, rotation_matrix((0, 0, np.pi / 2)), order=1)
    # Patch offset (i, j) reads volume offset (-j, i), so quarter[I, J] = plain[6 - J, I]: the plain
    # patch turned clockwise, np.rot90(k=-1).
    plain = extract_patch(volume, center, shape)[:, :, 0]
    assert quarter[1, 5, 0] == pytest.approx(plain[1, 1], abs=1e-5)
    np.testing.assert_allclose(quarter[:, :, 0], np.rot90(plain, k=-1), atol=1e-5)
    doubled = transformed_patch(volume, center, (5, 5, 3), 2.0 * np.eye(3), order=0)
    np.testing.assert_array_equal(doubled, volume[6:15:2, 5:14:2, 6:11:2])


def test_a_label_keeps_its_values_and_stays_aligned_with_its_image():
    label = np.zeros((24, 24, 24), np.uint8)
    label[6:14, 8:18, 5:20] = 1
    label[14:20, 8:18, 5:20] = 2
    matrix = rotation_matrix((0.4, -0.2, 0.7)) * 1.2
    moved = transformed_patch(label, (12, 12, 12), (16, 16, 16), matrix, order=0)
    assert set(np.unique(moved)) <= {0, 1, 2} and {1, 2} <= set(np.unique(moved))
    # The label read as an image (linear) agrees with the nearest-neighbour label where it is unambiguous.
    smooth = transformed_patch((label == 1).astype(np.float32), (12, 12, 12), (16, 16, 16), matrix, order=1)
    assert np.all(moved[smooth > 0.99] == 1) and not np.any(moved[smooth < 0.01] == 1)


def test_the_draws_follow_nnunets_probabilities_and_slices_turn_in_plane_only():
    rng = np.random.default_rng(0)
    draws = [draw_transform(rng, in_plane=False) for _ in range(5000)]
    untouched = sum(d is None for d in draws) / len(draws)
    assert untouched == pytest.approx(0.8 * 0.8, abs=0.02)
    scales = [np.cbrt(np.linalg.det(d)) for d in draws if d is not None]
    assert min(scales) >= 0.7 - 1e-9 and max(scales) <= 1.4 + 1e-9
    for matrix in (d for d in draws if d is not None):
        unscaled = matrix / np.cbrt(np.linalg.det(matrix))
        angle = np.degrees(np.arccos(np.clip((np.trace(unscaled) - 1) / 2, -1, 1)))
        assert angle <= 3 * 30 + 1e-6  # three turns of at most 30 degrees each
    planar = [d for d in (draw_transform(rng, in_plane=True) for _ in range(2000)) if d is not None]
    for matrix in planar:
        assert matrix[2, 0] == matrix[2, 1] == matrix[0, 2] == matrix[1, 2] == 0.0  # z stays z
    angles = [np.degrees(np.arctan2(m[1, 0], m[0, 0])) for m in planar]
    assert max(angles) > 150 and min(angles) < -150  # nnU-Net's +-180 degrees in-plane


def _case(case_id):
    rng = np.random.default_rng(int(case_id))
    image = rng.normal(size=(24, 22, 20)).astype(np.float32)
    label = np.zeros((24, 22, 20), np.uint8)
    label[8:16, 6:15, 5:14] = 1
    return image, label


def _take(stream, n):
    return list(itertools.islice(stream, n))


def test_the_stream_is_unchanged_without_it_and_reproducible_with_it():
    def run(spatial, seed=3, stream=patch_stream, shape=(8, 8, 8)):
        return _take(stream(_case, ["1", "2", "3"], shape, 4, 8, 0.5, seed, spatial=spatial), 40)

    baseline = _take(patch_stream(_case, ["1", "2", "3"], (8, 8, 8), 4, 8, 0.5, 3), 40)
    for (a, la), (b, lb) in zip(baseline, run("none")):  # `none` draws nothing: the stream of before
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    first, again = run("nnunet"), run("nnunet")
    for (a, la), (b, lb) in zip(first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    for image, label in first:
        assert image.shape == label.shape == (8, 8, 8, 1) and image.dtype == label.dtype == np.float32
        assert set(np.unique(label)) <= {0.0, 1.0}
    # Some samples are transformed: they are none of the stream's plain patches at any centre
    # of their case, so compare by the share of exact grid values (a plain patch has only them).
    grid_values = {float(v) for case in "123" for v in _case(case)[0].ravel()} | {0.0}
    transformed = sum(not {float(v) for v in image.ravel()} <= grid_values for image, _ in first)
    assert 0 < transformed < len(first)
    slices = run("nnunet", stream=slice_stream, shape=(12, 12))
    assert all(image.shape == (12, 12, 1) for image, _ in slices)
    with pytest.raises(ConfigurationError, match="spatial_augmentation.*none, nnunet"):
        run("elastic")


def test_the_training_settings_name_the_spatial_augmentation():
    from medseg.kinds.plans import TrainingSettings

    settings = TrainingSettings({"augment": True, "intensity_augmentation": "nnunet", "spatial_augmentation": "nnunet"})
    assert settings.augmentation == Augmentation("nnunet", "nnunet")
    assert TrainingSettings({"augment": False, "spatial_augmentation": "nnunet"}).augmentation is False


def test_a_kinds_stream_cuts_with_the_spatial_part_and_augments_with_the_intensity_part(monkeypatch):
    from medseg.kinds import streams

    seen = {}

    def spy(*args, **kwargs):
        seen["spatial"] = kwargs["spatial"]
        return slice_stream(*args, **kwargs)

    sampling = {"samples_per_volume": 4, "queue_length": 8, "foreground_fraction": 0.5}
    dataset = streams.sampled_dataset(spy, _case, (12, 12), (12, 12, 1), sampling, ["1", "2"], 5,
                                      Augmentation("jitter", "nnunet"), batch_size=4)
    images, labels = next(iter(dataset))
    assert seen["spatial"] == "nnunet" and images.shape == labels.shape == (4, 12, 12, 1)
    assert set(np.unique(labels.numpy())) <= {0.0, 1.0}
