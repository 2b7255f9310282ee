"""Cross-validation of a model kind (`cv.folds: K`), as nnU-Net's five folds: the nodes of
the model template that train each fold, predict its held-out cases in their source
geometry, and score the pooled out-of-fold predictions.

A fold is the template's own training step on the fold's split (`medseg.cases.split.fold_split`):
the same `train_model` skeleton, model kind, plan and settings, so a fold trains exactly what
a single-split run trains, on other cases. Folds train one after another under
`compute.scheduler: sync`, and at the same time on Dask workers under `local:N` or
`tcp://...`, one TensorFlow process per fold: the plan (and `auto` steps) is made once, in
this process, before the folds start, so every fold trains the same steps wherever it runs.
A finished fold keeps its network under its fingerprint in `<model>.cv_backup/fold<i>`, so a
rerun after a failure (a worker killed, a later node) loads it and trains only the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from medseg.errors import ConfigurationError
from medseg.evaluation import evaluate_case_per_class
from medseg.evaluation.statistics import Bootstrap, bootstrap_interval
from medseg.imaging.geometry import PreprocessingPlan
from medseg.imaging.io import Volume, voxel_spacing
from medseg.inference.ensemble import Ensemble
from medseg.inference.parity import export_with_parity
from medseg.inference.postprocessing import probabilities_on_source_grid, source_label_map
from medseg.kinds import ModelKind, model_kinds
from medseg.kinds.plans import ModelSettings
from medseg.kinds.streams import case_loader
from medseg.parameters import DataParams, EvaluationParams, PlanningParams
from medseg.pipelines.evaluation import _evaluated_classes, _reference_mask
from medseg.pipelines.training import build_segmenter, class_values, train_model
from medseg.casework.progress import CaseProgress
from medseg.runs import compute, tracking
from medseg.cases.split import fold_split

logger = logging.getLogger(__name__)

Partitions = dict[str, Callable[[], Volume]]


def train_fold(
    kind_name: str,
    fold: int,
    splits: pd.DataFrame,
    grid_images: Partitions,
    grid_labels: Partitions,
    grid_geometry: PreprocessingPlan,
    dataset_fingerprint: dict,
    data: Mapping[str, Any],
    settings: Mapping[str, Any],
    backup_root: str,
) -> dict[str, Any]:
    """Train one fold (here, or as a Dask task in a worker process) and keep its network.

    Returns:
        {"fold", "history", "decided", "seconds"}: what the driver logs; the network itself
        stays in `backup_root` (`medseg.models.training.keep_finished`).
    """
    start = time.perf_counter()
    kind = model_kinds()[kind_name]
    n_classes = kind.class_count(settings, dataset_fingerprint)
    stream = kind.sample_stream(settings, case_loader(grid_images, grid_labels))
    _, history, decided = train_model(
        kind.name, lambda: kind.build(settings, n_classes), stream, splits, grid_geometry, dataset_fingerprint, data,
        settings, backup_root, keep=True, log_epochs=False,
    )
    history = {key: [float(v) for v in values] for key, values in history.items()}
    return {"fold": fold, "history": history, "decided": decided, "seconds": time.perf_counter() - start}


def cross_validate(
    grid_images: Partitions,
    grid_labels: Partitions,
    splits: pd.DataFrame,
    folds: dict,
    grid_geometry: PreprocessingPlan,
    case_fingerprints: pd.DataFrame,
    dataset_fingerprint: dict,
    data: DataParams,
    settings: dict[str, Any],
    planning: PlanningParams,
    cv: Mapping[str, Any],
    backup_root: str,
    *,
    kind: ModelKind,
) -> tuple[Ensemble | dict, dict[str, Callable[[], Volume]], list[dict], dict[str, Any]]:
    """Train the K folds and predict each one's held-out cases.

    Args:
        grid_images, grid_labels: the cases on the model's grid.
        splits: the case split (its test cases stay out of every fold).
        folds: `folds.json` (`medseg.cases.split.assign_folds`).
        grid_geometry: the model's grid, which maps its probabilities back to each source.
        case_fingerprints, dataset_fingerprint, data, settings, planning: as the template's
            training and segmenter nodes take them (`settings` holds the plan: every fold
            trains its epochs and steps).
        cv: `params:cv` (folds: 0 turns this off).
        backup_root: `<model>.cv_backup`; fold i keeps its network in `fold<i>/`.
        kind: the model kind (bound by the template).

    Returns:
        (the ensemble of the K fold segmenters, `<model>.cv_ensemble`; {case_id: its
        out-of-fold probabilities on its source grid}, lazily, `<model>.cv_probabilities`;
        one record per fold (history, what training decided, time) for the nested runs; the
        folds' decisions as MLflow parameters `<model>.fold<i>.training.*`). With
        `cv.folds: 0`, ({}, {}, [], {}): `{}` for no ensemble, since Kedro saves no None.
    """
    n_folds = int(cv["folds"])
    if n_folds == 0:
        return {}, {}, [], {}
    if ModelSettings.of(settings).cascade:
        raise ConfigurationError(
            f"{kind.name}: cross-validation of a cascade (conv3d.model.configuration: cascade) is not supported: its "
            "low-resolution stage would need folds of its own. Set conv3d.model.configuration to fullres or lowres."
        )
    if int(folds.get("n_folds", 0)) != n_folds:
        raise ConfigurationError(f"{kind.name}: folds.json holds {folds.get('n_folds')} folds, cv.folds is {n_folds}.")
    executor = compute.current()
    fold_splits = [fold_split(splits, folds, i) for i in range(n_folds)]
    roots = [f"{backup_root}/fold{i}" for i in range(n_folds)]
    logger.info("%s: cross-validation, %d folds of %s held-out cases, on %s.", kind.name, n_folds,
                "/".join(str(len(f["val"])) for f in folds["folds"]), executor.scheduler)

    def task(i: int) -> dict[str, Any]:
        return train_fold(kind.name, i, fold_splits[i], grid_images, grid_labels, grid_geometry, dataset_fingerprint,
                          dict(data), dict(settings), roots[i])

    if executor.scheduler == compute.SYNC:
        progress = CaseProgress(f"{kind.name}: cross-validation", n_folds, logger=logger, unit="fold", every_s=0.0,
                                every_fraction=0.0)
        records = []
        for i in range(n_folds):
            logger.info("%s: training fold %d of %d.", kind.name, i + 1, n_folds)
            records.append(task(i))
            progress.advance()
    else:
        records = executor.map(task, list(range(n_folds)), task=f"{kind.name}: cross-validation",
                               case_ids=[f"fold {i}" for i in range(n_folds)])
    members = []
    fold_cases = {int(f["fold"]): list(f["val"]) for f in folds["folds"]}
    for i in range(n_folds):  # each fold's kept network, loaded here (nothing is trained again)
        model, _, _ = train_model(
            kind.name, lambda: kind.build(settings, kind.class_count(settings, dataset_fingerprint)),
            kind.sample_stream(settings, case_loader(grid_images, grid_labels)), fold_splits[i], grid_geometry,
            dataset_fingerprint, data, settings, roots[i], keep=True, log_epochs=False,
        )
        segmenter = build_segmenter(model, case_fingerprints, grid_geometry, dataset_fingerprint, data, settings, planning,
                                    kind=kind)
        segmenter.plan.display_name = f"{segmenter.plan.display_name}-fold{i}"
        if ModelSettings.of(settings).onnx_export:  # each fold's export, checked on its own validation cases
            export_with_parity(segmenter, {c: (lambda c=c: grid_images[c]().data) for c in fold_cases[i]})
        members.append(segmenter)
    ensemble = Ensemble(members, f"{kind.display_name(settings)}-{n_folds}folds",
                        description={"folds": n_folds, "model": kind.name})

    def out_of_fold(case_id: str, member: Any) -> Callable[[], Volume]:
        def make() -> Volume:
            geometry = grid_geometry[case_id]
            probability = probabilities_on_source_grid(member.probabilities(grid_images[case_id]().data), geometry)
            return Volume(probability, np.asarray(geometry.original_affine, dtype=np.float64))

        return make

    probabilities = {c: out_of_fold(c, members[f["fold"]]) for f in folds["folds"] for c in f["val"]}
    decided = {f"{kind.name}.fold{r['fold']}.{k.removeprefix(kind.name + '.')}": v for r in records for k, v in r["decided"].items()}
    return ensemble, probabilities, records, decided


def evaluate_cross_validation(
    cv_probabilities: dict[str, Callable[[], Volume]],
    cv_runs: list[dict],
    intermediate_labels: Partitions,
    case_geometry: PreprocessingPlan,
    folds: dict,
    dataset_fingerprint: dict,
    data: DataParams,
    settings: dict[str, Any],
    evaluation: EvaluationParams,
    *,
    kind: ModelKind,
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, float]]:
    """Score every out-of-fold prediction per case and class, as the test evaluation does, and
    log each fold as an MLflow run nested under this run (`<run name>/fold<i>`).

    Returns:
        (one row per case and class with its fold: `<model>.cv_metrics_per_case`; the summary
        `<model>.cv_summary`: the pooled means, per class, and their spread over folds; the
        parent run's metrics `cv_dice_mean`, `cv_dice_<class>_mean`, `cv_dice_fold_std`, ...).
        Empty without cross-validation.
    """
    if not cv_probabilities:
        return pd.DataFrame(columns=["case_id", "fold"]), {}, {}
    classes, multiclass = _evaluated_classes(dataset_fingerprint)
    values = class_values(dataset_fingerprint)
    threshold = ModelSettings.of(settings).inference.threshold
    fold_of = {c: f["fold"] for f in folds["folds"] for c in f["val"]}
    rows = []
    progress = CaseProgress(f"{kind.name}: scoring out-of-fold predictions", len(cv_probabilities), logger=logger)
    for case_id in sorted(cv_probabilities):
        probability = cv_probabilities[case_id]()
        reference, reference_volume = _reference_mask(intermediate_labels[case_id](), case_geometry[case_id], multiclass, data)
        labels = source_label_map(probability.data, threshold, values)
        for row in evaluate_case_per_class(reference, labels, voxel_spacing(reference_volume.affine), classes,
                                           evaluation["nsd_tolerance_mm"]):
            rows.append({"case_id": case_id, "fold": fold_of[case_id], **row})
        progress.advance(case_id)
    table = pd.DataFrame(rows)
    summary = cv_summary(table, Bootstrap.of(evaluation))
    metrics = summary["metrics"]
    tracking.log_fold_runs(kind.name, cv_runs, summary["folds"])
    logger.info("%s: cross-validation Dice %.4f (folds %s).", kind.name, metrics["cv_dice_mean"],
                ", ".join(f"{f['dice_mean']:.3f}" for f in summary["folds"]))
    return table, summary, metrics


def cv_summary(table: pd.DataFrame, bootstrap: Bootstrap | None = None) -> dict[str, Any]:
    """The pooled out-of-fold metrics of `evaluate_cross_validation`'s table.

    `cv_<metric>_mean` is the mean over cases of each case's mean over classes (NaN classes,
    both masks empty, left out), as `test_dice_mean`, with its bootstrap interval over cases
    (`cv_<metric>_ci_low`, `_ci_high`) when `bootstrap` is given; `cv_<metric>_<class>_mean`
    per class; `cv_dice_fold_std` the standard deviation of the folds' own `dice_mean` (ddof 0).
    """
    metrics: dict[str, float] = {}
    for metric in ("dice", "iou", "nsd", "hd95_mm"):
        if metric not in table:
            continue
        per_case = table.groupby("case_id")[metric].mean()
        metrics[f"cv_{metric}_mean"] = float(per_case.mean())
        interval = bootstrap_interval(per_case.to_numpy(), bootstrap) if bootstrap is not None else None
        if interval is not None:
            metrics[f"cv_{metric}_ci_low"], metrics[f"cv_{metric}_ci_high"] = interval
        for name, values in table.groupby("class")[metric]:
            metrics[f"cv_{metric}_{name}_mean"] = float(values.mean())
    folds = []
    for fold, part in table.groupby("fold"):
        per_case = part.groupby("case_id")["dice"].mean()
        folds.append({"fold": int(fold), "cases": int(per_case.size), "dice_mean": float(per_case.mean()),
                      "iou_mean": float(part.groupby("case_id")["iou"].mean().mean())})
    metrics["cv_dice_fold_std"] = float(np.std([f["dice_mean"] for f in folds]))
    metrics["cv_dice_fold_min"] = float(min(f["dice_mean"] for f in folds))
    return {"metrics": metrics, "folds": folds, "cases": int(table["case_id"].nunique())}
