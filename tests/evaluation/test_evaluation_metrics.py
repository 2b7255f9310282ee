"""Unit tests of medseg.evaluation.metrics against hand-computed and brute-force values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from medseg.errors import GeometryMismatchError, InvalidLabelError
from medseg.evaluation.metrics import (
    normalized_surface_dice,
    _directed_surface_distances,
    _mask_surface,
    classification_metrics,
    dice_score,
    evaluate_case,
    hausdorff_distance_95,
    hausdorff_distance_95_penalized,
    hd95_miss_penalty_mm,
    iou_score,
    precision_score,
    recall_score,
    volume_ml,
)


@pytest.fixture
def overlapping_lines() -> tuple[np.ndarray, np.ndarray]:
    """|A| = 8 (x 0..7), |B| = 6 (x 4..9), |A∩B| = 4 (x 4..7), in a (10, 3, 3) volume."""
    reference = np.zeros((10, 3, 3), dtype=np.uint8)
    prediction = np.zeros((10, 3, 3), dtype=np.uint8)
    reference[0:8, 1, 1] = 1
    prediction[4:10, 1, 1] = 1
    return reference, prediction


def _brute_force_hd95(reference: np.ndarray, prediction: np.ndarray, spacing) -> float:
    """HD95 from all pairwise surface distances, on the whole volume (no cropping)."""
    points = []
    for mask in (reference.astype(bool), prediction.astype(bool)):
        surface = mask & ~ndimage.binary_erosion(mask)
        points.append(np.argwhere(surface) * np.asarray(spacing, dtype=np.float64))
    distances = cdist(points[0], points[1])
    return max(
        np.percentile(distances.min(axis=1), 95),
        np.percentile(distances.min(axis=0), 95),
    )


def _random_blob(rng: np.random.Generator, shape: tuple[int, ...], fraction: float) -> np.ndarray:
    """A smooth random blob covering roughly `fraction` of the volume, as uint8."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1.5)
    return (field > np.quantile(field, 1.0 - fraction)).astype(np.uint8)


# Overlap metrics -----------------------------------------------------------------------------


def test_dice_and_iou_on_hand_computed_masks(overlapping_lines):
    reference, prediction = overlapping_lines
    assert dice_score(reference, prediction) == pytest.approx(2 * 4 / (8 + 6))  # 0.5714...
    assert iou_score(reference, prediction) == pytest.approx(4 / 10)


def test_dice_and_iou_are_one_for_identical_masks(overlapping_lines):
    reference, _ = overlapping_lines
    assert dice_score(reference, reference) == 1.0
    assert iou_score(reference, reference) == 1.0


def test_dice_and_iou_are_nan_when_both_masks_are_empty():
    empty = np.zeros((4, 4, 4), dtype=np.uint8)
    assert math.isnan(dice_score(empty, empty))
    assert math.isnan(iou_score(empty, empty))


def test_dice_and_iou_are_zero_when_exactly_one_mask_is_empty(overlapping_lines):
    reference, _ = overlapping_lines
    empty = np.zeros_like(reference)
    for pair in ((reference, empty), (empty, reference)):
        assert dice_score(*pair) == 0.0
        assert iou_score(*pair) == 0.0


def test_precision_and_recall_on_hand_computed_masks(overlapping_lines):
    reference, prediction = overlapping_lines
    assert precision_score(reference, prediction) == pytest.approx(4 / 6)
    assert recall_score(reference, prediction) == pytest.approx(4 / 8)


def test_precision_and_recall_are_nan_where_undefined(overlapping_lines):
    reference, _ = overlapping_lines
    empty = np.zeros_like(reference)
    assert math.isnan(precision_score(reference, empty))  # nothing predicted
    assert recall_score(reference, empty) == 0.0
    assert precision_score(empty, reference) == 0.0
    assert math.isnan(recall_score(empty, reference))  # nothing to find
    assert math.isnan(precision_score(empty, empty))
    assert math.isnan(recall_score(empty, empty))


def test_masks_of_any_integer_or_bool_dtype_give_the_same_values(overlapping_lines):
    reference, prediction = overlapping_lines
    expected = dice_score(reference, prediction)
    assert dice_score(reference.astype(bool), prediction.astype(np.int64)) == expected
    # Non-zero is foreground, whatever the label value.
    assert dice_score(reference * 2, prediction.astype(np.int16) * 7) == expected
    assert dice_score(reference.astype(np.float32), prediction.astype(np.float64)) == expected


def test_soft_float_masks_are_rejected(overlapping_lines):
    reference, prediction = overlapping_lines
    with pytest.raises(InvalidLabelError, match="threshold"):
        dice_score(reference, prediction * 0.7)


def test_shape_mismatch_raises_geometry_error_naming_both_shapes():
    with pytest.raises(GeometryMismatchError, match=r"\(4, 4, 4\).*\(4, 4, 5\)"):
        dice_score(np.ones((4, 4, 4)), np.ones((4, 4, 5)))


# Hausdorff distance ---------------------------------------------------------------------------


def test_hd95_between_single_voxels_uses_anisotropic_spacing():
    reference = np.zeros((5, 5, 8), dtype=np.uint8)
    prediction = np.zeros_like(reference)
    reference[2, 2, 1] = 1
    prediction[2, 2, 4] = 1  # 3 voxels along z
    assert hausdorff_distance_95(reference, prediction, (1.0, 1.0, 2.5)) == pytest.approx(7.5)
    assert hausdorff_distance_95(reference, prediction, (3.0, 0.2, 1.0)) == pytest.approx(3.0)


def test_hd95_between_parallel_planes_touching_the_array_border():
    # A one-voxel-thick plane is all surface; every surface point is 4 slices from the other.
    reference = np.zeros((6, 7, 10), dtype=np.uint8)
    prediction = np.zeros_like(reference)
    reference[:, :, 2] = 1
    prediction[:, :, 6] = 1
    assert hausdorff_distance_95(reference, prediction, (0.7, 0.9, 2.5)) == pytest.approx(10.0)


def test_hd95_is_zero_for_identical_masks_and_symmetric():
    rng = np.random.default_rng(0)
    reference = _random_blob(rng, (12, 12, 10), 0.2)
    prediction = _random_blob(rng, (12, 12, 10), 0.2)
    spacing = (0.8, 1.1, 2.0)
    assert hausdorff_distance_95(reference, reference, spacing) == 0.0
    assert hausdorff_distance_95(reference, prediction, spacing) == pytest.approx(
        hausdorff_distance_95(prediction, reference, spacing)
    )


@pytest.mark.parametrize("seed", range(8))
def test_hd95_matches_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape = (14, 12, 9)
    reference = _random_blob(rng, shape, rng.uniform(0.05, 0.3))
    prediction = _random_blob(rng, shape, rng.uniform(0.05, 0.3))
    spacing = tuple(rng.uniform(0.5, 3.0, size=3))
    assert hausdorff_distance_95(reference, prediction, spacing) == pytest.approx(
        _brute_force_hd95(reference, prediction, spacing), rel=1e-12
    )


@pytest.mark.parametrize("seed", range(4))
def test_hd95_is_exact_when_small_structures_sit_in_a_large_volume(seed):
    # Blobs placed apart, one against the array border: the cropped distance transform
    # must give the same value as the brute force over the whole volume.
    rng = np.random.default_rng(100 + seed)
    reference = np.zeros((40, 36, 30), dtype=np.uint8)
    prediction = np.zeros_like(reference)
    reference[0:8, 5:13, 3:10] = _random_blob(rng, (8, 8, 7), 0.4)
    prediction[20:30, 25:36, 18:26] = _random_blob(rng, (10, 11, 8), 0.4)
    spacing = (0.6, 1.3, 2.2)
    assert hausdorff_distance_95(reference, prediction, spacing) == pytest.approx(
        _brute_force_hd95(reference, prediction, spacing), rel=1e-12
    )


@pytest.mark.parametrize("max_points", [1, 5, 40, 10_000])
def test_surface_distances_in_slabs_equal_the_brute_force(max_points):
    # Slabs of a few surface voxels (a tree per target slab, source slabs skipped when they
    # cannot come closer) must give every voxel's exact distance, in C order.
    rng = np.random.default_rng(7)
    spacing = np.array([2.5, 0.8, 0.9])
    source = _random_blob(rng, (16, 10, 9), 0.25)
    target = np.zeros_like(source)
    target[11:15, 2:6, 3:7] = _random_blob(rng, (4, 4, 4), 0.5)  # far along axis 0 from most of it
    target[1, 8, 8] = 1
    source_surface = _mask_surface(source.astype(bool))
    target_surface = _mask_surface(target.astype(bool))
    expected = cdist(np.argwhere(source_surface) * spacing, np.argwhere(target_surface) * spacing).min(axis=1)
    found = _directed_surface_distances(source_surface, target_surface, spacing, max_points=max_points)
    np.testing.assert_allclose(found, expected, rtol=1e-12)


def test_hd95_is_nan_when_either_mask_is_empty():
    mask = np.zeros((5, 5, 5), dtype=np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    empty = np.zeros_like(mask)
    spacing = (1.0, 1.0, 1.0)
    assert math.isnan(hausdorff_distance_95(empty, empty, spacing))
    assert math.isnan(hausdorff_distance_95(mask, empty, spacing))
    assert math.isnan(hausdorff_distance_95(empty, mask, spacing))


def test_hd95_miss_penalty_is_the_image_diagonal_in_mm():
    # Field of view 4 x 10 x 3 mm: diagonal sqrt(16 + 100 + 9) = sqrt(125).
    assert hd95_miss_penalty_mm((4, 5, 6), (1.0, 2.0, 0.5)) == pytest.approx(math.sqrt(125.0))
    assert hd95_miss_penalty_mm((3, 4), (1.0, 1.0)) == pytest.approx(5.0)


def test_penalized_hd95_counts_a_miss_as_the_diagonal_and_nothing_to_measure_as_nan():
    mask = np.zeros((4, 5, 6), dtype=np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    empty = np.zeros_like(mask)
    spacing = (1.0, 2.0, 0.5)
    diagonal = math.sqrt(4.0**2 + 10.0**2 + 3.0**2)
    assert hausdorff_distance_95_penalized(mask, empty, spacing) == pytest.approx(diagonal)
    assert hausdorff_distance_95_penalized(empty, mask, spacing) == pytest.approx(diagonal)
    assert math.isnan(hausdorff_distance_95_penalized(empty, empty, spacing))
    shifted = np.roll(mask, 1, axis=2)
    assert hausdorff_distance_95_penalized(mask, shifted, spacing) == pytest.approx(
        hausdorff_distance_95(mask, shifted, spacing)
    )


def test_hd95_rejects_spacing_of_the_wrong_length():
    mask = np.ones((3, 3, 3), dtype=np.uint8)
    with pytest.raises(GeometryMismatchError, match="3 axes"):
        hausdorff_distance_95(mask, mask, (1.0, 1.0))


# Volumes and the per-case row -----------------------------------------------------------------


def test_volume_ml_uses_the_voxel_volume_in_mm3():
    mask = np.zeros((12, 12, 12), dtype=np.uint8)
    mask[1:11, 1:11, 1:11] = 1  # 1000 voxels
    assert volume_ml(mask, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert volume_ml(mask, (1.0, 2.0, 0.5)) == pytest.approx(1.0)
    assert volume_ml(mask, (2.0, 2.0, 2.0)) == pytest.approx(8.0)
    assert volume_ml(np.zeros_like(mask), (2.0, 2.0, 2.0)) == 0.0


def test_evaluate_case_returns_every_metric_as_plain_values(overlapping_lines):
    reference, prediction = overlapping_lines
    spacing = (0.5, 1.0, 2.0)  # 1 mm³ per voxel
    row = evaluate_case(reference, prediction, spacing)
    assert row == {
        "dice": pytest.approx(8 / 14),
        "iou": pytest.approx(0.4),
        # Every voxel of a line is surface. Within 1 mm (0.5 mm a voxel along x): the reference's
        # x 2..7 (x = 2 is exactly 1 mm from x = 4) and all six of the prediction's: 12 of 14.
        "nsd": pytest.approx(12 / 14),
        "hd95_mm": pytest.approx(hausdorff_distance_95(reference, prediction, spacing)),
        "hd95_mm_penalized": pytest.approx(hausdorff_distance_95(reference, prediction, spacing)),
        "precision": pytest.approx(4 / 6),
        "recall": pytest.approx(0.5),
        "reference_ml": pytest.approx(0.008),
        "predicted_ml": pytest.approx(0.006),
        "reference_empty": False,
        "prediction_empty": False,
    }
    assert all(type(value) in (float, bool) for value in row.values())


def test_evaluate_case_flags_empty_masks():
    empty = np.zeros((4, 4, 4), dtype=np.uint8)
    mask = empty.copy()
    mask[1, 1, 1] = 1
    both_empty = evaluate_case(empty, empty, (1.0, 1.0, 1.0))
    assert both_empty["reference_empty"] and both_empty["prediction_empty"]
    assert all(math.isnan(both_empty[key]) for key in ("dice", "iou", "nsd", "hd95_mm"))
    missed = evaluate_case(mask, empty, (1.0, 1.0, 1.0))
    assert not missed["reference_empty"] and missed["prediction_empty"]
    assert missed["dice"] == 0.0 and missed["iou"] == 0.0 and missed["nsd"] == 0.0 and math.isnan(missed["hd95_mm"])
    assert evaluate_case(empty, mask, (1.0, 1.0, 1.0))["nsd"] == 0.0
    assert missed["reference_ml"] == pytest.approx(0.001) and missed["predicted_ml"] == 0.0


def test_evaluate_case_penalizes_a_miss_with_the_image_diagonal():
    empty = np.zeros((4, 5, 6), dtype=np.uint8)
    mask = empty.copy()
    mask[1, 1, 1] = 1
    spacing = (1.0, 2.0, 0.5)
    diagonal = math.sqrt((4 * 1.0) ** 2 + (5 * 2.0) ** 2 + (6 * 0.5) ** 2)
    missed = evaluate_case(mask, empty, spacing)
    assert math.isnan(missed["hd95_mm"])  # MONAI's per-case value is kept
    assert missed["hd95_mm_penalized"] == pytest.approx(diagonal)
    false_alarm = evaluate_case(empty, mask, spacing)
    assert math.isnan(false_alarm["hd95_mm"])
    assert false_alarm["hd95_mm_penalized"] == pytest.approx(diagonal)
    assert math.isnan(evaluate_case(empty, empty, spacing)["hd95_mm_penalized"])


def test_evaluate_case_raises_geometry_error_on_shape_mismatch():
    with pytest.raises(GeometryMismatchError, match=r"\(8, 8, 4\).*\(8, 8, 5\)"):
        evaluate_case(np.zeros((8, 8, 4)), np.zeros((8, 8, 5)), (1.0, 1.0, 1.0))


# Classification metrics -----------------------------------------------------------------------


def _brute_force_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    positives = y_score[y_true == 1][:, None]
    negatives = y_score[y_true == 0][None, :]
    return float(np.mean((positives > negatives) + 0.5 * (positives == negatives)))


def test_roc_auc_of_perfect_reversed_and_tied_rankings():
    y_true = np.array([0, 0, 1, 1])
    assert classification_metrics(y_true, [0.1, 0.2, 0.8, 0.9])["roc_auc"] == 1.0
    assert classification_metrics(y_true, [0.9, 0.8, 0.2, 0.1])["roc_auc"] == 0.0
    assert classification_metrics(y_true, [0.5, 0.5, 0.5, 0.5])["roc_auc"] == 0.5


def test_roc_auc_counts_ties_as_one_half():
    # Pairs (positive, negative): (.5,.5) -> 1/2, (.5,.2), (.9,.5), (.9,.2) -> 1 each.
    result = classification_metrics([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9])
    assert result["roc_auc"] == pytest.approx(3.5 / 4)


def test_roc_auc_matches_pairwise_count_on_random_scores_with_ties():
    rng = np.random.default_rng(7)
    y_true = rng.integers(0, 2, size=60)
    y_score = rng.integers(0, 6, size=60) / 5.0  # many ties
    assert classification_metrics(y_true, y_score)["roc_auc"] == pytest.approx(
        _brute_force_auc(y_true, y_score)
    )


def test_accuracy_and_f1_at_the_threshold():
    result = classification_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    # Predicted [0, 0, 0, 1]: TP=1, FP=0, FN=1, TN=2.
    assert result["accuracy"] == pytest.approx(3 / 4)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["roc_auc"] == pytest.approx(3 / 4)
    # A score equal to the threshold is predicted positive.
    assert classification_metrics([0, 1], [0.2, 0.5])["f1"] == 1.0
    assert classification_metrics([0, 1], [0.2, 0.5], threshold=0.6)["f1"] == 0.0


def test_classification_edge_cases():
    no_positive_predicted = classification_metrics([1, 1, 0], [0.1, 0.2, 0.3])
    assert no_positive_predicted["f1"] == 0.0
    all_negative = classification_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(all_negative["f1"])  # 0/0: no positive, none predicted
    assert math.isnan(all_negative["roc_auc"])  # one class only
    assert all_negative["accuracy"] == 1.0


def test_classification_rejects_bad_input():
    with pytest.raises(ValueError, match="one score per label"):
        classification_metrics([0, 1], [0.5])
    with pytest.raises(ValueError, match="only 0 and 1"):
        classification_metrics([0, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics([0, 1], [0.5, float("nan")])


def test_per_class_metrics_of_two_label_maps_by_hand():
    from medseg.evaluation.metrics import evaluate_case_per_class

    reference = np.zeros((6, 6, 2), dtype=np.uint8)
    prediction = np.zeros_like(reference)
    reference[0:2, 0:2, 0] = 1  # 4 voxels of class 1
    reference[4:6, 4:6, 0] = 2  # 4 voxels of class 2
    prediction[0:2, 0:1, 0] = 1  # 2 of them found
    prediction[4:6, 4:6, 0] = 1  # class 2 predicted as class 1: a swap
    rows = evaluate_case_per_class(reference, prediction, (1.0, 1.0, 2.0), {1: "rim", 2: "core", 3: "absent"})
    assert [(r["class"], r["label"]) for r in rows] == [("rim", 1), ("core", 2), ("absent", 3)]
    rim, core, absent = rows
    assert rim["dice"] == pytest.approx(2 * 2 / (4 + 6)) and rim["iou"] == pytest.approx(2 / 8)
    assert rim["precision"] == pytest.approx(2 / 6) and rim["recall"] == pytest.approx(2 / 4)
    assert core["dice"] == 0.0 and core["prediction_empty"] and np.isnan(core["hd95_mm"])
    assert core["reference_ml"] == pytest.approx(4 * 2.0 / 1000)
    assert np.isnan(absent["dice"]) and absent["reference_empty"] and absent["prediction_empty"]


def test_nsd_of_two_shifted_cubes_by_hand():
    # Two 4³ cubes, one voxel apart along x. Each has 56 surface voxels (64 minus the 2³
    # inside). At distance 0 from the other's surface: its ring voxels in the shared x planes
    # (3 planes × 12) = 36 each, so NSD = 72 / 112 below 1 voxel; at 1 voxel every other surface
    # voxel is one step from the other surface, so NSD = 1.
    reference = np.zeros((10, 10, 10), dtype=bool)
    prediction = np.zeros_like(reference)
    reference[2:6, 2:6, 2:6] = True
    prediction[3:7, 2:6, 2:6] = True
    assert normalized_surface_dice(reference, prediction, (1.0, 1.0, 1.0), tolerance_mm=0.5) == pytest.approx(72 / 112)
    assert normalized_surface_dice(reference, prediction, (1.0, 1.0, 1.0), tolerance_mm=1.0) == 1.0
    # The same voxels 2 mm apart along x: 1 mm reaches only a neighbour in y or z, which adds
    # the 2×2 inner voxels of each cube's face that lies inside the other (1 mm from its ring).
    assert normalized_surface_dice(reference, prediction, (2.0, 1.0, 1.0), tolerance_mm=1.0) == pytest.approx(80 / 112)
    assert evaluate_case(reference, prediction, (2.0, 1.0, 1.0), nsd_tolerance_mm=2.0)["nsd"] == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_nsd_matches_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    reference = _random_blob(rng, (24, 20, 12), 0.3)
    prediction = _random_blob(rng, (24, 20, 12), 0.3)
    spacing, tolerance = (0.7, 1.1, 2.5), 1.5
    surfaces = [np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing) for m in (reference > 0, prediction > 0)]
    distances = cdist(surfaces[0], surfaces[1])
    within = np.count_nonzero(distances.min(axis=1) <= tolerance) + np.count_nonzero(distances.min(axis=0) <= tolerance)
    expected = within / (len(surfaces[0]) + len(surfaces[1]))
    assert 0.0 < expected < 1.0
    assert normalized_surface_dice(reference, prediction, spacing, tolerance) == pytest.approx(expected, rel=1e-12)


def test_nsd_refuses_a_negative_tolerance():
    mask = np.ones((3, 3, 3), dtype=bool)
    with pytest.raises(GeometryMismatchError, match="nsd_tolerance_mm"):
        normalized_surface_dice(mask, mask, (1.0, 1.0, 1.0), tolerance_mm=-1.0)
