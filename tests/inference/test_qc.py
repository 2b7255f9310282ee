"""The QC flags of a prediction: ranges from training cases, thresholds from held-out ones, and
each flag's score and reason, against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.inference.qc import (
    QualityReference,
    ScanFeatures,
    assess,
    canonical_extent_mm,
    entropy_of,
    grid_volumes_ml,
    predicted_foreground,
    scan_features,
)


def _features(spacing=(1.0, 1.0, 2.0), extent=(100.0, 100.0, 60.0), orientation="RAS", mean=50.0, std=20.0):
    return ScanFeatures(spacing, extent, orientation, mean, std)


def _reference() -> QualityReference:
    # Three training cases: intensity means 40..60, volumes 10..20 ml of class "1".
    features = [_features(mean=m) for m in (40.0, 50.0, 60.0)]
    return QualityReference.from_training(features, [{"1": 10.0}, {"1": 15.0}, {"1": 20.0}])


def test_the_ranges_come_from_the_training_cases():
    reference = _reference()
    assert reference.intensity_mean == [40.0, 60.0] and reference.volume_ml == {"1": [10.0, 20.0]}
    assert reference.spacing[2] == [2.0, 2.0] and reference.orientations == ["RAS"] and reference.always_present == ["1"]


def test_a_case_like_the_training_cases_raises_no_flag():
    reference = _reference()
    row = assess(reference, reference.raw_scores(_features(mean=45.0), entropy=0.02, volumes={"1": 12.0}))
    assert row["qc_flags"] == "" and row["qc_reason"] == ""
    assert row["qc_score"] == pytest.approx(0.02 / 0.1)  # the floors: confidence 0.1
    assert row["qc_out_of_distribution"] == 0.0 and row["qc_implausible_size"] == 0.0


def test_each_flag_by_hand():
    reference = _reference()
    # Spacing 3 mm along S where training had 2: the range has no width, so its tolerance is a
    # tenth of 2 mm; (3 - 2) / 0.2 = 5 widths, over the floor 0.5: a score of 10.
    raw = reference.raw_scores(_features(spacing=(1.0, 1.0, 3.0)), entropy=0.02, volumes={"1": 12.0})
    assert raw["out_of_distribution"][0] == pytest.approx(5.0)
    assert "spacing S 3 mm outside the training range [2, 2]" in raw["out_of_distribution"][1]
    row = assess(reference, raw)
    assert row["qc_flags"] == "out_of_distribution" and row["qc_score"] == pytest.approx(10.0)

    # 35 ml against 10..20: (35 - 20) / 10 = 1.5 widths, over 0.5: 3.
    row = assess(reference, reference.raw_scores(_features(), entropy=0.02, volumes={"1": 35.0}))
    assert row["qc_flags"] == "implausible_size" and row["qc_implausible_size"] == pytest.approx(3.0)
    # Empty where every training case had it.
    row = assess(reference, reference.raw_scores(_features(), entropy=0.0, volumes={"1": 0.0}))
    assert "class 1 empty" in row["qc_reason"] and row["qc_implausible_size"] == pytest.approx(20.0)

    # An entropy of 0.3 against the floor 0.1, and an orientation never seen.
    row = assess(reference, reference.raw_scores(_features(orientation="LPS"), entropy=0.3, volumes={"1": 15.0}))
    assert row["qc_flags"] == "out_of_distribution;low_confidence"
    assert row["qc_low_confidence"] == pytest.approx(3.0) and row["qc_out_of_distribution"] == pytest.approx(2.0)
    assert "orientation LPS" in row["qc_reason"]


def test_the_thresholds_come_from_the_held_out_cases():
    reference = _reference()
    held_out = [reference.raw_scores(_features(mean=65.0), entropy=0.2, volumes={"1": 12.0}),
                reference.raw_scores(_features(), entropy=0.05, volumes={"1": 12.0})]
    reference.calibrated(held_out)
    # Intensity mean 65 is (65 - 60) / 20 = 0.25 widths out: below the floor 0.5, which stays.
    assert reference.thresholds == {"out_of_distribution": 0.5, "low_confidence": pytest.approx(0.22),
                                    "implausible_size": 0.5}
    assert reference.held_out_cases == 2
    # No held-out case is flagged by the thresholds it set.
    assert all(assess(reference, case)["qc_flags"] == "" for case in held_out)
    assert QualityReference.from_dict(reference.to_dict()) == reference


def test_the_entropy_threshold_rises_to_its_prediction_bound_with_enough_held_out_cases():
    from medseg.inference.qc import FALSE_FLAG_RATE, prediction_bound

    # Logarithms -3, -2.5, -2 (entropies 0.0498, 0.0821, 0.1353): mean -2.5, sd 0.5, n 3.
    # Student's t with 2 degrees of freedom has F(t) = 1/2 + t / (2 sqrt(2 + t^2)): at
    # F = 1 - 0.1 / 3, t / sqrt(2 + t^2) = 0.9333..., so t^2 = 2 q / (1 - q) with q = 0.9333^2.
    q = (2 * (1 - 0.1 / 3) - 1) ** 2
    t = np.sqrt(2 * q / (1 - q))
    entropies = list(np.exp([-3.0, -2.5, -2.0]))
    expected = np.exp(-2.5 + t * 0.5 * np.sqrt(1 + 1 / 3))
    assert prediction_bound(entropies, FALSE_FLAG_RATE / 3) == pytest.approx(expected, rel=1e-3)
    assert prediction_bound(entropies[:2], 0.05) == 0.0  # too few to say
    reference = _reference()
    reference.calibrated([reference.raw_scores(_features(), entropy=e, volumes={"1": 12.0}) for e in entropies])
    assert reference.thresholds["low_confidence"] == pytest.approx(expected, rel=1e-3)  # above 1.1 x 0.1353


def test_entropy_volumes_and_features_of_a_prediction():
    probability = np.zeros((4, 4, 4), np.float32)
    probability[0, 0, :2] = 0.5  # one bit each
    probability[1, 1, :2] = 1.0  # no bit
    foreground = predicted_foreground(probability, 0.5)
    assert foreground.shape == (4,) and entropy_of(foreground) == pytest.approx(0.5, abs=1e-5)
    assert grid_volumes_ml(probability, 0.5, ["1"], 2.0) == {"1": 8.0}
    softmax = np.zeros((2, 2, 1, 3), np.float32)
    softmax[..., 0] = 1.0
    softmax[0, 0, 0] = [0.0, 0.5, 0.5]  # argmax 1, entropy log2(2) / log2(3)
    assert entropy_of(predicted_foreground(softmax, 0.5)) == pytest.approx(1 / np.log2(3), rel=1e-5)
    assert grid_volumes_ml(softmax, 0.5, ["3", "7"], 1.0) == {"3": 1.0, "7": 0.0}
    assert entropy_of(np.zeros(0)) == 0.0

    # An LPS scan of 10 x 20 x 30 voxels of 1 x 2 x 3 mm.
    affine = np.diag([-1.0, -2.0, 3.0, 1.0])
    data = np.arange(6000, dtype=np.float32).reshape(10, 20, 30)
    features = scan_features(data, affine)
    assert features.orientation == "LPS" and features.spacing == (1.0, 2.0, 3.0)
    assert features.extent_mm == (10.0, 40.0, 90.0) == canonical_extent_mm(data.shape, affine)
    assert features.intensity_mean == pytest.approx(2999.5)
    # Axes swapped: the first array axis runs along S (1 mm), the last along R (1.5 mm).
    swapped = np.array([[0, 0, 1.5, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    assert canonical_extent_mm((10, 20, 30), swapped) == (45.0, 20.0, 10.0)
