"""Soft Dice / IoU metrics and the losses, against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.errors import ConfigurationError
from medseg.models.losses import (
    bce_dice_loss,
    binary_crossentropy_mean,
    dice,
    dice_coefficient,
    dice_loss,
    get_loss,
    iou,
    iou_coefficient,
    loss_display_name,
)


def _value(tensor) -> float:
    return float(np.asarray(tensor))


def _as_batch(mask) -> np.ndarray:
    """(H, W) → (1, H, W, 1) float32, the layout the 2D U-Net sees."""
    return np.asarray(mask, dtype=np.float32)[None, ..., None]


@pytest.fixture
def overlapping_pair() -> tuple[np.ndarray, np.ndarray]:
    """4×4 masks: |T| = 4 (top-left 2×2), |P| = 6 (rows 0-1, cols 1-3), |T∩P| = 2."""
    t = np.zeros((4, 4))
    t[0:2, 0:2] = 1
    p = np.zeros((4, 4))
    p[0:2, 1:4] = 1
    return _as_batch(t), _as_batch(p)


def test_dice_and_iou_without_smoothing_match_the_set_formulas(overlapping_pair):
    t, p = overlapping_pair
    # Dice = 2·2 / (4 + 6); IoU = 2 / (4 + 6 − 2).
    assert _value(dice_coefficient(t, p, smooth=0.0)) == pytest.approx(0.4)
    assert _value(iou_coefficient(t, p, smooth=0.0)) == pytest.approx(0.25)


def test_dice_and_iou_with_default_smoothing(overlapping_pair):
    t, p = overlapping_pair
    # (2·2 + 1) / (10 + 1) and (2 + 1) / (8 + 1).
    assert _value(dice_coefficient(t, p)) == pytest.approx(5 / 11)
    assert _value(iou_coefficient(t, p)) == pytest.approx(1 / 3)
    # The Keras metric wrappers are the same numbers under their history names.
    assert _value(dice(t, p)) == pytest.approx(5 / 11)
    assert _value(iou(t, p)) == pytest.approx(1 / 3)
    assert dice.__name__ == "dice" and iou.__name__ == "iou"


def test_identical_masks_score_one(overlapping_pair):
    t, _ = overlapping_pair
    assert _value(dice_coefficient(t, t, smooth=0.0)) == pytest.approx(1.0)
    assert _value(iou_coefficient(t, t, smooth=0.0)) == pytest.approx(1.0)


def test_empty_against_empty_is_one_with_smoothing_and_nan_without():
    empty = _as_batch(np.zeros((4, 4)))
    assert _value(dice_coefficient(empty, empty)) == pytest.approx(1.0)
    assert _value(iou_coefficient(empty, empty)) == pytest.approx(1.0)
    assert math.isnan(_value(dice_coefficient(empty, empty, smooth=0.0)))
    assert math.isnan(_value(iou_coefficient(empty, empty, smooth=0.0)))


def test_empty_reference_against_non_empty_prediction(overlapping_pair):
    _, p = overlapping_pair  # 6 foreground pixels
    empty = np.zeros_like(p)
    assert _value(dice_coefficient(empty, p, smooth=0.0)) == pytest.approx(0.0)
    assert _value(iou_coefficient(empty, p, smooth=0.0)) == pytest.approx(0.0)
    # Smoothing leaves a small value: 1 / (0 + 6 + 1) for both.
    assert _value(dice_coefficient(empty, p)) == pytest.approx(1 / 7)
    assert _value(iou_coefficient(empty, p)) == pytest.approx(1 / 7)
    # Symmetric in the roles of reference and prediction.
    assert _value(dice_coefficient(p, empty)) == pytest.approx(1 / 7)


def test_soft_probabilities():
    t = np.array([[1.0, 0.0]], dtype=np.float32)
    p = np.array([[0.8, 0.4]], dtype=np.float32)
    # Σtp = 0.8, Σt = 1, Σp = 1.2.
    assert _value(dice_coefficient(t, p, smooth=0.0)) == pytest.approx(1.6 / 2.2, rel=1e-6)
    assert _value(iou_coefficient(t, p, smooth=0.0)) == pytest.approx(0.8 / 1.4, rel=1e-6)


def test_batch_is_pooled_not_averaged_per_sample():
    full = np.zeros((4, 4))
    full[1:3, 1:3] = 1  # 4 pixels, predicted exactly
    stray = np.zeros((4, 4))
    stray[0, 0] = 1  # one false-positive pixel on an otherwise empty slice
    t = np.stack([full, np.zeros((4, 4))])[..., None].astype(np.float32)
    p = np.stack([full, stray])[..., None].astype(np.float32)
    # Pooled: 2·4 / (4 + 5) = 8/9 (a per-sample mean would be (1 + 0) / 2).
    assert _value(dice_coefficient(t, p, smooth=0.0)) == pytest.approx(8 / 9)


def test_uint8_reference_is_cast_to_the_prediction_dtype(overlapping_pair):
    t, p = overlapping_pair
    assert _value(dice_coefficient(t.astype(np.uint8), p, smooth=0.0)) == pytest.approx(0.4)
    assert _value(bce_dice_loss(t.astype(np.uint8), p)) == pytest.approx(_value(bce_dice_loss(t, p)))


def test_bce_matches_the_hand_computed_mean():
    t = np.array([1, 0, 1, 0], dtype=np.float32).reshape(1, 2, 2, 1)
    p = np.array([0.9, 0.2, 0.6, 0.5], dtype=np.float32).reshape(1, 2, 2, 1)
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.5)) / 4
    assert _value(binary_crossentropy_mean(t, p)) == pytest.approx(expected, rel=1e-5)


def test_bce_of_a_confident_wrong_pixel_is_clipped_not_infinite():
    t = np.array([[1.0]], dtype=np.float32)
    p = np.array([[0.0]], dtype=np.float32)
    assert _value(binary_crossentropy_mean(t, p)) == pytest.approx(-math.log(1e-7), rel=1e-3)


def test_dice_loss_is_one_minus_dice_and_bce_dice_is_the_sum(overlapping_pair):
    t, p = overlapping_pair
    p = np.clip(p, 0.1, 0.9)  # finite BCE
    d = _value(dice_coefficient(t, p))
    assert _value(dice_loss(t, p)) == pytest.approx(1.0 - d)
    expected = _value(binary_crossentropy_mean(t, p)) + (1.0 - d)
    assert _value(bce_dice_loss(t, p)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("name", "function", "display"),
    [
        ("bce", binary_crossentropy_mean, "BCE"),
        ("Dice", dice_loss, "Dice"),
        ("BCE+Dice", bce_dice_loss, "BCE+Dice"),
        (" bce+dice ", bce_dice_loss, "BCE+Dice"),
    ],
)
def test_get_loss_and_display_name_are_case_insensitive(name, function, display):
    assert get_loss(name) is function
    assert loss_display_name(name) == display


def test_unknown_loss_lists_the_valid_names():
    with pytest.raises(ConfigurationError) as info:
        get_loss("focal")
    message = str(info.value)
    assert "'focal'" in message
    for valid in ("'bce'", "'dice'", "'bce+dice'"):
        assert valid in message
    with pytest.raises(ConfigurationError):
        loss_display_name("focal")
