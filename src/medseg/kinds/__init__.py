"""Model kinds: what differs between the models that the one model pipeline template trains.

A model kind is a small strategy (:class:`ModelKind`): how its sizes are planned from the data,
how its network is built, which samples it learns from, and which window the segmenter runs it
over. Everything else (the training skeleton, the segmenter, prediction of the split,
evaluation, reports and the MLflow export) is written once, in
`medseg.pipelines.template.model_pipeline`, and instantiated per kind under the kind's name as
Kedro namespace (`unet.model`, `conv3d.plan`).

Adding a model is one place: define a `ModelKind`, give it a `params:<name>` section, and
register it (`register_model_kind`, or add it to `BUILT_IN`). The catalog's dataset factories
(`{model}.plan`, `{model}.model`, ...) place its files; the run's hooks find it from the
pipeline's namespaces.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# What a model's training streams draw from: (case_id) -> (image, label) arrays.
LoadCase = Callable[[str], tuple[Any, Any]]


def foreground_class_count(settings: Mapping[str, Any], dataset_fingerprint: Mapping[str, Any]) -> int:
    """K, the foreground classes a model learns: those of `fingerprint.json` in multiclass
    mode (K + 1 softmax channels when K > 1), else 1 (the original sigmoid head)."""
    if dataset_fingerprint.get("label_mode") == "multiclass":
        return len(dataset_fingerprint["classes"])
    return 1


def _same_network(model: Any, settings: Mapping[str, Any]) -> Any:
    return model


def _given_loss(settings: Mapping[str, Any]) -> str:
    return str(settings["training"]["loss"])


@dataclass(frozen=True)
class ModelKind:
    """The strategy of one model pipeline.

    Args:
        name: the pipeline's name, its Kedro namespace, its `params:<name>` section and the
            `{model}` of the catalog's dataset factories.
        plan: the planning node, `(case_geometry, dataset_fingerprint, section, planning,
            timings) -> (plan, settings, timings)`. Its `section` argument is annotated with the
            section's schema (`medseg.parameters`), so Kedro validates `params:<name>` before
            the run starts. The shared steps are in `medseg.kinds.plans`.
        build: `(settings, n_classes) -> keras.Model`, compiled; called inside the precision
            policy and the distribution strategy's scope.
        sample_stream: `(settings, load_case) -> make_stream`, where `make_stream(case_ids,
            seed, augment, flip_axes, *, batch_size)` is a batched `tf.data.Dataset` of
            (input, target) training samples.
        segmenter_window: `(settings) -> dict` of the window fields of
            `medseg.inference.SegmenterPlan` (`window`, `depth`, `patch_size`, `overlap`,
            `sigma_scale`, `features_per_voxel`).
        network: `(settings) -> str`, the network's name ("unet", "unet3d",
            "patch_classifier").
        display_name: `(settings) -> str`, the model's name in run names ("UNet").
        training_samples: what the training curves' Dice and IoU were computed on.
        class_count: `(settings, dataset_fingerprint) -> int`, the classes the network
            predicts (default: the dataset's foreground classes in multiclass mode, else 1).
        segmenter_network: `(model, settings) -> model` that the segmenter runs (default: the
            trained model itself).
        loss_name: `(settings) -> str`, the loss in run names (default `training.loss`).
        extra_nodes: `() -> list[Node]` of kind-only nodes, written with the template's
            dataset names (`model`, `settings`, `grid_images`, ...), so they are namespaced
            with the rest.
        plans_grid: the kind's plan may choose a coarser grid than the training grid
            (`settings["grid"]`, `medseg.pipelines.grid`); the template then adds the grid
            nodes. Else the model uses the data pipeline's layer and plan.
    """

    name: str
    plan: Callable[..., tuple[dict, dict, dict]]
    build: Callable[[dict, int], Any]
    sample_stream: Callable[[dict, LoadCase], Callable[..., Any]]
    segmenter_window: Callable[[dict], dict]
    network: Callable[[Mapping[str, Any]], str]
    display_name: Callable[[Mapping[str, Any]], str]
    training_samples: str
    class_count: Callable[[Mapping[str, Any], Mapping[str, Any]], int] = foreground_class_count
    segmenter_network: Callable[[Any, Mapping[str, Any]], Any] = _same_network
    loss_name: Callable[[Mapping[str, Any]], str] = _given_loss
    extra_nodes: Callable[[], list] = field(default=list)
    plans_grid: bool = False


# The kinds that ship with medseg, each registered by its own module.
BUILT_IN = ("medseg.kinds.unet", "medseg.kinds.conv3d")
_REGISTRY: dict[str, ModelKind] = {}


def register_model_kind(kind: ModelKind) -> ModelKind:
    """Make `kind` a model pipeline of the project (`kedro run --pipeline <name>`)."""
    _REGISTRY[kind.name] = kind
    return kind


def model_kinds() -> dict[str, ModelKind]:
    """Every registered model kind, by name: the built-in ones first, in `BUILT_IN` order."""
    for module in BUILT_IN:
        importlib.import_module(module)
    return dict(_REGISTRY)
