"""Nodes of the `data` pipeline: thin wrappers around `medseg.imaging` and `medseg.cases.split`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg.runs import compute
from medseg.storage.paths import anchor_path
from medseg.errors import ConfigurationError
from medseg.imaging.geometry import (
    CaseGeometry,
    PreprocessingPlan,
    label_to_training_grid,
    plan_case_geometry,
    to_canonical,
)
from medseg.imaging.io import Volume, read_volume
from medseg.cases.msd import (
    CaseFiles,
    dataset_location,
    foreground_classes,
    list_msd_cases,
    read_dataset_json,
)
from medseg.imaging.normalization import image_to_training_grid
from medseg.synthetic.phantoms import synthesis_settings
from medseg.cases.validation import (
    binarize_label,
    dataset_fingerprint,
    fingerprint_cases,
    label_for_storage,
    label_to_class_indices,
    resolve_label_classes,
)
from medseg.parameters import CvParams, DataParams, PreprocessingParams
from medseg.storage.incremental import KeyedPartition, content_key
from medseg.cases.split import assign_folds, classes_not_in_training, split_cases, split_sizes

logger = logging.getLogger(__name__)

# Bump when canonicalization or preprocessing change what they write: every case is made again.
CANONICAL_VERSION = 1
PREPROCESSING_VERSION = 1

def phantom_settings(data: DataParams) -> dict:
    """What the synthetic phantoms are made from, for the catalog's `synthetic_phantoms` to
    write (only when they changed); empty when `data.source` is not `synthetic`.

    Args:
        data: `params:data` (source, seed, synthetic.*).
    """
    return synthesis_settings(data) if data["source"] == "synthetic" else {}


def dicom_settings(data: DataParams, project_root: str) -> dict:
    """What the catalog's `dicom_cases` converts to MSD layout: `{"dicom_dir": <absolute
    folder>}` when `data.source` is `dicom`, else empty (nothing is written).

    Args:
        data: `params:data` (source, dicom_dir; a relative dicom_dir is taken from the project root).
        project_root: the project's root folder (catalog entry `project_root`).
    """
    if data["source"] != "dicom":
        return {}
    return {"dicom_dir": str(anchor_path(data["dicom_dir"], project_root))}


def list_source_cases(
    data: DataParams, project_root: str, synthetic_phantoms: str, dicom_cases: str | None = None
) -> tuple[pd.DataFrame, dict]:
    """List the training cases of the chosen source.

    Args:
        data: `params:data` (source, msd_dir, channel). A relative `msd_dir` is taken from the
            project root, as Kedro takes the catalog's paths, never from the current folder;
            it may be a URL on an fsspec store (`s3://bucket/Task04_Hippocampus`).
        project_root: the project's root folder (catalog entry `project_root`).
        synthetic_phantoms: the phantoms' folder (catalog entry `synthetic_phantoms`), read
            when `data.source` is `synthetic`.
        dicom_cases: the DICOM studies converted to MSD layout (catalog entry `dicom_cases`),
            read when `data.source` is `dicom`.

    Returns:
        `source_cases`, one row per case: case_id, image_path, label_path, channel (the paths
        are URLs for a URL `msd_dir`); and `source_classes`: {"manifest": dataset.json's path,
        "classes": {label value: name}, the foreground labels it lists
        (:func:`medseg.cases.msd.foreground_classes`), "dataset": its name in `dataset.json`}.
    """
    source = data["source"]
    if source in ("synthetic", "dicom"):
        root = Path(synthetic_phantoms if source == "synthetic" else dicom_cases).resolve()
        cases = list_msd_cases(root)
    else:  # "msd", with its msd_dir: the schema (DataParams) allows nothing else
        root = dataset_location(anchor_path(data["msd_dir"], project_root))
        cases = list_msd_cases(root, channel=data["channel"])
    manifest = root / "dataset.json"
    description = read_dataset_json(root)
    classes = foreground_classes(description, manifest)
    # The dataset's name, as the MLflow runs and the registry call it (`tracking.dataset_identity`).
    name = str(description.get("name") or root.name)
    return pd.DataFrame([case.__dict__ for case in cases]), {"manifest": str(manifest), "classes": classes, "dataset": name}


def _case_id(value: Any) -> str:
    """A case id from a table, refusing one that a CSV reader turned into a number or NaN."""
    if not isinstance(value, str):
        raise ConfigurationError(
            f"case id {value!r} was read as {type(value).__name__}, not text: an id like '001' or 'NA' "
            "would be changed. Load the CSV with `load_args: {dtype: {case_id: str}, keep_default_na: false, "
            "na_values: ['']}` in its catalog entry."
        )
    return value


def _case_files(row: pd.Series) -> CaseFiles:
    channel = row["channel"]
    channel = None if channel is None or channel == "" or pd.isna(channel) else int(channel)
    return CaseFiles(_case_id(row["case_id"]), row["image_path"], row["label_path"], channel)


def validate_cases(
    source_cases: pd.DataFrame, source_classes: dict, data: DataParams, previous_case_fingerprints: pd.DataFrame
) -> tuple[pd.DataFrame, dict]:
    """Read and check every case (one at a time) and summarise the dataset.

    Nothing is written before this node succeeds, so every check on the source data is here:
    the split needs enough cases (checked first, before any file is read), the label mode must
    fit dataset.json, every file must be readable with a usable geometry, in multiclass mode
    every label value must be listed in dataset.json, and `data.foreground_labels` must match
    some voxel. The cases are read on the run's executor (`compute.scheduler`).

    Args:
        source_cases: output of `list_source_cases`.
        source_classes: the classes dataset.json lists (output of `list_source_cases`).
        data: `params:data` (split.*, label_mode, foreground_labels, preprocessing.crop_to_nonzero).
        previous_case_fingerprints: the last run's table (empty on a first run): a case whose
            files and settings did not change keeps its row and is not read again.

    Returns:
        The per-case fingerprint table (with `share_<value>` per class and each file's size,
        mtime and SHA-256) and the dataset fingerprint (median spacing, `label_mode`,
        `classes`, `lateralized`, etc., and `dataset`, its name).

    Raises:
        SplitError, ConfigurationError and the MedsegErrors of
        :func:`medseg.cases.validation.fingerprint_cases`.
    """
    preprocessing = data["preprocessing"]
    crop_margin = int(preprocessing["crop_margin"]) if preprocessing["crop_to_nonzero"] else None
    cases = [_case_files(row) for _, row in source_cases.iterrows()]
    split = data["split"]
    split_sizes(len(cases), split["train"], split["val"], split["test"])
    label_mode, classes = resolve_label_classes(
        source_classes["classes"], data["label_mode"], data["foreground_labels"], source_classes["manifest"]
    )
    logger.info("Label mode %s, classes %s.", label_mode, classes)
    previous = {
        str(row["case_id"]): row for row in previous_case_fingerprints.to_dict("records")
    } if "settings_key" in previous_case_fingerprints else {}
    records = fingerprint_cases(
        cases, data["foreground_labels"], crop_margin, classes if label_mode == "multiclass" else None,
        previous=previous, mapper=compute.current().map,
    )
    # The dataset's name goes with its fingerprint, so that `select` registers the champion of
    # the data the models were cross-validated on, whatever the parameters of its own run say.
    return pd.DataFrame(records), {**dataset_fingerprint(records, label_mode, classes), "dataset": source_classes.get("dataset")}


def _canonical_loader(path: str, role: str, channel: int | None) -> Callable[[], Volume]:
    def load() -> Volume:
        volume = to_canonical(read_volume(path, role=role, channel=channel))
        if role == "label":
            volume.data = label_for_storage(volume.data)  # values above 255 are background
        return volume

    return load


def _canonical_keys(row: pd.Series) -> dict[str, str]:
    """What each canonical file is made from: its source file's content (and the channel)."""
    return {
        "image": content_key(CANONICAL_VERSION, "image", row["image_sha256"], _case_files(row).channel),
        "label": content_key(CANONICAL_VERSION, "label", row["label_sha256"]),
    }


def canonicalize_cases(case_fingerprints: pd.DataFrame) -> tuple[dict, dict]:
    """Reorient every validated case to canonical RAS (made lazily, one case per task).

    A case whose source file did not change since the last run keeps its canonical file
    (:class:`medseg.storage.incremental.KeyedPartition`, keyed by the file's SHA-256).

    Args:
        case_fingerprints: per-case table from `validate_cases` (case ids as text).

    Returns:
        Partitions for `intermediate_images` (float32) and `intermediate_labels` (uint8 with the
        dataset's own values; values above 255, never foreground, become 0), keyed by case id.
    """
    images, labels = {}, {}
    for _, row in case_fingerprints.iterrows():
        case = _case_files(row)
        keys = _canonical_keys(row)
        images[case.case_id] = KeyedPartition(keys["image"], _canonical_loader(case.image_path, "image", case.channel))
        labels[case.case_id] = KeyedPartition(keys["label"], _canonical_loader(case.label_path, "label", None))
    return images, labels


def plan_preprocessing(
    case_fingerprints: pd.DataFrame, fingerprint: dict, preprocessing: PreprocessingParams
) -> PreprocessingPlan:
    """Decide each case's training grid: target spacing, crop box and shape.

    Args:
        case_fingerprints: per-case table from `validate_cases`.
        fingerprint: the dataset fingerprint.
        preprocessing: `params:data.preprocessing`; `target_spacing` null means the dataset's
            median spacing.

    Returns:
        Each case's geometry, saved as `geometry.json`.
    """
    target = preprocessing["target_spacing"] or fingerprint["median_spacing"]
    if len(target) != 3 or min(target) <= 0:
        raise ConfigurationError(f"data.preprocessing.target_spacing={target}: need three positive values in mm.")
    plans = {}
    for _, row in case_fingerprints.iterrows():
        crop_box = json.loads(row["crop_box"]) if "crop_box" in row and isinstance(row["crop_box"], str) else None
        plans[_case_id(row["case_id"])] = plan_case_geometry(
            json.loads(row["original_shape"]), np.array(json.loads(row["original_affine"])), tuple(target), crop_box
        )
    return PreprocessingPlan(plans)


def _preprocess_image(load: Callable[[], Volume], geometry: CaseGeometry, preprocessing: dict) -> Callable[[], Volume]:
    def run() -> Volume:
        return image_to_training_grid(
            load(), geometry, int(preprocessing["interpolation_order"]), preprocessing["clip_percentiles"]
        )

    return run


def _preprocess_label(
    load: Callable[[], Volume], geometry: CaseGeometry, class_values: list[int] | None, foreground_labels
) -> Callable[[], Volume]:
    def run() -> Volume:
        canonical = load()
        if class_values is None:
            canonical.data = binarize_label(canonical.data, foreground_labels)
        else:
            canonical.data = label_to_class_indices(canonical.data, class_values)
        return label_to_training_grid(canonical, geometry)

    return run


def preprocess_cases(
    intermediate_images: dict[str, Callable[[], Volume]],
    intermediate_labels: dict[str, Callable[[], Volume]],
    case_fingerprints: pd.DataFrame,
    case_geometry: PreprocessingPlan,
    fingerprint: dict,
    data: DataParams,
) -> tuple[dict, dict]:
    """Resample to the target spacing and normalize intensities, one case per task.

    Labels are resampled one-hot, linearly, then argmax (nnU-Net's way; nearest neighbour
    would shift them by half a voxel against the linearly resampled image). A case whose
    source file, geometry plan and preprocessing settings did not change since the last run
    keeps its files (:class:`medseg.storage.incremental.KeyedPartition`); a changed plan (target
    spacing, interpolation, clipping, classes) redoes every case.

    Args:
        intermediate_images, intermediate_labels: canonical RAS partitions.
        case_fingerprints: per-case table from `validate_cases` (each source file's SHA-256).
        case_geometry: the plan from `plan_preprocessing`.
        fingerprint: the dataset fingerprint (`label_mode`, `classes`).
        data: `params:data` (preprocessing.*, foreground_labels).

    Returns:
        Lazy partitions for `primary_images` (z-scored float32) and `primary_labels` (uint8):
        binary {0, 1}, or in multiclass mode the training indices 0..K, where index i stands
        for the i-th label value of `fingerprint["classes"]` (ascending).
    """
    preprocessing = data["preprocessing"]
    multiclass = fingerprint.get("label_mode") == "multiclass"
    class_values = sorted(int(value) for value in fingerprint["classes"]) if multiclass else None
    image_settings = {k: preprocessing[k] for k in ("interpolation_order", "clip_percentiles", "normalization")}
    sources = {_case_id(row["case_id"]): _canonical_keys(row) for _, row in case_fingerprints.iterrows()}
    images, labels = {}, {}
    for case_id, geometry in case_geometry.cases.items():
        record = geometry.to_dict()
        images[case_id] = KeyedPartition(
            content_key(PREPROCESSING_VERSION, sources[case_id]["image"], record, image_settings),
            _preprocess_image(intermediate_images[case_id], geometry, preprocessing),
        )
        labels[case_id] = KeyedPartition(
            content_key(PREPROCESSING_VERSION, sources[case_id]["label"], record, class_values, data["foreground_labels"]),
            _preprocess_label(intermediate_labels[case_id], geometry, class_values, data["foreground_labels"]),
        )
    return images, labels


def split_dataset(case_fingerprints: pd.DataFrame, data: DataParams) -> pd.DataFrame:
    """Split the cases into train/val/test by case, from `data.seed` and `data.split.*`.

    Args:
        case_fingerprints: per-case table from `validate_cases` (case ids as text).
        data: `params:data` (seed, split.*).

    Returns:
        The `splits` table: case_id, split.
    """
    split = data["split"]
    case_ids = [_case_id(value) for value in case_fingerprints["case_id"]]
    splits = split_cases(case_ids, split["train"], split["val"], split["test"], int(data["seed"]))
    split_of = dict(zip(splits["case_id"], splits["split"]))
    for name, holders in classes_not_in_training(splits, case_fingerprints).items():
        where = ", ".join(f"{case} ({split_of[case]})" for case in holders)
        logger.warning(
            "%s is in no training case%s: a model cannot learn it, and scores 0 on it. Change data.seed or data.split "
            "so that a case holding it trains.", name, f" (only in {where})" if holders else " (in no case at all)",
        )
    return splits


def assign_cv_folds(splits: pd.DataFrame, cv: CvParams, data: DataParams, folds_saved: dict) -> dict:
    """The cross-validation folds, `data/03_primary/folds.json` (`medseg.cases.split.assign_folds`).

    With `cv.folds: 0` the saved file is passed on as it is (or an empty record when there is
    none), so a run without cross-validation never changes the folds of a later one.
    """
    if int(cv["folds"]) == 0:
        return folds_saved or {}
    folds = assign_folds(splits, int(cv["folds"]), int(data["seed"]), folds_saved)
    if folds_saved and folds_saved.get("folds") != folds["folds"]:
        logger.info("folds.json: kept, with the cases that changed placed: %s.",
                    [len(f["val"]) for f in folds["folds"]])
    return folds
