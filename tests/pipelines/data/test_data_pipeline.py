"""The `data` pipeline through KedroSession, on synthetic phantoms and on an MSD folder."""

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import TINY_DATA_PARAMS, data_files_written, mlflow_runs, run_pipeline
from medseg.errors import (
    ConfigurationError,
    InvalidGeometryError,
    InvalidIntensityError,
    InvalidLabelError,
    SplitError,
)
from medseg.imaging.io import read_volume
from medseg.synthetic.shapes import synthesize_case


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
        image = read_volume(primary / "images" / f"{case_id}.nii.gz", role="image")
        label = read_volume(primary / "labels" / f"{case_id}.nii.gz", role="label")
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
        label = read_volume(primary / "labels" / f"{case_id}.nii.gz", role="label")
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


def _small_msd(root: Path, case_ids, label_values=(1,), background_value=None, affines=None) -> Path:
    """A tiny MSD folder: one phantom per id; lesion voxels take `label_values` in turn, a corner
    block away from the lesions takes `background_value` (when given), and `affines`
    ({case_id: affine}) replaces a case's sform (qform unset, so it may be singular)."""
    training = []
    for index, case_id in enumerate(case_ids):
        image, label, affine = synthesize_case(index, seed=3, in_plane_size=32, n_slices_range=(8, 10))
        label = label.astype(np.int32) * label_values[index % len(label_values)]
        if background_value is not None:
            label[:3, :3, :2] = background_value
        for folder, name, data, dtype in (("imagesTr", f"{case_id}_0000", image, np.float32), ("labelsTr", case_id, label, np.int16)):
            img = nib.Nifti1Image(data.astype(dtype), affine)
            if affines and case_id in affines:
                img.header.set_sform(affines[case_id], code=1)
                img.header.set_qform(None, code=0)
                img = nib.Nifti1Image(data.astype(dtype), None, header=img.header)
            (root / folder).mkdir(parents=True, exist_ok=True)
            img.to_filename(str(root / folder / f"{name}.nii.gz"))
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "small", "modality": {"0": "MR"}, "training": training}))
    return root



def test_case_ids_that_look_like_numbers_or_na_stay_text(project_copy: Path, tmp_path: Path):
    ids = ["001", "002", "003", "004", "010", "NA"]
    msd = _small_msd(tmp_path / "Task97_Numbers", ids)
    run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": str(msd)})

    primary = project_copy / "data" / "03_primary"
    geometry = json.loads((primary / "geometry.json").read_text())
    assert sorted(geometry) == ids
    raw_rows = (primary / "splits.csv").read_text().splitlines()
    assert raw_rows[0] == "case_id,split"
    assert sorted(row.split(",")[0] for row in raw_rows[1:]) == ids  # written as text: '001', not 1
    from kedro.framework.session import KedroSession  # read back through the catalog, as a model pipeline does
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project_copy)
    with KedroSession.create(project_path=project_copy) as session:
        catalog = session.load_context().catalog
        splits = catalog.load("splits")
        fingerprints = catalog.load("case_fingerprints")
    assert sorted(splits["case_id"]) == ids and all(isinstance(i, str) for i in splits["case_id"])
    assert sorted(fingerprints["case_id"]) == ids
    assert splits["split"].value_counts().to_dict() == {"train": 4, "val": 1, "test": 1}
    assert sorted(p.name for p in (primary / "labels").iterdir() if not p.name.startswith(".")) == [f"{i}.nii.gz" for i in ids]


def test_too_few_cases_for_the_split_stops_before_any_output(project_copy: Path, tmp_path: Path):
    msd = _small_msd(tmp_path / "Task96_Two", ["a", "b"])
    with pytest.raises(SplitError, match=r"2 cases are too few for the split.*change data.split"):
        run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": str(msd)})
    assert data_files_written(project_copy) == []
    _, runs = mlflow_runs(project_copy)
    assert runs[0].info.status == "FAILED"


def test_foreground_labels_that_match_no_voxel_stop_before_any_output(project_copy: Path, tmp_path: Path):
    msd = _small_msd(tmp_path / "Task95_Labels", [f"c{i}" for i in range(5)], label_values=(1, 2))
    params = {"data.source": "msd", "data.msd_dir": str(msd), "data.foreground_labels": [3]}
    with pytest.raises(
        ConfigurationError, match=r"data.foreground_labels=\[3\] match no voxel.*labelsTr\); the label values found are \[0, 1, 2\]"
    ):
        run_pipeline(project_copy, "data", params)
    assert data_files_written(project_copy) == []


@pytest.mark.parametrize(
    "affine, message",
    [
        (np.diag([1.0, 0.0, 2.0, 1.0]), r"c2_0000.nii.gz: the voxel spacing is zero along y"),
        (np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]), r"c2_0000.nii.gz: the affine is singular"),
    ],
)
def test_a_degenerate_affine_stops_before_any_output(project_copy: Path, tmp_path: Path, affine, message):
    msd = _small_msd(tmp_path / "Task94_Affine", [f"c{i}" for i in range(5)], affines={"c2": affine})
    with pytest.raises(InvalidGeometryError, match=message):
        run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": str(msd)})
    assert data_files_written(project_copy) == []


def test_label_values_above_255_that_are_not_foreground(project_copy: Path, tmp_path: Path):
    msd = _small_msd(tmp_path / "Task93_Wide", [f"c{i}" for i in range(5)], background_value=300)
    params = {"data.source": "msd", "data.msd_dir": str(msd)}
    with pytest.raises(InvalidLabelError, match=r"labelsTr/c0.nii.gz: the label holds values above 255 \(\[300\]\)"):
        run_pipeline(project_copy, "data", params)
    assert data_files_written(project_copy) == []

    run_pipeline(project_copy, "data", {**params, "data.foreground_labels": [1]})
    data = project_copy / "data"
    for case_id in (f"c{i}" for i in range(5)):
        source = read_volume(msd / "labelsTr" / f"{case_id}.nii.gz", role="label")
        assert source.data.dtype == np.uint16 and 300 in source.data
        intermediate = nib.load(str(data / "02_intermediate" / "labels" / f"{case_id}.nii.gz"))
        primary = nib.load(str(data / "03_primary" / "labels" / f"{case_id}.nii.gz"))
        assert intermediate.get_data_dtype() == np.uint8 and primary.get_data_dtype() == np.uint8
        values = set(np.unique(np.asanyarray(intermediate.dataobj)).tolist())
        assert values <= {0, 1} and 1 in values  # 300 is background; 1 is kept
        assert set(np.unique(np.asanyarray(primary.dataobj)).tolist()) == {0, 1}


def test_a_relative_msd_dir_is_taken_from_the_project_root_not_the_cwd(project_copy: Path):
    _small_msd(project_copy / "datasets" / "Task95_Rel", ["a", "b", "c", "d", "e"])
    run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": "datasets/Task95_Rel"},
                 cwd=project_copy / "notebooks")
    sources = pd.read_csv(project_copy / "data" / "02_intermediate" / "case_fingerprints.csv")
    assert all(path.startswith(str(project_copy / "datasets" / "Task95_Rel")) for path in sources["image_path"])
    assert list((project_copy / "notebooks").iterdir()) == []
    assert sorted(json.loads((project_copy / "data" / "03_primary" / "geometry.json").read_text())) == ["a", "b", "c", "d", "e"]
