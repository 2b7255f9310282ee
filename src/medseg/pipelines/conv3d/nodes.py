"""Nodes of the `conv3d` pipeline: patch training, sliding-window prediction, patch detection.

Two model kinds (`conv3d.model.kind`):
- `unet3d`: a 3D U-Net; whole volumes are segmented by Gaussian-weighted sliding windows.
- `patch_classifier`: the original course block, which says whether a patch holds foreground.
  Its sliding-window output is a coarse detection map (each window's probability spread over
  the window), so it is evaluated by the same code, honestly, as a localiser.
Both are also scored on test-case patches as detectors (accuracy, ROC-AUC, F1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import keras
import numpy as np
import pandas as pd

from medseg.errors import ConfigurationError
from medseg.evaluation import classification_metrics
from medseg.imaging.io import Volume
from medseg.models import build_patch_classifier, build_unet3d, compile_patch_classifier, compile_segmentation_model
from medseg.parameters import Conv3dParams, DataParams, PlanningParams
from medseg.inference import Segmenter, window_predictor
from medseg.patching import extract_patch, patch_stream, sample_patch_centers
from medseg.patching.sliding_window import unet_features_per_voxel, windows_per_batch
from medseg.pipelines import tracking
from medseg.planning import median_shape, plan_patches
from medseg.pipelines.modeling import (
    apply_plan,
    case_loader,
    plan_precision,
    plan_training_steps,
    cases_in_split,
    foreground_class_count,
    sampled_dataset,
    segmenter_plan,
    train_model,
)

logger = logging.getLogger(__name__)

KINDS = ("unet3d", "patch_classifier")


def _kind(conv3d: dict[str, Any]) -> str:
    kind = conv3d["model"]["kind"]
    if kind not in KINDS:
        raise ConfigurationError(f"conv3d.model.kind='{kind}' is not one of {list(KINDS)}.")
    return kind


def _patch_shape(conv3d: dict[str, Any]) -> tuple[int, int, int]:
    return tuple(int(s) for s in conv3d["sampling"]["patch_size"])


def _features_per_voxel(conv3d: dict[str, Any]) -> float:
    """The model's width for the memory budget (`unet_features_per_voxel`)."""
    if _kind(conv3d) == "patch_classifier":
        # Conv3D(16) at full resolution, Conv3D(32) after one pooling: a 16-filter encoder of depth 1.
        return unet_features_per_voxel(16, 1, 3)
    return unet_features_per_voxel(int(conv3d["model"]["base_filters"]), int(conv3d["model"]["depth"]), 3)


def _windows_per_batch(conv3d: dict[str, Any], planning: dict[str, Any], n_windows: int | None = None) -> int:
    """Windows per forward pass within `planning.memory_gb`, for the patch shape and model width."""
    return windows_per_batch(_patch_shape(conv3d), _features_per_voxel(conv3d), float(planning["memory_gb"]), n_windows)


def _build_model(conv3d: dict[str, Any], n_classes: int = 1) -> keras.Model:
    model_params, training = conv3d["model"], conv3d["training"]
    shape = (*_patch_shape(conv3d), 1)
    if _kind(conv3d) == "patch_classifier":
        return compile_patch_classifier(build_patch_classifier(shape), training["optimizer"], float(training["learning_rate"]))
    return compile_segmentation_model(
        build_unet3d(
            shape, int(model_params["base_filters"]), int(model_params["depth"]), n_classes=n_classes,
            pool_sizes=model_params.get("poolings"),
        ),
        optimizer=training["optimizer"],
        learning_rate=float(training["learning_rate"]),
        loss=training["loss"],
    )


def _contains_foreground(images, labels):
    """Batch of (patch, label patch) -> (patch, 1 if the patch holds any foreground)."""
    import tensorflow as tf

    return images, tf.cast(tf.reduce_max(labels, axis=[1, 2, 3, 4]) > 0, tf.float32)[:, None]


def plan_conv3d(
    case_geometry: dict, dataset_fingerprint: dict, conv3d: Conv3dParams, planning: PlanningParams, timings: dict
) -> tuple[dict, dict, dict]:
    """Plan the 3D model from the data: the patch (about `planning.patch_voxels` voxels,
    shaped in millimetres so that a thick-slice axis gets fewer voxels, clipped to the median
    case), the poolings per axis (nnU-Net's: none below 4 voxels, none along an axis twice as
    coarse as the finest), the depth (their number) and the batch (`planning.memory_gb`).

    `conv3d.sampling.patch_size`, `conv3d.model.depth` and `conv3d.training.batch_size` set to
    `auto` take these values; explicit values override them and are recorded. The per-axis
    poolings apply only to a planned patch; an explicit patch pools every axis. Epochs and
    steps set to `auto` fill `planning.budget_minutes.conv3d` at the speed timed on this
    machine (`medseg.pipelines.modeling.plan_training_steps`), and `training.precision: auto`
    becomes the policy this machine trains fastest in (`medseg.pipelines.modeling.plan_precision`).

    Returns:
        The plan (`conv3d.plan`, data/05_model_input/conv3d/plan.json), the settings the
        model is trained with (`conv3d.settings`) and the timings (`conv3d.timings_updated`).
    """
    median = median_shape(case_geometry)
    spacing = [float(s) for s in next(iter(case_geometry.values()))["target_spacing"]]
    model = conv3d["model"]
    max_depth = 4 if model["depth"] == "auto" else int(model["depth"])
    planned = plan_patches(median, spacing, int(planning["patch_voxels"]), int(model["base_filters"]), float(planning["memory_gb"]), max_depth)
    inputs = {"median_shape": median, "target_spacing": spacing, "memory_gb": float(planning["memory_gb"]),
              "patch_voxels": int(planning["patch_voxels"])}
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
    plan["planned"]["model.poolings"] = planned["poolings"]
    if conv3d["sampling"]["patch_size"] == "auto" and model["depth"] == "auto":
        settings["model"]["poolings"] = planned["poolings"]
        plan["used"]["model.poolings"] = planned["poolings"]
    settings, plan = plan_precision("conv3d", settings, plan)
    n_classes = 1 if _kind(settings) == "patch_classifier" else foreground_class_count(dataset_fingerprint)
    settings, plan, timings = plan_training_steps(
        "conv3d", settings, plan, lambda: _build_model(settings, n_classes), planning, timings
    )
    return plan, settings, timings


def train_conv3d(
    primary_images: dict[str, Callable[[], Volume]],
    primary_labels: dict[str, Callable[[], Volume]],
    splits: pd.DataFrame,
    case_geometry: dict,
    dataset_fingerprint: dict,
    data: DataParams,
    conv3d: Conv3dParams,
    backup_root: str,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train on random 3D patches streamed through a bounded queue (TorchIO-style).

    `conv3d.sampling.foreground_fraction` of the patches are centred on foreground voxels;
    memory holds one case plus `queue_length` patches, whatever the dataset's size. Seeding,
    crash recovery and logging: `medseg.pipelines.modeling.train_model`.

    Args:
        primary_images, primary_labels: preprocessed cases.
        splits: the case split (train for fitting, val for early stopping).
        case_geometry: the preprocessing plan (part of the backup's fingerprint).
        dataset_fingerprint: `fingerprint.json` (the classes: the 3D U-Net gets K + 1 softmax
            channels for K > 1; the patch classifier stays a foreground detector).
        data: `params:data` (seed; part of the fingerprint).
        conv3d: `conv3d.settings`, `params:conv3d` with the plan applied.
        backup_root: `conv3d.backup`, the crash-recovery folder.

    Returns:
        The trained model (best validation loss) and its history.
    """
    shape = _patch_shape(conv3d)
    classifier = _kind(conv3d) == "patch_classifier"
    patches = partial(
        sampled_dataset, patch_stream, case_loader(primary_images, primary_labels), shape, (*shape, 1),
        conv3d["sampling"],
    )

    def stream(case_ids: list[str], seed: int, augment: bool, flip_axes: tuple[int, ...], *, batch_size: int):
        dataset = patches(case_ids, seed, augment, flip_axes, batch_size=batch_size)
        return dataset.map(_contains_foreground) if classifier else dataset

    n_classes = 1 if classifier else foreground_class_count(dataset_fingerprint)
    build = partial(_build_model, conv3d, n_classes)
    return train_model("conv3d", build, stream, splits, case_geometry, dataset_fingerprint, data, conv3d, backup_root)


def build_conv3d_segmenter(
    model: keras.Model,
    case_fingerprints: pd.DataFrame,
    case_geometry: dict,
    dataset_fingerprint: dict,
    data: DataParams,
    conv3d: Conv3dParams,
    planning: PlanningParams,
) -> Segmenter:
    """The trained 3D model as a segmenter: Gaussian-weighted sliding windows of the patch
    size (`conv3d.inference.overlap`, `sigma_scale`), batched within `planning.memory_gb`,
    with the training run's plan. A patch classifier's map is its windows' probabilities
    spread over each window (a coarse detection map).

    Args:
        model: the trained 3D model.
        case_fingerprints: per-case table (the channel the cases were read from).
        case_geometry: the preprocessing plan (its target spacing).
        dataset_fingerprint: `fingerprint.json` (classes, lateralized classes).
        data: `params:data` (preprocessing).
        conv3d: `params:conv3d` (model, patch size, inference).
        planning: `params:planning` (memory_gb).

    Returns:
        The segmenter, saved as `conv3d.segmenter` (data/06_models/conv3d/segmenter/).
    """
    inference = conv3d["inference"]
    plan = segmenter_plan(
        "conv3d", tracking.MODEL_DISPLAY[_kind(conv3d)], case_fingerprints, case_geometry, dataset_fingerprint, data,
        conv3d, planning, window="patch", depth=0, patch_size=_patch_shape(conv3d), overlap=float(inference["overlap"]),
        sigma_scale=float(inference["sigma_scale"]), features_per_voxel=_features_per_voxel(conv3d),
    )
    return Segmenter(model, plan)


def evaluate_patch_detection(
    model: keras.Model,
    primary_images: dict[str, Callable[[], Volume]],
    primary_labels: dict[str, Callable[[], Volume]],
    splits: pd.DataFrame,
    conv3d: Conv3dParams,
    planning: PlanningParams,
) -> dict[str, float]:
    """Score the model as a detector on patches of the test cases: does a patch hold foreground?

    Patches are drawn as in training (same foreground fraction), with a fixed seed. The score
    of a patch is the classifier's output, or a segmentation model's highest voxel probability.
    They go through the model in batches within `planning.memory_gb`, as the segmenter batches its windows.

    Returns:
        accuracy, roc_auc and f1 (at 0.5), and the number of patches and of positive ones;
        also logged to MLflow as `test_patch_<metric>`.
    """
    shape = _patch_shape(conv3d)
    n_per_case = int(conv3d["evaluation"]["patches_per_case"])
    batch = _windows_per_batch(conv3d, planning, n_per_case)
    predict = window_predictor(model)
    rng = np.random.default_rng(int(conv3d["seed"]) + 2)
    truths, scores = [], []
    for case_id in cases_in_split(splits, "test"):
        image, label = primary_images[case_id]().data, primary_labels[case_id]().data
        centers = sample_patch_centers(label, n_per_case, shape, float(conv3d["sampling"]["foreground_fraction"]), rng, case_id=case_id)
        truths.extend(bool(extract_patch(label, c, shape).any()) for c in centers)
        for first in range(0, len(centers), batch):
            patches = np.stack([extract_patch(image, c, shape) for c in centers[first : first + batch]])[..., None]
            probabilities = predict(patches)
            if probabilities.ndim == 5:  # K + 1 classes: the foreground is 1 - background
                probabilities = 1.0 - probabilities[..., 0]
            scores.extend(probabilities.reshape(len(patches), -1).max(axis=1).tolist())
    metrics = classification_metrics(np.array(truths, dtype=np.uint8), np.array(scores, dtype=np.float32))
    result = {**{k: float(v) for k, v in metrics.items()}, "n_patches": len(truths), "n_positive": int(sum(truths))}
    tracking.log_metrics("conv3d", {f"test_patch_{k}": v for k, v in result.items()})
    return result
