"""Temperature scaling and the foreground-weighted ECE, against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import above_mean_segmenter
from medseg.evaluation.calibration import (
    CalibrationCounts,
    apply_temperature,
    balanced_sample,
    fit_temperature,
    temperature_threshold,
)
from medseg.imaging.io import Volume


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def test_the_foreground_weighted_ece_by_hand():
    # Two foreground voxels at 0.9 (bin 13 of 15) and four background voxels at 0.1 (bin 1).
    # Weights: 1/(2·2) per foreground voxel, 1/(2·4) per background one. Bin 13: observed
    # 0.25·2 = 0.5, predicted 0.25·2·0.9 = 0.45; bin 1: observed 0, predicted 0.125·4·0.1 =
    # 0.05. ECE = 0.05 + 0.05.
    counts = CalibrationCounts((1,))
    counts.add(np.array([0.9, 0.9, 0.1, 0.1, 0.1, 0.1]), np.array([1, 1, 0, 0, 0, 0]))
    assert counts.ece() == pytest.approx(0.1)
    # Case by case: the same voxels in two calls give the same sums.
    split = CalibrationCounts((1,))
    split.add(np.array([0.9, 0.1, 0.1]), np.array([1, 0, 0]))
    split.add(np.array([0.9, 0.1, 0.1]), np.array([1, 0, 0]))
    assert split.ece() == pytest.approx(0.1)


def test_a_perfectly_calibrated_bin_has_no_error_and_one_side_only_has_no_ece():
    counts = CalibrationCounts((1,))
    # 0.5 in one bin, where half the voxels are foreground (the same number of each).
    counts.add(np.full(4, 0.5), np.array([1, 1, 0, 0]))
    assert counts.ece() == pytest.approx(0.0)
    only_background = CalibrationCounts((1,))
    only_background.add(np.full(3, 0.2), np.zeros(3, int))
    assert np.isnan(only_background.ece())


def test_the_multiclass_ece_is_the_mean_over_classes_of_one_against_the_rest():
    # Channel 1 (class 1): 0.9 on its two voxels, 0.1 on the four others: ECE 0.1 as above.
    # Channel 2 (class 2) is a binary case of its own; the multiclass ECE is their mean.
    probability = np.array([[0.0, 0.9, 0.1], [0.0, 0.9, 0.1], [0.4, 0.1, 0.5], [0.4, 0.1, 0.5], [0.8, 0.1, 0.1], [0.8, 0.1, 0.1]])
    labels = np.array([1, 1, 2, 0, 0, 0])
    counts = CalibrationCounts((1, 2))
    counts.add(probability, labels)
    first, second = CalibrationCounts((1,)), CalibrationCounts((1,))
    first.add(probability[:, 1], labels == 1)
    second.add(probability[:, 2], labels == 2)
    assert first.ece() == pytest.approx(0.1)
    assert counts.ece() == pytest.approx((first.ece() + second.ece()) / 2)


def test_temperature_scales_the_logits_and_keeps_masks():
    assert float(apply_temperature(np.array(_sigmoid(2.0)), 2.0, binary=True)) == pytest.approx(_sigmoid(1.0), rel=1e-5)
    assert temperature_threshold(0.5, 3.0) == 0.5
    assert temperature_threshold(0.3, 2.0) == pytest.approx(_sigmoid(np.log(0.3 / 0.7) / 2), rel=1e-5)
    softmax = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    scaled = apply_temperature(softmax, 2.0, binary=False)
    assert scaled.sum(axis=-1) == pytest.approx([1.0, 1.0])
    expected = np.sqrt(softmax) / np.sqrt(softmax).sum(axis=-1, keepdims=True)  # exp(log p / 2)
    assert scaled == pytest.approx(expected, rel=1e-5)
    assert (scaled.argmax(axis=-1) == softmax.argmax(axis=-1)).all()


def test_the_fitted_temperature_recovers_an_overconfident_model():
    # The network says sigmoid(z), the truth is sigmoid(z / 2): the fit finds T = 2.
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 4.0, size=200_000)
    labels = (rng.uniform(size=logits.size) < _sigmoid(logits / 2.0)).astype(np.int64)
    assert fit_temperature(_sigmoid(logits), labels, (1,)) == pytest.approx(2.0, rel=0.05)
    # Calibrated already: T = 1.
    labels = (rng.uniform(size=logits.size) < _sigmoid(logits)).astype(np.int64)
    assert fit_temperature(_sigmoid(logits), labels, (1,)) == pytest.approx(1.0, rel=0.05)
    assert fit_temperature(np.array([0.2, 0.3]), np.array([0, 0]), (1,)) == 1.0  # one label: nothing to fit


def test_the_fitted_temperature_of_a_softmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 3.0, size=(100_000, 3))
    truth = np.exp(logits / 0.5)
    truth /= truth.sum(axis=1, keepdims=True)
    labels = (rng.uniform(size=(logits.shape[0], 1)) > truth.cumsum(axis=1)).sum(axis=1)
    probability = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert fit_temperature(probability, labels, (1, 2)) == pytest.approx(0.5, rel=0.05)


def test_the_balanced_sample_takes_both_sides_of_each_class():
    labels = np.zeros((10, 10, 10), int)
    labels[:2] = 1
    probability = np.random.default_rng(0).uniform(size=labels.shape)
    sample, sample_labels = balanced_sample(probability, labels, (1,), 50, np.random.default_rng(0))
    assert sample.shape == (100,) and (sample_labels == 1).sum() == 50
    assert set(sample.tolist()) <= set(probability.reshape(-1).tolist())


def test_a_calibrated_segmenter_keeps_its_masks_and_moves_its_probabilities():
    segmenter = above_mean_segmenter()
    scan = Volume(np.random.default_rng(3).normal(100, 20, size=(12, 10, 6)).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    image, _ = segmenter.preprocess(scan)
    plain = segmenter.probabilities(image)
    mask = segmenter.segment(scan).data
    segmenter.plan.temperature = 4.0
    assert (segmenter.segment(scan).data == mask).all()
    calibrated = segmenter.probabilities(image)
    assert calibrated == pytest.approx(apply_temperature(plain, 4.0, binary=True), abs=1e-6)
    assert np.abs(calibrated - 0.5).max() < np.abs(plain - 0.5).max()  # less confident
