"""Validation of a case and the dataset fingerprint (nnU-Net's word for dataset statistics).

Every case is read once, checked, and summarised into a small record before anything is
written, so a bad file stops the run before any output exists.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg.errors import (
    ConfigurationError,
    EmptyDatasetError,
    GeometryMismatchError,
    InvalidLabelError,
    MedsegError,
)
from medseg.imaging.components import largest_component
from medseg.imaging.geometry import nonzero_bounding_box, to_canonical
from medseg.imaging.io import Volume, read_volume
from medseg.imaging.laterality import body_midline, lateralized_classes, right_fractions
from medseg.cases.msd import CaseFiles
from medseg.casework import map_in_order
from medseg.storage.incremental import content_key, file_identity, file_stat

logger = logging.getLogger(__name__)

AFFINE_TOLERANCE_MM = 1e-3
MAX_FOREGROUND_LABEL = 255  # foreground values must fit the uint8 labels written to disk
BINARY_CLASS_NAME = "foreground"  # the merged class, unless dataset.json names its one label

LabelMode = Literal["binary", "multiclass"]


def check_foreground_labels(foreground_labels: Sequence[int] | int | None) -> list[int] | None:
    """`data.foreground_labels` as a sorted list of ints in 1..255, or None (every value above 0).

    Raises:
        ConfigurationError: a value that is not an integer in 1..255, or an empty list.
    """
    if foreground_labels is None:
        return None
    values = [foreground_labels] if isinstance(foreground_labels, (int, np.integer)) else list(foreground_labels)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))
           or not 1 <= v <= MAX_FOREGROUND_LABEL]
    if not values or bad:
        raise ConfigurationError(
            f"data.foreground_labels={foreground_labels}: need a list of label values in "
            f"1..{MAX_FOREGROUND_LABEL} (bad: {bad}), e.g. [1, 2], or null for every value above 0."
        )
    return sorted({int(v) for v in values})


def resolve_label_classes(
    listed: Mapping[int, str],
    label_mode: str = "auto",
    foreground_labels: Sequence[int] | None = None,
    manifest: str = "dataset.json",
) -> tuple[LabelMode, dict[int, str]]:
    """The label mode and the classes to train on, from what `dataset.json` lists.

    - `multiclass`: every listed foreground label is a class, {label value: name} in
      ascending order (value i-th = training index i, background 0).
    - `binary`: every foreground value (or those of `data.foreground_labels`) merged into one
      class, `{1: name}`; the name is the listed name of the only value merged when there is
      exactly one, else "foreground".
    - `auto` (the default): multiclass when dataset.json lists more than one foreground label,
      else binary. Setting `data.foreground_labels` asks for a merge, so auto is then binary.

    Args:
        listed: :func:`medseg.cases.msd.foreground_classes` of the dataset.
        label_mode: `data.label_mode`: auto, multiclass or binary.
        foreground_labels: `data.foreground_labels` (binary only), checked as in
            :func:`check_foreground_labels`.
        manifest: the dataset.json path, for messages.

    Returns:
        (`"binary"` or `"multiclass"`, {label value: name}).

    Raises:
        ConfigurationError: an unknown mode; multiclass with `data.foreground_labels` set;
            multiclass when dataset.json lists no foreground label.
    """
    foreground_labels = check_foreground_labels(foreground_labels)
    if label_mode not in ("auto", "multiclass", "binary"):
        raise ConfigurationError(f"data.label_mode='{label_mode}': use auto, multiclass or binary.")
    if label_mode == "auto":
        label_mode = "multiclass" if len(listed) > 1 and foreground_labels is None else "binary"
    if label_mode == "multiclass":
        if foreground_labels is not None:
            raise ConfigurationError(
                f"data.label_mode=multiclass with data.foreground_labels={foreground_labels}: foreground_labels merges "
                "labels into one class, which is binary mode. Unset data.foreground_labels (every label that "
                f"{manifest} lists becomes a class), or use data.label_mode=binary."
            )
        if not listed:
            raise ConfigurationError(
                f"{manifest}: 'labels' lists no foreground label, so data.label_mode=multiclass has no class. "
                'List the labels, e.g. {"0": "background", "1": "tumour"}, or use data.label_mode=binary.'
            )
        return "multiclass", dict(sorted((int(v), str(n)) for v, n in listed.items()))
    merged = foreground_labels if foreground_labels is not None else sorted(listed)
    name = listed[merged[0]] if len(merged) == 1 and merged[0] in listed else BINARY_CLASS_NAME
    return "binary", {1: name}


def label_to_class_indices(label: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Map a label map's dataset values to training class indices: `values[i]` becomes i + 1,
    0 stays 0.

    Args:
        label: (X, Y, Z) integer label map holding only 0 and `values` (as validation ensures;
            any other value becomes 0).
        values: the foreground label values, ascending (the keys of the fingerprint's `classes`).

    Returns:
        uint8 (X, Y, Z) map with values 0..len(values).
    """
    table = np.zeros(MAX_FOREGROUND_LABEL + 1, dtype=np.uint8)
    table[np.asarray(values, dtype=np.intp)] = np.arange(1, len(values) + 1, dtype=np.uint8)
    if label.dtype != np.uint8:
        label = np.where((label < 0) | (label > MAX_FOREGROUND_LABEL), 0, label)
    return table[label]


def class_indices_to_label(indices: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """The inverse of :func:`label_to_class_indices`: training indices 0..K back to the
    dataset's label values (index i + 1 becomes `values[i]`), uint8 (X, Y, Z)."""
    table = np.zeros(len(values) + 1, dtype=np.uint8)
    table[1:] = np.asarray(values, dtype=np.uint8)
    return table[indices]


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


def label_for_storage(label: np.ndarray) -> np.ndarray:
    """A source label map as uint8, for the intermediate layer.

    Values above 255 become 0 (background). Validation (:func:`fingerprint_case`) allows such
    values only when `data.foreground_labels` leaves them out, so they are background for
    every later step anyway; the values 0..255 are kept as they are.

    Args:
        label: (X, Y, Z) non-negative integer label map (uint8 or wider).

    Returns:
        The same map as uint8 (the array itself when it already is uint8).
    """
    if label.dtype == np.uint8:
        return label
    return np.where(label > MAX_FOREGROUND_LABEL, 0, label).astype(np.uint8)


def label_values(label: np.ndarray) -> list[int]:
    """The distinct values of an integer label map, ascending."""
    if label.dtype == np.uint8:  # a histogram is much faster than np.unique's sort
        return np.flatnonzero(np.bincount(label.ravel(), minlength=256)).tolist()
    return [int(v) for v in np.unique(label)]


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
    """Read and check one case: (image float32, label uint8 or wider), same shape and affine.

    Raises:
        the errors of :func:`medseg.imaging.io.read_volume` (including a zero spacing or a
        singular affine), and GeometryMismatchError.
    """
    image = read_volume(case.image_path, role="image", channel=case.channel)
    label = read_volume(case.label_path, role="label")
    check_pair(image, label, case.image_path, case.label_path)
    return image, label


def largest_component_extent_mm(mask: np.ndarray, spacing: Sequence[float]) -> tuple[float, float, float]:
    """Size in mm, along each axis, of the bounding box of the mask's largest 26-connected
    region (a lesion, an organ): the scale of the structures to segment. Zeros for an empty mask."""
    largest = largest_component(mask, connectivity=3)
    if not largest.any():
        return (0.0, 0.0, 0.0)
    box = ndimage.find_objects(largest.astype(np.int32))[0]
    return tuple(float((b.stop - b.start) * s) for b, s in zip(box, spacing))


def fingerprint_case(
    case: CaseFiles,
    foreground_labels: Sequence[int] | None = None,
    crop_margin: int | None = None,
    classes: Mapping[int, str] | None = None,
) -> dict:
    """Read, check and summarise one case.

    Args:
        case: where the case's files are.
        foreground_labels: see :func:`binarize_label` (binary mode).
        crop_margin: when not None, also record the nonzero bounding box of the image in
            canonical voxels, grown by this many voxels (for `crop_to_nonzero`).
        classes: the multiclass classes {label value: name} (:func:`resolve_label_classes`);
            None for binary mode, where the foreground of `foreground_labels` is class 1.

    Returns:
        A flat record: file paths, original shape and affine (JSON text), orientation codes,
        source dtype, canonical spacing in mm, the label values present (JSON text), foreground
        voxel count and fraction, `share_<value>` for each class (its fraction of all voxels;
        `share_1` is the foreground fraction in binary mode), `right_fractions` (JSON text,
        multiclass only, else "{}": for each class present, the fraction of its voxels right of
        the body's midline in canonical RAS, see :mod:`medseg.imaging.laterality`), and
        intensity statistics (overall and inside the foreground).

    Raises:
        the errors of :func:`read_case`; InvalidLabelError when a label value above 255 would
        be foreground (foreground must fit the uint8 labels written to disk), or, in multiclass
        mode, when the label holds a value that `classes` does not list.
    """
    image, label = read_case(case)
    values = label_values(label.data)
    if classes is not None:
        unlisted = [v for v in values if v != 0 and v not in classes]
        if unlisted:
            raise InvalidLabelError(
                f"{case.label_path}: the label holds the values {unlisted[:20]}, which dataset.json does not list "
                f"in 'labels' (it lists {dict(classes)}, and 0 for the background). List them in dataset.json's "
                "labels, or use data.label_mode=binary to merge the foreground values into one class."
            )
    too_large = [v for v in values if v > MAX_FOREGROUND_LABEL]
    if too_large and foreground_labels is None:
        raise InvalidLabelError(
            f"{case.label_path}: the label holds values above {MAX_FOREGROUND_LABEL} ({too_large[:5]}) and "
            "data.foreground_labels is not set, so they would count as foreground, which must fit 1..255. "
            f"Set data.foreground_labels to the values to segment (values found: {values[:20]}); the "
            "others are background."
        )
    canonical = to_canonical(image)
    foreground = binarize_label(label.data, foreground_labels).astype(bool)
    if classes is None:
        shares = {"share_1": float(foreground.mean())}
        sides: dict[int, float] = {}
    else:
        shares = {f"share_{v}": float(np.count_nonzero(label.data == v)) / label.data.size for v in sorted(classes)}
        sides = right_fractions(to_canonical(label).data, body_midline(canonical.data))
    inside = image.data[foreground]
    spacing = canonical.spacing
    extent = largest_component_extent_mm(to_canonical(Volume(foreground.astype(np.uint8), image.affine)).data, spacing)
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
        "label_values": json.dumps(values),
        "foreground_voxels": int(foreground.sum()),
        "foreground_fraction": float(foreground.mean()),
        "foreground_extent_mm": json.dumps([round(v, 3) for v in extent]),
        **shares,
        "right_fractions": json.dumps({str(v): f for v, f in sorted(sides.items())}),
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


# Bump when `fingerprint_case` changes what it records: every case is then read again.
VALIDATION_VERSION = 1
IDENTITY_COLUMNS = ("image_size", "image_mtime", "image_sha256", "label_size", "label_mtime", "label_sha256")


def _recorded_identity(previous: Mapping | None, role: str) -> dict | None:
    if previous is None:
        return None
    return {"size": previous.get(f"{role}_size"), "mtime": previous.get(f"{role}_mtime"), "sha256": previous.get(f"{role}_sha256")}


def source_identity(case: CaseFiles, previous: Mapping | None = None) -> dict:
    """The `image_*` and `label_*` size, mtime and sha256 of a case's files
    (:func:`medseg.storage.incremental.file_identity`; a file whose size and mtime match `previous`
    is not read)."""
    out = {}
    for role, path in (("image", case.image_path), ("label", case.label_path)):
        identity = file_identity(path, _recorded_identity(previous, role))
        out.update({f"{role}_{name}": identity[name] for name in ("size", "mtime", "sha256")})
    return out


def _same_case(case: CaseFiles, previous: Mapping | None, settings_key: str) -> bool:
    """Whether `previous` (last run's record) was made from the same files with the same settings."""
    if previous is None or previous.get("settings_key") != settings_key:
        return False
    channel = previous.get("channel")
    channel = None if channel is None or channel == "" or (isinstance(channel, float) and np.isnan(channel)) else int(channel)
    return (previous.get("image_path"), previous.get("label_path"), channel) == (case.image_path, case.label_path, case.channel)


def _unchanged_on_disk(case: CaseFiles, previous: Mapping) -> bool:
    """Same size and mtime for both files (nothing is read): the recorded hashes still hold."""
    try:
        return all(
            file_stat(path) == {"size": int(previous[f"{role}_size"]), "mtime": str(previous[f"{role}_mtime"])}
            for role, path in (("image", case.image_path), ("label", case.label_path))
        )
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _fingerprint_job(job: tuple) -> dict | MedsegError:
    """One case's record (on a Dask worker, or here): last run's record when the files' content
    is unchanged, else a fresh one; a bad case gives its MedsegError as the result, so that
    every bad case is reported at once."""
    case, previous, foreground_labels, crop_margin, classes, settings_key = job
    try:
        identity = source_identity(case, previous)
    except OSError:
        identity = None  # a missing file: fingerprint_case says which, with the fix
    if identity is not None and previous is not None and all(
        identity[f"{role}_sha256"] == previous.get(f"{role}_sha256") for role in ("image", "label")
    ):
        return {**previous, **identity}
    try:
        record = fingerprint_case(case, foreground_labels, crop_margin, classes)
        return {**record, **(identity or source_identity(case)), "settings_key": settings_key}
    except MedsegError as exc:
        return exc


def fingerprint_cases(
    cases: Sequence[CaseFiles],
    foreground_labels: Sequence[int] | None = None,
    crop_margin: int | None = None,
    classes: Mapping[int, str] | None = None,
    previous: Mapping[str, Mapping] | None = None,
    mapper: Callable[..., list] | None = None,
) -> list[dict]:
    """Fingerprint every case, one in memory at a time, reporting all bad cases at once.

    Args:
        cases: the cases to read.
        foreground_labels: see :func:`binarize_label`; checked first (values in 1..255).
        crop_margin: see :func:`fingerprint_case`.
        classes: see :func:`fingerprint_case` (None: binary mode). A listed class that no
            case holds is logged as a warning: a model cannot learn it.
        previous: last run's records by case id (the `case_fingerprints` table), or None.
            A case whose files have the same size and mtime as recorded, or else the same
            SHA-256, with the same paths and settings, keeps its record and is not read.
        mapper: `medseg.runs.compute` executor's `map` (default: this process, in order); the
            cases to read are mapped over it.

    Returns:
        One record per case, in the order given, each with the files' identity
        (`IDENTITY_COLUMNS`) and the `settings_key` of the validation settings.

    Raises:
        EmptyDatasetError: no case given.
        ConfigurationError: `foreground_labels` is malformed, or matches no voxel of any label
            (the message lists the label values found).
        MedsegError (the first failure's type): one or more cases are invalid; the message
            lists each bad file with its fix.
    """
    if not cases:
        raise EmptyDatasetError("The dataset holds no case. Check data.source and data.msd_dir.")
    foreground_labels = check_foreground_labels(foreground_labels)
    settings_key = content_key(
        VALIDATION_VERSION, foreground_labels, crop_margin, {str(v): n for v, n in (classes or {}).items()} or None
    )
    previous = previous or {}
    results: dict[str, dict | MedsegError] = {}
    jobs = []
    for case in cases:
        before = previous.get(case.case_id)
        before = before if _same_case(case, before, settings_key) else None
        if before is not None and _unchanged_on_disk(case, before):
            results[case.case_id] = dict(before)
        else:
            jobs.append((case, None if before is None else dict(before), foreground_labels, crop_margin, classes, settings_key))
    if results:
        logger.info(
            "Validating: %d of %d cases unchanged since the last run (same files, size and mtime), not read again.",
            len(results), len(cases),
        )
    mapper = mapper or map_in_order
    done = mapper(_fingerprint_job, jobs, task="Validating", case_ids=[job[0].case_id for job in jobs])
    results.update({job[0].case_id: result for job, result in zip(jobs, done)})
    failures = [results[case.case_id] for case in cases if isinstance(results[case.case_id], MedsegError)]
    if failures:
        if len(failures) == 1:
            raise failures[0]
        lines = "\n".join(f"  - {exc}" for exc in failures)
        raise type(failures[0])(f"{len(failures)} of {len(cases)} cases are invalid:\n{lines}")
    records = [results[case.case_id] for case in cases]
    absent = [f"{v} ({name})" for v, name in (classes or {}).items() if not any(r[f"share_{v}"] for r in records)]
    if absent:
        logger.warning(
            "dataset.json lists the classes %s, but no label of the %d cases holds them: a model cannot learn them.",
            ", ".join(absent), len(records),
        )
    if foreground_labels is not None and not any(record["foreground_voxels"] for record in records):
        found = sorted({v for record in records for v in json.loads(record["label_values"])})
        usable = [v for v in found if 0 < v <= MAX_FOREGROUND_LABEL]
        folders = sorted({str(Path(case.label_path).parent) for case in cases})
        fix = (
            f"Set data.foreground_labels to some of {usable}, or to null for every value above 0."
            if usable
            else "The labels hold no foreground value at all: check that data.msd_dir holds the right labels."
        )
        raise ConfigurationError(
            f"data.foreground_labels={foreground_labels} match no voxel in any of the {len(cases)} labels "
            f"(in {', '.join(folders)}); the label values found are {found}. {fix}"
        )
    return records


def _median_extent(records: Sequence[dict]) -> list[float]:
    extents = [json.loads(r["foreground_extent_mm"]) for r in records if r.get("foreground_extent_mm")]
    extents = [e for e in extents if max(e) > 0]
    return [float(v) for v in np.median(np.array(extents), axis=0)] if extents else [0.0, 0.0, 0.0]


def dataset_fingerprint(
    records: Sequence[dict], label_mode: LabelMode = "binary", classes: Mapping[int, str] | None = None
) -> dict:
    """Dataset-level statistics that the preprocessing plan reads (JSON-serialisable).

    The median spacing is nnU-Net's default target spacing: it keeps most cases close to
    their native resolution.

    Args:
        records: :func:`fingerprint_cases`' records.
        label_mode: `binary` or `multiclass` (:func:`resolve_label_classes`).
        classes: {label value: name}; None means `{1: "foreground"}`.

    Returns:
        The statistics, with `label_mode`, `classes` ({"<label value>": name} in ascending
        value order: the i-th is training index i + 1; in binary mode the one merged class "1")
        and `lateralized` (the label values on one and the same side of the body's midline in
        every case that holds them, :func:`medseg.imaging.laterality.lateralized_classes`;
        always empty in binary mode).
    """
    classes = dict(sorted((classes or {1: BINARY_CLASS_NAME}).items()))
    sides = [{int(v): f for v, f in json.loads(r.get("right_fractions") or "{}").items()} for r in records]
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
        # The median over the cases holding foreground of their largest structure's extent (mm).
        "foreground_extent_mm": _median_extent(records),
        "cases_without_foreground": int((fractions == 0).sum()),
        "intensity_mean": float(np.mean([r["intensity_mean"] for r in records])),
        "intensity_std": float(np.mean([r["intensity_std"] for r in records])),
        "label_mode": label_mode,
        "classes": {str(v): name for v, name in classes.items()},
        "lateralized": lateralized_classes(sides) if label_mode == "multiclass" else [],
    }
