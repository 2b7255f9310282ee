"""Nodes of the `unet` pipeline: slice sampling, training and whole-volume prediction."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import keras
import pandas as pd

from medseg.imaging.io import Volume
from medseg.models import build_unet2d, compile_segmentation_model
from medseg.models.training import predict_axial_slices, slice_predictor, slices_per_batch, with_input_shape
from medseg.parameters import DataParams, PlanningParams, UnetParams
from medseg.patching import slice_stream
from medseg.pipelines.modeling import (
    case_loader,
    cases_in_split,
    class_values,
    foreground_class_count,
    predictions_in_original_geometry,
    sampled_dataset,
    train_model,
)

logger = logging.getLogger(__name__)


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
        unet: `params:unet`.
        backup_root: `unet.backup`, the crash-recovery folder.

    Returns:
        The trained model (best validation loss) and its history.
    """
    model_params, training = unet["model"], unet["training"]
    size = int(model_params["input_size"])

    def build() -> keras.Model:
        return compile_segmentation_model(
            build_unet2d(
                (size, size, 1), int(model_params["base_filters"]), int(model_params["depth"]),
                n_classes=foreground_class_count(dataset_fingerprint),
            ),
            optimizer=training["optimizer"],
            learning_rate=float(training["learning_rate"]),
            loss=training["loss"],
        )

    stream = partial(
        sampled_dataset, slice_stream, case_loader(primary_images, primary_labels), (size, size), (size, size, 1),
        unet["sampling"], int(training["batch_size"]),
    )
    return train_model("unet", build, stream, splits, case_geometry, dataset_fingerprint, data, unet, backup_root)


def predict_unet(
    model: keras.Model,
    primary_images: dict[str, Callable[[], Volume]],
    case_geometry: dict,
    splits: pd.DataFrame,
    dataset_fingerprint: dict,
    unet: UnetParams,
    planning: PlanningParams,
) -> dict[str, Callable[[], Volume]]:
    """Predict every validation and test case slice by slice; masks in the source geometry.

    Whole slices go through the model in batches sized by `planning.memory_gb` for each case's
    slice size (`slices_per_batch`): a CT scan's 512×512 slices go a few at a time, a phantom's
    by the hundred; the probabilities do not depend on the batch.

    Args:
        model: the trained 2D U-Net.
        primary_images: preprocessed cases.
        case_geometry: the preprocessing plan, to map each mask back to its source geometry.
        splits: the case split (val and test cases are predicted).
        dataset_fingerprint: `fingerprint.json` (the dataset's label value of each class).
        unet: `params:unet` (model width and depth, threshold).
        planning: `params:planning` (memory_gb).

    Returns:
        Lazy partitions {case_id: mask volume} for `unet.predictions`.
    """
    base_filters, depth = int(unet["model"]["base_filters"]), int(unet["model"]["depth"])
    multiple = 2**depth
    memory_gb = float(planning["memory_gb"])
    predict = slice_predictor(with_input_shape(model, (None, None, 1)))

    def probabilities(image):
        batch = slices_per_batch(image.shape[:2], multiple, base_filters, depth, memory_gb, n_slices=image.shape[2])
        logger.info(
            "unet: %d slices of %dx%d per batch (planning.memory_gb=%g)", batch, image.shape[0], image.shape[1], memory_gb
        )
        return predict_axial_slices(predict, image, multiple, batch)

    return predictions_in_original_geometry(
        probabilities,
        primary_images,
        case_geometry,
        cases_in_split(splits, "val", "test"),
        float(unet["inference"]["threshold"]),
        class_values(dataset_fingerprint),
    )
