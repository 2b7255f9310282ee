"""The `unet` pipeline graph: the data steps, 2D training and prediction, shared evaluation."""

from kedro.pipeline import Node, Pipeline

from medseg.pipelines.data import create_pipeline as data_pipeline
from medseg.pipelines.modeling import evaluation_pipeline

from .nodes import build_unet_segmenter, plan_unet, train_unet


def create_pipeline(**kwargs) -> Pipeline:
    return (
        data_pipeline()
        + Pipeline(
            [
                Node(
                    plan_unet,
                    ["case_geometry", "dataset_fingerprint", "params:unet", "params:planning", "unet.timings"],
                    ["unet.plan", "unet.settings", "unet.timings_updated"],
                    name="plan_unet",
                    namespace="unet",
                ),
                Node(
                    train_unet,
                    ["primary_images", "primary_labels", "splits", "case_geometry", "dataset_fingerprint", "params:data", "unet.settings", "unet.backup"],
                    ["unet.model", "unet.history"],
                    name="train_unet",
                    namespace="unet",
                ),
                Node(
                    build_unet_segmenter,
                    ["unet.model", "case_fingerprints", "case_geometry", "dataset_fingerprint", "params:data", "unet.settings", "params:planning"],
                    "unet.segmenter",
                    name="build_unet_segmenter",
                    namespace="unet",
                ),
            ]
        )
        + evaluation_pipeline("unet")
    )
