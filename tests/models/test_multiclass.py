"""Multi-class U-Nets: softmax heads, CE + foreground Dice, per-class metrics, save/load, learning.

Targets are integer label maps (B, ..., 1) with values 0..K, turned one-hot inside the
losses; the binary models and losses must stay exactly as they were.
"""

from __future__ import annotations

import json
import math
import zipfile

import keras
import numpy as np
import pytest

from medseg.errors import ConfigurationError
from medseg.evaluation import dice_score
from medseg.models import (
    MulticlassDice,
    MulticlassIoU,
    bce_dice_loss,
    binary_crossentropy_mean,
    build_unet2d,
    build_unet3d,
    categorical_crossentropy_mean,
    ce_dice_loss,
    compile_segmentation_model,
    dice_loss,
    foreground_class_count,
    foreground_dice,
    foreground_iou,
    get_loss,
    loss_display_name,
    multiclass_dice_loss,
    multiclass_metrics,
    per_class_dice,
    per_class_iou,
)

SEED = 0
TARGET = 0.9


def _values(tensor) -> np.ndarray:
    return np.asarray(tensor, dtype=np.float64)


def _one_hot(labels: np.ndarray, n_channels: int) -> np.ndarray:
    """(..., 1) integer labels → (..., n_channels) float32 one-hot."""
    return np.eye(n_channels, dtype=np.float32)[labels[..., 0]]


# Reference (rows of a 4×4 slice):      Prediction:
#   1 1 0 0                               1 1 1 0
#   1 1 0 0                               0 0 0 0
#   0 0 2 2                               0 0 2 2
#   0 0 0 0                               0 0 2 0
# Class 1: |T| = 4, |P| = 3, |T∩P| = 2 → Dice 4/7, IoU 2/5.
# Class 2: |T| = 2, |P| = 3, |T∩P| = 2 → Dice 4/5, IoU 2/3.
# Background: |T| = 10, |P| = 10, |T∩P| = 8 → Dice 16/20, IoU 8/12.
REFERENCE = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 0, 0]], dtype=np.uint8)[None, ..., None]
PREDICTION = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 2, 2], [0, 0, 2, 0]], dtype=np.uint8)[None, ..., None]


def test_per_class_dice_and_iou_match_the_set_formulas():
    p = _one_hot(PREDICTION, 3)
    np.testing.assert_allclose(_values(per_class_dice(REFERENCE, p, smooth=0.0)), [16 / 20, 4 / 7, 4 / 5], rtol=1e-6)
    np.testing.assert_allclose(_values(per_class_iou(REFERENCE, p, smooth=0.0)), [8 / 12, 2 / 5, 2 / 3], rtol=1e-6)
    # The headline leaves the background out: (4/7 + 4/5) / 2, not the mean of all three.
    assert float(foreground_dice(REFERENCE, p, smooth=0.0)) == pytest.approx((4 / 7 + 4 / 5) / 2, rel=1e-6)
    assert float(foreground_iou(REFERENCE, p, smooth=0.0)) == pytest.approx((2 / 5 + 2 / 3) / 2, rel=1e-6)
    # Default smoothing 1: class 1 is (2·2 + 1) / (4 + 3 + 1).
    assert float(per_class_dice(REFERENCE, p)[1]) == pytest.approx(5 / 8, rel=1e-6)


def test_labels_may_be_uint8_maps_without_channel_axis_or_one_hot():
    p = _one_hot(PREDICTION, 3)
    expected = _values(per_class_dice(REFERENCE, p))
    np.testing.assert_allclose(_values(per_class_dice(REFERENCE[..., 0], p)), expected, rtol=1e-6)
    np.testing.assert_allclose(_values(per_class_dice(REFERENCE.astype(np.int64), p)), expected, rtol=1e-6)
    np.testing.assert_allclose(_values(per_class_dice(_one_hot(REFERENCE, 3), p)), expected, rtol=1e-6)
    assert float(ce_dice_loss(_one_hot(REFERENCE, 3), np.clip(p, 0.05, 0.9))) == pytest.approx(
        float(ce_dice_loss(REFERENCE, np.clip(p, 0.05, 0.9))), rel=1e-6
    )


def test_perfect_prediction_scores_one_and_the_loss_is_at_its_minimum():
    p = _one_hot(REFERENCE, 3)
    np.testing.assert_allclose(_values(per_class_dice(REFERENCE, p, smooth=0.0)), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(_values(per_class_iou(REFERENCE, p, smooth=0.0)), [1.0, 1.0, 1.0])
    assert float(ce_dice_loss(REFERENCE, p)) == pytest.approx(0.0, abs=1e-5)
    assert float(multiclass_dice_loss(REFERENCE, p)) == pytest.approx(0.0, abs=1e-6)
    assert float(categorical_crossentropy_mean(REFERENCE, p)) == pytest.approx(0.0, abs=1e-5)


def test_swapping_two_classes_scores_zero_for_both_and_the_background_does_not_hide_it():
    swapped = REFERENCE.copy()
    swapped[REFERENCE == 1], swapped[REFERENCE == 2] = 2, 1
    p = _one_hot(swapped, 3)
    dice_per_class = _values(per_class_dice(REFERENCE, p, smooth=0.0))
    np.testing.assert_allclose(dice_per_class, [1.0, 0.0, 0.0])
    # A mean with the background would be 1/3; the foreground mean is 0.
    assert float(foreground_dice(REFERENCE, p, smooth=0.0)) == 0.0
    assert float(foreground_iou(REFERENCE, p, smooth=0.0)) == 0.0
    # With smoothing, class 1 keeps only s / (|T| + |P| + s) = 1 / (4 + 2 + 1).
    assert float(per_class_dice(REFERENCE, p)[1]) == pytest.approx(1 / 7, rel=1e-6)
    assert float(multiclass_dice_loss(REFERENCE, p)) == pytest.approx(1 - (1 / 7 + 1 / 7) / 2, rel=1e-6)
    # Cross-entropy of confident wrong voxels is clipped at −log(1e-7) ≈ 16.1 for the 6 of 16.
    assert float(categorical_crossentropy_mean(REFERENCE, p)) == pytest.approx(6 / 16 * -math.log(1e-7), rel=1e-3)


def test_cross_entropy_matches_the_hand_computed_mean():
    labels = np.array([0, 2], dtype=np.uint8).reshape(1, 1, 2, 1)
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32).reshape(1, 1, 2, 3)
    expected = -(math.log(0.7) + math.log(0.6)) / 2
    assert float(categorical_crossentropy_mean(labels, p)) == pytest.approx(expected, rel=1e-5)


def test_absent_class_neither_referenced_nor_predicted_scores_one_with_smoothing():
    labels = np.zeros((1, 2, 2, 1), dtype=np.uint8)
    labels[0, 0, 0, 0] = 1  # class 2 absent everywhere
    p = _one_hot(labels, 3)
    np.testing.assert_allclose(_values(per_class_dice(labels, p)), [1.0, 1.0, 1.0])
    assert math.isnan(float(per_class_dice(labels, p, smooth=0.0)[2]))


def test_label_values_outside_the_classes_count_for_no_class():
    labels = REFERENCE.copy()
    labels[0, 3, 3, 0] = 7  # not a class of a 2-class model: an all-zero one-hot row
    p = _one_hot(REFERENCE, 3)
    # Background loses one reference voxel: 2·9 / (9 + 10).
    assert float(per_class_dice(labels, p, smooth=0.0)[0]) == pytest.approx(18 / 19, rel=1e-6)


def test_multiclass_losses_reject_a_one_channel_prediction():
    with pytest.raises(ConfigurationError, match="softmax"):
        ce_dice_loss(REFERENCE, np.zeros((1, 4, 4, 1), dtype=np.float32))


# --------------------------------------------------------------------------- loss names


@pytest.mark.parametrize(
    ("name", "n_classes", "function", "display"),
    [
        ("bce+dice", 1, bce_dice_loss, "BCE+Dice"),
        ("ce+dice", 1, bce_dice_loss, "BCE+Dice"),
        ("bce", 1, binary_crossentropy_mean, "BCE"),
        ("dice", 1, dice_loss, "Dice"),
        ("CE+Dice", 2, ce_dice_loss, "CE+Dice"),
        ("bce+dice", 2, ce_dice_loss, "CE+Dice"),
        ("ce", 3, categorical_crossentropy_mean, "CE"),
        ("bce", 3, categorical_crossentropy_mean, "CE"),
        ("Dice", 3, multiclass_dice_loss, "Dice"),
    ],
)
def test_the_cross_entropy_follows_the_head(name, n_classes, function, display):
    assert get_loss(name, n_classes) is function
    assert loss_display_name(name, n_classes) == display


def test_default_loss_names_are_unchanged_for_binary():
    assert get_loss("bce+dice") is bce_dice_loss
    assert loss_display_name("bce+dice") == "BCE+Dice"


def test_unknown_multiclass_loss_lists_the_valid_names():
    with pytest.raises(ConfigurationError) as info:
        get_loss("focal", 2)
    for valid in ("'ce'", "'dice'", "'ce+dice'"):
        assert valid in str(info.value)
    with pytest.raises(ConfigurationError, match="n_classes"):
        get_loss("ce+dice", 0)


# --------------------------------------------------------------------------- metrics


def test_metric_objects_report_the_class_and_the_foreground_mean():
    p = _one_hot(PREDICTION, 3)
    metrics = multiclass_metrics(2)
    assert [m.name for m in metrics] == ["dice", "iou", "dice_1", "iou_1", "dice_2", "iou_2"]
    expected = {
        "dice": (5 / 8 + 5 / 6) / 2,  # smoothed: (4 + 1)/(7 + 1) and (4 + 1)/(5 + 1)
        "iou": (3 / 6 + 3 / 4) / 2,  # (2 + 1)/(5 + 1) and (2 + 1)/(3 + 1)
        "dice_1": 5 / 8,
        "iou_1": 3 / 6,
        "dice_2": 5 / 6,
        "iou_2": 3 / 4,
    }
    for metric in metrics:
        metric.update_state(REFERENCE, p)
        assert float(metric.result()) == pytest.approx(expected[metric.name], rel=1e-6), metric.name


def test_metric_averages_batches_over_an_epoch():
    metric = MulticlassDice(2)
    metric.update_state(REFERENCE, _one_hot(REFERENCE, 3))  # 1
    metric.update_state(REFERENCE, _one_hot(PREDICTION, 3))  # 5/6
    assert float(metric.result()) == pytest.approx((1 + 5 / 6) / 2, rel=1e-6)


def test_metric_config_round_trip():
    metric = MulticlassIoU(2, smooth=0.5)
    clone = MulticlassIoU.from_config(metric.get_config())
    assert (clone.name, clone.class_index, clone.smooth) == ("iou_2", 2, 0.5)
    assert MulticlassDice().name == "dice" and MulticlassDice(np.int64(1)).name == "dice_1"


@pytest.mark.parametrize("bad", [0, 1, 1.5, True])
def test_multiclass_metrics_need_two_or_more_classes(bad):
    with pytest.raises(ConfigurationError):
        multiclass_metrics(bad)


def test_negative_class_index_is_rejected():
    with pytest.raises(ConfigurationError, match="class_index"):
        MulticlassDice(-1)


# --------------------------------------------------------------------------- models


def test_multiclass_unet2d_outputs_class_probabilities_that_sum_to_one():
    keras.utils.set_random_seed(SEED)
    model = build_unet2d((16, 16, 1), base_filters=4, depth=2, n_classes=3)
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)
    probabilities = np.asarray(model(images, training=False))
    assert probabilities.shape == (2, 16, 16, 4)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)
    head = model.get_layer("mask")
    assert head.activation is keras.activations.softmax
    assert foreground_class_count(model) == 3


def test_multiclass_unet3d_outputs_class_probabilities_that_sum_to_one():
    keras.utils.set_random_seed(SEED)
    model = build_unet3d((8, 8, 8, 1), base_filters=4, depth=2, n_classes=2)
    probabilities = np.asarray(model(np.zeros((1, 8, 8, 8, 1), np.float32), training=False))
    assert probabilities.shape == (1, 8, 8, 8, 3)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)
    assert foreground_class_count(model) == 2


def test_binary_unet_is_unchanged():
    model = build_unet2d()
    assert model.count_params() == 1_930_657
    assert model.output_shape == (None, 128, 128, 1)
    assert model.get_layer("mask").activation is keras.activations.sigmoid
    assert build_unet2d(n_classes=1).count_params() == 1_930_657
    assert foreground_class_count(model) == 1
    # The multi-class head only widens the 1×1 convolution: 33 parameters (32 weights + bias)
    # per extra channel.
    assert build_unet2d(n_classes=2).count_params() == 1_930_657 + 2 * 33


def test_head_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_unet2d((16, 16, 1), base_filters=4, depth=2, n_classes=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("enc0_conv1").compute_dtype == "float16"
    assert model.get_layer("mask").compute_dtype == "float32"
    assert model.output.dtype == "float32"


@pytest.mark.parametrize("bad", [0, 256, 1.5, True, "2"])
def test_bad_n_classes_is_rejected(bad):
    with pytest.raises(ConfigurationError, match="n_classes"):
        build_unet2d((16, 16, 1), base_filters=4, depth=2, n_classes=bad)
    with pytest.raises(ConfigurationError, match="n_classes"):
        build_unet3d((8, 8, 8, 1), base_filters=4, depth=2, n_classes=bad)


# --------------------------------------------------------------------------- compile, save, load


@pytest.fixture
def tiny_multiclass_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.random((4, 16, 16, 1), dtype=np.float32)
    labels = np.digitize(images, [0.4, 0.7]).astype(np.uint8)  # values 0, 1, 2
    return images, labels


def _tiny_multiclass_unet(loss: str = "ce+dice") -> keras.Model:
    """Run eagerly: a test's few steps cost less than tracing them into graphs (seconds)."""
    keras.utils.set_random_seed(SEED)
    model = compile_segmentation_model(build_unet2d((16, 16, 1), base_filters=4, depth=2, n_classes=2), loss=loss)
    model.run_eagerly = True
    return model


def test_compile_infers_the_classes_and_names_the_history(tiny_multiclass_data):
    images, labels = tiny_multiclass_data
    model = _tiny_multiclass_unet("bce+dice")  # the binary default maps to CE + Dice
    assert model.loss is ce_dice_loss
    history = model.fit(images, labels, validation_data=(images, labels), epochs=1, batch_size=2, verbose=0)
    names = {"loss", "dice", "iou", "dice_1", "iou_1", "dice_2", "iou_2"}
    assert set(history.history) == names | {f"val_{name}" for name in names}
    # The headline is the mean of the per-class values on the same batches (one validation pass).
    h = history.history
    assert h["val_dice"][0] == pytest.approx((h["val_dice_1"][0] + h["val_dice_2"][0]) / 2, rel=1e-5)


def test_compile_rejects_n_classes_that_disagree_with_the_model():
    with pytest.raises(ConfigurationError, match="n_classes=3"):
        compile_segmentation_model(build_unet2d((16, 16, 1), base_filters=4, depth=2, n_classes=2), n_classes=3)
    binary = compile_segmentation_model(build_unet2d((16, 16, 1), base_filters=4, depth=2), n_classes=1)
    assert binary.loss is bce_dice_loss


def test_multiclass_model_reloads_in_safe_mode(tiny_multiclass_data, tmp_path):
    images, labels = tiny_multiclass_data
    model = _tiny_multiclass_unet()
    model.train_on_batch(images, labels)  # move weights and BatchNorm statistics off init
    path = tmp_path / "unet2d_multiclass.keras"
    model.save(path)

    compile_config = json.loads(zipfile.ZipFile(path).read("config.json"))["compile_config"]
    assert compile_config["loss"]["config"] == "medseg>ce_dice_loss"
    assert {m["registered_name"] for m in compile_config["metrics"]} == {"medseg>MulticlassDice", "medseg>MulticlassIoU"}

    reloaded = keras.models.load_model(path, safe_mode=True, compile=True)
    assert reloaded.loss is ce_dice_loss
    reloaded.run_eagerly = True
    np.testing.assert_allclose(
        reloaded.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-6, atol=1e-6
    )
    expected = model.evaluate(images, labels, verbose=0, return_dict=True)
    got = reloaded.evaluate(images, labels, verbose=0, return_dict=True)
    assert set(got) == {"loss", "dice", "iou", "dice_1", "iou_1", "dice_2", "iou_2"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key


# --------------------------------------------------------------------------- learning


def core_rim_set(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` noisy images, each with a disk whose rim is class 1 and whose core is class 2.

    Args:
        n: number of images.
        shape: spatial shape, e.g. (32, 32).
        seed: seed of the generator; the same seed gives the same set.

    Returns:
        images (n, *shape, 1) float32: N(0, 0.5²) noise plus 1.5 on the rim and 3.0 on the core;
        labels (n, *shape, 1) uint8: 0 background, 1 rim (outer radius 6 to 9), 2 core
        (0.4 to 0.6 of the outer radius), so class 2 is about a third the size of class 1.
    """
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    labels = np.zeros((n, *shape, 1), dtype=np.uint8)
    for i in range(n):
        outer = rng.uniform(6.0, 9.0)
        inner = outer * rng.uniform(0.4, 0.6)
        centre = [rng.uniform(outer, size - 1 - outer) for size in shape]
        distance2 = sum((axis - c) ** 2 for axis, c in zip(grid, centre))
        labels[i, ..., 0][distance2 <= outer**2] = 1
        labels[i, ..., 0][distance2 <= inner**2] = 2
    intensity = np.array([0.0, 1.5, 3.0], dtype=np.float32)[labels]
    images = (intensity + rng.normal(0.0, 0.5, size=labels.shape)).astype(np.float32)
    return images, labels


def per_class_hard_dice(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> list[float]:
    """Mean over images of `dice_score` for each foreground class 1..K of two label maps."""
    return [
        float(np.mean([dice_score(label == k, pred == k) for label, pred in zip(labels, predicted)]))
        for k in range(1, n_classes + 1)
    ]


def test_per_class_hard_dice_catches_a_model_that_predicts_one_class():
    _, labels = core_rim_set(4, (32, 32), SEED)
    merged = np.where(labels > 0, 1, 0)  # the whole disk as the rim class
    assert per_class_hard_dice(labels, merged, 2)[1] == 0.0
    swapped = np.choose(labels, [0, 2, 1])
    assert per_class_hard_dice(labels, swapped, 2) == [0.0, 0.0]


def test_multiclass_unet2d_overfits_a_tiny_set():
    keras.utils.set_random_seed(SEED)
    images, labels = core_rim_set(16, (32, 32), SEED)
    model = compile_segmentation_model(
        build_unet2d((32, 32, 1), base_filters=8, depth=2, n_classes=2), "adam", 1e-2, "ce+dice"
    )

    def score() -> list[float]:
        predicted = np.argmax(np.asarray(model(images, training=False)), axis=-1)[..., None]
        return per_class_hard_dice(labels, predicted, 2)

    before = score()
    model.fit(images, labels, batch_size=4, epochs=30, shuffle=True, verbose=0)
    after = score()
    assert min(before) < 0.5, f"untrained multi-class U-Net already scores per-class Dice {before}"
    assert min(after) >= TARGET, f"multi-class U-Net reached per-class Dice {after} (untrained {before})"
