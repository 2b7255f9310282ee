"""Nodes and graph pieces shared by the model pipelines (`unet`, `conv3d`).

Both models write predictions the same way (in each case's original geometry), are evaluated
by the same code, and leave the same reports and MLflow artifacts. Only training and the
probability map differ, and those live in each pipeline's own `nodes.py`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial, update_wrapper
from typing import Any

import keras
import numpy as np
import pandas as pd
from kedro.pipeline import Node, Pipeline
from matplotlib.figure import Figure

from medseg.datasets.folder import anchor_path
from medseg.errors import GeometryMismatchError
from medseg.evaluation import (
    dice_score,
    OverlaySlice,
    choose_overlay_slice,
    evaluate_case_per_class,
    flatten_class_means,
    flatten_summary,
    plot_overlays,
    plot_training_curves,
    summarize_per_class,
)
from medseg.imaging.geometry import CaseGeometry, to_canonical
from medseg.imaging.io import Volume, read_volume, voxel_spacing
from medseg.imaging.laterality import safe_flip_axes
from medseg.imaging.validation import binarize_label
from medseg.models.training import (
    derive_seed,
    fit_model,
    make_reproducible,
    dtype_policy,
    machine_description,
    prepare_backup,
    resolve_precision,
    seconds_per_training_step,
    training_fingerprint,
    wants_determinism,
    with_input_shape,
)
from medseg.inference import Segmenter, SegmenterPlan
from medseg.models.distribute import distribution_strategy, global_batch_size, strategy_name
from medseg.parameters import DataParams, ExportParams, ReportingParams
from medseg.patching import make_tf_dataset
from medseg.pipelines import tracking
from medseg.planning import INPUT_PIPELINE_OVERHEAD, plan_steps
from medseg.compute import DriverThenWorker
from medseg.progress import CaseProgress

logger = logging.getLogger(__name__)

class MlflowEpochLogger(keras.callbacks.Callback):
    """Sends each epoch's Keras logs (loss, dice, iou, val_*) to the active MLflow run."""

    def __init__(self, model_key: str):
        super().__init__()
        self.model_key = model_key

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        tracking.log_metrics(self.model_key, {k: v for k, v in (logs or {}).items() if k != "learning_rate"}, step=epoch)


def train_model(
    model_key: str,
    build_model: Callable[[], keras.Model],
    make_stream: Callable[..., Any],
    splits: pd.DataFrame,
    case_geometry: dict,
    dataset_fingerprint: dict,
    data: dict[str, Any],
    section: dict[str, Any],
    backup_root: str,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """The one training skeleton of every model pipeline.

    1. Seeds Python, NumPy and Keras from `data.seed` and the model's seed, and turns on
       TensorFlow op determinism (`training.deterministic`, "auto": on without a GPU).
    2. Builds the model in `training.precision` (`auto`: bfloat16 where the hardware has it
       and it was measured faster for the model kind, see `resolve_precision`; the output
       layer and the losses stay float32), logged as `<model>.training.precision_used`, and
       under the `training.distribute` strategy (`none`: one device; `mirrored`: one replica
       per GPU, or per logical CPU device without one, see `medseg.models.distribute`), logged
       as `<model>.training.distribute_strategy` and `<model>.training.replicas`; then keys its crash-recovery backup by a fingerprint of the model
       section, the data parameters, the split and the preprocessing plan (and the replicas,
       when distributed): an interrupted run
       is resumed only by a run that would compute the same thing; any other backup is deleted
       and training starts fresh, which the log says.
    3. Trains on endless streams of training and validation cases, logging each epoch to the
       MLflow run; a resumed run is tagged, and linked to the run it continues. The streams
       deliver the global batch, `training.batch_size` (per replica) × replicas, logged as
       `<model>.training.global_batch_size`; Keras splits it over the replicas. The learning
       rate is used as given, not scaled with the replicas.

    Args:
        model_key: `unet` or `conv3d` (the namespace and the MLflow metric prefix).
        build_model: returns the compiled model; called after seeding, inside the strategy's
            scope (so its variables and optimizer state are mirrored on every replica).
        make_stream: `(case_ids, seed, augment, flip_axes, batch_size=...) -> tf.data.Dataset`
            of batches of `batch_size` (the global batch) samples.
        splits: the case split (train for fitting, val for early stopping).
        case_geometry: the preprocessing plan (`geometry.json`).
        dataset_fingerprint: `fingerprint.json`; its `lateralized` classes turn off the
            left-right flip (`training.flip_axes` minus axis 0), so the side stays learnable.
        data: `params:data`.
        section: `params:<model_key>` (seed, model, sampling, training).
        backup_root: the model's backup folder (catalog entry `<model>.backup`).

    Returns:
        The trained model (best validation loss) and its history.
    """
    training = section["training"]
    seed = derive_seed(int(data["seed"]), int(section["seed"]))
    make_reproducible(seed, wants_determinism(training.get("deterministic", "auto")))
    precision = resolve_precision(str(training.get("precision", "float32")), model_kind(model_key, section))
    strategy = distribution_strategy(str(training.get("distribute", "none")))
    replicas = int(strategy.num_replicas_in_sync)
    batch_size = global_batch_size(training["batch_size"], replicas)
    tracking.log_params({
        f"{model_key}.training.precision_used": precision,
        f"{model_key}.training.distribute_strategy": strategy_name(strategy),
        f"{model_key}.training.replicas": replicas,
        f"{model_key}.training.global_batch_size": batch_size,
    })
    logger.info("%s: training in %s (training.precision=%s).", model_key, precision, training.get("precision", "float32"))
    logger.info(
        "%s: %s, %d replica(s): global batch %d = %s per replica x %d.", model_key, strategy_name(strategy), replicas,
        batch_size, training["batch_size"], replicas,
    )
    # Keras records the strategy when the model object is created, and the optimizer and
    # metric variables made by compile must be mirrored too: both happen in the scope.
    with dtype_policy(precision), strategy.scope():
        model = build_model()  # layers take the policy when built; the heads stay float32
    fingerprint = training_fingerprint(
        model=model_key, section=section, data=data, splits=splits.to_dict("records"), plan=case_geometry,
        fingerprint=dataset_fingerprint, **_replica_part(strategy),
    )
    resume = prepare_backup(backup_root, fingerprint, int(training["epochs"]), {"mlflow_run_id": tracking.active_run_id()})
    if resume.discarded:
        logger.info("%s: deleted backups %s made with other parameters or data; training starts fresh.", model_key, resume.discarded)
    if resume.resumed_epoch:
        logger.info("%s: resuming an interrupted run (backup %s) after epoch %d.", model_key, fingerprint, resume.resumed_epoch)
        tracking.record_resume(model_key, resume.resumed_epoch, resume.previous_owner.get("mlflow_run_id"))
    flip_axes = safe_flip_axes(training["flip_axes"], dataset_fingerprint.get("lateralized", []))
    if tuple(flip_axes) != tuple(sorted(set(training["flip_axes"]))):
        logger.info("%s: classes %s keep to one side of the body: no left-right flips.", model_key, dataset_fingerprint["lateralized"])
    history = fit_model(
        model,
        make_stream(cases_in_split(splits, "train"), seed, bool(training["augment"]), flip_axes, batch_size=batch_size),
        make_stream(cases_in_split(splits, "val"), seed + 1, False, flip_axes, batch_size=batch_size),
        epochs=training["epochs"],
        steps_per_epoch=training["steps_per_epoch"],
        validation_steps=training["validation_steps"],
        backup_dir=resume.backup_dir,
        patience=training["early_stopping_patience"],
        callbacks=[MlflowEpochLogger(model_key)],
    )
    return model, history


def _replica_part(strategy) -> dict[str, Any]:
    """What a distributed run adds to its backup and timing keys: the strategy and replicas
    (another replica count is another global batch). Empty for one device, so the keys of
    one-device runs are those they had before `training.distribute` existed."""
    name = strategy_name(strategy)
    return {} if name == "none" else {"distribute": name, "replicas": int(strategy.num_replicas_in_sync)}


def _get(section: dict, path: str) -> Any:
    node = section
    for key in path.split("."):
        node = node[key]
    return node


def apply_plan(model_key: str, section: dict[str, Any], planned: dict[str, Any], inputs: dict[str, Any]) -> tuple[dict, dict]:
    """The model section with every `auto` replaced by its planned value, and the plan file.

    Args:
        model_key: `unet` or `conv3d`.
        section: `params:<model>` as given.
        planned: {dotted path in the section: planned value}, e.g. {"model.input_size": 96}.
        inputs: what the plan was made from (median shape, spacing, budgets), recorded.

    Returns:
        (settings, plan): `settings` is the section the model is trained and run with;
        `plan` (saved as `data/05_model_input/<model>/plan.json`) holds `planned`, `used`
        and `overrides` (each explicit value with the planned one it replaced). The values
        used are also logged to MLflow as `<model>.plan.<path>`.
    """
    settings = json.loads(json.dumps(dict(section), default=lambda value: dict(value)))
    used, overrides = {}, {}
    for path, value in planned.items():
        given = _get(section, path)
        if given == "auto":
            *parents, leaf = path.split(".")
            node = settings
            for key in parents:
                node = node[key]
            node[leaf] = value
        else:
            overrides[path] = {"given": given, "planned": value}
        used[path] = _get(settings, path)
    for path, entry in overrides.items():
        if entry["given"] != entry["planned"]:
            logger.info("%s: %s=%s overrides the planned %s.", model_key, path, entry["given"], entry["planned"])
    tracking.log_params({f"{model_key}.plan.{path}": value for path, value in used.items()})
    plan = {"model": model_key, "inputs": inputs, "planned": planned, "used": used, "overrides": overrides}
    return settings, json.loads(json.dumps(plan))


def model_kind(model_key: str, section: dict[str, Any]) -> str:
    """The network a model section builds: "unet" (the 2D U-Net) for `unet`, and
    `conv3d.model.kind` ("unet3d" or "patch_classifier") for `conv3d`."""
    return "unet" if model_key == "unet" else str(section["model"].get("kind", "unet3d"))


def plan_precision(model_key: str, settings: dict[str, Any], plan: dict[str, Any]) -> tuple[dict, dict]:
    """`training.precision` decided once, by the plan: `auto` becomes the policy this machine
    trains fastest in (`medseg.models.training.resolve_precision`: `mixed_bfloat16` where the
    hardware has bfloat16 units and the model kind gains from them, else `float32`); an
    explicit policy is kept. Training, the timing of steps and the MLflow run then read the
    one value in `settings`, so they cannot disagree.

    Returns:
        (settings, plan): `settings["training"]["precision"]` is the policy; the plan gains
        `precision`: {"given": the parameter, "used": the policy}.
    """
    given = str(settings["training"].get("precision", "float32"))
    used = resolve_precision(given, model_kind(model_key, settings))
    settings["training"]["precision"] = used
    plan["precision"] = {"given": given, "used": used}
    if given == "auto":
        logger.info("%s: training.precision=auto chose %s on this machine.", model_key, used)
    return settings, plan


STEP_PARAMETERS = ("epochs", "steps_per_epoch", "validation_steps")


def plan_training_steps(
    model_key: str,
    settings: dict[str, Any],
    plan: dict[str, Any],
    build_model: Callable[[], keras.Model],
    planning: dict[str, Any],
    timings: dict[str, Any] | None,
) -> tuple[dict, dict, dict]:
    """Epochs and steps from the model's time budget (`planning.budget_minutes.<model>`), for
    the `training.epochs`, `steps_per_epoch` and `validation_steps` set to `auto`.

    A few training steps of the planned model are timed on this machine
    (`seconds_per_training_step`), as training will run them: built under the
    `training.distribute` strategy, on the global batch (per-replica batch × replicas), so a
    step is one step of all replicas together. `medseg.planning.plan_steps` fills the budget. The
    timing is kept (`data/05_model_input/timings/<model>.json`, keyed by the model's sizes,
    precision, the machine, and the strategy and replicas when distributed), so a rerun with
    the same plan on the same machine reuses it and chooses the same steps, and trains to the
    same weights.

    Returns:
        (settings, plan, timings): the plan gains the planned and used steps, the overrides
        and `calibration` (seconds per step, the budget, whether the timing was reused, the
        machine, and `distribute` and `replicas` when distributed).
    """
    timings = dict(timings or {})
    training = settings["training"]
    if not any(training[name] == "auto" for name in STEP_PARAMETERS):
        return settings, plan, timings
    precision = resolve_precision(str(training.get("precision", "float32")), model_kind(model_key, settings))
    machine = machine_description()
    strategy = distribution_strategy(str(training.get("distribute", "none")))
    distributed = _replica_part(strategy)
    sized = {k: v for k, v in settings.items() if k in ("model", "sampling")}
    key = training_fingerprint(
        model=model_key, sizes=sized, batch=training["batch_size"], precision=precision, machine=machine, **distributed
    )
    reused = key in timings
    if reused:
        seconds = float(timings[key]["seconds_per_step"])
    else:
        with dtype_policy(precision), strategy.scope():
            model = build_model()
        seconds = seconds_per_training_step(model, global_batch_size(training["batch_size"], strategy.num_replicas_in_sync))
        del model
        timings[key] = {"seconds_per_step": seconds, "machine": machine, "precision": precision, **distributed}
    budget = float(planning["budget_minutes"][model_key])
    steps = plan_steps(seconds * INPUT_PIPELINE_OVERHEAD, budget)
    logger.info(
        "%s: %.3f s per training step (%s); %d epochs of %d steps fill %g minutes.", model_key, seconds,
        "timing reused" if reused else "timed now", steps["epochs"], steps["steps_per_epoch"], budget,
    )
    settings, step_plan = apply_plan(model_key, settings, {f"training.{k}": v for k, v in steps.items()}, plan["inputs"])
    for part in ("planned", "used", "overrides"):
        plan[part].update(step_plan[part])
    plan["calibration"] = {"seconds_per_step": seconds, "budget_minutes": budget, "reused": reused, "machine": machine, **distributed}
    return settings, plan, timings


def sampled_dataset(
    stream_fn: Callable,
    load_case: Callable[[str], tuple[np.ndarray, np.ndarray]],
    shape: tuple[int, ...],
    sample_shape: tuple[int, ...],
    sampling: dict[str, Any],
    case_ids: list[str],
    seed: int,
    augment: bool,
    flip_axes: tuple[int, ...] | None = None,
    *,
    batch_size: int,
):
    """A batched `tf.data` dataset over `stream_fn` (`slice_stream` or `patch_stream`), with a
    pipeline's `sampling` parameters (`samples_per_volume`, `queue_length`,
    `foreground_fraction`). The last five arguments are those of `train_model`'s
    `make_stream`; `batch_size` is the global batch that `train_model` computes (samples per
    step across all replicas), not `training.batch_size`."""
    factory = lambda: stream_fn(  # noqa: E731
        load_case,
        case_ids,
        shape,
        samples_per_volume=int(sampling["samples_per_volume"]),
        queue_length=int(sampling["queue_length"]),
        foreground_fraction=float(sampling["foreground_fraction"]),
        seed=seed,
    )
    return make_tf_dataset(factory, sample_shape, batch_size, augment=augment, seed=seed, flip_axes=flip_axes)


def foreground_class_count(dataset_fingerprint: dict) -> int:
    """K, the foreground classes a model learns: those of `fingerprint.json` in multiclass
    mode (K + 1 softmax channels when K > 1), else 1 (the original sigmoid head)."""
    if dataset_fingerprint.get("label_mode") == "multiclass":
        return len(dataset_fingerprint["classes"])
    return 1


def class_values(dataset_fingerprint: dict) -> tuple[int, ...]:
    """The dataset's label value of each class a model predicts, in channel order (1..K)."""
    if dataset_fingerprint.get("label_mode") != "multiclass":
        return (1,)  # the merged foreground
    return tuple(int(value) for value in dataset_fingerprint["classes"])


def cases_in_split(splits: pd.DataFrame, *names: str) -> list[str]:
    """Case ids assigned to any of the named sets, sorted."""
    return sorted(splits.loc[splits["split"].isin(names), "case_id"])


def case_loader(
    primary_images: dict[str, Callable[[], Volume]], primary_labels: dict[str, Callable[[], Volume]]
) -> Callable[[str], tuple[np.ndarray, np.ndarray]]:
    """`load_case(case_id) -> (image, label)` arrays of a preprocessed case, read on demand."""

    def load_case(case_id: str) -> tuple[np.ndarray, np.ndarray]:
        return primary_images[case_id]().data, primary_labels[case_id]().data

    return load_case


def segmenter_plan(
    model_key: str,
    display_name: str,
    case_fingerprints: pd.DataFrame,
    case_geometry: dict,
    dataset_fingerprint: dict,
    data: dict[str, Any],
    section: dict[str, Any],
    planning: dict[str, Any],
    **window: Any,
) -> SegmenterPlan:
    """The plan a trained model segments new scans with, from the training run's own files:
    the target spacing of `geometry.json`, the crop, interpolation and clipping of
    `data.preprocessing`, the channel the cases were read from, the classes of
    `fingerprint.json`, and the model's inference parameters.

    Args:
        model_key: `unet` or `conv3d`.
        display_name: the model's name in run names.
        window: the model's window fields of :class:`SegmenterPlan` (`window`, `depth`,
            `patch_size`, `overlap`, `sigma_scale`, `features_per_voxel`).
    """
    preprocessing = data["preprocessing"]
    first = next(iter(case_geometry.values()))
    channels = case_fingerprints["channel"].dropna() if "channel" in case_fingerprints else pd.Series([], dtype=float)
    inference = section["inference"]
    values = class_values(dataset_fingerprint)
    names = dataset_fingerprint.get("classes", {})
    if dataset_fingerprint.get("label_mode") == "multiclass":
        classes = {str(v): str(names.get(str(v), names.get(v, v))) for v in values}
    else:
        classes = {"1": str(next(iter(names.values()), "foreground"))}
    run_id, _ = tracking.active_run_identity()
    return SegmenterPlan(
        model_key=model_key,
        display_name=display_name,
        target_spacing=tuple(float(t) for t in first["target_spacing"]),
        interpolation_order=int(preprocessing["interpolation_order"]),
        clip_percentiles=tuple(preprocessing["clip_percentiles"]) if preprocessing.get("clip_percentiles") else None,
        crop_margin=int(preprocessing.get("crop_margin", 0)) if preprocessing.get("crop_to_nonzero") else None,
        channel=int(channels.iloc[0]) if len(channels) else None,
        label_mode=str(dataset_fingerprint.get("label_mode", "binary")),
        classes=classes,
        lateralized=[int(v) for v in dataset_fingerprint.get("lateralized", [])],
        threshold=float(inference["threshold"]),
        memory_gb=float(planning["memory_gb"]),
        mirror_axes=[int(a) for a in inference.get("mirror_axes", [])],
        keep_largest_component=bool(inference.get("keep_largest_component", False)),
        provenance={"mlflow_run_id": run_id, "params_hash": training_fingerprint(data=data, **{model_key: section})},
        **window,
    )


def predict_split(
    segmenter: Segmenter,
    primary_images: dict[str, Callable[[], Volume]],
    case_geometry: dict,
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
        geometry = CaseGeometry.from_dict(case_geometry[case_id])
        return DriverThenWorker(
            driver=lambda: segmenter.probabilities(primary_images[case_id]().data),
            worker=partial(to_label_map.volume, geometry=geometry),
        )

    return {c: mask(c) for c in cases_in_split(splits, "val", "test")}


def _reference_mask(record: pd.Series, multiclass: bool, data: dict[str, Any]) -> tuple[np.ndarray, Volume]:
    reference_volume = read_volume(record["label_path"], kind="label")
    reference = reference_volume.data if multiclass else binarize_label(reference_volume.data, data.get("foreground_labels"))
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
    case_geometry: dict,
    case_fingerprints: pd.DataFrame,
    splits: pd.DataFrame,
    dataset_fingerprint: dict,
    data: DataParams,
    *,
    model_key: str,
) -> pd.DataFrame:
    """Test Dice with and without each postprocessing option the model turns on.

    For every test case, the masks without any option (`plain`), with mirroring, with the
    largest component, and with both (only the enabled ones) are scored against the reference
    in the source geometry. Mirroring's plain mask is its unflipped pass, so this costs one
    extra prediction of the test cases, and nothing when no option is on.

    Returns:
        One row per test case, variant and class: case_id, variant, class, label, dice; logged
        to MLflow as `test_dice_mean_<variant>` (the mean over cases of the class mean).
    """
    if not segmenter.effective_mirror_axes() and not segmenter.plan.keep_largest_component:
        return pd.DataFrame(columns=["case_id", "variant", "class", "label", "dice"])
    classes, multiclass = _evaluated_classes(dataset_fingerprint)
    records = case_fingerprints.set_index("case_id")
    rows = []
    test_cases = cases_in_split(splits, "test")
    progress = CaseProgress("Scoring postprocessing", len(test_cases), logger=logger)
    for case_id in test_cases:
        reference, _ = _reference_mask(records.loc[case_id], multiclass, data)
        geometry = CaseGeometry.from_dict(case_geometry[case_id])
        for variant, labels in segmenter.variants(primary_images[case_id]().data, geometry).items():
            for value, name in classes.items():
                rows.append({"case_id": case_id, "variant": variant, "class": name, "label": value,
                             "dice": dice_score(reference == value, labels == value)})
        progress.advance(case_id)
    table = pd.DataFrame(rows)
    per_case = table.groupby(["variant", "case_id"])["dice"].mean()
    means = per_case.groupby(level="variant").mean()
    tracking.log_metrics(model_key, {f"test_dice_mean_{variant.replace('+', '_and_')}": float(v) for variant, v in means.items()})
    logger.info("%s: test Dice by postprocessing: %s", model_key, {k: round(float(v), 4) for k, v in means.items()})
    return table


@dataclass(frozen=True)
class SegmenterExport:
    """What `<model>.mlflow_segmenter` logs: the segmenter, and the registry name (or None)."""

    segmenter: Segmenter
    registered_model_name: str | None


def package_segmenter(segmenter: Segmenter, export: ExportParams) -> SegmenterExport:
    """The trained segmenter for the MLflow run, as the pyfunc model `<model>_segmenter`
    (`medseg.serving`), registered under `<model>.export.registered_model_name` when set."""
    return SegmenterExport(segmenter, export.get("registered_model_name") or None)


def evaluate_predictions(
    predictions: dict[str, Callable[[], Volume]],
    case_fingerprints: pd.DataFrame,
    splits: pd.DataFrame,
    dataset_fingerprint: dict,
    data: DataParams,
    reporting: ReportingParams,
) -> tuple[pd.DataFrame, Figure]:
    """Per-case, per-class metrics of the test cases, in 3D and in each case's original geometry.

    Args:
        predictions: predicted masks (as saved: source geometry, uint8; the dataset's own
            label values in multiclass mode, {0, 1} in binary mode).
        case_fingerprints: per-case table with the source image and label paths.
        splits: the case split; only `test` cases are scored.
        dataset_fingerprint: `fingerprint.json` (label_mode and classes).
        data: `params:data` (foreground_labels, for binary mode).
        reporting: `params:<model>.reporting` (n_overlay_cases).

    Returns:
        One row per test case and foreground class (`class`, `label`, dice, iou, hd95_mm,
        precision, recall, volumes in ml, empty flags; binary mode has one class) and a
        figure of image/reference/prediction overlays for the first few cases, each titled
        with its case, axial slice and Dice (the mean over its classes).
    """
    classes, multiclass = _evaluated_classes(dataset_fingerprint)
    rows, overlays = [], []
    records = case_fingerprints.set_index("case_id")
    test_cases = cases_in_split(splits, "test")
    progress = CaseProgress("Evaluating", len(test_cases), logger=logger)
    for case_id in test_cases:
        record = records.loc[case_id]
        reference, reference_volume = _reference_mask(record, multiclass, data)
        prediction = predictions[case_id]()
        if prediction.data.shape != reference.shape or not np.allclose(prediction.affine, reference_volume.affine, atol=1e-3):
            raise GeometryMismatchError(
                f"prediction of case '{case_id}' has shape {prediction.data.shape}, but its label "
                f"{record['label_path']} has {reference.shape} (or their affines differ). Run the pipeline "
                "again so that predictions are written in the source geometry."
            )
        case_rows = evaluate_case_per_class(reference, prediction.data, voxel_spacing(reference_volume.affine), classes)
        rows.extend({"case_id": case_id, **row} for row in case_rows)
        if len(overlays) < int(reporting["n_overlay_cases"]):
            channel = None if pd.isna(record["channel"]) else int(record["channel"])
            image = read_volume(record["image_path"], channel=channel)
            views = [to_canonical(Volume(a, reference_volume.affine)).data for a in (image.data, reference, prediction.data)]
            z = choose_overlay_slice(views[1], views[2])
            dice = float(np.nanmean([row["dice"] for row in case_rows])) if any(np.isfinite(row["dice"]) for row in case_rows) else float("nan")
            overlays.append(OverlaySlice(case_id, *(view[:, :, z] for view in views), z=z, dice=dice))
        progress.advance(case_id)
    return pd.DataFrame(rows), plot_overlays(overlays)


# What the training-curve Dice and IoU were computed on, per model pipeline.
TRAINING_SAMPLES = {"unet": "sampled 2D slices", "conv3d": "sampled 3D patches"}


def run_provenance(model_key: str, data: dict[str, Any], section: dict[str, Any], project_root: str) -> dict[str, Any]:
    """What made a report: the MLflow run, the dataset and a hash of the parameters.

    Args:
        model_key: `unet` or `conv3d`.
        data: `params:data`.
        section: `params:<model_key>`.
        project_root: the project root; relative data folders are taken from it.

    Returns:
        `mlflow_run_id` and `mlflow_run_name` (None outside a tracked run), `data_source`
        (`synthetic` or `msd`), `data_dir` (the absolute MSD folder or synthetic folder) and
        `params_hash` (16 hex characters of SHA-256 over the `data` and model sections, as
        `medseg.models.training.training_fingerprint` hashes them: equal parameters give
        equal hashes, whatever the key order).
    """
    run_id, run_name = tracking.active_run_identity()
    folder = data["msd_dir"] if data["source"] == "msd" else data["synthetic"]["dir"]
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
    *,
    model_key: str,
) -> tuple[dict, Figure]:
    """Summarise the test metrics, log them to MLflow as `test_<metric>_mean` (the mean over the
    foreground classes) and `test_<metric>_<class>_mean`, plot the curves.

    Args:
        metrics_per_case: output of `evaluate_predictions`.
        history: the training history (Keras metrics per epoch).
        data: `params:data`.
        section: `params:<model_key>`.
        project_root: the project's root folder (catalog entry `project_root`).
        model_key: `unet` or `conv3d` (bound by `evaluation_pipeline`).

    Returns:
        The summary (mean, std, median and missing count per metric, then the run's
        provenance: see `run_provenance`) and the training curves, captioned with what their
        Dice and IoU were computed on.
    """
    summary = summarize_per_class(metrics_per_case)
    tracking.log_metrics(model_key, {**flatten_summary(summary, prefix="test_"), **flatten_class_means(summary, prefix="test_")})
    curves = plot_training_curves(history, samples=TRAINING_SAMPLES.get(model_key))
    return {**summary, **run_provenance(model_key, data, section, project_root)}, curves


def export_model(model: keras.Model) -> tuple[keras.Model, dict, keras.Model]:
    """The trained model, for the MLflow Keras flavor, its architecture JSON and its weights.

    The exported model is a copy without the training configuration (optimizer, medseg's loss
    and metrics), so `mlflow.keras.load_model` needs only TensorFlow and Keras. A 2D model
    (input (B, H, W, 1)) is fully convolutional: it is exported for whole slices of any size,
    input (None, None, 1), as the pipeline's own inference runs it (in-plane sizes divisible
    by 2**depth). A 3D model keeps its patch input; whole volumes go through sliding windows.
    """
    model = with_input_shape(model, (None, None, 1) if len(model.input_shape) == 4 else model.input_shape[1:])
    return model, json.loads(model.to_json()), model


def _named(func: Callable, model_key: str) -> Callable:
    """`func` with its keyword `model_key` bound, keeping its name and docstring for kedro-viz.

    A keyword, not the first positional argument: Kedro maps a node's inputs onto the
    wrapped function's signature to validate typed `params:` inputs, so the positions must
    stay those of the inputs.
    """
    return update_wrapper(partial(func, model_key=model_key), func)


def evaluation_pipeline(model_key: str) -> Pipeline:
    """Prediction of the split, evaluation, reporting and MLflow export of one model, in
    namespace `model_key`.

    Reads `<model>.segmenter`, `<model>.history` and `<model>.model`; writes
    `<model>.predictions`, `.postprocessing_ablation`, `.mlflow_segmenter`,
    `.metrics_per_case`, `.metrics_summary`, `.overlays`, `.training_curves`,
    `.mlflow_model`, `.architecture` and `.weights`.
    """
    m = model_key
    return Pipeline(
        [
            Node(
                predict_split,
                [f"{m}.segmenter", "primary_images", "case_geometry", "splits"],
                f"{m}.predictions",
                name="predict_split",
                namespace=m,
            ),
            Node(
                _named(evaluate_postprocessing, m),
                [f"{m}.segmenter", "primary_images", "case_geometry", "case_fingerprints", "splits", "dataset_fingerprint", "params:data"],
                f"{m}.postprocessing_ablation",
                name="evaluate_postprocessing",
                namespace=m,
            ),
            Node(
                package_segmenter,
                [f"{m}.segmenter", f"params:{m}.export"],
                f"{m}.mlflow_segmenter",
                name="package_segmenter",
                namespace=m,
            ),
            Node(
                evaluate_predictions,
                [f"{m}.predictions", "case_fingerprints", "splits", "dataset_fingerprint", "params:data", f"params:{m}.reporting"],
                [f"{m}.metrics_per_case", f"{m}.overlays"],
                name="evaluate_predictions",
                namespace=m,
            ),
            Node(
                _named(summarize_evaluation, m),
                [f"{m}.metrics_per_case", f"{m}.history", "params:data", f"params:{m}", "project_root"],
                [f"{m}.metrics_summary", f"{m}.training_curves"],
                name="summarize_evaluation",
                namespace=m,
            ),
            Node(
                export_model,
                f"{m}.model",
                [f"{m}.mlflow_model", f"{m}.architecture", f"{m}.weights"],
                name="export_model",
                namespace=m,
            ),
        ]
    )
