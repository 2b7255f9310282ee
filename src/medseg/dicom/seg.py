"""Writing and reading DICOM Segmentation (SEG) objects over a DICOM series, with highdicom.

A SEG is what a PACS or a DICOM viewer (OHIF, 3D Slicer, Horos) overlays on the series it was
made from: it references every source instance by UID and places each frame by the source
slice's position, so it is only ever written over a :class:`~medseg.dicom.series.DicomSeries`
whose voxel grid the mask shares.

What the SEG holds:

- one segment per class of `classes` (background 0 excluded), numbered 1..K in ascending label
  value, as DICOM requires; each segment's Segment Description (0062,0006) reads
  `medseg label value N`, so that :func:`read_dicom_seg` restores the dataset's own label
  values even when they are not 1..K;
- a coded category and type per segment: SNOMED CT where the class name names a structure of
  :data:`SEGMENT_CODES` (liver, kidney, hippocampus, tumour...), else the generic category
  Tissue and type Tissue (SCT 85756007), which claims nothing about what was segmented;
- segment algorithm type AUTOMATIC, identified by family Artificial Intelligence (DCM 123110),
  the algorithm's name and version, and the model URI in AlgorithmParameters as
  `model_uri=<uri>` (an LT value: a `runs:/` URI can exceed the 64 characters of
  SeriesDescription or ContentDescription);
- BINARY frames by default (what every viewer reads); FRACTIONAL (PROBABILITY, 8-bit) when
  asked, from the model's probabilities; LABELMAP (DICOM 2024c) when asked, one frame per
  slice holding segment numbers, for viewers that show label maps;
- one frame per slice and segment that holds something: the frame over `series.datasets[k]`
  is `mask[:, :, k]` transposed (DICOM frames are rows x columns; medseg's axis 0 runs along
  the columns), placed at that slice's ImagePositionPatient.

The file is written to a temporary file beside the target, then renamed onto it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from medseg.dicom.series import (
    ORIENTATION_TOLERANCE,
    SLICE_GAP_ABSOLUTE_TOLERANCE_MM,
    DicomError,
    DicomSeries,
)
from medseg.dicom.uids import refuse_missing_uids
from medseg.storage.publishing import atomic_path

__all__ = [
    "DicomSegError",
    "GENERIC_SEGMENT_CODE",
    "SEGMENT_CODES",
    "SegmentCode",
    "read_dicom_seg",
    "segment_code",
    "write_dicom_seg",
]


class DicomSegError(DicomError):
    """A mask that cannot become a SEG over its series, or a SEG that cannot be read over it."""


@dataclass(frozen=True)
class SegmentCode:
    """The coded meaning of a segment: Segmented Property Category and Type."""

    category: Code
    type: Code


_ABNORMAL = codes.SCT.MorphologicallyAbnormalStructure
_ANATOMY = codes.SCT.AnatomicalStructure

# Class-name words to codes, matched in this order, so that "liver tumour" is a neoplasm and
# "portal vein" is not just a vein: morphologic abnormalities first, then longer names first.
SEGMENT_CODES: tuple[tuple[tuple[str, ...], SegmentCode], ...] = (
    (("tumor", "tumour", "neoplasm", "cancer", "carcinoma", "malignancy", "metastasis", "metastases"),
     SegmentCode(_ABNORMAL, codes.SCT.Neoplasm)),
    (("lesion", "lesions"), SegmentCode(_ABNORMAL, codes.SCT.Lesion)),
    (("edema", "oedema"), SegmentCode(_ABNORMAL, codes.SCT.Edema)),
    (("necrosis", "necrotic"), SegmentCode(_ABNORMAL, codes.SCT.Necrosis)),
    (("cyst", "cysts"), SegmentCode(_ABNORMAL, codes.SCT.Cyst)),
    (("nodule", "nodules"), SegmentCode(_ABNORMAL, codes.SCT.Nodule)),
    (("mass",), SegmentCode(_ABNORMAL, codes.SCT.Mass)),
    (("peripheral zone", "pz"), SegmentCode(_ANATOMY, codes.SCT.PeripheralZoneOfTheProstate)),
    (("transition zone", "tz"), SegmentCode(_ANATOMY, codes.SCT.TransitionZoneOfTheProstate)),
    (("left atrium",), SegmentCode(_ANATOMY, codes.SCT.LeftAtrium)),
    (("left ventricle",), SegmentCode(_ANATOMY, codes.SCT.LeftVentricle)),
    (("right ventricle",), SegmentCode(_ANATOMY, codes.SCT.RightVentricle)),
    (("portal vein",), SegmentCode(_ANATOMY, codes.SCT.PortalVein)),
    (("hepatic vein",), SegmentCode(_ANATOMY, codes.SCT.HepaticVein)),
    (("brain stem", "brainstem"), SegmentCode(_ANATOMY, codes.SCT.BrainStem)),
    (("spinal cord",), SegmentCode(_ANATOMY, codes.SCT.SpinalCord)),
    (("adrenal gland", "adrenal"), SegmentCode(_ANATOMY, codes.SCT.AdrenalGland)),
    (("hippocampus", "hippocampi"), SegmentCode(_ANATOMY, codes.SCT.Hippocampus)),
    (("cerebellum",), SegmentCode(_ANATOMY, codes.SCT.Cerebellum)),
    (("brain",), SegmentCode(_ANATOMY, codes.SCT.Brain)),
    (("liver",), SegmentCode(_ANATOMY, codes.SCT.Liver)),
    (("spleen",), SegmentCode(_ANATOMY, codes.SCT.Spleen)),
    (("kidney", "kidneys"), SegmentCode(_ANATOMY, codes.SCT.Kidney)),
    (("lung", "lungs"), SegmentCode(_ANATOMY, codes.SCT.Lung)),
    (("heart",), SegmentCode(_ANATOMY, codes.SCT.Heart)),
    (("prostate",), SegmentCode(_ANATOMY, codes.SCT.Prostate)),
    (("pancreas",), SegmentCode(_ANATOMY, codes.SCT.Pancreas)),
    (("colon",), SegmentCode(_ANATOMY, codes.SCT.Colon)),
    (("stomach",), SegmentCode(_ANATOMY, codes.SCT.Stomach)),
    (("gallbladder",), SegmentCode(_ANATOMY, codes.SCT.Gallbladder)),
    (("esophagus", "oesophagus"), SegmentCode(_ANATOMY, codes.SCT.Esophagus)),
    (("duodenum",), SegmentCode(_ANATOMY, codes.SCT.Duodenum)),
    (("aorta",), SegmentCode(_ANATOMY, codes.SCT.Aorta)),
    (("bladder",), SegmentCode(_ANATOMY, codes.SCT.Bladder)),
    (("trachea",), SegmentCode(_ANATOMY, codes.SCT.Trachea)),
    (("thyroid",), SegmentCode(_ANATOMY, codes.SCT.Thyroid)),
    (("rectum",), SegmentCode(_ANATOMY, codes.SCT.Rectum)),
    (("uterus",), SegmentCode(_ANATOMY, codes.SCT.Uterus)),
    (("vessel", "vessels"), SegmentCode(_ANATOMY, codes.SCT.BloodVessel)),
    (("artery", "arteries"), SegmentCode(_ANATOMY, codes.SCT.Artery)),
    (("vein", "veins"), SegmentCode(_ANATOMY, codes.SCT.Vein)),
    (("bone", "bones"), SegmentCode(_ANATOMY, codes.SCT.Bone)),
    (("muscle", "muscles"), SegmentCode(_ANATOMY, codes.SCT.Muscle)),
)
# For a class name that names none of the above: "some tissue", nothing more claimed.
GENERIC_SEGMENT_CODE = SegmentCode(codes.SCT.Tissue, codes.SCT.Tissue)

# Segment Description (0062,0006) of a segment medseg wrote, holding the dataset's label value.
_LABEL_VALUE_TEXT = "medseg label value {}"
LABEL_VALUE_PATTERN = re.compile(r"^medseg label value (\d+)$")
# A FRACTIONAL voxel belongs to its most probable segment when that probability reaches this.
_FRACTIONAL_THRESHOLD = 0.5


def segment_code(name: str) -> SegmentCode:
    """The coded category and type for a class named `name` (case, `_` and `-` ignored): the
    first entry of :data:`SEGMENT_CODES` with a word or phrase in the name, else
    :data:`GENERIC_SEGMENT_CODE`."""
    words = " " + " ".join(re.split(r"[^a-z0-9]+", name.lower())).strip() + " "
    for keys, code in SEGMENT_CODES:
        if any(f" {key} " in words for key in keys):
            return code
    return GENERIC_SEGMENT_CODE


def write_dicom_seg(
    mask: np.ndarray,
    series: DicomSeries,
    classes: dict[int, str],
    *,
    algorithm_name: str,
    algorithm_version: str,
    model_uri: str,
    fractional: bool = False,
    probabilities: np.ndarray | None = None,
    labelmap: bool = False,
    path: str | os.PathLike,
    series_number: int = 1000,
    series_description: str | None = None,
) -> str:
    """Write a DICOM SEG of `mask` over `series`, atomically, and return its SOPInstanceUID.

    Args:
        mask: (X, Y, Z) label map in the series' voxel grid (the shape of `series.volume.data`),
            integer values: 0 background, else a key of `classes`.
        series: the series the mask was predicted on; its datasets (in slice order) become the
            SEG's source images, frame k of the SEG covering `series.datasets[k]`.
        classes: label value -> class name, background (0) excluded; every class becomes a
            segment, an empty one too (a segment with no frames: "looked for, not found").
        algorithm_name, algorithm_version: the Segment Algorithm Name and the algorithm's
            version (e.g. "medseg unet", "0.1.0").
        model_uri: the model that made the mask (`runs:/...`, `models:/...`), stored in each
            segment's AlgorithmParameters as `model_uri=<uri>`.
        fractional: write a FRACTIONAL (PROBABILITY) SEG from `probabilities` instead of a
            BINARY one from `mask` (then `mask` only has its shape checked).
        probabilities: (X, Y, Z, K) in [0, 1], channel k for the k-th class in ascending label
            value; (X, Y, Z, K + 1) is accepted too, channel 0 then being background and dropped.
            Stored with 8 bits (steps of 1/255).
        labelmap: write a LABELMAP SEG (DICOM 2024c, Supplement 243): one frame per slice whose
            pixels hold segment numbers, for viewers that show label maps, instead of a BINARY
            one (a frame per slice and segment).
        path: the SEG file to write (`.dcm`); its folder is created. Written to a temporary file
            beside it, then renamed: a failure leaves no half-written SEG.
        series_number: SeriesNumber of the SEG's new series.
        series_description: SeriesDescription; default `<algorithm_name> segmentation`
            (64 characters at most).

    Returns:
        The SEG's SOPInstanceUID.

    Raises:
        DicomSegError: a mask of another shape than the series, values not in `classes`, an
            empty `classes`, a background key, probabilities of the wrong shape or range, or
            `fractional` without probabilities.
    """
    mask = np.asarray(mask)
    shape = series.volume.data.shape
    what = f"the SEG for series {series.series_uid or '(no UID)'} ({series.description or 'no description'!r}) at {path}"
    refuse_missing_uids(series, what, DicomSegError)
    if mask.shape != shape:
        raise DicomSegError(
            f"{what}: the mask has shape {mask.shape}, the series {shape} (X, Y, Z); a SEG covers the series' own "
            "voxel grid. Map the prediction back to the series' geometry before writing it."
        )
    if not classes:
        raise DicomSegError(f"{what}: no classes to write. Pass the dataset's labels (value -> name), background excluded.")
    if 0 in classes:
        raise DicomSegError(
            f"{what}: classes holds the background value 0 ({classes[0]!r}); a SEG has no background segment. Drop it."
        )
    if any(not isinstance(value, (int, np.integer)) or value < 0 for value in classes):
        raise DicomSegError(f"{what}: class values must be positive integers, got {sorted(classes)}.")
    if not np.issubdtype(mask.dtype, np.integer) and not np.issubdtype(mask.dtype, np.bool_):
        raise DicomSegError(f"{what}: the mask is {mask.dtype}; a label map holds integer class values. Threshold it first.")
    values = sorted(int(v) for v in classes)
    present = set(np.unique(mask).tolist()) - {0}
    unknown = sorted(present - set(values))
    if unknown:
        raise DicomSegError(
            f"{what}: the mask holds values {unknown} that are not in classes {classes}. Pass every class the model "
            "predicts, or relabel the mask."
        )
    numbers = {value: number for number, value in enumerate(values, start=1)}
    # Frame k is slice k of axis 2, its rows along axis 1 and its columns along axis 0.
    segmentation_type = hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY
    if fractional and labelmap:
        raise DicomSegError(f"{what}: a SEG is FRACTIONAL or LABELMAP, not both. Choose one.")
    if fractional:
        pixels = _fractional_frames(probabilities, shape, len(values), what)
        segmentation_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        lookup = np.zeros(max(values) + 1, dtype=np.uint16)
        for value, number in numbers.items():
            lookup[value] = number
        pixels = np.ascontiguousarray(np.transpose(lookup[mask.astype(np.int64)], (2, 1, 0)))
        # Segment numbers above 255 need 16 bits; highdicom reads a label map's dtype as given.
        pixels = pixels.astype(np.uint8 if len(values) < 256 else np.uint16)

    descriptions = []
    for value, number in numbers.items():
        code = segment_code(classes[value])
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(classes[value])[:64],
            segmented_property_category=code.category,
            segmented_property_type=code.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=algorithm_name[:64],
                family=codes.DCM.ArtificialIntelligence,
                version=algorithm_version[:64],
                parameters={"model_uri": model_uri},
            ),
        )
        description.SegmentDescription = _LABEL_VALUE_TEXT.format(value)
        descriptions.append(description)

    sop_instance_uid = generate_uid()
    try:
        seg = hd.seg.Segmentation(
            source_images=series.datasets,
            pixel_array=pixels,
            segmentation_type=segmentation_type,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(),
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer="medseg",
            manufacturer_model_name=algorithm_name[:64],
            software_versions=algorithm_version[:64],
            device_serial_number="0",
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            max_fractional_value=255,
            content_description=f"{algorithm_name} {algorithm_version}"[:64],
            content_label="SEGMENTATION",
            series_description=(series_description or f"{algorithm_name} segmentation")[:64],
        )
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom on source metadata it cannot use
        raise DicomSegError(
            f"{what}: highdicom refused to build the SEG ({type(exc).__name__}: {exc}). The source series lacks "
            "metadata a SEG must copy or reference; check that it was read whole with read_dicom_series."
        ) from exc
    path = Path(path)
    with atomic_path(path, ".dcm") as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return sop_instance_uid


def _fractional_frames(
    probabilities: np.ndarray | None, shape: tuple[int, ...], n_classes: int, what: str
) -> np.ndarray:
    """(Z, rows, columns, K) float32 frames from (X, Y, Z, K) or (X, Y, Z, K + 1) probabilities."""
    if probabilities is None:
        raise DicomSegError(f"{what}: fractional=True needs the probabilities (X, Y, Z, K); pass them, or write a BINARY SEG.")
    probabilities = np.asarray(probabilities, dtype=np.float32)
    channels = probabilities.shape[3] if probabilities.ndim == 4 else None
    if probabilities.shape[:3] != tuple(shape) or channels not in (n_classes, n_classes + 1):
        raise DicomSegError(
            f"{what}: probabilities of shape {probabilities.shape}; expected {tuple(shape) + (n_classes,)} (one channel "
            f"per class) or {tuple(shape) + (n_classes + 1,)} (background first)."
        )
    if probabilities.shape[3] == n_classes + 1:
        probabilities = probabilities[..., 1:]
    if not np.all(np.isfinite(probabilities)) or probabilities.min(initial=0) < 0 or probabilities.max(initial=0) > 1:
        raise DicomSegError(f"{what}: probabilities must be finite and within [0, 1]. Pass the softmax or sigmoid output.")
    return np.ascontiguousarray(np.transpose(probabilities, (2, 1, 0, 3)))


def read_dicom_seg(path: str | os.PathLike, series: DicomSeries, classes: dict[int, str] | None = None) -> np.ndarray:
    """Read a SEG as a label map in `series`' voxel grid.

    Args:
        path: the SEG file.
        series: the series the SEG was made over; its instances are looked up by SOPInstanceUID.
        classes: label value -> class name. When given, each segment's value is the class whose
            name equals its SegmentLabel (case-insensitive), for SEGs written by other tools.
            When None, a segment written by :func:`write_dicom_seg` gets its stored label value,
            any other its segment number.

    Returns:
        (X, Y, Z) uint8 (uint16 above 255) label map, the shape of `series.volume.data`; 0 where
        no segment is. A FRACTIONAL SEG gives each voxel its most probable segment where that
        probability is 0.5 or more. Slices the SEG omits (no segment there) are background.

    Raises:
        DicomSegError: not a readable SEG, a SEG over another series, a frame that does not lie
            exactly on the source slice it references (position, orientation, pixel spacing,
            size), overlapping BINARY segments (no single label per voxel), a SegmentLabel not
            in `classes`.
    """
    what = f"{path} (DICOM SEG over series {series.series_uid})"
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # pydicom and highdicom raise many types for a bad file
        raise DicomSegError(f"{what}: not a readable DICOM SEG ({type(exc).__name__}: {exc}). Check the file.") from exc
    source_uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    if not referenced & set(source_uids):
        raise DicomSegError(
            f"{what}: the SEG references none of the series' {len(source_uids)} instances (it was made over another "
            "series). Read it with the series it references."
        )
    values = _segment_values(seg, classes, what)
    _check_frame_geometry(seg, series, what)
    fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=source_uids,
            combine_segments=not fractional,
            relabel=False,
            # Checked by _check_frame_geometry itself: many SEG writers (dcmqi before 1.2,
            # older vendor tools) omit SpatialLocationsPreserved, which highdicom requires.
            ignore_spatial_locations=True,
            # Slices where no segment is are omitted from a SEG; they read as background.
            assert_missing_frames_are_empty=True,
        )
    except (ValueError, KeyError, RuntimeError) as exc:
        raise DicomSegError(
            f"{what}: its frames cannot be laid over the series ({type(exc).__name__}: {exc}). A BINARY SEG with "
            "overlapping segments has no single label per voxel; read its segments one by one with highdicom."
        ) from exc
    dtype = np.uint8 if max(values.values(), default=0) < 256 else np.uint16
    lookup = np.zeros(max(values, default=0) + 1, dtype=dtype)
    for number, value in values.items():
        lookup[number] = value
    if fractional:
        numbers = np.asarray(seg.get_segment_numbers(), dtype=np.int64)
        best = np.argmax(pixels, axis=-1)
        labels = np.where(np.max(pixels, axis=-1) >= _FRACTIONAL_THRESHOLD, numbers[best], 0)
    else:
        labels = pixels
    return np.ascontiguousarray(np.transpose(lookup[np.asarray(labels, dtype=np.int64)], (2, 1, 0)))


def _check_frame_geometry(seg: hd.seg.Segmentation, series: DicomSeries, what: str) -> None:
    """Refuse a SEG whose frames do not lie exactly on the source slices they reference: same
    position, orientation, pixel spacing and size, so that frame pixel (r, c) is source pixel
    (r, c). A frame over an instance outside `series` is not checked (it is not read)."""
    sources = {str(ds.SOPInstanceUID): ds for ds in series.datasets}
    shared = (seg.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    per_frame = seg.get("PerFrameFunctionalGroupsSequence") or []
    for index, item in enumerate(per_frame[: seg.number_of_frames], start=1):
        references = [
            str(source.ReferencedSOPInstanceUID)
            for derivation in item.get("DerivationImageSequence") or []
            for source in derivation.get("SourceImageSequence") or []
        ]
        for uid in (uid for uid in references if uid in sources):
            source = sources[uid]
            problems = []
            position = _functional(item, shared, "PlanePositionSequence", "ImagePositionPatient")
            orientation = _functional(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
            spacing = _functional(item, shared, "PixelMeasuresSequence", "PixelSpacing")
            if not _close(position, source.get("ImagePositionPatient"), atol=SLICE_GAP_ABSOLUTE_TOLERANCE_MM):
                problems.append(f"position {position} vs {source.get('ImagePositionPatient')}")
            if not _close(orientation, source.get("ImageOrientationPatient"), atol=ORIENTATION_TOLERANCE):
                problems.append(f"orientation {orientation} vs {source.get('ImageOrientationPatient')}")
            if not _close(spacing, source.get("PixelSpacing"), rtol=1e-4):
                problems.append(f"pixel spacing {spacing} vs {source.get('PixelSpacing')}")
            if (int(seg.Rows), int(seg.Columns)) != (int(source.Rows), int(source.Columns)):
                problems.append(f"size {seg.Rows} x {seg.Columns} vs {source.Rows} x {source.Columns}")
            if problems:
                raise DicomSegError(
                    f"{what}: frame {index} does not lie on the source slice it references ({uid}): "
                    f"{'; '.join(problems)}. The SEG was made on another grid; resample it onto the series with a "
                    "tool that reads SEG geometry (e.g. highdicom's get_volume), then read it."
                )


def _functional(item: Dataset, shared: Dataset, sequence: str, keyword: str):
    """An attribute of a frame's functional group, per-frame first, then shared."""
    for group in (item, shared):
        values = group.get(sequence)
        if values and keyword in values[0]:
            return values[0].get(keyword)
    return None


def _close(values, reference, atol: float = 0.0, rtol: float = 0.0) -> bool:
    """Whether two multi-valued DS attributes hold the same numbers; False when either is
    missing or not numeric."""
    try:
        a = np.array([float(v) for v in values], dtype=np.float64)
        b = np.array([float(v) for v in reference], dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return a.shape == b.shape and a.size > 0 and bool(np.allclose(a, b, atol=atol, rtol=rtol))


def _segment_values(seg: hd.seg.Segmentation, classes: dict[int, str] | None, what: str) -> dict[int, int]:
    """Segment number -> label value."""
    by_name = {name.lower(): value for value, name in (classes or {}).items()}
    values = {}
    for number in seg.get_segment_numbers():
        description = seg.get_segment_description(number)
        if classes is not None:
            label = str(description.segment_label)
            if label.lower() not in by_name:
                raise DicomSegError(
                    f"{what}: segment {number} is labelled {label!r}, which is not a class of {classes}. Pass the "
                    "classes the SEG was written with, or None to read segment numbers."
                )
            values[number] = by_name[label.lower()]
            continue
        values[number] = segment_label_value(description, number)
    return values


def segment_label_value(description, number: int) -> int:
    """The label value of a SEG segment: the one medseg wrote in its SegmentDescription
    (`medseg label value N`), else its segment number.

    Args:
        description: the segment's item of SegmentSequence (a pydicom Dataset or highdicom's
            SegmentDescription).
        number: its SegmentNumber.
    """
    match = LABEL_VALUE_PATTERN.match(str(description.get("SegmentDescription", "")))
    return int(match.group(1)) if match else int(number)
