"""Nodes of the `predict` pipeline: thin wrappers around `medseg.inference` and `medseg.serving.model`.

The segmenter comes from `predict.model`: this project's last trained `unet` or `conv3d`
(catalog entries `<model>.segmenter_folder`), or an MLflow model URI. It carries the training run's
plan (spacing, crop, normalization, classes), so new scans are preprocessed exactly as the
training cases were; nothing is recomputed from the new scans.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from functools import partial
from pathlib import Path

import pandas as pd

from medseg.runs import compute
from medseg.casework import DriverThenWorker
from medseg.storage.paths import anchor_path
from medseg.dicom.uids import with_generated_uids
from medseg.errors import ConfigurationError, MedsegError
from medseg.evaluation.viewer import NIIVUE_SCRIPT, write_viewer_page
from medseg.imaging.io import read_volume
from medseg.inference.audit import AuditWriter, hashed_uid_columns, library_versions
from medseg.inference.ensemble import load_for_profile, read_any_plan
from medseg.inference.scans import (
    RtstructWriter,
    Scan,
    SegWriter,
    check_output_folder,
    lineage,
    list_scans,
    medseg_version,
    segmented_scan_with_qc,
    write_predictions,
)
from medseg.parameters import PredictParams
from medseg.runs import tracking
from medseg.serving.model import fetch_segmenter

from . import pacs

logger = logging.getLogger(__name__)


def _folders(predict: PredictParams, project_root: str) -> tuple[Path | None, Path]:
    """(input folder, output folder); the input is None for scans from a DICOMweb server."""
    web = predict.get("dicomweb")
    if web and predict.get("input_dir"):
        raise ConfigurationError(
            "predict.input_dir and predict.dicomweb are both set; give one: the scans come from a folder or from a "
            "DICOMweb server."
        )
    missing = [name for name in (() if web else ("input_dir",)) + ("output_dir",) if not predict.get(name)]
    if missing:
        raise ConfigurationError(
            f"predict.{' and predict.'.join(missing)} not set: kedro run --pipeline predict --params "
            "predict.input_dir=/abs/scans,predict.output_dir=/abs/masks"
        )
    output = anchor_path(predict["output_dir"], project_root)
    if web:
        return None, check_output_folder(Path(tempfile.gettempdir()) / "medseg-no-input", output)
    input_dir = anchor_path(predict["input_dir"], project_root)
    return input_dir, check_output_folder(input_dir, output)


def list_scans_to_predict(
    predict: PredictParams, project_root: str, dicomweb_answers: str, **local_segmenters: str
) -> tuple[pd.DataFrame, dict[str, str]]:
    """List the scans of `predict.input_dir` and check their headers, before anything is written.

    Args:
        predict: `params:predict` (model, input_dir, output_dir). Relative folders are taken
            from the project root.
        project_root: the project's root folder (catalog entry `project_root`).
        dicomweb_answers: the folder of `answers.csv`, the series a DICOMweb run answered
            (catalog entry `predict.dicomweb_answers`; `medseg.pipelines.predict.pacs`).
        local_segmenters: {model: folder} of this project's trained segmenters (catalog
            entries `<model>.segmenter_folder`, one per model kind).

    Returns:
        One row per case (case_id, image_path), and the segmenter to run: {"folder": its local
        folder (downloaded for a model URI), "uri": the model URI to record}. A multi-channel
        case given as channel files (`<case>_0000`, `<case>_0001`) gives the file of the
        channel the model was trained on.

    Raises:
        ConfigurationError: a folder is missing from the parameters, the output folder is
            the input folder or inside it, or `predict.model` is not a segmenter.
        DatasetNotFoundError, EmptyDatasetError, CorruptFileError: the input folder or a scan.
    """
    input_dir, _ = _folders(predict, project_root)
    folder, model_uri = fetch_segmenter(str(predict["model"]), local_segmenters)
    source = {"folder": folder, "uri": model_uri}
    if input_dir is None:  # a DICOMweb server's series, in a staging folder of this run's
        scans, source["staging"], source["skipped"] = pacs.fetch_series(
            predict["dicomweb"], pacs.server_of(predict["dicomweb"]), model_uri, dicomweb_answers)
    else:
        scans = list_scans(input_dir, read_any_plan(folder).channel, predict.get("series_uid"))
        logger.info("predict: %d scans in %s (%d DICOM).", len(scans), input_dir, sum(scan.is_dicom for scan in scans))
    _check_some_output(scans, predict)
    table = pd.DataFrame([{"case_id": scan.case_id, "image_path": scan.path, "format": scan.format} for scan in scans],
                         columns=["case_id", "image_path", "format"])
    return table, source


def _source_of(scan: Scan) -> str:
    """Where a scan came from, for its audit record: `zip: <path>`, `folder: <path>`, `file: <path>`."""
    path = Path(scan.path)
    kind = "zip" if path.suffix.lower() == ".zip" else "folder" if path.is_dir() else "file"
    return f"{kind}: {path}"


def _check_some_output(scans: list[Scan], predict: PredictParams) -> None:
    """Refuse, before any work, a run in which no scan can give any output `predict.outputs`
    asks for: only DICOM objects asked, and no DICOM series with the UIDs they reference; and
    `predict.viewer` without what a page needs (the NIfTI masks, NiiVue's script)."""
    outputs = list(predict.get("outputs") or ("nifti", "seg"))
    if predict.get("viewer"):
        if "nifti" not in outputs:
            raise ConfigurationError(f"predict.viewer draws each scan's NIfTI mask, but predict.outputs={outputs} leaves "
                                     "out nifti. Add nifti to predict.outputs, or set predict.viewer=false.")
        if not NIIVUE_SCRIPT.is_file():
            raise ConfigurationError(f"predict.viewer: NiiVue's script {NIIVUE_SCRIPT} is missing. Run `make niivue` once "
                                     "(it fetches the pinned version from the npm registry), or set predict.viewer=false.")
    if "nifti" in outputs or not scans:
        return
    dicom = [scan for scan in scans if scan.is_dicom]
    generate = bool(predict.get("generate_missing_uids"))
    able = [scan for scan in dicom if generate or not scan.missing_uids]  # as list_scans found them
    if not able:
        raise ConfigurationError(
            f"predict.outputs={outputs} asks only for DICOM objects, and none of the {len(scans)} scans can give one: "
            f"{len(scans) - len(dicom)} are NIfTI, {len(dicom)} are DICOM series without the UIDs a DICOM object "
            "references. Add nifti to predict.outputs, or set predict.generate_missing_uids=true for such series."
        )


def write_pages(scans: list[Scan], segmenter, output_dir: Path, classes: dict[int, str]) -> int:
    """`<case>.html` beside each published mask (`medseg.evaluation.viewer`): the scan, read
    again, with its mask as the overlay. Scans without a NIfTI mask (`predict.outputs` without
    `nifti`) get none. Returns the pages written."""
    written = 0
    for scan in scans:
        mask_path = output_dir / f"{scan.case_id}.nii.gz"
        if not mask_path.is_file():
            continue
        try:  # the masks and DICOM objects are out already: a page that fails costs only itself
            volume = scan.read_series().volume if scan.is_dicom else segmenter.read_scan(scan.path)
            mask = read_volume(mask_path, role="label")
            write_viewer_page(output_dir / f"{scan.case_id}.html", volume, mask, None,
                              {str(v): n for v, n in classes.items()}, title=scan.case_id)
            written += 1
        except MedsegError as exc:
            logger.warning("predict: no viewer page for %s: %s", scan.case_id, exc)
    logger.info("predict: %d viewer pages written beside the masks.", written)
    return written


def segment_scans(
    scans: pd.DataFrame, model: dict[str, str], predict: PredictParams, project_root: str, dicomweb_answers: str
) -> pd.DataFrame:
    """Segment every scan and write `<output_dir>/<case>.nii.gz` and `predictions.csv`.

    Each mask is a uint8 label map on exactly its scan's grid (shape and affine; a trailing
    channel axis dropped), holding the dataset's label values. The masks are published only
    once every scan has succeeded: a bad scan fails the run naming its file, and the output
    folder keeps what it held.

    Args:
        scans: output of `list_scans_to_predict`.
        predict: `params:predict`; `mirror_axes` and `keep_largest_component` override the
            model's postprocessing when not null.
        project_root: the project's root folder.
        model: the segmenter that `list_scans_to_predict` found.

    Returns:
        The table written as `predictions.csv`: case_id, volume_ml (and volume_ml_<class> with
        several classes), the QC columns (`qc_score`, `qc_flags`, `qc_reason` and each flag's
        score: `medseg.inference.qc`), model_uri, engine and profile (`predict.engine`, `predict.profile`; `plan`: the model's own setting), medseg_version, and the lineage of DICOM scans
        (study_instance_uid, series_instance_uid, uids_generated, dicom_outputs_note, seg_file,
        seg_sop_instance_uid: a series without its UIDs gets no SEG unless
        `predict.generate_missing_uids`, and its note says so); also logged
        to the MLflow run, with the source model URI as a tag and the scans as the run's input
        dataset (case ids and a digest: no patient data).
    """
    input_dir, output_dir = _folders(predict, project_root)
    try:
        return _segment_scans(scans, model, predict, input_dir, output_dir, dicomweb_answers)
    finally:
        if model.get("staging"):
            shutil.rmtree(model["staging"], ignore_errors=True)


def _segment_scans(scans: pd.DataFrame, model: dict, predict: PredictParams, input_dir: Path | None, output_dir: Path,
                   dicomweb_answers: str) -> pd.DataFrame:
    if scans.empty:  # a DICOMweb query with nothing new
        logger.info("predict: nothing new to segment on %s; %s written to.", predict["dicomweb"]["url"],
                    "nothing was")
        return pd.DataFrame(columns=["case_id"])
    segmenter, engine, profile = load_for_profile(model["folder"], predict.get("profile"), predict.get("engine"))
    model_uri = model["uri"]
    segmenter.configure(predict.get("mirror_axes"), predict.get("keep_largest_component"))
    tracking.set_tags({"medseg.source_model_uri": model_uri, "medseg.source_model": segmenter.plan.display_name})
    logger.info(
        "predict: %s from %s on %s (profile %s); mirroring over %s, largest component %s.", segmenter.plan.display_name,
        model_uri, engine, profile,
        list(segmenter.effective_mirror_axes()) or "no axes", "kept" if segmenter.plan.keep_largest_component else "off",
    )
    outputs = list(predict.get("outputs") or ("nifti", "seg"))
    web = predict.get("dicomweb")
    version, alias = tracking.model_version(model_uri)
    software, hash_uids = library_versions(), bool(predict.get("hash_uids"))
    finish = segmenter.finisher()
    classes = {int(value): name for value, name in segmenter.plan.classes.items()}
    row = {"model_uri": model_uri, "engine": engine, "profile": profile, "medseg_version": medseg_version()}

    def segment(scan: Scan) -> DriverThenWorker:
        series = scan.read_series() if scan.is_dicom else None
        generated: tuple[str, ...] = ()
        if series is not None and series.missing_uids and predict.get("generate_missing_uids"):
            series, generated = with_generated_uids(series)
        volume = series.volume if series is not None else segmenter.read_scan(scan.path)
        writers = None
        if series is not None and not series.missing_uids:  # a DICOM output references its source by its UIDs
            name = segmenter.plan.display_name
            writers = {"seg": SegWriter(series, classes, name, model_uri, labelmap=predict.get("seg_type") == "labelmap")
                       if "seg" in outputs else None,
                       "rtstruct": RtstructWriter(series, classes, name, model_uri) if "rtstruct" in outputs else None}
        if series is not None:
            sop_uids = tuple(str(d.get("SOPInstanceUID", "") or "") for d in series.datasets)
            study_uid, series_uid = series.study_uid, series.series_uid
        else:
            sop_uids, study_uid, series_uid = (), "", ""
        audit = AuditWriter(source=f"dicomweb: {tracking.redact_urls(web['url'])}" if web else _source_of(scan), model_uri=model_uri,
                            model_version=version, model_alias=alias, study_uid=study_uid, series_uid=series_uid,
                            sop_uids=sop_uids, uids_generated=generated, hash_uids=hash_uids, software=software,
                            published=tuple(outputs))
        writers = {**(writers or {}), "audit": audit}
        columns = lineage(series, generated)
        if series is None and "nifti" not in outputs:
            columns["dicom_outputs_note"] = ("no output: a NIfTI scan gives no DICOM object, and predict.outputs "
                                             "leaves out nifti; add nifti to have its mask")

        def network() -> tuple:
            parts = segmenter.network_part(volume, scan.path)
            return parts, segmenter.quality(volume, parts[0])  # the QC columns need the probabilities

        return DriverThenWorker(network, partial(segmented_scan_with_qc, finish=finish, classes=segmenter.plan.classes,
                                                 extra={**row, **columns}, write_seg=writers))

    items = [Scan(str(r.case_id), str(r.image_path), str(r.format), predict.get("series_uid")) for r in scans.itertuples()]
    table = write_predictions(items, segment, output_dir, mapper=compute.current().map, outputs=outputs)
    tracking.log_input_cases("predict-input", web["url"] if web else str(input_dir), table, context="inference")
    tracking.log_files([output_dir / name for name in table["audit_file"]], "predict/audit")
    logger.info("predict: %d masks and predictions.csv written to %s.", len(table), output_dir)
    if web and web.get("store", True):
        stored = pacs.store_results(pacs.server_of(web), table, output_dir, model_uri, dicomweb_answers)
        logger.info("predict: %d DICOM objects stored on %s.", len(stored), web["url"])
    if predict.get("viewer"):  # last: the results reach the PACS whatever a page does
        write_pages(items, segmenter, output_dir, classes)
    return hashed_uid_columns(table) if hash_uids else table  # what MLflow keeps
