"""An audit record for every result: `<case>.audit.json` beside the mask, one per scan, in the
spirit of TotalSegmentator's `--report`, but with what a clinic's audit asks of an automated
result: what went in, which model made it, with which software, what came out (with checksums),
how long it took, how far to trust it, and where the input came from.

The record holds:

- `input`: the source series' Study, Series and SOP Instance UIDs (each as `sha256:<hex>` when
  `predict.hash_uids` asks), and which of them medseg generated (`predict.generate_missing_uids`);
- `model`: its URI, its version (the registry's version, or the run id) and its aliases then;
- `software`: medseg's version and its libraries' (TensorFlow, Keras, NumPy, nibabel, pydicom,
  highdicom, dicomweb-client);
- `outputs`: each file written (mask, SEG, RTSTRUCT), its SHA-256, and a DICOM object's SOP
  Instance UID;
- `seconds`: the network's part and the rest (mapping back, writing), and their sum;
- `qc`: the QC score, flags and reason (`medseg.inference.qc`);
- `source`: where the input came from, a folder, a file, a zip or a DICOMweb server's URL,
  never its credentials (a URL's user and password, and its query, are taken out).

No patient or study attribute of DICOM PS3.15's basic de-identification profile (the patient's
name, ID, birth date, the accession number, the institution...) is ever put in it: the record
is built from the fields above only, never copied from a header. Its main fields are also
columns of the scan's row in `predictions.csv` (`audit_file`, `model_version`, `model_alias`,
`seconds`, `<output>_sha256`), and every record is logged to the `predict` run.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.storage.publishing import atomic_path

__all__ = ["AUDIT_SUFFIX", "AuditWriter", "library_versions", "sha256_of", "uid_digest"]

AUDIT_SUFFIX = ".audit.json"
SCHEMA = "medseg-audit/1"
LIBRARIES = ("tensorflow", "tensorflow-cpu", "keras", "numpy", "nibabel", "pydicom", "highdicom", "dicomweb-client")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def uid_digest(uid: str) -> str:
    """`sha256:<hex>` of a UID: the same UID gives the same digest, so records still link."""
    return f"sha256:{hashlib.sha256(uid.encode()).hexdigest()}" if uid else ""


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("medseg", *LIBRARIES):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class AuditWriter:
    """Writes one scan's audit record (picklable: a Dask worker writes it beside the mask).

    Attributes:
        source: where the input came from (credentials already removed).
        model_uri, model_version, model_alias: the model as the run resolved it.
        study_uid, series_uid, sop_uids: the input's UIDs ("" and () for NIfTI).
        uids_generated: the UIDs medseg generated for a series that had them blank.
        hash_uids: record the UIDs as SHA-256 digests.
        software: :func:`library_versions`, taken once by the driver.
        published: the outputs `predict.outputs` publishes: only those are listed.
    """

    source: str
    model_uri: str
    model_version: str = ""
    model_alias: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sop_uids: tuple[str, ...] = ()
    uids_generated: tuple[str, ...] = ()
    hash_uids: bool = False
    software: Mapping[str, str] = field(default_factory=dict)
    published: tuple[str, ...] = ("nifti", "seg", "rtstruct")

    def __call__(self, path: Path, case_id: str, row: Mapping[str, Any], files: Mapping[str, Path],
                 seconds: Mapping[str, float]) -> dict[str, Any]:
        """Write the record to `path`; the row's audit columns."""
        uid = uid_digest if self.hash_uids else (lambda value: value)
        outputs = []
        columns: dict[str, Any] = {}
        for kind, file in files.items():
            if kind not in self.published:
                continue
            checksum = sha256_of(file)
            outputs.append({"kind": kind, "file": file.name, "sha256": checksum,
                            **({"sop_instance_uid": uid(str(row[f"{kind}_sop_instance_uid"]))}
                               if row.get(f"{kind}_sop_instance_uid") else {})})
            columns[f"{kind}_sha256"] = checksum
        total = round(float(sum(seconds.values())), 3)
        record = {
            "schema": SCHEMA,
            "case_id": case_id,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": self.source,
            "input": {
                "study_instance_uid": uid(self.study_uid),
                "series_instance_uid": uid(self.series_uid),
                "sop_instance_uids": [uid(value) for value in self.sop_uids],
                "uids_hashed": self.hash_uids,
                "uids_generated": list(self.uids_generated),
            },
            "model": {"uri": self.model_uri, "version": self.model_version, "alias": self.model_alias},
            "software": dict(self.software),
            "outputs": outputs,
            "volumes_ml": {k: v for k, v in row.items() if str(k).startswith("volume_ml")},
            "qc": {"score": row.get("qc_score"), "flags": row.get("qc_flags", ""), "reason": row.get("qc_reason", "")},
            "seconds": {**{k: round(float(v), 3) for k, v in seconds.items()}, "total": total},
        }
        with atomic_path(path, suffix=".json") as temporary:
            Path(temporary).write_text(json.dumps(record, indent=2, default=str))
        return {"audit_file": path.name, "model_version": self.model_version, "model_alias": self.model_alias,
                "seconds": total, **columns}


def hashed_uid_columns(table: Any, columns: Sequence[str] = ("study_instance_uid", "series_instance_uid",
                                                               "seg_sop_instance_uid", "rtstruct_sop_instance_uid")) -> Any:
    """A copy of a predictions table with its UID columns as digests (:func:`uid_digest`)."""
    out = table.copy()
    for column in columns:
        if column in out:
            out[column] = [uid_digest(str(v)) if isinstance(v, str) and v else v for v in out[column]]
    return out
