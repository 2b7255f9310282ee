"""`data.msd_dir` as a URL: `list_source_cases` reads the MSD folder in place on the store."""

import gzip
import json

import fsspec
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medseg.runs.hooks import dataset_identity, expected_class_count
from medseg.pipelines.data.nodes import list_source_cases


def _upload_msd(url: str, cases=("a", "b", "c")) -> None:
    """An MSD folder written straight to the store: nnU-Net `_0000` images, two classes."""
    fs, base = fsspec.core.url_to_fs(url)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for i, case in enumerate(cases):
        image = nib.Nifti1Image(np.full((4, 4, 3), i, np.float32), affine)
        label = nib.Nifti1Image(np.ones((4, 4, 3), np.uint8), affine)
        fs.pipe_file(f"{base}/imagesTr/{case}_0000.nii.gz", gzip.compress(image.to_bytes()))
        fs.pipe_file(f"{base}/labelsTr/{case}.nii", label.to_bytes())
    manifest = {
        "name": "Task77_Store",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii"} for c in cases],
    }
    fs.pipe_file(f"{base}/dataset.json", json.dumps(manifest).encode())


def test_list_source_cases_reads_an_msd_dir_on_s3_in_place(s3_bucket, tmp_path):
    url = f"{s3_bucket}/datasets/Task77_Store"
    _upload_msd(url)
    data = {"source": "msd", "msd_dir": url, "channel": None}
    cases, classes = list_source_cases(data, str(tmp_path), str(tmp_path / "unused-phantoms"))
    expected = pd.DataFrame(
        {
            "case_id": ["a", "b", "c"],
            "image_path": [f"{url}/imagesTr/{c}_0000.nii.gz" for c in "abc"],
            "label_path": [f"{url}/labelsTr/{c}.nii" for c in "abc"],
            "channel": [None, None, None],
        }
    )
    pd.testing.assert_frame_equal(cases, expected)
    assert classes == {"manifest": f"{url}/dataset.json", "classes": {1: "liver", 2: "tumour"}, "dataset": "Task77_Store"}
    assert not any(tmp_path.iterdir())  # nothing anchored at, or written to, the project root


def test_synthetic_phantoms_on_a_store_are_refused():
    from kedro.io.core import DatasetError

    from medseg.datasets.phantoms import PhantomDataset

    with pytest.raises(DatasetError, match="path s3://bucket/phantoms is on a store, but the phantoms are written to a local folder"):
        PhantomDataset(path="s3://bucket/phantoms")


def test_run_naming_reads_dataset_json_on_the_store(s3_bucket, tmp_path):
    url = f"{s3_bucket}/Task77_Store"
    _upload_msd(url)
    data = {"source": "msd", "msd_dir": url}
    assert dataset_identity(data, tmp_path) == ("Task77_Store", "msd", url)
    assert expected_class_count(data, tmp_path) == 2


def test_run_naming_never_fails_on_an_unreadable_store(tmp_path):
    data = {"source": "msd", "msd_dir": "nosuchstore://bucket/Task01_X"}
    assert dataset_identity(data, tmp_path) == ("Task01_X", "msd", "nosuchstore://bucket/Task01_X")
    assert expected_class_count(data, tmp_path) == 1
