"""Datasets that log a node's output to the active MLflow run: its metrics and the parameters
that medseg decides at run time (the plan's values, the precision `auto` chose).

With kedro-mlflow's own datasets for artifacts and models, these are the only places besides
the per-epoch training callback that log to MLflow. Outside a tracked run they log nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import mlflow
from kedro.io.core import AbstractDataset, DatasetError

from medseg.runs.tracking import metric_key, models_in_active_run, redact_urls


def log_metrics(
    model: str, metrics: Mapping[str, float], step: int | None = None, models_in_run: tuple[str, ...] | None = None
) -> None:
    """Log `model`'s finite metrics to the active MLflow run, if any, named by
    `medseg.runs.tracking.metric_key` (NaN and inf are skipped: MLflow's UI cannot plot them,
    and the per-case CSV keeps them). `models_in_run`, when given, saves reading the run's tag
    again (the per-epoch callback reads it once)."""
    if mlflow.active_run() is None:
        return
    models = models_in_active_run() if models_in_run is None else models_in_run
    values = {
        metric_key(model, key, models): float(value)
        for key, value in metrics.items()
        if value is not None and math.isfinite(float(value))
    }
    if values:
        mlflow.log_metrics(values, step=step)


def log_params(params: Mapping[str, Any]) -> None:
    """Log parameters to the active MLflow run, if any, as text."""
    if mlflow.active_run() is not None:
        mlflow.log_params({key: redact_urls(str(value)) for key, value in params.items()})


class MlflowModelMetricsDataset(AbstractDataset[dict, None]):
    """Saves {name: value} as metrics of one model of the active MLflow run.

    Example catalog entry::

        "{model}.mlflow_metrics_{what}":
          type: medseg.datasets.tracking.MlflowModelMetricsDataset
          model: "{model}"

    Args:
        model: the model the metrics belong to: their prefix when the run trains several.
    """

    def __init__(self, model: str, metadata: dict[str, Any] | None = None):
        self._model = model
        self.metadata = metadata

    def save(self, data: Mapping[str, float]) -> None:
        log_metrics(self._model, data)

    def load(self) -> dict:
        raise DatasetError(f"metrics of '{self._model}' are written to the MLflow run; read them from there.")

    def _describe(self) -> dict[str, Any]:
        return {"model": self._model}


class MlflowParamsDataset(AbstractDataset[dict, None]):
    """Saves {name: value} as parameters of the active MLflow run (names as given)."""

    def __init__(self, metadata: dict[str, Any] | None = None):
        self.metadata = metadata

    def save(self, data: Mapping[str, Any]) -> None:
        log_params(data)

    def load(self) -> dict:
        raise DatasetError("run parameters are written to the MLflow run; read them from there.")

    def _describe(self) -> dict[str, Any]:
        return {}
