"""The U-Net design, written once for 2D and 3D.

`build_unet2d` (medseg.models.unet2d) and `build_unet3d` (medseg.models.conv3d) are thin
wrappers that name their own parameters in error messages; the architecture is here:

    encoder stage i (i = 0 .. depth-1): conv_block(base·2^i) → MaxPool 2
    bottleneck:                          conv_block(base·2^depth)
    decoder stage i (i = depth-1 .. 0):  ConvTranspose(base·2^i, 2, stride 2)
                                         → Concatenate with encoder stage i → conv_block(base·2^i)
    head:                                Conv 1: 1 filter + sigmoid (binary, n_classes = 1)
                                         or K + 1 filters + softmax (K = n_classes > 1)

The binary head is the original U-Net's, so binary models keep their parameter count
(1,930,657 for the default 2D U-Net). The 3D U-Net's convolutions before batch normalization
have no bias: the normalization subtracts each channel's mean, so such a bias changes no output
and its gradient is zero but for rounding. The 2D U-Net keeps it for the seed's parameter count,
where it costs nothing (TensorFlow folds its gradient into the filter's, `Conv2DBackpropFilterWithBias`);
in 3D it has no such kernel, and the bias's own gradient (`BiasAddGrad`) took 7 % of a bfloat16
training step (64³, batch 4, AMD EPYC with `avx512_bf16`). Its transposed convolutions have
no bias either: their output is concatenated and convolved (without bias) before the
normalization, so a bias there adds a constant to each normalized channel but where the
convolution's window overlaps the volume's edge, and its gradient (a reduction over every
full-resolution voxel) and its addition took 18 ms of a 500 ms step. The 3D blocks'
convolutions are `NarrowConv3D` (medseg.models.convolution): Keras's Conv3D, whose kernel
gradient in a layer narrowing to fewer than 16 channels takes the way that oneDNN runs twice as
fast. The multi-class head gives channel 0 to the background and channel k to foreground class
k, the layout nnU-Net and MONAI use; its channels sum to 1 at every voxel.

All convolutions use "same" padding, so the output has the input's spatial shape as long
as every spatial size is divisible by 2^depth (each pooling halves it, each transposed
convolution doubles it; an odd size would lose a row and the skip concatenation fails).
"""

from __future__ import annotations

from numbers import Integral
from typing import Sequence

import keras
from keras import layers

from medseg.errors import ConfigurationError
from medseg.models.convolution import NarrowConv3D
from medseg.models.normalization import FusedBatchNormalization

# Layer classes per number of spatial dimensions.
_CONV = {2: layers.Conv2D, 3: layers.Conv3D}
# The blocks' convolutions: in 3D, one whose kernel gradient takes oneDNN's faster way (medseg.models.convolution).
_BLOCK_CONV = {2: layers.Conv2D, 3: NarrowConv3D}
_POOL = {2: layers.MaxPooling2D, 3: layers.MaxPooling3D}
_UP = {2: layers.Conv2DTranspose, 3: layers.Conv3DTranspose}


def _spatial_rank(x) -> int:
    """Number of spatial axes of a channels-last tensor (B, *spatial, C): 2 or 3."""
    rank = len(x.shape) - 2
    if rank not in _CONV:
        raise ConfigurationError(
            f"A U-Net block needs a (B, H, W, C) or (B, X, Y, Z, C) tensor, got shape "
            f"{tuple(x.shape)}. Give the model a 2D slice or 3D patch shape plus channels."
        )
    return rank


def is_positive_int(value) -> bool:
    """True for a positive integer, numpy integers included; False for bools and floats."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value > 0


def conv_block(x, filters: int, name: str, use_bias: bool = True):
    """(Conv 3 'same' → BatchNormalization → ReLU) × 2, in 2D or 3D after `x`'s rank.

    Args:
        x: channels-last Keras tensor, (B, H, W, C) or (B, X, Y, Z, C).
        filters: output channels of both convolutions.
        name: prefix of the layer names (`{name}_conv1`, `{name}_bn1`, `{name}_relu1`, ...),
            unique within the model.
        use_bias: whether the convolutions have a bias (redundant before the normalization;
            see the module docstring for why the 2D U-Net keeps it).

    Returns:
        Tensor with `x`'s spatial shape and `filters` channels.
    """
    conv = _BLOCK_CONV[_spatial_rank(x)]
    for i in (1, 2):
        x = conv(filters, 3, padding="same", use_bias=use_bias, name=f"{name}_conv{i}")(x)
        # momentum 0.9 (Keras: 0.99): the moving statistics used at inference then settle
        # within the few hundred steps that a CPU training run affords.
        # Keras's batch normalization, fused in mixed-precision training (medseg.models.normalization).
        x = FusedBatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


# Labels are stored as uint8, so a dataset has at most 255 foreground classes.
MAX_FOREGROUND_CLASSES = 255


def validate_n_classes(n_classes: int) -> int:
    """Check the number of foreground classes and return it as an int.

    Args:
        n_classes: foreground classes (background excluded), 1 to 255; 1 means binary.

    Raises:
        ConfigurationError: not an integer in [1, 255].
    """
    if not is_positive_int(n_classes) or n_classes > MAX_FOREGROUND_CLASSES:
        raise ConfigurationError(
            f"`n_classes` (the foreground classes, from the `labels` of dataset.json) must be an "
            f"integer from 1 (binary) to {MAX_FOREGROUND_CLASSES}, got {n_classes!r}. Check that "
            f"dataset.json lists the background as 0 and each foreground class once."
        )
    return int(n_classes)


def validate_unet_shape(
    input_shape: Sequence[int],
    depth: int,
    base_filters: int,
    spatial_rank: int,
    shape_parameter: str,
    model_parameter_root: str,
) -> tuple[int, ...]:
    """Check a U-Net input shape and size, and return the shape as a tuple of ints.

    Args:
        input_shape: (*spatial, channels), e.g. (128, 128, 1) or (32, 32, 32, 1).
        depth: number of pooling stages, at least 1.
        base_filters: filters of the first stage, at least 1.
        spatial_rank: 2 or 3.
        shape_parameter: parameter name to blame for a bad shape, e.g. `unet.model.input_size`.
        model_parameter_root: prefix for `depth` and `base_filters`, e.g. `unet.model`.

    Raises:
        ConfigurationError: wrong number of axes, a non-positive size, `depth` or
            `base_filters` < 1, or a spatial size not divisible by 2**depth.
    """
    if not is_positive_int(depth):
        raise ConfigurationError(
            f"`{model_parameter_root}.depth` must be an integer >= 1, got {depth!r}."
        )
    if not is_positive_int(base_filters):
        raise ConfigurationError(
            f"`{model_parameter_root}.base_filters` must be an integer >= 1, got {base_filters!r}."
        )
    shape = tuple(input_shape)
    if len(shape) != spatial_rank + 1 or not all(is_positive_int(s) for s in shape):
        raise ConfigurationError(
            f"`{shape_parameter}` gives input shape {shape}; expected {spatial_rank} positive "
            f"spatial sizes plus a channel count, e.g. {(32,) * spatial_rank + (1,)}."
        )
    factor = 2**depth
    spatial = shape[:-1]
    if any(s % factor for s in spatial):
        suggestion = tuple(max(factor, round(s / factor) * factor) for s in spatial)
        raise ConfigurationError(
            f"`{shape_parameter}` = {spatial} is not divisible by 2**depth = {factor} "
            f"(depth={depth}), so the skip connections would not line up. Use a size "
            f"divisible by {factor}, e.g. {suggestion}, or lower `{model_parameter_root}.depth`."
        )
    return tuple(int(s) for s in shape)


def build_unet(
    input_shape: tuple[int, ...],
    base_filters: int,
    depth: int,
    name: str,
    n_classes: int = 1,
    pool_sizes: Sequence[Sequence[int]] | None = None,
) -> keras.Model:
    """Build an (unvalidated) U-Net; call `validate_unet_shape` and `validate_n_classes` first.

    Args:
        input_shape: (*spatial, channels) with 2 or 3 spatial axes, each divisible by 2**depth.
        base_filters: filters of the first encoder stage; stage i has base_filters·2^i.
        depth: number of pooling stages.
        name: model name.
        n_classes: foreground classes K. 1 (default): one sigmoid channel, the original
            U-Net. K > 1: K + 1 softmax channels, channel 0 the background.
        pool_sizes: per stage, the pooling factor of each axis (1 or 2), e.g.
            [(2, 2, 1), (2, 2, 2)] to keep a thick-slice axis until the others coarsen
            (`medseg.kinds.sizes.poolings_per_axis`); None: 2 on every axis. The upsampling
            mirrors it.

    Returns:
        Uncompiled model mapping (B, *spatial, C) to probabilities (B, *spatial, 1) when
        binary, or (B, *spatial, K + 1) summing to 1 over the last axis when multi-class.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    rank = len(input_shape) - 1
    x = inputs
    bias = rank == 2  # the 2D U-Net's biases for the seed's parameter count (module docstring)
    skips = []
    pools = [tuple(int(p) for p in stage) for stage in pool_sizes] if pool_sizes is not None else [(2,) * rank] * depth
    for i in range(depth):
        x = conv_block(x, base_filters * 2**i, name=f"enc{i}", use_bias=bias)
        skips.append(x)
        x = _POOL[rank](pool_size=pools[i], name=f"enc{i}_pool")(x)
    x = conv_block(x, base_filters * 2**depth, name="bottleneck", use_bias=bias)
    for i in reversed(range(depth)):
        filters = base_filters * 2**i
        x = _UP[rank](filters, pools[i], strides=pools[i], padding="same", use_bias=bias, name=f"dec{i}_up")(x)
        x = layers.Concatenate(name=f"dec{i}_concat")([x, skips[i]])
        x = conv_block(x, filters, name=f"dec{i}", use_bias=bias)
    # float32 head: under a mixed-precision policy the probabilities (and the losses
    # computed on them) would otherwise be float16 and lose small Dice differences.
    if n_classes == 1:
        head = _CONV[rank](1, 1, activation="sigmoid", dtype="float32", name="mask")
    else:
        # Same layer name as the binary head, so code that looks the output up by name
        # works for both.
        head = _CONV[rank](n_classes + 1, 1, activation="softmax", dtype="float32", name="mask")
    outputs = head(x)
    return keras.Model(inputs, outputs, name=name)


def with_input_shape(model: keras.Model, input_shape: Sequence[int]) -> keras.Model:
    """The same fully convolutional model, weights shared by copy, for another input size."""
    clone = keras.models.clone_model(model, input_tensors=keras.Input(tuple(input_shape)))
    clone.set_weights(model.get_weights())
    return clone
