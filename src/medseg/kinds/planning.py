"""The planning steps every model kind shares: applying planned values to a parameter
section, deciding the precision, and filling the time budget with training steps.

A kind's own planner (`ModelKind.plan`) computes its sizes from the data
(`medseg.planning`), then calls these in order: `apply_plan`, `plan_precision`,
`plan_training_steps`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from medseg.models.distribute import distribution_strategy, global_batch_size, strategy_name
from medseg.models.precision import dtype_policy, machine_description, resolve_precision
from medseg.models.training import seconds_per_training_step, training_fingerprint
from medseg.planning import INPUT_PIPELINE_OVERHEAD, plan_steps

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
            (`medseg.planning.plan_context`); empty for a kind that plans none.
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
) -> tuple[dict, ModelPlan]:
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
    as_json = json.loads(json.dumps({"inputs": inputs, "planned": planned, "used": used, "overrides": overrides}))
    return settings, ModelPlan(model=model_key, **as_json)


def plan_precision(network: str, model_key: str, settings: dict[str, Any], plan: ModelPlan) -> tuple[dict, ModelPlan]:
    """`training.precision` decided once, by the plan: `auto` becomes the policy this machine
    trains `network` fastest in (`medseg.models.precision.resolve_precision`: `mixed_bfloat16`
    where the hardware has bfloat16 units and the network gains from them, else `float32`);
    an explicit policy is kept. Training, the timing of steps and the MLflow run then read the
    one value in `settings`, so they cannot disagree.

    Returns:
        (settings, plan): `settings["training"]["precision"]` is the policy; the plan gains
        `precision`: {"given": the parameter, "used": the policy}.
    """
    given = str(settings["training"]["precision"])
    used = resolve_precision(given, network)
    settings["training"]["precision"] = used
    plan.precision = {"given": given, "used": used}
    if given == "auto":
        logger.info("%s: training.precision=auto chose %s on this machine.", model_key, used)
    return settings, plan


def plan_training_steps(
    model_key: str,
    settings: dict[str, Any],
    plan: ModelPlan,
    build_model: Callable[[], Any],
    planning: Mapping[str, Any],
    timings: dict[str, Any] | None,
) -> tuple[dict, ModelPlan, dict]:
    """Epochs and steps from the model's time budget (`planning.budget_minutes.<model>`), for
    the `training.epochs`, `steps_per_epoch` and `validation_steps` set to `auto`.

    A few training steps of the planned model are timed on this machine
    (`seconds_per_training_step`), as training will run them: in the planned precision, built
    under the `training.distribute` strategy, on the global batch (per-replica batch ×
    replicas). `medseg.planning.plan_steps` fills the budget. The timing is kept (the catalog's
    `<model>.timings`, keyed by the model's sizes, precision, the machine, and the strategy and
    replicas when distributed), so a rerun with the same plan on the same machine chooses the
    same steps and trains to the same weights.

    Returns:
        (settings, plan, timings): the plan gains the planned and used steps, the overrides
        and `calibration` (seconds per step, the budget, whether the timing was reused, the
        machine, and `distribute` and `replicas` when distributed).
    """
    timings = dict(timings or {})
    training = settings["training"]
    if not any(training[name] == "auto" for name in STEP_PARAMETERS):
        return settings, plan, timings
    precision = str(training["precision"])
    machine = machine_description()
    strategy = distribution_strategy(str(training["distribute"]))
    distributed = replica_part(strategy)
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
    epochs_planned = training["epochs"] == "auto"
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
    settings, plan = plan_precision(kind.network(settings), kind.name, settings, plan)
    n_classes = kind.class_count(settings, dataset_fingerprint)
    settings, plan, timings = plan_training_steps(
        kind.name, settings, plan, lambda: kind.build(settings, n_classes), planning, timings
    )
    return plan, settings, timings
