import json

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import (
    ConfigurationError,
    EmptyDatasetError,
    GeometryMismatchError,
    InvalidGeometryError,
    InvalidIntensityError,
    InvalidLabelError,
)
from medseg.cases.msd import CaseFiles
from medseg.cases.validation import (
    binarize_label,
    class_indices_to_label,
    dataset_fingerprint,
    fingerprint_case,
    fingerprint_cases,
    label_for_storage,
    label_to_class_indices,
    resolve_label_classes,
)


def _case(tmp_path, name, image, label, image_affine=None, label_affine=None):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    image_path, label_path = tmp_path / f"{name}_img.nii.gz", tmp_path / f"{name}_lbl.nii.gz"
    nib.save(nib.Nifti1Image(image, affine if image_affine is None else image_affine), str(image_path))
    nib.save(nib.Nifti1Image(label, affine if label_affine is None else label_affine), str(label_path))
    return CaseFiles(name, str(image_path), str(label_path), None)


def _good(tmp_path, name="good"):
    image = np.random.default_rng(0).normal(100, 10, (8, 8, 4)).astype(np.float32)
    label = np.zeros((8, 8, 4), np.uint8)
    label[2:4, 2:4, 1:3] = 2
    return _case(tmp_path, name, image, label)


def test_fingerprint_of_a_good_case(tmp_path):
    record = fingerprint_case(_good(tmp_path))
    assert record["foreground_voxels"] == 8
    assert record["foreground_fraction"] == pytest.approx(8 / 256)
    assert (record["spacing_x"], record["spacing_y"], record["spacing_z"]) == pytest.approx((0.8, 0.8, 2.5))
    assert record["orientation"] == "RAS"


def test_foreground_labels_choose_values():
    label = np.array([0, 1, 2, 3], np.uint8)
    assert binarize_label(label).tolist() == [0, 1, 1, 1]
    assert binarize_label(label, [2, 3]).tolist() == [0, 0, 1, 1]


def test_shape_mismatch(tmp_path):
    case = _case(tmp_path, "s", np.zeros((8, 8, 4), np.float32), np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(GeometryMismatchError, match="s_lbl.nii.gz.*shape"):
        fingerprint_case(case)


def test_affine_mismatch(tmp_path):
    shifted = np.diag([0.8, 0.8, 2.5, 1.0])
    shifted[0, 3] = 5.0
    case = _case(tmp_path, "a", np.zeros((8, 8, 4), np.float32), np.zeros((8, 8, 4), np.uint8), label_affine=shifted)
    with pytest.raises(GeometryMismatchError, match="a_lbl.nii.gz.*affine differs.*5 mm"):
        fingerprint_case(case)


def test_all_bad_cases_are_reported_together(tmp_path):
    nan_image = np.zeros((8, 8, 4), np.float32)
    nan_image[0, 0, 0] = np.inf
    cases = [
        _good(tmp_path),
        _case(tmp_path, "nan", nan_image, np.zeros((8, 8, 4), np.uint8)),
        _case(tmp_path, "frac", np.zeros((8, 8, 4), np.float32), np.full((8, 8, 4), 0.3, np.float32)),
    ]
    with pytest.raises(InvalidIntensityError, match=r"2 of 3 cases are invalid[\s\S]*nan_img[\s\S]*frac_lbl"):
        fingerprint_cases(cases)
    with pytest.raises(InvalidLabelError):
        fingerprint_cases(cases[2:])


def test_empty_dataset():
    with pytest.raises(EmptyDatasetError):
        fingerprint_cases([])


def test_dataset_fingerprint_median_spacing(tmp_path):
    records = [fingerprint_case(_good(tmp_path, f"g{i}")) for i in range(3)]
    records[0]["spacing_z"] = 1.0
    records[1]["spacing_z"] = 3.0
    fingerprint = dataset_fingerprint(records)
    assert fingerprint["median_spacing"] == pytest.approx([0.8, 0.8, 2.5])
    assert fingerprint["n_cases"] == 3 and fingerprint["orientations"] == {"RAS": 3}


def _wide_label(tmp_path, name="wide"):
    """A case whose label holds 1 (a lesion) and 300 (e.g. an organ id that is not foreground)."""
    label = np.zeros((8, 8, 4), np.int16)
    label[1:3, 1:3, 1] = 1
    label[5:8, 5:8, 2:4] = 300
    return _case(tmp_path, name, np.ones((8, 8, 4), np.float32), label)


def test_label_values_above_255_are_fine_when_not_foreground(tmp_path):
    record = fingerprint_case(_wide_label(tmp_path), foreground_labels=[1])
    assert record["foreground_voxels"] == 4
    assert record["label_values"] == "[0, 1, 300]"


def test_label_values_above_255_cannot_be_foreground(tmp_path):
    with pytest.raises(InvalidLabelError, match=r"wide_lbl.nii.gz: the label holds values above 255 \(\[300\]\).*Set data.foreground_labels"):
        fingerprint_case(_wide_label(tmp_path))
    with pytest.raises(ConfigurationError, match=r"data.foreground_labels=\[1, 300\].*1..255"):
        fingerprint_cases([_wide_label(tmp_path)], foreground_labels=[1, 300])


def test_label_for_storage_is_uint8_and_maps_large_values_to_background():
    label = np.array([0, 1, 2, 255, 256, 300, 70000], np.uint32)
    stored = label_for_storage(label)
    assert stored.dtype == np.uint8
    assert stored.tolist() == [0, 1, 2, 255, 0, 0, 0]
    assert binarize_label(stored, [1]).tolist() == binarize_label(label, [1]).tolist()


def test_foreground_labels_matching_no_voxel_are_refused_with_the_labels_found(tmp_path):
    cases = [_good(tmp_path, "g0"), _wide_label(tmp_path)]
    with pytest.raises(
        ConfigurationError,
        match=rf"data.foreground_labels=\[3\] match no voxel in any of the 2 labels \(in {tmp_path}\); "
        r"the label values found are \[0, 1, 2, 300\]. Set data.foreground_labels to some of \[1, 2\]",
    ):
        fingerprint_cases(cases, foreground_labels=[3])
    assert len(fingerprint_cases(cases, foreground_labels=[2])) == 2  # one case with foreground is enough


def test_zero_spacing_and_singular_affine_name_the_file(tmp_path):
    image = np.zeros((8, 8, 4), np.float32)
    label = np.zeros((8, 8, 4), np.uint8)
    for name, affine in [("flat", np.diag([0.8, 0.8, 0.0, 1.0])), ("skew", np.array([[1.0, 2, 0, 0], [2, 4, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))]:
        for suffix, data in (("img", image), ("lbl", label)):
            header = nib.Nifti1Image(data, np.eye(4)).header
            header.set_sform(affine, code=1)
            header.set_qform(None, code=0)
            nib.Nifti1Image(data, None, header=header).to_filename(str(tmp_path / f"{name}_{suffix}.nii.gz"))
    flat = CaseFiles("flat", str(tmp_path / "flat_img.nii.gz"), str(tmp_path / "flat_lbl.nii.gz"), None)
    skew = CaseFiles("skew", str(tmp_path / "skew_img.nii.gz"), str(tmp_path / "skew_lbl.nii.gz"), None)
    with pytest.raises(InvalidGeometryError, match=r"2 of 3 cases are invalid[\s\S]*flat_img.nii.gz: the voxel spacing is zero along z[\s\S]*skew_img.nii.gz: the affine is singular"):
        fingerprint_cases([_good(tmp_path), flat, skew])


HIPPOCAMPUS = {1: "anterior", 2: "posterior"}


@pytest.mark.parametrize(
    ("listed", "mode", "foreground_labels", "expected"),
    [
        (HIPPOCAMPUS, "auto", None, ("multiclass", {1: "anterior", 2: "posterior"})),
        ({1: "lesion"}, "auto", None, ("binary", {1: "lesion"})),
        ({1: "lesion"}, "multiclass", None, ("multiclass", {1: "lesion"})),
        (HIPPOCAMPUS, "binary", None, ("binary", {1: "foreground"})),
        (HIPPOCAMPUS, "auto", [2], ("binary", {1: "posterior"})),  # a merge was asked for
        (HIPPOCAMPUS, "binary", [1, 2], ("binary", {1: "foreground"})),
        ({}, "auto", None, ("binary", {1: "foreground"})),
        ({5: "tumour", 2: "edema"}, "auto", None, ("multiclass", {2: "edema", 5: "tumour"})),
    ],
)
def test_label_mode_and_classes(listed, mode, foreground_labels, expected):
    mode_found, classes = resolve_label_classes(listed, mode, foreground_labels)
    assert (mode_found, classes) == expected
    assert list(classes) == sorted(classes)


def test_label_modes_that_cannot_work_are_refused():
    with pytest.raises(ConfigurationError, match=r"multiclass with data.foreground_labels=\[1\].*use data.label_mode=binary"):
        resolve_label_classes(HIPPOCAMPUS, "multiclass", [1])
    with pytest.raises(ConfigurationError, match=r"/d/dataset.json: 'labels' lists no foreground label"):
        resolve_label_classes({}, "multiclass", None, "/d/dataset.json")
    with pytest.raises(ConfigurationError, match=r"data.label_mode='multi'"):
        resolve_label_classes(HIPPOCAMPUS, "multi")


def test_label_values_to_class_indices_and_back():
    label = np.array([[0, 2, 5], [5, 0, 2]], np.int16)
    indices = label_to_class_indices(label, [2, 5])
    assert indices.dtype == np.uint8 and indices.tolist() == [[0, 1, 2], [2, 0, 1]]
    assert class_indices_to_label(indices, [2, 5]).tolist() == label.tolist()
    assert label_to_class_indices(label.astype(np.uint8), [2, 5]).tolist() == indices.tolist()


def _two_sides(tmp_path, name, left=1, right=2):
    """A body spanning x = 2..13 (midline 7.5) with `left` at low x (RAS) and `right` at high x."""
    image = np.zeros((16, 8, 4), np.float32)
    image[2:14] = 100.0
    label = np.zeros((16, 8, 4), np.uint8)
    label[3:6, 2:5, 1:3] = left
    label[10:12, 2:5, 1:3] = right
    return _case(tmp_path, name, image, label)


def test_multiclass_fingerprint_records_each_class_share_and_side(tmp_path):
    record = fingerprint_case(_two_sides(tmp_path, "s"), classes=HIPPOCAMPUS)
    assert record["share_1"] == pytest.approx(18 / 512) and record["share_2"] == pytest.approx(12 / 512)
    assert record["foreground_fraction"] == pytest.approx(30 / 512)
    assert json.loads(record["right_fractions"]) == {"1": 0.0, "2": 1.0}
    binary = fingerprint_case(_two_sides(tmp_path, "b"))
    assert binary["share_1"] == pytest.approx(30 / 512) and binary["right_fractions"] == "{}"
    assert "share_2" not in binary


def test_a_label_value_that_dataset_json_does_not_list_is_refused(tmp_path):
    case = _two_sides(tmp_path, "odd", right=3)
    with pytest.raises(
        InvalidLabelError,
        match=r"odd_lbl.nii.gz: the label holds the values \[3\], which dataset.json does not list.*"
        r"List them in dataset.json's labels, or use data.label_mode=binary",
    ):
        fingerprint_cases([_two_sides(tmp_path, "fine"), case], classes=HIPPOCAMPUS)
    assert fingerprint_case(case)["share_1"] == pytest.approx(30 / 512)  # binary mode merges it


def test_dataset_fingerprint_classes_and_lateralized(tmp_path):
    sided = [fingerprint_case(_two_sides(tmp_path, f"s{i}"), classes=HIPPOCAMPUS) for i in range(2)]
    fingerprint = dataset_fingerprint(sided, "multiclass", HIPPOCAMPUS)
    assert fingerprint["label_mode"] == "multiclass"
    assert fingerprint["classes"] == {"1": "anterior", "2": "posterior"} and fingerprint["lateralized"] == [1, 2]
    swapped = sided + [fingerprint_case(_two_sides(tmp_path, "w", left=2, right=1), classes=HIPPOCAMPUS)]
    assert dataset_fingerprint(swapped, "multiclass", HIPPOCAMPUS)["lateralized"] == []
    binary = dataset_fingerprint([fingerprint_case(_good(tmp_path))])
    assert (binary["label_mode"], binary["classes"], binary["lateralized"]) == ("binary", {"1": "foreground"}, [])


def test_largest_component_extent_is_in_mm_along_each_axis():
    import numpy as np

    from medseg.cases.validation import largest_component_extent_mm

    mask = np.zeros((10, 10, 10), np.uint8)
    mask[1:4, 2:8, 0:2] = 1  # 3 x 6 x 2 voxels: the largest region
    mask[8, 8, 8] = 1  # a single voxel elsewhere
    assert largest_component_extent_mm(mask, (1.0, 0.5, 2.0)) == (3.0, 3.0, 4.0)
    assert largest_component_extent_mm(np.zeros((3, 3, 3), np.uint8), (1.0, 1.0, 1.0)) == (0.0, 0.0, 0.0)
