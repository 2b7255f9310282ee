"""The `conv3d` pipeline graph: the data steps, patch training, sliding-window prediction,
shared evaluation, and patch-level detection metrics."""

from kedro.pipeline import Node, Pipeline

from medseg.pipelines.data import create_pipeline as data_pipeline
from medseg.pipelines.modeling import evaluation_pipeline

from .nodes import build_conv3d_segmenter, evaluate_patch_detection, plan_conv3d, train_conv3d


def create_pipeline(**kwargs) -> Pipeline:
    return (
        data_pipeline()
        + Pipeline(
            [
                Node(
                    plan_conv3d,
                    ["case_geometry", "dataset_fingerprint", "params:conv3d", "params:planning", "conv3d.timings"],
                    ["conv3d.plan", "conv3d.settings", "conv3d.timings_updated"],
                    name="plan_conv3d",
                    namespace="conv3d",
                ),
                Node(
                    train_conv3d,
                    ["primary_images", "primary_labels", "splits", "case_geometry", "dataset_fingerprint", "params:data", "conv3d.settings", "conv3d.backup"],
                    ["conv3d.model", "conv3d.history"],
                    name="train_conv3d",
                    namespace="conv3d",
                ),
                Node(
                    build_conv3d_segmenter,
                    ["conv3d.model", "case_fingerprints", "case_geometry", "dataset_fingerprint", "params:data", "conv3d.settings", "params:planning"],
                    "conv3d.segmenter",
                    name="build_conv3d_segmenter",
                    namespace="conv3d",
                ),
                Node(
                    evaluate_patch_detection,
                    ["conv3d.model", "primary_images", "primary_labels", "splits", "conv3d.settings", "params:planning"],
                    "conv3d.patch_metrics",
                    name="evaluate_patch_detection",
                    namespace="conv3d",
                ),
            ]
        )
        + evaluation_pipeline("conv3d")
    )
