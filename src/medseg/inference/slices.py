"""Whole-volume inference of a 2D model, one axial slice per window.

A 2D U-Net is fully convolutional, so it predicts whole slices of any size: each slice is one
window of `medseg.patching.sliding_window.sliding_window_predict`, padded up to a multiple of
2**depth, with no overlap and constant weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from typing import TYPE_CHECKING

import numpy as np

from medseg.inference.engines import ONNXRUNTIME, OnnxNetwork
from medseg.patching.sliding_window import sliding_window_predict, unet_features_per_voxel, windows_per_batch

if TYPE_CHECKING:
    import keras

PredictSlices = Callable[[np.ndarray], np.ndarray]


def slice_predictor(model: keras.Model | OnnxNetwork) -> PredictSlices:
    """A 2D model as `predict_batch` for `sliding_window_predict` with axial-slice windows.

    The forward pass is traced once (`tf.function` with a (None, None, None, 1) signature), for
    every batch size and slice size, rather than called eagerly: an eager Keras call keeps every
    layer's output alive until it returns, where the traced graph frees each one when its last
    consumer has run, so a batch of slices needs several times less memory (the budget of
    `medseg.patching.sliding_window.ACTIVATION_BYTES_PER_FEATURE` assumes a traced call). The
    traced graph runs the same layers on the same inputs as the eager call.

    An ONNX network (`medseg.inference.engines.OnnxNetwork`) runs its own graph, which takes
    any H and W too.

    Args:
        model: maps (B, H, W, 1) to (B, H, W, C) probabilities for any H and W (see
            `medseg.models.with_input_shape(model, (None, None, 1))`); C is 1 (sigmoid) or
            K + 1 (softmax).

    Returns:
        A callable mapping windows (B, H, W, 1, 1) to probabilities (B, H, W, 1, C).
    """
    if getattr(model, "engine", None) == ONNXRUNTIME:
        return lambda windows: model.predict_on_batch(windows[:, :, :, 0, :])[:, :, :, None, :]
    import tensorflow as tf

    forward = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec((None, None, None, 1), tf.float32)],
    )

    def predict(windows: np.ndarray) -> np.ndarray:
        return forward(windows[:, :, :, 0, :]).numpy()[:, :, :, None, :]

    return predict


def axial_window(slice_shape: Sequence[int], multiple: int) -> tuple[int, int, int]:
    """The window of whole-slice inference: one axial slice, padded up to a multiple.

    Args:
        slice_shape: (X, Y) of the volume, voxels.
        multiple: 2**depth of the U-Net, so that every pooling halves an even size.

    Returns:
        (X', Y', 1) with X' and Y' the smallest multiples of `multiple` >= X and Y.
    """
    nx, ny = (int(n) for n in slice_shape[:2])
    return (int(math.ceil(nx / multiple) * multiple), int(math.ceil(ny / multiple) * multiple), 1)


def slices_per_batch(
    slice_shape: Sequence[int],
    multiple: int,
    base_filters: int,
    depth: int,
    memory_gb: float,
    n_slices: int | None = None,
) -> int:
    """Whole axial slices per forward pass of a 2D U-Net, from a memory budget.

    `windows_per_batch` of the padded slice `axial_window(slice_shape, multiple)` with the
    U-Net's width `unet_features_per_voxel(base_filters, depth, 2)`: the batch shrinks as the
    slices grow, so a CT scan's 512×512 slices and a phantom's 96×96 ones cost the same memory.

    Args:
        slice_shape: (X, Y) of the volume, voxels.
        multiple: 2**depth.
        base_filters, depth: the U-Net's (`unet.model.*`).
        memory_gb: the budget for the forward pass, GiB (`planning.memory_gb`).
        n_slices: the volume's slices (Z), if known: the batch never exceeds it.

    Returns:
        Slices per batch, >= 1. 1 GiB, 32 filters, depth 3: 4 slices of 512×512 (240 MiB
        each), 121 of 96×96 (at most Z).
    """
    width = unet_features_per_voxel(base_filters, depth, 2)
    return windows_per_batch(axial_window(slice_shape, multiple), width, memory_gb, n_slices)


def predict_axial_slices(
    model: keras.Model | OnnxNetwork | PredictSlices, volume: np.ndarray, multiple: int, batch_size: int
) -> np.ndarray:
    """Foreground probabilities of a whole volume from a 2D model, slice by slice along Z.

    Whole slices are predicted at once (the model is fully convolutional): each slice is
    zero-padded at its end to a multiple of `multiple` (2**depth) and cropped back, so no
    in-plane context is lost to tiling. It is `sliding_window_predict` with one window per
    slice, `axial_window(...)`, no overlap and constant weights, so each voxel's probability is
    the model's output, unblended: the result does not depend on `batch_size`.

    Memory: the volume, the output, and one batch of slices through the model (choose
    `batch_size` with `slices_per_batch`); no padded copy of the volume.

    Args:
        model: a 2D model mapping (B, H, W, 1) to (B, H, W, 1) probabilities for any H and W
            (see `medseg.models.with_input_shape(model, (None, None, 1))`), its ONNX network, or
            `slice_predictor(model)`; pass the latter to trace the model once for several
            volumes.
        volume: (X, Y, Z) float32, preprocessed.
        multiple: the padded in-plane size is a multiple of this.
        batch_size: slices per forward pass, >= 1.

    Returns:
        (X, Y, Z) float32 foreground probabilities, or (X, Y, Z, K + 1) class probabilities
        for a multi-class model.
    """
    predict = slice_predictor(model) if hasattr(model, "predict_on_batch") else model
    return sliding_window_predict(
        volume,
        predict,
        axial_window(volume.shape, multiple),
        overlap=0.0,
        batch_size=batch_size,
        weighting="constant",
        padding="end",
    )
