"""Writing and reading RT Structure Sets (RTSTRUCT) over a DICOM series, with pydicom.

A radiotherapy planning system reads a structure set, not a SEG: one ROI per class, drawn as
closed planar contours on the source slices, in patient coordinates (LPS mm). highdicom writes
SEGs but no structure sets, so this module builds the IOD (PS3.3 A.19) with pydicom.

**Contours.** On each source slice, each class's mask is outlined along the pixel edges: every
contour is a closed polygon through pixel corners that runs between a pixel of the class and one
that is not, so it encloses exactly the pixels' centres of its region, and none on its edge.
Collinear corners are dropped. Where two pixels of a class touch only at a corner, the tracer
keeps them as two contours (it turns so that the class stays on its left).

**Holes**, and how a structure set is read back: a region with a hole (a rim around a core) is
drawn as two contours, the outer boundary and the hole's, with no keyhole cut between them. They
are filled with the **even-odd rule**: a pixel belongs to the ROI when its centre lies inside an
odd number of the slice's contours of that ROI. This is how XOR-filling readers (Eclipse,
RayStation, plastimatch, dcmrtstruct2nii) read nested contours, and :func:`read_rtstruct`
rasterises with exactly that rule, so a structure set written here reads back as its mask,
voxel for voxel.

**References.** The structure set carries the source's patient and study modules, references the
source series' Frame of Reference and every source instance (ContourImageSequence), and each
contour references the instance of its slice. Each ROI's description holds the dataset's label
value (`medseg label value N`), so that the label values come back even when they are not 1..K.
"""

from __future__ import annotations

import datetime
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from medseg.dicom.series import DicomError, DicomSeries, lps_to_ras
from medseg.dicom.uids import refuse_missing_uids
from medseg.storage.publishing import atomic_path

__all__ = ["DicomRtstructError", "mask_contours", "read_rtstruct", "write_rtstruct"]

_LABEL_VALUE_TEXT = "medseg label value {}"
_LABEL_VALUE = re.compile(r"^medseg label value (\d+)$")
# A palette per ROI, for the viewers that draw by ROIDisplayColor.
_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))
# The patient and study attributes a structure set copies from its source (PS3.3 C.7.1.1, C.7.2.1).
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
           "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription", "FrameOfReferenceUID",
           "PositionReferenceIndicator")


class DicomRtstructError(DicomError):
    """A mask that cannot become a structure set over its series, or one that cannot be read over it."""


def mask_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """The closed pixel-edge contours of a 2-D boolean mask: each an (n, 2) array of corner
    coordinates in array index units (pixel (i, j) spans [i - 0.5, i + 0.5] x [j - 0.5, j + 0.5]),
    not repeating its first point. Filled with the even-odd rule they give the mask back."""
    mask = np.pad(np.asarray(mask2d, dtype=bool), 1)
    # Directed edges with the mask on their left, between corners (integer coordinates of the
    # padded grid's corners: corner (a, b) is at index (a - 1.5, b - 1.5) of the original array).
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    rows, cols = np.nonzero(mask)
    for i, j in zip(rows.tolist(), cols.tolist()):
        if not mask[i - 1, j]:
            outgoing[(i, j + 1)].append((i, j))
        if not mask[i + 1, j]:
            outgoing[(i + 1, j)].append((i + 1, j + 1))
        if not mask[i, j - 1]:
            outgoing[(i, j)].append((i + 1, j))
        if not mask[i, j + 1]:
            outgoing[(i + 1, j + 1)].append((i, j + 1))
    contours = []
    while outgoing:
        start = next(iter(outgoing))
        points, previous, here = [start], None, start
        while True:
            choices = outgoing[here]
            if len(choices) == 1 or previous is None:
                nxt = choices.pop(0)
            else:  # a corner where two regions touch: turn so that the region stays on the left
                incoming = (here[0] - previous[0], here[1] - previous[1])
                nxt = max(choices, key=lambda c: _turn(incoming, (c[0] - here[0], c[1] - here[1])))
                choices.remove(nxt)
            if not choices:
                del outgoing[here]
            previous, here = here, nxt
            if here == start:
                break
            points.append(here)
        contours.append(_without_collinear(np.asarray(points, dtype=np.float64) - 1.5))
    return contours


def _turn(incoming: tuple[int, int], outgoing: tuple[int, int]) -> int:
    """+1 for a left turn, 0 straight, -1 right, in (row, column) coordinates."""
    return int(np.sign(incoming[0] * outgoing[1] - incoming[1] * outgoing[0]))


def _without_collinear(points: np.ndarray) -> np.ndarray:
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    cross = (points[:, 0] - before[:, 0]) * (after[:, 1] - points[:, 1]) - (points[:, 1] - before[:, 1]) * (after[:, 0] - points[:, 0])
    return points[cross != 0]


def _even_odd_fill(contours: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The pixels whose centres lie inside an odd number of `contours` (index coordinates)."""
    from matplotlib.path import Path as Polygon

    filled = np.zeros(shape, dtype=bool)
    if not contours:
        return filled
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for contour in contours:
        low = np.floor(contour.min(axis=0)).astype(int).clip(0)
        high = np.ceil(contour.max(axis=0)).astype(int) + 1
        window = (slice(low[0], high[0]), slice(low[1], high[1]))
        centres = np.stack([ii[window].ravel(), jj[window].ravel()], axis=1)
        inside = Polygon(contour, closed=False).contains_points(centres).reshape(ii[window].shape)
        filled[window] ^= inside
    return filled


def write_rtstruct(
    mask: np.ndarray,
    series: DicomSeries,
    classes: dict[int, str],
    *,
    algorithm_name: str,
    algorithm_version: str,
    model_uri: str,
    path: str | os.PathLike,
    series_description: str = "medseg structures",
) -> str:
    """Write an RTSTRUCT of the label map `mask` (X, Y, Z, on the series' grid) over `series`,
    atomically; return its SOPInstanceUID. One ROI per class of `classes` (empty ones too, with
    no contour), contours as the module says.

    Raises:
        DicomRtstructError: a mask of another shape, no classes, the source without its UIDs.
    """
    mask = np.asarray(mask)
    what = f"the RTSTRUCT for series {series.series_uid or '(no UID)'} at {path}"
    refuse_missing_uids(series, what, DicomRtstructError)
    if mask.shape != series.volume.data.shape:
        raise DicomRtstructError(f"{what}: the mask has shape {mask.shape}, the series {series.volume.data.shape} (X, Y, Z).")
    if not classes or 0 in classes:
        raise DicomRtstructError(f"{what}: give the foreground classes (value -> name), background excluded; got {classes}.")
    first = series.datasets[0]
    lps = lps_to_ras(np.asarray(series.volume.affine, dtype=np.float64))  # voxel -> LPS mm (the map is its own inverse)
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = RTStructureSetStorage
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 192") or "ISO_IR 192"
    for keyword in _COPIED:
        setattr(ds, keyword, first.get(keyword, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9801
    ds.SeriesDescription = series_description[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = "medseg"
    ds.ManufacturerModelName = algorithm_name[:64]
    ds.SoftwareVersions = algorithm_version[:64]
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "medseg"
    ds.StructureSetName = algorithm_name[:64]
    ds.StructureSetDescription = f"model_uri={model_uri}"[:1024]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.StructureSetDate, ds.StructureSetTime
    ds.ApprovalStatus = "UNAPPROVED"  # an algorithm's structures, for a person to review

    images = [_image_reference(d) for d in series.datasets]
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, as PS3.3 C.8.8.5 asks
    study.ReferencedSOPInstanceUID = str(first.StudyInstanceUID)
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = str(first.SeriesInstanceUID)
    referenced_series.ContourImageSequence = Sequence(images)
    study.RTReferencedSeriesSequence = Sequence([referenced_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = str(first.FrameOfReferenceUID)
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])

    rois, contours_of_rois, observations = [], [], []
    for number, (value, name) in enumerate(sorted(classes.items()), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = str(first.FrameOfReferenceUID)
        roi.ROIName = str(name)[:64]
        roi.ROIDescription = _LABEL_VALUE_TEXT.format(int(value))
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        item = Dataset()
        item.ROIDisplayColor = list(_COLOURS[(number - 1) % len(_COLOURS)])
        item.ReferencedROINumber = number
        contours = []
        for k in range(mask.shape[2]):
            for polygon in mask_contours(mask[:, :, k] == value):
                voxels = np.column_stack([polygon, np.full(len(polygon), k), np.ones(len(polygon))])
                world = (lps @ voxels.T).T[:, :3]
                contour = Dataset()
                contour.ContourImageSequence = Sequence([_image_reference(series.datasets[k])])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(world)
                contour.ContourData = [f"{v:.4f}" for v in world.ravel()]
                contours.append(contour)
        if contours:
            item.ContourSequence = Sequence(contours)
        contours_of_rois.append(item)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours_of_rois)
    ds.RTROIObservationsSequence = Sequence(observations)
    with atomic_path(path, suffix=".dcm") as temporary:
        ds.save_as(temporary, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def _image_reference(dataset: Dataset) -> Dataset:
    reference = Dataset()
    reference.ReferencedSOPClassUID = str(dataset.SOPClassUID)
    reference.ReferencedSOPInstanceUID = str(dataset.SOPInstanceUID)
    return reference


def read_rtstruct(path: str | os.PathLike, series: DicomSeries) -> np.ndarray:
    """The label map (X, Y, Z, uint8) of a structure set over its source series, each ROI's
    contours filled with the even-odd rule on the slice they reference; label values from each
    ROI's description where medseg wrote it, else the ROI number. A later ROI wins a voxel
    that two claim.

    Raises:
        DicomRtstructError: not a structure set, another Frame of Reference, or a contour on
            no slice of the series.
    """
    import pydicom

    path = Path(path)
    ds = pydicom.dcmread(path)
    if str(ds.get("SOPClassUID", "")) != RTStructureSetStorage:
        raise DicomRtstructError(f"{path}: not an RT Structure Set ({ds.get('SOPClassUID', 'no SOP class')}).")
    shape = series.volume.data.shape
    out = np.zeros(shape, dtype=np.uint8)
    slices = {str(d.SOPInstanceUID): k for k, d in enumerate(series.datasets)}
    ras_to_voxel = np.linalg.inv(np.asarray(series.volume.affine, dtype=np.float64)) @ lps_to_ras(np.eye(4))
    values = {}
    for roi in ds.get("StructureSetROISequence", []):
        match = _LABEL_VALUE.match(str(roi.get("ROIDescription", "")))
        values[int(roi.ROINumber)] = int(match.group(1)) if match else int(roi.ROINumber)
    for item in ds.get("ROIContourSequence", []):
        value = values.get(int(item.ReferencedROINumber), int(item.ReferencedROINumber))
        per_slice: dict[int, list[np.ndarray]] = defaultdict(list)
        for contour in item.get("ContourSequence", []):
            world = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            voxels = (ras_to_voxel @ np.column_stack([world, np.ones(len(world))]).T).T[:, :3]
            k = int(round(float(np.median(voxels[:, 2]))))
            images = contour.get("ContourImageSequence") or []
            if images and str(images[0].ReferencedSOPInstanceUID) in slices:
                k = slices[str(images[0].ReferencedSOPInstanceUID)]
            if not 0 <= k < shape[2]:
                raise DicomRtstructError(f"{path}: a contour of ROI {item.ReferencedROINumber} lies on no slice of the series.")
            per_slice[k].append(voxels[:, :2])
        for k, polygons in per_slice.items():
            out[:, :, k][_even_odd_fill(polygons, shape[:2])] = value
    return out
