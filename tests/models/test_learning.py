"""Each model can learn: it overfits a tiny synthetic set to Dice >= 0.9 (AUC >= 0.9).

Shape and one-step tests pass for a model that predicts nothing, or the inverse of the
mask. These tests train the project's own builders and compile settings for a few dozen
steps on seeded bright balls in noise, then score the training set with the evaluation
code (hard masks at 0.5, `dice_score`; `classification_metrics` for ROC-AUC), in
inference mode as the pipelines predict (BatchNorm uses its moving statistics).

Before training, the same score must be low, so a model that cannot learn fails here.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from medseg.evaluation import classification_metrics, dice_score
from medseg.models import (
    build_patch_classifier,
    build_unet2d,
    build_unet3d,
    compile_patch_classifier,
    compile_segmentation_model,
)

SEED = 0
TARGET = 0.9


def ball_set(
    n: int,
    shape: tuple[int, ...],
    radius_range: tuple[float, float],
    seed: int,
    empty_fraction: float = 0.0,
    contrast: float = 1.5,
) -> tuple[np.ndarray, np.ndarray]:
    """`n` noisy images, each with one bright ball (disk in 2D, sphere in 3D) at a random place.

    Args:
        n: number of images.
        shape: spatial shape, e.g. (32, 32) or (16, 16, 16).
        radius_range: ball radius in voxels, drawn uniformly from [low, high).
        seed: seed of the generator; the same seed gives the same set.
        empty_fraction: fraction of images (the first ones) with no ball, e.g. negatives
            for the patch classifier.
        contrast: intensity added inside the ball; the noise has standard deviation 0.5.

    Returns:
        images (n, *shape, 1) float32: background N(0, 0.5²) plus `contrast` inside the ball;
        labels (n, *shape, 1) uint8: the ball.
    """
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    labels = np.zeros((n, *shape, 1), dtype=np.uint8)
    n_empty = int(round(n * empty_fraction))
    for i in range(n_empty, n):
        radius = rng.uniform(*radius_range)
        # The centre stays at least one radius from every edge, so the ball is whole.
        centre = [rng.uniform(radius, size - 1 - radius) for size in shape]
        distance2 = sum((axis - c) ** 2 for axis, c in zip(grid, centre))
        labels[i, ..., 0] = distance2 <= radius**2
    images = (contrast * labels + rng.normal(0.0, 0.5, size=labels.shape)).astype(np.float32)
    return images, labels


def mean_hard_dice(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of `dice_score` between each label and the prediction >= 0.5."""
    probabilities = np.asarray(model(images, training=False))
    return float(np.mean([dice_score(label, prob >= 0.5) for label, prob in zip(labels, probabilities)]))


def overfit_segmentation(model: keras.Model, images, labels, batch_size: int, epochs: int) -> tuple[float, float]:
    """Dice before and after fitting the compiled `model` to (images, labels)."""
    before = mean_hard_dice(model, images, labels)
    model.fit(images, labels, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
    return before, mean_hard_dice(model, images, labels)


def unet2d_dice(seed: int, epochs: int = 12, strategy=None) -> tuple[float, float]:
    """The 2D task (12 epochs: Dice 0.98 on one device, from 0.18 untrained). Under a `tf.distribute` strategy (tests/models/test_distribute.py) the model
    is built and compiled in its scope, and each step's batch of 4 is split over its replicas;
    the same batches (each epoch a new permutation of the 16 images) then come from a repeated
    `tf.data` stream, as in the pipelines: from an in-memory array, a distributed model would
    set up its per-device iterators again for every epoch (about 0.3 s each on 2 CPU cores)."""
    keras.utils.set_random_seed(seed)
    images, labels = ball_set(16, (32, 32), (4.0, 8.0), seed)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = compile_segmentation_model(build_unet2d((32, 32, 1), base_filters=8, depth=2), "adam", 1e-2)
    if strategy is None:
        return overfit_segmentation(model, images, labels, batch_size=4, epochs=epochs)
    import tensorflow as tf

    before = mean_hard_dice(model, images, labels)
    stream = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.float32)))
    stream = stream.shuffle(len(images), seed=seed, reshuffle_each_iteration=True).repeat().batch(4, drop_remainder=True)
    model.fit(stream, epochs=epochs, steps_per_epoch=len(images) // 4, verbose=0)
    return before, mean_hard_dice(model, images, labels)


def unet3d_dice(seed: int, epochs: int = 12) -> tuple[float, float]:
    """The 3D task (12 epochs: Dice 0.95, from 0.10 untrained)."""
    keras.utils.set_random_seed(seed)
    images, labels = ball_set(8, (16, 16, 16), (3.0, 5.0), seed)
    model = compile_segmentation_model(build_unet3d((16, 16, 16, 1), base_filters=8, depth=2), "adam", 1e-2)
    return overfit_segmentation(model, images, labels, batch_size=2, epochs=epochs)


def classifier_auc(seed: int, epochs: int = 10) -> tuple[float, float]:
    """ROC-AUC of "does this patch hold a ball" before and after training."""
    keras.utils.set_random_seed(seed)
    # Half the patches hold a faint ball (contrast 2 noise SDs), half are noise only.
    images, labels = ball_set(32, (16, 16, 16), (2.0, 4.0), seed, empty_fraction=0.5, contrast=1.0)
    targets = labels.reshape(len(labels), -1).max(axis=1).astype(np.float32)
    model = compile_patch_classifier(build_patch_classifier((16, 16, 16, 1)), "adam", 1e-3)

    def auc() -> float:
        scores = np.asarray(model(images, training=False)).reshape(-1)
        return classification_metrics(targets, scores)["roc_auc"]

    before = auc()
    model.fit(images, targets, batch_size=8, epochs=epochs, shuffle=True, verbose=0)
    return before, auc()


def test_hard_dice_catches_an_empty_or_flipped_mask():
    _, labels = ball_set(4, (32, 32), (4.0, 8.0), SEED)
    for label in labels:
        assert dice_score(label, np.zeros_like(label)) == 0.0
        assert dice_score(label, 1 - label) == 0.0


def test_unet2d_overfits_a_tiny_set():
    before, after = unet2d_dice(SEED)
    assert before < 0.5, f"untrained 2D U-Net already scores Dice {before:.3f}"
    assert after >= TARGET, f"2D U-Net reached Dice {after:.3f} (untrained {before:.3f})"


def test_unet3d_overfits_a_tiny_set():
    before, after = unet3d_dice(SEED)
    assert before < 0.5, f"untrained 3D U-Net already scores Dice {before:.3f}"
    assert after >= TARGET, f"3D U-Net reached Dice {after:.3f} (untrained {before:.3f})"


def test_patch_classifier_overfits_a_tiny_set():
    before, after = classifier_auc(SEED)
    # Random weights rank patches by chance (AUC 0.3 to 0.85 over seeds 0-7, never 0.9), and a
    # flipped classifier scores 1 - AUC, so the target is out of reach without learning.
    assert before < TARGET, f"untrained patch classifier already scores ROC-AUC {before:.3f}"
    assert after >= TARGET, f"patch classifier reached ROC-AUC {after:.3f} (untrained {before:.3f})"
