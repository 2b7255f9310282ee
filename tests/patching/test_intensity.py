"""nnU-Net's intensity augmentation (medseg.patching.intensity): each transform against a
hand-computed or scipy result, and the drawn chain's probabilities and reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from medseg.errors import ConfigurationError
from medseg.patching import Augmentation, intensity
from medseg.patching.intensity import brightness, contrast, gamma, gaussian_blur, gaussian_noise, nnunet_intensity, simulate_low_resolution


def _image(shape=(12, 10, 8), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(*shape, 1)).astype(np.float32)


def test_brightness_noise_and_contrast_by_hand():
    x = _image()
    np.testing.assert_allclose(brightness(tf.constant(x), 1.2).numpy(), x * 1.2, rtol=1e-6)
    noise = np.ones_like(x)
    np.testing.assert_allclose(gaussian_noise(tf.constant(x), tf.constant(noise), 0.04).numpy(), x + 0.2, rtol=1e-6)
    shrunk = contrast(tf.constant(x), 0.5).numpy()  # within the range: nothing clipped
    np.testing.assert_allclose(shrunk, (x - x.mean()) * 0.5 + x.mean(), atol=1e-5)
    stretched = contrast(tf.constant(x), 1.25).numpy()
    assert stretched.min() >= x.min() - 1e-6 and stretched.max() <= x.max() + 1e-6  # nnU-Net's preserve_range
    np.testing.assert_allclose(contrast(tf.constant(x), 1.0).numpy(), x, atol=1e-6)


@pytest.mark.parametrize("invert", [False, True])
def test_gamma_keeps_the_mean_and_spread_and_gamma_1_changes_nothing(invert):
    x = _image() * 3.0 + 2.0
    np.testing.assert_allclose(gamma(tf.constant(x), 1.0, invert).numpy(), x, atol=1e-4)
    changed = gamma(tf.constant(x), 1.5, invert).numpy()
    assert np.abs(changed - x).max() > 0.05
    assert changed.mean() == pytest.approx(x.mean(), abs=1e-4) and changed.std() == pytest.approx(x.std(), rel=1e-4)
    # By hand, without the retained statistics: ((x - min) / span) ** g * span + min.
    y = -x if invert else x
    raised = ((y - y.min()) / (np.ptp(y) + intensity.EPSILON)) ** 1.5 * (np.ptp(y) + intensity.EPSILON) + y.min()
    expected = (raised - raised.mean()) / (raised.std() + 1e-8) * y.std() + y.mean()
    np.testing.assert_allclose(changed, -expected if invert else expected, atol=1e-4)


@pytest.mark.parametrize("shape, sigmas", [((12, 10, 8), (0.5, 0.8, 1.0)), ((16, 14), (1.0, 0.6))])
def test_the_blur_is_scipys_gaussian_filter_with_mirrored_borders(shape, sigmas):
    x = _image(shape)
    ours = gaussian_blur(tf.constant(x), tf.constant(sigmas, tf.float32)).numpy()[..., 0]
    theirs = x[..., 0].astype(np.float64)
    for axis, sigma in enumerate(sigmas):  # a kernel of half-width 3 voxels, as ours
        theirs = ndimage.gaussian_filter1d(theirs, sigma, axis=axis, mode="reflect", truncate=intensity.BLUR_RADIUS / sigma)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 12), (16, 12, 10)])
def test_low_resolution_keeps_the_shape_and_loses_detail(shape):
    x = _image(shape)
    same = simulate_low_resolution(tf.constant(x), tf.ones(len(shape))).numpy()
    np.testing.assert_allclose(same, x, atol=1e-5)  # a zoom of 1: nothing lost
    coarse = simulate_low_resolution(tf.constant(x), tf.fill([len(shape)], 0.5)).numpy()
    assert coarse.shape == x.shape
    # White noise at half the resolution: neighbours repeat, so they correlate, where the input's do not.
    def neighbour_correlation(a):
        return np.corrcoef(a[:-1].ravel(), a[1:].ravel())[0, 1]
    assert abs(neighbour_correlation(x)) < 0.2 and neighbour_correlation(coarse) > 0.5


def test_the_chain_is_reproducible_and_applies_each_transform_with_nnunets_probabilities():
    x = tf.constant(_image((16, 16)))
    run = tf.function(nnunet_intensity)
    seeds = [tf.constant([7, i], tf.int64) for i in range(300)]
    outputs = [run(x, seed).numpy() for seed in seeds]
    np.testing.assert_array_equal(run(x, seeds[5]).numpy(), outputs[5])
    untouched = np.mean([np.array_equal(out, x.numpy()) for out in outputs])
    p = intensity
    expected = np.prod([1 - q for q in (p.NOISE_PROBABILITY, p.BLUR_PROBABILITY, p.BRIGHTNESS_PROBABILITY, p.CONTRAST_PROBABILITY,
                                        p.LOW_RESOLUTION_PROBABILITY, p.INVERTED_GAMMA_PROBABILITY, p.GAMMA_PROBABILITY)])
    assert expected == pytest.approx(0.323, abs=0.001)
    assert untouched == pytest.approx(expected, abs=0.08)  # 300 samples: 3 standard errors


def test_the_stream_augments_with_the_named_intensity_and_leaves_the_label():
    from medseg.patching import make_tf_dataset

    image, label = _image((8, 8)), (np.arange(64).reshape(8, 8, 1) % 3 == 0).astype(np.float32)

    def stream():
        for _ in range(8):
            yield image, label

    def batches(augment):
        return [tuple(t.numpy() for t in batch) for batch in make_tf_dataset(stream, (8, 8, 1), 4, augment=augment, seed=3, flip_axes=[])]

    first, again = batches("nnunet"), batches("nnunet")
    for (a, la), (b, lb) in zip(first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, np.broadcast_to(label, la.shape))  # no flip axis: the label as it was
    changed = [not np.array_equal(sample, image) for images, _ in first for sample in images]
    assert any(changed) and not all(changed)  # some samples drawn no transform
    jitter = batches(True)
    assert all(not np.array_equal(sample, image) for images, _ in jitter for sample in images)  # every sample scaled
    with pytest.raises(ConfigurationError, match="intensity_augmentation.*jitter, nnunet"):
        make_tf_dataset(stream, (8, 8, 1), 4, augment="heavy", seed=3)


def test_the_chain_runs_on_3d_patches_and_the_training_settings_name_it():
    from medseg.kinds.plans import TrainingSettings

    x = tf.constant(_image((12, 10, 6)))
    run = tf.function(nnunet_intensity)
    for i in range(40):  # 40 draws on a 3D patch: the shape kept, every value finite
        out = run(x, tf.constant([1, i], tf.int64)).numpy()
        assert out.shape == x.shape and np.isfinite(out).all()
    assert TrainingSettings({"augment": True, "intensity_augmentation": "nnunet"}).augmentation == Augmentation("nnunet", "none")
    assert TrainingSettings({"augment": True}).augmentation == Augmentation("jitter", "none")  # a section written before the parameters
    assert TrainingSettings({"augment": False, "intensity_augmentation": "nnunet"}).augmentation is False
