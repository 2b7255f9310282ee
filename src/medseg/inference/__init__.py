"""Inference on whole scans: the segmenter (a network and its training plan), test-time
mirroring, the largest-component filter, and the files of a prediction run.

Numpy, nibabel and Keras only: no Kedro, no MLflow (`medseg.serving.model` wraps a segmenter as an
MLflow model; the `predict` pipeline runs it from Kedro).
"""

from importlib import import_module

from medseg.inference.postprocessing import (
    LabelMapper,
    keep_largest_component,
    mirror_combinations,
    predict_with_mirroring,
    probabilities_to_label_map,
)

# The segmenter imports Keras (TensorFlow, seconds and hundreds of MiB): loaded on first use, so
# that a Dask worker which only maps probabilities back (`LabelMapper`) never imports it.
_LAZY = {"Segmenter": "medseg.inference.segmenter", "SegmenterPlan": "medseg.inference.segmenter",
         "window_predictor": "medseg.inference.windows"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medseg.inference' has no attribute {name!r}")

__all__ = [
    "LabelMapper",
    "Segmenter",
    "SegmenterPlan",
    "keep_largest_component",
    "mirror_combinations",
    "predict_with_mirroring",
    "probabilities_to_label_map",
    "window_predictor",
]
