"""MLflow logging shared by the model pipelines (this module may import MLflow; domain code may not).

One `kedro run` is one MLflow run. When a run trains several models (the default pipeline),
each model's metrics carry its name as a prefix (`unet.test_dice_mean`), so they stay apart;
a run with a single model logs plain names (`test_dice_mean`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import mlflow

MODEL_PIPELINES = ("unet", "conv3d")
_models_in_run: tuple[str, ...] = ()


def set_models_in_run(models: Iterable[str]) -> None:
    """Record which model pipelines the current run holds (called by the project hook)."""
    global _models_in_run
    _models_in_run = tuple(sorted(models))


def metric_key(model: str, name: str) -> str:
    """`name`, prefixed by `model.` when the run trains more than one model."""
    return f"{model}.{name}" if len(_models_in_run) > 1 else name


def log_metrics(model: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log finite metrics to the active MLflow run, if any (NaN/inf are skipped: MLflow's UI
    cannot plot them, and the per-case CSV keeps them)."""
    if mlflow.active_run() is None:
        return
    values = {
        metric_key(model, key): float(value)
        for key, value in metrics.items()
        if value is not None and math.isfinite(float(value))
    }
    if values:
        mlflow.log_metrics(values, step=step)
