"""A split without test cases (`data.split.test: 0`, nnU-Net users' way: every case trains or
validates, new scans go to `predict`) is accepted at the start, so it must not fail at the end:
the test evaluation is skipped and says so, its table is written and reads back, and the run's
closing lines say why there is no test score."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from kedro_datasets.pandas import CSVDataset
from matplotlib.figure import Figure

from medseg.evaluation.reports import NO_TEST_CASE, summarize_per_class
from medseg.imaging.geometry import PreprocessingPlan
from medseg.pipelines.evaluation import evaluate_predictions
from medseg.pipelines.selection import score_best_configuration
from medseg.runs.summary import model_line

SPLITS = pd.DataFrame({"case_id": ["a", "b", "c"], "split": ["train", "train", "val"]})
FINGERPRINT = {"classes": {"1": "right", "2": "left"}, "label_mode": "multiclass"}
EVALUATION = {"nsd_tolerance_mm": 1.0, "bootstrap_resamples": 100, "bootstrap_seed": 0, "confidence_level": 0.95}


def _never(case_id: str):
    raise AssertionError(f"case {case_id} is not a test case and must not be read")


def test_the_evaluation_without_test_cases_writes_an_empty_table_that_reads_back(tmp_path: Path, caplog):
    never = {case_id: (lambda case_id=case_id: _never(case_id)) for case_id in SPLITS["case_id"]}
    with caplog.at_level(logging.WARNING, logger="medseg"):
        table, figure = evaluate_predictions(never, never, never, PreprocessingPlan({}), SPLITS, FINGERPRINT,
                                             {"foreground_labels": None}, {"reporting": {"n_overlay_cases": 2}}, EVALUATION)
    assert "no test case (data.split.test is 0): the test evaluation is skipped" in caplog.text
    assert table.empty and {"case_id", "class", "label", "dice", "iou", "hd95_mm"} <= set(table.columns)
    assert isinstance(figure, Figure) and NO_TEST_CASE in [t.get_text() for t in figure.axes[0].texts]

    # The catalog's CSV entry (`<model>.metrics_per_case`) reads its own empty table back.
    dataset = CSVDataset(filepath=str(tmp_path / "metrics_per_case.csv"), save_args={"index": False},
                         load_args={"dtype": {"case_id": "str"}, "keep_default_na": False, "na_values": [""]})
    dataset.save(table)
    assert list(dataset.load().columns) == list(table.columns) and dataset.load().empty

    summary = summarize_per_class(table)
    assert summary["n_cases"] == 0 and summary["dice"]["mean"] is None
    assert model_line("unet", summary) == ("unet: no test case in the split (data.split.test is 0), so no test score; "
                                           "with cv.folds, cv_summary.json holds the out-of-fold scores")


def test_the_selection_without_test_cases_keeps_its_choice_and_scores_nothing(caplog):
    never = {case_id: (lambda case_id=case_id: _never(case_id)) for case_id in SPLITS["case_id"]}

    class NoSegmenter:
        name = "unet"

        def segment(self, *args):
            raise AssertionError("nothing to segment without test cases")

    with caplog.at_level(logging.WARNING, logger="medseg"):
        table, metrics = score_best_configuration(NoSegmenter(), never, never, PreprocessingPlan({}), SPLITS, FINGERPRINT,
                                                  {"foreground_labels": None}, EVALUATION)
    assert table.empty and "dice" in table.columns and metrics == {}
    assert "the choice stands on its cross-validation Dice alone" in caplog.text
