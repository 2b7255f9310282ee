"""Wiring: the `data` pipeline run with Kedro's SequentialRunner on a DataCatalog whose datasets
live in memory (the phantoms' folder aside, which its reader needs), as Kedro's starter tests a
pipeline: no session, no MLflow store, no hooks."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from conftest import REPO_ROOT, TINY_DATA_PARAMS, kept_dataset, nested
from medseg.datasets.dicom_source import DicomCasesDataset
from medseg.datasets.phantoms import PhantomDataset
from medseg.pipelines.data import create_pipeline


def _defaults(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "conf" / "base" / f"parameters_{name}.yml").read_text())[name]


def _merged(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = _merged(merged[key], value) if isinstance(value, dict) else value
    return merged


KEPT = ("splits", "case_geometry", "primary_images", "primary_labels", "case_fingerprints", "dataset_fingerprint")


def _catalog(root: Path, data: dict) -> DataCatalog:
    import pandas as pd

    return DataCatalog(
        {
            **{name: kept_dataset() for name in KEPT},
            "synthetic_phantoms": PhantomDataset(path=str(root / "raw" / "synthetic")),
            "dicom_cases": DicomCasesDataset(path=str(root / "raw" / "dicom")),
            "project_root": MemoryDataset(str(root)),
            "previous_case_fingerprints": MemoryDataset(pd.DataFrame()),
            "folds_saved": MemoryDataset({}),
            "params:data": MemoryDataset(data),
            "params:data.preprocessing": MemoryDataset(data["preprocessing"]),
            "params:cv": MemoryDataset(_defaults("cv")),
        }
    )


def test_the_data_pipeline_on_an_in_memory_catalog(tmp_path: Path):
    data = _merged(_defaults("data"), nested(TINY_DATA_PARAMS)["data"])
    catalog = _catalog(tmp_path, data)
    SequentialRunner().run(create_pipeline(), catalog)
    result = {name: catalog.load(name) for name in KEPT}

    # Every case is split by case, into the configured fractions of 6 cases.
    splits = result["splits"]
    assert sorted(splits["case_id"]) == sorted(result["case_fingerprints"]["case_id"]) and len(splits) == 6
    assert splits.groupby("split").size().to_dict() == {"test": 1, "train": 4, "val": 1}
    # The primary layer: every case, float32 images and uint8 labels on the planned grid.
    assert sorted(result["primary_images"]) == sorted(splits["case_id"]) == sorted(result["primary_labels"])
    geometry = result["case_geometry"]
    for case_id, load in result["primary_images"].items():
        image, label = load(), result["primary_labels"][case_id]()
        assert image.data.dtype == np.float32 and label.data.dtype == np.uint8
        assert image.data.shape == label.data.shape == tuple(geometry[case_id].preprocessed_shape)
        # The target spacing, up to the rounding of the case's extent to whole voxels (at most
        # one voxel of the axis: a relative 1/n on n voxels).
        relative = np.abs(np.asarray(image.spacing) / np.asarray(geometry.target_spacing) - 1.0)
        assert np.all(relative <= 1.0 / np.asarray(image.data.shape) + 1e-6), (case_id, image.spacing)
        assert abs(float(image.data.mean())) < 0.5  # z-scored per case
        assert set(np.unique(label.data)) <= {0, 1}
    assert result["dataset_fingerprint"]["label_mode"] == "binary"
    # In memory: nothing was written but the phantoms the reader needs.
    written = sorted(str(p.relative_to(tmp_path)).split("/")[0] for p in tmp_path.rglob("*") if p.is_file())
    assert set(written) == {"raw"}
