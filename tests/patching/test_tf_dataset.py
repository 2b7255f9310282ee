"""Tests of `make_tf_dataset` and of importing medseg.patching without TensorFlow."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

from medseg.errors import ConfigurationError
from medseg.patching import make_tf_dataset, patch_stream, slice_stream


def _case(case_id):
    rng = np.random.default_rng(int(case_id))
    image = rng.normal(size=(16, 12, 10)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[4:9, 3:6, 2:7] = 1
    return image, label


CASES = ["0", "1", "2"]


def _slices():
    return slice_stream(_case, CASES, (16, 12), samples_per_volume=4, queue_length=8, seed=1)


def _batches(dataset, n):
    return [(x.numpy(), y.numpy()) for x, y in itertools.islice(dataset, n)]


def test_importing_patching_does_not_import_tensorflow():
    code = "import sys, medseg.patching; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_slice_batches_have_the_right_shape_dtype_and_content():
    batches = _batches(make_tf_dataset(_slices, (16, 12, 1), batch_size=4), 3)
    expected = list(itertools.islice(_slices(), 12))
    for b, (images, labels) in enumerate(batches):
        assert images.shape == labels.shape == (4, 16, 12, 1)
        assert images.dtype == labels.dtype == np.float32
        for i in range(4):
            np.testing.assert_array_equal(images[i], expected[4 * b + i][0])
            np.testing.assert_array_equal(labels[i], expected[4 * b + i][1])


def test_patch_batches_have_the_right_shape():
    dataset = make_tf_dataset(lambda: patch_stream(_case, CASES, (8, 8, 4), 4, 8), (8, 8, 4, 1), batch_size=2)
    assert dataset.element_spec[0].shape.as_list() == [2, 8, 8, 4, 1]
    images, labels = _batches(dataset, 1)[0]
    assert images.shape == labels.shape == (2, 8, 8, 4, 1)


def test_augmentation_flips_both_and_changes_intensity_of_the_image_only():
    plain = _batches(make_tf_dataset(_slices, (16, 12, 1), 4), 4)
    augmented = _batches(make_tf_dataset(_slices, (16, 12, 1), 4, augment=True, seed=3), 4)
    again = _batches(make_tf_dataset(_slices, (16, 12, 1), 4, augment=True, seed=3), 4)
    flips_seen = set()
    for (images, labels), (aug_images, aug_labels), (images_2, labels_2) in zip(plain, augmented, again):
        np.testing.assert_array_equal(aug_images, images_2)
        np.testing.assert_array_equal(aug_labels, labels_2)
        for image, label, aug_image, aug_label in zip(images, labels, aug_images, aug_labels):
            found = None
            for flips in itertools.product((False, True), repeat=2):
                axes = [axis for axis, flip in zip((0, 1), flips) if flip]
                flipped = np.flip(image, axis=axes) if axes else image
                scale, shift = np.polyfit(flipped.ravel(), aug_image.ravel(), 1)
                residual = np.abs(flipped * scale + shift - aug_image).max()
                if residual < 1e-4:
                    found = flips
                    break
            assert found is not None
            flips_seen.add(found)
            assert 0.9 - 1e-5 <= scale <= 1.1 + 1e-5 and abs(shift) <= 0.1 + 1e-5
            axes = [axis for axis, flip in zip((0, 1), found) if flip]
            np.testing.assert_array_equal(aug_label, np.flip(label, axis=axes) if axes else label)
    assert len(flips_seen) > 1


def test_bad_arguments_raise():
    with pytest.raises(ConfigurationError, match="batch_size"):
        make_tf_dataset(_slices, (16, 12, 1), batch_size=0)
    with pytest.raises(ConfigurationError, match="sample_shape"):
        make_tf_dataset(_slices, (16,), batch_size=2)


def test_flips_stay_off_the_axes_left_out():
    """A left-right pattern survives augmentation when axis 0 may not be flipped."""
    import numpy as np

    from medseg.patching import make_tf_dataset

    image = np.zeros((8, 6, 1), dtype=np.float32)
    image[:4] = 1.0  # left half bright (canonical RAS: low x is the patient's left)

    def stream():
        for _ in range(32):
            yield image, image

    def left_bright(flip_axes):
        images, labels = next(iter(make_tf_dataset(stream, (8, 6, 1), 32, augment=True, seed=3, flip_axes=flip_axes)))
        return labels.numpy()[:, :4].mean(axis=(1, 2, 3)) > 0.5

    assert left_bright([1]).all()  # never flipped left-right
    both = left_bright([0, 1])
    assert both.any() and (~both).any()  # about half flipped
