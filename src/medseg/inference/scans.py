"""The files of a prediction run: a folder of new scans in, a folder of masks out.

Input names follow nnU-Net: `<case>_0000.nii.gz` (one file per channel, `_0000` the first) or
`<case>.nii.gz`; `.nii` works too. A DICOM series is a case too: a subfolder (case id: its
name) or a `.zip` (its stem) holding the series, or the DICOM files lying in the folder itself
(case id: the folder's name). Output: `<case>.nii.gz` per scan, `<case>.seg.dcm` (a DICOM SEG
referring to the source series) per DICOM scan, and `predictions.csv`.
Masks are written to a staging folder inside the output folder and moved into place only
once every scan has been segmented, so a failure leaves the output folder as it was.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg.casework import DriverThenWorker, map_in_order
from medseg.errors import ConfigurationError, DatasetNotFoundError, EmptyDatasetError
from medseg.dicom.series import DicomSeries, check_dicom_series, is_dicom_input, read_dicom_series
from medseg.dicom.uids import missing_uids_reason
from medseg.imaging.geometry import CaseGeometry
from medseg.inference.audit import AUDIT_SUFFIX
from medseg.imaging.io import Volume, read_header_geometry, write_volume
from medseg.inference.postprocessing import LabelMapper, volumes_ml
from medseg.storage.publishing import check_replaceable, publish_files, spreadsheet_safe, staging_folder

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
PREDICTIONS_TABLE = "predictions.csv"
SEG_SUFFIX = ".seg.dcm"
NIFTI, DICOM, DICOM_FILES = "nifti", "dicom", "dicom-files"


@dataclass(frozen=True)
class Scan:
    """One case to segment.

    Attributes:
        case_id: the output's name (`<case_id>.nii.gz`).
        path: the NIfTI file; for DICOM, the series' folder or `.zip`, or (`dicom-files`) the
            folder whose own DICOM files are the series.
        format: `nifti`, `dicom` or `dicom-files`.
        series_uid: for DICOM, the SeriesInstanceUID to read (`predict.series_uid`), or None
            for the only series of the input.
        missing_uids: for DICOM, the UIDs its instances lack, as `list_scans` found them in the
            headers (`medseg.dicom.series.SeriesCheck`).
    """

    case_id: str
    path: str
    format: str = NIFTI
    series_uid: str | None = None
    missing_uids: tuple[str, ...] = ()

    @property
    def is_dicom(self) -> bool:
        return self.format != NIFTI

    def dicom_source(self) -> str | list[Path]:
        """What :func:`medseg.dicom.series.read_dicom_series` reads for this scan."""
        if self.format == DICOM_FILES:
            return _loose_dicom_files(Path(self.path))
        return self.path

    def read_series(self) -> DicomSeries:
        return read_dicom_series(self.dicom_source(), self.series_uid)


# The QC flags as a DICOM SEG's series description names them (it holds 64 characters).
QC_SHORT = {"out_of_distribution": "OOD", "low_confidence": "uncertain", "implausible_size": "size"}


@dataclass(frozen=True)
class SegWriter:
    """Writes a DICOM scan's mask as a DICOM SEG over its source series
    (:func:`medseg.dicom.seg.write_dicom_seg`, BINARY, or LABELMAP with `labelmap`);
    picklable, for a Dask worker.

    Attributes:
        series: the source series (its datasets without pixel data).
        classes: {label value: name} of the foreground classes.
        algorithm_name: the model's name (`UNet`, `unet+conv3d`).
        model_uri: the model the mask came from (`runs:/...`, `models:/...`).
        labelmap: a LABELMAP SEG instead of a BINARY one.
    """

    series: DicomSeries
    classes: Mapping[int, str]
    algorithm_name: str
    model_uri: str
    labelmap: bool = False

    def __call__(self, mask: Volume, path: Path, qc_flags: str = "") -> str:
        """Write the SEG; its series description says "QC: <flags>" when a QC flag is raised,
        where a viewer's series list shows it."""
        from medseg.dicom.seg import write_dicom_seg

        name = f"medseg {self.algorithm_name}"
        return write_dicom_seg(
            np.asarray(mask.data), self.series, dict(self.classes), algorithm_name=name,
            algorithm_version=medseg_version(), model_uri=self.model_uri, path=path,
            series_description=_description(name, "segmentation", qc_flags), labelmap=self.labelmap,
        )


@dataclass(frozen=True)
class RtstructWriter:
    """Writes a DICOM scan's mask as an RT Structure Set over its source series
    (:func:`medseg.dicom.rtstruct.write_rtstruct`); the attributes of :class:`SegWriter`."""

    series: DicomSeries
    classes: Mapping[int, str]
    algorithm_name: str
    model_uri: str

    def __call__(self, mask: Volume, path: Path, qc_flags: str = "") -> str:
        from medseg.dicom.rtstruct import write_rtstruct

        name = f"medseg {self.algorithm_name}"
        return write_rtstruct(
            np.asarray(mask.data), self.series, dict(self.classes), algorithm_name=name,
            algorithm_version=medseg_version(), model_uri=self.model_uri, path=path,
            series_description=_description(name, "structures", qc_flags),
        )


def _description(name: str, what: str, qc_flags: str) -> str:
    """A DICOM output's series description: `<name> QC: <flags>` when a QC flag is raised (a
    viewer's series list shows it), else `<name> <what>`; at most 64 characters."""
    flags = [QC_SHORT.get(flag, flag) for flag in qc_flags.split(";") if flag]
    return (f"{name} QC: {', '.join(flags)}" if flags else f"{name} {what}")[:64]


# The DICOM outputs `predict.outputs` may ask for beside `nifti`, and each one's file suffix.
DICOM_OUTPUTS = {"seg": SEG_SUFFIX, "rtstruct": ".rtstruct.dcm"}


def medseg_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medseg")
    except PackageNotFoundError:
        return "unknown"


def lineage(series: DicomSeries | None, generated: Sequence[str] = ()) -> dict[str, str]:
    """The columns of `predictions.csv` that trace a mask to its source: StudyInstanceUID and
    SeriesInstanceUID of a DICOM scan, `uids_generated` (the UIDs medseg gave a series that had
    them blank, `;`-separated) and `dicom_outputs_note` (why no SEG was written); all empty for
    NIfTI. UIDs, never patient data."""
    if series is None:
        return {"study_instance_uid": "", "series_instance_uid": "", "uids_generated": "", "dicom_outputs_note": ""}
    return {"study_instance_uid": series.study_uid, "series_instance_uid": series.series_uid,
            "uids_generated": ";".join(generated), "dicom_outputs_note": missing_uids_reason(series)}


def _loose_dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and nifti_stem(p.name) is None
                  and p.suffix.lower() != ".zip" and is_dicom_input(p))


def nifti_stem(name: str) -> str | None:
    """`name` without `.nii.gz` or `.nii`, or None when it is not a NIfTI file name."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def case_id_of(name: str) -> str:
    """The case id of a scan's file name: `la_003_0000.nii.gz` -> `la_003`, `a.nii` -> `a`,
    `series.zip` (a DICOM series) -> `series`."""
    base = Path(name).name
    stem = nifti_stem(base) or (base[:-4] if base.lower().endswith(".zip") and len(base) > 4 else base)
    match = _CHANNEL_SUFFIX.match(stem)
    return match.group("case") if match else stem


def list_scans(input_dir: str | os.PathLike, channel: int | None = None, series_uid: str | None = None) -> list[Scan]:
    """The scans of a folder, one per case, sorted by case id; headers checked.

    A case split into channel files (`<case>_0000`, `<case>_0001`, ...) gives the file of
    `channel` (0 when None). A subfolder or `.zip` holding DICOM files is a DICOM case named
    after it; DICOM files lying in the folder itself are one case named after the folder. Each
    DICOM case has every header check of `medseg.dicom.series.read_dicom_series` run here,
    before anything is segmented (`series_uid` picks a series where an input holds several).
    Hidden files and other files are skipped (logged).

    Raises:
        DatasetNotFoundError: the folder is missing, or is a file.
        EmptyDatasetError: it holds no NIfTI file and no DICOM series.
        DicomError: a DICOM input that cannot be read as one series (several series, a
            missing slice, a tilt...), naming the series and the fix.
        ConfigurationError: two files give the same case (`a.nii.gz` and `a_0000.nii.gz`).
        CorruptFileError, InvalidGeometryError: a file's header is unreadable or unusable,
            naming the file (no voxel data is read here).
    """
    folder = Path(input_dir)
    if not folder.exists():
        raise DatasetNotFoundError(f"{folder}: the input folder does not exist. Set predict.input_dir to a folder of scans.")
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{folder}: is a file, not a folder. Set predict.input_dir to the folder that holds it.")
    wanted = f"{0 if channel is None else int(channel):04d}"
    by_case: dict[str, list[tuple[str | None, Path]]] = {}
    skipped, dicom = [], []
    for path in sorted(folder.iterdir()):
        stem = nifti_stem(path.name)
        if path.name.startswith("."):
            skipped.append(path.name)
            continue
        if stem is None:
            if path.is_dir() and is_dicom_input(path):
                dicom.append(Scan(path.name, str(path), DICOM, series_uid))
            elif path.is_file() and path.suffix.lower() == ".zip":
                dicom.append(Scan(path.stem, str(path), DICOM, series_uid))
            elif not (path.is_file() and is_dicom_input(path)):
                skipped.append(path.name)
            continue
        if not path.is_file():
            skipped.append(path.name)
            continue
        match = _CHANNEL_SUFFIX.match(stem)
        case_id, file_channel = (match.group("case"), match.group("channel")) if match else (stem, None)
        by_case.setdefault(case_id, []).append((file_channel, path))
    if _loose_dicom_files(folder):
        dicom.append(Scan(folder.name, str(folder), DICOM_FILES, series_uid))
    if skipped:
        logger.info("Skipped %d entries of %s that are not scans: %s", len(skipped), folder, skipped[:5])
    if not by_case and not dicom:
        raise EmptyDatasetError(
            f"{folder}: holds no scan (`<case>_0000.nii.gz`, `<case>.nii.gz`, or DICOM series in subfolders or .zip files). "
            "Point predict.input_dir at a folder of scans."
        )
    # Every header, before any prediction; what each series lacks is kept for the outputs' checks.
    dicom = [replace(scan, missing_uids=check_dicom_series(scan.dicom_source(), series_uid).missing_uids) for scan in dicom]
    blank = [f"{scan.case_id} (no {', '.join(scan.missing_uids)})" for scan in dicom if scan.missing_uids]
    if blank:
        logger.warning(
            "%d of %d DICOM series lack the UIDs a SEG references: %s. They get their NIfTI masks, and their rows in "
            "predictions.csv say why they have no SEG; predict.generate_missing_uids=true writes their SEGs over new UIDs.",
            len(blank), len(dicom), "; ".join(blank[:5]) + ("; ..." if len(blank) > 5 else ""),
        )
    scans = []
    for case_id, files in sorted(by_case.items()):
        if any(ch is None for ch, _ in files) and len(files) > 1:
            raise ConfigurationError(
                f"{folder}: case '{case_id}' has several files ({[p.name for _, p in files]}); keep one "
                f"`{case_id}.nii.gz` or channel files `{case_id}_0000.nii.gz`, ..."
            )
        chosen = [p for ch, p in files if ch in (None, wanted)] if len(files) > 1 else [files[0][1]]
        if not chosen:
            raise ConfigurationError(
                f"{folder}: case '{case_id}' has channel files {[p.name for _, p in files]} but not `_{wanted}`, "
                "the channel the model was trained on."
            )
        read_header_geometry(chosen[0])  # a corrupt header fails here, before any prediction
        scans.append(Scan(case_id, str(chosen[0])))
    return sorted(scans + dicom, key=lambda scan: scan.case_id)


def check_output_folder(input_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """The output folder, refused when it is the input folder, inside it, or a file: the
    input folder is never written to. Symlinks are followed."""
    source, target = Path(input_dir).resolve(), Path(output_dir).resolve()
    if target == source or source in target.parents:
        raise ConfigurationError(
            f"predict.output_dir={output_dir} is inside predict.input_dir={input_dir}; medseg never writes into "
            "the input folder. Choose another output folder."
        )
    if target.exists() and not target.is_dir():
        raise ConfigurationError(f"predict.output_dir={output_dir} is a file. Choose a folder.")
    return target


def _stage_mask(job: tuple[Scan, Any, Path]) -> dict:
    """Make one scan's mask and row (on a Dask worker, or here) and write the mask into the
    staging folder; returns the row."""
    scan, made, staging, *network = job
    start = time.perf_counter()
    mask, row, *writers = made() if callable(made) else made
    mask_path = staging / f"{scan.case_id}.nii.gz"
    write_volume(mask, mask_path)
    writers = dict(writers[0] or {}) if writers else {}
    audit = writers.pop("audit", None)
    files = {"nifti": mask_path}
    for kind, writer in writers.items():
        if writer is not None:
            name = f"{scan.case_id}{DICOM_OUTPUTS[kind]}"
            row = {**row, f"{kind}_file": name, f"{kind}_sop_instance_uid": writer(mask, staging / name)}
            files[kind] = staging / name
    if audit is not None:
        seconds = {"network": network[0] if network else 0.0, "mapping_and_writing": time.perf_counter() - start}
        row = {**row, **audit(staging / f"{scan.case_id}{AUDIT_SUFFIX}", scan.case_id, row, files, seconds)}
    return {"case_id": scan.case_id, **row}


def _driver_part(segment: Callable[[Scan], Any], staging: Path) -> Callable[[Scan], tuple[Scan, Any, Path]]:
    def prepare(scan: Scan) -> tuple[Scan, Any, Path, float]:
        start = time.perf_counter()
        made = segment(scan)
        if isinstance(made, DriverThenWorker):
            made = partial(made.worker, made.driver())
        return scan, made, staging, time.perf_counter() - start  # the network's time, for the audit

    return prepare


def check_targets(folder: Path, names: list[str]) -> None:
    """Refuse, before any scan is segmented, two cases that would write the same mask, and a
    target that publishing could not replace (:func:`medseg.storage.publishing.check_replaceable`)."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigurationError(f"{folder / repeated[0]}: two scans give the case id {repeated[0]!r}; rename one of them.")
    check_replaceable(folder, names)


def write_predictions(
    scans: Iterable[Scan],
    segment: Callable[[Scan], Any],
    output_dir: str | os.PathLike,
    mapper: Callable[..., list] | None = None,
    outputs: Sequence[str] = ("nifti", "seg"),
) -> pd.DataFrame:
    """Segment each scan and publish the masks and `predictions.csv` together.

    Each mask goes to a staging folder inside `output_dir` as soon as it is made (one case in
    memory at a time per process); only when every scan has succeeded are they moved into
    `output_dir` (:func:`medseg.storage.publishing.publish_files`: a rename each, replacing masks of the
    same name), then the table. On any error the staging folder is removed and `output_dir`
    keeps what it held; files of other names in it (a user's own) are left alone.

    Args:
        scans: the scans to segment.
        segment: `scan -> (mask, row)`, or a :class:`medseg.casework.DriverThenWorker` whose
            result is `(mask, row)` or `(mask, row, writers)`: its driver part (the network)
            runs here and its worker part (inverse geometry, volumes) where `mapper` runs
            tasks, which also write the mask, and for a DICOM scan each of `writers`
            ({"seg": ..., "rtstruct": ...}; `audit` writes the audit record) as `writer(mask, path)`, which
            writes that DICOM object and returns its SOPInstanceUID. The row holds the
            table's columns for that case (`case_id`, and `<kind>_file` and
            `<kind>_sop_instance_uid` for each DICOM object, are added).
        outputs: what is published: `nifti` (the masks), and the DICOM objects the writers
            made. The masks are made either way (the DICOM objects are drawn from them).
        output_dir: the folder to write; created if missing. Under a Dask scheduler the
            workers write into it, so it must be on storage they share.
        mapper: a `medseg.runs.compute` executor's `map` (default: this process, in order).

    Returns:
        The table written as `predictions.csv`, one row per case.
    """
    target = Path(output_dir)
    scans = list(scans)
    dicom = [f"{scan.case_id}{DICOM_OUTPUTS[kind]}" for scan in scans if scan.is_dicom for kind in DICOM_OUTPUTS if kind in outputs]
    masks = [f"{scan.case_id}.nii.gz" for scan in scans] if "nifti" in outputs else []
    audits = [f"{scan.case_id}{AUDIT_SUFFIX}" for scan in scans]
    check_targets(target, [*masks, *dicom, *audits, PREDICTIONS_TABLE])
    with staging_folder(target, prefix=".medseg-predict-staging-") as staging:
        rows = (mapper or map_in_order)(
            _stage_mask, scans, task="Segmenting", case_ids=[scan.case_id for scan in scans],
            prepare=_driver_part(segment, staging),
        )
        table = pd.DataFrame(rows)
        spreadsheet_safe(table).to_csv(staging / PREDICTIONS_TABLE, index=False)
        published = [f"{row['case_id']}.nii.gz" for row in rows] if "nifti" in outputs else []
        published += [row[f"{kind}_file"] for row in rows for kind in DICOM_OUTPUTS if row.get(f"{kind}_file")]
        published += [row["audit_file"] for row in rows if row.get("audit_file")]
        publish_files(staging, target, [*published, PREDICTIONS_TABLE])
    return table


def segmented_scan_with_qc(parts_and_qc: tuple[Any, Mapping[str, Any]], **kwargs: Any) -> tuple[Volume, dict, Any]:
    """`segmented_scan` of a driver that also gave the scan's QC columns: they join its row,
    and a DICOM SEG's series description says when a flag is raised."""
    parts, qc = parts_and_qc
    writers = kwargs.pop("write_seg", None)
    if writers and qc.get("qc_flags"):
        writers = {kind: partial(writer, qc_flags=qc["qc_flags"]) if writer is not None and kind in DICOM_OUTPUTS
                   else writer for kind, writer in writers.items()}
    return segmented_scan(parts, extra={**kwargs.pop("extra"), **qc}, write_seg=writers, **kwargs)


def segmented_scan(
    parts: Any, finish: Callable[[Any], Volume], classes: Mapping[str, str], extra: Mapping[str, Any],
    write_seg: Mapping[str, Callable[..., Any] | None] | None = None,
) -> tuple[Volume, dict, Any]:
    """A scan's mask on its own grid and its `predictions.csv` row, from what a segmenter's
    `network_part` gave and its `finisher()`: the worker part of a prediction (no network).
    `write_seg` (the writers by output kind: `seg`, `rtstruct`, `audit`) goes back with them,
    for `write_predictions` to call."""
    mask = finish(parts)
    return mask, {**volumes_ml(mask, classes), **extra}, write_seg
