"""Series as anonymisers leave them: blank UIDs, read as dcm2niix reads them, and a SEG only
over new UIDs given on request. On a real CT series shipped with pydicom (CT5N)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest

from medseg.dicom.seg import DicomSegError, read_dicom_seg, write_dicom_seg
from medseg.dicom.series import SOURCE_UIDS, DicomSeriesError, check_dicom_series, read_dicom_series
from medseg.dicom.uids import missing_uids_reason, with_generated_uids

CT5N = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
ALGORITHM = {"algorithm_name": "medseg unet", "algorithm_version": "0.1.0", "model_uri": "runs:/0123456789abcdef/unet_segmenter"}


def blank(folder: Path, keywords=SOURCE_UIDS, source: Path = CT5N) -> Path:
    """A copy of a series with `keywords` blanked in every instance and in its file meta, as an
    anonymiser leaves it."""
    folder.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        dataset = pydicom.dcmread(path)
        for keyword in keywords:
            setattr(dataset, keyword, "")
        meta = {"SOPInstanceUID": "MediaStorageSOPInstanceUID", "SOPClassUID": "MediaStorageSOPClassUID"}
        for keyword in set(keywords) & set(meta):
            setattr(dataset.file_meta, meta[keyword], "")
        dataset.save_as(folder / f"{path.name}.dcm", enforce_file_format=False)
    return folder


def test_a_series_with_every_uid_blank_reads_as_the_original(tmp_path, caplog):
    original = read_dicom_series(CT5N)
    with caplog.at_level(logging.WARNING, logger="medseg.dicom.series"):
        series = read_dicom_series(blank(tmp_path / "blank"))
    np.testing.assert_array_equal(series.volume.data, original.volume.data)
    np.testing.assert_array_equal(series.volume.affine, original.volume.affine)
    assert series.missing_uids == SOURCE_UIDS and series.series_uid == "" and series.study_uid == ""
    assert "StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, SOPClassUID, FrameOfReferenceUID are blank" in caplog.text
    assert "predict.generate_missing_uids" in caplog.text
    assert check_dicom_series(tmp_path / "blank") == ("", SOURCE_UIDS)
    assert "set predict.generate_missing_uids=true" in missing_uids_reason(series)


def test_only_the_sop_class_blank_is_taken_from_the_file_meta(tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    for path in sorted(CT5N.iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.SOPClassUID = ""  # the file meta still names it
        dataset.save_as(folder / f"{path.name}.dcm", enforce_file_format=False)
    series = read_dicom_series(folder)
    assert series.missing_uids == ()
    assert {str(ds.SOPClassUID) for ds in series.datasets} == {pydicom.uid.CTImageStorage}


def test_a_blank_series_beside_a_named_one_is_listed_as_its_own_series(tmp_path):
    blank(tmp_path / "in" / "blank")
    shutil.copytree(CT5N, tmp_path / "in" / "named")
    with pytest.raises(DicomSeriesError, match=r"holds 2 image series .*a series without a SeriesInstanceUID"):
        read_dicom_series(tmp_path / "in")
    named = read_dicom_series(tmp_path / "in", series_uid=read_dicom_series(CT5N).series_uid)
    assert named.missing_uids == ()


def test_a_seg_over_a_blank_series_is_refused_naming_the_uids_and_the_fix(tmp_path):
    series = read_dicom_series(blank(tmp_path / "blank"))
    mask = np.zeros(series.volume.data.shape, np.uint8)
    mask[3:9, 2:4, 0:3] = 1
    with pytest.raises(DicomSegError, match=r"no StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, SOPClassUID, FrameOfReferenceUID .*generate_missing_uids"):
        write_dicom_seg(mask, series, {1: "heart"}, path=tmp_path / "seg.dcm", **ALGORITHM)
    assert not (tmp_path / "seg.dcm").exists()


def test_new_uids_are_the_same_on_every_run_and_the_seg_references_them(tmp_path):
    series = read_dicom_series(blank(tmp_path / "blank"))
    filled, generated = with_generated_uids(series)
    again, _ = with_generated_uids(read_dicom_series(tmp_path / "blank"))
    assert generated == SOURCE_UIDS and filled.missing_uids == ()
    assert [str(d.SOPInstanceUID) for d in filled.datasets] == [str(d.SOPInstanceUID) for d in again.datasets]
    assert len({str(d.SOPInstanceUID) for d in filled.datasets}) == len(filled.datasets)
    assert {str(d.SeriesInstanceUID) for d in filled.datasets} == {filled.series_uid}
    assert {str(d.SOPClassUID) for d in filled.datasets} == {pydicom.uid.CTImageStorage}
    assert all(str(d.SOPInstanceUID).startswith("2.25.") for d in filled.datasets)
    assert series.datasets[0].SOPInstanceUID == ""  # the series read stays as it was
    mask = np.zeros(series.volume.data.shape, np.uint8)
    mask[3:9, 2:4, 0:3] = 1
    write_dicom_seg(mask, filled, {1: "heart"}, path=tmp_path / "seg.dcm", **ALGORITHM)
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", filled), mask)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.StudyInstanceUID == filled.study_uid
    referenced = [item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(str(d.SOPInstanceUID) for d in filled.datasets)


def test_uids_that_are_there_are_kept_and_only_the_blank_ones_generated(tmp_path):
    original = read_dicom_series(CT5N)
    series = read_dicom_series(blank(tmp_path / "blank", keywords=("SOPInstanceUID",)))
    assert series.missing_uids == ("SOPInstanceUID",)
    filled, generated = with_generated_uids(series)
    assert generated == ("SOPInstanceUID",)
    assert (filled.study_uid, filled.series_uid) == (original.study_uid, original.series_uid)


def test_an_unknown_modality_keeps_its_sop_class_missing(tmp_path):
    series = read_dicom_series(blank(tmp_path / "blank"))
    series.modality = "XA"
    filled, generated = with_generated_uids(series)
    assert "SOPClassUID" not in generated and filled.missing_uids == ("SOPClassUID",)


def test_a_real_mr_folder_without_uids_is_split_as_dcm2niix_splits_it_and_the_fix_named(tmp_path):
    # pydicom's MR2: a localizer and a three-plane pilot, all SeriesNumber 2. Without their UIDs
    # they are told apart by orientation and size alone: the localizer, and each plane of the pilot.
    mr2 = CT5N.parents[1] / "98892003" / "MR2"
    with pytest.raises(DicomSeriesError) as named:
        read_dicom_series(mr2)
    with pytest.raises(DicomSeriesError, match=r"holds 4 image series .*cannot be chosen by UID: give it a folder or zip"):
        read_dicom_series(blank(tmp_path / "mr2", source=mr2))
    assert "cannot be chosen by UID" not in str(named.value)  # with UIDs, the UID chooses
