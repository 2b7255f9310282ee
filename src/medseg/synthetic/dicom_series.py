"""Writing a medseg volume as a synthetic, uncompressed DICOM series, for tests and demos.

The series is what a scanner would export for the volume: one single-frame CT (or MR) image
per slice, placed by ImagePositionPatient / ImageOrientationPatient / PixelSpacing so that
:func:`medseg.dicom.series.read_dicom_series` reads back the same affine and voxels (within
the int16 quantization of the rescale), and dcm2niix converts it to the same geometry. The
patient is obviously fake (PHANTOM^SYNTHETIC, no birth date), the UIDs are derived from the
seed and the volume's content, so the same call writes the same files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid
from pydicom.valuerep import DS

from medseg.errors import InvalidGeometryError, InvalidIntensityError
from medseg.dicom.series import lps_to_ras
from medseg.imaging.io import Volume, check_affine
from medseg.storage.publishing import atomic_path

__all__ = ["write_dicom_series"]

# Voxel axes whose directions meet at more than this cosine are not orthogonal: DICOM's slices
# are a row and a column direction plus a step along their normal (or, tilted, not) - no shear
# within a slice.
_ORTHOGONALITY_TOLERANCE = 1e-6
_INT16 = np.iinfo(np.int16)


def write_dicom_series(
    volume: Volume,
    folder: str | os.PathLike,
    *,
    patient_id: str = "PHANTOM",
    modality: Literal["CT", "MR"] = "CT",
    series_description: str = "medseg synthetic phantom",
    series_number: int = 1,
    seed: int = 0,
) -> list[Path]:
    """Write `volume` as one uncompressed single-frame DICOM series in `folder`.

    Args:
        volume: data (X, Y, Z), any real dtype (an image; a label is written as its values),
            affine (4, 4) voxel to world RAS mm with orthogonal axes (oblique allowed). Axis 0
            becomes the columns of each slice, axis 1 its rows, axis 2 the slices.
        folder: created if missing; the files are `0001.dcm`, `0002.dcm`... one per slice,
            numbered along axis 2, each written atomically. Files of the same names are replaced.
        patient_id: PatientID of the fake patient (PatientName is always PHANTOM^SYNTHETIC).
        modality: "CT" (CT Image Storage) or "MR" (MR Image Storage).
        series_description: SeriesDescription.
        series_number: SeriesNumber.
        seed: with the volume's content and `patient_id`, what every UID derives from
            (`generate_uid(entropy_srcs=...)`): the same call gives the same UIDs, another
            seed or another volume gives others.

    Returns:
        The written files, slice k of axis 2 at index k.

    Edge cases:
        Pixels are int16 with one RescaleSlope / RescaleIntercept for the series (also for MR,
        whose IOD does not list them: dciodvfy warns, every reader applies them): integer data
        within int16 is stored exactly (slope 1, intercept 0, as CT Hounsfield units); other
        data is spread over the int16 range, so it reads back within half a slope. A volume
        whose axis 2 points against the normal (row x column direction) reads back with axis 2
        reversed, as every reader sorts slices along the normal: the same voxels in space.

    Raises:
        InvalidGeometryError: an affine that check_affine refuses, or whose axes are not orthogonal.
        InvalidIntensityError: NaN or Inf voxels.
        ValueError: a modality other than CT or MR, or data that is not 3-D.
    """
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', not {modality!r}")
    data = np.asarray(volume.data)
    if data.ndim != 3:
        raise ValueError(f"the volume must be 3-D (X, Y, Z), it has shape {data.shape}")
    affine = np.asarray(volume.affine, dtype=np.float64)
    check_affine(affine, "the volume to write as DICOM")
    if not np.all(np.isfinite(data)):
        raise InvalidIntensityError("the volume to write as DICOM holds NaN or Inf voxels; replace them first.")
    lps = lps_to_ras(affine)
    axes = lps[:3, :3]
    directions = axes / np.linalg.norm(axes, axis=0)
    cosines = directions.T @ directions - np.eye(3)
    if np.max(np.abs(cosines)) > _ORTHOGONALITY_TOLERANCE:
        raise InvalidGeometryError(
            f"the volume to write as DICOM has non-orthogonal voxel axes (affine {np.round(affine, 6).tolist()}); a "
            "DICOM slice has perpendicular rows and columns and is stacked along its normal. Resample it first."
        )
    slope, intercept, stored = _quantize(data)

    content = hashlib.sha256(np.ascontiguousarray(data).tobytes() + affine.tobytes() + str(data.shape).encode()).hexdigest()
    entropy = [str(seed), content, patient_id, modality, series_description]
    study_uid = generate_uid(entropy_srcs=[*entropy, "study"])
    series_uid = generate_uid(entropy_srcs=[*entropy, "series"])
    frame_uid = generate_uid(entropy_srcs=[*entropy, "frame of reference"])

    row_direction, column_direction = directions[:, 0], directions[:, 1]
    normal = np.cross(row_direction, column_direction)
    column_spacing, row_spacing = float(np.linalg.norm(axes[:, 0])), float(np.linalg.norm(axes[:, 1]))
    thickness = float(np.linalg.norm(axes[:, 2]))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(data.shape[2])))
    paths = []
    for k in range(data.shape[2]):
        position = lps[:3, 3] + k * lps[:3, 2]
        sop_uid = generate_uid(entropy_srcs=[*entropy, "instance", str(k)])
        dataset = _slice_dataset(modality, sop_uid)
        dataset.update(_patient_and_study(patient_id, study_uid))
        dataset.Modality = modality
        dataset.SeriesInstanceUID = series_uid
        dataset.SeriesNumber = series_number
        dataset.SeriesDescription = series_description
        dataset.PatientPosition = "HFS"
        dataset.Laterality = ""  # type 2C: a phantom is no paired structure, present and empty
        dataset.FrameOfReferenceUID = frame_uid
        dataset.PositionReferenceIndicator = ""
        dataset.Manufacturer = "medseg"
        dataset.ManufacturerModelName = "medseg.synthetic.dicom_series"
        dataset.SoftwareVersions = "1"
        dataset.InstanceNumber = k + 1
        dataset.ContentDate, dataset.ContentTime = "20000101", "000000"
        dataset.AcquisitionNumber = 1
        dataset.PatientOrientation = ""
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        dataset.ImageOrientationPatient = [_ds(v) for v in (*row_direction, *column_direction)]
        dataset.ImagePositionPatient = [_ds(v) for v in position]
        dataset.PixelSpacing = [_ds(row_spacing), _ds(column_spacing)]
        dataset.SliceThickness = _ds(thickness)
        dataset.SliceLocation = _ds(float(position @ normal))
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.Rows, dataset.Columns = data.shape[1], data.shape[0]
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
        dataset.PixelRepresentation = 1
        dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
        dataset.RescaleType = "HU" if modality == "CT" else "US"
        dataset.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<i2").tobytes()
        path = folder / f"{k + 1:0{width}d}.dcm"
        with atomic_path(path, ".dcm") as tmp:
            dataset.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths


def _ds(value: float) -> DS:
    """A decimal string of at most 16 characters (the VR's limit), as precise as that allows."""
    return DS(float(value), auto_format=True)


def _quantize(data: np.ndarray) -> tuple[DS, DS, np.ndarray]:
    """RescaleSlope, RescaleIntercept and the int16 stored values of `data`."""
    low, high = float(data.min(initial=0)), float(data.max(initial=0))
    if np.array_equal(data, np.round(data)) and _INT16.min <= low and high <= _INT16.max:
        return DS("1"), DS("0"), data.astype(np.int16)
    slope = _ds((high - low) / (2 * _INT16.max) if high > low else 1.0)
    intercept = _ds((high + low) / 2)
    # The decimal strings are what a reader multiplies by, so quantize with them, not the floats.
    stored = np.round((data.astype(np.float64) - float(intercept)) / float(slope))
    return slope, intercept, np.clip(stored, _INT16.min, _INT16.max).astype(np.int16)


def _slice_dataset(modality: str, sop_uid: str) -> Dataset:
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = sop_uid
    if modality == "CT":
        dataset.KVP = ""
    else:
        # The MR Image module's type 1 and 2 attributes: research mode, nothing more claimed.
        dataset.ScanningSequence = "RM"
        dataset.SequenceVariant = "NONE"
        dataset.ScanOptions = ""
        dataset.MRAcquisitionType = "3D"
        dataset.RepetitionTime = ""
        dataset.EchoTime = ""
        dataset.EchoTrainLength = ""
    return dataset


def _patient_and_study(patient_id: str, study_uid: str) -> Dataset:
    """The patient and study modules of an obviously fake patient."""
    dataset = Dataset()
    dataset.PatientName = "PHANTOM^SYNTHETIC"
    dataset.PatientID = patient_id
    dataset.PatientBirthDate = ""
    dataset.PatientSex = "O"
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = "synthetic phantom: no real patient"
    dataset.StudyInstanceUID = study_uid
    dataset.StudyDate, dataset.StudyTime = "20000101", "000000"
    dataset.ReferringPhysicianName = ""
    dataset.StudyID = "1"
    dataset.AccessionNumber = ""
    dataset.StudyDescription = "medseg synthetic phantom"
    return dataset
