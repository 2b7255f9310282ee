"""Project pipelines: `data`, `unet`, `conv3d`, `predict`, and `__default__`: every training
pipeline (`predict` needs scans to segment, so it runs only when named)."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(p for name, p in pipelines.items() if name != "predict")
    return pipelines
