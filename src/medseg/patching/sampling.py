"""Patch and slice sampling for training, with bounded memory.

A 3D model trains on (px, py, pz) patches; a 2D model on axial slices, which are patches of
shape (H, W, 1) along the third axis (z) with that axis squeezed. Both share one sampler:

- `extract_patch` cuts a patch of exactly the requested shape, zero-padded where it leaves the
  volume;
- `sample_patch_centers` chooses centres, a given fraction of them on foreground voxels, as
  nnU-Net's oversampling and MONAI's `RandCropByPosNegLabeld` do;
- `PatchQueue` / `patch_stream` stream patches from one case at a time through a bounded
  shuffle buffer, like TorchIO's `Queue`, so the training set is never held in memory;
- `make_tf_dataset` wraps a stream as a batched, prefetched `tf.data.Dataset`.

Volumes are (X, Y, Z): images float32, labels uint8. All shapes are in voxels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import ChannelError, ConfigurationError, GeometryMismatchError
from medseg.patching._checks import (
    check_fraction,
    check_positive_int,
    check_shape,
    check_volume,
)
from medseg.patching.spatial import SPATIAL_AUGMENTATIONS, draw_transform, patch_coordinates, read_at

if TYPE_CHECKING:
    import tensorflow as tf

CaseLoader = Callable[[str], tuple[np.ndarray, np.ndarray]]
Sample = tuple[np.ndarray, np.ndarray]

# Light augmentation of `make_tf_dataset`: intensities are z-score normalised upstream, so a
# +-10% scale and a +-0.1 shift are small perturbations.
FLIP_PROBABILITY = 0.5
INTENSITY_AUGMENTATIONS = ("jitter", "nnunet")
# nnU-Net's intensity draws take a stream of their own, apart from the flips' (seed, index).
NNUNET_SEED_OFFSET = 2**40
INTENSITY_SCALE_RANGE = 0.1
INTENSITY_SHIFT_RANGE = 0.1


@dataclass(frozen=True)
class Augmentation:
    """What a training stream augments with: the flips and the `intensity` augmentation in
    `make_tf_dataset` (`jitter` or `nnunet`), and the `spatial` one where patches are cut
    (`none` or `nnunet`: `medseg.patching.spatial`)."""

    intensity: str = "jitter"
    spatial: str = "none"


class EmptyLabelWarning(UserWarning):
    """A label has no foreground voxel, so foreground oversampling fell back to random centres."""


def extract_patch(
    volume: np.ndarray,
    center: Sequence[int],
    patch_shape: Sequence[int],
    pad_value: float = 0,
) -> np.ndarray:
    """Cut the patch of `patch_shape` centred at `center`, padding where it leaves the volume.

    The patch covers `[c - p // 2, c - p // 2 + p)` on each axis (for an even p the centre is
    the voxel just after the middle). Where that range leaves the volume the patch holds
    `pad_value`. On an axis where the patch is longer than the volume, `center` is ignored: the
    whole axis is kept and padded evenly on both sides (the extra voxel, if any, after).

    Args:
        volume: (X, Y, Z) array (any number of axes).
        center: voxel index, one int per axis, inside the volume.
        patch_shape: patch size, one int >= 1 per axis, voxels.
        pad_value: fill value outside the volume. Default 0 (background for labels, the mean
            for z-score normalised images).

    Returns:
        A new array of exactly `patch_shape`, with the volume's dtype (never a view).
    """
    volume = np.asarray(volume)
    patch_shape = check_shape(patch_shape, "patch_shape", ndim=volume.ndim)
    center = _check_center(center, volume.shape)
    patch = np.full(patch_shape, pad_value, dtype=volume.dtype)
    source, target = [], []
    for c, p, s in zip(center, patch_shape, volume.shape):
        start = -((p - s) // 2) if p > s else c - p // 2
        low, high = max(start, 0), min(start + p, s)
        source.append(slice(low, high))
        target.append(slice(low - start, high - start))
    patch[tuple(target)] = volume[tuple(source)]
    return patch


def sample_patch_centers(
    label: np.ndarray,
    n: int,
    patch_shape: Sequence[int],
    foreground_fraction: float,
    rng: np.random.Generator | int,
    case_id: str | None = None,
) -> np.ndarray:
    """Draw `n` patch centres, a fraction of them on foreground.

    Each centre is, independently with probability `foreground_fraction`, a foreground centre:
    a foreground voxel (label > 0) chosen uniformly, or, when the label holds several
    foreground classes, a class chosen uniformly among those present and then one of its
    voxels (as nnU-Net does, so a rare class is not starved), then moved the least distance needed to
    keep the patch inside the volume (the patch still contains that voxel; without the move, a
    lesion near the border would give a patch that is mostly padding). Otherwise it is a random
    centre, uniform over the centres whose patch lies inside the volume. On an axis where the
    patch is longer than the volume, any voxel is allowed (`extract_patch` ignores it there).

    So the expected fraction of patches containing foreground is
    foreground_fraction + (1 - foreground_fraction) * P(a random patch hits foreground).

    Args:
        label: (X, Y, Z) integer label; every value > 0 is foreground.
        n: number of centres, >= 0.
        patch_shape: (px, py, pz), voxels. For an axial slice, (H, W, 1).
        foreground_fraction: probability of a foreground centre, in [0, 1]. nnU-Net uses 0.33.
        rng: a `np.random.Generator`, or a seed for one.
        case_id: named in the warning below, to find the case.

    Returns:
        int64 array (n, 3) of voxel indices.

    Warns:
        EmptyLabelWarning: `foreground_fraction > 0` but the label has no foreground; all
            centres are random.
    """
    label = check_volume(label, "label", ndim=3)
    patch_shape = check_shape(patch_shape, "patch_shape", ndim=3)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigurationError(f"n={n!r} is invalid: pass the number of centres, an integer >= 0.")
    foreground_fraction = check_fraction(foreground_fraction, "foreground_fraction")
    rng = np.random.default_rng(rng)

    low, high = _inside_center_range(label.shape, patch_shape)
    use_foreground = rng.random(n) < foreground_fraction
    centers = rng.integers(low, high + 1, size=(n, 3), dtype=np.int64)
    if foreground_fraction == 0.0 or n == 0:
        return centers

    foreground = np.flatnonzero(label > 0)
    if foreground.size == 0:
        where = f"case {case_id!r}" if case_id is not None else "the label"
        warnings.warn(
            f"{where} has no foreground voxel; drew {n} random patch centres instead of "
            f"foreground_fraction={foreground_fraction}. Check the label, or leave the case out "
            "of training if it is truly empty.",
            EmptyLabelWarning,
            stacklevel=2,
        )
        return centers
    classes = np.unique(label.ravel()[foreground])
    if classes.size == 1:
        picks = foreground[rng.integers(foreground.size, size=int(use_foreground.sum()))]
    else:  # a class first, uniformly, then one of its voxels: a rare class is not starved
        chosen = classes[rng.integers(classes.size, size=int(use_foreground.sum()))]
        picks = np.empty(chosen.size, dtype=np.int64)
        values = label.ravel()[foreground]
        for value in classes:
            members = foreground[values == value]
            slots = np.flatnonzero(chosen == value)
            picks[slots] = members[rng.integers(members.size, size=slots.size)]
    voxels = np.column_stack(np.unravel_index(picks, label.shape)).astype(np.int64)
    centers[use_foreground] = np.clip(voxels, low, high)
    return centers


class PatchQueue:
    """An endless, shuffled stream of (image, label) patches with bounded memory.

    Like TorchIO's `Queue`: cases are loaded one at a time with `load_case`, in a shuffled
    order that is redrawn every epoch (every pass over `case_ids`). From each case
    `samples_per_volume` patches are cut (see `sample_patch_centers`) and pushed through a
    shuffle buffer of `queue_length` patches: once the buffer is full, each new patch replaces
    a uniformly chosen one, which is yielded. Patches of about `queue_length /
    samples_per_volume` cases are therefore mixed, and the first patch comes out after that
    many cases have been loaded.

    Memory: one case (the previous one is released before the next is loaded) plus at most
    `queue_length` patch pairs. `len(queue)` is the buffer's current fill and `peak_length`
    the largest fill seen.

    Iterating starts the stream from the beginning: the same seed gives the same patches, given
    a deterministic `load_case`.

    Args:
        load_case: `load_case(case_id) -> (image, label)`, (X, Y, Z) float32 and uint8 arrays
            of the same shape.
        case_ids: the training cases, at least one.
        patch_shape: (px, py, pz), voxels. (H, W, 1) for axial slices, see `slice_stream`.
        samples_per_volume: patches cut per loaded case, >= 1. Default 8.
        queue_length: shuffle buffer size in patches, >= 1. Default 64.
        foreground_fraction: share of foreground-centred patches, in [0, 1]. Default 0.33.
        seed: seeds the case order, the centres and the shuffling. Default 0.
        spatial: `none`, or `nnunet`: each patch rotated and scaled as nnU-Net draws it
            (`medseg.patching.spatial`; in-plane for (H, W, 1) slices), from the same seed.

    Yields:
        (image_patch, label_patch), float32 arrays of shape patch_shape + (1,). Label values
        are kept as they are (cast to float32); map them to the model's classes upstream.
    """

    def __init__(
        self,
        load_case: CaseLoader,
        case_ids: Sequence[str],
        patch_shape: Sequence[int],
        samples_per_volume: int = 8,
        queue_length: int = 64,
        foreground_fraction: float = 0.33,
        seed: int = 0,
        spatial: str = "none",
    ) -> None:
        if not callable(load_case):
            raise ConfigurationError("load_case is not callable: pass a function case_id -> (image, label).")
        self.case_ids = list(case_ids)
        if not self.case_ids:
            raise ConfigurationError("case_ids is empty: pass at least one training case.")
        self.load_case = load_case
        self.patch_shape = check_shape(patch_shape, "patch_shape", ndim=3)
        self.samples_per_volume = check_positive_int(samples_per_volume, "samples_per_volume")
        self.queue_length = check_positive_int(queue_length, "queue_length")
        self.foreground_fraction = check_fraction(foreground_fraction, "foreground_fraction")
        self.seed = seed
        if spatial not in SPATIAL_AUGMENTATIONS:
            raise ConfigurationError(
                f"Unknown spatial augmentation {spatial!r} (`<model>.training.spatial_augmentation`). "
                f"Use one of {', '.join(SPATIAL_AUGMENTATIONS)}."
            )
        self.spatial = spatial
        self._length = 0
        self.peak_length = 0

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[Sample]:
        rng = np.random.default_rng(self.seed)
        buffer: list[Sample] = []
        while True:
            for index in rng.permutation(len(self.case_ids)):
                case_id = self.case_ids[index]
                image, label = self._load(case_id)
                centers = sample_patch_centers(
                    label, self.samples_per_volume, self.patch_shape,
                    self.foreground_fraction, rng, case_id=case_id,
                )
                for center in centers:
                    if len(buffer) == self.queue_length:
                        yield self._pop_random(buffer, rng)
                    buffer.append(self._sample(image, label, center, rng))
                    self._track(len(buffer))
                del image, label  # release this case before loading the next one

    def _sample(self, image: np.ndarray, label: np.ndarray, center: np.ndarray, rng: np.random.Generator) -> Sample:
        """The patch at `center`, rotated and scaled when the spatial augmentation draws it
        (no draw at all with `none`, so that stream is the same as without the option)."""
        matrix = draw_transform(rng, in_plane=self.patch_shape[2] == 1) if self.spatial == "nnunet" else None
        if matrix is None:
            return _sample_at(image, label, center, self.patch_shape)
        coordinates = patch_coordinates(center, self.patch_shape, matrix)  # one set for the label and each channel
        label_patch = read_at(label, coordinates, self.patch_shape, order=0).astype(np.float32)
        channels = [image[..., c] for c in range(image.shape[-1])] if image.ndim == label.ndim + 1 else [image]
        image_patch = np.stack([read_at(channel, coordinates, self.patch_shape, order=1)
                                for channel in channels], axis=-1).astype(np.float32, copy=False)
        return image_patch, label_patch[..., np.newaxis]

    def _load(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.load_case(case_id)
        image, label = np.asarray(image), np.asarray(label)
        if image.ndim not in (3, 4) or label.ndim != 3:
            raise ChannelError(
                f"case {case_id!r}: image {image.shape} must be (X, Y, Z) or (X, Y, Z, C) and label {label.shape} "
                "(X, Y, Z); select one channel before sampling patches."
            )
        if image.shape[:3] != label.shape:
            raise GeometryMismatchError(
                f"case {case_id!r}: image shape {image.shape} differs from label shape {label.shape}; "
                "resample the label onto the image grid."
            )
        return image, label

    def _pop_random(self, buffer: list[Sample], rng: np.random.Generator) -> Sample:
        slot = int(rng.integers(len(buffer)))
        buffer[slot], buffer[-1] = buffer[-1], buffer[slot]
        sample = buffer.pop()
        self._track(len(buffer))
        return sample

    def _track(self, length: int) -> None:
        self._length = length
        self.peak_length = max(self.peak_length, length)


def patch_stream(
    load_case: CaseLoader,
    case_ids: Sequence[str],
    patch_shape: Sequence[int],
    samples_per_volume: int = 8,
    queue_length: int = 64,
    foreground_fraction: float = 0.33,
    seed: int = 0,
    spatial: str = "none",
) -> Iterator[Sample]:
    """Endless generator of 3D (image, label) patches; see `PatchQueue` for the arguments.

    Yields:
        (image_patch, label_patch), float32, each patch_shape + (1,).
    """
    yield from PatchQueue(
        load_case, case_ids, patch_shape, samples_per_volume, queue_length, foreground_fraction, seed, spatial
    )


def slice_stream(
    load_case: CaseLoader,
    case_ids: Sequence[str],
    slice_shape: Sequence[int],
    samples_per_volume: int = 8,
    queue_length: int = 64,
    foreground_fraction: float = 0.33,
    seed: int = 0,
    spatial: str = "none",
) -> Iterator[Sample]:
    """Endless generator of 2D axial (image, label) slices for a 2D U-Net.

    A slice is a (H, W, 1) patch along z: `foreground_fraction` of the slices contain
    foreground. Pass `slice_shape = volume.shape[:2]` for whole slices (then only the z of the
    centre matters); a smaller (H, W) gives in-plane crops, a larger one zero-padded slices.

    Args:
        slice_shape: (H, W), voxels. The other arguments are `PatchQueue`'s.

    Yields:
        (image_slice, label_slice), float32, each (H, W, 1).
    """
    height, width = check_shape(slice_shape, "slice_shape", ndim=2)
    for image, label in patch_stream(
        load_case, case_ids, (height, width, 1), samples_per_volume, queue_length,
        foreground_fraction, seed, spatial,
    ):
        yield image[:, :, 0, :], label[:, :, 0, :]


def make_tf_dataset(
    stream_factory: Callable[[], Iterator[Sample]],
    sample_shape: Sequence[int],
    batch_size: int,
    augment: bool | str | Augmentation = False,
    seed: int = 0,
    flip_axes: Sequence[int] | None = None,
    image_channels: int = 1,
) -> tf.data.Dataset:
    """Wrap a sample stream as a batched, prefetched `tf.data.Dataset`.

    Args:
        stream_factory: zero-argument callable returning a fresh iterator of (image, label)
            float32 pairs of `sample_shape`, e.g.
            `lambda: slice_stream(load_case, ids, (128, 128))`. Called each time the dataset is
            iterated.
        sample_shape: shape of one image (= one label), channels-last: (H, W, 1) for slices,
            (px, py, pz, 1) for patches.
        batch_size: samples per batch, >= 1. A finite stream's last incomplete batch is
            dropped, so the batch dimension is static.
        augment: apply augmentation per sample, in TF: each spatial axis flipped with
            probability 0.5 (image and label together), and the image only changed in
            intensity: True or `jitter`, scaled by a factor in [0.9, 1.1] and shifted by
            [-0.1, 0.1]; `nnunet`, nnU-Net's intensity transforms (`medseg.patching.intensity`);
            an `Augmentation`, its `intensity` (its `spatial` part is the stream's). Default False.
        seed: seeds the augmentation; the same seed and stream give the same batches.
        flip_axes: the spatial axes that augmentation may flip (None: all). Axes beyond the
            sample's (axis 2 of a 2D slice) are ignored. Leave out the left-right axis (0 in
            canonical RAS) when classes are lateralized (`medseg.imaging.laterality`).
        image_channels: the image's channels (the label has one): more than 1 for a
            cascade's image and context probabilities. The intensity jitter applies to the
            first channel only.

    Returns:
        A dataset of (images, labels), float32 tensors (batch_size, *sample_shape), the images
        with `image_channels` channels.
    """
    import tensorflow as tf

    if not callable(stream_factory):
        raise ConfigurationError(
            "stream_factory is not callable: pass a function returning a new iterator, "
            "e.g. lambda: patch_stream(...)."
        )
    sample_shape = check_shape(sample_shape, "sample_shape")
    if len(sample_shape) < 2:
        raise ConfigurationError(
            f"sample_shape={sample_shape!r} needs spatial axes and a trailing channel axis, e.g. (128, 128, 1)."
        )
    batch_size = check_positive_int(batch_size, "batch_size")
    spec = tf.TensorSpec(shape=sample_shape, dtype=tf.float32)
    image_spec = tf.TensorSpec(shape=(*sample_shape[:-1], check_positive_int(image_channels, "image_channels")), dtype=tf.float32)
    dataset = tf.data.Dataset.from_generator(stream_factory, output_signature=(image_spec, spec))
    if augment:
        intensity = augment.intensity if isinstance(augment, Augmentation) else "jitter" if augment is True else str(augment)
        if intensity not in INTENSITY_AUGMENTATIONS:
            raise ConfigurationError(
                f"Unknown intensity augmentation {augment!r} (`<model>.training.intensity_augmentation`). "
                f"Set it to one of: {', '.join(INTENSITY_AUGMENTATIONS)}."
            )
        augment_sample = _make_augmentation(len(sample_shape) - 1, int(seed), flip_axes, intensity)
        dataset = dataset.enumerate().map(augment_sample, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    # On a small CPU the autotuner's extra threads fight the training step for cores, and
    # epochs take longer, on and off. One private thread and no autotuning keep them steady.
    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.private_threadpool_size = 1
    return dataset.with_options(options)


def _make_augmentation(
    spatial_axes: int, seed: int, flip_axes: Sequence[int] | None = None, intensity: str = "jitter"
) -> Callable:
    """Build the per-sample map of `make_tf_dataset`: flips on both tensors, intensity on the
    image: `jitter` (a scale and a shift) or `nnunet` (`medseg.patching.intensity`).

    Randomness is stateless, seeded by (seed, sample index), so it is reproducible even with
    parallel map calls.
    """
    import tensorflow as tf

    from medseg.patching.intensity import nnunet_intensity

    flipped = set(range(spatial_axes)) if flip_axes is None else {int(a) for a in flip_axes}

    def augment_sample(index: tf.Tensor, sample: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = sample
        draws = tf.random.stateless_uniform(
            [spatial_axes + 2], seed=tf.stack([tf.constant(seed, tf.int64), index])
        )
        for axis in range(spatial_axes):
            if axis not in flipped:
                continue  # the draw is still made: other axes keep their draws
            flip = draws[axis] < FLIP_PROBABILITY
            image = tf.where(flip, tf.reverse(image, [axis]), image)
            label = tf.where(flip, tf.reverse(label, [axis]), label)
        if intensity == "nnunet":
            changed = nnunet_intensity(image[..., :1], tf.stack([tf.constant(seed, tf.int64), index + NNUNET_SEED_OFFSET]))
        else:
            scale = 1.0 + INTENSITY_SCALE_RANGE * (2.0 * draws[spatial_axes] - 1.0)
            shift = INTENSITY_SHIFT_RANGE * (2.0 * draws[spatial_axes + 1] - 1.0)
            changed = image[..., :1] * scale + shift
        if image.shape[-1] == 1:
            return changed, label
        return tf.concat([changed, image[..., 1:]], axis=-1), label  # context kept as is

    return augment_sample


def _sample_at(image: np.ndarray, label: np.ndarray, center: np.ndarray, patch_shape: tuple[int, ...]) -> Sample:
    """The (image, label) patch pair at `center`, float32 with a trailing channel axis (an
    image's own channels, when it has them: a cascade's image and context)."""
    label_patch = extract_patch(label, center, patch_shape).astype(np.float32, copy=False)
    if image.ndim == label.ndim + 1:
        channels = [extract_patch(image[..., c], center, patch_shape) for c in range(image.shape[-1])]
        return np.stack(channels, axis=-1).astype(np.float32, copy=False), label_patch[..., np.newaxis]
    image_patch = extract_patch(image, center, patch_shape).astype(np.float32, copy=False)
    return image_patch[..., np.newaxis], label_patch[..., np.newaxis]


def _inside_center_range(
    volume_shape: tuple[int, ...], patch_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis inclusive [low, high] of centres whose patch lies inside the volume.

    On an axis where the patch is longer than the volume no centre fits; any voxel is allowed.
    """
    size, patch = np.asarray(volume_shape), np.asarray(patch_shape)
    low, high = patch // 2, size - patch + patch // 2
    too_long = patch > size
    return np.where(too_long, 0, low), np.where(too_long, size - 1, high)


def _check_center(center: Sequence[int], volume_shape: tuple[int, ...]) -> tuple[int, ...]:
    try:
        index = tuple(int(c) for c in center)
    except (TypeError, ValueError):
        index = ()
    if len(index) != len(volume_shape) or any(not 0 <= c < s for c, s in zip(index, volume_shape)):
        raise ConfigurationError(
            f"center={center!r} is not a voxel of a volume of shape {volume_shape}: "
            f"pass {len(volume_shape)} indices with 0 <= center[i] < shape[i]."
        )
    return index
