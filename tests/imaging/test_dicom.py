"""Tests of reading a DICOM series (`medseg.dicom.series`) and of the synthetic series writer
(`medseg.synthetic.dicom_series`), on pydicom's real test files and on synthetic series."""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import CTImageStorage, JPEGExtended12Bit, JPEGLossless, generate_uid

from medseg.errors import CorruptFileError, DatasetNotFoundError, InvalidGeometryError, MedsegError
from medseg.dicom import series as dicom
from medseg.dicom.series import (
    DicomArchiveError,
    DicomDecoderError,
    DicomFileError,
    DicomGeometryError,
    DicomSeriesError,
    is_dicom_input,
    read_dicom_series,
)
from medseg.synthetic.dicom_series import write_dicom_series
from medseg.imaging.io import Volume

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
DIRTESTS = TEST_FILES / "dicomdirtests"
CT5N = DIRTESTS / "98892001" / "CT5N"
CT5N_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6"
SCOUT_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.2"
CT2_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1196530851.28319.0.2"


def _volume(shape=(6, 5, 4), affine=None, seed=0) -> Volume:
    """A float volume with distinct values everywhere, so that any transposition shows."""
    data = np.random.default_rng(seed).normal(40.0, 300.0, size=shape).astype(np.float32)
    return Volume(data=data, affine=np.diag([0.8, 0.9, 2.5, 1.0]) if affine is None else affine)


def _oblique_affine() -> np.ndarray:
    """Rotated 20 degrees about x and 30 about z, anisotropic, right-handed, off the origin."""
    a, b = np.radians(20), np.radians(30)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.7, 0.9, 2.0])
    affine[:3, 3] = [12.5, -30.0, 48.0]
    return affine


def _series(folder: Path, volume: Volume | None = None, **kwargs) -> list[Path]:
    return write_dicom_series(volume or _volume(), folder, **kwargs)


def _edit(path: Path, **changes) -> None:
    """Set (or, with None, delete) attributes of one file in place."""
    dataset = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    dataset.save_as(path)


def _shift(path: Path, offset) -> None:
    dataset = pydicom.dcmread(path)
    dataset.ImagePositionPatient = [float(v) + d for v, d in zip(dataset.ImagePositionPatient, offset)]
    dataset.save_as(path)


# --- pydicom's real files -------------------------------------------------------------------------


def test_ct5n_affine_is_built_from_its_headers():
    series = read_dicom_series(CT5N)
    headers = {path.name: pydicom.dcmread(path, stop_before_pixels=True) for path in CT5N.iterdir()}
    # The lowest slice (z = -1.2375) comes first along the normal (0, 0, 1) of IOP [1,0,0,0,1,0].
    assert [Path(f).name for f in series.files] == ["3353", "3023", "2693", "2392", "2062"]
    first, second = headers["3353"], headers["3023"]
    spacing = float(first.PixelSpacing[0])  # 0.488281 mm, rows and columns alike
    z_step = float(second.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
    assert z_step == pytest.approx(2.5)
    expected = np.array(
        [
            [-spacing, 0, 0, -float(first.ImagePositionPatient[0])],  # LPS x -> RAS -x
            [0, -spacing, 0, -float(first.ImagePositionPatient[1])],
            [0, 0, z_step, float(first.ImagePositionPatient[2])],
            [0, 0, 0, 1],
        ]
    )
    np.testing.assert_allclose(series.volume.affine, expected, atol=1e-6)
    np.testing.assert_allclose(expected[:3, 3], [72.199997, 143.0, -1.2375], atol=1e-6)
    assert series.volume.data.shape == (16, 16, 5)  # (columns, rows, slices)
    assert series.volume.data.dtype == np.float32
    assert series.series_uid == CT5N_UID
    assert series.modality == "CT" and series.description == "SmartScore - Gated 0.5 sec"
    assert series.study_uid == str(first.StudyInstanceUID)
    assert [str(d.SOPInstanceUID) for d in series.datasets] == [str(headers[Path(f).name].SOPInstanceUID) for f in series.files]
    assert all("PixelData" not in d for d in series.datasets)


def test_ct5n_voxel_is_raw_times_slope_plus_intercept():
    series = read_dicom_series(CT5N)
    raw = pydicom.dcmread(CT5N / "2693")  # the third slice along the normal
    slope, intercept = float(raw.RescaleSlope), float(raw.RescaleIntercept)
    assert (slope, intercept) == (1.0, -1024.0)
    i, j = 3, 11  # column 3, row 11: array axis 0 runs along the columns
    assert raw.pixel_array[j, i] != raw.pixel_array[i, j]  # the voxel tells a transposition apart
    assert series.volume.data[i, j, 2] == pytest.approx(raw.pixel_array[j, i] * slope + intercept)
    np.testing.assert_array_equal(series.volume.data[:, :, 2], raw.pixel_array.T * slope + intercept)


def test_several_series_are_listed_and_refused():
    with pytest.raises(DicomSeriesError) as info:
        read_dicom_series(DIRTESTS / "98892001")
    message = str(info.value)
    assert "2 image series" in message
    assert f"{SCOUT_UID} ('Scout', number 4, CT, 2 instances, localizer)" in message
    assert f"{CT5N_UID} ('SmartScore - Gated 0.5 sec', number 5, CT, 5 instances)" in message
    assert "predict.series_uid" in message and str(DIRTESTS / "98892001") in message


def test_series_uid_chooses_one_series():
    series = read_dicom_series(DIRTESTS / "98892001", series_uid=CT5N_UID)
    np.testing.assert_array_equal(series.volume.data, read_dicom_series(CT5N).volume.data)


def test_unknown_series_uid_is_refused_with_the_choices():
    with pytest.raises(DicomSeriesError, match=rf"no image series with SeriesInstanceUID 1\.2\.3\..*{CT5N_UID}"):
        read_dicom_series(DIRTESTS / "98892001", series_uid="1.2.3")


def test_localizer_series_is_refused():
    with pytest.raises(DicomSeriesError, match=rf"series {SCOUT_UID} \('Scout', number 4\).*6293.*6924.*localizers"):
        read_dicom_series(DIRTESTS / "98892001" / "CT2N")


def test_real_mr2_folder_holds_three_series_of_one_number():
    # pydicom's MR2 folder: three SeriesInstanceUIDs that all carry SeriesNumber 2, each a
    # one-slice or three-plane localizer whose ImageType says OTHER, not LOCALIZER.
    with pytest.raises(DicomSeriesError, match="3 image series") as info:
        read_dicom_series(DIRTESTS / "98892003" / "MR2")
    for suffix in (".18148.0.481", ".18148.0.136", ".18148.0.17"):
        assert f"1.3.6.1.4.1.5962.1.1.0.0.0.1196533885{suffix} (" in str(info.value)


def test_three_plane_pilot_is_refused_as_not_parallel():
    uid = "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.136"
    with pytest.raises(DicomGeometryError, match=rf"series {uid} .*not parallel \(3 orientations"):
        read_dicom_series(DIRTESTS / "98892003" / "MR2", series_uid=uid)


def test_radial_projection_series_is_refused_as_not_parallel():
    with pytest.raises(DicomGeometryError, match=r"1196533885\.18148\.0\.118 \('ANGIO Projected from   C', number 700\).*not parallel \(7 orientations"):
        read_dicom_series(DIRTESTS / "98892003" / "MR700")


def test_real_gap_is_named_with_the_missing_slice_count():
    # CT2 holds instances 18, 180, 181 and 182: 1.25 mm apart, but 202.5 mm from 18 to 180.
    with pytest.raises(DicomGeometryError) as info:
        read_dicom_series(DIRTESTS / "77654033" / "CT2")
    message = str(info.value)
    assert f"series {CT2_UID} ('Routine Brain', number 2)" in message
    assert "median gap 1.25 mm" in message and "a gap of 202.5 mm" in message
    assert "17106 (instance 18)" in message and "17136 (instance 180)" in message
    assert "161 missing slices" in message


def test_non_image_instances_are_skipped_not_counted(tmp_path):
    files = _series(tmp_path / "in")
    shutil.copy(TEST_FILES / "liver_1frame.dcm", tmp_path / "in" / "seg.dcm")  # a real SEG
    shutil.copy(TEST_FILES / "rtdose.dcm", tmp_path / "in" / "dose.dcm")  # multi-frame RTDOSE
    shutil.copy(TEST_FILES / "rtstruct.dcm", tmp_path / "in" / "rtstruct.dcm")  # no DICM preamble
    shutil.copy(DIRTESTS / "DICOMDIR", tmp_path / "in" / "DICOMDIR")
    series = read_dicom_series(tmp_path / "in")
    assert len(series.datasets) == len(files)
    assert sorted(Path(s.split(":")[0]).name for s in series.skipped) == ["DICOMDIR", "dose.dcm", "rtstruct.dcm", "seg.dcm"]
    assert any("SEG instance" in s for s in series.skipped)


def test_folder_of_non_image_instances_only_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copy(TEST_FILES / "liver_1frame.dcm", tmp_path / "in" / "seg.dcm")
    with pytest.raises(DicomSeriesError, match="no image series to segment.*SEG instance"):
        read_dicom_series(tmp_path / "in")


def test_series_of_rle_compressed_files_decodes(tmp_path):
    # MR_small_RLE.dcm is MR_small.dcm (64 x 64, raw int16) compressed with RLE, which pydicom
    # decodes itself; two copies one slice apart make a series.
    reference = pydicom.dcmread(TEST_FILES / "MR_small.dcm").pixel_array
    for k in range(2):
        dataset = pydicom.dcmread(TEST_FILES / "MR_small_RLE.dcm")
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.ImagePositionPatient = [-83.9063, -91.2, 6.6406 + 1.5 * k]
        dataset.save_as(tmp_path / f"{k}.dcm")
    series = read_dicom_series(tmp_path)
    assert series.volume.data.shape == (64, 64, 2)
    np.testing.assert_array_equal(series.volume.data[:, :, 1], reference.T.astype(np.float32))
    assert series.volume.affine[2, 2] == pytest.approx(1.5)


def _with_pixel_data_of(tmp_path: Path, donor: Path, count: int = 2) -> Path:
    """`count` slices of a CT series that carry `donor`'s (compressed) pixel data."""
    folder = tmp_path / "series"
    folder.mkdir()
    series_uid = generate_uid()
    for k in range(count):
        dataset = pydicom.dcmread(donor)
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.SeriesInstanceUID = series_uid
        dataset.Modality = "CT"
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [0, 0, 2.0 * k]
        dataset.PixelSpacing = [1, 1]
        dataset.save_as(folder / f"{k}.dcm")
    return folder


def _installed(uid, plugins=("pylibjpeg", "gdcm")) -> bool:
    return any(plugin in get_decoder(uid).available_plugins for plugin in plugins)


@pytest.mark.skipif(_installed(JPEGExtended12Bit), reason="a 12-bit JPEG decoder is installed")
def test_jpeg_extended_12_bit_without_its_decoder_names_the_package(tmp_path):
    # JPGExtended.dcm holds real 12-bit JPEG Extended data, which Pillow (installed) cannot decode.
    folder = _with_pixel_data_of(tmp_path, TEST_FILES / "JPGExtended.dcm")
    with pytest.raises(DicomDecoderError, match=r"JPEG Extended.*Pillow.*pylibjpeg-libjpeg.*python-gdcm"):
        read_dicom_series(folder)


@pytest.mark.skipif(get_decoder(JPEGLossless).is_available, reason="a JPEG Lossless decoder is installed")
def test_transfer_syntax_without_any_decoder_is_refused_before_decoding(tmp_path):
    files = _series(tmp_path / "in")
    for path in files:
        dataset = pydicom.dcmread(path)
        dataset.file_meta.TransferSyntaxUID = JPEGLossless
        dataset.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])  # never decoded: refused before
        dataset["PixelData"].VR = "OB"
        dataset.save_as(path)
    with pytest.raises(DicomDecoderError, match=r"JPEG Lossless.*no decoder for it is installed.*pylibjpeg-libjpeg"):
        read_dicom_series(tmp_path / "in")


def test_truncated_real_file_is_named(tmp_path):
    # MR_truncated.dcm lacks the last 62 bytes of its pixel data; a second, whole slice makes a series.
    shutil.copy(TEST_FILES / "MR_truncated.dcm", tmp_path / "a.dcm")
    whole = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    whole.SOPInstanceUID = whole.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    whole.ImagePositionPatient = [-83.9063, -91.2, 8.6406]
    whole.save_as(tmp_path / "b.dcm")
    with pytest.raises(DicomFileError, match=r"pixel data of \S*a\.dcm \(instance 1\) cannot be read.*8130 vs 8192 bytes.*truncated"):
        read_dicom_series(tmp_path)


# --- refusals on synthetic series -----------------------------------------------------------------


def test_synthetic_series_round_trips_oblique_geometry_and_values(tmp_path):
    volume = _volume(affine=_oblique_affine())
    files = _series(tmp_path / "in", volume)
    series = read_dicom_series(files)
    np.testing.assert_allclose(series.volume.affine, volume.affine, atol=1e-4)
    slope = float(pydicom.dcmread(files[0]).RescaleSlope)
    assert slope < 0.1  # float data spread over the int16 range
    np.testing.assert_allclose(series.volume.data, volume.data, atol=slope / 2 + 1e-4)
    assert series.files == [str(p) for p in files]


def test_integer_data_round_trips_exactly_with_unit_slope(tmp_path):
    data = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4) - 1024
    files = _series(tmp_path / "in", Volume(data, np.diag([0.8, 0.9, 2.5, 1.0])))
    header = pydicom.dcmread(files[0])
    assert (float(header.RescaleSlope), float(header.RescaleIntercept)) == (1.0, 0.0)
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "in").volume.data, data)


def test_slice_axis_against_the_normal_reads_back_reversed(tmp_path):
    affine = np.diag([0.8, 0.9, -2.5, 1.0])  # axis 2 runs inferior: the normal points superior
    volume = _volume(affine=affine)
    files = _series(tmp_path / "in", volume)
    series = read_dicom_series(tmp_path / "in")
    assert [Path(f).name for f in series.files] == [p.name for p in reversed(files)]
    slope = float(pydicom.dcmread(files[0]).RescaleSlope)
    np.testing.assert_allclose(series.volume.data, volume.data[:, :, ::-1], atol=slope / 2 + 1e-4)
    np.testing.assert_allclose(series.volume.affine @ [0, 0, 3, 1], affine @ [0, 0, 0, 1], atol=1e-4)


def test_synthetic_uids_follow_the_seed_and_the_content(tmp_path):
    uids = {}
    for name, seed, volume_seed in (("a", 0, 0), ("b", 0, 0), ("c", 1, 0), ("d", 0, 1)):
        files = _series(tmp_path / name, _volume(seed=volume_seed), seed=seed)
        header = pydicom.dcmread(files[0])
        uids[name] = (header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID)
        assert header.PatientName == "PHANTOM^SYNTHETIC" and header.PatientID == "PHANTOM"
        assert list(header.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert uids["a"] == uids["b"]
    assert len({uids["a"], uids["c"], uids["d"]}) == 3


def test_mr_series_reads_as_mr(tmp_path):
    _series(tmp_path / "in", modality="MR", series_description="T2 phantom")
    series = read_dicom_series(tmp_path / "in")
    assert (series.modality, series.description) == ("MR", "T2 phantom")
    assert pydicom.uid.UID(series.datasets[0].SOPClassUID) == pydicom.uid.MRImageStorage


def test_missing_slice_is_named(tmp_path):
    files = _series(tmp_path / "in", _volume(shape=(6, 5, 6)))
    files[3].unlink()
    with pytest.raises(DicomGeometryError) as info:
        read_dicom_series(tmp_path / "in")
    uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    assert f"series {uid} ('medseg synthetic phantom', number 1)" in str(info.value)
    assert "a gap of 5 mm between" in str(info.value) and "0003.dcm (instance 3)" in str(info.value)
    assert "0005.dcm (instance 5)" in str(info.value) and "a missing slice" in str(info.value)


def test_uneven_spacing_is_named(tmp_path):
    files = _series(tmp_path / "in", _volume(shape=(6, 5, 6)))
    _shift(files[2], (0, 0, 0.4))  # gaps 2.9 and 2.1 mm around it
    with pytest.raises(DicomGeometryError, match=r"not evenly spaced.*a gap of 2\.9 mm between .*0002\.dcm.*uneven spacing"):
        read_dicom_series(tmp_path / "in")


def test_position_jitter_within_tolerance_is_accepted(tmp_path):
    files = _series(tmp_path / "in", _volume(shape=(6, 5, 6)))
    _shift(files[2], (0, 0, 0.01))  # within max(1 % of 2.5 mm, 0.02 mm)
    series = read_dicom_series(tmp_path / "in")
    assert series.volume.affine[2, 2] == pytest.approx(2.5)


def test_duplicate_positions_are_refused(tmp_path):
    files = _series(tmp_path / "in")
    dataset = pydicom.dcmread(files[1])
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.EchoNumbers = 2
    dataset.save_as(tmp_path / "in" / "echo2.dcm")
    with pytest.raises(DicomGeometryError, match=r"1 pair of slices at the same position: .*0002\.dcm.*echo2\.dcm.*EchoNumbers"):
        read_dicom_series(tmp_path / "in")


def test_second_copy_of_an_instance_is_skipped(tmp_path):
    files = _series(tmp_path / "in")
    shutil.copy(files[1], tmp_path / "in" / "copy.dcm")
    series = read_dicom_series(tmp_path / "in")
    assert len(series.datasets) == len(files)
    assert series.skipped == [f"{tmp_path / 'in' / 'copy.dcm'}: a copy of {files[1]} (same SOPInstanceUID)"]


def test_single_slice_is_refused(tmp_path):
    files = _series(tmp_path / "in", _volume(shape=(6, 5, 1)))
    with pytest.raises(DicomGeometryError, match="a single slice .*0001.dcm.*at least 2"):
        read_dicom_series(files)


def test_gantry_tilt_is_refused(tmp_path):
    files = _series(tmp_path / "in", _volume(shape=(6, 5, 5)))
    for k, path in enumerate(files):  # each slice 2.5 mm up and 2.5 * tan(15 deg) mm forward
        _shift(path, (0, -2.5 * np.tan(np.radians(15)) * k, 0))
    with pytest.raises(DicomGeometryError, match=r"15\.00 degrees off their normal.*gantry tilt.*dcm2niix"):
        read_dicom_series(tmp_path / "in")


def test_localizer_mixed_into_a_series_is_named(tmp_path):
    files = _series(tmp_path / "in")
    _edit(files[0], ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    with pytest.raises(DicomSeriesError, match=r"0001\.dcm \(instance 1\) is a localizer .* mixed with 3 other slices"):
        read_dicom_series(tmp_path / "in")


def test_slice_of_another_orientation_is_named(tmp_path):
    files = _series(tmp_path / "in", _volume(shape=(6, 5, 5)))
    _edit(files[4], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])  # a coronal slice among axials
    with pytest.raises(DicomSeriesError, match=r"0005\.dcm \(instance 5\) has an orientation .*differs from the other 4 slices"):
        read_dicom_series(tmp_path / "in")


def test_slightly_rotated_slices_are_not_parallel(tmp_path):
    files = _series(tmp_path / "in", _volume(shape=(6, 5, 2)))
    c, s = np.cos(np.radians(0.1)), np.sin(np.radians(0.1))
    _edit(files[1], ImageOrientationPatient=[c, s, 0, -s, c, 0])
    with pytest.raises(DicomGeometryError, match=r"not parallel \(2 orientations"):
        read_dicom_series(tmp_path / "in")


@pytest.mark.parametrize("keyword", ["PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient"])
def test_missing_geometry_is_refused(tmp_path, keyword):
    files = _series(tmp_path / "in")
    _edit(files[2], **{keyword: None})
    with pytest.raises(DicomGeometryError, match=rf"0003\.dcm \(instance 3\) lacks {keyword}"):
        read_dicom_series(tmp_path / "in")


def test_multi_frame_instance_is_refused(tmp_path):
    files = _series(tmp_path / "in")
    _edit(files[0], NumberOfFrames=2)
    with pytest.raises(DicomFileError, match=r"0001\.dcm \(instance 1\) is a multi-frame .*\(2 frames in the first\).*dcm2niix"):
        read_dicom_series(tmp_path / "in")


def test_enhanced_instance_of_one_frame_is_refused_as_multi_frame(tmp_path):
    files = _series(tmp_path / "in")
    _edit(files[1], SharedFunctionalGroupsSequence=[pydicom.Dataset()])
    with pytest.raises(DicomFileError, match=r"0002\.dcm \(instance 2\) is a multi-frame \(enhanced\) instance \(1 frame in"):
        read_dicom_series(tmp_path / "in")


def test_missing_path_is_not_found(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nowhere: no such file or folder"):
        read_dicom_series(tmp_path / "nowhere")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed (apt-get install dicom3tools)")
def test_synthetic_ct_slice_passes_dciodvfy(tmp_path):
    files = _series(tmp_path / "in")
    result = subprocess.run(["dciodvfy", str(files[0])], capture_output=True, text=True, timeout=60)
    report = (result.stdout + result.stderr).splitlines()
    assert report and report[0] == "CTImage"
    assert [line for line in report if line.startswith("Error")] == []


def test_corrupt_file_is_named(tmp_path):
    _series(tmp_path / "in")
    (tmp_path / "in" / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(DicomFileError, match=r"noise\.dcm: (not a readable DICOM file|has no SOP Class UID)"):
        read_dicom_series(tmp_path / "in")


def test_file_cut_inside_its_header_is_named(tmp_path):
    files = _series(tmp_path / "in")
    files[1].write_bytes(files[1].read_bytes()[:300])  # preamble, magic, the file meta, a few attributes
    with pytest.raises(DicomFileError, match=r"0002\.dcm: an image whose file ends before its pixel data, so it is truncated"):
        read_dicom_series(tmp_path / "in")


def test_file_cut_inside_its_pixel_data_is_named(tmp_path):
    files = _series(tmp_path / "in")
    files[3].write_bytes(files[3].read_bytes()[:-7])
    with pytest.raises(DicomFileError, match=r"0004\.dcm \(instance 4\) cannot be read.*truncated"):
        read_dicom_series(tmp_path / "in")


def test_folder_without_dicom_files_is_refused(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "README.txt").write_text("not a scan")
    with pytest.raises(DicomSeriesError, match=r"in: no DICOM files in this folder or below it \(1 other file\)"):
        read_dicom_series(tmp_path / "in")


def test_voxel_limit_is_checked_before_reading(tmp_path, monkeypatch):
    files = _series(tmp_path / "in")  # 6 x 5 x 4 = 120 voxels
    monkeypatch.setenv("MEDSEG_MAX_VOXELS", "100")
    files[0].write_bytes(files[0].read_bytes()[:-7])  # its pixels are never read
    with pytest.raises(DicomGeometryError, match=r"6 x 5 x 4 voxels .*MEDSEG_MAX_VOXELS.*Refused before reading"):
        read_dicom_series(tmp_path / "in")


def test_errors_are_medseg_errors_of_the_existing_families():
    assert issubclass(DicomGeometryError, InvalidGeometryError)
    assert issubclass(DicomFileError, CorruptFileError)
    for error in (DicomSeriesError, DicomDecoderError, DicomArchiveError):
        assert issubclass(error, MedsegError)


# --- sources --------------------------------------------------------------------------------------


def _zip(files: list[Path], names: list[str] | None = None, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, name in zip(files, names or [f"study/series/{p.name}" for p in files]):
            archive.writestr(name, path.read_bytes())  # archive.write would strip a leading "/"
        for name, raw in (extra or {}).items():
            archive.writestr(name, raw)
    return buffer.getvalue()


def test_zip_bytes_and_zip_file_read_like_the_folder(tmp_path):
    files = _series(tmp_path / "in")
    raw = _zip(files, extra={"__MACOSX/study/series/._0001.dcm": b"\x00\x05\x16\x07", "README.txt": b"hello"})
    (tmp_path / "series.zip").write_bytes(raw)
    expected = read_dicom_series(tmp_path / "in")
    for source in (raw, tmp_path / "series.zip"):
        series = read_dicom_series(source)
        np.testing.assert_array_equal(series.volume.data, expected.volume.data)
        np.testing.assert_array_equal(series.volume.affine, expected.volume.affine)
    assert read_dicom_series(raw).files[0] == "<zip bytes>!study/series/0001.dcm"


@pytest.mark.parametrize("name", ["../evil.dcm", "/etc/evil.dcm", "study/../../evil.dcm", "C:/evil.dcm"])
def test_zip_slip_member_refuses_the_archive(tmp_path, name):
    files = _series(tmp_path / "in")
    raw = _zip(files[:1], [name])
    with pytest.raises(DicomArchiveError, match=r"absolute path or a '\.\.' component"):
        read_dicom_series(raw)


def test_zip_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_MAX_SCAN_MB", "1")
    raw = _zip([], extra={"zeros.dcm": bytes(2 * 2**20)})
    assert len(raw) < 10_000
    with pytest.raises(DicomArchiveError, match=r"inflates to 2\.0 MiB, above the limit of 1\.0 MiB"):
        read_dicom_series(raw)


def test_a_member_that_inflates_a_thousand_times_is_refused_before_inflating(tmp_path):
    from tests.security.conftest import PeakMemory, zip_bomb


    raw = zip_bomb(zeros=64 * 2**20)  # one member, 64 MiB of zeros, under MEDSEG_MAX_SCAN_MB
    with PeakMemory() as memory, pytest.raises(DicomArchiveError, match=r"IM0000\.dcm' inflates 1,0\d\d times .* above the 100:1"):
        read_dicom_series(raw)
    assert memory.grown_mib < 16


def test_an_archive_of_many_small_zero_members_is_refused_as_a_whole(tmp_path):
    from tests.security.conftest import zip_bomb

    raw = zip_bomb(zeros=512 * 2**10, members=160)  # each under the 1 MiB floor; 80 MiB in all
    with pytest.raises(DicomArchiveError, match=r"the archive inflates .* times .* to 80\.0 MiB\), above the 100:1"):
        read_dicom_series(raw)


def test_a_dcm_member_that_does_not_begin_like_dicom_is_named(tmp_path):
    files = _series(tmp_path / "in")
    raw = _zip(files, extra={"study/series/zeros.dcm": bytes(4096)})
    with pytest.raises(DicomFileError, match=r"zeros\.dcm: named \.dcm, but it has no DICM preamble"):
        read_dicom_series(raw)


def test_zip_with_too_many_members_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(dicom, "MAX_ZIP_MEMBERS", 3)
    raw = _zip(_series(tmp_path / "in"))
    with pytest.raises(DicomArchiveError, match="lists 4 members, more than the 3"):
        read_dicom_series(raw)


def test_bytes_that_are_not_a_zip_are_refused():
    with pytest.raises(DicomArchiveError, match="<zip bytes>: not a readable zip archive"):
        read_dicom_series(b"no zip here")


def test_list_of_files_reads_the_series(tmp_path):
    files = _series(tmp_path / "in")
    series = read_dicom_series([str(p) for p in reversed(files)])
    assert series.files == [str(p) for p in files]


def test_is_dicom_input(tmp_path):
    _series(tmp_path / "nested" / "a" / "b")
    (tmp_path / "empty").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "scan.nii.gz")
    (tmp_path / "x.zip").write_bytes(b"PK")
    assert is_dicom_input(tmp_path / "nested")
    assert is_dicom_input(CT5N / "2062")  # no extension, the DICM magic
    assert is_dicom_input(TEST_FILES / "rtstruct.dcm")  # no preamble, a .dcm name
    assert is_dicom_input(tmp_path / "x.zip")
    assert not is_dicom_input(tmp_path / "empty")
    assert not is_dicom_input(tmp_path / "scan.nii.gz")
    assert not is_dicom_input(tmp_path / "missing")


# --- dcm2niix, when installed ---------------------------------------------------------------------


def _dcm2niix(folder: Path, out: Path) -> nib.Nifti1Image:
    out.mkdir()
    result = subprocess.run(
        ["dcm2niix", "-z", "n", "-b", "n", "-f", "converted", "-o", str(out), str(folder)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return nib.load(out / "converted.nii")


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed (apt-get install dcm2niix)")
@pytest.mark.parametrize("case", ["synthetic oblique", "CT5N"])
def test_geometry_matches_dcm2niix(tmp_path, case):
    if case == "CT5N":
        folder = CT5N
    else:
        folder = tmp_path / "in"
        _series(folder, _volume(shape=(7, 5, 4), affine=_oblique_affine()))
    ours = read_dicom_series(folder).volume
    theirs = nib.as_closest_canonical(_dcm2niix(folder, tmp_path / "out"))
    mine = nib.as_closest_canonical(nib.Nifti1Image(ours.data, ours.affine))
    np.testing.assert_allclose(mine.affine, theirs.affine, atol=1e-3)
    np.testing.assert_allclose(mine.get_fdata(dtype=np.float32), theirs.get_fdata(dtype=np.float32), atol=1e-3)
