"""RT Structure Sets: contours along pixel edges, holes filled by the even-odd rule, read back as
the mask; over pydicom's real CT series (CT5N) and an oblique synthetic one; dciodvfy when
installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest

from medseg.dicom.rtstruct import DicomRtstructError, _even_odd_fill, mask_contours, read_rtstruct, write_rtstruct
from medseg.dicom.series import read_dicom_series
from medseg.imaging.io import Volume
from medseg.synthetic.dicom_series import write_dicom_series

CT5N = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
ALGORITHM = {"algorithm_name": "medseg unet", "algorithm_version": "0.1.0", "model_uri": "runs:/0123456789abcdef/unet_segmenter"}


def test_a_square_is_one_contour_through_its_pixel_corners():
    mask = np.zeros((5, 5), bool)
    mask[1:3, 2:4] = True
    (contour,) = mask_contours(mask)
    assert sorted(map(tuple, contour.tolist())) == sorted([(0.5, 1.5), (0.5, 3.5), (2.5, 1.5), (2.5, 3.5)])


def test_a_rim_around_a_core_is_an_outer_contour_and_a_hole_filled_even_odd():
    mask = np.zeros((9, 9), bool)
    mask[1:8, 1:8] = True
    mask[3:6, 3:6] = False  # the hole
    mask[4, 4] = True  # an island inside the hole
    contours = mask_contours(mask)
    assert len(contours) == 3  # outer, hole, island
    np.testing.assert_array_equal(_even_odd_fill(contours, mask.shape), mask)


def test_pixels_touching_at_a_corner_stay_two_regions():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[1, 1] = True
    contours = mask_contours(mask)
    assert len(contours) == 2 and all(len(c) == 4 for c in contours)
    np.testing.assert_array_equal(_even_odd_fill(contours, mask.shape), mask)


@pytest.mark.parametrize("seed", range(6))
def test_random_masks_come_back_pixel_for_pixel(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((23, 17)) < [0.2, 0.5, 0.8][seed % 3]
    np.testing.assert_array_equal(_even_odd_fill(mask_contours(mask), mask.shape), mask)


@pytest.fixture(scope="module")
def oblique(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oblique")
    a = np.radians(25)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]) @ np.diag([0.7, 0.9, 2.0])
    affine[:3, 3] = [5.0, -12.0, 30.0]
    write_dicom_series(Volume(np.random.default_rng(0).normal(0, 100, (20, 16, 6)).astype(np.float32), affine), folder)
    return read_dicom_series(folder)


def _two_classes(shape) -> np.ndarray:
    """Class 3 a rim around a core of class 5 on some slices, and a lone voxel of 3."""
    mask = np.zeros(shape, np.uint8)
    mask[3:12, 2:11, 1:4] = 3
    mask[5:9, 4:8, 1:4] = 0
    mask[6:8, 5:7, 2:4] = 5
    mask[-1, -1, -1] = 3
    return mask


@pytest.mark.parametrize("which", ["oblique", "ct5n"])
def test_a_structure_set_reads_back_as_the_mask_and_references_its_series(which, oblique, tmp_path):
    series = oblique if which == "oblique" else read_dicom_series(CT5N)
    mask = _two_classes(series.volume.data.shape)
    uid = write_rtstruct(mask, series, {3: "liver", 5: "liver tumour", 7: "spleen"}, path=tmp_path / "rt.dcm", **ALGORITHM)
    np.testing.assert_array_equal(read_rtstruct(tmp_path / "rt.dcm", series), mask)
    ds = pydicom.dcmread(tmp_path / "rt.dcm")
    assert ds.SOPInstanceUID == uid and ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == series.study_uid
    assert [roi.ROIName for roi in ds.StructureSetROISequence] == ["liver", "liver tumour", "spleen"]
    assert "ContourSequence" not in ds.ROIContourSequence[2]  # the empty class: an ROI without contours
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == series.datasets[0].FrameOfReferenceUID
    referenced = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series.series_uid
    assert sorted(i.ReferencedSOPInstanceUID for i in referenced.ContourImageSequence) == sorted(str(d.SOPInstanceUID) for d in series.datasets)
    slice_uids = {str(d.SOPInstanceUID): k for k, d in enumerate(series.datasets)}
    for contour in ds.ROIContourSequence[0].ContourSequence:  # each contour lies on the slice it references
        k = slice_uids[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        normal = np.cross(*np.asarray(series.datasets[k].ImageOrientationPatient, float).reshape(2, 3))
        offsets = points @ normal - np.asarray(series.datasets[k].ImagePositionPatient, float) @ normal
        assert np.abs(offsets).max() < 1e-3


def test_a_mask_of_another_shape_or_a_series_without_uids_is_refused(oblique, tmp_path):
    with pytest.raises(DicomRtstructError, match="the mask has shape"):
        write_rtstruct(np.zeros((2, 2, 2), np.uint8), oblique, {1: "liver"}, path=tmp_path / "rt.dcm", **ALGORITHM)
    from dataclasses import replace

    with pytest.raises(DicomRtstructError, match="no SOPInstanceUID.*generate_missing_uids"):
        write_rtstruct(np.zeros(oblique.volume.data.shape, np.uint8), replace(oblique, missing_uids=("SOPInstanceUID",)),
                       {1: "liver"}, path=tmp_path / "rt.dcm", **ALGORITHM)
    assert not (tmp_path / "rt.dcm").exists()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed (apt-get install dicom3tools)")
def test_dciodvfy_finds_no_error_in_the_structure_set(tmp_path):
    series = read_dicom_series(CT5N)
    write_rtstruct(_two_classes(series.volume.data.shape), series, {3: "liver", 5: "liver tumour"}, path=tmp_path / "rt.dcm", **ALGORITHM)
    result = subprocess.run(["dciodvfy", str(tmp_path / "rt.dcm")], capture_output=True, text=True)
    report = result.stdout + result.stderr
    errors = [line for line in report.splitlines() if line.startswith(("Error", "Warning"))]
    assert not errors, report
