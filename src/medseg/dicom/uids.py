"""New UIDs for a series that an anonymiser left without them, so that a SEG can reference it.

A DICOM output references every source instance by its Study, Series and SOP Instance UIDs and
its SOP Class UID (:data:`medseg.dicom.series.SOURCE_UIDS`). Some anonymisers blank them. Such
a series is still read and segmented (its NIfTI mask needs none of them); its SEG is written
only when the user asks for new UIDs (`predict.generate_missing_uids`), and then references
the new ones, which `predictions.csv` records.

The new UIDs are derived from the series' voxels and geometry: name-based (SHA-1) UUIDs of that
content, under the 2.25 root that ISO/IEC 9834-8 and DICOM PS3.5 B.2 give UUIDs, so no
organisation root is needed. The same series gets the same UIDs on every run, so a second
run's SEG references what the first one's did. A blank SOP Class UID is given
the storage class of the series' modality (CT, MR, PET); for any other modality it stays
missing and the SEG is not written.
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from dataclasses import replace

import numpy as np
from pydicom import uid as dicom_uid

from medseg.dicom.series import SOURCE_UIDS, DicomSeries

__all__ = ["SOP_CLASS_OF_MODALITY", "missing_uids_reason", "refuse_missing_uids", "with_generated_uids"]

# The storage class of a single-frame image of each modality, for an instance whose class is blank.
SOP_CLASS_OF_MODALITY = {
    "CT": dicom_uid.CTImageStorage,
    "MR": dicom_uid.MRImageStorage,
    "PT": dicom_uid.PositronEmissionTomographyImageStorage,
}


def missing_uids_reason(series: DicomSeries) -> str:
    """Why the series' DICOM outputs are not written, for its row of `predictions.csv`; "" when
    it has every UID they need."""
    if not series.missing_uids:
        return ""
    return (
        f"no DICOM output: the source series has no {', '.join(series.missing_uids)} (blank, as anonymisers leave "
        "them); set predict.generate_missing_uids=true to write them over new UIDs"
    )


def refuse_missing_uids(series: DicomSeries, what: str, error: type[Exception]) -> None:
    """Raise `error` naming `what` (a SEG, an RTSTRUCT and its path) when the source series lacks
    a UID that a DICOM object references it by, with the fix."""
    if series.missing_uids:
        raise error(
            f"{what}: the source series has no {', '.join(series.missing_uids)} (blank, as anonymisers leave them), "
            "and a DICOM object references its source by them. Give it new UIDs first "
            "(medseg.dicom.uids.with_generated_uids; predict.generate_missing_uids=true), or export the series with its UIDs."
        )


def with_generated_uids(series: DicomSeries) -> tuple[DicomSeries, tuple[str, ...]]:
    """A copy of `series` whose blank UIDs are filled: one new Study, Series and Frame of
    Reference UID for the whole series, one SOP Instance UID per slice, the SOP class of its
    modality.

    Returns:
        The series (its `missing_uids` what is still missing: a SOP class of an unknown
        modality), and the keywords that were generated.
    """
    if not series.missing_uids:
        return series, ()
    digest = hashlib.sha256(np.ascontiguousarray(series.volume.data).tobytes())
    digest.update(np.asarray(series.volume.affine, dtype=np.float64).tobytes())
    seed = digest.hexdigest()
    datasets = [copy.deepcopy(dataset) for dataset in series.datasets]  # headers only: small
    shared = {
        "StudyInstanceUID": _first(datasets, "StudyInstanceUID") or _uid(seed, "study"),
        "SeriesInstanceUID": _first(datasets, "SeriesInstanceUID") or _uid(seed, "series"),
        "FrameOfReferenceUID": _first(datasets, "FrameOfReferenceUID") or _uid(seed, "frame of reference"),
    }
    sop_class = SOP_CLASS_OF_MODALITY.get(series.modality.upper())
    generated = []
    for keyword in SOURCE_UIDS:
        if keyword not in series.missing_uids:
            continue
        for index, dataset in enumerate(datasets):
            if str(dataset.get(keyword, "") or "").strip():
                continue
            if keyword in shared:
                setattr(dataset, keyword, shared[keyword])
            elif keyword == "SOPInstanceUID":
                dataset.SOPInstanceUID = _uid(seed, "instance", str(index))
            elif sop_class is not None:
                dataset.SOPClassUID = sop_class
        if keyword != "SOPClassUID" or sop_class is not None:
            generated.append(keyword)
    still_missing = tuple(k for k in series.missing_uids if k not in generated)
    filled = replace(series, datasets=datasets, missing_uids=still_missing,
                     series_uid=str(datasets[0].SeriesInstanceUID), study_uid=str(datasets[0].StudyInstanceUID))
    return filled, tuple(generated)


def _uid(*parts: str) -> dicom_uid.UID:
    """`2.25.<a name-based UUID of parts as an integer>`: at most 44 characters."""
    return dicom_uid.UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(parts)).int}")


def _first(datasets, keyword: str) -> str:
    """The UID some instances of the series do have (one series, one study), or ""."""
    for dataset in datasets:
        value = str(dataset.get(keyword, "") or "").strip()
        if value:
            return value
    return ""
