"""The `predict` pipeline graph: list and check the scans, then segment them."""

from kedro.pipeline import Node, Pipeline

from medseg.kinds import model_kinds

from .nodes import list_scans_to_predict, segment_scans


def create_pipeline(**kwargs) -> Pipeline:
    # Every model kind's local segmenter, for `predict.model: <kind>`.
    segmenters = {name: f"{name}.segmenter_folder" for name in model_kinds()}
    return Pipeline(
        [
            Node(
                list_scans_to_predict,
                {"predict": "params:predict", "project_root": "project_root", "dicomweb_answers": "predict.dicomweb_answers",
                 **segmenters},
                ["predict.scans", "predict.segmenter_source"],
                name="list_scans_to_predict",
                namespace="predict",
            ),
            Node(
                segment_scans,
                ["predict.scans", "predict.segmenter_source", "params:predict", "project_root", "predict.dicomweb_answers"],
                "predict.predictions",
                name="segment_scans",
                namespace="predict",
            ),
        ]
    )
