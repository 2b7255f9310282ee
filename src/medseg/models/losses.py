"""Soft Dice and IoU for Keras training: metrics, losses and the loss registry.

These are the *training* versions: soft (on probabilities, no threshold), smoothed, and
pooled over the whole batch. Per-case evaluation on hard masks lives in
`medseg.evaluation`, where both-empty cases are NaN instead of 1.

Binary (one sigmoid channel): every function takes `y_true` and `y_pred` of the same
shape, e.g. (B, H, W, 1) for the 2D U-Net or (B, X, Y, Z, 1) for the 3D model, with
`y_pred` holding probabilities in [0, 1]. They return a scalar tensor. `y_true` may be any
numeric dtype (uint8 labels are the norm here); it is cast to `y_pred`'s dtype so mixed
precision and uint8 masks both work.

Multi-class (K foreground classes, K + 1 softmax channels, channel 0 the background):
`y_pred` is (B, *spatial, K + 1) and `y_true` is an integer label map (B, *spatial, 1)
(or (B, *spatial)) with values 0..K, the layout the slice and patch samplers already
produce. It is turned into one-hot inside the loss with `keras.ops.one_hot`, so a batch
never holds K + 1 target channels in memory. A one-hot `y_true` of `y_pred`'s shape is
accepted too. A label value outside 0..K has no class: its voxel adds nothing to any
class's Dice or to the cross-entropy (map dataset values to 0..K before training).
Dice and IoU are computed per class, pooled over the batch, and the headline is their mean
over the foreground classes 1..K: the background is left out, as in nnU-Net's default
(`do_bg=False`), because it would otherwise dominate the mean with values near 1.

All public callables are registered under the Keras package "medseg", so a model saved
with them reloads with `keras.models.load_model(path, safe_mode=True)` and no
`custom_objects` (kedro-datasets' TensorFlowModelDataset loads that way).
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Callable

import keras
from keras import ops

from medseg.errors import ConfigurationError
from medseg.models.unet import is_positive_int

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


# ---------------------------------------------------------------------------------------
# Multi-class: K + 1 softmax channels, integer label maps (see the module docstring).


def _one_hot_pair(y_true, y_pred):
    """Return (one-hot targets, probabilities), both (B, *spatial, K + 1) in `y_pred`'s dtype.

    `y_true` is an integer label map (B, *spatial, 1) or (B, *spatial) with values 0..K, or
    already one-hot with `y_pred`'s shape. Values outside 0..K become all-zero rows.
    """
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.convert_to_tensor(y_true)
    n_channels = y_pred.shape[-1]
    if n_channels is None or n_channels < 2:
        raise ConfigurationError(
            f"A multi-class loss or metric needs softmax predictions with K + 1 >= 2 channels, "
            f"got shape {tuple(y_pred.shape)}. Build the model with n_classes > 1, "
            f"or use the binary losses ('bce', 'dice', 'bce+dice') for a one-channel model."
        )
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == n_channels:
        return ops.cast(y_true, y_pred.dtype), y_pred
    if len(y_true.shape) == len(y_pred.shape):
        if y_true.shape[-1] not in (1, None):
            raise ConfigurationError(
                f"Multi-class targets must be an integer label map (B, ..., 1) with values "
                f"0..{n_channels - 1} or one-hot (B, ..., {n_channels}); got shape "
                f"{tuple(y_true.shape)} against predictions {tuple(y_pred.shape)}."
            )
        y_true = ops.squeeze(y_true, axis=-1)
    labels = ops.cast(y_true, "int32")
    return ops.one_hot(labels, n_channels, dtype=y_pred.dtype), y_pred


def _per_class_sums(y_true, y_pred):
    """Σ t·p, Σ t and Σ p per channel over the batch and all voxels: three (K + 1,) tensors."""
    t, p = _one_hot_pair(y_true, y_pred)
    axes = tuple(range(len(p.shape) - 1))
    return ops.sum(t * p, axis=axes), ops.sum(t, axis=axes), ops.sum(p, axis=axes)


def per_class_dice(y_true, y_pred, smooth: float = DEFAULT_SMOOTH):
    """Soft Dice of every channel, background included, pooled over the batch.

    Args:
        y_true: integer label map (B, *spatial, 1) with values 0..K, or one-hot
            (B, *spatial, K + 1).
        y_pred: softmax probabilities (B, *spatial, K + 1).
        smooth: as in `dice_coefficient`: a class absent from both the reference and the
            prediction scores 1 with `smooth > 0`, NaN with `smooth = 0`.

    Returns:
        Tensor (K + 1,): entry k is (2·Σ t_k·p_k + s) / (Σ t_k + Σ p_k + s); entry 0 is the
        background.
    """
    intersection, n_true, n_pred = _per_class_sums(y_true, y_pred)
    return (2.0 * intersection + smooth) / (n_true + n_pred + smooth)


def per_class_iou(y_true, y_pred, smooth: float = DEFAULT_SMOOTH):
    """Soft IoU of every channel, background included, pooled over the batch.

    Args and edge cases as in `per_class_dice`.

    Returns:
        Tensor (K + 1,): entry k is (Σ t_k·p_k + s) / (Σ t_k + Σ p_k − Σ t_k·p_k + s).
    """
    intersection, n_true, n_pred = _per_class_sums(y_true, y_pred)
    return (intersection + smooth) / (n_true + n_pred - intersection + smooth)


@keras.saving.register_keras_serializable(package="medseg")
def foreground_dice(y_true, y_pred, smooth: float = DEFAULT_SMOOTH):
    """Mean soft Dice over the foreground classes 1..K (background excluded), a scalar.

    Each class's Dice is pooled over the batch first (`per_class_dice`), then the K values
    are averaged with equal weight, so a small class counts as much as a large one.
    """
    return ops.mean(per_class_dice(y_true, y_pred, smooth)[1:])


@keras.saving.register_keras_serializable(package="medseg")
def foreground_iou(y_true, y_pred, smooth: float = DEFAULT_SMOOTH):
    """Mean soft IoU over the foreground classes 1..K (background excluded), a scalar."""
    return ops.mean(per_class_iou(y_true, y_pred, smooth)[1:])


def class_dice(y_true, y_pred, class_index: int, smooth: float = DEFAULT_SMOOTH):
    """Soft Dice of channel `class_index` alone (0 is the background), a scalar."""
    return per_class_dice(y_true, y_pred, smooth)[class_index]


def class_iou(y_true, y_pred, class_index: int, smooth: float = DEFAULT_SMOOTH):
    """Soft IoU of channel `class_index` alone (0 is the background), a scalar."""
    return per_class_iou(y_true, y_pred, smooth)[class_index]


@keras.saving.register_keras_serializable(package="medseg")
def multiclass_dice_loss(y_true, y_pred):
    """1 − `foreground_dice` (default smoothing), a scalar in [0, 1].

    The background has no Dice term (nnU-Net's `do_bg=False`); the cross-entropy of
    `ce_dice_loss` still trains it.
    """
    return 1.0 - foreground_dice(y_true, y_pred)


@keras.saving.register_keras_serializable(package="medseg")
def categorical_crossentropy_mean(y_true, y_pred):
    """Categorical cross-entropy −Σ_k t_k·log p_k averaged over every voxel of the batch.

    Every channel, background included, takes part. `y_pred` is clipped to [ε, 1 − ε]
    (ε = 1e-7) before the log, so a confident wrong voxel costs about 16.1, not infinity.
    With K + 1 = 2 channels this equals the binary cross-entropy of the foreground channel.
    """
    t, p = _one_hot_pair(y_true, y_pred)
    return ops.mean(ops.categorical_crossentropy(t, p, from_logits=False, axis=-1))


@keras.saving.register_keras_serializable(package="medseg")
def ce_dice_loss(y_true, y_pred):
    """Mean categorical cross-entropy + foreground Dice loss (scalar), nnU-Net's default.

    Its minimum, 0, is a prediction equal to the one-hot reference (up to the ε clip).
    """
    return categorical_crossentropy_mean(y_true, y_pred) + multiclass_dice_loss(y_true, y_pred)


class _ClassOverlapMetric(keras.metrics.MeanMetricWrapper):
    """Soft overlap of one class, or the foreground mean, averaged over an epoch's batches.

    The value of each batch is pooled over the batch (as `dice`/`iou` are), and Keras
    averages the batch values over the epoch, like any function metric.
    """

    _class_fn: Callable[..., Any]
    _mean_fn: Callable[..., Any]

    def __init__(
        self,
        class_index: int | None = None,
        smooth: float = DEFAULT_SMOOTH,
        name: str | None = None,
        dtype=None,
    ):
        if class_index is None:
            fn, kwargs = type(self)._mean_fn, {"smooth": smooth}
        else:
            if isinstance(class_index, bool) or not isinstance(class_index, Integral) or class_index < 0:
                raise ConfigurationError(
                    f"`class_index` must be a class number 0..K (0 is the background), got "
                    f"{class_index!r}."
                )
            class_index = int(class_index)
            fn, kwargs = type(self)._class_fn, {"class_index": class_index, "smooth": smooth}
        super().__init__(fn=fn, name=name, dtype=dtype, **kwargs)
        self.class_index = class_index
        self.smooth = smooth

    def get_config(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "class_index": self.class_index, "smooth": self.smooth}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)


@keras.saving.register_keras_serializable(package="medseg")
class MulticlassDice(_ClassOverlapMetric):
    """Keras metric: soft Dice of class `class_index`, or (None) the mean over classes 1..K.

    Args:
        class_index: 1..K for one class (0, the background, is allowed but never in the
            headline); None for the foreground mean (`foreground_dice`).
        smooth: as in `dice_coefficient`.
        name: the history key, e.g. 'dice' for the mean and 'dice_1' for class 1.
    """

    _class_fn = staticmethod(class_dice)
    _mean_fn = staticmethod(foreground_dice)

    def __init__(self, class_index=None, smooth=DEFAULT_SMOOTH, name=None, dtype=None):
        if name is None:
            name = "dice" if class_index is None else f"dice_{class_index}"
        super().__init__(class_index=class_index, smooth=smooth, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="medseg")
class MulticlassIoU(_ClassOverlapMetric):
    """Keras metric: soft IoU of class `class_index`, or (None) the mean over classes 1..K.

    Args as in `MulticlassDice`; default names 'iou' and 'iou_<k>'.
    """

    _class_fn = staticmethod(class_iou)
    _mean_fn = staticmethod(foreground_iou)

    def __init__(self, class_index=None, smooth=DEFAULT_SMOOTH, name=None, dtype=None):
        if name is None:
            name = "iou" if class_index is None else f"iou_{class_index}"
        super().__init__(class_index=class_index, smooth=smooth, name=name, dtype=dtype)


def multiclass_metrics(n_classes: int) -> list[keras.metrics.Metric]:
    """The training metrics of a K-class model, as fresh Keras metric objects.

    History keys, in this order: dice, iou (the foreground means, the same headline names
    as a binary model, so curves and per-epoch logging read them alike), then dice_1, iou_1,
    ..., dice_K, iou_K. Numbering follows the model's channels, i.e. the label values
    0..K that the data pipeline maps the dataset's classes to.

    Args:
        n_classes: K, the number of foreground classes, >= 2.

    Raises:
        ConfigurationError: `n_classes` < 2 (use the binary `dice`/`iou` metrics instead).
    """
    if not is_positive_int(n_classes) or n_classes < 2:
        raise ConfigurationError(
            f"multiclass_metrics needs n_classes >= 2 foreground classes, got {n_classes!r}; "
            f"a binary model uses the `dice` and `iou` metrics."
        )
    metrics: list[keras.metrics.Metric] = [MulticlassDice(), MulticlassIoU()]
    for k in range(1, int(n_classes) + 1):
        metrics += [MulticlassDice(k), MulticlassIoU(k)]
    return metrics


# ---------------------------------------------------------------------------------------
# Loss registry.

# Key: normalized parameter value. Value: (loss function, display name for run names).
# The cross-entropy follows the head: a sigmoid head gets binary CE and a softmax head
# categorical CE, so 'bce' and 'ce' (and 'bce+dice' and 'ce+dice') name the same idea,
# and the default `bce+dice` keeps working when a dataset turns out to be multi-class. The
# display name says which loss actually ran.
_BINARY_LOSSES: dict[str, tuple[LossFunction, str]] = {
    "bce": (binary_crossentropy_mean, "BCE"),
    "dice": (dice_loss, "Dice"),
    "bce+dice": (bce_dice_loss, "BCE+Dice"),
    "ce": (binary_crossentropy_mean, "BCE"),
    "ce+dice": (bce_dice_loss, "BCE+Dice"),
}
_MULTICLASS_LOSSES: dict[str, tuple[LossFunction, str]] = {
    "ce": (categorical_crossentropy_mean, "CE"),
    "dice": (multiclass_dice_loss, "Dice"),
    "ce+dice": (ce_dice_loss, "CE+Dice"),
    "bce": (categorical_crossentropy_mean, "CE"),
    "bce+dice": (ce_dice_loss, "CE+Dice"),
}


def _lookup_loss(name: str, n_classes: int = 1) -> tuple[LossFunction, str]:
    """Find a loss by its parameter value (case-insensitive, surrounding spaces ignored)."""
    if not is_positive_int(n_classes):
        raise ConfigurationError(
            f"`n_classes` must be the number of foreground classes (>= 1), got {n_classes!r}."
        )
    table = _BINARY_LOSSES if n_classes == 1 else _MULTICLASS_LOSSES
    key = str(name).strip().lower()
    if key not in table:
        valid = ", ".join(repr(k) for k in table)
        raise ConfigurationError(
            f"Unknown loss {name!r} (parameter `<model>.training.loss`). "
            f"Set it to one of: {valid}."
        )
    return table[key]


def get_loss(name: str, n_classes: int = 1) -> LossFunction:
    """Return the loss function for `name` (any case) and the model's number of classes.

    Args:
        name: 'bce', 'dice', 'bce+dice', 'ce' or 'ce+dice'.
        n_classes: foreground classes K. 1 (default, sigmoid head): 'bce'/'ce' →
            `binary_crossentropy_mean`, 'dice' → `dice_loss`, 'bce+dice'/'ce+dice' →
            `bce_dice_loss`. K > 1 (softmax head, integer label maps): 'ce'/'bce' →
            `categorical_crossentropy_mean`, 'dice' → `multiclass_dice_loss`,
            'ce+dice'/'bce+dice' → `ce_dice_loss`.

    Raises:
        ConfigurationError: an unknown `name` (lists the valid names) or a bad `n_classes`.
    """
    return _lookup_loss(name, n_classes)[0]


def loss_display_name(name: str, n_classes: int = 1) -> str:
    """Return the name used in MLflow run names for the loss that actually runs.

    Binary (n_classes = 1): 'BCE', 'Dice' or 'BCE+Dice'. Multi-class: 'CE', 'Dice' or
    'CE+Dice' ('bce+dice' on a multi-class model trains, and is named, CE+Dice).

    Raises:
        ConfigurationError: `name` is not a known loss, or a bad `n_classes`.
    """
    return _lookup_loss(name, n_classes)[1]
