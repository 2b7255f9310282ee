"""The `data` pipeline with several foreground classes (issue 8): label mode, classes, per-class
shares, lateralized classes, primary labels as training indices, and the binary default."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import TINY_DATA_PARAMS, data_files_written, run_pipeline
from medseg.errors import InvalidLabelError
from medseg.imaging.geometry import CaseGeometry, label_to_training_grid, to_canonical
from medseg.imaging.io import read_volume
from medseg.imaging.laterality import body_midline, lateralized_classes, right_fractions
from medseg.synthetic.shapes import synthesize_case

HIPPOCAMPUS_LABELS = {"0": "background", "1": "anterior", "2": "posterior"}


def _reoriented(image, label, affine, codes):
    """The same case stored in orientation `codes` (e.g. 'LSA')."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(codes)))
    return apply_orientation(image, transform), apply_orientation(label, transform), affine @ inv_ornt_aff(transform, image.shape)


def _save(path: Path, data: np.ndarray, affine: np.ndarray, dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(dtype), affine), str(path))


def _write_msd(root: Path, cases: dict, labels: dict) -> Path:
    """An MSD folder from {case_id: (image, label, affine)} with dataset.json `labels`."""
    training = []
    for case_id, (image, label, affine) in cases.items():
        _save(root / "imagesTr" / f"{case_id}_0000.nii.gz", image, affine, np.float32)
        _save(root / "labelsTr" / f"{case_id}.nii.gz", label, affine, np.uint8)
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    (root / "dataset.json").write_text(
        json.dumps({"name": "multi", "modality": {"0": "MR"}, "labels": labels, "training": training})
    )
    return root


def _two_class_cases(values=(1, 2), n_cases=5) -> dict:
    """Phantoms whose lesions are a rim (values[0]) around a core (values[1]), mixed orientations."""
    cases = {}
    for index in range(n_cases):
        image, label, affine = synthesize_case(index, seed=3, in_plane_size=40, n_slices_range=(10, 12), n_classes=2)
        mapped = np.zeros_like(label)
        mapped[label == 1], mapped[label == 2] = values
        cases[f"c{index}"] = (image, mapped, affine)
    return cases



def _outputs(project: Path):
    data = project / "data"
    fingerprint = json.loads((data / "03_primary" / "fingerprint.json").read_text())
    cases = pd.read_csv(data / "02_intermediate" / "case_fingerprints.csv", dtype={"case_id": str})
    geometry = json.loads((data / "03_primary" / "geometry.json").read_text())
    return fingerprint, cases, geometry


def _primary_label(project: Path, case_id: str) -> np.ndarray:
    label = read_volume(project / "data" / "03_primary" / "labels" / f"{case_id}.nii.gz", role="label")
    assert label.data.dtype == np.uint8
    return label.data


def test_two_listed_labels_make_a_multiclass_dataset(project_copy: Path, tmp_path: Path):
    msd = _write_msd(tmp_path / "Task04_Two", _two_class_cases(), HIPPOCAMPUS_LABELS)
    run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": str(msd)})
    fingerprint, cases, geometry = _outputs(project_copy)

    assert fingerprint["label_mode"] == "multiclass"
    assert fingerprint["classes"] == {"1": "anterior", "2": "posterior"}
    assert list(fingerprint["classes"]) == ["1", "2"]  # ascending: training index i + 1 is the i-th value
    sides = []
    for _, row in cases.iterrows():
        source = read_volume(row["label_path"], role="label").data
        assert row["share_1"] == pytest.approx(np.mean(source == 1), abs=1e-12)
        assert row["share_2"] == pytest.approx(np.mean(source == 2), abs=1e-12)
        assert row["share_1"] + row["share_2"] == pytest.approx(row["foreground_fraction"])
        image = to_canonical(read_volume(row["image_path"], role="image"))
        canonical = to_canonical(read_volume(row["label_path"], role="label"))
        sides.append(right_fractions(canonical.data, body_midline(image.data)))
    assert fingerprint["lateralized"] == lateralized_classes(sides) == []  # lesions lie on both sides

    found = set()
    for case_id, record in geometry.items():
        primary = _primary_label(project_copy, case_id)
        intermediate = read_volume(project_copy / "data" / "02_intermediate" / "labels" / f"{case_id}.nii.gz", role="label")
        assert set(np.unique(intermediate.data)) <= {0, 1, 2}  # the dataset's own values
        # one-hot, linear, argmax onto the planned grid (values 1, 2 are already indices 1, 2)
        expected = label_to_training_grid(intermediate, CaseGeometry.from_dict(record)).data
        np.testing.assert_array_equal(primary, expected)
        found |= set(np.unique(primary).tolist())
    assert found == {0, 1, 2}


def test_nnunet_v2_labels_and_values_that_are_not_1_to_k(project_copy: Path, tmp_path: Path):
    labels = {"background": 0, "edema": 2, "tumour": 5}  # nnU-Net v2 form, values 2 and 5
    msd = _write_msd(tmp_path / "Dataset005_Gaps", _two_class_cases(values=(2, 5)), labels)
    run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": str(msd)})
    fingerprint, cases, geometry = _outputs(project_copy)

    assert fingerprint["label_mode"] == "multiclass"
    assert fingerprint["classes"] == {"2": "edema", "5": "tumour"}
    assert {"share_2", "share_5"} <= set(cases.columns) and "share_1" not in cases.columns
    for _, row in cases.iterrows():
        source = read_volume(row["label_path"], role="label").data
        assert (row["share_2"], row["share_5"]) == pytest.approx((np.mean(source == 2), np.mean(source == 5)))
    found = set()
    for case_id, record in geometry.items():
        intermediate = read_volume(project_copy / "data" / "02_intermediate" / "labels" / f"{case_id}.nii.gz", role="label")
        indices = np.select([intermediate.data == 2, intermediate.data == 5], [1, 2], 0).astype(np.uint8)
        intermediate.data = indices
        expected = label_to_training_grid(intermediate, CaseGeometry.from_dict(record)).data
        primary = _primary_label(project_copy, case_id)
        np.testing.assert_array_equal(primary, expected)  # 2 -> 1, 5 -> 2
        found |= set(np.unique(primary).tolist())
    assert found == {0, 1, 2}


def test_an_unlisted_label_value_is_refused_before_any_output(project_copy: Path, tmp_path: Path):
    cases = _two_class_cases()
    image, label, affine = cases["c3"]
    label = label.copy()
    label[:2, :2, :2] = 3
    cases["c3"] = (image, label, affine)
    msd = _write_msd(tmp_path / "Task04_Three", cases, HIPPOCAMPUS_LABELS)
    with pytest.raises(
        InvalidLabelError,
        match=r"labelsTr/c3.nii.gz: the label holds the values \[3\], which dataset.json does not list.*"
        r"data.label_mode=binary",
    ):
        run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": str(msd)})
    assert data_files_written(project_copy) == []

    run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": str(msd), "data.label_mode": "binary"})
    fingerprint, _, _ = _outputs(project_copy)
    assert fingerprint["label_mode"] == "binary"  # binary mode merges every value above 0, 3 included


def test_label_mode_binary_merges_the_listed_labels(project_copy: Path, tmp_path: Path):
    msd = _write_msd(tmp_path / "Task04_Merged", _two_class_cases(), HIPPOCAMPUS_LABELS)
    run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": str(msd), "data.label_mode": "binary"})
    fingerprint, cases, geometry = _outputs(project_copy)

    assert fingerprint["label_mode"] == "binary"
    assert fingerprint["classes"] == {"1": "foreground"} and fingerprint["lateralized"] == []
    assert "share_2" not in cases.columns
    assert list(cases["share_1"]) == pytest.approx(list(cases["foreground_fraction"]))
    for case_id in geometry:
        assert set(np.unique(_primary_label(project_copy, case_id))) == {0, 1}

    # data.foreground_labels picks one listed label: binary under auto, named after it
    run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": str(msd), "data.foreground_labels": [2]})
    fingerprint, cases, _ = _outputs(project_copy)
    assert fingerprint["label_mode"] == "binary" and fingerprint["classes"] == {"1": "posterior"}
    for _, row in cases.iterrows():
        assert row["share_1"] == pytest.approx(np.mean(read_volume(row["label_path"], role="label").data == 2))


def _lateralized_cases() -> dict:
    """Class 1 always in the patient's left half, class 2 in the right, stored in mixed orientations."""
    cases = {}
    for index, codes in enumerate(["RAS", "LAS", "LPS", "PSR", "LSA"]):
        image, _, affine = synthesize_case(index, seed=9, in_plane_size=40, n_slices_range=(10, 12))
        canonical = nib.as_closest_canonical(nib.Nifti1Image(image, affine))
        image = np.asanyarray(canonical.dataobj)
        label = np.zeros(image.shape, np.uint8)
        middle = (image.shape[0] - 1) / 2
        y, z = slice(16, 24), slice(3, 8)
        label[int(middle) - 8 - index % 3 : int(middle) - 3, y, z] = 1  # low x in RAS: the left
        label[int(middle) + 4 : int(middle) + 8 + index % 2, y, z] = 2  # the right
        cases[f"c{index}"] = _reoriented(image, label, canonical.affine, codes)
    return cases


def test_classes_on_one_side_of_the_midline_are_lateralized(project_copy: Path, tmp_path: Path):
    cases = _lateralized_cases()
    assert {"".join(nib.aff2axcodes(affine)) for _, _, affine in cases.values()} == {"RAS", "LAS", "LPS", "PSR", "LSA"}
    msd = _write_msd(tmp_path / "Task04_Sides", cases, {"0": "background", "1": "left", "2": "right"})
    run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": str(msd)})
    fingerprint, cases_table, geometry = _outputs(project_copy)

    assert fingerprint["label_mode"] == "multiclass" and fingerprint["lateralized"] == [1, 2]
    for _, row in cases_table.iterrows():
        assert json.loads(row["right_fractions"]) == {"1": 0.0, "2": 1.0}
    for case_id in geometry:  # canonical RAS: left is low x, whatever the stored orientation
        primary = _primary_label(project_copy, case_id)
        middle = primary.shape[0] / 2
        assert np.nonzero(primary == 1)[0].max() < middle < np.nonzero(primary == 2)[0].min()

    # binary mode records no lateralized class
    run_pipeline(project_copy, "data", {"data.source": "msd", "data.msd_dir": str(msd), "data.label_mode": "binary"})
    assert _outputs(project_copy)[0]["lateralized"] == []


def test_synthetic_phantoms_with_two_classes(project_copy: Path):
    run_pipeline(project_copy, "data", {**TINY_DATA_PARAMS, "data.synthetic.n_classes": 2})
    fingerprint, cases, geometry = _outputs(project_copy)
    manifest = json.loads((project_copy / "data" / "01_raw" / "synthetic" / "dataset.json").read_text())

    assert manifest["labels"] == {"0": "background", "1": "rim", "2": "core"}
    assert manifest["medseg_synthesis"]["n_classes"] == 2
    assert fingerprint["label_mode"] == "multiclass" and fingerprint["classes"] == {"1": "rim", "2": "core"}
    assert (cases["share_1"] > 0).all() and (cases["share_2"] > 0).all()
    found = set()
    for case_id in geometry:
        found |= set(np.unique(_primary_label(project_copy, case_id)).tolist())
    assert found == {0, 1, 2}


def test_the_default_synthetic_run_stays_binary(data_run: Path):
    fingerprint, cases, geometry = _outputs(data_run)
    manifest = json.loads((data_run / "data" / "01_raw" / "synthetic" / "dataset.json").read_text())

    assert manifest["labels"] == {"0": "background", "1": "lesion"}
    assert "n_classes" not in manifest["medseg_synthesis"]  # phantoms written before n_classes stay valid
    assert fingerprint["label_mode"] == "binary"
    assert fingerprint["classes"] == {"1": "lesion"} and fingerprint["lateralized"] == []
    assert list(cases["share_1"]) == pytest.approx(list(cases["foreground_fraction"]))
    for case_id in geometry:
        assert set(np.unique(_primary_label(data_run, case_id))) == {0, 1}
