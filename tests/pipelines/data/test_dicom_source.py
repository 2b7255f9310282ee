"""`data.source: dicom`: studies as DICOM series with their DICOM SEG labels become the same
primary layer as the same cases in MSD layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import make_project_copy, mlflow_runs, run_pipeline
from medseg.errors import InvalidLabelError, MedsegError
from medseg.dicom.series import read_dicom_series
from medseg.dicom.training_set import convert_dicom_dataset
from medseg.dicom.seg import write_dicom_seg
from medseg.synthetic.dicom_series import write_dicom_series
from medseg.imaging.io import Volume, read_volume
from medseg.synthetic.phantoms import ensure_synthetic_dataset, synthesis_settings

DATA = {
    "seed": 5,
    "synthetic": {"n_cases": 6, "in_plane_size": 32, "n_slices_range": [8, 12], "in_plane_spacing_range": [0.8, 1.2],
                  "slice_spacing_range": [1.5, 3.0], "n_lesions_range": [1, 3], "n_classes": 2},
}
PARAMS = {f"data.synthetic.{k}": v for k, v in DATA["synthetic"].items()} | {"data.seed": 5}


def _on_grid(label: Volume, affine: np.ndarray) -> np.ndarray:
    """`label`'s voxels on the grid of `affine` (the same voxel centres, axes maybe flipped)."""
    there = nib.orientations.io_orientation(affine)
    here = nib.orientations.io_orientation(label.affine)
    transform = nib.orientations.ornt_transform(here, there)
    return np.asarray(nib.orientations.apply_orientation(label.data, transform), dtype=np.uint8)


def _write_studies(msd: Path, studies: Path) -> None:
    classes = {int(k): v for k, v in json.loads((msd / "dataset.json").read_text())["labels"].items() if k != "0"}
    for k, image_path in enumerate(sorted((msd / "imagesTr").glob("*_0000.nii.gz"))):
        case_id = image_path.name.removesuffix("_0000.nii.gz")
        files = write_dicom_series(read_volume(image_path), studies / case_id / "series", patient_id=f"P{k}", seed=k)
        series = read_dicom_series(files)
        label = read_volume(msd / "labelsTr" / f"{case_id}.nii.gz", role="label")
        mask = _on_grid(label, series.volume.affine)
        write_dicom_seg(mask, series, classes, algorithm_name="reference", algorithm_version="1", model_uri="manual",
                        path=studies / case_id / "labels.seg.dcm")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_source")
    msd = root / "Task90_Dicom"
    ensure_synthetic_dataset(msd, synthesis_settings(DATA))
    studies = root / "studies"
    _write_studies(msd, studies)
    reference = make_project_copy(root / "msd")
    run_pipeline(reference, "data", {**PARAMS, "data.source": "msd", "data.msd_dir": str(msd)})
    project = make_project_copy(root / "dicom")
    run_pipeline(project, "data", {**PARAMS, "data.source": "dicom", "data.dicom_dir": str(studies)})
    return reference, project, studies, msd


def test_dicom_studies_give_the_primary_layer_of_the_same_cases_in_msd_layout(both):
    reference, project, _, msd = both
    manifest = json.loads((project / "data/01_raw/dicom/dataset.json").read_text())
    # The SEGs' segment labels become the classes, named as the MSD dataset names them.
    assert manifest["labels"] == json.loads((msd / "dataset.json").read_text())["labels"] and len(manifest["labels"]) == 3
    assert manifest["modality"] == {"0": "CT"}
    mine = json.loads((project / "data/03_primary/fingerprint.json").read_text())
    theirs = json.loads((reference / "data/03_primary/fingerprint.json").read_text())
    assert mine["classes"] == theirs["classes"] and mine["label_mode"] == theirs["label_mode"] == "multiclass"
    np.testing.assert_allclose(mine["median_spacing"], theirs["median_spacing"], atol=1e-4)
    assert (project / "data/03_primary/splits.csv").read_text() == (reference / "data/03_primary/splits.csv").read_text()
    labels = sorted((reference / "data/03_primary/labels").glob("*.nii.gz"))
    assert len(labels) == 6
    for path in labels:
        theirs_label = read_volume(path, role="label")
        mine_label = read_volume(project / "data/03_primary/labels" / path.name, role="label")
        np.testing.assert_allclose(mine_label.affine, theirs_label.affine, atol=1e-3)
        np.testing.assert_array_equal(mine_label.data, theirs_label.data)  # SEG labels are exact
        mine_image = read_volume(project / "data/03_primary/images" / path.name).data
        theirs_image = read_volume(reference / "data/03_primary/images" / path.name).data
        assert np.max(np.abs(mine_image - theirs_image)) < 0.02  # int16 storage, then the z-score


def test_an_unchanged_rerun_converts_nothing_and_the_run_is_named_after_the_studies(both):
    _, project, studies, _ = both
    manifest = project / "data/01_raw/dicom/dataset.json"
    before = manifest.stat().st_mtime_ns
    assert convert_dicom_dataset(studies, project / "data/01_raw/dicom") is False
    assert manifest.stat().st_mtime_ns == before
    _, runs = mlflow_runs(project)
    assert runs[0].data.tags["medseg.dataset"] == "studies" and runs[0].data.tags["medseg.data_source"] == "dicom"


def test_a_case_without_a_seg_or_with_an_rtstruct_is_refused_naming_it(both, tmp_path):
    _, _, studies, _ = both
    broken = tmp_path / "studies"
    shutil.copytree(studies, broken)
    first = sorted(p for p in broken.iterdir())[0]
    (first / "labels.seg.dcm").unlink()
    with pytest.raises(InvalidLabelError, match=rf"{first.name}: holds 0 DICOM SEG"):
        convert_dicom_dataset(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MedsegError, match="dicom_dir"):
        convert_dicom_dataset(tmp_path / "missing", tmp_path / "out")
