"""3D models trained on patches: a 3D U-Net for segmentation and a small patch classifier.

The U-Net is the 2D design in 3D (see `medseg.models.unet`). The classifier is a small Conv3D
block (two valid convolutions and a dense head) that says whether a patch holds foreground: a
cheap detector, scored as one.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
from keras import layers

from medseg.errors import ConfigurationError
from medseg.models.unet import build_unet, is_positive_int, validate_n_classes, validate_unet_shape

__all__ = ["build_patch_classifier", "build_unet3d"]


def build_unet3d(
    patch_shape: Sequence[int] = (32, 32, 32, 1),
    base_filters: int = 8,
    depth: int = 2,
    n_classes: int = 1,
    pool_sizes: Sequence[Sequence[int]] | None = None,
) -> keras.Model:
    """Build an uncompiled 3D U-Net for patches.

    Args:
        patch_shape: (X, Y, Z, C) of one patch, channels-last. X, Y and Z must be divisible
            by 2**depth (4 with the default depth). The small defaults (8 filters, depth 2,
            85,657 parameters) keep training on a CPU feasible.
        base_filters: filters of the first stage, doubled at each stage.
        depth: number of pooling stages.
        n_classes: foreground classes K (background excluded). 1 (default): one sigmoid
            channel, as before. K > 1: K + 1 softmax channels, channel 0 the background.
        pool_sizes: per stage, each axis's pooling factor (1 or 2), as the planner gives them
            for anisotropic data (`medseg.kinds.sizes.poolings_per_axis`); `depth` is then their
            number and each axis must be divisible by the product of its factors. None: 2 on
            every axis.

    Returns:
        Model mapping (B, X, Y, Z, C) patches to (B, X, Y, Z, 1) foreground probabilities
        (binary) or (B, X, Y, Z, K + 1) class probabilities summing to 1 (multi-class).

    Raises:
        ConfigurationError: a patch size not divisible by 2**depth (names
            `conv3d.sampling.patch_size`), a bad `conv3d.model.depth` /
            `conv3d.model.base_filters`, or `n_classes` not in 1..255.
    """
    if pool_sizes is not None:
        pool_sizes = [tuple(int(p) for p in stage) for stage in pool_sizes]
        factors = [math.prod(stage[a] for stage in pool_sizes) for a in range(3)]
        if not pool_sizes or any(len(stage) != 3 or set(stage) - {1, 2} for stage in pool_sizes) or any(
            int(size) % f for size, f in zip(patch_shape[:3], factors)
        ):
            raise ConfigurationError(
                f"conv3d poolings {pool_sizes} do not fit the patch {tuple(patch_shape[:3])}: each stage needs three "
                f"factors of 1 or 2, and each axis must be divisible by their product {factors}."
            )
        return build_unet(
            tuple(int(s) for s in patch_shape), base_filters=int(base_filters), depth=len(pool_sizes), name="unet3d",
            n_classes=validate_n_classes(n_classes), pool_sizes=pool_sizes,
        )
    shape = validate_unet_shape(
        patch_shape,
        depth=depth,
        base_filters=base_filters,
        spatial_rank=3,
        shape_parameter="conv3d.sampling.patch_size",
        model_parameter_root="conv3d.model",
    )
    return build_unet(
        shape, base_filters=base_filters, depth=depth, name="unet3d", n_classes=validate_n_classes(n_classes)
    )


def build_patch_classifier(patch_shape: Sequence[int] = (32, 32, 32, 1)) -> keras.Model:
    """Build the Conv3D patch classifier: does this patch contain foreground?

    Conv3D(16, 3, relu) → MaxPool3D(2) → Conv3D(32, 3, relu) → MaxPool3D(2) → Flatten
    → Dense(1, sigmoid). Convolutions are 'valid' (no padding), so each spatial size
    shrinks as s → (s − 2) // 2 → ((s − 2) // 2 − 2) // 2; it must stay >= 1, i.e. every
    patch size must be at least 10.

    Args:
        patch_shape: (X, Y, Z, C), channels-last.

    Returns:
        Uncompiled model mapping (B, X, Y, Z, C) to (B, 1) probabilities.

    Raises:
        ConfigurationError: a patch shape that is not 3 sizes plus channels, or a size
            below 10 (names `conv3d.sampling.patch_size`).
    """
    shape = _validate_classifier_shape(patch_shape)
    inputs = keras.Input(shape=shape, name="patch")
    x = layers.Conv3D(16, 3, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling3D(2, name="pool1")(x)
    x = layers.Conv3D(32, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling3D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="foreground")(x)
    return keras.Model(inputs, outputs, name="patch_classifier")


_MIN_CLASSIFIER_SIZE = 10


def _validate_classifier_shape(patch_shape: Sequence[int]) -> tuple[int, ...]:
    """Return `patch_shape` as ints, or raise ConfigurationError if the classifier cannot take it."""
    shape = tuple(patch_shape)
    if len(shape) != 4 or not all(is_positive_int(s) for s in shape):
        raise ConfigurationError(
            f"`conv3d.sampling.patch_size` gives patch shape {shape}; expected three positive "
            f"sizes plus a channel count, e.g. (32, 32, 32, 1)."
        )
    if min(shape[:-1]) < _MIN_CLASSIFIER_SIZE:
        raise ConfigurationError(
            f"`conv3d.sampling.patch_size` = {shape[:-1]} is too small for the patch "
            f"classifier: two valid 3×3×3 convolutions and two poolings need at least "
            f"{_MIN_CLASSIFIER_SIZE} voxels per axis. Use a larger patch, e.g. 32."
        )
    return tuple(int(s) for s in shape)
