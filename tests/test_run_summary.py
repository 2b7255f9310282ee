"""medseg.runs.summary: the closing lines of a model run, read from the catalog."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline
from kedro_datasets.json import JSONDataset

from medseg.runs.summary import RunSummaryHook, format_run_summary, model_line


def _summary(run_name: str | None = "UNet-Adam-BCE+Dice-20261125-run3", **overrides) -> dict:
    summary = {
        "n_cases": 5,
        "dice": {"mean": 0.88149, "std": 0.02, "median": 0.88, "n": 5, "n_missing": 0},
        "iou": {"mean": 0.79061, "std": 0.03, "median": 0.79, "n": 5, "n_missing": 0},
        "hd95_mm": {"mean": 7.1893, "std": 1.0, "median": 7.0, "n": 5, "n_missing": 0},
        "hd95_mm_penalized": {"mean": 7.1893, "std": 1.0, "median": 7.0, "n": 5, "n_missing": 0},
        "mlflow_run_id": "0123abcd",
        "mlflow_run_name": run_name,
    }
    summary.update(overrides)
    return summary


def test_model_line_gives_test_dice_iou_and_both_hd95_means():
    assert model_line("unet", _summary()) == (
        "unet: test Dice 0.881, IoU 0.791, HD95 7.19 mm, penalized HD95 7.19 mm (5 test cases)"
    )


def test_model_line_says_when_a_mean_leaves_cases_out():
    summary = _summary(
        n_cases=1,
        hd95_mm={"mean": None, "std": None, "median": None, "n": 0, "n_missing": 1},
        hd95_mm_penalized={"mean": 120.5, "std": 0.0, "median": 120.5, "n": 1, "n_missing": 0},
        dice={"mean": 0.0, "std": 0.0, "median": 0.0, "n": 1, "n_missing": 0},
        iou={"mean": 0.0, "std": 0.0, "median": 0.0, "n": 1, "n_missing": 0},
    )
    assert model_line("conv3d", summary) == (
        "conv3d: test Dice 0.000, IoU 0.000, HD95 n/a, penalized HD95 120.50 mm (1 test case)"
    )
    partly = _summary(hd95_mm={"mean": 6.0, "std": 0.0, "median": 6.0, "n": 4, "n_missing": 1})
    assert "HD95 6.00 mm on 4 of 5," in model_line("unet", partly)


def test_run_summary_names_the_run_each_model_its_reports_and_the_ui():
    text = format_run_summary(
        {"unet": _summary(), "conv3d": _summary(dice={"mean": 0.85, "n": 5, "n_missing": 0})},
        {"unet": "data/08_reporting/unet", "conv3d": "data/08_reporting/conv3d"},
    )
    assert text.splitlines() == [
        "Run UNet-Adam-BCE+Dice-20261125-run3 finished.",
        "  unet: test Dice 0.881, IoU 0.791, HD95 7.19 mm, penalized HD95 7.19 mm (5 test cases)",
        "        reports in data/08_reporting/unet",
        "  conv3d: test Dice 0.850, IoU 0.791, HD95 7.19 mm, penalized HD95 7.19 mm (5 test cases)",
        "          reports in data/08_reporting/conv3d",
        "`kedro mlflow ui` to see more (curves, parameters, models, artifacts).",
    ]


def test_an_untracked_run_says_so():
    text = format_run_summary({"unet": _summary(run_name=None)}, {"unet": None})
    assert text.splitlines()[0] == "Run finished (not tracked by MLflow)."
    assert "reports in" not in text


def _identity(x):
    return x


def _catalog_with_summary(tmp_path: Path, summary: dict) -> DataCatalog:
    path = tmp_path / "data" / "08_reporting" / "unet" / "metrics_summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary))
    return DataCatalog({"unet.metrics_summary": JSONDataset(filepath=str(path)), "other": MemoryDataset(1)})


def test_hook_prints_the_summary_of_the_models_this_run_evaluated(tmp_path, capsys):
    catalog = _catalog_with_summary(tmp_path, _summary())
    pipeline = Pipeline([Node(_identity, "a", "unet.metrics_summary", name="summarize_evaluation", namespace="unet")])
    RunSummaryHook().after_pipeline_run({"project_path": str(tmp_path)}, pipeline, catalog)
    assert capsys.readouterr().out == (
        "\nRun UNet-Adam-BCE+Dice-20261125-run3 finished.\n"
        "  unet: test Dice 0.881, IoU 0.791, HD95 7.19 mm, penalized HD95 7.19 mm (5 test cases)\n"
        "        reports in data/08_reporting/unet\n"
        "`kedro mlflow ui` to see more (curves, parameters, models, artifacts).\n\n"
    )


def test_hook_is_silent_when_no_model_was_evaluated(tmp_path, capsys, caplog):
    """A `data` run, or a run from a node after the summary: an old summary is not shown."""
    caplog.set_level(logging.INFO, logger="medseg.runs.summary")
    catalog = _catalog_with_summary(tmp_path, _summary())
    pipeline = Pipeline([Node(_identity, "a", "b", name="predict_unet", namespace="unet")])
    RunSummaryHook().after_pipeline_run({"project_path": str(tmp_path)}, pipeline, catalog)
    assert capsys.readouterr().out == "" and caplog.messages == []


def test_hook_warns_instead_of_failing_when_the_summary_is_unreadable(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="medseg.runs.summary")
    catalog = DataCatalog({"unet.metrics_summary": JSONDataset(filepath=str(tmp_path / "missing.json"))})
    pipeline = Pipeline([Node(_identity, "a", "unet.metrics_summary", name="summarize_evaluation", namespace="unet")])
    RunSummaryHook().after_pipeline_run({"project_path": str(tmp_path)}, pipeline, catalog)
    # No summary block is printed (a rich log handler that an earlier Kedro session installed
    # may echo the warning on stdout: only the block's text is checked).
    assert "test Dice" not in capsys.readouterr().out
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert caplog.messages[0].startswith("No summary of unet: unet.metrics_summary could not be read")


# Imported before any test sets up caplog: importing Kedro's project module configures logging
# (conf/logging.yml) and replaces the root logger's handlers, caplog's among them.
from medseg.runs.hooks import StageLinesHook  # noqa: E402


def test_a_line_per_node_with_its_count_and_time(caplog):
    import logging
    from types import SimpleNamespace

    caplog.set_level(logging.INFO, logger="medseg.stages")
    nodes = [SimpleNamespace(name=f"data.step_{i}") for i in range(10)]
    hook = StageLinesHook()
    hook.before_pipeline_run({"pipeline_names": ["data"]}, SimpleNamespace(nodes=nodes), None)
    for node in nodes:
        hook.before_node_run(node)
        hook.after_node_run(node)
    lines = caplog.messages
    assert lines[0] == "kedro run --pipelines data: 10 steps (kedro run --verbose for the full log)"
    assert len(lines) == 11 and lines[1].startswith("[ 1/10] data.step_0 ") and lines[-1].startswith("[10/10] data.step_9 ")
    assert all(line.endswith(" s") for line in lines[1:])


def test_a_long_training_writes_at_most_eight_epoch_lines_and_the_last(caplog):
    import logging

    from medseg.models.training import EpochLines

    caplog.set_level(logging.INFO, logger="medseg.stages")
    lines = EpochLines(20)
    for epoch in range(20):
        lines.on_epoch_begin(epoch)
        lines.on_epoch_end(epoch, {"loss": 0.5, "val_loss": 0.4, "val_dice": 0.75})
    shown = [message.split()[1] for message in caplog.messages]
    assert shown == ["3/20", "6/20", "9/20", "12/20", "15/20", "18/20", "20/20"]
    assert "val_dice 0.750" in caplog.messages[-1]
