"""Optimizers and `compile` settings for the segmentation models and the patch classifier.

Parameter values are plain strings ('adam', 'bce+dice') so they read well in
`parameters_*.yml`; the display names ('Adam', 'BCE+Dice') go into MLflow run names.
"""

from __future__ import annotations

import functools
from numbers import Real
from typing import Callable

import keras

from medseg.errors import ConfigurationError
from medseg.models.losses import dice, get_loss, iou, multiclass_metrics
from medseg.models.unet import validate_n_classes

# Key: normalized parameter value. Value: (optimizer class, display name for run names).
_OPTIMIZERS: dict[str, tuple[Callable[..., keras.optimizers.Optimizer], str]] = {
    "adam": (keras.optimizers.Adam, "Adam"),
    "adamw": (keras.optimizers.AdamW, "AdamW"),
    "sgd": (keras.optimizers.SGD, "SGD"),
    # nnU-Net's: SGD with Nesterov momentum 0.99 (its weight decay of 3e-5 is left out: PyTorch
    # adds it to the gradient, Keras decays the weights apart from it, so the two are not the same).
    "sgd_nesterov": (functools.partial(keras.optimizers.SGD, momentum=0.99, nesterov=True), "SGDNesterov"),
    "rmsprop": (keras.optimizers.RMSprop, "RMSprop"),
}
LR_SCHEDULES = ("constant", "poly")
POLY_POWER = 0.9  # nnU-Net's PolyLRScheduler: lr × (1 − step / steps) ** 0.9


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


def make_optimizer(
    name: str, learning_rate: float, schedule: str = "constant", total_steps: int | None = None
) -> keras.optimizers.Optimizer:
    """Return a new Keras optimizer: 'adam', 'adamw', 'sgd', 'sgd_nesterov' or 'rmsprop' (any case).

    Other settings are Keras' defaults (e.g. AdamW's weight decay 0.004, SGD without
    momentum); 'sgd_nesterov' is nnU-Net's SGD, Nesterov momentum 0.99. A new instance is
    returned on every call: an optimizer holds per-model state and must not be shared between
    models.

    Args:
        name: the optimizer.
        learning_rate: the (initial) step size.
        schedule: 'constant', or 'poly', nnU-Net's polynomial decay to 0 over `total_steps`
            (learning_rate × (1 − step / total_steps) ** 0.9). The optimizer counts its steps,
            and a resumed training restores the count with the optimizer.
        total_steps: the training's steps (epochs × steps per epoch); without them (a model
            built to time its steps, before they are planned) 'poly' is constant.

    Raises:
        ConfigurationError: unknown `name` or `schedule` (lists the valid ones), or a
            `learning_rate` that is not a positive number.
    """
    optimizer_class, _ = _lookup_optimizer(name)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, Real) or not learning_rate > 0:
        raise ConfigurationError(
            f"`<model>.training.learning_rate` must be a positive number, got {learning_rate!r}. "
            f"Set it to e.g. 1e-3."
        )
    if schedule not in LR_SCHEDULES:
        raise ConfigurationError(f"Unknown `<model>.training.lr_schedule` {schedule!r}. Set it to one of: {', '.join(LR_SCHEDULES)}.")
    rate: float | keras.optimizers.schedules.LearningRateSchedule = float(learning_rate)
    if schedule == "poly" and total_steps:
        rate = keras.optimizers.schedules.PolynomialDecay(float(learning_rate), total_steps, 0.0, power=POLY_POWER)
    return optimizer_class(learning_rate=rate)


def optimizer_display_name(name: str) -> str:
    """Return the name used in MLflow run names: 'Adam', 'AdamW', 'SGD', 'SGDNesterov' or 'RMSprop'.

    Raises:
        ConfigurationError: `name` is not a known optimizer.
    """
    return _lookup_optimizer(name)[1]


def foreground_class_count(model: keras.Model) -> int:
    """The number of foreground classes K a segmentation model predicts, from its output.

    One output channel (sigmoid) is binary, K = 1; K + 1 >= 3 channels (softmax) are K
    classes plus the background.

    Raises:
        ConfigurationError: the output is not channels-last with a known channel count, or
            has 2 channels (a softmax over background and one class, which this project
            builds as one sigmoid channel instead).
    """
    channels = model.output_shape[-1] if isinstance(model.output_shape, tuple) else None
    if channels is None or channels == 2 or channels < 1:
        raise ConfigurationError(
            f"Model {model.name!r} has output shape {model.output_shape}; a segmentation model "
            f"ends in 1 sigmoid channel (binary) or K + 1 >= 3 softmax channels (K classes). "
            f"Build it with build_unet2d / build_unet3d."
        )
    return 1 if channels == 1 else int(channels) - 1


def compile_segmentation_model(
    model: keras.Model,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    loss: str = "bce+dice",
    n_classes: int | None = None,
    lr_schedule: str = "constant",
    total_steps: int | None = None,
) -> keras.Model:
    """Compile a U-Net (2D or 3D) with a named optimizer and loss, and Dice and IoU metrics.

    Binary models (one sigmoid channel): `model.fit` history has exactly the keys loss, dice,
    iou (and val_loss, val_dice, val_iou with validation data), as before.

    Multi-class models (K + 1 softmax channels, trained on integer label maps with values
    0..K): the loss is the multi-class one `get_loss(loss, K)` names ('bce+dice' and
    'ce+dice' are cross-entropy + foreground Dice), and the history has loss, dice, iou
    (the means over the foreground classes, the same headline keys as binary), then dice_1,
    iou_1, ..., dice_K, iou_K (see `medseg.models.losses.multiclass_metrics`).

    The metrics are the smoothed soft versions, pooled over each batch and averaged over
    the batches of an epoch.

    Args:
        model: a model whose output is (B, *spatial, 1) or (B, *spatial, K + 1) probabilities.
        optimizer: 'adam', 'adamw', 'sgd', 'sgd_nesterov' or 'rmsprop'.
        learning_rate: positive step size.
        loss: 'bce', 'dice', 'bce+dice', 'ce' or 'ce+dice' (see `get_loss`).
        n_classes: foreground classes K. None (default) reads it from the model's output
            channels; when given, it must agree with them.
        lr_schedule, total_steps: the learning-rate schedule over the training's steps
            (`make_optimizer`).

    Returns:
        The same model, compiled, for chaining.

    Raises:
        ConfigurationError: unknown optimizer or loss, a bad learning rate, or an
            `n_classes` that does not match the model's output.
    """
    model_classes = foreground_class_count(model)
    if n_classes is not None and validate_n_classes(n_classes) != model_classes:
        raise ConfigurationError(
            f"compile_segmentation_model got n_classes={n_classes}, but model {model.name!r} "
            f"predicts {model_classes} foreground class(es) (output shape {model.output_shape}). "
            f"Build the model with the same n_classes as the data."
        )
    metrics = [dice, iou] if model_classes == 1 else multiclass_metrics(model_classes)
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate, lr_schedule, total_steps),
        loss=get_loss(loss, model_classes),
        metrics=metrics,
    )
    return model


def compile_patch_classifier(
    model: keras.Model,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    lr_schedule: str = "constant",
    total_steps: int | None = None,
) -> keras.Model:
    """Compile the patch classifier with binary cross-entropy, accuracy and ROC AUC.

    History keys: loss, accuracy, auc (and their val_ versions).

    Args:
        model: a model whose output is (B, 1) probabilities.
        optimizer: 'adam', 'adamw', 'sgd', 'sgd_nesterov' or 'rmsprop'.
        learning_rate: positive step size.
        lr_schedule, total_steps: as for `compile_segmentation_model`.

    Returns:
        The same model, compiled, for chaining.

    Raises:
        ConfigurationError: unknown optimizer or a bad learning rate.
    """
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate, lr_schedule, total_steps),
        loss=keras.losses.BinaryCrossentropy(),
        # Explicit BinaryAccuracy rather than the string "accuracy", whose meaning Keras
        # infers from the loss; the name keeps the history key "accuracy".
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )
    return model
