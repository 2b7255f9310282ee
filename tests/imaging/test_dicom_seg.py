"""Tests of writing and reading DICOM SEG objects (`medseg.dicom.seg`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset

from medseg.dicom.series import DicomSeries, read_dicom_series
from medseg.dicom.seg import (
    GENERIC_SEGMENT_CODE,
    DicomSegError,
    read_dicom_seg,
    segment_code,
    write_dicom_seg,
)
from medseg.synthetic.dicom_series import write_dicom_series
from medseg.imaging.io import Volume

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
CT5N = TEST_FILES / "dicomdirtests" / "98892001" / "CT5N"
ALGORITHM = {"algorithm_name": "medseg unet", "algorithm_version": "0.1.0", "model_uri": "runs:/0123456789abcdef/unet_segmenter"}


def _oblique_affine() -> np.ndarray:
    a = np.radians(25)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]) @ np.diag([0.7, 0.9, 2.0])
    affine[:3, 3] = [5.0, -12.0, 30.0]
    return affine


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> DicomSeries:
    """A synthetic oblique CT series of 7 x 5 x 4 voxels: no axis alike, so a swap shows."""
    folder = tmp_path_factory.mktemp("series")
    data = np.random.default_rng(0).normal(0, 100, size=(7, 5, 4)).astype(np.float32)
    write_dicom_series(Volume(data, _oblique_affine()), folder)
    return read_dicom_series(folder)


def _asymmetric_mask(shape=(7, 5, 4)) -> np.ndarray:
    """Label 1 an L in slice 1, label 2 a bar in slices 2-3 and one voxel in slice 0."""
    mask = np.zeros(shape, np.uint8)
    mask[1:5, 1, 1] = 1
    mask[1, 1:4, 1] = 1
    mask[5, 0:3, 2:4] = 2
    mask[6, 4, 0] = 2
    return mask


def test_round_trip_one_class(series, tmp_path):
    mask = np.zeros(series.volume.data.shape, np.uint8)
    mask[2:5, 1:3, 1:3] = 1
    write_dicom_seg(mask, series, {1: "liver"}, path=tmp_path / "seg.dcm", **ALGORITHM)
    back = read_dicom_seg(tmp_path / "seg.dcm", series)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)


def test_round_trip_several_classes_with_an_empty_one(series, tmp_path):
    mask = _asymmetric_mask()
    classes = {1: "liver", 2: "liver tumour", 3: "spleen"}  # nothing is labelled spleen
    write_dicom_seg(mask, series, classes, path=tmp_path / "seg.dcm", **ALGORITHM)
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", series), mask)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["liver", "liver tumour", "spleen"]
    # One frame per slice and segment that holds something: 1 in slice 1; 2 in slices 0, 2, 3.
    assert int(seg.NumberOfFrames) == 4


def test_label_values_that_are_not_1_to_k_come_back(series, tmp_path):
    mask = _asymmetric_mask() * 3  # values 3 and 6
    write_dicom_seg(mask, series, {3: "anterior", 6: "posterior"}, path=tmp_path / "seg.dcm", **ALGORITHM)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert [int(item.SegmentNumber) for item in seg.SegmentSequence] == [1, 2]
    assert [item.SegmentDescription for item in seg.SegmentSequence] == ["medseg label value 3", "medseg label value 6"]
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", series), mask)
    by_name = read_dicom_seg(tmp_path / "seg.dcm", series, classes={30: "Anterior", 60: "Posterior"})
    np.testing.assert_array_equal(by_name, mask * 10)


def test_empty_mask_round_trips(series, tmp_path):
    mask = np.zeros(series.volume.data.shape, np.uint8)
    write_dicom_seg(mask, series, {1: "lesion"}, path=tmp_path / "seg.dcm", **ALGORITHM)
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", series), mask)


def test_frames_are_slices_in_dicom_row_column_order(series, tmp_path):
    """Read with pydicom alone: frame pixel (r, c) of the frame over series.datasets[k] is
    mask[c, r, k], and the frame sits at that slice's ImagePositionPatient."""
    mask = _asymmetric_mask()
    write_dicom_seg(mask, series, {1: "liver", 2: "tumor"}, path=tmp_path / "seg.dcm", **ALGORITHM)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    assert (int(seg.Rows), int(seg.Columns)) == (5, 7)  # rows along axis 1, columns along axis 0
    slice_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(series.datasets)}
    seen = set()
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = slice_of[str(uid)]
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(frame, (mask[:, :, k] == segment).T.astype(np.uint8))
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in series.datasets[k].ImagePositionPatient],
            atol=1e-4,
        )
        seen.add((k, segment))
    assert seen == {(1, 1), (0, 2), (2, 2), (3, 2)}


def test_real_ct5n_round_trip(tmp_path):
    series = read_dicom_series(CT5N)
    mask = np.zeros(series.volume.data.shape, np.uint8)
    mask[3:9, 2:4, 0:3] = 1
    mask[10, 12, 4] = 1
    write_dicom_seg(mask, series, {1: "heart"}, path=tmp_path / "seg.dcm", **ALGORITHM)
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", series), mask)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.PatientID == series.datasets[0].PatientID
    assert seg.StudyInstanceUID == series.study_uid
    assert seg.FrameOfReferenceUID == series.datasets[0].FrameOfReferenceUID
    referenced = [item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(str(ds.SOPInstanceUID) for ds in series.datasets)


def test_segments_carry_codes_and_the_algorithm(series, tmp_path):
    sop_uid = write_dicom_seg(
        _asymmetric_mask(), series, {1: "Liver", 2: "liver tumour", 4: "anterior"}, path=tmp_path / "seg.dcm", **ALGORITHM
    )
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.SOPInstanceUID == sop_uid
    assert seg.SegmentationType == "BINARY"
    assert seg.SeriesDescription == "medseg unet segmentation"
    codes = [
        (item.SegmentedPropertyCategoryCodeSequence[0].CodeValue, item.SegmentedPropertyTypeCodeSequence[0].CodeValue)
        for item in seg.SegmentSequence
    ]
    # Anatomical Structure / Liver; Morphologically Abnormal Structure / Neoplasm; Tissue / Tissue.
    assert codes == [("91723000", "10200004"), ("49755003", "108369006"), ("85756007", "85756007")]
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "medseg unet"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # DCM Artificial Intelligence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("medseg unet", "0.1.0")
        assert algorithm.AlgorithmParameters == "model_uri=runs:/0123456789abcdef/unet_segmenter"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("liver", "Liver"),
        ("Left_Kidney", "Kidney"),
        ("hippocampus", "Hippocampus"),
        ("PZ", "Peripheral zone of the prostate"),
        ("enhancing tumour", "Neoplasm"),
        ("colon cancer primaries", "Neoplasm"),
        ("portal vein", "Portal vein"),
        ("edema", "Edema"),
    ],
)
def test_segment_code_table(name, expected):
    assert segment_code(name).type.meaning == expected


def test_unknown_class_name_gets_the_generic_code():
    assert segment_code("Anterior") == GENERIC_SEGMENT_CODE
    assert GENERIC_SEGMENT_CODE.type.value == "85756007"  # SCT Tissue


def test_fractional_seg_from_probabilities(series, tmp_path):
    shape = series.volume.data.shape
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet([1.0, 1.0, 1.0], size=shape).astype(np.float32)  # (X, Y, Z, K + 1)
    write_dicom_seg(
        np.zeros(shape, np.uint8), series, {1: "liver", 2: "spleen"}, path=tmp_path / "seg.dcm",
        fractional=True, probabilities=probabilities, **ALGORITHM,
    )
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    stored = seg.get_pixels_by_source_instance(uids, ignore_spatial_locations=True)  # (Z, rows, columns, K)
    np.testing.assert_allclose(np.transpose(stored, (2, 1, 0, 3)), probabilities[..., 1:], atol=0.5 / 255 + 1e-6)
    quantized = np.round(probabilities[..., 1:] * 255) / 255
    expected = np.where(quantized.max(-1) >= 0.5, quantized.argmax(-1) + 1, 0)
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", series), expected)


def test_fractional_without_probabilities_is_refused(series, tmp_path):
    with pytest.raises(DicomSegError, match="fractional=True needs the probabilities"):
        write_dicom_seg(np.zeros(series.volume.data.shape, np.uint8), series, {1: "liver"}, path=tmp_path / "s.dcm",
                        fractional=True, **ALGORITHM)


def test_mask_of_another_shape_is_refused(series, tmp_path):
    with pytest.raises(DicomSegError, match=rf"{series.series_uid}.*mask has shape \(4, 5, 7\), the series \(7, 5, 4\)"):
        write_dicom_seg(np.zeros((4, 5, 7), np.uint8), series, {1: "liver"}, path=tmp_path / "s.dcm", **ALGORITHM)


def test_mask_values_outside_the_classes_are_refused(series, tmp_path):
    with pytest.raises(DicomSegError, match=r"holds values \[2\] that are not in classes"):
        write_dicom_seg(_asymmetric_mask(), series, {1: "liver"}, path=tmp_path / "s.dcm", **ALGORITHM)
    with pytest.raises(DicomSegError, match="background value 0"):
        write_dicom_seg(_asymmetric_mask(), series, {0: "background", 1: "a", 2: "b"}, path=tmp_path / "s.dcm", **ALGORITHM)


def test_failed_write_leaves_the_previous_file(series, tmp_path, monkeypatch):
    target = tmp_path / "seg.dcm"
    target.write_bytes(b"previous")

    def broken_save(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half a SEG")
        raise OSError("disk full")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_seg(_asymmetric_mask(), series, {1: "a", 2: "b"}, path=target, **ALGORITHM)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]


def test_seg_over_another_series_is_refused(series, tmp_path):
    write_dicom_seg(_asymmetric_mask(), series, {1: "a", 2: "b"}, path=tmp_path / "seg.dcm", **ALGORITHM)
    with pytest.raises(DicomSegError, match="references none of the series' 5 instances"):
        read_dicom_seg(tmp_path / "seg.dcm", read_dicom_series(CT5N))


def test_real_liver_seg_is_read_over_a_stand_in_of_its_series():
    # pydicom's liver_1frame.dcm: one 512 x 512 frame of a real 3-frame SEG (segment 1 "Liver",
    # category Tissue), without the CT it references and without SpatialLocationsPreserved.
    path = TEST_FILES / "liver_1frame.dcm"
    seg = hd.seg.segread(path)
    assert seg.get_segment_numbers() == [1]
    assert seg.get_segment_description(1).segment_label == "Liver"
    raw = pydicom.dcmread(path)
    sources = []
    for item in raw.PerFrameFunctionalGroupsSequence:  # the CT slices, as the frames place them
        source = Dataset()
        source.SOPInstanceUID = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source.ImagePositionPatient = item.PlanePositionSequence[0].ImagePositionPatient
        source.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        source.PixelSpacing = raw.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        source.Rows, source.Columns = 512, 512
        sources.append(source)
    stand_in = DicomSeries(Volume(np.zeros((512, 512, 3), np.float32), np.eye(4)), sources, "", "", "CT", "")
    labels = read_dicom_seg(path, stand_in, classes={6: "liver"})
    np.testing.assert_array_equal(labels[:, :, 0], raw.pixel_array.T * 6)  # the one frame covers slice 0
    assert not labels[:, :, 1:].any()
    sources[0].ImagePositionPatient = [-235.2, -226.8, -120.0]
    with pytest.raises(DicomSegError, match="frame 1 does not lie on the source slice it references"):
        read_dicom_seg(path, stand_in)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed (apt-get install dicom3tools)")
@pytest.mark.parametrize("kind", ["binary", "fractional", "CT5N"])
def test_dciodvfy_finds_no_error(series, tmp_path, kind):
    if kind == "CT5N":
        series = read_dicom_series(CT5N)
    shape = series.volume.data.shape
    mask = np.zeros(shape, np.uint8)
    mask[1:4, 1:3, 1:3] = 1
    mask[0, 0, 0] = 2
    probabilities = np.random.default_rng(0).uniform(size=shape + (2,)) if kind == "fractional" else None
    write_dicom_seg(mask, series, {1: "liver", 2: "tumour"}, path=tmp_path / "seg.dcm",
                    fractional=kind == "fractional", probabilities=probabilities, **ALGORITHM)
    result = subprocess.run(["dciodvfy", str(tmp_path / "seg.dcm")], capture_output=True, text=True, timeout=60)
    report = (result.stdout + result.stderr).splitlines()
    assert report and report[0] == "Segmentation"
    assert [line for line in report if line.startswith("Error")] == []


@pytest.mark.parametrize("source", ["oblique", "CT5N"])
def test_a_labelmap_seg_reads_back_as_the_mask(series, tmp_path, source):
    if source == "CT5N":
        series = read_dicom_series(CT5N)
    mask = np.zeros(series.volume.data.shape, np.uint8)
    mask[1:4, 1:3, 1:3] = 3
    mask[0, 0, 0] = 7
    write_dicom_seg(mask, series, {3: "liver", 7: "tumour", 9: "spleen"}, path=tmp_path / "seg.dcm", labelmap=True, **ALGORITHM)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.SegmentationType == "LABELMAP"
    assert int(seg.NumberOfFrames) <= series.volume.data.shape[2]  # one frame per slice, not per segment
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", series), mask)


def test_fractional_and_labelmap_together_are_refused(series, tmp_path):
    with pytest.raises(DicomSegError, match="FRACTIONAL or LABELMAP, not both"):
        write_dicom_seg(np.zeros(series.volume.data.shape, np.uint8), series, {1: "liver"}, path=tmp_path / "seg.dcm",
                        fractional=True, labelmap=True, **ALGORITHM)


# Debian's dicom3tools (2022) predates LABELMAP (DICOM 2024c), so it gives exactly these two
# messages for one: it does not know the Label Map Segmentation Storage SOP class (so it checks
# no module of it), and it counts segment numbers from 1 where a label map's background is
# segment 0 (highdicom lists it). Any other message is a real error.
LABELMAP_EXPECTED = (
    re.compile(r"^Error - SegmentNumber not monotonically increasing from one by one - have SegmentSequence item number 1 "
               r"\(from one\) with SegmentNumber of 0$"),
    re.compile(r"^Error - Information Object Not found$"),
)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed (apt-get install dicom3tools)")
def test_dciodvfy_on_a_labelmap_seg_gives_only_the_messages_of_its_older_standard(tmp_path):
    series = read_dicom_series(CT5N)
    mask = np.zeros(series.volume.data.shape, np.uint8)
    mask[1:4, 1:3, 1:3] = 1
    write_dicom_seg(mask, series, {1: "liver"}, path=tmp_path / "seg.dcm", labelmap=True, **ALGORITHM)
    result = subprocess.run(["dciodvfy", str(tmp_path / "seg.dcm")], capture_output=True, text=True, timeout=60)
    report = (result.stdout + result.stderr).splitlines()
    problems = [line.strip() for line in report if line.startswith(("Error", "Warning"))]
    unexpected = [line for line in problems if not any(p.match(line) for p in LABELMAP_EXPECTED)]
    assert unexpected == [], "\n".join(report)
