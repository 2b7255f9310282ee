"""Project hooks: one run at a time per project, named MLflow runs, no RUNNING ghosts.

kedro-mlflow starts the run in its own `before_pipeline_run` and names it after
`tracking.run.name`. `MlflowRunHook` runs first (`tryfirst=True`):
- it takes the project's lock (`medseg.runs.lock`), so two runs never write the same outputs;
- it marks KILLED the experiment's RUNNING runs whose process is gone;
- it names the run `{Model}-{Optimizer}-{Loss}-{YYYYMMDD}-run{N}`, N counting up among the
  experiment's runs with the same prefix, deleted ones included (a name is never reused).
`RunStartedHook` runs last, once kedro-mlflow has started the run: it tags the run with its
process and with the models it trains (`medseg.models`, which decides whether metric names
carry the model's prefix). A tracking server that is down or unhealthy is refused within
seconds, when the context is made (`check_tracking_server`).

The tracking store is anchored at the project root (`${medseg.project_root:}` in mlflow.yml),
as Kedro anchors catalog paths, so a run from a subfolder uses the project's `mlflow.db`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl
from kedro.framework.project import settings
from kedro.pipeline import Pipeline
from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook
from mlflow.entities import ViewType
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from pydantic import ValidationError

from medseg.cases.split import require_validation_cases
from medseg.runs import compute, credentials
from medseg.runs.tracking import log_params
from medseg.errors import ConfigurationError, TrackingError
from medseg.kinds import model_kinds, parameter_roots
from medseg.parameters import ComputeParams, did_you_mean
from medseg.runs import tracking
from medseg.runs.lock import ProjectLock
from medseg.runs.resolvers import register_project_root
from medseg.runs.outputs import JOURNAL_NAME, OutputStaging, output_folders
from medseg.runs.tracking import dataset_identity  # noqa: F401  (tests import it from here too)

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0


def check_tracking_server(uri: str | None) -> None:
    """Refuse, within seconds, an HTTP tracking URI whose server does not answer, or answers
    its health check (`GET /health`) with an error.

    MLflow's client would otherwise retry for minutes when the run starts. Asking once here,
    with a timeout, leaves MLflow's own retries as the user set them for the rest of the run,
    where one 5xx while logging an epoch must not kill training.
    """
    if not uri or urlparse(uri).scheme not in ("http", "https"):
        return
    import urllib.error
    import urllib.request

    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=CONNECT_TIMEOUT_S):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TrackingError(
                f"MLflow tracking server {uri} answers its health check with HTTP {exc.code}. Check the server's "
                "log, or set server.mlflow_tracking_uri in conf/base/mlflow.yml (or conf/local/) to a working "
                "server or to sqlite:///mlflow.db."
            ) from exc
    except OSError as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} cannot be reached ({exc}). Start it (e.g. `mlflow server "
            f"--port {port}`), or set server.mlflow_tracking_uri in conf/base/mlflow.yml (or conf/local/) "
            "to a reachable server or to sqlite:///mlflow.db."
        ) from exc


def models_in_pipeline(pipeline: Pipeline) -> list[str]:
    """The model kinds (`medseg.kinds`) whose nodes this run executes, in registry order."""
    namespaces = {node.namespace.split(".")[0] for node in pipeline.nodes if node.namespace}
    return [name for name in model_kinds() if name in namespaces]


def models_trained_by(pipeline: Pipeline) -> list[str]:
    """The model kinds whose training node (the template's `<kind>.train_<kind>`) this run executes."""
    names = {node.name for node in pipeline.nodes}
    return [model for model in models_in_pipeline(pipeline) if f"{model}.train_{model}" in names]


def _model_parts(model: str, params: dict[str, Any], n_classes: int = 1) -> tuple[str, str, str]:
    # Imported here: Keras loads in seconds, and a `data` run names itself without it.
    from medseg.models import loss_display_name, optimizer_display_name

    kind, section = model_kinds()[model], params[model]
    classes = kind.class_count(section, {"label_mode": "multiclass" if n_classes > 1 else "binary", "classes": range(n_classes)})
    return (
        kind.display_name(section),
        optimizer_display_name(section["training"]["optimizer"]),
        loss_display_name(kind.loss_name(section), n_classes=classes),
    )


def run_name_prefix(models: list[str], params: dict[str, Any], today: dt.date, n_classes: int = 1) -> str:
    """`{Model}-{Optimizer}-{Loss}-{YYYYMMDD}`; several models join each part with '+'.

    A run without a model (the `data` pipeline) is `Data-{Source}-{YYYYMMDD}`. With several
    foreground classes (`n_classes`), a BCE loss is named CE (categorical).
    """
    date = today.strftime("%Y%m%d")
    if not models:
        return f"Data-{str(params['data']['source']).capitalize()}-{date}"
    parts = [_model_parts(model, params, n_classes) for model in models]
    joined = ["+".join(dict.fromkeys(part[i] for part in parts)) for i in range(3)]
    return f"{joined[0]}-{joined[1]}-{joined[2]}-{date}"


def _top_namespaces(pipeline: Pipeline) -> set[str]:
    return {node.namespace.split(".")[0] for node in pipeline.nodes if node.namespace}


def is_prediction_run(pipeline: Pipeline) -> bool:
    """Whether the run is `predict` alone (no data or training node)."""
    return _top_namespaces(pipeline) == {"predict"}


def is_selection_run(pipeline: Pipeline) -> bool:
    """Whether the run is `select` alone: it trains nothing, so it is named `Select-{YYYYMMDD}`."""
    return _top_namespaces(pipeline) == {"selection"}


def prediction_run_prefix(predict: dict[str, Any], local_folders: dict[str, str], today: dt.date) -> str:
    """`Predict-{Model}-{YYYYMMDD}`, the model's name read from its segmenter (downloaded from
    MLflow for a model URI). A model that cannot be found fails here, before the run starts."""
    from medseg.inference.ensemble import segmenter_name
    from medseg.serving.model import fetch_segmenter

    folder, _ = fetch_segmenter(str(predict["model"]), local_folders)
    return f"Predict-{segmenter_name(folder)}-{today.strftime('%Y%m%d')}"


def next_run_number(existing_names: list[str], prefix: str) -> int:
    """1 + the largest N among names `{prefix}-run{N}` (1 if there is none)."""
    pattern = re.compile(rf"^{re.escape(prefix)}-run(\d+)$")
    numbers = [int(m.group(1)) for m in map(pattern.match, existing_names) if m]
    return max(numbers, default=0) + 1


def next_run_name(client, experiment, prefix: str) -> str:
    """`{prefix}-run{N}`, N one above every run of the experiment with that prefix, deleted
    runs included (a soft-deleted run can be restored, and its name must stay unique).

    Two runs of one project never name themselves at once (the project lock); runs of two
    projects that share a tracking server can still meet on a name.
    """
    if experiment is None:
        return f"{prefix}-run1"
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"attributes.run_name LIKE '{prefix}-run%'",
        run_view_type=ViewType.ALL,
        max_results=50000,
    )
    return f"{prefix}-run{next_run_number([run.info.run_name for run in runs], prefix)}"


class BatchedMlflowHook(MlflowHook):
    """kedro-mlflow's hook, logging each node's parameters in one batch, and each parameter
    once a run.

    kedro-mlflow logs a node's `params:` inputs one `log_param` call at a time, again for every
    node that takes them: about 400 calls, 2 s, for a `unet` run on a local store. This hook
    gathers them and logs the new ones with one `log_params`; what it logs is kedro-mlflow's
    own choice (flattening, names, the strategy for long values). A value that differs from the
    one already logged still reaches MLflow, which refuses it as before. Registered in place of
    the plugin's own instance (settings.DISABLE_HOOKS_FOR_PLUGINS)."""

    def __init__(self) -> None:
        super().__init__()
        self._logged: dict[str, str] = {}
        self._node = threading.local()  # the parameters of the node whose hook runs in this thread

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        self._logged = {}
        super().before_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)

    @hook_impl
    def before_node_run(self, node, catalog, inputs, is_async) -> None:
        self._node.pending = {}
        try:
            super().before_node_run(node=node, catalog=catalog, inputs=inputs, is_async=is_async)
        finally:
            pending, self._node.pending = self._node.pending, None
        new = {name: value for name, value in pending.items() if self._logged.get(name) != str(value)}
        if new:
            mlflow.log_params(new)
            self._logged.update({name: str(value) for name, value in new.items()})

    def _log_param(self, name: str, value: Any) -> None:
        pending = getattr(self._node, "pending", None)
        if pending is not None and len(str(value)) <= MAX_PARAM_VAL_LENGTH:
            pending[name] = value
        elif self._logged.get(name) != str(value):  # a long value (or outside a node): kedro-mlflow's way, once
            super()._log_param(name, value)
            self._logged[name] = str(value)


class MlflowRunHook:
    """Locks the project, names the MLflow run and checks the tracking server, before
    kedro-mlflow uses it."""

    def __init__(self) -> None:
        self._context = None
        self._lock: ProjectLock | None = None
        self._outputs: OutputStaging | None = None

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        self._context = context
        register_project_root(context.project_path)
        try:
            configured = context.config_loader["mlflow"].get("server", {}).get("mlflow_tracking_uri")
        except Exception:  # no mlflow.yml: kedro-mlflow falls back to MLflow's default
            configured = None
        check_tracking_server(configured or os.environ.get("MLFLOW_TRACKING_URI"))

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog) -> None:
        self._release()
        if self._context is not None:  # settings that would fail when training starts, refused before any work
            split = (self._context.params.get("data") or {}).get("split") or {}
            require_validation_cases(split.get("val", 1), models_trained_by(pipeline))
        root = self._context.project_path if self._context else Path.cwd()
        self._lock = ProjectLock(root)
        self._lock.acquire(str(run_params.get("pipeline_names") or run_params.get("pipeline_name") or "__default__"))
        models = models_in_pipeline(pipeline)
        # Every model's folders, not only this run's: any run (a `data` run too) cleans up after a killed one.
        self._outputs = OutputStaging(output_folders(catalog, model_kinds()), self._lock.path.parent / JOURNAL_NAME)
        self._outputs.recover()
        self._outputs.redirect(catalog, pipeline)
        mlflow_config = getattr(self._context, "mlflow", None)
        if mlflow_config is None:
            return
        if is_prediction_run(pipeline):
            try:
                local = {model: catalog.load(f"{model}.segmenter_folder") for model in model_kinds()}
                prefix = prediction_run_prefix(self._context.params["predict"], local, dt.date.today())
            except BaseException:
                self._release()
                raise
        elif is_selection_run(pipeline):
            prefix = f"Select-{dt.date.today().strftime('%Y%m%d')}"
        else:
            data = self._context.params.get("data", {})
            prefix = run_name_prefix(models, self._context.params, dt.date.today(), expected_class_count(data, self._context.project_path))
        client = mlflow_config.server._mlflow_client
        experiment = client.get_experiment_by_name(mlflow_config.tracking.experiment.name)
        if experiment is not None:
            for run_id in tracking.end_dead_runs(client, experiment.experiment_id):
                logger.warning("MLflow run %s was still RUNNING, but its process is gone: marked KILLED.", run_id)
        mlflow_config.tracking.run.name = next_run_name(client, experiment, prefix)
        logger.info("MLflow run name: %s", mlflow_config.tracking.run.name)

    @hook_impl(tryfirst=True)  # the outputs are published before another hook reads them
    def after_pipeline_run(self) -> None:
        if self._outputs is not None:
            self._outputs.commit()
        self._release()

    @hook_impl
    def on_pipeline_error(self) -> None:
        if self._outputs is not None and self._outputs.rollback():
            logger.warning("The run failed: what it had written was deleted; the previous model outputs are as they were.")
        self._release()

    @property
    def context(self):
        return self._context

    def _release(self) -> None:
        if self._outputs is not None:
            self._outputs.rollback()  # a no-op after commit; else a run stopped before its pipeline
        self._outputs = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def check_sections(params: dict[str, Any]) -> None:
    """Refuse a parameter section that nothing reads (`--params unnet.training.epochs=2`), and a
    training budget for a model kind that does not exist (`planning.budget_minutes.unnet`),
    before any work: either would otherwise be ignored and the run train with defaults.

    Raises:
        ConfigurationError: naming the section or kind, the closest valid one, and the valid ones.
    """
    valid = list(parameter_roots())
    unknown = [key for key in params if key not in valid]
    if unknown:
        raise ConfigurationError(
            f"unknown parameter section {did_you_mean(unknown, valid)}; nothing reads it, so the run would ignore it. The valid "
            f"sections are {valid}. Fix the name in --params or in conf/*/parameters*.yml."
        )
    kinds = list(model_kinds())
    budgets = (params.get("planning") or {}).get("budget_minutes") or {}
    unknown = [key for key in budgets if key not in kinds]
    if unknown:
        raise ConfigurationError(
            f"planning.budget_minutes names an unknown model {did_you_mean(unknown, kinds)}; the models are {kinds}. "
            "Fix the name in --params or in conf/*/parameters_planning.yml."
        )


class ComputeHook:
    """Opens the run's per-case executor (`compute.scheduler`, `medseg.runs.compute`) before the
    pipeline and closes it after, stopping a LocalCluster that medseg started.

    The scheduler is checked when the context is made, before any lock is taken or MLflow run
    opened, so a mistyped value stops the run at once with the valid forms.
    """

    def __init__(self) -> None:
        self._scheduler = compute.SYNC

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        check_sections(context.params)
        try:
            table = context.config_loader["credentials"]
        except (KeyError, MissingConfigException):  # no credentials files
            table = {}
        credentials.register_project(Path(context.project_path) / settings.CONF_SOURCE, context.env, table)
        section = context.params.get("compute") or {"scheduler": compute.SYNC}
        try:
            self._scheduler = ComputeParams(**section)["scheduler"]
        except ValidationError as exc:
            reasons = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
            raise ConfigurationError(f"Parameter 'compute': {reasons}.") from None

    @hook_impl(trylast=True)  # after kedro-mlflow has started the run, so the choice is logged
    def before_pipeline_run(self) -> None:
        compute.open_scheduler(self._scheduler)
        log_params({"compute.scheduler": self._scheduler})

    @hook_impl
    def after_pipeline_run(self) -> None:
        compute.close_scheduler()

    @hook_impl
    def on_pipeline_error(self) -> None:
        compute.close_scheduler()


class RunStartedHook:
    """After kedro-mlflow has started the run: tag it with its process and its models."""

    def __init__(self, run_hook: MlflowRunHook):
        self._run_hook = run_hook

    @hook_impl(trylast=True)
    def before_pipeline_run(self, pipeline: Pipeline, catalog) -> None:
        tracking.set_tags({**tracking.process_tags(), tracking.TAG_MODELS: ",".join(models_in_pipeline(pipeline))})
        context = self._run_hook.context
        if context is not None and "data" in context.params and not is_prediction_run(pipeline):
            phantoms = catalog.load("synthetic_phantoms") if "synthetic_phantoms" in catalog else None
            tracking.describe_dataset(*dataset_identity(context.params["data"], context.project_path, phantoms))


def expected_class_count(data: dict[str, Any], project_path) -> int:
    """The foreground classes the models will learn, known before the data steps run: 1 in
    binary mode, else the classes the dataset lists (`data.synthetic.n_classes` for the
    phantoms). It only names the run; `fingerprint.json` decides the models."""
    if not data or data.get("label_mode") == "binary" or data.get("foreground_labels"):
        return 1
    if data.get("source") == "synthetic":
        return int(data.get("synthetic", {}).get("n_classes", 1))
    from medseg.cases.msd import dataset_location, foreground_classes

    _, _, folder = dataset_identity(data, project_path)
    try:
        manifest = dataset_location(folder) / "dataset.json"  # a local file, or an object read through fsspec
        return len(foreground_classes(json.loads(manifest.read_text()), manifest))
    except Exception:  # the data steps report a bad dataset.json, with the fix
        return 1


STAGES = logging.getLogger("medseg.stages")


class StageLinesHook:
    """One console line per node of a run (the `medseg.stages` logger that conf/logging.yml
    shows): `[ 3/21] preprocess_cases  2.1 s`, after a line that names the run's pipeline."""

    def __init__(self) -> None:
        self._total = 0
        self._done = 0
        self._started: dict[str, float] = {}

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog) -> None:
        self._total, self._done, self._started = len(pipeline.nodes), 0, {}
        names = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
        STAGES.info("kedro run --pipelines %s: %d steps (kedro run --verbose for the full log)",
                    ",".join(str(n) for n in names if n), self._total)

    @hook_impl
    def before_node_run(self, node) -> None:
        self._started[node.name] = time.monotonic()

    @hook_impl
    def after_node_run(self, node) -> None:
        self._done += 1
        seconds = time.monotonic() - self._started.pop(node.name, time.monotonic())
        width = len(str(self._total))
        STAGES.info("[%*d/%d] %-40s %7.1f s", width, self._done, self._total, node.name, seconds)
