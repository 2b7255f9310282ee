"""Project pipelines: `data`, `predict`, `select`, one pipeline per model kind (`unet`,
`conv3d`: the data steps, then the model template of `medseg.pipelines.template`), and
`__default__`: every model (`predict` needs scans to segment, and `select` the models'
cross-validation, so they run only when named).

The model pipelines come from the registry of model kinds (`medseg.kinds`), not from
packages under `medseg/pipelines/`, so Kedro's `find_pipelines` is not used.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from medseg.kinds import model_kinds
from medseg.pipelines.data import create_pipeline as data_pipeline
from medseg.pipelines.predict import create_pipeline as predict_pipeline
from medseg.pipelines.selection import create_pipeline as selection_pipeline
from medseg.pipelines.template import model_pipeline


def register_pipelines() -> dict[str, Pipeline]:
    models = {name: data_pipeline() + model_pipeline(kind) for name, kind in model_kinds().items()}
    return {
        "data": data_pipeline(), "predict": predict_pipeline(), "select": selection_pipeline(), **models,
        "__default__": sum(models.values(), Pipeline([])),
    }
