"""The evaluation nodes of the model pipeline template: masks of the split in each case's
source geometry, their scores, the reports, and the trained model for MLflow. One
implementation for every model kind."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import keras
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medseg.casework import DriverThenWorker
from medseg.storage.paths import anchor_path
from medseg.errors import ConfigurationError, GeometryMismatchError
from medseg.evaluation import (
    OverlaySlice,
    choose_overlay_slice,
    dice_score,
    evaluate_case_per_class,
    flatten_class_means,
    flatten_summary,
    per_case_table,
    plot_case_metrics,
    plot_overlays,
    plot_training_curves,
    summarize_per_class,
)
from medseg.evaluation.calibration import CalibrationCounts, apply_temperature, balanced_sample, fit_kept_temperature
from medseg.inference.qc import (
    QC_COLUMNS,
    QualityReference,
    ScanFeatures,
    assess,
    canonical_extent_mm,
    entropy_of,
    grid_volumes_ml,
    predicted_foreground,
)
from medseg.evaluation.statistics import Bootstrap
from medseg.imaging.geometry import CaseGeometry, PreprocessingPlan, from_canonical, to_canonical
from medseg.imaging.io import Volume, voxel_spacing
from medseg.cases.validation import binarize_label
from medseg.inference import Segmenter
from medseg.inference.engines import OFF, ParityRecord
from medseg.inference.parity import export_with_parity
from medseg.inference.profiles import choose_profiles, measure_settings, pareto_front
from medseg.evaluation.viewer import viewer_page
from medseg.kinds import ModelKind
from medseg.kinds.plans import ModelPlan, ModelSettings
from medseg.models.training import training_fingerprint
from medseg.models.normalization import as_keras_layers
from medseg.models.unet import with_input_shape
from medseg.parameters import DataParams, EvaluationParams
from medseg.casework.progress import CaseProgress
from medseg.runs import tracking
from medseg.cases.split import cases_in_split

logger = logging.getLogger(__name__)


def logged_plan(plan: ModelPlan) -> dict[str, Any]:
    """The values the plan used, as the MLflow run's parameters `<model>.plan.<path>`."""
    return plan.logged_parameters()


def export_onnx_segmenter(
    segmenter: Segmenter,
    grid_images: dict[str, Callable[[], Volume]],
    splits: pd.DataFrame,
    settings: dict[str, Any],
) -> tuple[Segmenter, dict[str, Any], dict[str, float]]:
    """Export the segmenter's network to ONNX and check that onnxruntime gives TensorFlow's
    masks on the test cases (`medseg.inference.parity`), unless `<model>.export.onnx` is false.

    The validation cases stand in where the split has no test case. A failure (of the
    conversion or of the masks) does not fail the run: the record says why, MLflow's
    `onnx_export_passed` is 0, and the onnxruntime engine refuses the export.

    Returns:
        The segmenter with its export and record (saved as `model.onnx` and `onnx.json` in its
        folder), the record (`<model>.onnx_parity`), and the MLflow metrics `onnx_export_passed`,
        `onnx_parity_min_dice`, `onnx_parity_equal_cases`, `onnx_parity_cases`.
    """
    if not ModelSettings.of(settings).onnx_export:
        segmenter.onnx, segmenter.parity = None, ParityRecord(OFF, f"{segmenter.plan.model_key}.export.onnx is false")
        return segmenter, segmenter.parity.to_dict(), {}
    cases = cases_in_split(splits, "test") or cases_in_split(splits, "val")
    record = export_with_parity(segmenter, {case_id: (lambda c=case_id: grid_images[c]().data) for case_id in cases})
    return segmenter, record.to_dict(), record.metrics()


def choose_inference_profiles(
    segmenter: Segmenter,
    grid_images: dict[str, Callable[[], Volume]],
    grid_labels: dict[str, Callable[[], Volume]],
    splits: pd.DataFrame,
    settings: dict[str, Any],
) -> tuple[Segmenter, pd.DataFrame, dict[str, float]]:
    """Time and score every inference setting the segmenter has on the validation cases (the
    first `<model>.inference.profile_cases`) and record the profiles `fast`, `balanced` and `accurate` in its plan
    (`medseg.inference.profiles`), unless `<model>.inference.profiles` is false or there is no
    validation case.

    Returns:
        The segmenter with `plan.profiles`, the table of every setting (`label`, its knobs,
        `seconds`, `dice`, `pareto`, `profiles`: the profiles it is), and the MLflow metrics
        `profile_<name>_seconds` and `profile_<name>_dice`.
    """
    columns = ["label", "mirror_axes", "overlap", "keep_largest_component", "engine", "seconds", "dice", "pareto", "profiles"]
    cases = cases_in_split(splits, "val")[: ModelSettings.of(settings).inference.profile_cases]
    segmenter.plan.profiles = {}
    if not ModelSettings.of(settings).inference.profiles or not cases:
        if ModelSettings.of(settings).inference.profiles:
            logger.warning("%s: no validation case to measure the inference profiles on; none chosen.", segmenter.plan.model_key)
        return segmenter, pd.DataFrame(columns=columns), {}
    rows = measure_settings(segmenter, {c: (lambda c=c: grid_images[c]().data, lambda c=c: grid_labels[c]().data) for c in cases})
    chosen = choose_profiles(rows)
    segmenter.plan.profiles = chosen
    for row, pareto in zip(rows, pareto_front(rows)):
        row["pareto"] = pareto
        row["profiles"] = " ".join(name for name, pick in chosen.items() if pick["label"] == row["label"])
    for name, pick in chosen.items():
        logger.info("%s: profile %s = %s (%.2f s, Dice %.4f on %d validation case(s)).", segmenter.plan.model_key, name,
                    pick["label"], pick["seconds"], pick["dice"], len(cases))
    metrics = {f"profile_{name}_{key}": float(pick[key]) for name, pick in chosen.items() for key in ("seconds", "dice")}
    return segmenter, pd.DataFrame(rows)[columns], metrics


def predict_split(
    segmenter: Segmenter,
    primary_images: dict[str, Callable[[], Volume]],
    case_geometry: PreprocessingPlan,
    splits: pd.DataFrame,
) -> dict[str, Callable[[], Volume]]:
    """Masks of every validation and test case, each in its source file's geometry.

    The trained segmenter (as saved, the one `predict` and the MLflow model run) takes each
    preprocessed case through the one inference engine, maps the probabilities back to the
    source grid and applies its postprocessing (`<model>.inference.mirror_axes`,
    `keep_largest_component`).

    Args:
        segmenter: `<model>.segmenter`.
        primary_images: preprocessed cases.
        case_geometry: the preprocessing plan (`geometry.json`), to map each mask back.
        splits: the case split (val and test cases are predicted).

    Returns:
        {case_id: DriverThenWorker}: the catalog makes one case at a time; the network runs in
        this process, and the inverse geometry and the writing of the mask where
        `compute.scheduler` runs per-case work (a Dask worker, or here under `sync`).
    """
    logger.info(
        "%s: mirroring over axes %s, largest component %s (planning.memory_gb=%g).",
        segmenter.plan.model_key, list(segmenter.effective_mirror_axes()) or "none",
        "kept" if segmenter.plan.keep_largest_component else "off", segmenter.plan.memory_gb,
    )

    to_label_map = segmenter.label_mapper()

    def mask(case_id: str) -> DriverThenWorker:
        geometry = case_geometry[case_id]
        return DriverThenWorker(
            driver=lambda: segmenter.probabilities(primary_images[case_id]().data),
            worker=partial(to_label_map.volume, geometry=geometry),
        )

    return {c: mask(c) for c in cases_in_split(splits, "val", "test")}


# Voxels per case, class and side (foreground, background) that the temperature is fitted on:
# a few hundred thousand in all, whatever the scans' size.
CALIBRATION_VOXELS_PER_SIDE = 20_000


def _training_features(row: Mapping[str, Any]) -> ScanFeatures:
    """A case's QC features from its `case_fingerprints` row (its source scan, as read)."""
    shape, affine = json.loads(row["original_shape"]), np.asarray(json.loads(row["original_affine"]), dtype=float)
    return ScanFeatures((float(row["spacing_x"]), float(row["spacing_y"]), float(row["spacing_z"])),
                        canonical_extent_mm(shape, affine), str(row["orientation"]), float(row["intensity_mean"]),
                        float(row["intensity_std"]))


def _training_volumes(row: Mapping[str, Any], classes: Mapping[str, str]) -> dict[str, float]:
    """Each class's reference volume (ml) of a case, from its `case_fingerprints` row."""
    voxel_ml = float(row["spacing_x"]) * float(row["spacing_y"]) * float(row["spacing_z"]) / 1000.0
    if len(classes) == 1 and f"share_{next(iter(classes))}" not in row:  # binary: the merged foreground
        return {next(iter(classes)): float(row["foreground_voxels"]) * voxel_ml}
    n_voxels = float(np.prod(json.loads(row["original_shape"])[:3]))
    return {value: float(row.get(f"share_{value}", 0.0) or 0.0) * n_voxels * voxel_ml for value in classes}


def held_out_case(
    probability: np.ndarray, labels: np.ndarray, values: tuple[int, ...], threshold: float, class_values: Sequence[str],
    voxel_ml: float, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """What calibration keeps of one held-out case, and no more of its volume: its balanced
    sample of voxels and their labels (the temperature's fit), up to `8 x
    CALIBRATION_VOXELS_PER_SIDE` of its predicted-foreground probabilities (their entropy, once
    the temperature is known) and its predicted volumes (ml), both taken at the uncalibrated
    `threshold`: the foreground and the volumes are the same at any temperature, since the
    threshold moves with it."""
    sample, sample_labels = balanced_sample(probability, labels, values, CALIBRATION_VOXELS_PER_SIDE, rng)
    foreground = predicted_foreground(probability, threshold)
    keep = rng.choice(foreground.shape[0], size=min(foreground.shape[0], 8 * CALIBRATION_VOXELS_PER_SIDE), replace=False)
    return sample, sample_labels, foreground[keep], grid_volumes_ml(probability, threshold, class_values, voxel_ml)


def quality_reference(rows: Mapping[str, Mapping[str, Any]], training_cases: Sequence[str], classes: Mapping[str, str],
                      held_out: Sequence[tuple[str, float, Mapping[str, float]]]) -> QualityReference:
    """The QC reference: ranges from the training cases' fingerprints (`rows` by case id), and
    thresholds from the held-out cases' (case id, foreground entropy, predicted volumes).

    Raises:
        ConfigurationError: no training case has a fingerprint.
    """
    training = [rows[c] for c in training_cases if c in rows]
    if not training:
        raise ConfigurationError("calibration: no training case has a fingerprint (the catalog's `case_fingerprints`); "
                                 "run the data pipeline again: `kedro run --pipeline data`.")
    reference = QualityReference.from_training([_training_features(r) for r in training],
                                               [_training_volumes(r, classes) for r in training])
    return reference.calibrated([reference.raw_scores(_training_features(rows[case_id]), entropy, volumes)
                                 for case_id, entropy, volumes in held_out])


def calibrate_segmenter(
    segmenter: Segmenter,
    grid_images: dict[str, Callable[[], Volume]],
    grid_labels: dict[str, Callable[[], Volume]],
    splits: pd.DataFrame,
    case_fingerprints: pd.DataFrame,
    evaluation: EvaluationParams,
) -> tuple[Segmenter, dict[str, Any], dict[str, float], pd.DataFrame]:
    """Fit the segmenter's temperature and its QC thresholds on the validation cases, and
    measure both on the test cases (`medseg.evaluation.calibration`, `medseg.inference.qc`).

    The network's probabilities of each validation case (on the training grid, as `predict`
    makes them) give a balanced sample of voxels, seeded by `evaluation.bootstrap_seed`; the
    temperature minimises its negative log-likelihood, and is kept only if it lowers that
    sample's ECE (else 1: `fitted_temperature`, `val_ece_before` and `val_ece_after` in the
    report say why). The QC reference takes its ranges from
    the training cases' fingerprints and its thresholds from the validation cases' scores. The
    test cases' foreground-weighted ECE is taken before and after, from the same probabilities,
    and each test case gets its QC columns. The masks do not change: the segmenter moves its
    threshold with the temperature.

    Returns:
        The segmenter with `plan.temperature` and `plan.qc` set (T = 1.0 without validation
        cases), the report (`calibration.json`), the MLflow metrics `calibration_temperature`,
        `test_ece_before`, `test_ece_after`, and the test cases' QC table (`case_id`, `qc_*`).
    """
    multiclass = segmenter.plan.label_mode == "multiclass"
    values = tuple(range(1, len(segmenter.plan.classes) + 1)) if multiclass else (1,)  # the grid's class indices
    class_values = list(segmenter.plan.classes)
    voxel_ml = float(np.prod(segmenter.plan.target_spacing)) / 1000.0
    rng = np.random.default_rng(int(evaluation["bootstrap_seed"]))
    segmenter.plan.temperature, segmenter.plan.qc = 1.0, {}
    rows = {str(row["case_id"]): row for row in case_fingerprints.to_dict("records")}
    samples, labels, held_out = [], [], []
    fitted_on = cases_in_split(splits, "val")
    for case_id in fitted_on:
        probability = segmenter.probabilities(grid_images[case_id]().data)
        sample, sample_labels, foreground, volumes = held_out_case(
            probability, grid_labels[case_id]().data, values, segmenter.mask_threshold, class_values, voxel_ml, rng)
        samples.append(sample)
        labels.append(sample_labels)
        held_out.append((case_id, foreground, volumes))
    temperature, val_ece = 1.0, {}
    if samples:  # a temperature that does not lower the validation cases' own ECE is not worth its change
        temperature, val_ece = fit_kept_temperature(np.concatenate(samples), np.concatenate(labels), values)
    reference = quality_reference(rows, cases_in_split(splits, "train"), segmenter.plan.classes, [
        (case_id, entropy_of(apply_temperature(foreground, temperature, not multiclass)), volumes)
        for case_id, foreground, volumes in held_out])
    segmenter.plan.temperature, segmenter.plan.qc = temperature, reference.to_dict()
    before, after = CalibrationCounts(values), CalibrationCounts(values)
    test_cases = cases_in_split(splits, "test")
    test_qc = []
    for case_id in test_cases:
        probability = segmenter.probabilities(grid_images[case_id]().data)  # calibrated now
        reference_labels = grid_labels[case_id]().data
        raw = apply_temperature(probability, 1.0 / temperature, not multiclass)  # the network's own, for "before"
        before.add(raw, reference_labels)
        after.add(probability, reference_labels)
        scores = reference.raw_scores(_training_features(rows[case_id]),
                                      entropy_of(predicted_foreground(probability, segmenter.mask_threshold)),
                                      grid_volumes_ml(probability, segmenter.mask_threshold, class_values, voxel_ml))
        test_qc.append({"case_id": case_id, **assess(reference, scores)})
    report = {"temperature": temperature, "fitted_on": "validation", "n_cases_fitted": len(fitted_on),
              "n_voxels_fitted": int(sum(len(label) for label in labels)), "n_test_cases": len(test_cases),
              **val_ece, "test_ece_before": before.ece(), "test_ece_after": after.ece(), "ece_bins": before.bins,
              "qc": reference.to_dict(), "test_cases_flagged": sum(1 for row in test_qc if row["qc_flags"])}
    logger.info("%s: temperature %.3f fitted on %d validation cases; test ECE %.4f before, %.4f after; "
                "%d of %d test cases flagged by QC.", segmenter.plan.model_key, temperature, len(fitted_on),
                report["test_ece_before"], report["test_ece_after"], report["test_cases_flagged"], len(test_cases))
    metrics = {"calibration_temperature": temperature,
               **{k: v for k, v in report.items() if k.startswith("test_ece") and np.isfinite(v)}}
    return segmenter, report, metrics, pd.DataFrame(test_qc, columns=["case_id", *QC_COLUMNS])


def _reference_mask(
    canonical_label: Volume, geometry: CaseGeometry, multiclass: bool, data: dict[str, Any]
) -> tuple[np.ndarray, Volume]:
    """A case's reference label in its source file's geometry, from the canonical copy the data
    pipeline made (`intermediate_labels`: the same voxels, reoriented without interpolation):
    the dataset's values in multiclass mode, else the binary foreground."""
    affine = np.asarray(geometry.original_affine, dtype=float)
    reference_volume = Volume(from_canonical(canonical_label.data, affine), affine)
    reference = reference_volume.data if multiclass else binarize_label(reference_volume.data, data["foreground_labels"])
    return reference, reference_volume


def _evaluated_classes(dataset_fingerprint: dict) -> tuple[dict[int, str], bool]:
    classes = {int(value): name for value, name in dataset_fingerprint.get("classes", {"1": "foreground"}).items()}
    multiclass = dataset_fingerprint.get("label_mode") == "multiclass"
    if not multiclass:  # the merged foreground, stored as 1
        classes = {1: next(iter(classes.values()))}
    return classes, multiclass


def evaluate_postprocessing(
    segmenter: Segmenter,
    primary_images: dict[str, Callable[[], Volume]],
    intermediate_labels: dict[str, Callable[[], Volume]],
    case_geometry: PreprocessingPlan,
    splits: pd.DataFrame,
    dataset_fingerprint: dict,
    data: DataParams,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Test Dice with and without each postprocessing option the model turns on.

    For every test case, the masks without any option (`plain`), with mirroring, with the
    largest component, and with both (only the enabled ones) are scored against the reference
    in the source geometry. Mirroring's plain mask is its unflipped pass, so this costs one
    extra prediction of the test cases, and nothing when no option is on.

    Returns:
        One row per test case, variant and class (case_id, variant, class, label, dice), and
        for the MLflow run `test_dice_mean_<variant>` (the mean over cases of the class mean).
    """
    if not segmenter.effective_mirror_axes() and not segmenter.plan.keep_largest_component:
        return pd.DataFrame(columns=["case_id", "variant", "class", "label", "dice"]), {}
    classes, multiclass = _evaluated_classes(dataset_fingerprint)
    rows = []
    test_cases = cases_in_split(splits, "test")
    progress = CaseProgress("Scoring postprocessing", len(test_cases), logger=logger)
    for case_id in test_cases:
        geometry = case_geometry[case_id]
        reference, _ = _reference_mask(intermediate_labels[case_id](), geometry, multiclass, data)
        for variant, labels in segmenter.variants(primary_images[case_id]().data, geometry).items():
            for value, name in classes.items():
                rows.append({"case_id": case_id, "variant": variant, "class": name, "label": value,
                             "dice": dice_score(reference == value, labels == value)})
        progress.advance(case_id)
    table = pd.DataFrame(rows)
    per_case = table.groupby(["variant", "case_id"])["dice"].mean()
    means = per_case.groupby(level="variant").mean()
    logger.info("%s: test Dice by postprocessing: %s", segmenter.plan.model_key, {k: round(float(v), 4) for k, v in means.items()})
    return table, {f"test_dice_mean_{variant.replace('+', '_and_')}": float(v) for variant, v in means.items()}


@dataclass(frozen=True)
class SegmenterExport:
    """What `<model>.mlflow_segmenter` logs: the segmenter (or an ensemble), the registry name
    (or None), and an alias the new registered version takes (`champion`), or None."""

    segmenter: Any
    registered_model_name: str | None
    alias: str | None = None


def package_segmenter(segmenter: Segmenter, settings: dict[str, Any]) -> SegmenterExport:
    """The trained segmenter for the MLflow run, as the pyfunc model `<model>_segmenter`
    (`medseg.serving.model`), registered under `<model>.export.registered_model_name` when set."""
    return SegmenterExport(segmenter, ModelSettings.of(settings).registered_model_name)


def evaluate_predictions(
    predictions: dict[str, Callable[[], Volume]],
    intermediate_images: dict[str, Callable[[], Volume]],
    intermediate_labels: dict[str, Callable[[], Volume]],
    case_geometry: PreprocessingPlan,
    splits: pd.DataFrame,
    dataset_fingerprint: dict,
    data: DataParams,
    settings: dict[str, Any],
    evaluation: EvaluationParams,
    test_qc: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, Figure]:
    """Per-case, per-class metrics of the test cases, in 3D and in each case's original geometry.

    Args:
        predictions: predicted masks (as saved: source geometry, uint8; the dataset's own
            label values in multiclass mode, {0, 1} in binary mode).
        intermediate_images, intermediate_labels: the cases in canonical RAS (the data
            pipeline's copies of the source files: the overlays' images, and the references,
            put back into each source file's geometry).
        case_geometry: the preprocessing plan (each source file's shape and affine).
        splits: the case split; only `test` cases are scored.
        dataset_fingerprint: `fingerprint.json` (label_mode and classes).
        data: `params:data` (foreground_labels, for binary mode).
        settings: `<model>.settings` (reporting.n_overlay_cases).
        evaluation: `params:evaluation` (nsd_tolerance_mm).
        test_qc: each test case's QC columns (`calibrate_segmenter`), joined to its rows.

    Returns:
        One row per test case and foreground class (`class`, `label`, dice, iou, nsd, hd95_mm,
        precision, recall, volumes in ml, empty flags; binary mode has one class) and a
        figure of image/reference/prediction overlays for the first few cases, each titled
        with its case, axial slice and Dice (the mean over its classes).
    """
    classes, multiclass = _evaluated_classes(dataset_fingerprint)
    rows, overlays = [], []
    test_cases = cases_in_split(splits, "test")
    if not test_cases:
        logger.warning("The split holds no test case (data.split.test is 0): the test evaluation is skipped; "
                       "with cv.folds, the cross-validation's out-of-fold scores are the run's evaluation.")
    progress = CaseProgress("Evaluating", len(test_cases), logger=logger)
    for case_id in test_cases:
        reference, reference_volume = _reference_mask(intermediate_labels[case_id](), case_geometry[case_id], multiclass, data)
        prediction = predictions[case_id]()
        if prediction.data.shape != reference.shape or not np.allclose(prediction.affine, reference_volume.affine, atol=1e-3):
            raise GeometryMismatchError(
                f"prediction of case '{case_id}' has shape {prediction.data.shape}, but its source label "
                f"has {reference.shape} (or their affines differ). Run the pipeline "
                "again so that predictions are written in the source geometry."
            )
        case_rows = evaluate_case_per_class(reference, prediction.data, voxel_spacing(reference_volume.affine), classes,
                                            evaluation["nsd_tolerance_mm"])
        rows.extend({"case_id": case_id, **row} for row in case_rows)
        if len(overlays) < ModelSettings.of(settings).n_overlay_cases:
            image = intermediate_images[case_id]().data
            views = [image, *(to_canonical(Volume(a, reference_volume.affine)).data for a in (reference, prediction.data))]
            z = choose_overlay_slice(views[1], views[2])
            dice = float(np.nanmean([row["dice"] for row in case_rows])) if any(np.isfinite(row["dice"]) for row in case_rows) else float("nan")
            overlays.append(OverlaySlice(case_id, *(view[:, :, z] for view in views), z=z, dice=dice))
        progress.advance(case_id)
    table = per_case_table(rows, classes)
    if test_qc is not None and not test_qc.empty:
        table = table.merge(test_qc, on="case_id", how="left")
    return table, plot_overlays(overlays)


def make_viewer_pages(
    predictions: dict[str, Callable[[], Volume]],
    intermediate_images: dict[str, Callable[[], Volume]],
    intermediate_labels: dict[str, Callable[[], Volume]],
    splits: pd.DataFrame,
    dataset_fingerprint: dict,
    data: DataParams,
    settings: dict[str, Any],
) -> dict[str, bytes]:
    """An interactive viewer page (`medseg.evaluation.viewer`) for each of the first
    `<model>.reporting.n_viewer_cases` test cases: its scan with the reference and the
    prediction, as the evaluation scored them, on the scan's canonical grid.

    Returns:
        {`<case>.html`: the page}; empty when none is asked for, or when NiiVue's script is
        missing (`make niivue`: a warning says so, and the run goes on).
    """
    classes, multiclass = _evaluated_classes(dataset_fingerprint)
    pages: dict[str, bytes] = {}
    for case_id in cases_in_split(splits, "test")[: ModelSettings.of(settings).n_viewer_cases]:
        image, label = intermediate_images[case_id](), intermediate_labels[case_id]().data  # both canonical already
        reference = label if multiclass else binarize_label(label, data["foreground_labels"])
        prediction = to_canonical(predictions[case_id]()).data  # the mask as written, in its source geometry
        try:
            pages[f"{case_id}.html"] = viewer_page(image, Volume(np.asarray(prediction, np.uint8), image.affine),
                                                   Volume(np.asarray(reference, np.uint8), image.affine),
                                                   {str(v): n for v, n in classes.items()}, title=case_id)
        except ConfigurationError as exc:  # NiiVue's script not built: the report goes on without pages
            logger.warning("No viewer pages: %s", exc)
            return {}
    return pages


def run_provenance(
    model_key: str, data: dict[str, Any], section: dict[str, Any], project_root: str, synthetic_phantoms: str
) -> dict[str, Any]:
    """What made a report: the MLflow run, the dataset and a hash of the parameters.

    Args:
        model_key: the model kind's name.
        data: `params:data`.
        section: `params:<model_key>`.
        project_root: the project root; a relative `data.msd_dir` is taken from it.
        synthetic_phantoms: the phantoms' folder (catalog entry `synthetic_phantoms`).

    Returns:
        `mlflow_run_id` and `mlflow_run_name` (None outside a tracked run), `data_source`
        (`synthetic` or `msd`), `data_dir` (the absolute MSD folder or synthetic folder) and
        `params_hash` (16 hex characters of SHA-256 over the `data` and model sections, as
        `medseg.models.training.training_fingerprint` hashes them: equal parameters give
        equal hashes, whatever the key order).
    """
    run_id, run_name = tracking.active_run_identity()
    folder = {"msd": data["msd_dir"], "dicom": data.get("dicom_dir")}.get(data["source"]) or synthetic_phantoms
    location = anchor_path(folder, project_root) if folder else None
    return {
        "mlflow_run_id": run_id,
        "mlflow_run_name": run_name,
        "data_source": data["source"],
        # A URL (s3://...) as given; a local folder absolute, symlinks resolved.
        "data_dir": location if location is None or isinstance(location, str) else str(location.resolve()),
        "params_hash": training_fingerprint(data=data, **{model_key: section}),
    }


def summarize_evaluation(
    metrics_per_case: pd.DataFrame,
    history: dict[str, list[float]],
    data: DataParams,
    section: dict[str, Any],
    project_root: str,
    synthetic_phantoms: str,
    evaluation: EvaluationParams,
    *,
    kind: ModelKind,
) -> tuple[dict, Figure, Figure, dict[str, float]]:
    """Summarise the test metrics and plot the curves.

    Args:
        metrics_per_case: output of `evaluate_predictions`.
        history: the training history (Keras metrics per epoch).
        data: `params:data`.
        section: `params:<model_key>`.
        project_root: the project's root folder (catalog entry `project_root`).
        synthetic_phantoms: the phantoms' folder (catalog entry `synthetic_phantoms`).
        evaluation: `params:evaluation` (the bootstrap of the intervals; the NSD's tolerance).
        kind: the model kind (bound by the template).

    Returns:
        The summary (mean, its bootstrap interval over cases, std, median and missing count
        per metric, `nsd_tolerance_mm`, then the run's provenance: see `run_provenance`), the
        training curves, captioned with what their Dice and IoU were computed on
        (`kind.training_samples`), the per-case scores with each mean and its interval
        (`plot_case_metrics`), and the MLflow run's test metrics: `test_<metric>_mean` (the
        mean over the foreground classes), `test_<metric>_ci_low` and `_ci_high`, and the same
        per class, `test_<metric>_<class>_mean`.
    """
    summary = summarize_per_class(metrics_per_case, bootstrap=Bootstrap.of(evaluation))
    metrics = {**flatten_summary(summary, prefix="test_"), **flatten_class_means(summary, prefix="test_")}
    summary["nsd_tolerance_mm"] = float(evaluation["nsd_tolerance_mm"])  # a parameter, not a metric
    curves = plot_training_curves(history, samples=kind.training_samples)
    provenance = run_provenance(kind.name, data, section, project_root, synthetic_phantoms)
    return {**summary, **provenance}, curves, plot_case_metrics(metrics_per_case, summary), metrics


def export_model(model: keras.Model) -> tuple[keras.Model, dict, keras.Model]:
    """The trained model, for the MLflow Keras flavor, its architecture JSON and its weights.

    The exported model is a copy without the training configuration (optimizer, medseg's loss
    and metrics) and with Keras's own batch normalization layers (medseg's fused one trains
    faster, and has the same weights), so `mlflow.keras.load_model` needs only TensorFlow and Keras. A 2D model
    (input (B, H, W, 1)) is fully convolutional: it is exported for whole slices of any size,
    input (None, None, 1), as the pipeline's own inference runs it (in-plane sizes divisible
    by 2**depth). A 3D model keeps its patch input; whole volumes go through sliding windows.
    """
    model = as_keras_layers(with_input_shape(model, (None, None, 1) if len(model.input_shape) == 4 else model.input_shape[1:]))
    return model, json.loads(model.to_json()), model


