"""Nodes of the `unet` pipeline: slice sampling, training and whole-volume prediction."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import keras
import pandas as pd

from medseg.imaging.io import Volume
from medseg.inference import Segmenter
from medseg.models import build_unet2d, compile_segmentation_model
from medseg.models.training import with_input_shape
from medseg.parameters import DataParams, PlanningParams, UnetParams
from medseg.patching import slice_stream
from medseg.patching.sliding_window import unet_features_per_voxel
from medseg.pipelines import tracking
from medseg.planning import median_shape, plan_slices
from medseg.pipelines.modeling import (
    apply_plan,
    case_loader,
    plan_precision,
    plan_training_steps,
    foreground_class_count,
    sampled_dataset,
    segmenter_plan,
    train_model,
)

logger = logging.getLogger(__name__)


def plan_unet(
    case_geometry: dict, dataset_fingerprint: dict, unet: UnetParams, planning: PlanningParams, timings: dict
) -> tuple[dict, dict, dict]:
    """Plan the 2D U-Net from the data: the training slice (the whole median axial slice at
    the target spacing, or 2.5 times the largest structure to segment when that is smaller,
    rounded to a multiple of 2**depth, as large as `planning.memory_gb` allows for two slices)
    and the batch (as many slices as fit the budget, at most 16).

    `unet.model.input_size` and `unet.training.batch_size` set to `auto` take these values;
    explicit values override them and are recorded as overrides. Epochs and steps set to
    `auto` fill `planning.budget_minutes.unet` at the speed timed on this machine
    (`medseg.pipelines.modeling.plan_training_steps`), and `training.precision: auto` becomes
    the policy this machine trains fastest in (`medseg.pipelines.modeling.plan_precision`).

    Args:
        case_geometry: the preprocessing plan (`geometry.json`: each case's training grid).
        dataset_fingerprint: `fingerprint.json` (the classes, for the model that is timed).
        unet: `params:unet`.
        planning: `params:planning` (memory_gb, budget_minutes).
        timings: `unet.timings`, the training-step timings of earlier runs.

    Returns:
        The plan (`unet.plan`, data/05_model_input/unet/plan.json), the settings the model is
        trained with (`unet.settings`: `params:unet` with the plan applied) and the timings.
    """
    median = median_shape(case_geometry)
    spacing = [float(s) for s in next(iter(case_geometry.values()))["target_spacing"]]
    extent_mm = dataset_fingerprint.get("foreground_extent_mm") or [0.0, 0.0, 0.0]
    structure = max(extent_mm[0] / spacing[0], extent_mm[1] / spacing[1])
    model = unet["model"]
    planned = plan_slices(
        median, int(model["base_filters"]), int(model["depth"]), float(planning["memory_gb"]), structure_voxels=structure
    )
    inputs = {"median_shape": median, "target_spacing": spacing, "memory_gb": float(planning["memory_gb"]),
              "structure_extent_voxels": round(structure, 2)}
    settings, plan = apply_plan(
        "unet", unet, {"model.input_size": planned["input_size"], "training.batch_size": planned["batch_size"]}, inputs
    )
    settings, plan = plan_precision("unet", settings, plan)
    n_classes = foreground_class_count(dataset_fingerprint)
    settings, plan, timings = plan_training_steps(
        "unet", settings, plan, lambda: _build_unet(settings, n_classes), planning, timings
    )
    return plan, settings, timings


def _build_unet(unet: dict[str, Any], n_classes: int) -> keras.Model:
    model_params, training = unet["model"], unet["training"]
    size = int(model_params["input_size"])
    return compile_segmentation_model(
        build_unet2d((size, size, 1), int(model_params["base_filters"]), int(model_params["depth"]), n_classes=n_classes),
        optimizer=training["optimizer"],
        learning_rate=float(training["learning_rate"]),
        loss=training["loss"],
    )


def train_unet(
    primary_images: dict[str, Callable[[], Volume]],
    primary_labels: dict[str, Callable[[], Volume]],
    splits: pd.DataFrame,
    case_geometry: dict,
    dataset_fingerprint: dict,
    data: DataParams,
    unet: UnetParams,
    backup_root: str,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train the 2D U-Net on axial slices streamed from the training cases.

    Slices are cropped or zero-padded to `unet.model.input_size` and drawn with
    `unet.sampling.foreground_fraction` of them centred on foreground (nnU-Net's 0.33), through
    a bounded queue (`samples_per_volume`, `queue_length`), so memory does not grow with the
    dataset. Seeding, crash recovery and logging: `medseg.pipelines.modeling.train_model`.

    Args:
        primary_images, primary_labels: preprocessed cases.
        splits: the case split (train for fitting, val for early stopping).
        case_geometry: the preprocessing plan (part of the backup's fingerprint).
        dataset_fingerprint: `fingerprint.json` (the classes: a sigmoid head for one, K + 1
            softmax channels for K > 1; the lateralized classes).
        data: `params:data` (seed; part of the fingerprint).
        unet: `unet.settings`, `params:unet` with the plan applied.
        backup_root: `unet.backup`, the crash-recovery folder.

    Returns:
        The trained model (best validation loss) and its history.
    """
    size = int(unet["model"]["input_size"])
    build = partial(_build_unet, unet, foreground_class_count(dataset_fingerprint))
    stream = partial(
        sampled_dataset, slice_stream, case_loader(primary_images, primary_labels), (size, size), (size, size, 1),
        unet["sampling"],
    )
    return train_model("unet", build, stream, splits, case_geometry, dataset_fingerprint, data, unet, backup_root)


def build_unet_segmenter(
    model: keras.Model,
    case_fingerprints: pd.DataFrame,
    case_geometry: dict,
    dataset_fingerprint: dict,
    data: DataParams,
    unet: UnetParams,
    planning: PlanningParams,
) -> Segmenter:
    """The trained U-Net as a segmenter: whole axial slices of any size (padded to a multiple
    of 2**depth), batched within `planning.memory_gb`, with the training run's plan.

    Args:
        model: the trained 2D U-Net.
        case_fingerprints: per-case table (the channel the cases were read from).
        case_geometry: the preprocessing plan (its target spacing).
        dataset_fingerprint: `fingerprint.json` (classes, lateralized classes).
        data: `params:data` (preprocessing).
        unet: `params:unet` (model, inference).
        planning: `params:planning` (memory_gb).

    Returns:
        The segmenter, saved as `unet.segmenter` (data/06_models/unet/segmenter/).
    """
    base_filters, depth = int(unet["model"]["base_filters"]), int(unet["model"]["depth"])
    plan = segmenter_plan(
        "unet", tracking.MODEL_DISPLAY["unet"], case_fingerprints, case_geometry, dataset_fingerprint, data, unet, planning,
        window="slice", depth=depth, patch_size=None, overlap=0.0, sigma_scale=0.125,
        features_per_voxel=unet_features_per_voxel(base_filters, depth, 2),
    )
    return Segmenter(with_input_shape(model, (None, None, 1)), plan)
