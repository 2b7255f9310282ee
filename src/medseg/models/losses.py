"""Soft Dice and IoU for Keras training: metrics, losses and the loss registry.

These are the *training* versions: soft (on probabilities, no threshold), smoothed, and
pooled over the whole batch. Per-case evaluation on hard masks lives in
`medseg.evaluation`, where both-empty cases are NaN instead of 1.

Every function takes `y_true` and `y_pred` of the same shape, e.g. (B, H, W, 1) for the
2D U-Net or (B, X, Y, Z, 1) for the 3D model, with `y_pred` holding probabilities in [0, 1].
They return a scalar tensor. `y_true` may be any numeric dtype (uint8 labels are the norm
here); it is cast to `y_pred`'s dtype so mixed precision and uint8 masks both work.

All public callables are registered under the Keras package "medseg", so a model saved
with them reloads with `keras.models.load_model(path, safe_mode=True)` and no
`custom_objects` (kedro-datasets' TensorFlowModelDataset loads that way).
"""

from __future__ import annotations

from typing import Any, Callable

import keras
from keras import ops

from medseg.errors import ConfigurationError

DEFAULT_SMOOTH = 1.0

# (y_true, y_pred) -> scalar tensor; tensors of any backend type.
LossFunction = Callable[[Any, Any], Any]


def _flatten_pair(y_true, y_pred):
    """Cast `y_true` to `y_pred`'s dtype and flatten both to 1-D (whole batch pooled)."""
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(y_true, y_pred.dtype)
    return ops.reshape(y_true, (-1,)), ops.reshape(y_pred, (-1,))


@keras.saving.register_keras_serializable(package="medseg")
def dice_coefficient(y_true, y_pred, smooth: float = DEFAULT_SMOOTH):
    """Soft Dice over the whole batch: (2·Σ t·p + s) / (Σ t + Σ p + s).

    Args:
        y_true: reference mask, any shape, values in {0, 1} (any numeric dtype).
        y_pred: probabilities, same shape as `y_true`.
        smooth: added to numerator and denominator. With `smooth > 0` two empty masks
            score 1 (nothing to find, nothing found) and the gradient stays finite; an
            empty reference against a non-empty prediction scores s / (Σ p + s), close
            to 0. With `smooth = 0` both-empty gives 0/0 = NaN.

    Returns:
        Scalar tensor in [0, 1]. The batch is pooled, not averaged per sample, so small
        structures in one image are not drowned out by empty slices in others.
    """
    t, p = _flatten_pair(y_true, y_pred)
    intersection = ops.sum(t * p)
    return (2.0 * intersection + smooth) / (ops.sum(t) + ops.sum(p) + smooth)


@keras.saving.register_keras_serializable(package="medseg")
def iou_coefficient(y_true, y_pred, smooth: float = DEFAULT_SMOOTH):
    """Soft IoU (Jaccard) over the whole batch: (Σ t·p + s) / (Σ t + Σ p − Σ t·p + s).

    Args:
        y_true: reference mask, any shape, values in {0, 1} (any numeric dtype).
        y_pred: probabilities, same shape as `y_true`.
        smooth: as in `dice_coefficient`: both-empty scores 1 with `smooth > 0`,
            NaN with `smooth = 0`.

    Returns:
        Scalar tensor in [0, 1].
    """
    t, p = _flatten_pair(y_true, y_pred)
    intersection = ops.sum(t * p)
    union = ops.sum(t) + ops.sum(p) - intersection
    return (intersection + smooth) / (union + smooth)


# Keras names a function metric after `fn.__name__`, and the history keys follow
# ("dice", "val_dice"). These two thin wrappers exist only to carry those names; the
# formula stays in one place above.
@keras.saving.register_keras_serializable(package="medseg")
def dice(y_true, y_pred):
    """Keras metric `dice`: `dice_coefficient` with the default smoothing (scalar)."""
    return dice_coefficient(y_true, y_pred)


@keras.saving.register_keras_serializable(package="medseg")
def iou(y_true, y_pred):
    """Keras metric `iou`: `iou_coefficient` with the default smoothing (scalar)."""
    return iou_coefficient(y_true, y_pred)


@keras.saving.register_keras_serializable(package="medseg")
def dice_loss(y_true, y_pred):
    """1 − soft Dice (default smoothing), a scalar in [0, 1].

    An empty reference with an empty prediction costs 0, so empty slices do not push the
    model to predict foreground.
    """
    return 1.0 - dice_coefficient(y_true, y_pred)


@keras.saving.register_keras_serializable(package="medseg")
def binary_crossentropy_mean(y_true, y_pred):
    """Binary cross-entropy averaged over every element of the batch (scalar).

    `y_pred` is clipped to [ε, 1 − ε] (Keras' epsilon, 1e-7) before the log, so a
    confident wrong voxel costs about 16.1, not infinity.
    """
    t, p = _flatten_pair(y_true, y_pred)
    return ops.mean(ops.binary_crossentropy(t, p, from_logits=False))


@keras.saving.register_keras_serializable(package="medseg")
def bce_dice_loss(y_true, y_pred):
    """Mean binary cross-entropy + Dice loss (scalar).

    BCE gives a dense per-voxel gradient early in training; the Dice term keeps the small
    foreground from being ignored when background dominates.
    """
    return binary_crossentropy_mean(y_true, y_pred) + dice_loss(y_true, y_pred)


# Key: normalized parameter value. Value: (loss function, display name for run names).
_LOSSES: dict[str, tuple[LossFunction, str]] = {
    "bce": (binary_crossentropy_mean, "BCE"),
    "dice": (dice_loss, "Dice"),
    "bce+dice": (bce_dice_loss, "BCE+Dice"),
}


def _lookup_loss(name: str) -> tuple[LossFunction, str]:
    """Find a loss by its parameter value (case-insensitive, surrounding spaces ignored)."""
    key = str(name).strip().lower()
    if key not in _LOSSES:
        valid = ", ".join(repr(k) for k in _LOSSES)
        raise ConfigurationError(
            f"Unknown loss {name!r} (parameter `<model>.training.loss`). "
            f"Set it to one of: {valid}."
        )
    return _LOSSES[key]


def get_loss(name: str) -> LossFunction:
    """Return the loss function for `name`: 'bce', 'dice' or 'bce+dice' (any case).

    Raises:
        ConfigurationError: `name` is not one of those, listing the valid names.
    """
    return _lookup_loss(name)[0]


def loss_display_name(name: str) -> str:
    """Return the name used in MLflow run names: 'BCE', 'Dice' or 'BCE+Dice'.

    Raises:
        ConfigurationError: `name` is not a known loss.
    """
    return _lookup_loss(name)[1]
