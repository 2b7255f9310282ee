"""Nodes of the `unet` pipeline: slice sampling, training and whole-volume prediction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import pandas as pd

from medseg.imaging.io import Volume
from medseg.models import build_unet2d, compile_segmentation_model
from medseg.models.training import predict_axial_slices, with_input_shape
from medseg.patching import slice_stream
from medseg.pipelines.modeling import case_loader, cases_in_split, fit_with_params, predictions_in_original_geometry, sampled_dataset


def build_slice_index(primary_labels: dict[str, Callable[[], Volume]], splits: pd.DataFrame) -> pd.DataFrame:
    """Index of the training and validation slices: how much foreground each axial slice holds.

    Returns:
        One row per slice: case_id, split, z, foreground_voxels. Small (no voxel data), and
        it tells how rare foreground slices are, which is why sampling oversamples them.
    """
    rows = []
    split_of = splits.set_index("case_id")["split"]
    for case_id in cases_in_split(splits, "train", "val"):
        label = primary_labels[case_id]().data
        counts = label.reshape(-1, label.shape[2]).sum(axis=0)
        split = split_of[case_id]
        rows.extend({"case_id": case_id, "split": split, "z": z, "foreground_voxels": int(n)} for z, n in enumerate(counts))
    return pd.DataFrame(rows)


def train_unet(
    primary_images: dict[str, Callable[[], Volume]],
    primary_labels: dict[str, Callable[[], Volume]],
    splits: pd.DataFrame,
    unet: dict[str, Any],
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train the 2D U-Net on axial slices streamed from the training cases.

    Slices are cropped or zero-padded to `unet.model.input_size` and drawn with
    `unet.training.foreground_fraction` of them centred on foreground (nnU-Net's 0.33), through
    a bounded queue (`samples_per_volume`, `queue_length`), so memory does not grow with the
    dataset.

    Args:
        primary_images, primary_labels: preprocessed cases.
        splits: the case split (train for fitting, val for early stopping).
        unet: `params:unet`.

    Returns:
        The trained model (best validation loss) and its history.
    """
    model_params, training = unet["model"], unet["training"]
    keras.utils.set_random_seed(int(unet["seed"]))
    size = int(model_params["input_size"])
    load_case = case_loader(primary_images, primary_labels)

    def stream(case_ids: list[str], seed: int, augment: bool):
        return sampled_dataset(
            slice_stream, load_case, case_ids, (size, size), (size, size, 1), training,
            int(training["batch_size"]), seed, augment,
        )

    model = compile_segmentation_model(
        build_unet2d((size, size, 1), int(model_params["base_filters"]), int(model_params["depth"])),
        optimizer=training["optimizer"],
        learning_rate=float(training["learning_rate"]),
        loss=training["loss"],
    )
    history = fit_with_params(
        model,
        stream(cases_in_split(splits, "train"), int(unet["seed"]), bool(training["augment"])),
        stream(cases_in_split(splits, "val"), int(unet["seed"]) + 1, False),
        training,
        "unet",
    )
    return model, history


def predict_unet(
    model: keras.Model,
    primary_images: dict[str, Callable[[], Volume]],
    case_geometry: dict,
    splits: pd.DataFrame,
    unet: dict[str, Any],
) -> dict[str, Callable[[], Volume]]:
    """Predict every validation and test case slice by slice; masks in the source geometry.

    Returns:
        Lazy partitions {case_id: mask volume} for `unet.predictions`.
    """
    multiple = 2 ** int(unet["model"]["depth"])
    batch_size = int(unet["inference"]["batch_size"])
    any_size = with_input_shape(model, (None, None, 1))
    return predictions_in_original_geometry(
        lambda image: predict_axial_slices(any_size, image, multiple, batch_size),
        primary_images,
        case_geometry,
        cases_in_split(splits, "val", "test"),
        float(unet["inference"]["threshold"]),
    )
