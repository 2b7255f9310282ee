"""The planning steps every model kind shares: applying planned values to a parameter
section, deciding the precision, and filling the time budget with training steps.

A kind's own planner (`ModelKind.plan`) computes its sizes from the data
(`medseg.kinds.sizes`), then calls these in order: `apply_plan`, `plan_precision`,
`plan_training_steps`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from medseg.models.distribute import distribution_strategy, global_batch_size, strategy_name
from medseg.models.precision import (
    CHECK_BATCH,
    CHECK_STEPS,
    PrecisionMeasurement,
    choose_precision,
    dtype_policy,
    machine_description,
    measure_precision,
    precision_candidates,
)
from medseg.models.training import seconds_per_training_step, training_fingerprint
from medseg.kinds.sizes import INPUT_PIPELINE_OVERHEAD, plan_steps
from medseg.patching import Augmentation

logger = logging.getLogger(__name__)

STEP_PARAMETERS = ("epochs", "steps_per_epoch", "validation_steps")


@dataclass
class ModelPlan:
    """What the planner decided for one model (`<model>/plan.json`).

    Attributes:
        model: the model kind's name.
        inputs: what the plan was made from (median shape, spacing, budgets).
        planned: {dotted parameter path: the planned value}.
        used: {dotted parameter path: the value training uses}: the planned one where the
            parameter was `auto`, else the given one.
        overrides: {dotted parameter path: {"given", "planned"}} for each explicit value.
        precision: {"given": `training.precision`, "used": the policy}; empty until decided.
        calibration: the timed training step and the budget it filled; empty when every step
            parameter was given.
        context: what a 3D patch must see and the configuration chosen for it
            (`medseg.kinds.sizes.plan_context`); empty for a kind that plans none.
    """

    model: str
    inputs: dict[str, Any]
    planned: dict[str, Any] = field(default_factory=dict)
    used: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    precision: dict[str, str] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """`plan.json`'s content (JSON types: lists, not tuples)."""
        plan = {key: value for key, value in asdict(self).items() if value or key in ("planned", "used", "overrides")}
        return json.loads(json.dumps(plan))

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "ModelPlan":
        return cls(**{key: record[key] for key in cls.__dataclass_fields__ if key in record})

    def logged_parameters(self) -> dict[str, Any]:
        """The values used, as the MLflow run's parameters `<model>.plan.<path>`."""
        return {f"{self.model}.plan.{path}": value for path, value in self.used.items()}


class _View:
    """A typed reading of one part of a settings mapping (the mapping itself stays JSON)."""

    def __init__(self, values: Mapping[str, Any]):
        self._values = values

    @classmethod
    def of(cls, values: "Mapping[str, Any] | _View"):
        """`values` itself when it is already this view, else the view of the mapping."""
        return values if isinstance(values, cls) else cls(values)


def _steps(value: Any) -> int:
    if value == "auto":
        raise ValueError("a step parameter is still `auto`: the settings were not planned (medseg.kinds.plans.apply_plan)")
    return int(value)


class TrainingSettings(_View):
    """`settings.training`: how the network is trained, every `auto` planned."""

    @property
    def optimizer(self) -> str:
        return str(self._values["optimizer"])

    @property
    def learning_rate(self) -> float:
        return float(self._values["learning_rate"])

    @property
    def loss(self) -> str:
        return str(self._values["loss"])

    @property
    def deep_supervision(self) -> bool:
        return bool(self._values.get("deep_supervision", False))

    @property
    def lr_schedule(self) -> str:
        return str(self._values.get("lr_schedule", "constant"))

    @property
    def total_steps(self) -> int | None:
        """epochs × steps per epoch, the length of the learning-rate schedule; None while either
        is still `auto` (a model built to time its steps, before they are planned)."""
        try:
            return self.epochs * self.steps_per_epoch
        except ValueError:  # still `auto` (_steps)
            return None

    @property
    def epochs(self) -> int:
        return _steps(self._values["epochs"])

    @property
    def batch_size(self) -> int:
        return _steps(self._values["batch_size"])

    @property
    def steps_per_epoch(self) -> int:
        return _steps(self._values["steps_per_epoch"])

    @property
    def validation_steps(self) -> int:
        return _steps(self._values["validation_steps"])

    @property
    def augment(self) -> bool:
        return bool(self._values["augment"])

    @property
    def augmentation(self) -> Augmentation | bool:
        """What the training stream augments with: False, or the flips, the intensity
        augmentation `intensity_augmentation` names (`jitter`, `nnunet`) and the spatial one
        `spatial_augmentation` names (`none`, `nnunet`)."""
        if not self.augment:
            return False
        return Augmentation(str(self._values.get("intensity_augmentation", "jitter")),
                            str(self._values.get("spatial_augmentation", "none")))

    @property
    def early_stopping_patience(self) -> int:
        return int(self._values["early_stopping_patience"])

    @property
    def deterministic(self) -> str | bool:
        return self._values["deterministic"]

    @property
    def flip_axes(self) -> list[int]:
        return [int(axis) for axis in self._values["flip_axes"]]

    @property
    def precision(self) -> str:
        """The training policy (decided by `plan_precision` when it was `auto`)."""
        return str(self._values["precision"])

    @property
    def distribute(self) -> str:
        return str(self._values["distribute"])

    @property
    def budget(self) -> dict[str, float] | None:
        """{"minutes", "seconds_per_step"} for planned epochs that training re-times; else None."""
        return self._values.get("budget") or None


class InferenceSettings(_View):
    """`settings.inference`: how the segmenter turns probabilities into a mask."""

    @property
    def threshold(self) -> float:
        return float(self._values["threshold"])

    @property
    def mirror_axes(self) -> list[int]:
        return [int(axis) for axis in self._values["mirror_axes"]]

    @property
    def keep_largest_component(self) -> bool:
        return bool(self._values["keep_largest_component"])

    @property
    def profiles(self) -> bool:
        """`inference.profiles`: choose the inference profiles after training."""
        return bool(self._values.get("profiles", True))

    @property
    def profile_cases(self) -> int:
        """`inference.profile_cases`: the validation cases the profiles are measured on, at most."""
        return int(self._values.get("profile_cases", 3))

    @property
    def overlap(self) -> float:
        return float(self._values["overlap"])

    @property
    def sigma_scale(self) -> float:
        return float(self._values["sigma_scale"])

    @property
    def precision(self) -> str | None:
        """The inference policy the plan chose; None before `plan_precision`."""
        value = self._values.get("precision")
        return str(value) if value else None


class SamplingSettings(_View):
    """`settings.sampling`: how training samples are drawn."""

    @property
    def foreground_fraction(self) -> float:
        return float(self._values["foreground_fraction"])

    @property
    def samples_per_volume(self) -> int:
        return int(self._values["samples_per_volume"])

    @property
    def queue_length(self) -> int:
        return int(self._values["queue_length"])

    @property
    def patch_size(self) -> tuple[int, int, int]:
        value = self._values["patch_size"]
        if value == "auto":
            _steps(value)
        return tuple(int(s) for s in value)


class ModelSettings(dict):
    """A model kind's section with its plan applied (`<model>.settings`): what training, the
    segmenter and prediction use, read through typed properties, as nnU-Net's
    `ConfigurationManager` reads its plans. It is still the plain JSON mapping underneath
    (what the MLflow run logs and the training fingerprint hashes); `ModelSettings.of` wraps a
    plain mapping. A property raises `KeyError` for a value the kind's section does not have
    and `ValueError` for one that is still `auto`.
    """

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> "ModelSettings":
        return settings if isinstance(settings, cls) else cls(settings)

    @property
    def seed(self) -> int:
        return int(self["seed"])

    @property
    def model(self) -> dict[str, Any]:
        return self["model"]

    @property
    def input_size(self) -> int:
        """`model.input_size`: a 2D model's training slice, voxels."""
        return _steps(self["model"]["input_size"])

    @property
    def base_filters(self) -> int:
        return int(self["model"]["base_filters"])

    @property
    def depth(self) -> int:
        """`model.depth`: the network's pooling stages."""
        return _steps(self["model"]["depth"])

    @property
    def network(self) -> str:
        """`model.network`, for a kind with several networks."""
        return str(self["model"]["network"])

    @property
    def poolings(self) -> list[list[int]] | None:
        """The planned per-axis pooling of each stage of a 3D network; None: isotropic."""
        return self["model"].get("poolings")

    @property
    def input_channels(self) -> int:
        """The network's input channels: 1, or the image and a cascade's context."""
        return int(self["model"].get("input_channels", 1))

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """`sampling.patch_size`: a 3D model's training patch and window, voxels."""
        return self.sampling.patch_size

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self["sampling"])

    @property
    def training(self) -> TrainingSettings:
        return TrainingSettings(self["training"])

    @property
    def inference(self) -> InferenceSettings:
        return InferenceSettings(self.get("inference", {}))

    @property
    def registered_model_name(self) -> str | None:
        return self["export"]["registered_model_name"] or None

    @property
    def onnx_export(self) -> bool:
        """`export.onnx`: export the network to ONNX and check its parity."""
        return bool(self["export"].get("onnx", True))

    @property
    def n_overlay_cases(self) -> int:
        return int(self["reporting"]["n_overlay_cases"])

    @property
    def n_viewer_cases(self) -> int:
        return int(self["reporting"].get("n_viewer_cases", 2))

    @property
    def grid(self) -> dict[str, Any]:
        """The model's own grid when its plan chose one (`configuration`, `spacing`,
        `data_spacing`); empty: the data pipeline's training grid."""
        return self.get("grid") or {}

    @property
    def cascade(self) -> dict[str, Any]:
        """A cascade's low-resolution stage (`stage` settings, `folds`, `spacing`); empty: none."""
        return self.get("cascade") or {}


def replica_part(strategy) -> dict[str, Any]:
    """What a distributed run adds to its backup and timing keys: the strategy and replicas
    (another replica count is another global batch). Empty for one device, so that one-device
    keys do not change with the option."""
    name = strategy_name(strategy)
    return {} if name == "none" else {"distribute": name, "replicas": int(strategy.num_replicas_in_sync)}


def _get(section: Mapping[str, Any], path: str) -> Any:
    node = section
    for key in path.split("."):
        node = node[key]
    return node


def apply_plan(
    model_key: str, section: Mapping[str, Any], planned: dict[str, Any], inputs: dict[str, Any]
) -> tuple[ModelSettings, ModelPlan]:
    """The model section with every `auto` replaced by its planned value, and the plan file.

    Args:
        model_key: the model kind's name.
        section: `params:<model>` as given.
        planned: {dotted path in the section: planned value}, e.g. {"model.input_size": 96}.
        inputs: what the plan was made from (median shape, spacing, budgets), recorded.

    Returns:
        (settings, plan): `settings` is the section the model is trained and run with;
        `plan` (the catalog's `<model>.plan`) holds `planned`, `used` and `overrides` (each
        explicit value with the planned one it replaced), in JSON types.
    """
    settings = ModelSettings(json.loads(json.dumps(dict(section), default=lambda value: dict(value))))
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
    as_json = json.loads(json.dumps({"inputs": inputs, "planned": planned, "used": used, "overrides": overrides}))
    return settings, ModelPlan(model=model_key, **as_json)


def plan_precision(
    model_key: str,
    settings: dict[str, Any],
    plan: ModelPlan,
    build_model: Callable[[], Any],
    timings: dict[str, Any] | None,
) -> tuple[dict, ModelPlan, dict]:
    """`training.precision` decided once, by the plan, and by measurement for `auto`.

    An explicit policy is kept, for training and inference alike. For `auto`, each policy the
    hardware offers (`precision_candidates`: float32, and bfloat16 where there are bfloat16
    units) is measured on the planned model and batch (`measure_precision`: a training step, an
    inference batch and the quick Dice check), and `choose_precision` keeps the fastest that
    passes, for training and for inference apart: a float32-trained network can predict in
    bfloat16 where that is faster and its masks agree. The measurements are kept with the
    training-step timings (`<model>.timings`, keyed by the sizes, batch, candidates and
    machine), so a rerun on the same machine makes the same choice without measuring.

    Returns:
        (settings, plan, timings): `settings.training.precision` is the training policy
        and `settings.inference.precision` the inference one; the plan gains
        `precision`: {"given", "used" (training), "inference", and for `auto` "measured"
        (per policy: seconds per step and per batch, check Dice), "reason", "reused"}.
    """
    timings = dict(timings or {})
    training = ModelSettings.of(settings).training
    given = training.precision
    candidates = precision_candidates(given)
    record: dict[str, Any] = {"given": given}
    if len(candidates) == 1:
        chosen = {"training": candidates[0], "inference": candidates[0]}
    else:
        sized = {k: v for k, v in settings.items() if k in ("model", "sampling")}
        machine = machine_description()
        key = training_fingerprint(
            model=model_key, sizes=sized, batch=training.batch_size, candidates=candidates, machine=machine,
            purpose="precision", check=[CHECK_STEPS, CHECK_BATCH],
        )
        reused = key in timings
        if reused:
            measured = {name: PrecisionMeasurement(**values) for name, values in timings[key]["measured"].items()}
        else:
            measured = measure_precisions(candidates, build_model, training.batch_size)
            timings[key] = {"measured": {name: m.to_json() for name, m in measured.items()}, "machine": machine}
        chosen = choose_precision(measured)
        record.update(measured={name: m.to_json() for name, m in measured.items()}, reason=chosen["reason"], reused=reused)
        logger.info(
            "%s: training.precision=auto chose %s for training and %s for inference on this machine (%s%s).",
            model_key, chosen["training"], chosen["inference"], chosen["reason"] or "float32 fastest",
            ", measured earlier" if reused else "",
        )
    settings["training"]["precision"] = chosen["training"]
    settings.setdefault("inference", {})["precision"] = chosen["inference"]
    plan.precision = {**record, "used": chosen["training"], "inference": chosen["inference"]}
    return settings, plan, timings


def measure_precisions(
    candidates: tuple[str, ...], build_model: Callable[[], Any], batch_size: int
) -> dict[str, PrecisionMeasurement]:
    """`measure_precision` for each policy, float32 first: its initial weights start every
    other policy, and its trained check model is run in each for the inference check."""
    measured, initial, float32_model = {}, None, None
    for name in sorted(candidates, key=lambda name: name != "float32"):
        measured[name], model, start = measure_precision(name, build_model, batch_size, initial, float32_model)
        if name == "float32":
            initial, float32_model = start, model
    return measured


def plan_training_steps(
    model_key: str,
    settings: dict[str, Any],
    plan: ModelPlan,
    build_model: Callable[[], Any],
    planning: Mapping[str, Any],
    timings: dict[str, Any] | None,
    default_budget_minutes: float,
) -> tuple[dict, ModelPlan, dict]:
    """Epochs and steps from the model's time budget (`planning.budget_minutes.<model>`, else
    `default_budget_minutes`, the kind's own), for the `training.epochs`, `steps_per_epoch` and
    `validation_steps` set to `auto`.

    A few training steps of the planned model are timed on this machine
    (`seconds_per_training_step`), as training will run them: in the planned precision, built
    under the `training.distribute` strategy, on the global batch (per-replica batch ×
    replicas). `medseg.kinds.sizes.plan_steps` fills the budget. The timing is kept (the catalog's
    `<model>.timings`, keyed by the model's sizes, precision, the machine, and the strategy and
    replicas when distributed), so a rerun with the same plan on the same machine chooses the
    same steps and trains to the same weights.

    Returns:
        (settings, plan, timings): the plan gains the planned and used steps, the overrides
        and `calibration` (seconds per step, the budget, whether the timing was reused, the
        machine, and `distribute` and `replicas` when distributed).
    """
    timings = dict(timings or {})
    if not any(settings["training"][name] == "auto" for name in STEP_PARAMETERS):
        return settings, plan, timings
    training = ModelSettings.of(settings).training
    precision = training.precision
    machine = machine_description()
    strategy = distribution_strategy(training.distribute)
    distributed = replica_part(strategy)
    sized = {k: v for k, v in settings.items() if k in ("model", "sampling")}
    key = training_fingerprint(
        model=model_key, sizes=sized, batch=training.batch_size, precision=precision, machine=machine, **distributed
    )
    reused = key in timings
    if reused:
        seconds = float(timings[key]["seconds_per_step"])
    else:
        with dtype_policy(precision), strategy.scope():
            model = build_model()
        seconds = seconds_per_training_step(model, global_batch_size(training.batch_size, strategy.num_replicas_in_sync))
        del model
        timings[key] = {"seconds_per_step": seconds, "machine": machine, "precision": precision, **distributed}
    budget = float(planning["budget_minutes"].get(model_key, default_budget_minutes))
    steps = plan_steps(seconds * INPUT_PIPELINE_OVERHEAD, budget)
    logger.info(
        "%s: %.3f s per training step (%s); %d epochs of %d steps fill %g minutes.", model_key, seconds,
        "timing reused" if reused else "timed now", steps["epochs"], steps["steps_per_epoch"], budget,
    )
    epochs_planned = settings["training"]["epochs"] == "auto"
    settings, step_plan = apply_plan(model_key, settings, {f"training.{k}": v for k, v in steps.items()}, plan.inputs)
    if epochs_planned and planning.get("retime", True):  # training re-times its first epoch (medseg.models.training.TrainingBudget)
        settings["training"]["budget"] = {"minutes": budget, "seconds_per_step": round(seconds * INPUT_PIPELINE_OVERHEAD, 6)}
    plan.planned.update(step_plan.planned)
    plan.used.update(step_plan.used)
    plan.overrides.update(step_plan.overrides)
    plan.calibration = {"seconds_per_step": seconds, "budget_minutes": budget, "reused": reused, "machine": machine, **distributed}
    return settings, plan, timings


def plan_model(
    kind,
    settings: dict[str, Any],
    plan: ModelPlan,
    dataset_fingerprint: Mapping[str, Any],
    planning: Mapping[str, Any],
    timings: dict[str, Any] | None,
) -> tuple[ModelPlan, dict, dict]:
    """The steps after a kind has planned its sizes: the precision, then the training steps
    (timed on the model `kind.build` makes from the planned settings).

    Returns:
        (plan, settings, timings), in the order of a planning node's outputs.
    """
    n_classes = kind.class_count(settings, dataset_fingerprint)
    settings, plan, timings = plan_precision(kind.name, settings, plan, lambda: kind.build(settings, n_classes), timings)
    settings, plan, timings = plan_training_steps(
        kind.name, settings, plan, lambda: kind.build(settings, n_classes), planning, timings, kind.budget_minutes
    )
    return plan, settings, timings
