"""Unit tests of medseg.evaluation.reports: the summary and the figures."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from medseg.errors import ConfigurationError, GeometryMismatchError
from medseg.evaluation.metrics import evaluate_case
from medseg.evaluation.reports import (
    choose_overlay_slice,
    flatten_summary,
    plot_overlays,
    plot_training_curves,
    summarize_metrics,
)


@pytest.fixture
def per_case() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "case_id": ["a", "b", "c", "d"],
            "dice": [0.8, 0.6, float("nan"), 1.0],
            "iou": [0.5, 0.5, float("nan"), 0.5],
            "hd95_mm": [1.0, float("inf"), float("nan"), 3.0],
            "hd95_mm_penalized": [1.0, 50.0, float("nan"), 40.0],
            "precision": [1.0, 0.5, float("nan"), 1.0],
            "recall": [float("nan")] * 4,
            "reference_empty": [False, False, True, True],
            "prediction_empty": [False, True, True, False],
        }
    )


# Summary --------------------------------------------------------------------------------------


def test_summary_leaves_nan_out_of_the_mean_and_counts_it(per_case):
    summary = summarize_metrics(per_case)
    assert summary["n_cases"] == 4
    dice = summary["dice"]
    assert dice["mean"] == pytest.approx(0.8)
    assert dice["std"] == pytest.approx(math.sqrt((0.0 + 0.04 + 0.04) / 3))  # ddof=0
    assert dice["median"] == pytest.approx(0.8)
    assert (dice["n"], dice["n_missing"]) == (3, 1)


def test_summary_counts_infinite_distances_as_missing(per_case):
    hd95 = summarize_metrics(per_case)["hd95_mm"]
    assert hd95["mean"] == pytest.approx(2.0)
    assert (hd95["n"], hd95["n_missing"]) == (2, 2)


def test_penalized_hd95_mean_counts_a_missed_case_and_does_not_reward_it():
    # Case "hit": two single voxels 3 slices apart along z (2 mm) -> HD95 = 6 mm.
    # Case "miss": the same reference, an empty prediction -> HD95 NaN, penalty = diagonal.
    shape, spacing = (4, 5, 8), (1.0, 1.5, 2.0)
    diagonal = math.sqrt((4 * 1.0) ** 2 + (5 * 1.5) ** 2 + (8 * 2.0) ** 2)
    reference = np.zeros(shape, dtype=np.uint8)
    reference[2, 2, 1] = 1
    prediction = np.zeros_like(reference)
    prediction[2, 2, 4] = 1
    rows = [
        {"case_id": "hit", **evaluate_case(reference, prediction, spacing)},
        {"case_id": "miss", **evaluate_case(reference, np.zeros_like(reference), spacing)},
    ]
    summary = summarize_metrics(pd.DataFrame(rows))
    assert summary["hd95_mm"]["mean"] == pytest.approx(6.0)  # the miss drops out
    assert (summary["hd95_mm"]["n"], summary["hd95_mm"]["n_missing"]) == (1, 1)
    penalized = summary["hd95_mm_penalized"]
    assert penalized["mean"] == pytest.approx((6.0 + diagonal) / 2)
    assert (penalized["n"], penalized["n_missing"]) == (2, 0)
    assert penalized["mean"] > summary["hd95_mm"]["mean"]
    flat = flatten_summary(summary)
    assert flat["test_hd95_mm_penalized_mean"] == pytest.approx((6.0 + diagonal) / 2)
    assert flat["test_hd95_mm_mean"] == pytest.approx(6.0)


def test_summary_of_an_all_missing_metric_is_none(per_case):
    recall = summarize_metrics(per_case)["recall"]
    assert recall == {"mean": None, "std": None, "median": None, "n": 0, "n_missing": 4}


def test_summary_counts_empty_masks(per_case):
    summary = summarize_metrics(per_case)
    assert summary["n_reference_empty"] == 2
    assert summary["n_prediction_empty"] == 2
    assert summary["n_both_empty"] == 1


def test_summary_is_strict_json(per_case):
    summary = summarize_metrics(per_case)
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary


def test_summary_of_chosen_metrics_only(per_case):
    summary = summarize_metrics(per_case.drop(columns=["reference_empty"]), metrics=["iou"])
    assert set(summary) == {"n_cases", "iou"}
    assert summary["iou"]["std"] == 0.0


def test_summary_rejects_unknown_metrics(per_case):
    with pytest.raises(ConfigurationError, match="hd99"):
        summarize_metrics(per_case, metrics=["dice", "hd99"])


def test_flatten_summary_gives_mlflow_metric_names(per_case):
    flat = flatten_summary(summarize_metrics(per_case))
    assert flat["test_dice_mean"] == pytest.approx(0.8)
    assert flat["test_hd95_mm_n_missing"] == 2.0
    assert flat["test_n_cases"] == 4.0
    assert "test_recall_mean" not in flat  # None has no MLflow value


# Figures --------------------------------------------------------------------------------------


def _png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def test_training_curves_have_one_axis_per_family_with_train_and_val():
    history = {
        "dice": [0.2, 0.4, 0.5],
        "loss": [1.0, 0.7, 0.5],
        "iou": [0.1, 0.3, 0.4],
        "val_loss": [1.1, 0.8, 0.6],
        "val_dice": [0.1, 0.3, 0.45],
        "val_iou": [0.05, 0.2, 0.3],
    }
    figure = plot_training_curves(history)
    assert isinstance(figure, Figure)
    assert [axis.get_title() for axis in figure.axes] == ["loss", "dice", "iou"]
    for axis in figure.axes:
        lines = axis.get_lines()
        assert [line.get_label() for line in lines] == ["train", "val"]
        np.testing.assert_array_equal(lines[0].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(figure.axes[0].get_lines()[1].get_ydata(), history["val_loss"])
    assert _png_bytes(figure).startswith(b"\x89PNG")


def test_training_curves_without_validation():
    figure = plot_training_curves({"loss": [0.9, 0.5]})
    assert len(figure.axes) == 1
    assert len(figure.axes[0].get_lines()) == 1


def test_training_curves_reject_an_empty_history():
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves({})


def test_overlays_have_one_row_per_case_with_both_contours():
    image = np.random.default_rng(0).random((16, 12)).astype(np.float32)
    reference = np.zeros((16, 12), dtype=np.uint8)
    reference[4:10, 3:8] = 1
    prediction = np.roll(reference, 2, axis=0)
    figure = plot_overlays(
        [
            ("case_001", image, reference, prediction),
            ("case_002", image, reference, np.zeros_like(reference)),
        ]
    )
    assert isinstance(figure, Figure)
    first, second = figure.axes
    assert (first.get_title(), second.get_title()) == ("case_001", "case_002")
    assert len(first.images) == 1 and len(second.images) == 1
    assert len(first.collections) == 2  # reference and prediction contours
    assert len(second.collections) == 1  # an empty prediction draws no contour
    assert _png_bytes(figure).startswith(b"\x89PNG")


def test_overlays_reject_mismatched_slices():
    with pytest.raises(GeometryMismatchError, match="case_009"):
        plot_overlays([("case_009", np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 9)))])


def test_overlay_slice_is_where_the_reference_is_largest():
    reference = np.zeros((6, 6, 5), dtype=np.uint8)
    prediction = np.zeros_like(reference)
    reference[1:3, 1:3, 1] = 1
    reference[1:5, 1:5, 3] = 1
    prediction[:, :, 4] = 1
    assert choose_overlay_slice(reference, prediction) == 3
    assert choose_overlay_slice(np.zeros_like(reference), prediction) == 4
    assert choose_overlay_slice(np.zeros_like(reference), np.zeros_like(reference)) == 2


# Reports that explain themselves (issue 12, item 6) -------------------------------------------


def test_one_epoch_curves_have_integer_ticks_and_a_visible_point():
    history = {"loss": [0.9], "val_loss": [1.0], "dice": [0.3], "val_dice": [0.25]}
    figure = plot_training_curves(history)
    _png_bytes(figure)  # draw, so the tick locators run
    for axis in figure.axes:
        assert axis.get_xlim() == (0.5, 1.5)
        assert [tick for tick in axis.get_xticks() if 0.5 <= tick <= 1.5] == [1.0]
        shown = [label.get_text() for label in axis.get_xticklabels() if 0.5 <= label.get_position()[0] <= 1.5]
        assert shown == ["1"]
        for line in axis.get_lines():
            assert line.get_marker() == "o" and line.get_markersize() >= 4
            np.testing.assert_array_equal(line.get_xdata(), [1])


def test_many_epoch_curves_tick_whole_epochs_only():
    figure = plot_training_curves({"loss": list(np.linspace(1.0, 0.1, 7))})
    _png_bytes(figure)
    axis = figure.axes[0]
    ticks = [tick for tick in axis.get_xticks() if 0.5 <= tick <= 7.5]
    assert ticks and all(float(tick).is_integer() for tick in ticks)
    assert axis.get_xlim() == (0.5, 7.5)


def test_training_curves_say_their_dice_is_the_batch_dice_of_the_samples():
    history = {"loss": [0.9, 0.5], "dice": [0.3, 0.6], "val_dice": [0.2, 0.5], "iou": [0.1, 0.4]}
    figure = plot_training_curves(history, samples="sampled 2D slices")
    assert [axis.get_title() for axis in figure.axes] == ["loss", "dice (batch, soft)", "iou (batch, soft)"]
    caption = figure.get_supxlabel()
    assert "soft (smoothed, from probabilities) Dice and IoU of each batch of sampled 2D slices" in caption
    assert "not the per-case 3D test Dice" in caption and "metrics_summary.json" in caption
    assert _png_bytes(figure).startswith(b"\x89PNG")
    # Without `samples`, or with no Dice/IoU family (the patch classifier), no caption.
    assert plot_training_curves(history).get_supxlabel() == ""
    assert plot_training_curves({"loss": [1.0], "accuracy": [0.5]}, samples="sampled 3D patches").get_supxlabel() == ""
    per_class = plot_training_curves({"loss": [1.0], "dice_1": [0.5], "val_dice_1": [0.4]}, samples="sampled 3D patches")
    assert [axis.get_title() for axis in per_class.axes] == ["loss", "dice_1 (batch, soft)"]
    assert "sampled 3D patches" in per_class.get_supxlabel()


def test_overlay_titles_give_the_case_its_slice_and_its_dice():
    from medseg.evaluation import OverlaySlice

    image = np.zeros((8, 8), dtype=np.float32)
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:5, 2:5] = 1
    figure = plot_overlays(
        [
            OverlaySlice("case_003", image, mask, mask, z=12, dice=0.87449),
            ("case_004", image, mask, mask, 0, float("nan")),
            ("case_005", image, mask, mask),
        ]
    )
    assert [axis.get_title() for axis in figure.axes] == [
        "case_003 · axial slice 12 · case Dice 0.874",
        "case_004 · axial slice 0 · case Dice n/a (both masks empty)",
        "case_005",
    ]


def test_flatten_summary_skips_provenance_strings(per_case):
    summary = {**summarize_metrics(per_case), "mlflow_run_id": "abc", "mlflow_run_name": "UNet-run1", "data_dir": None}
    flat = flatten_summary(summary)
    assert flat == flatten_summary(summarize_metrics(per_case))
    assert all(isinstance(value, float) for value in flat.values())


def test_per_class_summary_takes_the_mean_over_classes():
    from medseg.evaluation import flatten_class_means, summarize_per_class

    rows = pd.DataFrame(
        [
            {"case_id": "a", "class": "rim", "dice": 0.8, "iou": 0.6, "hd95_mm": 2.0, "hd95_mm_penalized": 2.0, "precision": 1.0, "recall": 0.5},
            {"case_id": "b", "class": "rim", "dice": 0.6, "iou": 0.4, "hd95_mm": 4.0, "hd95_mm_penalized": 4.0, "precision": 1.0, "recall": 0.5},
            {"case_id": "a", "class": "core", "dice": 0.2, "iou": 0.1, "hd95_mm": 8.0, "hd95_mm_penalized": 8.0, "precision": 0.5, "recall": 0.5},
            {"case_id": "b", "class": "core", "dice": float("nan"), "iou": float("nan"), "hd95_mm": float("nan"), "hd95_mm_penalized": float("nan"), "precision": float("nan"), "recall": float("nan")},
        ]
    )
    summary = summarize_per_class(rows)
    assert summary["n_cases"] == 2
    assert summary["classes"]["rim"]["dice"]["mean"] == pytest.approx(0.7)
    assert summary["classes"]["core"]["dice"]["mean"] == pytest.approx(0.2)
    assert summary["dice"]["mean"] == pytest.approx((0.7 + 0.2) / 2)  # not the pooled 1.6 / 3
    assert summary["dice"]["n"] == 3 and summary["dice"]["n_missing"] == 1
    flat = flatten_class_means(summary)
    assert flat["test_dice_rim_mean"] == pytest.approx(0.7) and flat["test_dice_core_mean"] == pytest.approx(0.2)
    single = rows[rows["class"] == "rim"]
    assert summarize_per_class(single)["dice"] == summarize_per_class(single)["classes"]["rim"]["dice"]
