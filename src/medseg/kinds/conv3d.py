"""The 3D model, trained on patches and run by Gaussian-weighted sliding windows.

Two networks (`conv3d.model.network`):
- `unet3d`: a 3D U-Net; whole volumes are segmented by sliding windows.
- `patch_classifier`: a small Conv3D block that says whether a patch holds foreground.
  Its sliding-window output is a coarse detection map (each window's probability spread over
  the window), so it is evaluated by the same code, honestly, as a localiser.
Both are also scored on test-case patches as detectors (accuracy, ROC-AUC, F1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Annotated, Any, Literal

import keras
import numpy as np
import pandas as pd
from kedro.pipeline import Node
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from medseg.errors import ConfigurationError
from medseg.evaluation import classification_metrics
from medseg.imaging.io import Volume
from medseg.inference import window_predictor
from medseg.kinds import ModelKind, foreground_class_count, register_model_kind
from medseg.imaging.geometry import PreprocessingPlan
from medseg.kinds.plans import ModelPlan, ModelSettings, apply_plan, plan_model
from medseg.kinds.streams import sampled_dataset
from medseg.models import build_patch_classifier, build_unet3d, compile_patch_classifier, compile_segmentation_model
from medseg.parameters import (
    STRICT,
    Auto,
    ExportParams,
    InferenceParams,
    NonNegative,
    PatchSamplingParams,
    PlanningParams,
    Positive,
    ReportingParams,
    Section,
    TrainingParams,
)
from medseg.patching import extract_patch, patch_stream, sample_patch_centers
from medseg.patching.sliding_window import activation_budget_gb, unet_features_per_voxel, windows_per_batch
from medseg.kinds.sizes import median_shape, plan_context, plan_patches
from medseg.cases.split import cases_in_split

logger = logging.getLogger(__name__)

NETWORKS = {"unet3d": "UNet3D", "patch_classifier": "Conv3DClassifier"}


@dataclass(config=STRICT)
class Conv3dModelParams(Section):
    """The 3D network (`medseg.models.conv3d`) and the grid it works on."""

    network: Annotated[Literal["unet3d", "patch_classifier"], Field(description=(
        "`unet3d` (a 3D U-Net that segments whole volumes by sliding windows) or `patch_classifier` (a small Conv3D "
        "block that says whether a patch holds foreground; its sliding-window output is a coarse detection map)."))]
    base_filters: Annotated[Positive, Field(description="unet3d: filters of the first stage, doubled at each pooling.")]
    depth: Annotated[Annotated[int, Field(ge=1, le=5)] | Auto, Field(description=(
        "Pooling stages; `auto`: planned with the patch, or as deep as an explicit patch divides."))]
    configuration: Annotated[Literal["fullres", "lowres", "cascade", "auto"], Field(description=(
        "`fullres`: the training grid; `lowres`: a coarser spacing at which a patch of `planning.patch_voxels` sees 2.5 "
        "times the largest structure (nnU-Net's `3d_lowres`), the cases preprocessed again at it; `cascade`: two "
        "low-resolution folds whose probabilities the full-resolution network takes after the image (nnU-Net's "
        "`3d_cascade_fullres`); `auto`: `fullres` when its patch covers that, else `lowres` where a class keeps to one "
        "side of the body, else `fullres`. The model plan's `context` says why."))] = "auto"


@dataclass(config=STRICT)
class Conv3dInferenceParams(InferenceParams):
    """Sliding-window inference (`medseg.patching.sliding_window`) and its postprocessing."""

    overlap: Annotated[float, Field(ge=0.0, lt=1.0, description="Fraction of a window shared with its neighbour.")]
    sigma_scale: Annotated[float, Field(gt=0.0, description=(
        "Sigma of the Gaussian importance map, as a fraction of the window."))]


@dataclass(config=STRICT)
class PatchEvaluationParams(Section):
    """The 3D model scored as a detector on test-case patches (accuracy, ROC-AUC, F1)."""

    patches_per_case: Annotated[Positive, Field(description="Test-case patches scored per case.")]


@dataclass(config=STRICT)
class Conv3dParams(Section):
    """`params:conv3d`: the 3D model, trained on patches and run by sliding windows
    (`kedro run --pipeline conv3d`)."""

    seed: Annotated[NonNegative, Field(description="With `data.seed`: the weights, the sampling and the augmentation.")]
    model: Conv3dModelParams
    sampling: PatchSamplingParams
    training: TrainingParams
    inference: Conv3dInferenceParams
    evaluation: PatchEvaluationParams
    reporting: ReportingParams
    export: ExportParams

    @model_validator(mode="after")
    def _deep_supervision_needs_a_unet(self) -> "Conv3dParams":
        if self.training.deep_supervision and self.model.network == "patch_classifier":
            raise ValueError("training.deep_supervision needs a U-Net: set it to false with model.network: "
                             "patch_classifier, or use model.network: unet3d")
        return self


def network(settings: Mapping[str, Any]) -> str:
    """`conv3d.model.network`, checked."""
    name = ModelSettings.of(settings).network
    if name not in NETWORKS:
        raise ConfigurationError(f"conv3d.model.network='{name}' is not one of {list(NETWORKS)}.")
    return name


def _features_per_voxel(settings: Mapping[str, Any]) -> float:
    """The model's width for the memory budget (`unet_features_per_voxel`)."""
    if network(settings) == "patch_classifier":
        # Conv3D(16) at full resolution, Conv3D(32) after one pooling: a 16-filter encoder of depth 1.
        return unet_features_per_voxel(16, 1, 3)
    settings = ModelSettings.of(settings)
    return unet_features_per_voxel(settings.base_filters, settings.depth, 3)


def choose_configuration(given: str, context: Mapping[str, Any], lateralized: Sequence[int]) -> tuple[str, str]:
    """`conv3d.model.configuration` decided: `fullres` or `lowres` as given; `auto` takes
    `fullres` when its patch covers the needed extent (`medseg.kinds.sizes.plan_context`), else
    `lowres` when a class keeps to one side of the body (`fingerprint.json` lateralized: a
    patch that cannot see the midline cannot tell the side), else `fullres`.

    Returns:
        (configuration, reason).
    """
    if given != "auto":
        return given, f"conv3d.model.configuration={given} was given; {context['reason']}"
    if context["fullres_covers"]:
        return "fullres", context["reason"]
    if lateralized:
        return "lowres", f"{context['reason']}; classes {list(lateralized)} keep to one side of the body, so the patch must see it"
    return "fullres", (
        f"{context['reason']}; no class keeps to one side of the body, so the structures are told by what is around "
        "them and the full resolution keeps their boundaries (set conv3d.model.configuration=lowres to train on the context)"
    )


def plan_conv3d(
    case_geometry: PreprocessingPlan, dataset_fingerprint: dict, conv3d: Conv3dParams, planning: PlanningParams, timings: dict
) -> tuple[ModelPlan, dict, dict]:
    """Plan the 3D model from the data.

    First the context (`medseg.kinds.sizes.plan_context`): what a patch must see (2.5x the
    largest structure, at most the median image), whether the full-resolution patch does, and
    the low-resolution spacing at which a patch would. `conv3d.model.configuration` then
    chooses the grid (`choose_configuration`): the training grid as preprocessed (`fullres`),
    or that coarser spacing (`lowres`, nnU-Net's `3d_lowres`), on which the cases are
    preprocessed again (`plan_grid`, `preprocess_grid`).

    On the chosen grid: the patch (about `planning.patch_voxels` voxels, shaped in
    millimetres so that a thick-slice axis gets fewer voxels, clipped to the median case),
    the poolings per axis (nnU-Net's: none below 4 voxels, none along an axis twice as coarse
    as the finest), the depth (their number) and the batch (`planning.memory_gb`).

    `conv3d.sampling.patch_size`, `conv3d.model.depth` and `conv3d.training.batch_size` set to
    `auto` take these values; explicit values override them and are recorded. The per-axis
    poolings apply only to a planned patch; an explicit patch pools every axis. Then the
    precision and the training steps (`medseg.kinds.plans.plan_model`).

    Returns:
        The plan (`conv3d.plan`, with its `context`), the settings the model is trained with
        (`conv3d.settings`, with `grid`: the configuration and its spacing) and the timings
        (`conv3d.timings_updated`).
    """
    median = median_shape(case_geometry)
    spacing = list(case_geometry.target_spacing)
    model = conv3d["model"]
    max_depth = 4 if model["depth"] == "auto" else int(model["depth"])
    patch_voxels, memory_gb = int(planning["patch_voxels"]), float(planning["memory_gb"])
    extent = dataset_fingerprint.get("foreground_extent_mm") or [0.0, 0.0, 0.0]
    given = str(model.get("configuration", "auto"))
    context = plan_context(median, spacing, extent, patch_voxels, int(model["base_filters"]), memory_gb, max_depth,
                           require_lowres=given in ("lowres", "cascade"))
    if given in ("lowres", "cascade") and context["lowres"] is None:
        raise ConfigurationError(
            f"conv3d.model.configuration={given}: {context['reason']}. A low-resolution grid would be the same as the "
            "full one; set conv3d.model.configuration to fullres or auto"
        )
    configuration, reason = choose_configuration(given, context, dataset_fingerprint.get("lateralized", []))
    if configuration == "lowres":
        median, spacing = tuple(context["lowres"]["median_shape"]), list(context["lowres"]["spacing"])
    logger.info("conv3d: %s configuration: %s.", configuration, reason)
    settings, plan = _plan_sizes(conv3d, median, spacing, planning, max_depth)
    settings["model"]["configuration"] = configuration
    settings["grid"] = {"configuration": configuration, "spacing": [float(s) for s in spacing],
                        "data_spacing": [float(s) for s in case_geometry.target_spacing]}
    plan.context = {**context, "configuration": {"given": str(model.get("configuration", "auto")), "used": configuration, "reason": reason}}
    if configuration != "cascade":
        return plan_model(CONV3D, settings, plan, dataset_fingerprint, planning, timings)
    # The cascade: CASCADE_FOLDS low-resolution networks, each trained on a share of the
    # training cases, give the full-resolution network their probabilities after the image.
    low = context["lowres"]
    # The stage's patch is planned to see the whole structure; an explicit patch is the
    # full-resolution network's.
    planned_stage = {**conv3d, "sampling": {**conv3d["sampling"], "patch_size": "auto"}, "model": {**model, "depth": "auto"}}
    stage_settings, stage_plan = _plan_sizes(planned_stage, tuple(low["median_shape"]), list(low["spacing"]), planning, 4)
    stage_settings["model"]["configuration"] = "lowres"
    stage_plan, stage_settings, timings = plan_model(
        CONV3D, stage_settings, stage_plan, dataset_fingerprint, _budget_share(planning, CASCADE_STAGE_SHARE), timings
    )
    n_classes = CONV3D.class_count(settings, dataset_fingerprint)
    settings["model"]["input_channels"] = 1 + (1 if n_classes == 1 else n_classes + 1)
    settings["cascade"] = {"stage": stage_settings, "folds": CASCADE_FOLDS, "spacing": list(low["spacing"])}
    plan.context["cascade"] = {"folds": CASCADE_FOLDS, "stage_budget_share": CASCADE_STAGE_SHARE, "stage": stage_plan.to_json()}
    return plan_model(CONV3D, settings, plan, dataset_fingerprint, _budget_share(planning, 1 - CASCADE_FOLDS * CASCADE_STAGE_SHARE), timings)


# A cascade's budget: each low-resolution fold a quarter, the full-resolution network the rest.
CASCADE_FOLDS = 2
CASCADE_STAGE_SHARE = 0.25


def _budget_share(planning: Mapping[str, Any], share: float) -> dict[str, Any]:
    """`planning` with `share` of conv3d's training budget."""
    budget = dict(planning["budget_minutes"])
    budget["conv3d"] = float(budget.get("conv3d", CONV3D.budget_minutes)) * share
    return {**planning, "budget_minutes": budget}


def _plan_sizes(
    conv3d: Mapping[str, Any], median: Sequence[int], spacing: Sequence[float], planning: Mapping[str, Any], max_depth: int
) -> tuple[dict, ModelPlan]:
    """The patch, poolings, depth and batch on a grid (`plan_conv3d`), applied to the section."""
    model = conv3d["model"]
    patch_voxels, memory_gb = int(planning["patch_voxels"]), float(planning["memory_gb"])
    planned = plan_patches(median, spacing, patch_voxels, int(model["base_filters"]), memory_gb, max_depth)
    inputs = {"median_shape": list(median), "target_spacing": list(spacing), "memory_gb": memory_gb, "patch_voxels": patch_voxels}
    given_patch = conv3d["sampling"]["patch_size"]
    depth = len(planned["poolings"])
    if given_patch != "auto":  # an explicit patch pools every axis: as deep as it divides, >= 4 voxels
        depth = max([d for d in range(1, max_depth + 1) if all(p % 2**d == 0 and p // 2**d >= 4 for p in given_patch)], default=1)
    settings, plan = apply_plan(
        "conv3d",
        conv3d,
        {"sampling.patch_size": planned["patch_size"], "model.depth": depth, "training.batch_size": planned["batch_size"]},
        inputs,
    )
    plan.planned["model.poolings"] = planned["poolings"]
    if given_patch == "auto" and model["depth"] == "auto":
        settings["model"]["poolings"] = planned["poolings"]
        plan.used["model.poolings"] = planned["poolings"]
    return settings, plan


def build_conv3d(settings: Mapping[str, Any], n_classes: int = 1) -> keras.Model:
    """The compiled 3D network of `settings` (input (*patch_size, channels)): the image, and in a
    cascade the low-resolution stage's class probabilities after it."""
    settings = ModelSettings.of(settings)
    training = settings.training
    shape = (*settings.patch_size, settings.input_channels)
    if network(settings) == "patch_classifier":
        return compile_patch_classifier(build_patch_classifier(shape), training.optimizer, training.learning_rate,
                                        training.lr_schedule, training.total_steps)
    return compile_segmentation_model(
        build_unet3d(
            shape, settings.base_filters, settings.depth, n_classes=n_classes,
            pool_sizes=settings.poolings,  # None for an explicit patch: every axis pools
        ),
        optimizer=training.optimizer,
        learning_rate=training.learning_rate,
        loss=training.loss,
        lr_schedule=training.lr_schedule,
        total_steps=training.total_steps,
    )


def _contains_foreground(images, labels):
    """Batch of (patch, label patch) -> (patch, 1 if the patch holds any foreground)."""
    import tensorflow as tf

    return images, tf.cast(tf.reduce_max(labels, axis=[1, 2, 3, 4]) > 0, tf.float32)[:, None]


def patch_samples(settings: Mapping[str, Any], load_case):
    """Random 3D patches through a bounded queue (TorchIO-style), `sampling.foreground_fraction`
    of them centred on foreground; the patch classifier learns whether a patch holds any."""
    settings = ModelSettings.of(settings)
    shape = settings.patch_size
    patches = partial(sampled_dataset, patch_stream, load_case, shape, (*shape, 1), settings.sampling,
                      image_channels=settings.input_channels)
    if network(settings) != "patch_classifier":
        return patches

    def stream(case_ids: list[str], seed: int, augment: bool, flip_axes: tuple[int, ...], *, batch_size: int):
        return patches(case_ids, seed, augment, flip_axes, batch_size=batch_size).map(_contains_foreground)

    return stream


def patch_window(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Gaussian-weighted sliding windows of the patch size (`inference.overlap`, `sigma_scale`)."""
    settings = ModelSettings.of(settings)
    inference = settings.inference
    return {"window": "patch", "depth": 0, "patch_size": settings.patch_size, "overlap": inference.overlap,
            "sigma_scale": inference.sigma_scale, "features_per_voxel": _features_per_voxel(settings)}


def evaluate_patch_detection(
    model: keras.Model,
    primary_images: dict[str, Callable[[], Volume]],
    primary_labels: dict[str, Callable[[], Volume]],
    splits: pd.DataFrame,
    settings: dict[str, Any],
    planning: PlanningParams,
    context: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Score the model as a detector on patches of the test cases: does a patch hold foreground?

    Patches are drawn as in training (same foreground fraction), with a fixed seed. The score
    of a patch is the classifier's output, or a segmentation model's highest voxel probability.
    They go through the model in batches within `planning.memory_gb`, as the segmenter batches
    its windows.

    Returns:
        (result, metrics): accuracy, roc_auc and f1 (at 0.5), and the number of patches and of
        positive ones; the same as `test_patch_<metric>` for the MLflow run.
    """
    settings = ModelSettings.of(settings)
    shape = settings.patch_size
    n_per_case = int(settings["evaluation"]["patches_per_case"])
    batch = windows_per_batch(shape, _features_per_voxel(settings), activation_budget_gb(float(planning["memory_gb"])), n_per_case)
    predict = window_predictor(model)
    rng = np.random.default_rng(settings.seed + 2)
    truths, scores = [], []
    for case_id in cases_in_split(splits, "test"):
        image, label = primary_images[case_id]().data, primary_labels[case_id]().data
        channels = [image, *np.moveaxis(np.asarray(context[case_id], np.float32), -1, 0)] if context else [image]
        centers = sample_patch_centers(label, n_per_case, shape, settings.sampling.foreground_fraction, rng, case_id=case_id)
        truths.extend(bool(extract_patch(label, c, shape).any()) for c in centers)
        for first in range(0, len(centers), batch):
            patches = np.stack([np.stack([extract_patch(channel, c, shape) for channel in channels], axis=-1)
                                for c in centers[first : first + batch]])
            probabilities = predict(patches)
            if probabilities.ndim == 5:  # K + 1 classes: the foreground is 1 - background
                probabilities = 1.0 - probabilities[..., 0]
            scores.extend(probabilities.reshape(len(patches), -1).max(axis=1).tolist())
    metrics = classification_metrics(np.array(truths, dtype=np.uint8), np.array(scores, dtype=np.float32))
    result = {**{k: float(v) for k, v in metrics.items()}, "n_patches": len(truths), "n_positive": int(sum(truths))}
    return result, {f"test_patch_{k}": v for k, v in result.items()}


def _patch_detection_nodes() -> list[Node]:
    return [
        Node(
            evaluate_patch_detection,
            ["model", "grid_images", "grid_labels", "splits", "settings", "params:planning", "context"],
            ["patch_metrics", "mlflow_metrics_patch_detection"],
            name="evaluate_patch_detection",
        )
    ]


CONV3D = register_model_kind(ModelKind(
    name="conv3d",
    params=Conv3dParams,
    plan=plan_conv3d,
    build=build_conv3d,
    sample_stream=patch_samples,
    segmenter_window=patch_window,
    network=network,
    display_name=lambda settings: NETWORKS.get(ModelSettings.of(settings).network, ModelSettings.of(settings).network),
    training_samples="sampled 3D patches",
    class_count=lambda settings, fingerprint: (
        1 if network(settings) == "patch_classifier" else foreground_class_count(settings, fingerprint)
    ),
    loss_name=lambda settings: "bce" if network(settings) == "patch_classifier" else ModelSettings.of(settings).training.loss,
    extra_nodes=_patch_detection_nodes,
    plans_grid=True,
    budget_minutes=3.75,
    order=1,
))
