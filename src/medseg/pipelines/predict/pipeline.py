"""The `predict` pipeline graph: list and check the scans, then segment them."""

from kedro.pipeline import Node, Pipeline

from .nodes import list_scans_to_predict, segment_scans


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                list_scans_to_predict,
                ["params:predict", "project_root", "unet.segmenter_folder", "conv3d.segmenter_folder"],
                "predict.scans",
                name="list_scans_to_predict",
                namespace="predict",
            ),
            Node(
                segment_scans,
                ["predict.scans", "params:predict", "project_root", "unet.segmenter_folder", "conv3d.segmenter_folder"],
                "predict.predictions",
                name="segment_scans",
                namespace="predict",
            ),
        ]
    )
