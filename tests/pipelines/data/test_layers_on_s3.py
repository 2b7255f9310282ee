"""The `data` pipeline with its source and its layers on an S3 API on loopback (moto's server).

`data.msd_dir=s3://bucket/Task` and a `conf/local/catalog.yml` that puts 02_intermediate and
03_primary on `s3://`: the run, on two Dask workers, writes the same volumes and plans as a
local run on a local copy, and an unchanged rerun skips every case.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import yaml

from conftest import log_lines, make_project_copy, mlflow_runs, run_pipeline
from medseg.imaging.io import read_volume
from medseg.synthetic.phantoms import ensure_synthetic_dataset, synthesis_settings

PARTITIONS = ("intermediate_images", "intermediate_labels", "primary_images", "primary_labels")
FILES = {
    "case_fingerprints": ("pandas.CSVDataset", "02_intermediate/case_fingerprints.csv"),
    "previous_case_fingerprints": ("medseg.datasets.optional.OptionalCSVDataset", "02_intermediate/case_fingerprints.csv"),
    "dataset_fingerprint": ("json.JSONDataset", "03_primary/fingerprint.json"),
    "case_geometry": ("medseg.datasets.plans.PreprocessingPlanDataset", "03_primary/geometry.json"),
    "splits": ("pandas.CSVDataset", "03_primary/splits.csv"),
    "folds_saved": ("medseg.datasets.optional.OptionalJSONDataset", "03_primary/folds.json"),
    "folds": ("json.JSONDataset", "03_primary/folds.json"),
}


def _catalog_on(base: str) -> dict:
    """conf/base's data layers, every path moved under `base` (an s3:// URL)."""
    catalog = yaml.safe_load((Path(__file__).resolve().parents[3] / "conf" / "base" / "catalog_data.yml").read_text())
    moved = {}
    for name in PARTITIONS:
        moved[name] = {**catalog[name], "path": f"{base}/{catalog[name]['path']}"}
    for name, (kind, path) in FILES.items():
        moved[name] = {**catalog[name], "type": kind, "filepath": f"{base}/data/{path}"}
    return moved


def test_the_data_pipeline_reads_and_writes_s3(s3_bucket: str, tmp_path: Path):
    local_msd = tmp_path / "Task93_S3"
    data = {
        "seed": 9,
        "synthetic": {
            "n_cases": 6, "in_plane_size": 32, "n_slices_range": [8, 12],
            "in_plane_spacing_range": [0.8, 1.2], "slice_spacing_range": [1.5, 3.0], "n_lesions_range": [1, 3],
            "n_classes": 1,
        },
    }
    ensure_synthetic_dataset(local_msd, synthesis_settings(data))
    fs = fsspec.filesystem("s3")
    fs.put(str(local_msd), f"{s3_bucket}/datasets/Task93_S3", recursive=True)
    remote_msd = f"{s3_bucket}/datasets/Task93_S3"

    reference = make_project_copy(tmp_path / "local")
    run_pipeline(reference, "data", {"data.source": "msd", "data.msd_dir": str(local_msd)})

    project = make_project_copy(tmp_path / "s3")
    layers = f"{s3_bucket}/project"
    (project / "conf" / "local" / "catalog.yml").write_text(yaml.safe_dump(_catalog_on(layers)))
    params = {"data.source": "msd", "data.msd_dir": remote_msd, "compute.scheduler": "local:2"}
    run_pipeline(project, "data", params)

    assert not any((project / "data" / "02_intermediate").iterdir())  # nothing written locally
    assert not any((project / "data" / "03_primary").iterdir())
    for layer, name in [("02_intermediate", "images"), ("02_intermediate", "labels"), ("03_primary", "images"), ("03_primary", "labels")]:
        role = "image" if name == "images" else "label"
        local_files = sorted((reference / "data" / layer / name).glob("*.nii.gz"))
        assert len(local_files) == 6
        for path in local_files:
            remote = read_volume(f"{layers}/data/{layer}/{name}/{path.name}", role=role)
            mine = read_volume(path, role=role)
            assert remote.data.dtype == mine.data.dtype and np.array_equal(remote.data, mine.data), path.name
            np.testing.assert_array_equal(remote.affine, mine.affine)
            assert fs.cat(f"{layers}/data/{layer}/{name}/{path.name}") == path.read_bytes()  # the same gzip bytes
    for name in ("fingerprint.json", "geometry.json"):
        assert json.loads(fs.cat(f"{layers}/data/03_primary/{name}")) == json.loads((reference / "data" / "03_primary" / name).read_text())
    table = pd.read_csv(fsspec.open(f"{layers}/data/02_intermediate/case_fingerprints.csv").open(), dtype={"case_id": str})
    assert all(path.startswith(f"{remote_msd}/imagesTr/") for path in table["image_path"])
    assert fs.cat(f"{layers}/data/03_primary/splits.csv") == (reference / "data" / "03_primary" / "splits.csv").read_bytes()
    assert not [p for p in fs.ls(f"{layers}/data/03_primary") if ".staging-" in p]  # no staging prefix left
    _, runs = mlflow_runs(project)
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["medseg.dataset"] == "medseg-synthetic"

    # An unchanged rerun reads no case again, on the store as on a local disk.
    before = {p: fs.info(p)["LastModified"] for p in fs.find(f"{layers}/data/03_primary/images")}
    assert len(before) == 7  # six volumes and the keys file
    with log_lines("medseg.cases.validation", "medseg.datasets.staged") as log:
        run_pipeline(project, "data", {**params, "compute.scheduler": "sync"})
    assert "Validating: 6 of 6 cases unchanged since the last run" in log.text
    assert log.text.count("6 of 6 cases unchanged since the last run (same source files and plan), kept; 0 to make") == 4
    assert {p: fs.info(p)["LastModified"] for p in fs.find(f"{layers}/data/03_primary/images")} == before
