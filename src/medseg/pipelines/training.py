"""The training nodes of the model pipeline template: the one training skeleton, and the
trained network made a segmenter with the training run's plan."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import pandas as pd

from medseg.imaging.io import Volume
from medseg.imaging.laterality import safe_flip_axes
from medseg.inference import Segmenter, SegmenterPlan
from medseg.inference.cascade import with_context
from medseg.kinds import ModelKind
from medseg.imaging.geometry import PreprocessingPlan
from medseg.kinds.plans import ModelSettings, TrainingSettings, replica_part
from medseg.kinds.streams import case_loader
from medseg.models.deep_supervision import supervision_targets, with_deep_supervision
from medseg.models.distribute import distribution_strategy, global_batch_size, strategy_name
from medseg.models.precision import dtype_policy, with_precision
from medseg.models.training import (
    TrainingBudget,
    derive_seed,
    fit_model,
    keep_finished,
    load_finished,
    make_reproducible,
    prepare_backup,
    seeded_initializers,
    training_fingerprint,
    wants_determinism,
)
from medseg.parameters import DataParams, PlanningParams
from medseg.runs.tracking import log_metrics
from medseg.runs import tracking
from medseg.cases.split import cases_in_split

logger = logging.getLogger(__name__)


class MlflowEpochLogger(keras.callbacks.Callback):
    """Sends each epoch's Keras logs (loss, dice, iou, val_*) to the active MLflow run, as
    they come: the one place where a node logs to MLflow itself, so that a run's curves grow
    while it trains rather than when the node returns."""

    def __init__(self, model_key: str, prefix: str = ""):
        super().__init__()
        self.model_key, self.prefix = model_key, prefix
        self.models_in_run: tuple[str, ...] = ()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.models_in_run = tracking.models_in_active_run()  # once, not a tracking-store read per epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {f"{self.prefix}{k}": v for k, v in (logs or {}).items() if k != "learning_rate"}
        log_metrics(self.model_key, metrics, step=epoch, models_in_run=self.models_in_run)


def train_model(
    model_key: str,
    build_model: Callable[[], keras.Model],
    make_stream: Callable[..., Any],
    splits: pd.DataFrame,
    case_geometry: PreprocessingPlan,
    dataset_fingerprint: Mapping[str, Any],
    data: Mapping[str, Any],
    settings: Mapping[str, Any],
    backup_root: str,
    metric_prefix: str = "",
    keep: bool = False,
    log_epochs: bool = True,
) -> tuple[keras.Model, dict[str, list[float]], dict[str, Any]]:
    """The one training skeleton of every model kind.

    1. Seeds Python, NumPy and Keras from `data.seed` and the model's seed, and turns on
       TensorFlow op determinism (`training.deterministic`, "auto": on without a GPU).
    2. Builds the model in the planned `training.precision` (the output layer and the losses
       stay float32) and under the `training.distribute` strategy (`none`: one device;
       `mirrored`: one replica per GPU, or per logical CPU device without one, see
       `medseg.models.distribute`); then keys its crash-recovery backup by a fingerprint of
       the settings, the data parameters, the split and the preprocessing plan (and the
       replicas, when distributed): an interrupted run is resumed only by a run that would
       compute the same thing; any other backup is deleted and training starts fresh, which
       the log says.
    3. Trains on endless streams of training and validation cases, logging each epoch to the
       MLflow run; a resumed run is tagged, and linked to the run it continues. The streams
       deliver the global batch, `training.batch_size` (per replica) × replicas; Keras splits
       it over the replicas. The learning rate is used as given, not scaled with the replicas.

    Args:
        model_key: the model kind's name (the namespace and the MLflow metric prefix).
        build_model: returns the compiled model; called after seeding, inside the strategy's
            scope (so its variables and optimizer state are mirrored on every replica).
        make_stream: `(case_ids, seed, augment, flip_axes, batch_size=...) -> tf.data.Dataset`
            (`augment`: False, or the intensity augmentation's name, `training.augmentation`)
            of batches of `batch_size` (the global batch) samples.
        splits: the case split (train for fitting, val for early stopping).
        case_geometry: the preprocessing plan (`geometry.json`).
        dataset_fingerprint: `fingerprint.json`; its `lateralized` classes turn off the
            left-right flip (`training.flip_axes` minus axis 0), so the side stays learnable.
        data: `params:data`.
        settings: `<model>.settings`, the model's section with the plan applied (seed, model,
            sampling, training).
        backup_root: the model's backup folder (catalog entry `<model>.backup`).
        metric_prefix: put before the epoch metrics' names in the MLflow run (a cascade's
            low-resolution folds: `context0.val_dice`).
        keep: keep the trained network under its fingerprint in `backup_root`
            (`medseg.models.training.keep_finished`), and return a kept one without training:
            a cascade's folds, which live in memory, are not trained again when the run is
            resumed after a later node failed.
        log_epochs: send each epoch to the active MLflow run; off for cross-validation folds,
            whose nested runs get their history when the fold ends, wherever it trained.

    Returns:
        The trained model (best validation loss), its history, and what training decided:
        `<model>.training.precision_used`, `.distribute_strategy`, `.replicas` and
        `.global_batch_size`, and `<model>.inference.precision_used` (the MLflow run's
        parameters).
    """
    settings = ModelSettings.of(settings)
    training = settings.training
    seed = derive_seed(int(data["seed"]), settings.seed)
    make_reproducible(seed, wants_determinism(training.deterministic))
    precision = training.precision
    strategy = distribution_strategy(training.distribute)
    replicas = int(strategy.num_replicas_in_sync)
    batch_size = global_batch_size(training.batch_size, replicas)
    decided = {
        f"{model_key}.training.precision_used": precision,
        f"{model_key}.training.distribute_strategy": strategy_name(strategy),
        f"{model_key}.training.replicas": replicas,
        f"{model_key}.training.global_batch_size": batch_size,
        f"{model_key}.inference.precision_used": settings.inference.precision or precision,
    }
    logger.info("%s: training in %s.", model_key, precision)
    logger.info(
        "%s: %s, %d replica(s): global batch %d = %s per replica x %d.", model_key, strategy_name(strategy), replicas,
        batch_size, training.batch_size, replicas,
    )
    # Keras records the strategy when the model object is created, and the optimizer and
    # metric variables made by compile must be mirrored too: both happen in the scope.
    with dtype_policy(precision), strategy.scope(), seeded_initializers(seed):
        model = build_model()  # layers take the policy when built; the heads stay float32
        # nnU-Net's deep supervision trains a graph beside the network (its heads, then dropped).
        supervised = with_deep_supervision(model) if training.deep_supervision else None
    fingerprint = training_fingerprint(
        model=model_key, section=settings, data=data, splits=splits.to_dict("records"), plan=case_geometry.to_json(),
        fingerprint=dataset_fingerprint, **replica_part(strategy),
    )
    if keep and (finished := load_finished(backup_root, fingerprint, model)) is not None:
        logger.info("%s: a network trained with this fingerprint (%s) is kept; loaded, not trained again.", model_key, fingerprint)
        decided.update({f"{model_key}.training.budget.{key}": value for key, value in finished["report"].items()})
        return model, finished["history"], decided
    resume = prepare_backup(backup_root, fingerprint, training.epochs, {"mlflow_run_id": tracking.active_run_id()})
    if resume.discarded:
        logger.info("%s: deleted backups %s made with other parameters or data; training starts fresh.", model_key, resume.discarded)
    if resume.resumed_epoch:
        logger.info("%s: resuming an interrupted run (backup %s) after epoch %d.", model_key, fingerprint, resume.resumed_epoch)
        tracking.record_resume(model_key, resume.resumed_epoch, resume.previous_owner.get("mlflow_run_id"))
    flip_axes = safe_flip_axes(training.flip_axes, dataset_fingerprint.get("lateralized", []))
    if tuple(flip_axes) != tuple(sorted(set(training.flip_axes))):
        logger.info("%s: classes %s keep to one side of the body: no left-right flips.", model_key, dataset_fingerprint["lateralized"])
    budget = _budget_callback(model_key, training)
    train_data = make_stream(cases_in_split(splits, "train"), seed, training.augmentation, flip_axes, batch_size=batch_size)
    val_data = make_stream(cases_in_split(splits, "val"), seed + 1, False, flip_axes, batch_size=batch_size)
    if supervised is not None:
        logger.info("%s: deep supervision, loss weights %s.", model_key, [round(w, 3) for w in supervised.weights])
        targets = supervision_targets(supervised.strides)
        train_data, val_data = train_data.map(targets), val_data.map(targets)
    history = fit_model(
        model if supervised is None else supervised.model,
        train_data,
        val_data,
        epochs=training.epochs,
        steps_per_epoch=training.steps_per_epoch,
        validation_steps=training.validation_steps,
        backup_dir=resume.backup_dir,
        patience=training.early_stopping_patience,
        callbacks=[*([MlflowEpochLogger(model_key, metric_prefix)] if log_epochs else []), *([budget] if budget else [])],
    )
    report = budget.report if budget is not None and budget.report else {}
    decided.update({f"{model_key}.training.budget.{key}": value for key, value in report.items()})
    if keep:
        keep_finished(backup_root, fingerprint, model, history, report)
    return model, history, decided


def _budget_callback(model_key: str, training: TrainingSettings) -> TrainingBudget | None:
    """The budget guard for planned epochs (`training.budget` from the plan, unless
    `planning.retime` is off); none for epochs given explicitly, which run as asked."""
    budget = training.budget
    if not budget:
        return None
    return TrainingBudget(model_key, float(budget["minutes"]) * 60.0, training.epochs, training.steps_per_epoch,
                          training.validation_steps, float(budget["seconds_per_step"]))


def train(
    primary_images: dict[str, Callable[[], Volume]],
    primary_labels: dict[str, Callable[[], Volume]],
    splits: pd.DataFrame,
    case_geometry: PreprocessingPlan,
    dataset_fingerprint: dict,
    data: DataParams,
    settings: dict[str, Any],
    backup_root: str,
    context: Mapping[str, np.ndarray] | None = None,
    *,
    kind: ModelKind,
) -> tuple[keras.Model, dict[str, list[float]], dict[str, Any]]:
    """Train the model kind on samples streamed from the training cases (`kind.sample_stream`:
    slices or patches through a bounded queue, so memory does not grow with the dataset).
    Seeding, crash recovery and logging: `train_model`.

    Args:
        primary_images, primary_labels: preprocessed cases.
        splits: the case split (train for fitting, val for early stopping).
        case_geometry: the preprocessing plan (part of the backup's fingerprint).
        dataset_fingerprint: `fingerprint.json` (the classes: a sigmoid head for one, K + 1
            softmax channels for K > 1; the lateralized classes).
        data: `params:data` (seed; part of the fingerprint).
        settings: `<model>.settings`, `params:<model>` with the plan applied.
        backup_root: `<model>.backup`, the crash-recovery folder.
        context: a cascade's low-resolution probabilities per case, on the training grid
            (`medseg.pipelines.cascade.train_context`): the network takes them after the image.
            None or empty: the image alone.
        kind: the model kind (bound by the template).

    Returns:
        The trained model (best validation loss), its history and the run parameters that
        training decided (`train_model`).
    """
    n_classes = kind.class_count(settings, dataset_fingerprint)
    source = {"msd": data["msd_dir"], "dicom": data.get("dicom_dir")}.get(data["source"]) or f"synthetic phantoms (data.seed={data['seed']})"
    tracking.log_input_cases(f"{kind.name}-cases", str(source), splits, context="training")
    load_case = case_loader(primary_images, primary_labels)
    if context:
        load_case = with_context_loader(load_case, context)
    stream = kind.sample_stream(settings, load_case)
    return train_model(
        kind.name, lambda: kind.build(settings, n_classes), stream, splits, case_geometry, dataset_fingerprint, data,
        settings, backup_root,
    )


def with_context_loader(load_case: Callable[[str], tuple[np.ndarray, np.ndarray]], context: Mapping[str, np.ndarray]):
    """`load_case` whose image carries the case's context channels after it, (X, Y, Z, 1 + C)."""

    def load(case_id: str) -> tuple[np.ndarray, np.ndarray]:
        image, label = load_case(case_id)
        return with_context(image, context[case_id]), label

    return load


def class_values(dataset_fingerprint: Mapping[str, Any]) -> tuple[int, ...]:
    """The dataset's label value of each class a model predicts, in channel order (1..K)."""
    if dataset_fingerprint.get("label_mode") != "multiclass":
        return (1,)  # the merged foreground
    return tuple(int(value) for value in dataset_fingerprint["classes"])


def segmenter_plan(
    kind: ModelKind,
    case_fingerprints: pd.DataFrame,
    case_geometry: PreprocessingPlan,
    dataset_fingerprint: Mapping[str, Any],
    data: Mapping[str, Any],
    settings: Mapping[str, Any],
    planning: Mapping[str, Any],
) -> SegmenterPlan:
    """The plan a trained model segments new scans with, from the training run's own files:
    the target spacing of `geometry.json`, the crop, interpolation and clipping of
    `data.preprocessing`, the channel the cases were read from, the classes of
    `fingerprint.json`, the model's inference parameters and the kind's window
    (`kind.segmenter_window`)."""
    preprocessing = data["preprocessing"]
    channels = case_fingerprints["channel"].dropna() if "channel" in case_fingerprints else pd.Series([], dtype=float)
    settings = ModelSettings.of(settings)
    inference = settings.inference
    names = dataset_fingerprint.get("classes", {})
    if dataset_fingerprint.get("label_mode") == "multiclass":
        classes = {str(v): str(names.get(str(v), names.get(v, v))) for v in class_values(dataset_fingerprint)}
    else:
        classes = {"1": str(next(iter(names.values()), "foreground"))}
    run_id, _ = tracking.active_run_identity()
    return SegmenterPlan(
        model_key=kind.name,
        display_name=kind.display_name(settings),
        target_spacing=case_geometry.target_spacing,
        interpolation_order=int(preprocessing["interpolation_order"]),
        clip_percentiles=tuple(preprocessing["clip_percentiles"]) if preprocessing["clip_percentiles"] else None,
        crop_margin=int(preprocessing["crop_margin"]) if preprocessing["crop_to_nonzero"] else None,
        channel=int(channels.iloc[0]) if len(channels) else None,
        label_mode=str(dataset_fingerprint.get("label_mode", "binary")),
        classes=classes,
        lateralized=[int(v) for v in dataset_fingerprint.get("lateralized", [])],
        threshold=inference.threshold,
        memory_gb=float(planning["memory_gb"]),
        mirror_axes=inference.mirror_axes,
        keep_largest_component=inference.keep_largest_component,
        provenance={"mlflow_run_id": run_id, "params_hash": training_fingerprint(data=data, **{kind.name: settings})},
        data_spacing=tuple(settings.grid.get("data_spacing") or case_geometry.target_spacing),
        **kind.segmenter_window(settings),
    )


def build_segmenter(
    model: keras.Model,
    case_fingerprints: pd.DataFrame,
    case_geometry: PreprocessingPlan,
    dataset_fingerprint: dict,
    data: DataParams,
    settings: dict[str, Any],
    planning: PlanningParams,
    context_models: list[Segmenter] | None = None,
    *,
    kind: ModelKind,
) -> Segmenter:
    """The trained network as a segmenter: the network the kind runs
    (`kind.segmenter_network`), in the inference precision the plan chose
    (`settings.inference.precision`, `medseg.models.precision.with_precision`: the same
    weights, computing in that policy), with the training run's plan (`segmenter_plan`); its
    windows are batched within `planning.memory_gb`.

    Args:
        model: the trained network.
        case_fingerprints: per-case table (the channel the cases were read from).
        case_geometry: the preprocessing plan (its target spacing).
        dataset_fingerprint: `fingerprint.json` (classes, lateralized classes).
        data: `params:data` (preprocessing).
        settings: `<model>.settings` (model, inference).
        planning: `params:planning` (memory_gb).
        context_models: a cascade's low-resolution stage, run before the network.
        kind: the model kind (bound by the template).

    Returns:
        The segmenter, saved as `<model>.segmenter`.
    """
    plan = segmenter_plan(kind, case_fingerprints, case_geometry, dataset_fingerprint, data, settings, planning)
    network = kind.segmenter_network(model, settings)
    settings = ModelSettings.of(settings)
    precision = settings.inference.precision
    if precision and precision != settings.training.precision:
        logger.info("%s: the segmenter predicts in %s (trained in %s).", kind.name, precision, settings.training.precision)
        network = with_precision(network, precision)
    return Segmenter(network, plan, context_models or ())
