"""The `select` pipeline: the best configuration from the cross-validation, as nnU-Net's
`nnUNetv2_find_best_configuration`, scored once on the test split and promoted in the MLflow
model registry.

`kedro run --pipeline select` reads what the model pipelines left with `cv.folds: K` (each
model's out-of-fold probabilities and its ensemble of fold networks) and compares each model,
the ensemble of all of them, and each with and without the largest-component filter (decided
per class), by out-of-fold Dice (`medseg.evaluation.selection`). The test split plays no part
in the choice; the chosen segmenter then segments it once, for the figure a paper reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from kedro.pipeline import Node, Pipeline
from matplotlib.figure import Figure

from medseg.errors import ConfigurationError
from medseg.evaluation import evaluate_case_per_class, flatten_class_means, flatten_summary, per_case_table, summarize_per_class
from medseg.evaluation.statistics import Bootstrap
from medseg.evaluation.selection import (
    best_candidate,
    candidate_case_scores,
    candidates_table,
    decide_champion,
    plot_candidates,
    registry_name,
    score_model_sets,
)
from medseg.imaging.geometry import PreprocessingPlan, from_canonical
from medseg.imaging.io import Volume, voxel_spacing
from medseg.inference.ensemble import Ensemble
from medseg.kinds import model_kinds
from medseg.parameters import CvParams, DataParams, EvaluationParams
from medseg.evaluation.calibration import apply_temperature, fit_kept_temperature
from medseg.inference.qc import entropy_of
from medseg.pipelines.evaluation import SegmenterExport, _evaluated_classes, _reference_mask, held_out_case, quality_reference
from medseg.casework.progress import CaseProgress
from medseg.runs import tracking
from medseg.cases.split import cases_in_split

logger = logging.getLogger(__name__)

Partitions = dict[str, Callable[[], Volume]]
CHAMPION = "champion"


def _cross_validated(folds: dict, model_outputs: Mapping[str, Any]) -> dict[str, tuple[Partitions, Ensemble]]:
    """{model: (its out-of-fold probabilities, its fold ensemble)} of every model kind that was
    cross-validated on the folds of `folds.json`; refuses a model whose outputs are of other
    folds or other cases (a run before the folds or the cases changed)."""
    cases = sorted(c for fold in folds.get("folds", []) for c in fold["val"])
    found = {}
    for model in model_kinds():
        probabilities, ensemble = model_outputs[f"{model}_probabilities"], model_outputs[f"{model}_ensemble"]
        if not probabilities or ensemble is None:
            continue
        n_folds = int(ensemble.description.get("folds", len(ensemble.members)))
        if n_folds != int(folds.get("n_folds", 0)) or sorted(probabilities) != cases:
            raise ConfigurationError(
                f"{model}: its cross-validation ({n_folds} folds, {len(probabilities)} cases) is not of the folds in "
                f"folds.json ({folds.get('n_folds')} folds, {len(cases)} cases): the folds or the cases changed since. "
                f"Run `kedro run --pipeline {model} --params cv.folds={folds.get('n_folds')}` again, then select."
            )
        found[model] = (probabilities, ensemble)
    if not found:
        raise ConfigurationError(
            "select: no model was cross-validated, so there is nothing to choose from. Train with folds first: "
            "`kedro run --params cv.folds=5` (every model), or `kedro run --pipeline unet --params cv.folds=5`."
        )
    return found


def select_configuration(
    intermediate_labels: Partitions,
    case_geometry: PreprocessingPlan,
    folds: dict,
    dataset_fingerprint: dict,
    case_fingerprints: pd.DataFrame,
    data: DataParams,
    cv: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    project_root: str,
    synthetic_phantoms: str,
    **model_outputs: Any,
) -> tuple[dict[str, Any], Figure, Ensemble, pd.DataFrame, dict[str, float], dict[str, Any]]:
    """Score every candidate on the out-of-fold predictions and choose the best.

    Args:
        intermediate_labels, case_geometry: the references, put back into each source file's
            geometry (the out-of-fold probabilities are on that grid).
        folds: `folds.json`; every model must have been cross-validated on these folds.
        dataset_fingerprint: the classes and label mode, and the name of the dataset the data
            pipeline read (`dataset`): the registry name comes from it.
        case_fingerprints: each case's source scan (spacing, size, intensity, volumes): the
            ranges of the chosen ensemble's QC flags.
        evaluation: `params:evaluation` (`bootstrap_seed` seeds the calibration sample).
        data: `params:data` (foreground_labels, for binary mode).
        cv: `params:cv` (registered_model_name: null names the registered model
            `medseg-<dataset>`, the dataset's name from its `dataset.json`).
        project_root, synthetic_phantoms: where the dataset is, for its name.
        model_outputs: `<model>_probabilities` (`<model>.cv_probabilities`) and
            `<model>_ensemble` (`<model>.cv_ensemble`) of every model kind; a model without
            cross-validation (empty, None) is left out.

    Returns:
        `best_configuration.json` (the choice, its members and filtered classes, the registry
        name, the table of every candidate, and the calibration), the plot of the candidates,
        the chosen segmenter (an ensemble of the chosen models' fold networks, with a
        temperature and QC thresholds fitted on the out-of-fold cases), its out-of-fold Dice per
        case and class (`selection/oof_scores.csv`, kept with the registered version), the
        MLflow metrics (`best_cv_dice_mean`, `cv_dice_mean_<candidate>`) and parameters
        (`selection.*`).

    Raises:
        ConfigurationError: no model was cross-validated, or one on other folds; or the
            parameters name other data than the models were cross-validated on.
    """
    models = _cross_validated(folds, model_outputs)
    classes, multiclass = _evaluated_classes(dataset_fingerprint)
    threshold = next(iter(models.values()))[1].threshold
    cases = sorted(next(iter(models.values()))[0])

    def reference(case_id: str) -> np.ndarray:
        return _reference_mask(intermediate_labels[case_id](), case_geometry[case_id], multiclass, data)[0]

    loaders = {model: (lambda case_id, parts=parts: parts[case_id]().data) for model, (parts, _) in models.items()}
    logger.info("select: %d cross-validated models (%s) over %d out-of-fold cases.", len(models), ", ".join(models), len(cases))
    scores = score_model_sets(cases, loaders, reference, classes, threshold)
    candidates, table = candidates_table(scores)
    chosen = best_candidate(candidates, table)
    members = [member for model in chosen.models for member in models[model][1].members]
    dataset = _cross_validated_dataset(dataset_fingerprint, data, project_root, synthetic_phantoms)
    name = cv["registered_model_name"] or registry_name(dataset)
    temperature, qc, calibration = _calibrate_on_out_of_fold(
        cases, [loaders[model] for model in chosen.models], reference, case_geometry, case_fingerprints, classes,
        multiclass, threshold, int(evaluation["bootstrap_seed"]))
    segmenter = Ensemble(members, chosen.name, largest_component=chosen.largest_component, threshold=threshold,
                         description={"models": list(chosen.models), "folds": int(folds["n_folds"]),
                                      "candidates": table.to_dict(orient="records")},
                         temperature=temperature, qc=qc)
    row = table.loc[table["candidate"] == chosen.name].iloc[0]
    logger.info("select: %s chosen, cross-validation Dice %.4f; %s", chosen.name, row["cv_dice_mean"],
                {r.candidate: round(float(r.cv_dice_mean), 4) for r in table.itertuples()})
    configuration = {
        "chosen": {"candidate": chosen.name, "models": list(chosen.models), "largest_component": list(chosen.largest_component),
                   "cv_dice_mean": float(row["cv_dice_mean"]), "members": len(members), "threshold": threshold},
        "folds": int(folds["n_folds"]),
        "cases": len(cases),
        "registered_model_name": name,
        "alias": CHAMPION,
        "candidates": table.to_dict(orient="records"),
        "calibration": calibration,
    }
    metrics = {"best_cv_dice_mean": float(row["cv_dice_mean"]), "cv_calibration_temperature": temperature,
               **{f"cv_{k}": float(v) for k, v in calibration.items() if k.endswith(("ece_before", "ece_after"))},
               **{f"cv_dice_mean_{r.candidate.replace('+', '_and_')}": float(r.cv_dice_mean) for r in table.itertuples()}}
    params = {"selection.chosen": chosen.name, "selection.models": "+".join(chosen.models),
              "selection.largest_component": " ".join(str(v) for v in chosen.largest_component) or "none",
              "selection.folds": int(folds["n_folds"]), "selection.registered_model_name": name}
    oof_scores = candidate_case_scores(scores, chosen)
    return configuration, plot_candidates(table, chosen.name), segmenter, oof_scores, metrics, params


def _calibrate_on_out_of_fold(
    cases: list[str], loaders: list[Callable[[str], np.ndarray]], reference: Callable[[str], np.ndarray],
    case_geometry: PreprocessingPlan, case_fingerprints: pd.DataFrame, classes: Mapping[int, str], multiclass: bool,
    threshold: float, seed: int,
) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """The chosen ensemble's temperature and QC reference from the out-of-fold cases, as
    `calibrate_segmenter` fits a single model's on its validation cases: each case's
    out-of-fold probabilities (the mean over the chosen models, on its source grid) give a
    balanced sample for the temperature (kept only if it lowers the sample's ECE) and the
    entropy and volumes behind the QC thresholds; the QC ranges come from every case's
    fingerprint. Each case was predicted by one fold's networks, where the ensemble averages
    all folds: its mean is smoother, so the temperature fitted here is, if anything, too high
    for it; the guard keeps T = 1 unless the out-of-fold cases show a gain.

    Returns:
        (temperature, the QC reference as a dict, the report for `best_configuration.json`).
    """
    values = tuple(sorted(classes)) if multiclass else (1,)
    class_names = {str(value): name for value, name in classes.items()} if multiclass else {"1": next(iter(classes.values()))}
    rng = np.random.default_rng(seed)
    rows = {str(row["case_id"]): row for row in case_fingerprints.to_dict("records")}
    samples, labels, held_out = [], [], []
    for case_id in cases:
        probability = loaders[0](case_id).astype(np.float32)
        for load in loaders[1:]:
            probability += load(case_id)
        probability /= len(loaders)
        voxel_ml = abs(float(np.linalg.det(np.asarray(case_geometry[case_id].original_affine, dtype=float)[:3, :3]))) / 1000.0
        sample, sample_labels, foreground, volumes = held_out_case(
            probability, reference(case_id), values, threshold, list(class_names), voxel_ml, rng)
        samples.append(sample)
        labels.append(sample_labels)
        held_out.append((case_id, foreground, volumes))  # not the case's whole probabilities: a CT's are gigabytes
    temperature, report = fit_kept_temperature(np.concatenate(samples), np.concatenate(labels), values) if samples else (1.0, {})
    qc = quality_reference(rows, cases, class_names, [
        (case_id, entropy_of(apply_temperature(foreground, temperature, not multiclass)), volumes)
        for case_id, foreground, volumes in held_out])
    logger.info("select: temperature %.3f on %d out-of-fold cases (fitted %.3f; ECE %.4f before, %.4f after).", temperature,
                len(cases), report.get("fitted_temperature", 1.0), report.get("val_ece_before", float("nan")),
                report.get("val_ece_after", float("nan")))
    calibration = {"temperature": temperature, "fitted_on": "out-of-fold", "n_cases_fitted": len(cases),
                   **{("oof_" + k[4:] if k.startswith("val_") else k): v for k, v in report.items()},
                   "qc_thresholds": dict(qc.thresholds)}
    return temperature, qc.to_dict(), calibration


def _cross_validated_dataset(dataset_fingerprint: dict, data: DataParams, project_root: str, synthetic_phantoms: str) -> str:
    """The name of the dataset the models were cross-validated on (`fingerprint.json`, written
    by the data pipeline of their run); refused when this run's parameters name other data,
    since the references would be read under the wrong settings."""
    named, source, folder = tracking.dataset_identity(data, project_root, synthetic_phantoms)
    recorded = dataset_fingerprint.get("dataset")
    if recorded is None:  # a fingerprint written before the name was kept
        return named
    if str(recorded) != named:
        raise ConfigurationError(
            f"select: the models were cross-validated on the dataset '{recorded}' (the catalog's `dataset_fingerprint`), "
            f"but this run's parameters name '{named}' (data.source={source}, {folder}). Give select the data parameters "
            "of the training run, e.g. `kedro run --pipeline select --params data.source=msd,data.msd_dir=<its folder>`, "
            "or run the data and model pipelines again for these data."
        )
    return str(recorded)


def score_best_configuration(
    segmenter: Ensemble,
    intermediate_images: Partitions,
    intermediate_labels: Partitions,
    case_geometry: PreprocessingPlan,
    splits: pd.DataFrame,
    dataset_fingerprint: dict,
    data: DataParams,
    evaluation: EvaluationParams,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """The chosen configuration's one score on the held-out test split, per case and class.

    Each test case is segmented from its source scan (the canonical copy put back into its
    source file's geometry), exactly as `predict` and the served model segment a new scan.

    Returns:
        One row per test case and class (as `metrics_per_case.csv`), and the MLflow metrics
        `best_test_<metric>_mean` and `best_test_<metric>_<class>_mean`.
    """
    classes, multiclass = _evaluated_classes(dataset_fingerprint)
    test_cases = cases_in_split(splits, "test")
    rows = []
    progress = CaseProgress(f"select: {segmenter.name} on the test split", len(test_cases), logger=logger)
    for case_id in test_cases:
        geometry = case_geometry[case_id]
        affine = np.asarray(geometry.original_affine, dtype=float)
        scan = Volume(from_canonical(intermediate_images[case_id]().data, affine), affine)
        reference, reference_volume = _reference_mask(intermediate_labels[case_id](), geometry, multiclass, data)
        labels = segmenter.segment(scan, case_id).data
        rows.extend({"case_id": case_id, **row} for row in
                    evaluate_case_per_class(reference, labels, voxel_spacing(reference_volume.affine), classes,
                                            evaluation["nsd_tolerance_mm"]))
        progress.advance(case_id)
    if not rows:
        logger.warning("select: the split holds no test case (data.split.test is 0); the choice stands on its "
                       "cross-validation Dice alone.")
        return per_case_table(rows, classes), {}
    table = per_case_table(rows, classes)
    summary = summarize_per_class(table, bootstrap=Bootstrap.of(evaluation))
    metrics = {**flatten_summary(summary, prefix="best_test_"), **flatten_class_means(summary, prefix="best_test_")}
    logger.info("select: %s scores test Dice %.4f on %d held-out cases.", segmenter.name,
                metrics.get("best_test_dice_mean", float("nan")), len(test_cases))
    return table, metrics


def promote_champion(
    segmenter: Ensemble,
    configuration: dict[str, Any],
    oof_scores: pd.DataFrame,
    cv: CvParams,
    evaluation: EvaluationParams,
) -> tuple[SegmenterExport, dict[str, Any], dict[str, float], dict[str, Any]]:
    """The chosen segmenter for the MLflow run (`best_segmenter`), registered under
    `medseg-<dataset>` as a new version; the alias `champion` moves to it only on evidence.

    The new choice's out-of-fold Dice per case is compared with the champion's, as its own
    `select` run stored them, on the cases both scored (`medseg.evaluation.selection.decide_champion`:
    a one-sided paired bootstrap at `cv.champion_alpha`, at least `cv.champion_min_cases`
    paired cases, or `cv.force_champion`). A first champion needs no comparison. The previous
    champion keeps its version number, so a promotion can be undone in the registry.

    Returns:
        The export (alias `champion`, or None when the champion stays), the decision
        (`champion_decision.json`), its MLflow metrics (`champion_dice_difference` and its
        interval, `champion_p_value`, `champion_paired_cases`) and parameter
        (`selection.promoted`).
    """
    name = configuration["registered_model_name"]
    if tracking.active_run_id() is None:  # MLflow off: nothing is registered, so nothing to compare
        record = {"registered_model_name": name, "candidate": configuration["chosen"]["candidate"], "promoted": False,
                  "reason": "MLflow is off (no active run): nothing is registered, and no champion moves"}
        return SegmenterExport(segmenter, name, alias=None), record, {}, {"selection.promoted": False}
    champion = tracking.champion_record(name, CHAMPION)
    decision = decide_champion(oof_scores, champion, alpha=float(cv["champion_alpha"]),
                               min_cases=int(cv["champion_min_cases"]), force=bool(cv["force_champion"]),
                               bootstrap=Bootstrap.of(evaluation))
    (logger.info if decision.promote else logger.warning)("select: %s: %s.", name, decision.reason)
    record = {"registered_model_name": name, "candidate": configuration["chosen"]["candidate"], **decision.as_record()}
    export = SegmenterExport(segmenter, name, alias=configuration["alias"] if decision.promote else None)
    return export, record, decision.metrics(), {"selection.promoted": decision.promote}


def create_pipeline(**kwargs) -> Pipeline:
    outputs = {f"{model}_{what}": f"{model}.cv_{what}" for model in model_kinds() for what in ("probabilities", "ensemble")}
    return Pipeline(
        [
            Node(
                select_configuration,
                {"intermediate_labels": "intermediate_labels", "case_geometry": "case_geometry", "folds": "folds",
                 "dataset_fingerprint": "dataset_fingerprint", "case_fingerprints": "case_fingerprints",
                 "data": "params:data", "cv": "params:cv", "evaluation": "params:evaluation",
                 "project_root": "project_root", "synthetic_phantoms": "synthetic_phantoms", **outputs},
                ["selection.best_configuration", "selection.candidates_plot", "selection.segmenter",
                 "selection.oof_scores", "selection.mlflow_metrics_cv", "selection.mlflow_params_choice"],
                name="select_configuration",
                namespace="selection",
            ),
            Node(
                score_best_configuration,
                ["selection.segmenter", "intermediate_images", "intermediate_labels", "case_geometry", "splits",
                 "dataset_fingerprint", "params:data", "params:evaluation"],
                ["selection.metrics_per_case", "selection.mlflow_metrics_test"],
                name="score_best_configuration",
                namespace="selection",
            ),
            Node(promote_champion,
                 ["selection.segmenter", "selection.best_configuration", "selection.oof_scores", "params:cv",
                  "params:evaluation"],
                 ["selection.mlflow_segmenter", "selection.champion_decision", "selection.mlflow_metrics_champion",
                  "selection.mlflow_params_promotion"],
                 name="promote_champion", namespace="selection"),
        ]
    )
