"""`predict` against a PACS: the series to segment come from a DICOMweb server
(`predict.dicomweb`), and their SEGs go back to it (`medseg.dicom.web`).

- The series are found by study and series UIDs, or by a QIDO-RS query; each is retrieved with
  WADO-RS into a staging folder of the run's own (in the system's temporary folder, never in
  the user's folders, removed when the run ends) and checked as a folder's series are.
- A query run is incremental. `answers.csv` (catalog entry `predict.dicomweb_answers`) records
  every series answered: the server, the study and series UIDs, the model URI (its version), and
  what was stored (each object's series and SOP Instance UIDs). A series the same model answered on the same
  server is skipped when the server still holds what was stored (a QIDO-RS search for those
  instances, nothing more), and the run says what it skipped.
- A series the reader refuses (a localizer, a gap, a missing decoder) is skipped in a query run,
  listed with its reason; a series named by its UIDs is an error instead.
- Each series' SEG (and RTSTRUCT, when asked) is stored with STOW-RS as new series of its
  source study, once every mask has been written; each series' results are recorded at once. If the server fails part way, the run stops,
  naming what was stored and what was not; a second run stores the rest.
- Credentials are read by name (`predict.dicomweb.credentials`, `medseg.runs.credentials`) in
  the driver only: no Dask task carries them, and no message or record names them.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from medseg.dicom.series import NON_IMAGE_MODALITIES, DicomError, check_dicom_series
from medseg.dicom.web import DicomWebError, DicomWebServer, SeriesRef, find_series, instances_present, retrieve_series, store
from medseg.inference.scans import DICOM, DICOM_OUTPUTS, Scan
from medseg.runs import credentials
from medseg.storage.publishing import atomic_path

logger = logging.getLogger(__name__)
STAGES = logging.getLogger("medseg.stages")  # what a default `kedro run` shows

ANSWERS_FILE = "answers.csv"
# `stored`: what was stored for the series, `<series UID>/<SOP Instance UID>` each, `;`-separated
# (its SEG, and its RTSTRUCT when asked).
ANSWER_COLUMNS = ["server", "study_instance_uid", "series_instance_uid", "model_uri", "stored", "answered_at"]


def server_of(web: dict) -> DicomWebServer:
    """The server of `predict.dicomweb`, its credentials read by name."""
    secret = credentials.named(web["credentials"], "predict.dicomweb.credentials") if web.get("credentials") else None
    return DicomWebServer.of(web["url"], secret, float(web.get("timeout_s") or 60.0))


def read_answers(folder: str) -> pd.DataFrame:
    path = Path(folder) / ANSWERS_FILE
    if not path.exists():
        return pd.DataFrame(columns=ANSWER_COLUMNS)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def record_answer(folder: str, record: dict) -> None:
    """Add one answered series to `answers.csv`, written whole under a temporary name and then
    renamed: a crash leaves the previous file."""
    table = pd.concat([read_answers(folder), pd.DataFrame([record], columns=ANSWER_COLUMNS)], ignore_index=True)
    path = Path(folder) / ANSWERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        table.to_csv(temporary, index=False)


def fetch_series(web: dict, server: DicomWebServer, model_uri: str, answers_folder: str) -> tuple[list[Scan], str, list[str]]:
    """The series to segment, retrieved into a staging folder.

    Returns:
        The scans (case id: the series UID), the staging folder (the caller removes it), and
        what was skipped, one line each.

    Raises:
        DicomWebError: a request failed; DicomError: a series named by its UIDs is refused.
    """
    refs = find_series(server, web.get("study_uid"), web.get("series_uid"), web.get("query"))
    by_uid = web.get("series_uid") is not None
    answered = read_answers(answers_folder)
    answered = answered[(answered["server"] == server.url) & (answered["model_uri"] == model_uri)]
    skipped, todo = [], []
    for ref in refs:
        if ref.modality.upper() in NON_IMAGE_MODALITIES:  # a SEG or RTSTRUCT (this run's own, earlier), a report...
            if by_uid:
                raise DicomWebError(
                    f"{server.url}: series {ref.series_uid} is a {ref.modality} series, not an image to segment. Give "
                    "predict.dicomweb.series_uid the image series it was made over."
                )
            skipped.append(f"series {ref.series_uid}: a {ref.modality} series, not an image to segment")
            continue
        done = answered[answered["series_instance_uid"] == ref.series_uid]
        if len(done) and _still_stored(server, ref, done.iloc[-1]):
            skipped.append(f"series {ref.series_uid}: answered by this model on {done.iloc[-1]['answered_at']}, its results still on the server")
            continue
        todo.append(ref)
    staging = tempfile.mkdtemp(prefix="medseg-dicomweb-")
    scans = []
    try:
        for ref in todo:
            folder = Path(staging) / ref.series_uid
            retrieve_series(server, ref, folder)
            try:
                check = check_dicom_series(folder)
            except DicomError as error:
                if by_uid:
                    raise
                skipped.append(f"series {ref.series_uid} ({ref.modality} {ref.description!r}): {error}")
                shutil.rmtree(folder, ignore_errors=True)
                continue
            scans.append(Scan(ref.series_uid, str(folder), DICOM, missing_uids=check.missing_uids))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("predict: %d series on %s, %d to segment, %d skipped.", len(refs), server.url, len(scans), len(skipped))
    for line in skipped:
        logger.info("predict: skipped %s", line)
    STAGES.info("          %s: %d series found, %d to segment, %d skipped%s", server.url, len(refs), len(scans),
                len(skipped), f" (answered before: {sum('answered by this model' in line for line in skipped)})"
                if skipped else "")
    return scans, staging, skipped


def _still_stored(server: DicomWebServer, ref: SeriesRef, record: pd.Series) -> bool:
    by_series: dict[str, list[str]] = {}
    for item in str(record.get("stored", "")).split(";"):
        if "/" in item:
            series, sop = item.split("/", 1)
            by_series.setdefault(series, []).append(sop)
    if not by_series:
        return False
    return all(instances_present(server, ref.study_uid, series, sops) for series, sops in by_series.items())


def store_results(server: DicomWebServer, table: pd.DataFrame, output_dir: Path, model_uri: str, answers_folder: str) -> list[str]:
    """Store each row's SEG on the server and record it; the SOP Instance UIDs stored.

    Raises:
        DicomWebError: a store failed; the message names what was stored before it.
    """
    import pydicom

    stored: list[str] = []
    kinds = tuple(DICOM_OUTPUTS)
    rows = [row for row in table.to_dict("records") if any(row.get(f"{kind}_file") for kind in kinds)]
    for index, row in enumerate(rows):
        paths = [output_dir / str(row[f"{kind}_file"]) for kind in kinds if row.get(f"{kind}_file")]
        try:
            uids = store(server, paths, str(row["study_instance_uid"]))
        except DicomWebError as error:
            done = f"{index} of {len(rows)} series' results were stored ({', '.join(stored) or 'none'})"
            raise DicomWebError(
                f"{error} {done}; the rest were not, and their masks and DICOM objects are in {output_dir}. Run again "
                "to store them: what was stored is recorded and skipped."
            ) from None
        series = [str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID) for path in paths]
        record_answer(answers_folder, {
            "server": server.url, "study_instance_uid": row["study_instance_uid"],
            "series_instance_uid": row["series_instance_uid"], "model_uri": model_uri,
            "stored": ";".join(f"{s}/{u}" for s, u in zip(series, uids)),
            "answered_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        stored.extend(uids)
        logger.info("predict: stored %s on %s (%d of %d).", ", ".join(p.name for p in paths), server.url, index + 1, len(rows))
    STAGES.info("          %s: the results of %d series stored", server.url, len(rows))
    return stored
