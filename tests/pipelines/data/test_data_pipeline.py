"""The `data` pipeline through KedroSession, on synthetic phantoms and on an MSD folder."""

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import TINY_DATA_PARAMS, mlflow_runs, run_pipeline
from medseg.errors import InvalidIntensityError
from medseg.imaging.io import read_volume
from medseg.imaging.synthesis import synthesize_case


def test_outputs_are_ras_resampled_normalized_and_split(data_run: Path):
    primary = data_run / "data" / "03_primary"
    fingerprint = json.loads((primary / "fingerprint.json").read_text())
    geometry = json.loads((primary / "geometry.json").read_text())
    splits = pd.read_csv(primary / "splits.csv")
    assert fingerprint["n_cases"] == 6 and len(fingerprint["orientations"]) >= 2
    assert sorted(splits["case_id"]) == sorted(geometry)
    assert splits["case_id"].is_unique  # no case in two sets
    assert splits["split"].value_counts().to_dict() == {"train": 4, "val": 1, "test": 1}

    for case_id in geometry:
        image = read_volume(primary / "images" / f"{case_id}.nii.gz", kind="image")
        label = read_volume(primary / "labels" / f"{case_id}.nii.gz", kind="label")
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert image.spacing == pytest.approx(tuple(fingerprint["median_spacing"]), rel=0.06)
        assert image.data.shape == tuple(geometry[case_id]["preprocessed_shape"]) == label.data.shape
        assert image.data.dtype == np.float32 and label.data.dtype == np.uint8
        assert abs(float(image.data.mean())) < 1e-3 and float(image.data.std()) == pytest.approx(1.0, abs=1e-3)
        assert set(np.unique(label.data)) <= {0, 1} and label.data.sum() > 0


def test_phantoms_are_not_regenerated_when_parameters_are_unchanged(data_run: Path):
    manifest = data_run / "data" / "01_raw" / "synthetic" / "dataset.json"
    before = manifest.stat().st_mtime_ns
    run_pipeline(data_run, "data", TINY_DATA_PARAMS)
    assert manifest.stat().st_mtime_ns == before
    run_pipeline(data_run, "data", {**TINY_DATA_PARAMS, "data.seed": 43})
    assert json.loads(manifest.read_text())["medseg_synthesis"]["seed"] == 43
    _, runs = mlflow_runs(data_run)
    names = sorted(run.info.run_name.rsplit("-", 1)[1] for run in runs)
    assert names == ["run1", "run2", "run3"]  # N counts up among runs with the same prefix
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.params["data.seed"] for run in runs} == {"42", "43"}


def _write(path: Path, data: np.ndarray, affine: np.ndarray, dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.set_data_dtype(dtype)
    nib.save(img, str(path))


def _reoriented(image, label, affine, codes):
    """The same case stored in orientation `codes` (e.g. 'LSA')."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    transform = ornt_transform(nib.orientations.io_orientation(affine), axcodes2ornt(tuple(codes)))
    new_affine = affine @ inv_ornt_aff(transform, image.shape)
    return apply_orientation(image, transform), apply_orientation(label, transform), new_affine


def _mixed_msd(root: Path) -> None:
    """Six cases mixing orientations (RAS, LAS, LSA), dtypes (uint8, int16, float32),
    anisotropic spacings and one (X, Y, Z, 1) image; labels use values 1 and 2."""
    layouts = [("RAS", np.int16), ("LAS", np.float32), ("LSA", np.uint8), ("RAS", np.float32), ("LAS", np.int16), ("LSA", np.float32)]
    training = []
    for index, (codes, dtype) in enumerate(layouts):
        image, label, affine = synthesize_case(index, seed=5, in_plane_size=40, n_slices_range=(10, 14))
        canonical = nib.as_closest_canonical(nib.Nifti1Image(image, affine))
        canon_label = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(label, affine)).dataobj)
        image, label, affine = _reoriented(np.asanyarray(canonical.dataobj), canon_label, canonical.affine, codes)
        if dtype == np.uint8:
            image = image / image.max() * 255
        label = label * (1 + index % 2)  # values 1 and 2
        if index == 3:
            image = image[..., None]
        _write(root / "imagesTr" / f"scan_{index}.nii.gz", image, affine, dtype)
        _write(root / "labelsTr" / f"scan_{index}.nii.gz", label, affine, np.uint8)
        training.append({"image": f"./imagesTr/scan_{index}.nii.gz", "label": f"./labelsTr/scan_{index}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "mixed", "modality": {"0": "MR"}, "training": training}))


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_msd_folder_with_mixed_orientations_dtypes_and_channel_axis(project_copy: Path, tmp_path: Path):
    msd = tmp_path / "Task99_Mixed"
    _mixed_msd(msd)
    before = _tree_digest(msd)
    run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": str(msd)})
    assert _tree_digest(msd) == before  # the user's folder is never written to

    primary = project_copy / "data" / "03_primary"
    fingerprints = pd.read_csv(project_copy / "data" / "02_intermediate" / "case_fingerprints.csv")
    assert set(fingerprints["orientation"]) == {"RAS", "LAS", "LSA"}
    assert set(fingerprints["source_dtype"]) == {"int16", "float32", "uint8"}
    for case_id in fingerprints["case_id"]:
        label = read_volume(primary / "labels" / f"{case_id}.nii.gz", kind="label")
        assert nib.aff2axcodes(label.affine) == ("R", "A", "S")
        assert set(np.unique(label.data)) == {0, 1}  # values 1 and 2 both count as foreground


def test_a_bad_case_stops_the_run_before_any_output(project_copy: Path, tmp_path: Path):
    msd = tmp_path / "Task98_Broken"
    _mixed_msd(msd)
    broken = nib.load(str(msd / "imagesTr" / "scan_2.nii.gz"))
    data = np.asanyarray(broken.dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, broken.affine), str(msd / "imagesTr" / "scan_2.nii.gz"))
    with pytest.raises(InvalidIntensityError, match="scan_2.nii.gz.*NaN"):
        run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": str(msd)})
    assert not (project_copy / "data" / "02_intermediate" / "images").exists()
    assert not (project_copy / "data" / "03_primary" / "images").exists()
    _, runs = mlflow_runs(project_copy)
    assert runs[0].info.status == "FAILED"
