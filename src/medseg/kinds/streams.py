"""Training streams of the model kinds: batched `tf.data` datasets of sampled slices or
patches, read from the preprocessed cases on demand."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from medseg.imaging.io import Volume
from medseg.kinds.plans import SamplingSettings
from medseg.patching import Augmentation, make_tf_dataset


def case_loader(
    primary_images: Mapping[str, Callable[[], Volume]], primary_labels: Mapping[str, Callable[[], Volume]]
) -> Callable[[str], tuple[np.ndarray, np.ndarray]]:
    """`load_case(case_id) -> (image, label)` arrays of a preprocessed case, read on demand."""

    def load_case(case_id: str) -> tuple[np.ndarray, np.ndarray]:
        return primary_images[case_id]().data, primary_labels[case_id]().data

    return load_case


def sampled_dataset(
    stream_fn: Callable,
    load_case: Callable[[str], tuple[np.ndarray, np.ndarray]],
    shape: tuple[int, ...],
    sample_shape: tuple[int, ...],
    sampling: Mapping[str, Any] | SamplingSettings,
    case_ids: list[str],
    seed: int,
    augment: bool | str | Augmentation,
    flip_axes: tuple[int, ...] | None = None,
    *,
    batch_size: int,
    image_channels: int = 1,
):
    """A batched `tf.data` dataset over `stream_fn` (`slice_stream` or `patch_stream`), with a
    kind's `sampling` parameters (`samples_per_volume`, `queue_length`, `foreground_fraction`).

    The arguments from `case_ids` on are those of a `make_stream` (see
    `medseg.kinds.ModelKind.sample_stream`); `batch_size` is the global batch (samples per
    step across all replicas), not `training.batch_size`. An `Augmentation`'s spatial part
    goes to the stream, where patches are cut; the flips and intensities to `make_tf_dataset`.
    """
    sampling = SamplingSettings.of(sampling)
    spatial = augment.spatial if isinstance(augment, Augmentation) else "none"
    factory = lambda: stream_fn(  # noqa: E731
        load_case,
        case_ids,
        shape,
        samples_per_volume=sampling.samples_per_volume,
        queue_length=sampling.queue_length,
        foreground_fraction=sampling.foreground_fraction,
        seed=seed,
        spatial=spatial,
    )
    return make_tf_dataset(
        factory, sample_shape, batch_size, augment=augment, seed=seed, flip_axes=flip_axes, image_channels=image_channels
    )
