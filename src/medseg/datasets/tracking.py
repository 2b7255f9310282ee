"""Datasets that log a node's output to the active MLflow run: its metrics and the parameters
that medseg decides at run time (the plan's values, the precision `auto` chose).

With kedro-mlflow's own datasets for artifacts and models, these are the only places besides
the per-epoch training callback that log to MLflow. Outside a tracked run they log nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError

from medseg.runs.tracking import log_metrics, log_params


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
