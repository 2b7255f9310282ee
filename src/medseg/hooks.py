"""Project hooks: name each MLflow run and fail fast when the tracking server is down.

kedro-mlflow starts the run in its own `before_pipeline_run` and names it after
`tracking.run.name`. This hook runs first (`tryfirst=True`) and sets that name to
`{Model}-{Optimizer}-{Loss}-{YYYYMMDD}-run{N}`, N counting up among the experiment's runs with
the same prefix.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
from typing import Any
from urllib.parse import urlparse

from kedro.framework.hooks import hook_impl
from kedro.pipeline import Pipeline

from medseg.errors import TrackingError
from medseg.pipelines import tracking

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
MODEL_DISPLAY = {"unet": "UNet", "unet3d": "UNet3D", "patch_classifier": "Conv3DClassifier"}


def check_tracking_server(uri: str | None) -> None:
    """Refuse, within seconds, an HTTP tracking URI whose server does not answer.

    MLflow's client would otherwise retry for minutes. Later requests get no retries either.
    """
    if not uri or urlparse(uri).scheme not in ("http", "https"):
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} cannot be reached ({exc}). Start it (e.g. `mlflow server "
            f"--port {port}`), or set server.mlflow_tracking_uri in conf/base/mlflow.yml (or conf/local/) "
            "to a reachable server or to sqlite:///mlflow.db."
        ) from exc


def models_in_pipeline(pipeline: Pipeline) -> list[str]:
    """The model pipelines (`unet`, `conv3d`) whose nodes this run executes."""
    namespaces = {node.namespace.split(".")[0] for node in pipeline.nodes if node.namespace}
    return [name for name in tracking.MODEL_PIPELINES if name in namespaces]


def _model_parts(model: str, params: dict[str, Any]) -> tuple[str, str, str]:
    # Imported here: Keras loads in seconds, and a `data` run names itself without it.
    from medseg.models import loss_display_name, optimizer_display_name

    section = params[model]
    kind = section["model"].get("kind", "unet") if model == "conv3d" else "unet"
    training = section["training"]
    loss = "bce" if kind == "patch_classifier" else training["loss"]
    return MODEL_DISPLAY.get(kind, kind), optimizer_display_name(training["optimizer"]), loss_display_name(loss)


def run_name_prefix(models: list[str], params: dict[str, Any], today: dt.date) -> str:
    """`{Model}-{Optimizer}-{Loss}-{YYYYMMDD}`; several models join each part with '+'.

    A run without a model (the `data` pipeline) is `Data-{Source}-{YYYYMMDD}`.
    """
    date = today.strftime("%Y%m%d")
    if not models:
        return f"Data-{str(params['data']['source']).capitalize()}-{date}"
    parts = [_model_parts(model, params) for model in models]
    joined = ["+".join(dict.fromkeys(part[i] for part in parts)) for i in range(3)]
    return f"{joined[0]}-{joined[1]}-{joined[2]}-{date}"


def next_run_number(existing_names: list[str], prefix: str) -> int:
    """1 + the largest N among names `{prefix}-run{N}` (1 if there is none)."""
    pattern = re.compile(rf"^{re.escape(prefix)}-run(\d+)$")
    numbers = [int(m.group(1)) for m in map(pattern.match, existing_names) if m]
    return max(numbers, default=0) + 1


class MlflowRunHook:
    """Names the MLflow run and checks the tracking server before kedro-mlflow uses it."""

    def __init__(self) -> None:
        self._context = None

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        self._context = context
        try:
            configured = context.config_loader["mlflow"].get("server", {}).get("mlflow_tracking_uri")
        except Exception:  # no mlflow.yml: kedro-mlflow falls back to MLflow's default
            configured = None
        check_tracking_server(configured or os.environ.get("MLFLOW_TRACKING_URI"))

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog) -> None:
        models = models_in_pipeline(pipeline)
        tracking.set_models_in_run(models)
        mlflow_config = getattr(self._context, "mlflow", None)
        if mlflow_config is None:
            return
        prefix = run_name_prefix(models, self._context.params, dt.date.today())
        client = mlflow_config.server._mlflow_client
        experiment = client.get_experiment_by_name(mlflow_config.tracking.experiment.name)
        names = []
        if experiment is not None:
            runs = client.search_runs(
                [experiment.experiment_id], filter_string=f"attributes.run_name LIKE '{prefix}-run%'"
            )
            names = [run.info.run_name for run in runs]
        mlflow_config.tracking.run.name = f"{prefix}-run{next_run_number(names, prefix)}"
        logger.info("MLflow run name: %s", mlflow_config.tracking.run.name)
