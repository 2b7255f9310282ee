"""The `data` pipeline graph."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    assign_cv_folds,
    canonicalize_cases,
    dicom_settings,
    list_source_cases,
    phantom_settings,
    plan_preprocessing,
    preprocess_cases,
    split_dataset,
    validate_cases,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(phantom_settings, "params:data", "synthetic_phantoms", name="synthesize_phantoms", namespace="data"),
            Node(dicom_settings, ["params:data", "project_root"], "dicom_cases", name="convert_dicom_cases", namespace="data"),
            Node(
                list_source_cases,
                ["params:data", "project_root", "synthetic_phantoms", "dicom_cases"],
                ["source_cases", "source_classes"],
                name="list_source_cases",
                namespace="data",
            ),
            Node(
                validate_cases,
                ["source_cases", "source_classes", "params:data", "previous_case_fingerprints"],
                ["case_fingerprints", "dataset_fingerprint"],
                name="validate_cases",
                namespace="data",
            ),
            Node(
                canonicalize_cases,
                "case_fingerprints",
                ["intermediate_images", "intermediate_labels"],
                name="canonicalize_cases",
                namespace="data",
            ),
            Node(
                plan_preprocessing,
                ["case_fingerprints", "dataset_fingerprint", "params:data.preprocessing"],
                "case_geometry",
                name="plan_preprocessing",
                namespace="data",
            ),
            Node(
                preprocess_cases,
                [
                    "intermediate_images",
                    "intermediate_labels",
                    "case_fingerprints",
                    "case_geometry",
                    "dataset_fingerprint",
                    "params:data",
                ],
                ["primary_images", "primary_labels"],
                name="preprocess_cases",
                namespace="data",
            ),
            Node(split_dataset, ["case_fingerprints", "params:data"], "splits", name="split_dataset", namespace="data"),
            Node(assign_cv_folds, ["splits", "params:cv", "params:data", "folds_saved"], "folds", name="assign_cv_folds",
                 namespace="data"),
        ]
    )
