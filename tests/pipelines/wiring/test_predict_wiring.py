"""Wiring: the `predict` pipeline run with Kedro's SequentialRunner on an in-memory DataCatalog,
with a segmenter made by hand (a 1x1 network whose foreground is every voxel above the scan's
mean), so the expected mask is known exactly: no session, no MLflow store, no training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from conftest import above_mean_segmenter, kept_dataset
from medseg.imaging.io import Volume, read_volume, write_volume
from medseg.kinds import model_kinds
from medseg.pipelines.predict import create_pipeline


def test_the_predict_pipeline_on_an_in_memory_catalog(tmp_path: Path):
    above_mean_segmenter().save(tmp_path / "segmenter")
    scans, out = tmp_path / "in", tmp_path / "out"
    scans.mkdir()
    data = np.round(np.random.default_rng(0).normal(100, 20, size=(12, 10, 6))).astype(np.float32)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    write_volume(Volume(data, affine), scans / "scan_a_0000.nii.gz")
    predict = {"model": "unet", "input_dir": str(scans), "output_dir": str(out), "mirror_axes": None,
               "keep_largest_component": None, "series_uid": None}
    catalog = DataCatalog({
        "params:predict": MemoryDataset(predict),
        "project_root": MemoryDataset(str(tmp_path)),
        **{f"{name}.segmenter_folder": MemoryDataset(str(tmp_path / ("segmenter" if name == "unet" else f"no_{name}")))
           for name in model_kinds()},
        "predict.predictions": kept_dataset(),
        "predict.dicomweb_answers": MemoryDataset(str(tmp_path / "dicomweb")),
    })

    SequentialRunner().run(create_pipeline(), catalog)

    table = catalog.load("predict.predictions")
    assert isinstance(table, pd.DataFrame) and list(table["case_id"]) == ["scan_a"]
    mask = read_volume(str(out / "scan_a.nii.gz"), role="label")
    z = (data - data.mean(dtype=np.float64)) / data.std(dtype=np.float64)
    np.testing.assert_array_equal(mask.affine, affine)
    np.testing.assert_array_equal(mask.data, (z >= 0).astype(np.uint8))
    assert sorted(p.name for p in scans.iterdir()) == ["scan_a_0000.nii.gz"]  # the input folder is never written to
