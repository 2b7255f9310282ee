"""Validation of a case and the dataset fingerprint (nnU-Net's word for dataset statistics).

Every case is read once, checked, and summarised into a small record before anything is
written, so a bad file stops the run before any output exists.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from medseg.errors import EmptyDatasetError, GeometryMismatchError, MedsegError
from medseg.imaging.geometry import nonzero_bounding_box, to_canonical
from medseg.imaging.io import Volume, read_volume
from medseg.imaging.msd import CaseFiles

AFFINE_TOLERANCE_MM = 1e-3


def binarize_label(label: np.ndarray, foreground_labels: Sequence[int] | None = None) -> np.ndarray:
    """The binary foreground mask of a label map, as uint8 {0, 1}.

    Args:
        label: (X, Y, Z) integer label map.
        foreground_labels: the label values that count as foreground (`data.foreground_labels`);
            None means every value above 0.
    """
    if foreground_labels is None:
        return (label > 0).astype(np.uint8)
    return np.isin(label, np.asarray(list(foreground_labels))).astype(np.uint8)


def check_pair(image: Volume, label: Volume, image_path: str, label_path: str) -> None:
    """Refuse an image and label whose shape or affine disagree."""
    if image.data.shape != label.data.shape:
        raise GeometryMismatchError(
            f"{label_path}: the label's shape {label.data.shape} differs from its image's "
            f"{image.data.shape} ({image_path}). Re-export the label on the image's grid."
        )
    if not np.allclose(image.affine, label.affine, atol=AFFINE_TOLERANCE_MM, rtol=0):
        raise GeometryMismatchError(
            f"{label_path}: the label's affine differs from its image's ({image_path}) by up to "
            f"{np.abs(image.affine - label.affine).max():.4g} mm, so the mask would not overlay the scan. "
            "Re-export the label with the image's header, or resample it onto the image."
        )


def read_case(case: CaseFiles) -> tuple[Volume, Volume]:
    """Read and check one case: (image float32, label uint8), same shape and affine."""
    image = read_volume(case.image_path, kind="image", channel=case.channel)
    label = read_volume(case.label_path, kind="label")
    check_pair(image, label, case.image_path, case.label_path)
    return image, label


def fingerprint_case(
    case: CaseFiles, foreground_labels: Sequence[int] | None = None, crop_margin: int | None = None
) -> dict:
    """Read, check and summarise one case.

    Args:
        case: where the case's files are.
        foreground_labels: see :func:`binarize_label`.
        crop_margin: when not None, also record the nonzero bounding box of the image in
            canonical voxels, grown by this many voxels (for `crop_to_nonzero`).

    Returns:
        A flat record: file paths, original shape and affine (JSON text), orientation codes,
        source dtype, canonical spacing in mm, foreground voxel count and fraction, and
        intensity statistics (overall and inside the foreground).
    """
    image, label = read_case(case)
    canonical = to_canonical(image)
    foreground = binarize_label(label.data, foreground_labels).astype(bool)
    inside = image.data[foreground]
    spacing = canonical.spacing
    record = {
        "case_id": case.case_id,
        "image_path": case.image_path,
        "label_path": case.label_path,
        "channel": case.channel,
        "original_shape": json.dumps(list(image.data.shape)),
        "original_affine": json.dumps(image.affine.tolist()),
        "orientation": "".join(nib.aff2axcodes(image.affine)),
        "source_dtype": str(image.header.get_data_dtype()) if image.header is not None else "float32",
        "spacing_x": spacing[0],
        "spacing_y": spacing[1],
        "spacing_z": spacing[2],
        "foreground_voxels": int(foreground.sum()),
        "foreground_fraction": float(foreground.mean()),
        "intensity_mean": float(image.data.mean(dtype=np.float64)),
        "intensity_std": float(image.data.std(dtype=np.float64)),
        "foreground_intensity_mean": float(inside.mean(dtype=np.float64)) if inside.size else float("nan"),
        "foreground_intensity_p005": float(np.percentile(inside, 0.5)) if inside.size else float("nan"),
        "foreground_intensity_p995": float(np.percentile(inside, 99.5)) if inside.size else float("nan"),
    }
    if crop_margin is not None:
        start, stop = nonzero_bounding_box(canonical.data, margin=crop_margin)
        record["crop_box"] = json.dumps([list(start), list(stop)])
    return record


def fingerprint_cases(
    cases: Sequence[CaseFiles], foreground_labels: Sequence[int] | None = None, crop_margin: int | None = None
) -> list[dict]:
    """Fingerprint every case, one in memory at a time, reporting all bad cases at once.

    Raises:
        EmptyDatasetError: no case given.
        MedsegError (the first failure's type): one or more cases are invalid; the message
            lists each bad file with its fix.
    """
    if not cases:
        raise EmptyDatasetError("The dataset holds no case. Check data.source and data.msd_dir.")
    records, failures = [], []
    for case in cases:
        try:
            records.append(fingerprint_case(case, foreground_labels, crop_margin))
        except MedsegError as exc:
            failures.append(exc)
    if failures:
        if len(failures) == 1:
            raise failures[0]
        lines = "\n".join(f"  - {exc}" for exc in failures)
        raise type(failures[0])(f"{len(failures)} of {len(cases)} cases are invalid:\n{lines}")
    return records


def dataset_fingerprint(records: Sequence[dict]) -> dict:
    """Dataset-level statistics that the preprocessing plan reads (JSON-serialisable).

    The median spacing is nnU-Net's default target spacing: it keeps most cases close to
    their native resolution.
    """
    spacings = np.array([[r["spacing_x"], r["spacing_y"], r["spacing_z"]] for r in records])
    fractions = np.array([r["foreground_fraction"] for r in records])
    orientations: dict[str, int] = {}
    for record in records:
        orientations[record["orientation"]] = orientations.get(record["orientation"], 0) + 1
    return {
        "n_cases": len(records),
        "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
        "min_spacing": [float(v) for v in spacings.min(axis=0)],
        "max_spacing": [float(v) for v in spacings.max(axis=0)],
        "orientations": orientations,
        "foreground_fraction_mean": float(fractions.mean()),
        "cases_without_foreground": int((fractions == 0).sum()),
        "intensity_mean": float(np.mean([r["intensity_mean"] for r in records])),
        "intensity_std": float(np.mean([r["intensity_std"] for r in records])),
    }
