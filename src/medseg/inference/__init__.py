"""Inference on whole scans: the segmenter (a network and its training plan), test-time
mirroring, the largest-component filter, and the files of a prediction run.

Numpy, nibabel and Keras only: no Kedro, no MLflow (`medseg.serving` wraps a segmenter as an
MLflow model; the `predict` pipeline runs it from Kedro).
"""

from medseg.inference.postprocessing import keep_largest_component, mirror_combinations, predict_with_mirroring
from medseg.inference.segmenter import Segmenter, SegmenterPlan, probabilities_to_label_map, window_predictor

__all__ = [
    "Segmenter",
    "SegmenterPlan",
    "keep_largest_component",
    "mirror_combinations",
    "predict_with_mirroring",
    "probabilities_to_label_map",
    "window_predictor",
]
