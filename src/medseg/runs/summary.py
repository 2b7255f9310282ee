"""The last lines of a model run: its MLflow name, its test metrics, and where to look next.

Kedro ends a run with "Pipeline execution completed successfully"; this hook follows that line
with what the user ran it for, printed as a plain block (not a log record, whose message column
would wrap it on an 80-column console):

    Run UNet-Adam-BCE+Dice-20261125-run3 finished.
      unet: test Dice 0.881, IoU 0.791, HD95 7.19 mm, penalized HD95 7.19 mm (5 test cases)
            reports in reporting/unet
    `kedro mlflow ui` to see more (curves, parameters, models, artifacts).

The figures are read back from each model's `metrics_summary.json` through the catalog, so the
lines say what the reports say. A model is listed only when this run evaluated it (its
`<model>.summarize_evaluation` node ran); a failed run ends in Kedro's error instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl


logger = logging.getLogger(__name__)

SUMMARY_DATASET = "{model}.metrics_summary"
SUMMARY_NODE = "{model}.summarize_evaluation"


def _number(value: Any, digits: int = 3, unit: str = "") -> str:
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{float(value):.{digits}f}{unit}"


def _statistic(summary: Mapping[str, Any], metric: str) -> tuple[Any, int, int]:
    """(mean, n, n_missing) of one metric of a `metrics_summary.json`."""
    entry = summary.get(metric) or {}
    return entry.get("mean"), int(entry.get("n") or 0), int(entry.get("n_missing") or 0)


def model_line(model: str, summary: Mapping[str, Any]) -> str:
    """`unet: test Dice 0.881, IoU 0.791, HD95 7.19 mm, penalized HD95 7.19 mm (5 test cases)`.

    A metric left undefined for some cases says on how many it is a mean ("HD95 6.00 mm on 4
    of 5"): Dice and IoU are undefined when both masks are empty, HD95 when either is; the
    penalized HD95 counts a missed case as the image diagonal, so it never rewards a miss.
    """
    n_cases = int(summary.get("n_cases") or 0)
    if n_cases == 0:
        return (f"{model}: no test case in the split (data.split.test is 0), so no test score; with cv.folds, "
                "cv_summary.json holds the out-of-fold scores")
    parts = []
    for label, metric, digits, unit in (
        ("test Dice", "dice", 3, ""),
        ("IoU", "iou", 3, ""),
        ("HD95", "hd95_mm", 2, " mm"),
        ("penalized HD95", "hd95_mm_penalized", 2, " mm"),
    ):
        if metric not in summary:
            continue
        mean, n, missing = _statistic(summary, metric)
        text = f"{label} {_number(mean, digits, unit)}"
        if missing and mean is not None:
            text += f" on {n} of {n + missing}"
        parts.append(text)
    return f"{model}: {', '.join(parts)} ({n_cases} test case{'s' if n_cases != 1 else ''})"


def format_run_summary(summaries: Mapping[str, Mapping[str, Any]], report_folders: Mapping[str, str | None]) -> str:
    """The closing message of a run that evaluated one or more models.

    Args:
        summaries: {model: its `metrics_summary.json`}, in the order to list them; the run name
            is read from their `mlflow_run_name` (absent or None: the run was not tracked).
        report_folders: {model: its reports folder}, shown as given.

    Returns:
        Several lines: the run's name, one line of test metrics per model with its reports
        folder, then "`kedro mlflow ui` to see more".
    """
    names = [summary.get("mlflow_run_name") for summary in summaries.values() if summary.get("mlflow_run_name")]
    lines = [f"Run {names[0]} finished." if names else "Run finished (not tracked by MLflow)."]
    for model, summary in summaries.items():
        lines.append(f"  {model_line(model, summary)}")
        if report_folders.get(model):
            lines.append(f"  {' ' * len(model)}  reports in {report_folders[model]}")
    lines.append("`kedro mlflow ui` to see more (curves, parameters, models, artifacts).")
    return "\n".join(lines)


def _report_folder(dataset: Any, project_path: str | Path | None) -> str | None:
    """The folder of a file dataset, relative to the project when inside it (None if unknown)."""
    try:
        filepath = dataset._describe().get("filepath")  # kedro-datasets' file datasets describe it
    except Exception:  # a dataset without a file: nothing to show
        return None
    if not filepath:
        return None
    folder = Path(str(filepath)).parent
    if project_path is not None:
        try:
            return folder.resolve().relative_to(Path(project_path).resolve()).as_posix()
        except ValueError:
            pass
    return folder.as_posix()


class RunSummaryHook:
    """Ends a run that evaluated a model with its run name, test metrics and reports folder,
    printed to stdout after Kedro's last log line."""

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        # The models whose evaluation this run summarised: `<model>.summarize_evaluation` ran.
        suffix = SUMMARY_NODE.format(model="")
        models = sorted({node.name[: -len(suffix)] for node in pipeline.nodes if node.name.endswith(suffix)})
        if not models:
            return
        summaries, folders = {}, {}
        for model in models:
            name = SUMMARY_DATASET.format(model=model)
            try:
                summaries[model] = catalog.load(name)
            except Exception as exc:  # the summary is a courtesy: never fail a finished run
                logger.warning("No summary of %s: %s could not be read (%s).", model, name, exc)
                continue
            folders[model] = _report_folder(catalog.get(name), run_params.get("project_path"))
        if summaries:
            print(f"\n{format_run_summary(summaries, folders)}\n", flush=True)
