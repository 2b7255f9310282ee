"""Model kinds: what differs between the models that the one model pipeline template trains.

A model kind is a small strategy (:class:`ModelKind`): how its sizes are planned from the data,
how its network is built, which samples it learns from, and which window the segmenter runs it
over. Everything else (the training skeleton, the segmenter, prediction of the split,
evaluation, reports and the MLflow export) is written once, in
`medseg.pipelines.template.model_pipeline`, and instantiated per kind under the kind's name as
Kedro namespace (`unet.model`, `conv3d.plan`).

Adding a model is one place: a module in this package that defines its typed parameter
section and a `ModelKind`, and registers it (`register_model_kind`), plus the section's
defaults in `conf/base/parameters_<name>.yml`. Every module of this package is imported when
the kinds are first asked for (`model_kinds`), so nothing else names the new kind: the project's
parameter roots (`parameter_roots`), the pipeline registry, the catalog's dataset factories
(`{model}.plan`, `{model}.model`, ...), the run's hooks, `predict` and serving all find it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from medseg.parameters import SHARED_ROOTS, Section

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
    from medseg.kinds.plans import ModelSettings

    return ModelSettings.of(settings).training.loss


@dataclass(frozen=True)
class ModelKind:
    """The strategy of one model pipeline.

    Args:
        name: the pipeline's name, its Kedro namespace, its `params:<name>` section and the
            `{model}` of the catalog's dataset factories.
        params: the typed schema of `params:<name>` (a `medseg.parameters.Section`), whose
            defaults are in `conf/base/parameters_<name>.yml`. Kedro validates the section
            against it before the run starts, and the parameter reference is generated from
            its fields' descriptions.
        plan: the planning node, `(case_geometry, dataset_fingerprint, section, planning,
            timings) -> (plan, settings, timings)`; `section` arrives validated as `params`.
            The shared steps are in `medseg.kinds.plans`.
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
        budget_minutes: the training minutes that `training.epochs: auto` fills when
            `planning.budget_minutes` does not name this kind.
        order: where the kind comes among the project's pipelines (lower first; then by name).
    """

    name: str
    params: type[Section]
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
    budget_minutes: float = 2.5
    order: int = 100

    @property
    def defaults_file(self) -> str:
        """The file under `conf/base/` that holds the section's defaults."""
        return f"parameters_{self.name}.yml"


_REGISTRY: dict[str, ModelKind] = {}


def register_model_kind(kind: ModelKind) -> ModelKind:
    """Make `kind` a model pipeline of the project (`kedro run --pipeline <name>`)."""
    if kind.name in SHARED_ROOTS:
        raise ValueError(f"a model kind cannot be named '{kind.name}': it is a shared parameter section")
    _REGISTRY[kind.name] = kind
    return kind


def _import_kind_modules() -> None:
    """Import every public module of this package (each registers the kinds it defines).
    The package's path is read at each call, so a folder added to it is searched too."""
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def model_kinds() -> dict[str, ModelKind]:
    """Every registered model kind, by name, in `order` (then by name)."""
    _import_kind_modules()
    return {kind.name: kind for kind in sorted(_REGISTRY.values(), key=lambda k: (k.order, k.name))}


def parameter_roots() -> dict[str, type[Section]]:
    """Every top-level parameter section and its schema: the shared ones
    (`medseg.parameters.SHARED_ROOTS`) and one per model kind."""
    return {**SHARED_ROOTS, **{name: kind.params for name, kind in model_kinds().items()}}
