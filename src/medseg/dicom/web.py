"""DICOMweb in and out: series found with QIDO-RS, retrieved with WADO-RS, results stored back
with STOW-RS, through `dicomweb-client` (the DICOMweb client that highdicom's authors keep).

A :class:`DicomWebServer` is a server's base URL (Orthanc's `http://host:8042/dicom-web`) and
its credentials: basic (`username`, `password`) or a bearer `token`. Its `repr` and every
message name the URL only, never a secret.

What can go wrong is a :class:`DicomWebError` that names the server, the request and the fix:

- unreachable: nothing answers at the URL (connection refused, DNS, timeout);
- refused: 401 or 403, the credentials are wrong or missing;
- not found: 404, a study or series UID the server does not hold, or a URL that is not the
  server's DICOMweb root;
- an answer that is not DICOM (an HTML login page, a proxy's error page);
- any other HTTP error, with its status.

Retrieval asks for each instance as stored (`transfer-syntax=*`, no transcoding) and writes it as
a Part 10 file into a folder of the caller's (the run's staging), counting bytes against :attr:`medseg.storage.limits.Limits.max_scan_bytes`, so a
series costs at most that on disk; the files are then checked as a folder's series are.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from medseg.errors import MedsegError
from medseg.storage.limits import describe, limits

__all__ = ["DicomWebError", "DicomWebServer", "SeriesRef", "find_series", "instances_present", "retrieve_series", "store"]

# Only what QIDO-RS may filter series on is passed on (PS3.18 10.6.1.2.2, and the study's).
QUERY_KEYS = frozenset({
    "Modality", "StudyDate", "StudyTime", "SeriesDescription", "SeriesNumber", "BodyPartExamined",
    "StudyDescription", "AccessionNumber", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
    "PerformedProcedureStepStartDate", "ModalitiesInStudy", "InstitutionName",
})


class DicomWebError(MedsegError):
    """A DICOMweb request that failed: the server, the request and the fix are in the message."""


@dataclass(frozen=True)
class DicomWebServer:
    """A DICOMweb server and how to authenticate; the secrets never show in `repr`."""

    url: str
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    timeout_s: float = 60.0

    @classmethod
    def of(cls, url: str, credentials: Mapping[str, Any] | None = None, timeout_s: float = 60.0) -> DicomWebServer:
        """A server from its URL and a credentials entry: `{username, password}` or `{token}`.

        Raises:
            DicomWebError: a URL that is not http(s), or credentials of neither form.
        """
        url = str(url or "").rstrip("/")
        if not re.match(r"^https?://[^/\s]+", url):
            raise DicomWebError(
                f"predict.dicomweb.url={url!r} is not an http:// or https:// URL. Give the server's DICOMweb root, "
                "e.g. http://pacs.example.org:8042/dicom-web for Orthanc."
            )
        if re.match(r"^https?://[^/\s]*@", url):
            raise DicomWebError(
                "predict.dicomweb.url holds a user name or password before its host; give the URL without them and put "
                "them in conf/local/credentials.yml, named by predict.dicomweb.credentials, so that no log or record "
                "shows them."
            )
        credentials = dict(credentials or {})
        unknown = sorted(set(credentials) - {"username", "password", "token"})
        if unknown or ("token" in credentials and "username" in credentials) or (("username" in credentials) != ("password" in credentials)):
            raise DicomWebError(
                f"the credentials for {url} have the keys {sorted(credentials)}; give `username` and `password` (basic) "
                "or `token` (bearer) in conf/local/credentials.yml."
            )
        return cls(url, credentials.get("username"), credentials.get("password"), credentials.get("token"), float(timeout_s))

    def client(self):
        """A `dicomweb_client.DICOMwebClient` with this server's authentication, which retries
        only a server that says it is busy (429, 503), a few times."""
        import requests
        from dicomweb_client import DICOMwebClient

        session = requests.Session()
        if self.username is not None:
            session.auth = (self.username, self.password or "")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        client = DICOMwebClient(self.url, session=session, headers=headers, timeout=self.timeout_s)
        client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=200,
                                     retriable_error_codes=(429, 503))
        return client


@dataclass(frozen=True)
class SeriesRef:
    """A series on the server: its study and series UIDs, and what QIDO-RS said of it."""

    study_uid: str
    series_uid: str
    modality: str = ""
    description: str = ""
    number: str = ""
    instances: int | None = None


def find_series(
    server: DicomWebServer,
    study_uid: str | None = None,
    series_uid: str | None = None,
    query: Mapping[str, Any] | None = None,
) -> list[SeriesRef]:
    """The series that a study and series UID name, or that a QIDO-RS query finds.

    Args:
        study_uid, series_uid: one study's series (study only), or one series (both).
        query: QIDO-RS filters by DICOM keyword, e.g. `{"Modality": "CT", "StudyDate":
            "20240101-20241231"}`; only :data:`QUERY_KEYS` are accepted.

    Raises:
        DicomWebError: the request failed (see the module), a series UID without its study,
            an unknown query key, or nothing given to search by.
    """
    query = dict(query or {})
    unknown = sorted(set(query) - QUERY_KEYS)
    if unknown:
        raise DicomWebError(
            f"predict.dicomweb.query has keys {unknown} that a QIDO-RS series search does not take. Use DICOM keywords "
            f"among {sorted(QUERY_KEYS)}."
        )
    if series_uid and not study_uid:
        raise DicomWebError("predict.dicomweb.series_uid needs its study_uid too: WADO-RS retrieves a series within its study.")
    if not (study_uid or query):
        raise DicomWebError(
            f"nothing to search {server.url} by: give predict.dicomweb.study_uid (and series_uid), or a query "
            "(predict.dicomweb.query: {Modality: CT, StudyDate: 20240101-20241231})."
        )
    filters = {key: str(value) for key, value in query.items()}
    if series_uid:
        filters["SeriesInstanceUID"] = str(series_uid)
    request = f"QIDO-RS search for series ({', '.join(f'{k}={v}' for k, v in filters.items()) or 'the whole study'}"
    request += f"{', StudyInstanceUID=' + str(study_uid) if study_uid else ''})"
    fields = ["Modality", "SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances", "StudyInstanceUID"]
    with _request(server, request):
        found = server.client().search_for_series(study_instance_uid=study_uid or None, search_filters=filters,
                                                  fields=fields, get_remaining=True)
    if not isinstance(found, list):
        raise DicomWebError(f"{server.url}: the answer to the {request} is not a DICOM JSON list. Check the URL is the DICOMweb root.")
    refs = []
    for item in found:
        values = {key: _json_value(item, tag) for key, tag in _TAGS.items()}
        if not values["SeriesInstanceUID"] or not (values["StudyInstanceUID"] or study_uid):
            continue
        count = values["NumberOfSeriesRelatedInstances"]
        refs.append(SeriesRef(values["StudyInstanceUID"] or str(study_uid), values["SeriesInstanceUID"], values["Modality"],
                              values["SeriesDescription"], values["SeriesNumber"], int(count) if str(count).isdigit() else None))
    if series_uid and not refs:
        raise DicomWebError(
            f"{server.url}: no series {series_uid} in study {study_uid} (the {request} found none). Check both UIDs, "
            "or search with predict.dicomweb.query."
        )
    return sorted(refs, key=lambda ref: (ref.study_uid, ref.series_uid))


_TAGS = {
    "StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "Modality": "00080060",
    "SeriesDescription": "0008103E", "SeriesNumber": "00200011", "NumberOfSeriesRelatedInstances": "00201209",
}


def _json_value(item: Mapping[str, Any], tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else ""


def retrieve_series(server: DicomWebServer, ref: SeriesRef, folder: Path) -> list[Path]:
    """WADO-RS: every instance of `ref` as a Part 10 file in `folder` (made here), at most
    `MEDSEG_MAX_SCAN_MB` in all.

    Raises:
        DicomWebError: the request failed, an instance is not DICOM, or the series is larger
            than the limit (the files written so far are left for the caller to remove).
    """
    folder.mkdir(parents=True, exist_ok=True)
    budget = limits().max_scan_bytes
    request = f"WADO-RS retrieval of series {ref.series_uid} of study {ref.study_uid}"
    paths, total = [], 0
    with _request(server, request):
        # As stored (`transfer-syntax=*`): without it a server must transcode to Explicit VR Little
        # Endian, and one that cannot (Debian's Orthanc, for JPEG 2000) answers 500. The reader
        # decodes, or names the package its transfer syntax needs.
        instances = server.client().iter_series(ref.study_uid, ref.series_uid, media_types=(("application/dicom", "*"),))
        for index, dataset in enumerate(instances):
            if not isinstance(dataset, Dataset):
                raise DicomWebError(f"{server.url}: the {request} answered something that is not a DICOM instance.")
            path = folder / f"{index:05d}.dcm"
            dataset.save_as(path, enforce_file_format=False)
            total += path.stat().st_size
            paths.append(path)
            if total > budget:
                raise DicomWebError(
                    f"{server.url}: the {request} is above {describe(budget, 'bytes')} after {len(paths)} instances "
                    "(MEDSEG_MAX_SCAN_MB). Refused; raise MEDSEG_MAX_SCAN_MB for a larger series."
                )
    if not paths:
        raise DicomWebError(f"{server.url}: the {request} answered no instance. Check the series on the server.")
    return paths


def store(server: DicomWebServer, paths: Sequence[Path], study_uid: str) -> list[str]:
    """STOW-RS: store the DICOM files of `paths` (a result: SEG, RTSTRUCT) in `study_uid`.

    Returns:
        The SOP Instance UIDs the server says it stored.

    Raises:
        DicomWebError: the request failed, or the server stored fewer than it was sent.
    """
    import pydicom

    datasets = [pydicom.dcmread(path) for path in paths]
    request = f"STOW-RS of {len(datasets)} instance{'s' if len(datasets) != 1 else ''} into study {study_uid}"
    with _request(server, request):
        answer = server.client().store_instances(datasets, study_instance_uid=study_uid)
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        reasons = [str(item.get("FailureReason", "?")) for item in failed]
        raise DicomWebError(
            f"{server.url}: the {request} failed for {len(failed)} instance{'s' if len(failed) != 1 else ''} (failure "
            f"reasons {reasons}, PS3.18 Table I.2-1). Check the server's log and its storage."
        )
    return [str(ds.SOPInstanceUID) for ds in datasets]


def instances_present(server: DicomWebServer, study_uid: str, series_uid: str, sop_uids: Sequence[str]) -> bool:
    """Whether the server still holds every one of `sop_uids` in that series (QIDO-RS); a
    series the server no longer has is not an error, it is absent."""
    request = f"QIDO-RS search for the instances of series {series_uid}"
    try:
        with _request(server, request):
            found = server.client().search_for_instances(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                                         fields=["SOPInstanceUID"], get_remaining=True)
    except DicomWebError as error:
        if "not found" in str(error):
            return False
        raise
    held = {_json_value(item, "00080018") for item in found or []}
    return set(sop_uids) <= held


@contextlib.contextmanager
def _request(server: DicomWebServer, request: str) -> Iterator[None]:
    """Turn what `requests` and `dicomweb-client` raise into a :class:`DicomWebError`."""
    import requests

    try:
        yield
    except DicomWebError:
        raise
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise DicomWebError(
                f"{server.url} refused the {request} (HTTP {status}): the credentials are wrong or missing. Check the "
                "credentials named by predict.dicomweb.credentials in conf/local/credentials.yml."
            ) from None
        if status == 404:
            raise DicomWebError(
                f"{server.url}: not found (HTTP 404) for the {request}. Check the UIDs, and that the URL is the "
                "server's DICOMweb root (Orthanc: http://host:8042/dicom-web)."
            ) from None
        raise DicomWebError(f"{server.url} answered HTTP {status} to the {request}. Check the server's log.") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise DicomWebError(
            f"{server.url} is unreachable for the {request} ({type(exc).__name__}). Check the URL and that the server "
            "is running and reachable from this machine."
        ) from None
    except (ValueError, KeyError, EOFError, OSError) as exc:  # a multipart or JSON body that is not DICOM
        raise DicomWebError(
            f"{server.url}: the answer to the {request} is not DICOM ({type(exc).__name__}: {str(exc)[:200]}). Check "
            "that the URL is the server's DICOMweb root and not a login page or a proxy."
        ) from None
