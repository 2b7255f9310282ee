"""2D U-Net for axial slices.

With the defaults (128×128 single-channel slices, 32 base filters, depth 3) the model has
exactly 1,930,657 parameters, the size of the reference U-Net this project reproduces.
A multi-class head (`n_classes` > 1) adds 33·K parameters: K more 1×1 filters over 32
channels, plus their biases.
"""

from __future__ import annotations

from typing import Sequence

import keras

from medseg.models.unet import build_unet, conv_block, validate_n_classes, validate_unet_shape

__all__ = ["build_unet2d", "conv_block"]


def build_unet2d(
    input_shape: Sequence[int] = (128, 128, 1),
    base_filters: int = 32,
    depth: int = 3,
    n_classes: int = 1,
) -> keras.Model:
    """Build an uncompiled 2D U-Net (see `medseg.models.unet` for the layer layout).

    Args:
        input_shape: (H, W, C) of one slice, channels-last. H and W must be divisible by
            2**depth (8 with the default depth), because every pooling halves them.
        base_filters: filters of the first stage; doubled at each of the `depth` stages,
            so the bottleneck has base_filters·2**depth (256 by default).
        depth: number of pooling stages.
        n_classes: foreground classes K (background excluded). 1 (default) keeps the
            original binary head: one sigmoid channel. K > 1 gives K + 1 softmax channels,
            channel 0 the background and channel k class k.

    Returns:
        Model mapping (B, H, W, C) float32 images to (B, H, W, 1) foreground probabilities
        (binary) or (B, H, W, K + 1) class probabilities summing to 1 (multi-class). The
        head is float32 under any mixed-precision policy.

    Raises:
        ConfigurationError: H or W not divisible by 2**depth (names `unet.model.input_size`),
            a bad `unet.model.depth` / `unet.model.base_filters`, or `n_classes` not in 1..255.
    """
    shape = validate_unet_shape(
        input_shape,
        depth=depth,
        base_filters=base_filters,
        spatial_rank=2,
        shape_parameter="unet.model.input_size",
        model_parameter_root="unet.model",
    )
    return build_unet(
        shape, base_filters=base_filters, depth=depth, name="unet2d", n_classes=validate_n_classes(n_classes)
    )
