"""nnU-Net's intensity augmentation (v2, `nnUNetTrainer.get_training_transforms`), per sample in
TensorFlow, so that it runs inside the `tf.data` stream with stateless, seeded randomness.

Each transform is a function of the image and its drawn parameters, testable on its own;
`nnunet_intensity` draws them as nnU-Net does, in nnU-Net's order and with its probabilities:

| transform | applied to a sample with probability | parameters |
| --- | --- | --- |
| Gaussian noise | 0.1 | variance ~ U(0, 0.1) |
| Gaussian blur | 0.2 × 0.5 (per channel) | sigma ~ U(0.5, 1) per axis |
| multiplicative brightness | 0.15 | factor ~ U(0.75, 1.25) |
| contrast, range preserved | 0.15 | factor ~ U(0.75, 1.25) |
| simulated low resolution | 0.25 × 0.5 (per channel) | zoom ~ U(0.5, 1) per axis |
| gamma on the inverted image, statistics retained | 0.1 | gamma ~ U(0.7, 1.5), nnU-Net's draw |
| gamma, statistics retained | 0.3 | the same |

The image is the first channel; a cascade's context channels and the label are left as they are.
"""

from __future__ import annotations

from typing import Any

NOISE_PROBABILITY, NOISE_VARIANCE = 0.1, (0.0, 0.1)
BLUR_PROBABILITY, BLUR_SIGMA = 0.2 * 0.5, (0.5, 1.0)
BRIGHTNESS_PROBABILITY, BRIGHTNESS_RANGE = 0.15, (0.75, 1.25)
CONTRAST_PROBABILITY, CONTRAST_RANGE = 0.15, (0.75, 1.25)
LOW_RESOLUTION_PROBABILITY, LOW_RESOLUTION_ZOOM = 0.25 * 0.5, (0.5, 1.0)
INVERTED_GAMMA_PROBABILITY, GAMMA_PROBABILITY, GAMMA_RANGE = 0.1, 0.3, (0.7, 1.5)
BLUR_RADIUS = 3  # kernel half-width in voxels: 3 sigma at the largest sigma, 1
EPSILON = 1e-7


def gaussian_noise(image: Any, noise: Any, variance: Any) -> Any:
    """`image` plus `noise` (standard normal, the image's shape) scaled to `variance`."""
    import tensorflow as tf

    return image + noise * tf.sqrt(tf.cast(variance, image.dtype))


def gaussian_blur(image: Any, sigmas: Any) -> Any:
    """`image` (spatial axes, 1 channel) smoothed by a separable Gaussian of `sigmas` (one per
    spatial axis, voxels), the borders mirrored, as scipy's `gaussian_filter` in nnU-Net."""
    import tensorflow as tf

    spatial = len(image.shape) - 1
    offsets = tf.range(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=image.dtype)
    for axis in range(spatial):
        weights = tf.exp(-0.5 * tf.square(offsets / tf.cast(sigmas[axis], image.dtype)))
        weights = weights / tf.reduce_sum(weights)
        padding = [[0, 0]] * (spatial + 1)
        padding[axis] = [BLUR_RADIUS, BLUR_RADIUS]
        padded = tf.pad(image, padding, mode="SYMMETRIC")
        size = tf.shape(image)[axis]
        image = tf.add_n([
            weights[k] * tf.gather(padded, tf.range(k, k + size), axis=axis) for k in range(2 * BLUR_RADIUS + 1)
        ])
    return image


def brightness(image: Any, factor: Any) -> Any:
    """`image` times `factor`."""
    return image * factor


def contrast(image: Any, factor: Any) -> Any:
    """`image` stretched about its mean by `factor`, then clipped to its own range."""
    import tensorflow as tf

    mean = tf.reduce_mean(image)
    low, high = tf.reduce_min(image), tf.reduce_max(image)
    return tf.clip_by_value((image - mean) * factor + mean, low, high)


def simulate_low_resolution(image: Any, zooms: Any) -> Any:
    """`image` resampled down to `zooms` (one per spatial axis, ≤ 1) of its size, nearest
    neighbour, and back up to its size, cubic, as nnU-Net's transform does."""
    import tensorflow as tf

    spatial = len(image.shape) - 1
    shape = tf.shape(image)[:spatial]
    small = tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float32) * tf.cast(zooms, tf.float32)), tf.int32), 1)
    down = _resize(image, small, "nearest")
    return _resize(down, shape, "bicubic")


def _resize(image: Any, size: Any, method: str) -> Any:
    """`image` (spatial axes, 1 channel) resized to `size` with `tf.image.resize`: a 3D image
    in two passes, the last two axes, then the first."""
    import tensorflow as tf

    if len(image.shape) == 3:
        return tf.image.resize(image, size, method=method)
    # (x, y, z, 1): first y and z, as the 2D images of a batch along x; then x, with y' as the batch.
    inplane = tf.image.resize(image, size[1:], method=method)  # (x, y', z', 1)
    moved = tf.transpose(inplane[..., 0], [1, 0, 2])[..., tf.newaxis]  # (y', x, z', 1)
    resized = tf.image.resize(moved, tf.stack([size[0], size[2]]), method=method)  # (y', x', z', 1)
    return tf.transpose(resized[..., 0], [1, 0, 2])[..., tf.newaxis]


def gamma(image: Any, value: Any, invert: bool) -> Any:
    """nnU-Net's gamma with statistics retained: the image (negated first when `invert`)
    rescaled to [0, 1], raised to `value`, rescaled back, then given its mean and standard
    deviation again."""
    import tensorflow as tf

    if invert:
        image = -image
    mean, std = tf.reduce_mean(image), tf.math.reduce_std(image)
    low = tf.reduce_min(image)
    span = tf.reduce_max(image) - low
    raised = tf.pow((image - low) / (span + EPSILON), value) * (span + EPSILON) + low
    raised = (raised - tf.reduce_mean(raised)) / (tf.math.reduce_std(raised) + 1e-8) * std + mean
    return -raised if invert else raised


def _uniform(draw: Any, bounds: tuple[float, float]) -> Any:
    return bounds[0] + (bounds[1] - bounds[0]) * draw


def _gamma_value(choose: Any, draw: Any) -> Any:
    """nnU-Net's draw: half the time below 1, from U(0.7, 1), else from U(1, 1.5)."""
    import tensorflow as tf

    return tf.where(choose < 0.5, _uniform(draw, (GAMMA_RANGE[0], 1.0)), _uniform(draw, (1.0, GAMMA_RANGE[1])))


def nnunet_intensity(image: Any, seed: Any) -> Any:
    """nnU-Net's intensity transforms on `image` (spatial axes, 1 channel), each drawn with its
    probability from the stateless `seed` (a pair of int64: the stream's seed and the sample's
    index), so a sample is augmented the same way in every run."""
    import tensorflow as tf

    spatial = len(image.shape) - 1
    draws = tf.random.stateless_uniform([16 + 2 * spatial], seed=seed)
    noise = tf.random.stateless_normal(tf.shape(image), seed=seed + tf.constant([0, 1], tf.int64), dtype=image.dtype)

    def maybe(probability, index, transform):
        return tf.cond(draws[index] < probability, transform, lambda: image)

    image = maybe(NOISE_PROBABILITY, 0, lambda: gaussian_noise(image, noise, _uniform(draws[1], NOISE_VARIANCE)))
    sigmas = _uniform(draws[16:16 + spatial], BLUR_SIGMA)
    image = maybe(BLUR_PROBABILITY, 2, lambda: gaussian_blur(image, sigmas))
    image = maybe(BRIGHTNESS_PROBABILITY, 3, lambda: brightness(image, _uniform(draws[4], BRIGHTNESS_RANGE)))
    image = maybe(CONTRAST_PROBABILITY, 5, lambda: contrast(image, _uniform(draws[6], CONTRAST_RANGE)))
    zooms = _uniform(draws[16 + spatial:16 + 2 * spatial], LOW_RESOLUTION_ZOOM)
    image = maybe(LOW_RESOLUTION_PROBABILITY, 7, lambda: simulate_low_resolution(image, zooms))
    image = maybe(INVERTED_GAMMA_PROBABILITY, 8, lambda: gamma(image, _gamma_value(draws[9], draws[10]), invert=True))
    image = maybe(GAMMA_PROBABILITY, 11, lambda: gamma(image, _gamma_value(draws[12], draws[13]), invert=False))
    return image
