"""A training set of DICOM studies (`data.source: dicom`) as an MSD-layout folder.

Each case is a folder of `data.dicom_dir` (its name is the case id) holding one image series
and one DICOM SEG over it, the labels (anywhere below the folder; loose files or subfolders).
The series becomes `imagesTr/<case>_0000.nii.gz` on its own grid (`medseg.dicom.series`), the
SEG a label map on that grid (`medseg.dicom.seg`), and `dataset.json` lists the SEGs'
segment labels as the classes. From there the data pipeline validates, fingerprints and
preprocesses the cases exactly as MSD data: the primary layer is the same.

The conversion is incremental: a folder whose `dataset.json` records the same source files
(names, sizes, modification times) is kept; otherwise the whole folder is written again in a
staging folder and swapped in (`medseg.cases.msd.write_msd_dataset`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom

from medseg.errors import DatasetNotFoundError, EmptyDatasetError, InvalidLabelError
from medseg.dicom.series import DicomSeriesError, is_dicom_input, read_dicom_series
from medseg.dicom.seg import read_dicom_seg, segment_label_value
from medseg.imaging.io import Volume
from medseg.cases.msd import write_msd_dataset

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SOURCE_KEY = "medseg_dicom_source"


def _case_folders(dicom_dir: Path) -> list[Path]:
    if not dicom_dir.is_dir():
        raise DatasetNotFoundError(
            f"{dicom_dir}: data.dicom_dir is not a folder. Point it at a folder with one subfolder per case, each "
            "holding an image series and its DICOM SEG."
        )
    folders = sorted(p for p in dicom_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise EmptyDatasetError(f"{dicom_dir}: holds no case folder (one subfolder per case, with its series and SEG).")
    return folders


def source_digest(dicom_dir: str | os.PathLike) -> str:
    """SHA-256 over every file's relative path, size and modification time below `dicom_dir`:
    what decides whether the converted folder is still current."""
    root = Path(dicom_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        info = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _sop_class(path: Path) -> str:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).get("SOPClassUID", ""))
    except Exception:  # not DICOM, or unreadable: the series reader names it if it matters
        return ""


def _seg_of(case: Path) -> Path:
    """The one DICOM SEG of a case folder; an RTSTRUCT alone is refused with the fix."""
    candidates = [p for p in sorted(case.rglob("*")) if p.is_file() and is_dicom_input(p)]
    classes = {p: _sop_class(p) for p in candidates}
    segs = [p for p, uid in classes.items() if uid == SEG_SOP_CLASS]
    if len(segs) == 1:
        return segs[0]
    if not segs and any(uid == RTSTRUCT_SOP_CLASS for uid in classes.values()):
        raise InvalidLabelError(
            f"{case}: its labels are an RTSTRUCT; medseg trains from DICOM SEG labels. Convert the RTSTRUCT to a SEG "
            "(e.g. with dcmqi or rt-utils and highdicom), or to NIfTI labels and use data.source=msd."
        )
    raise InvalidLabelError(
        f"{case}: holds {len(segs)} DICOM SEG files ({', '.join(p.name for p in segs[:5]) or 'none'}); each case "
        "folder needs exactly one, over its image series."
    )


def _segment_names(seg_path: Path) -> dict[int, str]:
    """{label value: SegmentLabel} as `read_dicom_seg` numbers them: the value medseg wrote in
    the SegmentDescription (`medseg label value N`), else the segment number."""
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    names = {}
    for item in seg.SegmentSequence:
        names[segment_label_value(item, int(item.SegmentNumber))] = str(item.get("SegmentLabel", f"segment {item.SegmentNumber}"))
    return names


def convert_dicom_dataset(dicom_dir: str | os.PathLike, root: str | os.PathLike, name: str | None = None) -> bool:
    """Write the DICOM studies of `dicom_dir` as an MSD-layout dataset in `root`.

    Args:
        dicom_dir: one subfolder per case, each with one image series and one DICOM SEG over it.
        root: the MSD folder to write (replaced whole, once every case is written).
        name: the dataset's name in `dataset.json`; default the folder's name.

    Returns:
        True when the folder was written, False when it was current (same source files).

    Raises:
        DatasetNotFoundError, EmptyDatasetError: no such folder, or no case folder in it.
        InvalidLabelError: a case without exactly one SEG (an RTSTRUCT names the fix), or
            cases whose segments give one label value two names.
        DicomError: a series or a SEG that cannot be read (naming the file and the fix).
    """
    source, root = Path(dicom_dir).resolve(), Path(root)
    folders = _case_folders(source)
    digest = source_digest(source)
    manifest = root / "dataset.json"
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get(SOURCE_KEY, {}).get("digest") == digest:
                return False
        except (OSError, ValueError):
            pass
    segs = {case.name: _seg_of(case) for case in folders}
    classes: dict[int, str] = {}
    for case_id, seg in segs.items():
        for value, label in _segment_names(seg).items():
            if classes.setdefault(value, label) != label:
                raise InvalidLabelError(
                    f"{seg}: label value {value} is '{label}' here but '{classes[value]}' in an earlier case. Give every "
                    "case's SEG the same segments in the same order."
                )
    def case(case_id: str) -> Callable[[], tuple[Volume, Volume]]:
        def make() -> tuple[Volume, Volume]:
            files = _image_files(source / case_id, segs[case_id])
            try:
                series = read_dicom_series(files)
            except DicomSeriesError as exc:
                raise DicomSeriesError(f"case {case_id}: {exc}") from exc
            labels = read_dicom_seg(segs[case_id], series, None)
            return series.volume, Volume(np.asarray(labels, dtype=np.uint8), series.volume.affine)

        return make

    first = _image_files(folders[0], segs[folders[0].name])
    modality = str(pydicom.dcmread(first[0], stop_before_pixels=True).get("Modality", "")) if first else ""
    metadata = {
        "name": name or source.name,
        "modality": {"0": modality or "unknown"},
        "description": f"DICOM studies of {source}, converted by medseg (series -> imagesTr, DICOM SEG -> labelsTr)",
        "labels": {"0": "background", **{str(v): n for v, n in sorted(classes.items())}},
        SOURCE_KEY: {"dicom_dir": str(source), "digest": digest, "cases": len(folders)},
    }
    write_msd_dataset(root, [(case_id, case(case_id)) for case_id in segs], metadata)
    return True


def _image_files(case: Path, seg: Path) -> list[Path]:
    """The DICOM files of a case folder but its SEG (the series reader skips other non-image
    instances itself)."""
    return [p for p in sorted(case.rglob("*")) if p.is_file() and p != seg and not p.name.startswith(".") and is_dicom_input(p)]
