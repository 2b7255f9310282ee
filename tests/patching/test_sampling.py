"""Unit tests of patch extraction, centre sampling and the bounded patch stream."""

from __future__ import annotations

import gc
import itertools
import warnings
import weakref

import numpy as np
import pytest

from medseg.errors import ConfigurationError, GeometryMismatchError
from medseg.patching import (
    EmptyLabelWarning,
    PatchQueue,
    extract_patch,
    patch_stream,
    sample_patch_centers,
    slice_stream,
)
from medseg.patching import sampling

# --- extract_patch -------------------------------------------------------------------------


def _ramp(shape, dtype=np.float32):
    return (np.arange(np.prod(shape)) + 1).reshape(shape).astype(dtype)


def test_extract_patch_inside_is_the_centred_slice():
    volume = _ramp((10, 12, 14))
    patch = extract_patch(volume, (5, 6, 7), (4, 5, 6))
    # even p: [c - p//2, c - p//2 + p)
    np.testing.assert_array_equal(patch, volume[3:7, 4:9, 4:10])
    assert not np.shares_memory(patch, volume)


def test_extract_patch_pads_where_it_leaves_the_volume():
    volume = _ramp((10, 12, 14))
    patch = extract_patch(volume, (0, 11, 7), (4, 4, 4), pad_value=-1)
    assert patch.shape == (4, 4, 4)
    np.testing.assert_array_equal(patch[:2], -1)  # x in [-2, 0)
    np.testing.assert_array_equal(patch[:, 3:], -1)  # y = 12
    np.testing.assert_array_equal(patch[2:, :3], volume[0:2, 9:12, 5:9])


def test_extract_patch_longer_than_volume_keeps_whole_axis_padded_evenly():
    volume = _ramp((4, 6, 8), dtype=np.uint8)
    for center in [(0, 3, 4), (3, 3, 4), (2, 0, 4)]:
        patch = extract_patch(volume, center, (7, 6, 8))
        assert patch.shape == (7, 6, 8) and patch.dtype == np.uint8
        # 3 voxels of padding: 1 before, 2 after; y and z (patch == volume) centred exactly.
        np.testing.assert_array_equal(patch[0], 0)
        np.testing.assert_array_equal(patch[5:], 0)
        if center[1] == 3:
            np.testing.assert_array_equal(patch[1:5], volume)


def test_extract_patch_axial_slice():
    volume = _ramp((6, 5, 9))
    patch = extract_patch(volume, (3, 2, 4), (6, 5, 1))
    np.testing.assert_array_equal(patch[:, :, 0], volume[:, :, 4])


@pytest.mark.parametrize("center", [(10, 0, 0), (-1, 0, 0), (1, 2)])
def test_extract_patch_rejects_a_centre_outside_the_volume(center):
    with pytest.raises(ConfigurationError, match="center"):
        extract_patch(np.zeros((10, 10, 10)), center, (4, 4, 4))


# --- sample_patch_centers ------------------------------------------------------------------

VOLUME = (64, 64, 64)
PATCH = (8, 8, 8)
LESION = (slice(40, 43), slice(20, 23), slice(30, 33))


def _lesion_label():
    label = np.zeros(VOLUME, np.uint8)
    label[LESION] = 1
    return label


def _probability_random_patch_hits_lesion():
    """Exact P(hit) for a centre uniform over the centres whose patch is inside the volume."""
    probability = 1.0
    for size, patch, lesion in zip(VOLUME, PATCH, LESION):
        centres = np.arange(patch // 2, size - patch + patch // 2 + 1)
        first = centres - patch // 2
        hits = (first <= lesion.stop - 1) & (first + patch - 1 >= lesion.start)
        probability *= hits.mean()
    return probability


def _fraction_with_foreground(label, centers):
    return np.mean([extract_patch(label, c, PATCH).any() for c in centers])


@pytest.mark.parametrize("foreground_fraction", [0.0, 0.33, 0.8])
def test_foreground_fraction_tracks_the_parameter(foreground_fraction):
    label = _lesion_label()
    rng = np.random.default_rng(1234)
    centers = sample_patch_centers(label, 3000, PATCH, foreground_fraction, rng)
    p_hit = _probability_random_patch_hits_lesion()
    assert p_hit < 0.01  # random patches almost never see the lesion
    expected = foreground_fraction + (1 - foreground_fraction) * p_hit
    assert abs(_fraction_with_foreground(label, centers) - expected) < 0.05


def test_centres_keep_the_patch_inside_the_volume():
    label = np.zeros((20, 30, 12), np.uint8)
    label[0, 29, 11] = 1  # a lesion in a corner
    for fraction in (0.0, 0.5, 1.0):
        centers = sample_patch_centers(label, 500, (8, 9, 12), fraction, np.random.default_rng(0))
        assert centers.shape == (500, 3) and centers.dtype == np.int64
        first = centers - np.array([4, 4, 6])
        assert first.min() >= 0
        assert np.all(first + np.array([8, 9, 12]) <= np.array(label.shape))
    # with fraction 1, every patch contains the corner voxel although it is not centred on it
    assert all(extract_patch(label, c, (8, 9, 12)).any() for c in centers)


def test_centres_are_deterministic_for_a_seed():
    label = _lesion_label()
    a = sample_patch_centers(label, 50, PATCH, 0.5, np.random.default_rng(7))
    b = sample_patch_centers(label, 50, PATCH, 0.5, 7)
    c = sample_patch_centers(label, 50, PATCH, 0.5, 8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_empty_label_falls_back_to_random_centres_with_a_warning():
    label = np.zeros((16, 16, 16), np.uint8)
    with pytest.warns(EmptyLabelWarning, match="case 'case_007'"):
        centers = sample_patch_centers(label, 20, (4, 4, 4), 1.0, np.random.default_rng(0), case_id="case_007")
    assert centers.shape == (20, 3)
    assert centers.min() >= 2 and centers.max() <= 14
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_patch_centers(label, 20, (4, 4, 4), 0.0, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"foreground_fraction": 1.5}, "foreground_fraction"),
        ({"n": -1}, "n="),
        ({"patch_shape": (4, 4)}, "patch_shape"),
    ],
)
def test_sample_patch_centers_rejects_bad_arguments(kwargs, parameter):
    arguments = {"label": np.zeros((8, 8, 8)), "n": 4, "patch_shape": (4, 4, 4),
                 "foreground_fraction": 0.5, "rng": 0} | kwargs
    with pytest.raises(ConfigurationError, match=parameter):
        sample_patch_centers(**arguments)


# --- patch_stream / PatchQueue -------------------------------------------------------------

CASE_SHAPES = {"a": (20, 18, 16), "b": (16, 16, 16), "c": (24, 12, 20), "d": (18, 20, 14), "e": (12, 12, 12)}


def _case(case_id):
    rng = np.random.default_rng(sorted(CASE_SHAPES).index(case_id))
    shape = CASE_SHAPES[case_id]
    image = rng.normal(size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[3:6, 4:7, 5:8] = 1
    return image, label


class LoadSpy:
    """`load_case` that records calls and checks the previous case was released first."""

    def __init__(self):
        self.calls: list[str] = []
        self.alive: list[weakref.ref] = []
        self.max_alive_at_load = 0

    def __call__(self, case_id):
        gc.collect()
        self.max_alive_at_load = max(self.max_alive_at_load, sum(r() is not None for r in self.alive))
        self.calls.append(case_id)
        image, label = _case(case_id)
        self.alive += [weakref.ref(image), weakref.ref(label)]
        return image, label


def _take(stream, n):
    return list(itertools.islice(stream, n))


def test_patch_stream_yields_float32_patches_with_channel_axis():
    samples = _take(patch_stream(_case, list(CASE_SHAPES), (8, 6, 4), samples_per_volume=4, queue_length=8), 30)
    for image, label in samples:
        assert image.shape == label.shape == (8, 6, 4, 1)
        assert image.dtype == label.dtype == np.float32
        assert set(np.unique(label)) <= {0.0, 1.0}


def test_patch_stream_is_deterministic_for_a_seed():
    def run(seed):
        return _take(patch_stream(_case, list(CASE_SHAPES), (8, 8, 8), 4, 16, 0.5, seed), 60)

    first, again, other = run(3), run(3), run(4)
    for (i1, l1), (i2, l2) in zip(first, again):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(l1, l2)
    assert not all(np.array_equal(i1, i2) for (i1, _), (i2, _) in zip(first, other))


def test_queue_never_holds_more_than_queue_length(monkeypatch):
    extracted = []
    real_extract = sampling.extract_patch

    def counting_extract(volume, center, patch_shape, pad_value=0):
        extracted.append(1)
        return real_extract(volume, center, patch_shape, pad_value)

    monkeypatch.setattr(sampling, "extract_patch", counting_extract)
    queue = PatchQueue(_case, list(CASE_SHAPES), (6, 6, 6), samples_per_volume=3, queue_length=10, seed=0)
    for yielded, _ in enumerate(queue, start=1):
        assert len(queue) <= 10
        # patch pairs cut so far minus those handed out = what the queue holds
        assert len(extracted) // 2 - yielded <= 10
        if yielded == 200:
            break
    assert queue.peak_length == 10


def test_cases_are_loaded_one_at_a_time_in_shuffled_epochs():
    spy = LoadSpy()
    ids = list(CASE_SHAPES)
    # The spy's full collections walk only what this test makes: the objects of everything
    # imported and run before it (TensorFlow's among them) are set aside, not freed or leaked.
    gc.freeze()
    try:
        _take(patch_stream(spy, ids, (6, 6, 6), samples_per_volume=2, queue_length=4, seed=5), 40)
    finally:
        gc.unfreeze()
    # 40 yielded + 4 buffered patches, 2 per case: 22 loads
    assert len(spy.calls) == 22
    assert spy.max_alive_at_load == 0
    epochs = [spy.calls[i : i + len(ids)] for i in range(0, 20, len(ids))]
    assert all(sorted(epoch) == ids for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1  # the order is redrawn each epoch


def test_foreground_fraction_of_the_stream():
    samples = _take(patch_stream(_case, list(CASE_SHAPES), (4, 4, 4), 8, 32, foreground_fraction=1.0), 100)
    assert all(label.any() for _, label in samples)


def test_slice_stream_yields_axial_slices():
    image, label = _case("c")
    samples = _take(slice_stream(lambda _: (image, label), ["c"], (24, 12), 4, 8, foreground_fraction=1.0), 20)
    for image_slice, label_slice in samples:
        assert image_slice.shape == label_slice.shape == (24, 12, 1)
        matches = [z for z in range(image.shape[2]) if np.array_equal(image_slice[..., 0], image[:, :, z])]
        assert len(matches) == 1
        np.testing.assert_array_equal(label_slice[..., 0], label[:, :, matches[0]])
        assert 5 <= matches[0] < 8  # the foreground slices


def test_mismatched_case_raises_geometry_error():
    def load(_):
        return np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 7), np.uint8)

    with pytest.raises(GeometryMismatchError, match="'x'"):
        next(patch_stream(load, ["x"], (4, 4, 4), queue_length=1))


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [({"case_ids": []}, "case_ids"), ({"queue_length": 0}, "queue_length"),
     ({"samples_per_volume": 0}, "samples_per_volume"), ({"patch_shape": (4, 4)}, "patch_shape")],
)
def test_patch_queue_rejects_bad_arguments(kwargs, parameter):
    arguments = {"load_case": _case, "case_ids": ["a"], "patch_shape": (4, 4, 4)} | kwargs
    with pytest.raises(ConfigurationError, match=parameter):
        PatchQueue(**arguments)


def test_foreground_centres_draw_every_class_equally_often():
    from medseg.patching import sample_patch_centers

    label = np.zeros((40, 40, 20), dtype=np.uint8)
    label[5:35, 5:35, 2:18] = 1  # a large class
    label[18:20, 18:20, 9:11] = 2  # a rare one: 8 voxels
    centers = sample_patch_centers(label, 2000, (1, 1, 1), 1.0, rng=0)
    hits = label[tuple(centers.T)]
    share_rare = float((hits == 2).mean())
    assert 0.45 < share_rare < 0.55  # by voxel count it would be 8 / 14408
    assert (hits > 0).all()


def test_a_binary_label_draws_as_before():
    """One foreground class: the same draws as a uniform pick among foreground voxels."""
    from medseg.patching import sample_patch_centers

    label = np.zeros((30, 30, 10), dtype=np.uint8)
    label[3:9, 20:27, 2:5] = 1
    got = sample_patch_centers(label, 50, (1, 1, 1), 0.5, rng=7)
    rng = np.random.default_rng(7)
    use = rng.random(50) < 0.5
    expected = rng.integers((0, 0, 0), (29 + 1, 29 + 1, 9 + 1), size=(50, 3), dtype=np.int64)
    foreground = np.flatnonzero(label > 0)
    picks = foreground[rng.integers(foreground.size, size=int(use.sum()))]
    expected[use] = np.column_stack(np.unravel_index(picks, label.shape))
    np.testing.assert_array_equal(got, expected)


def test_an_image_with_channels_gives_patches_with_them_and_the_label_stays_one():
    image = np.stack([np.full((12, 12, 12), 1.0), np.full((12, 12, 12), 2.0)], axis=-1).astype(np.float32)
    image[..., 0] += np.arange(12)[:, None, None]  # channel 0 varies along x
    label = np.zeros((12, 12, 12), np.uint8)
    label[4:8, 4:8, 4:8] = 1
    queue = PatchQueue(lambda case: (image, label), ["a"], (6, 6, 6), samples_per_volume=4, queue_length=2, seed=1)
    patches = list(itertools.islice(iter(queue), 6))
    for image_patch, label_patch in patches:
        assert image_patch.shape == (6, 6, 6, 2) and label_patch.shape == (6, 6, 6, 1)
        assert np.all(image_patch[..., 1][label_patch[..., 0] >= 0] == 2.0)
        assert np.ptp(image_patch[..., 0][:, 0, 0]) == 5.0  # six consecutive x positions of channel 0
