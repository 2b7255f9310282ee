"""Reading one DICOM series as a medseg :class:`~medseg.imaging.io.Volume`.

pydicom reads the files: it is pure Python, highdicom (the SEG writer) needs it anyway, and it
exposes every attribute that must be checked here, where SimpleITK's series reader silently
accepts uneven spacing, missing slices and a tilted gantry.

A series becomes a float32 volume of (X, Y, Z) voxels: array axis 0 runs along the columns of a
slice (the row direction, ImageOrientationPatient[:3]), axis 1 along its rows
(ImageOrientationPatient[3:]), axis 2 across the slices, sorted along the slice normal (row x
column direction). The affine maps voxels to world RAS mm, built from ImagePositionPatient,
ImageOrientationPatient and PixelSpacing, with DICOM's LPS turned into RAS by negating x and y;
`nib.Nifti1Image(volume.data, volume.affine)` overlays the scan in any viewer and places every
voxel where dcm2niix's conversion of the same series places it. RescaleSlope/RescaleIntercept
(or a Modality LUT) are applied, so a CT reads in Hounsfield units; vendor-private scalings
(Philips' MR scale slope) are not.

What is refused, each with a :class:`DicomError` naming the series (UID, description and
number), the source and the fix, rather than read into a volume in the wrong place:

- several image series in the input and no `series_uid` to choose one;
- localizers or scouts (ImageType LOCALIZER), or slices whose orientation differs from the rest;
- slices that are not parallel (ImageOrientationPatient differing by more than 1e-4);
- a gap, a missing slice, uneven spacing or two slices at one position;
- a gantry tilt (slices stepping off their normal): refused, not resampled; dcm2niix corrects it;
- fewer than 2 slices: the slice spacing of a single slice is unknown (SliceThickness is not
  a spacing), and the models segment volumes;
- multi-frame (enhanced) instances, which keep their geometry per frame;
- a compressed transfer syntax whose decoder is not installed (the message names the package);
- a missing PixelSpacing or ImagePositionPatient;
- a corrupt or truncated file anywhere in the input (which series it belonged to is unknown);
- more voxels than :func:`medseg.storage.limits.limits` allows, checked before any is allocated.

Instances that hold no image to segment (SEG, RTSTRUCT, RTDOSE, SR, presentation states,
a DICOMDIR...) are skipped: they are not series to choose among, and :attr:`DicomSeries.skipped`
lists them. A second copy of one SOP instance (same SOPInstanceUID) is skipped likewise.

Tolerances (module constants): one orientation within 1e-4 per direction cosine; gaps and slice
positions within max(1 % of the median gap, 0.02 mm) of a regular grid (a gap of about n times
the median is named as n - 1 missing slices); the slices' step off their normal within a tangent
of 1e-3 (0.057 degrees) before it counts as a gantry tilt.

A zip is read in memory, member by member as a stream, never extracted: it may hold at most
:data:`MAX_ZIP_MEMBERS` members and :attr:`Limits.max_scan_bytes` inflated bytes, no member
(above 1 MiB) nor the whole (above 64 MiB) may inflate more than :data:`MAX_COMPRESSION_RATIO`
times, all checked on its declared sizes before anything is inflated, and a member named with
an absolute path or `..` refuses the archive. A header is read from the member's first bytes,
before its pixels; a `.dcm` member without the DICM preamble must begin with a DICOM element.
"""

from __future__ import annotations

import io
import logging
import math
import os
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NamedTuple, Union

import numpy as np
import pydicom
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.pixels.decoders.base import get_decoder

from medseg.errors import CorruptFileError, DatasetNotFoundError, InvalidGeometryError, MedsegError
from medseg.imaging.io import Volume, check_affine
from medseg.storage.limits import describe, limits

logger = logging.getLogger(__name__)

__all__ = [
    "DicomArchiveError",
    "DicomDecoderError",
    "DicomError",
    "DicomFileError",
    "DicomGeometryError",
    "DicomSeries",
    "DicomSeriesError",
    "DicomSource",
    "MAX_COMPRESSION_RATIO",
    "NON_IMAGE_MODALITIES",
    "MAX_ZIP_MEMBERS",
    "ORIENTATION_TOLERANCE",
    "SLICE_GAP_ABSOLUTE_TOLERANCE_MM",
    "SLICE_GAP_RELATIVE_TOLERANCE",
    "SOURCE_UIDS",
    "SeriesCheck",
    "TILT_TOLERANCE",
    "is_dicom_input",
    "lps_to_ras",
    "read_dicom_series",
]


class DicomError(MedsegError):
    """Base class of the errors raised on a DICOM input."""


class DicomSeriesError(DicomError):
    """The input holds no single series to read: none, several and none chosen, an unknown
    `series_uid`, or a series with localizers or another acquisition mixed in."""


class DicomGeometryError(DicomError, InvalidGeometryError):
    """A series whose slices do not form one regular grid: not parallel, a gap, uneven spacing,
    duplicate positions, a gantry tilt, a single slice, or missing geometry attributes."""


class DicomFileError(DicomError, CorruptFileError):
    """A file that cannot be read as a DICOM image: corrupt, truncated, multi-frame, colour."""


class DicomDecoderError(DicomError):
    """Compressed pixel data whose decoder (a Python package) is not installed."""


class DicomArchiveError(DicomError):
    """A zip that is unreadable, too large once inflated, or names a member outside itself."""


# A source of DICOM files: a folder (searched recursively), a zip file, a single file, the bytes
# of a zip, or a list of file paths.
DicomSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Sequence[Union[str, os.PathLike]]]

# Part 10 files carry b"DICM" after a 128-byte preamble (PS3.10 7.1).
DICOM_MAGIC = b"DICM"
DICOM_MAGIC_OFFSET = 128

# Two ImageOrientationPatient values within this (per direction cosine) are one orientation:
# DS strings round cosines at ~1e-6, and a real change of plane moves them by far more.
ORIENTATION_TOLERANCE = 1e-4
# A gap between neighbouring slices may differ from the median gap, and a slice may lie off the
# regular grid that the affine describes, by at most max(1 % of the median gap, 0.02 mm):
# 0.02 mm covers positions written with only two decimals (each rounded by up to 0.005 mm), and
# 1 % of a voxel misplaces nothing a model or a metric could notice.
SLICE_GAP_RELATIVE_TOLERANCE = 0.01
SLICE_GAP_ABSOLUTE_TOLERANCE_MM = 0.02
# The slices may step off their normal (gantry tilt) by at most this tangent (0.057 degrees):
# more, and the volume would need a sheared affine, which NIfTI's qform, ITK and most tools drop.
TILT_TOLERANCE = 1e-3
# A CT study of several thin-slice series holds a few thousand files; 100 000 is beyond any
# real archive and bounds the memory that the member list alone may take.
MAX_ZIP_MEMBERS = 100_000
# A zip may inflate at most this many times its compressed size, member by member and as a
# whole, checked on the sizes its headers declare before anything is inflated. A CT or MR export
# deflates by 2 to 10 (air and padding compress well); JPEG series by about 1; 1000:1 is only
# reached by blocks of zeros, the zip bomb's trick. Members and archives that inflate to less
# than the floors below are not checked: they cost little whatever their ratio.
MAX_COMPRESSION_RATIO = 100
_RATIO_FLOOR_MEMBER = 2**20
_RATIO_FLOOR_ARCHIVE = 64 * 2**20
# Tag groups a DICOM file without the DICM preamble may start with: File Meta (0002) or the
# identifying group (0008) of an old export; anything else (a block of zeros) is not DICOM.
_FIRST_GROUPS = (0x0002, 0x0008)

# The UIDs a DICOM output (SEG, RTSTRUCT) needs from each source instance to reference it and to
# place its frames or contours (the Frame of Reference).
SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
# How instances without a SeriesInstanceUID are grouped into series, as dcm2niix does: what
# they do share (the key of a blank series is built from these, never from a position).
_BLANK_SERIES_KEYS = ("FrameOfReferenceUID", "ImageOrientationPatient", "Rows", "Columns", "PixelSpacing", "Modality",
                      "SeriesNumber", "SeriesDescription")

# LPS (DICOM's patient coordinates) to RAS (NIfTI's, medseg's): x and y change sign.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Modalities whose instances hold no image to segment, even when they carry pixel data (a SEG's
# frames, an RTDOSE grid): skipped like the SOP classes below.
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"})

# What to install for each compressed transfer syntax whose decoder is missing or failed.
_PYLIBJPEG_LIBJPEG = "`pip install pylibjpeg pylibjpeg-libjpeg` (or `pip install python-gdcm`)"
_PYLIBJPEG_OPENJPEG = "`pip install pylibjpeg pylibjpeg-openjpeg` (or `pip install python-gdcm`)"
_DECODER_PACKAGES = {
    dicom_uid.JPEGBaseline8Bit: _PYLIBJPEG_LIBJPEG,
    dicom_uid.JPEGExtended12Bit: _PYLIBJPEG_LIBJPEG + "; Pillow decodes 8-bit samples only",
    dicom_uid.JPEGLossless: _PYLIBJPEG_LIBJPEG,
    dicom_uid.JPEGLosslessSV1: _PYLIBJPEG_LIBJPEG,
    dicom_uid.JPEGLSLossless: "`pip install pyjpegls` (or `pip install pylibjpeg pylibjpeg-libjpeg`, or python-gdcm)",
    dicom_uid.JPEGLSNearLossless: "`pip install pyjpegls` (or `pip install pylibjpeg pylibjpeg-libjpeg`, or python-gdcm)",
    dicom_uid.JPEG2000Lossless: _PYLIBJPEG_OPENJPEG,
    dicom_uid.JPEG2000: _PYLIBJPEG_OPENJPEG,
    dicom_uid.HTJ2KLossless: "`pip install pylibjpeg pylibjpeg-openjpeg`",
    dicom_uid.HTJ2KLosslessRPCL: "`pip install pylibjpeg pylibjpeg-openjpeg`",
    dicom_uid.HTJ2K: "`pip install pylibjpeg pylibjpeg-openjpeg`",
    dicom_uid.RLELossless: "`pip install pylibjpeg pylibjpeg-rle`",
}
_ANY_DECODER = (
    "`pip install python-gdcm`, or convert the series to an uncompressed transfer syntax "
    "(dcmtk `dcmdjpeg`, gdcm `gdcmconv --raw`)"
)


@dataclass
class DicomSeries:
    """One DICOM series read as a volume, with the source instances' metadata.

    Attributes:
        volume: the image, data (X, Y, Z) float32 (modality LUT applied: Hounsfield units for
            CT), affine (4, 4) voxel to world RAS mm, header None. Axis 0 follows the columns of
            a slice, axis 1 its rows, axis 2 the slices sorted along the slice normal.
        datasets: the series' instances in the order of axis 2, their pixel data removed (the
            voxels are in `volume.data`); the rest of each dataset is as read, which a DICOM
            SEG needs for its references and its patient and study modules.
        series_uid, study_uid: SeriesInstanceUID and StudyInstanceUID.
        modality: Modality (CT, MR, PT...).
        description: SeriesDescription, "" when absent.
        source: the input as given (a path, `<zip bytes>`), for messages.
        files: where each instance of `datasets` came from (a path, or `archive.zip!member`).
        skipped: what was left out, one `name: reason` each (non-image instances, copies).
        missing_uids: the UIDs that some instance lacks, of :data:`SOURCE_UIDS` (in that order),
            as anonymisers leave them: such a series is grouped as dcm2niix groups it (see
            :func:`read_dicom_series`) and gets its mask, but a SEG or RTSTRUCT cannot reference
            it until new UIDs are given (:func:`medseg.dicom.uids.with_generated_uids`).
    """

    volume: Volume
    datasets: list[Dataset]
    series_uid: str
    study_uid: str
    modality: str
    description: str
    source: str = ""
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing_uids: tuple[str, ...] = ()


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """A (4, 4) voxel-to-world matrix in LPS mm as one in RAS mm, or back (the map is its own
    inverse): the x and y rows change sign."""
    return _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)


def is_dicom_input(path: str | os.PathLike) -> bool:
    """Whether `path` looks like DICOM input that :func:`read_dicom_series` can take.

    True for a folder holding at least one DICOM file at any depth, a `.dcm` or `.zip` file,
    or any file with the `DICM` magic at byte 128. A zip's members are not opened. False for
    what does not exist, and for NIfTI files.
    """
    path = Path(path)
    if path.is_dir():
        for folder, _, names in os.walk(path):
            if any(_looks_like_dicom_file(Path(folder) / name) for name in sorted(names)):
                return True
        return False
    if not path.is_file():
        return False
    return path.suffix.lower() in (".dcm", ".zip") or _has_magic_file(path)


def read_dicom_series(source: DicomSource, series_uid: str | None = None) -> DicomSeries:
    """Read one series from a folder, a zip or a list of files as a float32 volume.

    Args:
        source: a folder (series folders or loose files, searched recursively; a file counts as
            DICOM when it has the `DICM` magic at byte 128 or a `.dcm` name), a `.zip` file, the
            bytes of a zip, a single DICOM file, or a list of DICOM file paths. Files that are
            not DICOM (a README, `.DS_Store`, macOS `._*` forks) are ignored.
        series_uid: the SeriesInstanceUID to read when the input holds several image series;
            None reads the only one and refuses several.

    Returns:
        The series: volume (X, Y, Z) float32 with its RAS affine, the datasets in slice order,
        UIDs, modality, description; see :class:`DicomSeries` for the axes.

    Raises:
        DicomSeriesError: no image series, several and no `series_uid`, an unknown `series_uid`,
            localizers or slices of another orientation mixed in.
        DicomGeometryError: slices not parallel, a gap or missing slice, uneven spacing,
            duplicate positions, a gantry tilt, fewer than 2 slices, missing PixelSpacing or
            ImagePositionPatient, slices of different sizes, more voxels than the limits.
        DicomFileError: a corrupt or truncated file, a multi-frame or colour image.
        DicomDecoderError: compressed pixel data whose decoder is not installed.
        DicomArchiveError: a bad zip, too many members or inflated bytes, an unsafe member name.
        DatasetNotFoundError: a path (or a listed file) that does not exist.
    """
    label, members = _members_of(source)
    instances, skipped = _scan_headers(members, label)
    chosen = _choose_series(instances, series_uid, label)
    chosen, copies = _drop_copies(chosen)
    skipped.extend(copies)
    what = _series_name(chosen[0].header, label)
    _check_instances(chosen, what)
    ordered, affine = _slice_geometry(chosen, what)
    check_affine(affine, what)
    data, datasets = _read_voxels(ordered, what)
    first = ordered[0].header
    missing = _missing_uids(ordered)
    if missing:
        logger.warning(
            "%s: %s %s blank in some or all instances, as anonymisers leave them; its instances were grouped by "
            "Frame of Reference, orientation and size, as dcm2niix groups them. It gets its NIfTI mask; a SEG or "
            "RTSTRUCT needs these UIDs (predict.generate_missing_uids gives it new ones).",
            what, ", ".join(missing), "is" if len(missing) == 1 else "are",
        )
    return DicomSeries(
        volume=Volume(data=data, affine=affine, header=None),
        datasets=datasets,
        series_uid=str(first.get("SeriesInstanceUID", "") or ""),
        study_uid=str(first.get("StudyInstanceUID", "")),
        modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "")),
        source=label,
        files=[instance.name for instance in ordered],
        skipped=skipped,
        missing_uids=missing,
    )


class SeriesCheck(NamedTuple):
    """What :func:`check_dicom_series` found: the series' UID ("" when blank) and the UIDs of
    :data:`SOURCE_UIDS` that its instances lack."""

    series_uid: str
    missing_uids: tuple[str, ...]


def check_dicom_series(source: DicomSource, series_uid: str | None = None) -> SeriesCheck:
    """Every check of :func:`read_dicom_series` that the headers allow (the series chosen,
    localizers, orientation, gaps, tilt, sizes against the limits, decoders), without decoding
    a pixel: what `predict` runs on every input before it segments the first.

    Returns:
        The SeriesInstanceUID of the series that would be read ("" when blank), and the UIDs
        its instances lack.

    Raises:
        The errors of :func:`read_dicom_series`, but for a file whose pixel data is corrupt.
    """
    label, members = _members_of(source)
    instances, _ = _scan_headers(members, label)
    chosen, _ = _drop_copies(_choose_series(instances, series_uid, label))
    what = _series_name(chosen[0].header, label)
    _check_instances(chosen, what)
    ordered, affine = _slice_geometry(chosen, what)
    check_affine(affine, what)
    _check_decoders(ordered, what)
    return SeriesCheck(str(ordered[0].header.get("SeriesInstanceUID", "") or ""), _missing_uids(ordered))


# --- sources --------------------------------------------------------------------------------------


@dataclass
class _Member:
    """One candidate file: its name for messages, and how to get a fresh readable handle."""

    name: str
    open: Callable[[], str | BinaryIO]
    magic: bool


@dataclass
class _Instance:
    member: _Member
    header: Dataset  # read with stop_before_pixels

    @property
    def name(self) -> str:
        return self.member.name


def _members_of(source: DicomSource) -> tuple[str, list[_Member]]:
    """The candidate DICOM files of `source` and its name for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<zip bytes>", _zip_members(bytes(source), "<zip bytes>")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = str(path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not _is_os_litter(p.name))
            members = [m for m in (_file_member(p) for p in files) if m is not None]
            if not members:
                raise DicomSeriesError(
                    f"{label}: no DICOM files in this folder or below it ({len(files)} other "
                    f"file{'s' if len(files) != 1 else ''}). "
                    "Point to the folder of the exported series (files with the DICM magic or a .dcm name), "
                    "or to a .zip of it."
                )
            return label, members
        if not path.is_file():
            raise DatasetNotFoundError(f"{label}: no such file or folder. Check the path to the DICOM series.")
        if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path) and not _has_magic_file(path):
            return label, _zip_members(path, label)
        return label, [_file_member(path, force=True)]
    paths = [Path(p) for p in source]
    label = f"{len(paths)} files ({paths[0]}...)" if paths else "an empty list of files"
    if not paths:
        raise DicomSeriesError("an empty list of files was given as a DICOM series. Give the series' files or folder.")
    for p in paths:
        if not p.is_file():
            raise DatasetNotFoundError(f"{p}: no such file (listed as part of a DICOM series). Check the list of files.")
    return label, [_file_member(p, force=True) for p in paths]


def _is_os_litter(name: str) -> bool:
    """macOS resource forks (`._x.dcm`) and folder metadata, which copy along with exports."""
    return name.startswith("._") or name in (".DS_Store", "Thumbs.db")


def _has_magic_file(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            head = stream.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    except OSError:
        return False
    return head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC


def _looks_like_dicom_file(path: Path) -> bool:
    return not _is_os_litter(path.name) and (path.suffix.lower() == ".dcm" or _has_magic_file(path))


def _file_member(path: Path, force: bool = False) -> _Member | None:
    """A local file as a member: any file when `force` (it was named explicitly), else only one
    with the DICM magic or a `.dcm` name."""
    magic = _has_magic_file(path)
    if not (force or magic or path.suffix.lower() == ".dcm"):
        return None
    return _Member(name=str(path), open=lambda: str(path), magic=magic)


def _zip_members(archive_source: bytes | Path, label: str) -> list[_Member]:
    """The DICOM members of a zip (its bytes, or a file read in place), after the checks
    against zip bombs and unsafe names; each member is inflated in memory when read, never
    written to disk."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(archive_source) if isinstance(archive_source, bytes) else archive_source)
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise DicomArchiveError(f"{label}: not a readable zip archive ({exc}). Send the .zip file unchanged.") from exc
    if len(infos) > MAX_ZIP_MEMBERS:
        raise DicomArchiveError(
            f"{label}: the archive lists {len(infos)} members, more than the {MAX_ZIP_MEMBERS} a DICOM export holds. "
            "Refused before reading; zip only the series to segment."
        )
    for info in infos:
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.filename.startswith(("/", "\\")) or (parts and parts[0].endswith(":")) or ".." in parts:
            raise DicomArchiveError(
                f"{label}: the member {info.filename!r} has an absolute path or a '..' component, which points outside "
                "the archive (a zip-slip attack, or a broken archiver). Refused; zip the series folder again."
            )
    budget = limits().max_scan_bytes
    total = sum(info.file_size for info in infos if not info.is_dir())
    if total > budget:
        raise DicomArchiveError(
            f"{label}: the archive inflates to {describe(total, 'bytes')}, above the limit of "
            f"{describe(budget, 'bytes')} (MEDSEG_MAX_SCAN_MB). Refused before inflating; zip only the series to "
            "segment, or raise MEDSEG_MAX_SCAN_MB for a larger one."
        )
    _check_compression_ratios(infos, label)
    members = []
    for info in infos:
        name = PurePosixPath(info.filename)
        if info.is_dir() or "__MACOSX" in name.parts or _is_os_litter(name.name):
            continue
        head = _read_zip_member(archive, info, label, DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
        magic = head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC
        if not magic and name.suffix.lower() == ".dcm" and not _starts_like_dicom(head):
            raise DicomFileError(
                f"{label}!{info.filename}: named .dcm, but it has no DICM preamble and does not begin with a DICOM "
                "element, so it is not a DICOM file. Remove it from the archive, or export the series again."
            )
        if magic or name.suffix.lower() == ".dcm":
            members.append(_Member(name=f"{label}!{info.filename}", open=_zip_opener(archive, info, label), magic=magic))
    if not members:
        raise DicomSeriesError(
            f"{label}: no DICOM files in this zip ({len(infos)} members). Zip the folder of the exported series "
            "(files with the DICM magic or a .dcm name)."
        )
    return members


def _check_compression_ratios(infos: list[zipfile.ZipInfo], label: str) -> None:
    """Refuse a zip whose members, or whole, inflate more than :data:`MAX_COMPRESSION_RATIO`
    times, on the declared sizes (zipfile never inflates a member past its declared size)."""
    files = [info for info in infos if not info.is_dir()]
    for info in files:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > _RATIO_FLOOR_MEMBER and ratio > MAX_COMPRESSION_RATIO:
            raise DicomArchiveError(
                f"{label}: the member {info.filename!r} inflates {ratio:,.0f} times (from {describe(info.compress_size, 'bytes')} "
                f"to {describe(info.file_size, 'bytes')}), above the {MAX_COMPRESSION_RATIO}:1 that no DICOM export comes near. "
                "Refused before inflating (a zip bomb, or a member that is not an image); zip the exported series itself."
            )
    inflated, compressed = sum(i.file_size for i in files), sum(i.compress_size for i in files)
    if inflated > _RATIO_FLOOR_ARCHIVE and inflated > MAX_COMPRESSION_RATIO * max(compressed, 1):
        raise DicomArchiveError(
            f"{label}: the archive inflates {inflated / max(compressed, 1):,.0f} times (from {describe(compressed, 'bytes')} "
            f"to {describe(inflated, 'bytes')}), above the {MAX_COMPRESSION_RATIO}:1 that no DICOM export comes near. "
            "Refused before inflating; zip the exported series itself."
        )


def _starts_like_dicom(head: bytes) -> bool:
    """Whether a file without the DICM preamble begins with a DICOM element of group 0002 or
    0008 (little endian), as old exports do; a block of zeros or text does not."""
    return len(head) >= 8 and int.from_bytes(head[:2], "little") in _FIRST_GROUPS


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, label: str, size: int = -1) -> bytes:
    """Inflate one member (at most its declared size: zipfile stops there, and the declared sizes
    were checked against the limit)."""
    try:
        with archive.open(info) as stream:
            return stream.read(size)
    except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise _inflate_error(info.filename, label, exc) from exc


def _zip_opener(archive: zipfile.ZipFile, info: zipfile.ZipInfo, label: str) -> Callable[[], BinaryIO]:
    """A member as a stream, inflated as it is read: a header read with `stop_before_pixels`
    inflates the header's bytes only. Inflating errors become a :class:`DicomArchiveError`."""

    def opener() -> BinaryIO:
        try:
            return _GuardedStream(archive.open(info), info.filename, label)
        except (zipfile.BadZipFile, RuntimeError, OSError, ValueError, NotImplementedError) as exc:
            raise _inflate_error(info.filename, label, exc) from exc

    return opener


def _inflate_error(member: str, label: str, exc: BaseException) -> DicomArchiveError:
    # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method.
    return DicomArchiveError(
        f"{label}: the member {member!r} cannot be inflated ({type(exc).__name__}: {exc}). "
        "Zip the series again without encryption, with the usual deflate method."
    )


class _GuardedStream(io.RawIOBase):
    """A zip member's stream whose inflating errors (a bad CRC found at its end, a damaged
    block) name the member, as a :class:`DicomArchiveError`, instead of a reader's error."""

    def __init__(self, stream: BinaryIO, member: str, label: str):
        self._stream, self._member, self._label = stream, member, label

    def _guard(self, call, *args):
        try:
            return call(*args)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise _inflate_error(self._member, self._label, exc) from exc

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._guard(self._stream.read, size)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._guard(self._stream.seek, offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def close(self) -> None:
        self._stream.close()
        super().close()


# --- headers and series ---------------------------------------------------------------------------


def _read_dataset(member: _Member, stop_before_pixels: bool) -> tuple[Dataset, bool]:
    """One file's dataset, and whether the file ended with it (for a header read,
    `stop_before_pixels`: no pixel data follows, a truncated image). A file without the DICM
    magic is read with force (old exports drop the preamble), and must then prove to be DICOM by
    its SOP class, or by the attributes of an image when an anonymiser blanked that."""
    source = member.open()
    if isinstance(source, str):
        try:
            source = open(source, "rb")
        except OSError as exc:
            raise DicomFileError(f"{member.name}: cannot be opened ({exc}). Check the file's permissions.") from exc
    try:
        dataset = pydicom.dcmread(source, stop_before_pixels=stop_before_pixels, force=not member.magic)
        ended = source.read(1) == b""
    except MedsegError:
        raise
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise DicomFileError(
            f"{member.name}: not a readable DICOM file ({type(exc).__name__}: {exc}). It is corrupt or truncated: "
            "export or copy it again, or remove it from the input."
        ) from exc
    finally:
        source.close()
    if not _sop_class(dataset) and not _looks_like_image(dataset):
        raise DicomFileError(
            f"{member.name}: has no SOP Class UID and no image attributes (Rows, Columns), so it is truncated or not "
            "a DICOM file. Export or copy it again, or remove it from the input."
        )
    if not dataset.get("SOPClassUID") and _sop_class(dataset):
        dataset.SOPClassUID = _sop_class(dataset)  # the file meta's MediaStorageSOPClassUID names the same class
    return dataset, ended


def _looks_like_image(dataset: Dataset) -> bool:
    """An instance whose SOP class was blanked (as some anonymisers do) that still has the
    attributes of an image: a size in rows and columns and a place in the patient."""
    return all(dataset.get(keyword) not in (None, "") for keyword in ("Rows", "Columns", "ImagePositionPatient"))


def _sop_class(dataset: Dataset) -> str:
    """The SOP class of a dataset; a DICOMDIR names its class in the file meta only."""
    value = dataset.get("SOPClassUID") or getattr(dataset.get("file_meta"), "MediaStorageSOPClassUID", None)
    return str(value or "")


def _non_image_reason(dataset: Dataset) -> str | None:
    """Why an instance holds no image to segment, or None for an image."""
    sop_class = dicom_uid.UID(_sop_class(dataset))
    modality = str(dataset.get("Modality", "")).upper()
    if modality in NON_IMAGE_MODALITIES:
        return f"{modality} instance ({sop_class.name or 'no SOP Class UID'})"
    if not sop_class:
        return None  # blanked, and image attributes are there (_read_dataset checked)
    if "Image Storage" not in sop_class.name:
        return f"not an image ({sop_class.name})"
    return None


def _scan_headers(members: list[_Member], label: str) -> tuple[list[_Instance], list[str]]:
    """Every image instance's header (pixel data not read), and what was skipped."""
    instances, skipped = [], []
    for member in members:
        header, ended = _read_dataset(member, stop_before_pixels=True)
        reason = _non_image_reason(header)
        if reason is not None:
            skipped.append(f"{member.name}: {reason}")
            continue
        if ended:
            raise DicomFileError(
                f"{member.name}: an image whose file ends before its pixel data, so it is truncated. Export or copy it "
                "again, or remove it from the input."
            )
        instances.append(_Instance(member, header))
    if not instances:
        raise DicomSeriesError(
            f"{label}: no image series to segment: the {len(members)} DICOM files are all non-image instances "
            f"({'; '.join(skipped[:5])}{'; ...' if len(skipped) > 5 else ''}). Add the scan's image series."
        )
    return instances, skipped


def _series_name(header: Dataset, label: str) -> str:
    """`series 1.2.3 ('Head 2.5mm', number 5) in /path`: how every message names a series."""
    description = str(header.get("SeriesDescription", "") or "no description")
    number = header.get("SeriesNumber")
    number_text = f", number {number}" if number not in (None, "") else ""
    uid = str(header.get("SeriesInstanceUID", "") or "") or "without a SeriesInstanceUID"
    return f"series {uid} ({description!r}{number_text}) in {label}"


def _series_key(header: Dataset) -> str:
    """The series an instance belongs to: its SeriesInstanceUID, or for a blank one what the
    instance shares with the rest of its series (:data:`_BLANK_SERIES_KEYS`), as dcm2niix groups."""
    uid = str(header.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        return uid
    values = []
    for keyword in _BLANK_SERIES_KEYS:
        value = header.get(keyword)
        if keyword == "ImageOrientationPatient" and value is not None:
            value = [round(float(v), 3) for v in value]  # one plane, whatever its rounding
        values.append(str(list(value) if isinstance(value, (list, tuple, MultiValue)) else value))
    return "no-uid:" + "|".join(values)


def _missing_uids(instances: Sequence[_Instance]) -> tuple[str, ...]:
    """The UIDs of :data:`SOURCE_UIDS` that at least one instance lacks."""
    return tuple(k for k in SOURCE_UIDS if any(not str(i.header.get(k, "") or "").strip() for i in instances))


def _is_localizer(header: Dataset) -> bool:
    image_type = header.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = [image_type]
    return any(str(value).strip().upper() == "LOCALIZER" for value in image_type)


def _frames(header: Dataset) -> int:
    try:
        return int(header.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1


def _is_multi_frame(header: Dataset) -> bool:
    """A multi-frame instance, or an enhanced one (even of 1 frame): both keep their geometry in
    functional groups per frame, not in ImagePositionPatient."""
    return _frames(header) > 1 or "PerFrameFunctionalGroupsSequence" in header or "SharedFunctionalGroupsSequence" in header


def _choose_series(instances: list[_Instance], series_uid: str | None, label: str) -> list[_Instance]:
    by_series: dict[str, list[_Instance]] = {}
    for instance in instances:
        by_series.setdefault(_series_key(instance.header), []).append(instance)
    if series_uid is not None:
        series_uid = str(series_uid).strip()
        if series_uid not in by_series:
            raise DicomSeriesError(
                f"{label}: no image series with SeriesInstanceUID {series_uid}. The input holds: "
                f"{_list_series(by_series)}. Pass one of these UIDs (e.g. as predict.series_uid)."
            )
        return by_series[series_uid]
    if len(by_series) > 1:
        raise DicomSeriesError(
            f"{label}: holds {len(by_series)} image series and none was chosen: {_list_series(by_series)}. "
            "Pass the SeriesInstanceUID of the one to segment (e.g. predict.series_uid), or remove the others "
            "from the input."
            + (" A series without a SeriesInstanceUID (grouped by Frame of Reference, orientation and size, as dcm2niix "
               "groups) cannot be chosen by UID: give it a folder or zip of its own."
               if any(key.startswith("no-uid:") for key in by_series) else "")
        )
    return next(iter(by_series.values()))


def _list_series(by_series: dict[str, list[_Instance]], most: int = 20) -> str:
    lines = []
    for uid, members in list(by_series.items())[:most]:
        header = members[0].header
        notes = []
        if any(_is_localizer(m.header) for m in members):
            notes.append("localizer")
        if any(_is_multi_frame(m.header) for m in members):
            notes.append("multi-frame")
        note = f", {' and '.join(notes)}" if notes else ""
        lines.append(
            f"{uid if not uid.startswith('no-uid:') else 'a series without a SeriesInstanceUID'} "
            f"({str(header.get('SeriesDescription', '') or 'no description')!r}, number "
            f"{header.get('SeriesNumber', '?')}, {header.get('Modality', '?')}, {len(members)} "
            f"instance{'s' if len(members) != 1 else ''}{note})"
        )
    more = len(by_series) - most
    return "; ".join(lines) + (f"; and {more} more series" if more > 0 else "")


def _drop_copies(instances: list[_Instance]) -> tuple[list[_Instance], list[str]]:
    """One instance per SOPInstanceUID: a UID names one image, so a second file with it is a
    copy (an export made twice into one folder), not a second slice."""
    kept: dict[str, _Instance] = {}
    copies = []
    for instance in instances:
        uid = str(instance.header.get("SOPInstanceUID", "") or "")
        if not uid:
            kept[f"#{len(kept)}"] = instance  # a blank UID names nothing: its position decides (_slice_geometry)
        elif uid in kept:
            copies.append(f"{instance.name}: a copy of {kept[uid].name} (same SOPInstanceUID)")
        else:
            kept[uid] = instance
    return list(kept.values()), copies


# --- geometry -------------------------------------------------------------------------------------


def _describe_instance(instance: _Instance) -> str:
    number = instance.header.get("InstanceNumber")
    return f"{instance.name}" + (f" (instance {number})" if number not in (None, "") else "")


def _some(instances: Sequence[_Instance], limit: int = 6) -> str:
    names = [_describe_instance(i) for i in instances[:limit]]
    more = len(instances) - limit
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def _check_instances(instances: list[_Instance], what: str) -> None:
    """Refuse what no slice geometry can fix: multi-frame, localizers, missing attributes,
    colour, slices of different sizes."""
    multi = [i for i in instances if _is_multi_frame(i.header)]
    if multi:
        raise DicomFileError(
            f"{what}: {_some(multi)} {'is a' if len(multi) == 1 else 'are'} multi-frame (enhanced) "
            f"instance{'s' if len(multi) > 1 else ''} ({_frames(multi[0].header)} frame"
            f"{'s' if _frames(multi[0].header) != 1 else ''} in the first), whose geometry is given per frame; medseg "
            "reads single-frame series. Convert it to NIfTI with dcm2niix, or to single-frame DICOM (dcm4che emf2sf), "
            "and give that instead."
        )
    localizers = [i for i in instances if _is_localizer(i.header)]
    if localizers:
        rest = len(instances) - len(localizers)
        raise DicomSeriesError(
            f"{what}: {_some(localizers)} {'is a localizer' if len(localizers) == 1 else 'are localizers'} "
            f"(ImageType LOCALIZER: a scout, not part of the volume){f' mixed with {rest} other slices' if rest else ''}. "
            "Remove the localizer files from the input, or choose the volume's own series (predict.series_uid)."
        )
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        missing = [i for i in instances if i.header.get(keyword) in (None, "", [])]
        if missing:
            raise DicomGeometryError(
                f"{what}: {_some(missing)} lack{'s' if len(missing) == 1 else ''} {keyword}, so the slices cannot be "
                "placed in space (a secondary capture or a stripped export?). Export the original series from the "
                "scanner or PACS, with its geometry."
            )
    colour = [i for i in instances if int(i.header.get("SamplesPerPixel", 1) or 1) != 1]
    if colour:
        raise DicomFileError(
            f"{what}: {_some(colour)} {'has' if len(colour) == 1 else 'have'} "
            f"{colour[0].header.SamplesPerPixel} samples per pixel (colour); medseg segments greyscale scans. "
            "Give the original greyscale series."
        )
    for keyword in ("Rows", "Columns"):
        values = Counter(int(i.header.get(keyword)) for i in instances)
        if len(values) > 1:
            raise DicomGeometryError(
                f"{what}: the slices have different {keyword} ({dict(values)}), so they are not one volume "
                "(several acquisitions in one series?). Export the volume alone."
            )
    spacings = Counter(tuple(round(float(v), 5) for v in i.header.PixelSpacing) for i in instances)
    if len(spacings) > 1:
        raise DicomGeometryError(
            f"{what}: the slices have different PixelSpacing ({dict(spacings)} mm), so they are not one volume. "
            "Export the volume alone."
        )
    bounds = limits()
    voxels = int(instances[0].header.Rows) * int(instances[0].header.Columns) * len(instances)
    if voxels > bounds.max_voxels or voxels * 4 > bounds.max_scan_bytes:
        raise DicomGeometryError(
            f"{what}: {instances[0].header.Columns} x {instances[0].header.Rows} x {len(instances)} voxels "
            f"({describe(voxels)}, {describe(voxels * 4, 'bytes')} as float32), above the limit of "
            f"{describe(bounds.max_voxels)} and {describe(bounds.max_scan_bytes, 'bytes')} (MEDSEG_MAX_VOXELS, "
            "MEDSEG_MAX_SCAN_MB). Refused before reading; crop the series, or raise the limits if the scan is real."
        )


def _vector(header: Dataset, keyword: str, size: int, name: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in header.get(keyword)], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DicomGeometryError(f"{name}: {keyword} is not numeric ({header.get(keyword)!r}). Export the series again.") from exc
    if values.shape != (size,) or not np.all(np.isfinite(values)):
        raise DicomGeometryError(
            f"{name}: {keyword} must hold {size} finite numbers, it holds {header.get(keyword)!r}. Export the series again."
        )
    return values


def _slice_geometry(instances: list[_Instance], what: str) -> tuple[list[_Instance], np.ndarray]:
    """The instances sorted along the slice normal and the RAS affine of the volume.

    Refuses every series whose slices are not one regular, untilted grid (see the module
    docstring); tolerances: ORIENTATION_TOLERANCE, SLICE_GAP_*_TOLERANCE, TILT_TOLERANCE.
    """
    orientations = [_vector(i.header, "ImageOrientationPatient", 6, _describe_instance(i)) for i in instances]
    groups: list[tuple[np.ndarray, list[int]]] = []
    for index, orientation in enumerate(orientations):
        for reference, members in groups:
            if np.max(np.abs(orientation - reference)) <= ORIENTATION_TOLERANCE:
                members.append(index)
                break
        else:
            groups.append((orientation, [index]))
    if len(groups) > 1:
        groups.sort(key=lambda group: -len(group[1]))
        main = groups[0][1]
        if len(main) * 2 > len(instances):
            others = [instances[i] for _, members in groups[1:] for i in members]
            raise DicomSeriesError(
                f"{what}: {_some(others)} {'has' if len(others) == 1 else 'have'} an orientation "
                f"({_orientation_text(orientations[instances.index(others[0])])}) that differs from the other "
                f"{len(main)} slices ({_orientation_text(groups[0][0])}): localizers or another acquisition mixed "
                "into the series. Remove those files from the input, or export the volume alone."
            )
        listing = "; ".join(
            f"{_orientation_text(reference)}: {_some([instances[i] for i in members], 3)}" for reference, members in groups
        )
        raise DicomGeometryError(
            f"{what}: the slices are not parallel ({len(groups)} orientations of ImageOrientationPatient beyond "
            f"{ORIENTATION_TOLERANCE:g}: {listing}): a multi-plane localizer, a radial or projection series, not a "
            "volume. Choose a series of parallel slices (predict.series_uid)."
        )
    if len(instances) < 2:
        raise DicomGeometryError(
            f"{what}: holds a single slice ({_describe_instance(instances[0])}); a volume needs at least 2, whose "
            "distance gives the slice spacing (SliceThickness is not a spacing). Give the whole series, or convert "
            "a single slice to NIfTI yourself with its thickness."
        )
    row, column = orientations[0][:3], orientations[0][3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(column) - 1) > 1e-2 or abs(row @ column) > 1e-3:
        raise DicomGeometryError(
            f"{what}: ImageOrientationPatient {orientations[0].tolist()} is not two orthogonal unit vectors. "
            "Export the series again from the scanner or PACS."
        )
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    normal = np.cross(row, column)
    positions = np.array(
        [_vector(i.header, "ImagePositionPatient", 3, _describe_instance(i)) for i in instances], dtype=np.float64
    )
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    instances = [instances[i] for i in order]
    positions, along = positions[order], along[order]
    gaps = np.diff(along)
    median = float(np.median(gaps))
    tolerance = max(SLICE_GAP_RELATIVE_TOLERANCE * median, SLICE_GAP_ABSOLUTE_TOLERANCE_MM)

    duplicates = [k for k, gap in enumerate(gaps) if gap <= SLICE_GAP_ABSOLUTE_TOLERANCE_MM]
    if duplicates:
        pairs = "; ".join(
            f"{_describe_instance(instances[k])} and {_describe_instance(instances[k + 1])} at "
            f"{_position_text(positions[k])}" + _differing_attributes(instances[k], instances[k + 1])
            for k in duplicates[:4]
        )
        raise DicomGeometryError(
            f"{what}: {len(duplicates)} pair{'s' if len(duplicates) > 1 else ''} of slices at the same position: "
            f"{pairs}{' ...' if len(duplicates) > 4 else ''}. Several acquisitions, echoes or phases share the series; "
            "export one of them alone (or remove the duplicates)."
        )

    total = positions[-1] - positions[0]
    height = float(total @ normal)
    lateral = float(np.linalg.norm(total - height * normal))
    if lateral > max(TILT_TOLERANCE * height, SLICE_GAP_ABSOLUTE_TOLERANCE_MM):
        degrees = math.degrees(math.atan2(lateral, height))
        tilt = instances[0].header.get("GantryDetectorTilt")
        header_note = f" (GantryDetectorTilt {tilt})" if tilt not in (None, "") else ""
        raise DicomGeometryError(
            f"{what}: the slices step {degrees:.2f} degrees off their normal{header_note}: a gantry tilt, from "
            f"{_position_text(positions[0])} to {_position_text(positions[-1])}. medseg does not resample tilted "
            "series; convert it with dcm2niix, which corrects the tilt (its _Tilt_ output), and segment that NIfTI."
        )

    irregular = [k for k, gap in enumerate(gaps) if abs(gap - median) > tolerance]
    if irregular:
        raise DicomGeometryError(
            f"{what}: the slices are not evenly spaced (median gap {median:.4g} mm, tolerance {tolerance:.3g} mm): "
            + "; ".join(_gap_text(instances, positions, gaps, median, tolerance, k) for k in irregular[:4])
            + (" ..." if len(irregular) > 4 else "")
            + ". Export the complete series again (a slice may have been lost in transfer), or convert it with "
            "dcm2niix, which resamples uneven series, and segment that NIfTI."
        )
    step = total / (len(instances) - 1)
    grid = positions[0] + np.arange(len(instances))[:, None] * step
    drift = np.linalg.norm(positions - grid, axis=1)
    if float(drift.max()) > tolerance:
        worst = int(np.argmax(drift))
        raise DicomGeometryError(
            f"{what}: the slices are not evenly spaced: {_describe_instance(instances[worst])} at "
            f"{_position_text(positions[worst])} lies {drift[worst]:.3g} mm off the regular grid from the first to the "
            f"last slice (tolerance {tolerance:.3g} mm), the gaps drifting from {gaps.min():.4g} to {gaps.max():.4g} mm. "
            "Convert the series with dcm2niix, which resamples uneven series, and segment that NIfTI."
        )

    spacing = [float(v) for v in instances[0].header.PixelSpacing]  # (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]
    lps[:3, 1] = column * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return instances, lps_to_ras(lps)


def _orientation_text(orientation: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in orientation) + "]"


def _position_text(position: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in position) + ") mm LPS"


def _differing_attributes(a: _Instance, b: _Instance) -> str:
    keywords = ("AcquisitionNumber", "EchoNumbers", "TemporalPositionIdentifier", "TriggerTime", "DiffusionBValue")
    differences = [f"{k} {a.header.get(k)} vs {b.header.get(k)}" for k in keywords if a.header.get(k) != b.header.get(k)]
    return f" ({', '.join(differences)})" if differences else ""


def _gap_text(instances, positions, gaps, median, tolerance, k) -> str:
    ratio = gaps[k] / median
    missing = round(ratio) - 1
    between = (
        f"between {_describe_instance(instances[k])} at {_position_text(positions[k])} and "
        f"{_describe_instance(instances[k + 1])} at {_position_text(positions[k + 1])}"
    )
    if missing >= 1 and abs(gaps[k] - round(ratio) * median) <= tolerance * round(ratio):
        return (
            f"a gap of {gaps[k]:.4g} mm {between}: "
            + ("a missing slice" if missing == 1 else f"{missing} missing slices")
        )
    return f"a gap of {gaps[k]:.4g} mm {between}: uneven spacing"


# --- voxels ---------------------------------------------------------------------------------------


def _check_decoders(instances: list[_Instance], what: str) -> None:
    """Refuse before decoding when a compressed transfer syntax has no decoder installed."""
    for syntax in sorted({_transfer_syntax(i) for i in instances}):
        uid = dicom_uid.UID(syntax)
        if not uid or not uid.is_compressed:
            continue
        try:
            available = get_decoder(uid).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise DicomDecoderError(
                f"{what}: its pixel data is compressed as {uid.name} ({uid}), and no decoder for it is installed. "
                f"Install one: {_DECODER_PACKAGES.get(uid, _ANY_DECODER)}; or convert the series to an uncompressed "
                "transfer syntax."
            )


def _transfer_syntax(instance: _Instance) -> str:
    meta = instance.header.get("file_meta")
    return str(getattr(meta, "TransferSyntaxUID", "") or "")


def _read_voxels(instances: list[_Instance], what: str) -> tuple[np.ndarray, list[Dataset]]:
    """The (X, Y, Z) float32 voxels, slice k from instances[k], and the datasets without their
    pixel data."""
    _check_decoders(instances, what)
    rows, columns = int(instances[0].header.Rows), int(instances[0].header.Columns)
    data = np.empty((columns, rows, len(instances)), dtype=np.float32)
    datasets = []
    for k, instance in enumerate(instances):
        dataset, _ = _read_dataset(instance.member, stop_before_pixels=False)
        pixels = _decode(dataset, instance, what)
        if pixels.shape != (rows, columns):
            raise DicomFileError(
                f"{what}: {_describe_instance(instance)} decodes to {pixels.shape} pixels, not Rows x Columns "
                f"({rows} x {columns}). The file is damaged; export it again."
            )
        data[:, :, k] = np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float32).T
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in dataset:
                delattr(dataset, keyword)
        datasets.append(dataset)
    if not np.all(np.isfinite(data)):
        raise DicomFileError(f"{what}: the rescaled voxels hold NaN or Inf (a broken RescaleSlope?). Export the series again.")
    return data, datasets


def _decode(dataset: Dataset, instance: _Instance, what: str) -> np.ndarray:
    if "PixelData" not in dataset:
        raise DicomFileError(
            f"{what}: {_describe_instance(instance)} holds no pixel data: the file is truncated or the export dropped "
            "the pixels. Export or copy it again."
        )
    try:
        return dataset.pixel_array
    except (RuntimeError, NotImplementedError) as exc:
        uid = dicom_uid.UID(_transfer_syntax(instance))
        raise DicomDecoderError(
            f"{what}: {_describe_instance(instance)} is compressed as {uid.name} ({uid}), which the installed decoders "
            f"cannot decode ({str(exc).splitlines()[-1].strip()}). Install a decoder for it: "
            f"{_DECODER_PACKAGES.get(uid, _ANY_DECODER)}; or convert the series to an uncompressed transfer syntax."
        ) from exc
    except Exception as exc:  # numpy/pydicom on a short or malformed PixelData
        raise DicomFileError(
            f"{what}: the pixel data of {_describe_instance(instance)} cannot be read ({type(exc).__name__}: {exc}). "
            "The file is truncated or damaged: export or copy it again."
        ) from exc
