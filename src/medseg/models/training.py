"""Training loop and whole-volume 2D inference, shared by the model pipelines."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np


def fit_model(
    model: keras.Model,
    train_data,
    val_data,
    *,
    epochs: int,
    steps_per_epoch: int,
    validation_steps: int,
    checkpoint_dir: str | Path,
    patience: int,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict[str, list[float]]:
    """Train with early stopping, a best-model checkpoint and crash recovery.

    Args:
        model: a compiled model.
        train_data, val_data: endless `tf.data` datasets of (image, label) batches.
        epochs: maximum epochs; `steps_per_epoch` and `validation_steps` batches each.
        checkpoint_dir: `best.keras` (best validation loss) and `backup/` go there.
            `BackupAndRestore` keeps `backup/` while training runs and deletes it at the end,
            so a run killed mid-training resumes from its last finished epoch. Delete the
            folder by hand after changing the model's architecture.
        patience: epochs without a lower validation loss before stopping; the best weights
            are restored.
        callbacks: extra callbacks (e.g. per-epoch metric logging).

    Returns:
        The Keras history as plain floats: {"loss": [...], "val_loss": [...], ...}.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    history = model.fit(
        train_data,
        validation_data=val_data,
        epochs=int(epochs),
        steps_per_epoch=int(steps_per_epoch),
        validation_steps=int(validation_steps),
        callbacks=[
            keras.callbacks.BackupAndRestore(str(checkpoint_dir / "backup")),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=int(patience), restore_best_weights=True),
            keras.callbacks.ModelCheckpoint(str(checkpoint_dir / "best.keras"), monitor="val_loss", save_best_only=True),
            *callbacks,
        ],
        verbose=2,
    )
    return {key: [float(v) for v in values] for key, values in history.history.items()}


def with_input_shape(model: keras.Model, input_shape: Sequence[int]) -> keras.Model:
    """The same fully convolutional model, weights shared by copy, for another input size."""
    clone = keras.models.clone_model(model, input_tensors=keras.Input(tuple(input_shape)))
    clone.set_weights(model.get_weights())
    return clone


def predict_axial_slices(model: keras.Model, volume: np.ndarray, multiple: int, batch_size: int = 16) -> np.ndarray:
    """Foreground probabilities of a whole volume from a 2D model, slice by slice along Z.

    Whole slices are predicted at once (the model is fully convolutional): each slice is
    zero-padded to a multiple of `multiple` (2**depth) and cropped back, so no in-plane
    context is lost to tiling.

    Args:
        model: 2D model mapping (B, H, W, 1) to (B, H, W, 1) probabilities, for any H and W
            (see `with_input_shape(model, (None, None, 1))`).
        volume: (X, Y, Z) float32, preprocessed.
        multiple: the padded in-plane size is a multiple of this.
        batch_size: slices per forward pass.

    Returns:
        (X, Y, Z) float32 probabilities.
    """
    nx, ny, nz = volume.shape
    px, py = (int(math.ceil(n / multiple) * multiple) for n in (nx, ny))
    slices = np.zeros((nz, px, py, 1), dtype=np.float32)
    slices[:, :nx, :ny, 0] = np.moveaxis(volume, 2, 0)
    out = np.empty((nx, ny, nz), dtype=np.float32)
    for start in range(0, nz, batch_size):
        # An eager call: a traced predict function would be retraced for every new slice size.
        batch = np.asarray(model(slices[start : start + batch_size], training=False))
        out[:, :, start : start + batch_size] = np.moveaxis(batch[:, :nx, :ny, 0], 0, 2)
    return out
