"""The files of a prediction run: a folder of new scans in, a folder of masks out.

Input names follow nnU-Net: `<case>_0000.nii.gz` (one file per channel, `_0000` the first) or
`<case>.nii.gz`; `.nii` works too. Output: `<case>.nii.gz` per scan and `predictions.csv`.
Masks are written to a staging folder inside the output folder and moved into place only
once every scan has been segmented, so a failure leaves the output folder as it was.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg.casework import DriverThenWorker, map_in_order
from medseg.errors import ConfigurationError, DatasetNotFoundError, EmptyDatasetError
from medseg.imaging.geometry import CaseGeometry
from medseg.imaging.io import Volume, read_header_geometry, write_volume
from medseg.inference.postprocessing import LabelMapper, volumes_ml
from medseg.publishing import check_replaceable, publish_files, spreadsheet_safe, staging_folder

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
PREDICTIONS_TABLE = "predictions.csv"


@dataclass(frozen=True)
class Scan:
    case_id: str
    path: str


def nifti_stem(name: str) -> str | None:
    """`name` without `.nii.gz` or `.nii`, or None when it is not a NIfTI file name."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def case_id_of(name: str) -> str:
    """The case id of a scan's file name: `la_003_0000.nii.gz` -> `la_003`, `a.nii` -> `a`."""
    stem = nifti_stem(Path(name).name) or Path(name).name
    match = _CHANNEL_SUFFIX.match(stem)
    return match.group("case") if match else stem


def list_scans(input_dir: str | os.PathLike, channel: int | None = None) -> list[Scan]:
    """The scans of a folder, one per case, sorted by case id; headers checked.

    A case split into channel files (`<case>_0000`, `<case>_0001`, ...) gives the file of
    `channel` (0 when None). Hidden files and files that are not NIfTI are skipped (logged).

    Raises:
        DatasetNotFoundError: the folder is missing, or is a file.
        EmptyDatasetError: it holds no NIfTI file.
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
    skipped = []
    for path in sorted(folder.iterdir()):
        stem = nifti_stem(path.name)
        if path.name.startswith(".") or stem is None or not path.is_file():
            skipped.append(path.name)
            continue
        match = _CHANNEL_SUFFIX.match(stem)
        case_id, file_channel = (match.group("case"), match.group("channel")) if match else (stem, None)
        by_case.setdefault(case_id, []).append((file_channel, path))
    if skipped:
        logger.info("Skipped %d entries of %s that are not NIfTI scans: %s", len(skipped), folder, skipped[:5])
    if not by_case:
        raise EmptyDatasetError(
            f"{folder}: holds no scan (`<case>_0000.nii.gz` or `<case>.nii.gz`). Point predict.input_dir at a folder of NIfTI scans."
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
    return scans


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
    scan, made, staging = job
    mask, row = made() if callable(made) else made
    write_volume(mask, staging / f"{scan.case_id}.nii.gz")
    return {"case_id": scan.case_id, **row}


def _driver_part(segment: Callable[[Scan], Any], staging: Path) -> Callable[[Scan], tuple[Scan, Any, Path]]:
    def prepare(scan: Scan) -> tuple[Scan, Any, Path]:
        made = segment(scan)
        if isinstance(made, DriverThenWorker):
            made = partial(made.worker, made.driver())
        return scan, made, staging

    return prepare


def check_targets(folder: Path, names: list[str]) -> None:
    """Refuse, before any scan is segmented, two cases that would write the same mask, and a
    target that publishing could not replace (:func:`medseg.publishing.check_replaceable`)."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigurationError(f"{folder / repeated[0]}: two scans give the case id {repeated[0]!r}; rename one of them.")
    check_replaceable(folder, names)


def write_predictions(
    scans: Iterable[Scan],
    segment: Callable[[Scan], Any],
    output_dir: str | os.PathLike,
    mapper: Callable[..., list] | None = None,
) -> pd.DataFrame:
    """Segment each scan and publish the masks and `predictions.csv` together.

    Each mask goes to a staging folder inside `output_dir` as soon as it is made (one case in
    memory at a time per process); only when every scan has succeeded are they moved into
    `output_dir` (:func:`medseg.publishing.publish_files`: a rename each, replacing masks of the
    same name), then the table. On any error the staging folder is removed and `output_dir`
    keeps what it held; files of other names in it (a user's own) are left alone.

    Args:
        scans: the scans to segment.
        segment: `scan -> (mask, row)`, or a :class:`medseg.casework.DriverThenWorker` whose
            result is `(mask, row)`: its driver part (the network) runs here and its worker
            part (inverse geometry, volumes) where `mapper` runs tasks, which also write the
            mask. The row holds the table's columns for that case (`case_id` is added).
        output_dir: the folder to write; created if missing. Under a Dask scheduler the
            workers write into it, so it must be on storage they share.
        mapper: a `medseg.runs.compute` executor's `map` (default: this process, in order).

    Returns:
        The table written as `predictions.csv`, one row per case.
    """
    target = Path(output_dir)
    scans = list(scans)
    check_targets(target, [*(f"{scan.case_id}.nii.gz" for scan in scans), PREDICTIONS_TABLE])
    with staging_folder(target, prefix=".medseg-predict-staging-") as staging:
        rows = (mapper or map_in_order)(
            _stage_mask, scans, task="Segmenting", case_ids=[scan.case_id for scan in scans],
            prepare=_driver_part(segment, staging),
        )
        table = pd.DataFrame(rows)
        spreadsheet_safe(table).to_csv(staging / PREDICTIONS_TABLE, index=False)
        publish_files(staging, target, [*(f"{row['case_id']}.nii.gz" for row in rows), PREDICTIONS_TABLE])
    return table


def segmented_scan(
    parts: Any, finish: Callable[[Any], Volume], classes: Mapping[str, str], extra: Mapping[str, Any]
) -> tuple[Volume, dict]:
    """A scan's mask on its own grid and its `predictions.csv` row, from what a segmenter's
    `network_part` gave and its `finisher()`: the worker part of a prediction (no network)."""
    mask = finish(parts)
    return mask, {**volumes_ml(mask, classes), **extra}
