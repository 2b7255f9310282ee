"""The model pipeline template: plan, train, segmenter, predict the split, evaluate, report
and export, written once and instantiated per model kind (`medseg.kinds`) with Kedro's
namespace mapping.

The template's own datasets (`plan`, `model`, `predictions`, ...) become `<kind>.plan`,
`<kind>.model`, ..., which the catalog's dataset factories place; the data pipeline's outputs
and the shared parameters keep their names; `params:model` is the kind's `params:<kind>`.
"""

from __future__ import annotations

from functools import partial, update_wrapper
from typing import Any, Callable

from kedro.pipeline import Node, Pipeline

from medseg.imaging.geometry import PreprocessingPlan
from medseg.kinds import ModelKind
from medseg.parameters import PlanningParams
from medseg.pipelines.evaluation import (
    calibrate_segmenter,
    choose_inference_profiles,
    evaluate_postprocessing,
    evaluate_predictions,
    export_model,
    export_onnx_segmenter,
    logged_plan,
    make_viewer_pages,
    package_segmenter,
    predict_split,
    summarize_evaluation,
)
from medseg.pipelines.cascade import train_context
from medseg.pipelines.crossval import cross_validate, evaluate_cross_validation
from medseg.pipelines.grid import plan_grid, preprocess_grid, select_grid
from medseg.pipelines.training import build_segmenter, train

# What the template reads from the data pipeline and the project, by its shared names.
SHARED_INPUTS = {
    "case_geometry", "dataset_fingerprint", "primary_images", "primary_labels", "intermediate_images",
    "intermediate_labels", "splits", "case_fingerprints",
    "project_root", "synthetic_phantoms", "folds",
}
SHARED_PARAMETERS = {"params:data", "params:planning", "params:cv", "params:evaluation"}
# The grid the model trains and predicts on, by the template's names: for a kind that plans
# its grid (`ModelKind.plans_grid`), made by the grid nodes; for the others, the data
# pipeline's own layer and plan.
GRID_INPUTS = {"grid_images": "primary_images", "grid_labels": "primary_labels", "grid_geometry": "case_geometry"}


def _grid_nodes() -> list[Node]:
    """The model's own grid (`medseg.pipelines.grid`): the plan's spacing, the cases
    preprocessed at it when it is not the training grid, and the layer the model uses."""
    return [
        Node(plan_grid, ["settings", "case_fingerprints", "case_geometry", "dataset_fingerprint", "params:data"],
             "grid_geometry", name="plan_grid"),
        Node(preprocess_grid, ["intermediate_images", "intermediate_labels", "case_fingerprints", "grid_geometry",
                               "dataset_fingerprint", "params:data", "settings"],
             ["lowres_images", "lowres_labels"], name="preprocess_grid"),
        Node(select_grid, ["settings", "primary_images", "primary_labels", "lowres_images", "lowres_labels"],
             ["grid_images", "grid_labels"], name="select_grid"),
    ]


def _context_node(kind: ModelKind) -> Node:
    """A cascade's low-resolution stage (`medseg.pipelines.cascade`): its networks and the
    probabilities the model takes after the image; none unless the plan chose the cascade."""
    return Node(
        _bound(train_context, kind=kind),
        ["grid_images", "grid_labels", "splits", "grid_geometry", "case_fingerprints", "dataset_fingerprint", "params:data",
         "settings", "params:planning", "context_backup"],
        ["context_models", "context", "mlflow_params_context"],
        name=f"train_{kind.name}_context",
    )


def _bound(func: Callable, **keywords: Any) -> Callable:
    """`func` with keyword arguments bound (the model kind), keeping its name and docstring
    for kedro-viz. Keywords, not positions: Kedro maps a node's inputs onto the wrapped
    function's signature, so the positions must stay those of the inputs."""
    return update_wrapper(partial(func, **keywords), func)


def _typed_plan(kind: ModelKind) -> Callable:
    """`kind.plan` as a node whose section argument is annotated with `kind.params`, so that
    Kedro validates `params:<kind>` against the kind's schema before the run starts, whatever
    the kind's own function is annotated with."""

    def plan(case_geometry: PreprocessingPlan, dataset_fingerprint: dict, section: dict, planning: PlanningParams,
             timings: dict) -> tuple[Any, dict, dict]:
        return kind.plan(case_geometry, dataset_fingerprint, section, planning, timings)

    plan.__name__ = plan.__qualname__ = kind.plan.__name__  # kedro-viz shows the kind's function
    plan.__doc__ = kind.plan.__doc__
    plan.__annotations__ = {**plan.__annotations__, "section": kind.params}
    return plan


def model_pipeline(kind: ModelKind) -> Pipeline:
    """The model pipeline of `kind`, in namespace `kind.name`.

    Reads the data pipeline's outputs, `params:data`, `params:planning` and `params:<kind>`;
    writes `<kind>.plan`, `.settings`, `.timings_updated`, `.model`, `.history`, `.segmenter`,
    `.predictions`, `.postprocessing_ablation`, `.mlflow_segmenter`, `.metrics_per_case`,
    `.metrics_summary`, `.overlays`, `.training_curves`, `.mlflow_model`, `.architecture`,
    `.weights`, the MLflow run's parameters (`<kind>.mlflow_params_*`) and metrics
    (`<kind>.mlflow_metrics_*`), and what `kind.extra_nodes` add.
    """
    name = kind.name
    template = Pipeline(
        [
            Node(
                _typed_plan(kind),
                ["case_geometry", "dataset_fingerprint", "params:model", "params:planning", "timings"],
                ["plan", "settings", "timings_updated"],
                name=f"plan_{name}",
            ),
            Node(logged_plan, "plan", "mlflow_params_plan", name="log_plan"),
            Node(
                _bound(train, kind=kind),
                ["grid_images", "grid_labels", "splits", "grid_geometry", "dataset_fingerprint", "params:data",
                 "settings", "backup", *(["context"] if kind.plans_grid else [])],
                ["model", "history", "mlflow_params_training"],
                name=f"train_{name}",
            ),
            Node(
                _bound(build_segmenter, kind=kind),
                ["model", "case_fingerprints", "grid_geometry", "dataset_fingerprint", "params:data", "settings",
                 "params:planning", *(["context_models"] if kind.plans_grid else [])],
                "built_segmenter",
                name=f"build_{name}_segmenter",
            ),
            Node(
                calibrate_segmenter,
                ["built_segmenter", "grid_images", "grid_labels", "splits", "case_fingerprints", "params:evaluation"],
                ["calibrated_segmenter", "calibration", "mlflow_metrics_calibration", "test_qc"],
                name="calibrate_segmenter",
            ),
            Node(
                export_onnx_segmenter,
                ["calibrated_segmenter", "grid_images", "splits", "settings"],
                ["exported_segmenter", "onnx_parity", "mlflow_metrics_onnx"],
                name="export_onnx",
            ),
            Node(
                choose_inference_profiles,
                ["exported_segmenter", "grid_images", "grid_labels", "splits", "settings"],
                ["segmenter", "inference_profiles", "mlflow_metrics_profiles"],
                name="choose_inference_profiles",
            ),
            Node(predict_split, ["segmenter", "grid_images", "grid_geometry", "splits"], "predictions", name="predict_split"),
            Node(
                evaluate_postprocessing,
                ["segmenter", "grid_images", "intermediate_labels", "grid_geometry", "splits", "dataset_fingerprint",
                 "params:data"],
                ["postprocessing_ablation", "mlflow_metrics_postprocessing"],
                name="evaluate_postprocessing",
            ),
            Node(package_segmenter, ["segmenter", "settings"], "mlflow_segmenter", name="package_segmenter"),
            Node(
                evaluate_predictions,
                ["predictions", "intermediate_images", "intermediate_labels", "case_geometry", "splits",
                 "dataset_fingerprint", "params:data", "settings", "params:evaluation", "test_qc"],
                ["metrics_per_case", "overlays"],
                name="evaluate_predictions",
            ),
            Node(
                make_viewer_pages,
                ["predictions", "intermediate_images", "intermediate_labels", "splits", "dataset_fingerprint",
                 "params:data", "settings"],
                "viewer_pages",
                name="make_viewer_pages",
            ),
            Node(
                _bound(summarize_evaluation, kind=kind),
                ["metrics_per_case", "history", "params:data", "params:model", "project_root", "synthetic_phantoms",
                 "params:evaluation"],
                ["metrics_summary", "training_curves", "metrics_plot", "mlflow_metrics_test"],
                name="summarize_evaluation",
            ),
            Node(export_model, "model", ["mlflow_model", "architecture", "weights"], name="export_model"),
            Node(
                _bound(cross_validate, kind=kind),
                ["grid_images", "grid_labels", "splits", "folds", "grid_geometry", "case_fingerprints", "dataset_fingerprint",
                 "params:data", "settings", "params:planning", "params:cv", "cv_backup"],
                ["cv_ensemble", "cv_probabilities", "cv_runs", "mlflow_params_cv"],
                name=f"cross_validate_{name}",
            ),
            Node(
                _bound(evaluate_cross_validation, kind=kind),
                ["cv_probabilities", "cv_runs", "intermediate_labels", "case_geometry", "folds", "dataset_fingerprint",
                 "params:data", "settings", "params:evaluation"],
                ["cv_metrics_per_case", "cv_summary", "mlflow_metrics_cv"],
                name="evaluate_cross_validation",
            ),
            *(_grid_nodes() + [_context_node(kind)] if kind.plans_grid else []),
            *kind.extra_nodes(),
        ]
    )
    shared = {dataset: dataset for dataset in SHARED_INPUTS & template.inputs()}
    if not kind.plans_grid:
        shared.update({ours: theirs for ours, theirs in GRID_INPUTS.items() if ours in template.inputs()})
    return Pipeline(
        template,
        namespace=name,
        inputs=shared,
        parameters={**{p: p for p in SHARED_PARAMETERS}, "params:model": f"params:{name}"},
    )
