"""Optimizers and `compile` settings for the segmentation models and the patch classifier.

Parameter values are plain strings ('adam', 'bce+dice') so they read well in
`parameters_*.yml`; the display names ('Adam', 'BCE+Dice') go into MLflow run names.
"""

from __future__ import annotations

from numbers import Real
from typing import Callable

import keras

from medseg.errors import ConfigurationError
from medseg.models.losses import dice, get_loss, iou

# Key: normalized parameter value. Value: (optimizer class, display name for run names).
_OPTIMIZERS: dict[str, tuple[Callable[..., keras.optimizers.Optimizer], str]] = {
    "adam": (keras.optimizers.Adam, "Adam"),
    "adamw": (keras.optimizers.AdamW, "AdamW"),
    "sgd": (keras.optimizers.SGD, "SGD"),
    "rmsprop": (keras.optimizers.RMSprop, "RMSprop"),
}


def _lookup_optimizer(name: str) -> tuple[Callable[..., keras.optimizers.Optimizer], str]:
    """Find an optimizer by its parameter value (case-insensitive, surrounding spaces ignored)."""
    key = str(name).strip().lower()
    if key not in _OPTIMIZERS:
        valid = ", ".join(repr(k) for k in _OPTIMIZERS)
        raise ConfigurationError(
            f"Unknown optimizer {name!r} (parameter `<model>.training.optimizer`). "
            f"Set it to one of: {valid}."
        )
    return _OPTIMIZERS[key]


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """Return a new Keras optimizer: 'adam', 'adamw', 'sgd' or 'rmsprop' (any case).

    Other settings are Keras' defaults (e.g. AdamW's weight decay 0.004, SGD without
    momentum). A new instance is returned on every call: an optimizer holds per-model state
    and must not be shared between models.

    Raises:
        ConfigurationError: unknown `name` (lists the valid ones), or a `learning_rate`
            that is not a positive number.
    """
    optimizer_class, _ = _lookup_optimizer(name)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, Real) or not learning_rate > 0:
        raise ConfigurationError(
            f"`<model>.training.learning_rate` must be a positive number, got {learning_rate!r}. "
            f"Set it to e.g. 1e-3."
        )
    return optimizer_class(learning_rate=float(learning_rate))


def optimizer_display_name(name: str) -> str:
    """Return the name used in MLflow run names: 'Adam', 'AdamW', 'SGD' or 'RMSprop'.

    Raises:
        ConfigurationError: `name` is not a known optimizer.
    """
    return _lookup_optimizer(name)[1]


def compile_segmentation_model(
    model: keras.Model,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    loss: str = "bce+dice",
) -> keras.Model:
    """Compile a U-Net (2D or 3D) with a named optimizer and loss, and Dice and IoU metrics.

    `model.fit` history then has exactly the keys loss, dice, iou (and val_loss, val_dice,
    val_iou with validation data). The metrics are the smoothed soft versions, pooled over
    each batch and averaged over the batches of an epoch.

    Args:
        model: a model whose output is (B, *spatial, 1) probabilities.
        optimizer: 'adam', 'adamw', 'sgd' or 'rmsprop'.
        learning_rate: positive step size.
        loss: 'bce', 'dice' or 'bce+dice'.

    Returns:
        The same model, compiled, for chaining.

    Raises:
        ConfigurationError: unknown optimizer or loss, or a bad learning rate.
    """
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate),
        loss=get_loss(loss),
        metrics=[dice, iou],
    )
    return model


def compile_patch_classifier(
    model: keras.Model,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
) -> keras.Model:
    """Compile the patch classifier with binary cross-entropy, accuracy and ROC AUC.

    History keys: loss, accuracy, auc (and their val_ versions).

    Args:
        model: a model whose output is (B, 1) probabilities.
        optimizer: 'adam', 'adamw', 'sgd' or 'rmsprop'.
        learning_rate: positive step size.

    Returns:
        The same model, compiled, for chaining.

    Raises:
        ConfigurationError: unknown optimizer or a bad learning rate.
    """
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        # Explicit BinaryAccuracy rather than the string "accuracy", whose meaning Keras
        # infers from the loss; the name keeps the history key "accuracy".
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )
    return model
