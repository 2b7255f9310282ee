"""The `unet` pipeline graph: the data steps, 2D training and prediction, shared evaluation."""

from kedro.pipeline import Node, Pipeline

from medseg.pipelines.data import create_pipeline as data_pipeline
from medseg.pipelines.modeling import evaluation_pipeline

from .nodes import predict_unet, train_unet


def create_pipeline(**kwargs) -> Pipeline:
    return (
        data_pipeline()
        + Pipeline(
            [
                Node(
                    train_unet,
                    ["primary_images", "primary_labels", "splits", "case_geometry", "dataset_fingerprint", "params:data", "params:unet", "unet.backup"],
                    ["unet.model", "unet.history"],
                    name="train_unet",
                    namespace="unet",
                ),
                Node(
                    predict_unet,
                    ["unet.model", "primary_images", "case_geometry", "splits", "dataset_fingerprint", "params:unet", "params:planning"],
                    "unet.predictions",
                    name="predict_unet",
                    namespace="unet",
                ),
            ]
        )
        + evaluation_pipeline("unet")
    )
