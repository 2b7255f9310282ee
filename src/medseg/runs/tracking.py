"""MLflow logging shared by the model pipelines (this module may import MLflow; domain code may not).

One `kedro run` is one MLflow run. When a run trains several models (the default pipeline),
each model's metrics carry its name as a prefix (`unet.test_dice_mean`), so they stay apart;
a run with a single model logs plain names (`test_dice_mean`). Which models a run holds is
the run's own tag (`medseg.models`), not process state.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import mlflow

TAG_MODELS = "medseg.models"


def metric_key(model: str, name: str, models_in_run: Iterable[str]) -> str:
    """`name`, prefixed by `model.` when the run trains more than one model."""
    return f"{model}.{name}" if len(set(models_in_run)) > 1 else name


def models_in_active_run() -> tuple[str, ...]:
    """The models of the active MLflow run, from its `medseg.models` tag (set by the project
    hook when the run starts, from the pipeline's namespaces): the run's own record of what it
    trains, which every node and dataset of the run reads alike. Empty outside a run."""
    run = mlflow.active_run()
    if run is None:
        return ()
    tag = mlflow.get_run(run.info.run_id).data.tags.get(TAG_MODELS, "")
    return tuple(model for model in tag.split(",") if model)


# Run bookkeeping ------------------------------------------------------------------------------
# Every run records the process that runs it, so that a later run can tell a RUNNING run whose
# process is gone (killed with SIGKILL, or a machine that rebooted) and mark it KILLED.
TAG_HOST = "medseg.host"
TAG_PID = "medseg.pid"
TAG_PID_STARTED = "medseg.pid_started"
TAG_RESUMED = "medseg.resumed"
TAG_RESUMED_FROM_EPOCH = "medseg.resumed_from_epoch"
TAG_RESUMED_FROM_RUN = "medseg.resumed_from_run_id"
TAG_RESUMED_BY_RUN = "medseg.resumed_by_run_id"
TAG_END_REASON = "medseg.end_reason"


def process_tags() -> dict[str, str]:
    """Tags naming this process: host, pid and the pid's start time (pids are reused)."""
    import socket

    import psutil

    return {
        TAG_HOST: socket.gethostname(),
        TAG_PID: str(os.getpid()),
        TAG_PID_STARTED: f"{psutil.Process().create_time():.3f}",
    }


def _process_is_gone(tags: Mapping[str, str]) -> bool:
    """True when the tags name a process of this host that no longer runs."""
    import socket

    import psutil

    if tags.get(TAG_HOST) != socket.gethostname() or TAG_PID not in tags:
        return False  # another machine's run, or one that predates these tags: cannot tell
    try:
        process = psutil.Process(int(tags[TAG_PID]))
        return abs(process.create_time() - float(tags.get(TAG_PID_STARTED, "nan"))) > 0.01
    except (psutil.NoSuchProcess, ValueError):
        return True


def end_dead_runs(client: "mlflow.MlflowClient", experiment_id: str) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose process is gone.

    Returns:
        The ids of the runs marked KILLED.
    """
    ended = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        if run.info.run_id != active_run_id() and _process_is_gone(run.data.tags):
            client.set_tag(run.info.run_id, TAG_END_REASON, "its process ended without closing the run (killed)")
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


def active_run_id() -> str | None:
    return active_run_identity()[0]


def active_run_identity() -> tuple[str | None, str | None]:
    """The active MLflow run's id and name, or (None, None) outside a tracked run."""
    run = mlflow.active_run()
    return (run.info.run_id, run.info.run_name) if run is not None else (None, None)


# A URL's userinfo (`user:secret@`) and query (`?X-Amz-Signature=...`): credentials that must
# never reach a tag, a parameter or a description.
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@?#]*@)?(?P<rest>[^\s?#]*)(?P<query>\?[^\s#)'\",]*)?")


def redact_urls(text: str) -> str:
    """`text` with every URL's credentials and query string taken out: `s3://KEY:SECRET@b/k?sig`
    becomes `s3://b/k`; the scheme, host and path stay, since they say where the data was."""
    return _URL.sub(lambda m: f"{m['scheme']}{m['rest']}", text)


def set_tags(tags: Mapping[str, Any]) -> None:
    """Tag the active MLflow run, if any (URLs' credentials and queries taken out)."""
    if mlflow.active_run() is not None:
        mlflow.set_tags({key: redact_urls(str(value)) for key, value in tags.items()})


def record_resume(model: str, resumed_epoch: int, previous_run_id: str | None) -> None:
    """Tag the active run as resumed from `previous_run_id` at `resumed_epoch`, and link back.

    The interrupted run, if it still shows RUNNING, is marked KILLED: its process is gone,
    since this run holds the project's lock and found its backup.
    """
    if mlflow.active_run() is None:
        return
    models = models_in_active_run()
    set_tags({
        metric_key(model, TAG_RESUMED, models): "true",
        metric_key(model, TAG_RESUMED_FROM_EPOCH, models): resumed_epoch,
        **({metric_key(model, TAG_RESUMED_FROM_RUN, models): previous_run_id} if previous_run_id else {}),
    })
    if not previous_run_id or previous_run_id == active_run_id():
        return
    client = mlflow.MlflowClient()
    try:
        previous = client.get_run(previous_run_id)
    except mlflow.exceptions.MlflowException:
        return  # deleted for good, or another tracking store
    client.set_tag(previous_run_id, TAG_RESUMED_BY_RUN, active_run_id())
    if previous.info.status == "RUNNING":
        client.set_tag(previous_run_id, TAG_END_REASON, "interrupted; resumed by a later run")
        client.set_terminated(previous_run_id, status="KILLED")


TAG_DATASET = "medseg.dataset"


def describe_dataset(name: str, source: str, folder: str) -> None:
    """Name the run's dataset in its tags and its description (the MLflow UI's note)."""
    set_tags({
        TAG_DATASET: name,
        "medseg.data_source": source,
        "medseg.data_dir": folder,
        "mlflow.note.content": f"Dataset: {name} ({source}, {folder})",
    })


def dataset_identity(data: dict[str, Any], project_path, synthetic_phantoms: str | None = None) -> tuple[str, str, str]:
    """(name, source, folder) of the run's dataset: the name from its `dataset.json` when it
    can be read (the phantoms may not exist yet: "medseg-synthetic"). `folder` is a local path,
    or the URL of a `data.msd_dir` on an fsspec store; `data.dicom_dir` for DICOM studies (named
    after the folder); for the phantoms, `synthetic_phantoms` (the catalog entry's folder)."""
    from medseg.storage.paths import anchor_path
    from medseg.cases.msd import dataset_location

    source = str(data["source"])
    given = {"msd": data.get("msd_dir"), "dicom": data.get("dicom_dir")}.get(source) or str(synthetic_phantoms)
    folder = anchor_path(given, project_path)
    if isinstance(folder, str):  # anchor_path leaves only a URL as a string: read it through fsspec
        folder = dataset_location(folder)
    name = "medseg-synthetic" if source == "synthetic" else folder.name
    # Never fatal, whatever fails: a store adds its own errors (credentials, a missing fsspec
    # package) to OSError and ValueError, and the data steps report them with the fix.
    try:
        name = str(json.loads((folder / "dataset.json").read_text()).get("name") or name)
    except Exception:
        pass
    return name, source, str(folder)


def cases_digest(case_ids: Iterable[str], extra: Iterable[str] = ()) -> str:
    """16 hex characters of SHA-256 over the sorted case ids (and `extra`, e.g. series UIDs):
    the same cases give the same digest, whatever their order."""
    import hashlib

    text = "\n".join([*sorted(str(c) for c in case_ids), *sorted(str(e) for e in extra)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def log_input_cases(name: str, source: str, table: Any, context: str) -> None:
    """Log the cases a run read as its MLflow input dataset (the run page's Datasets panel):
    `name`, `source` (the folder or URL, credentials removed), a digest of the cases, and a
    table of their ids alone (with their split when `table` has one), so that no patient data
    reaches the tracking store. Nothing outside a tracked run."""
    if mlflow.active_run() is None or table is None or len(table) == 0:
        return
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    columns = [c for c in ("case_id", "split") if c in table]
    cases = pd.DataFrame(table[columns]).astype(str).reset_index(drop=True)
    dataset = from_pandas(cases, source=redact_urls(str(source)), name=name,
                          digest=cases_digest(cases["case_id"], table.get("series_instance_uid", [])))
    mlflow.log_input(dataset, context=context)


TAG_FOLD = "medseg.fold"
TAG_MODEL = "medseg.model"


def fold_run_name(parent_name: str, model: str, fold: int, models_in_run: Iterable[str]) -> str:
    """`<parent>/fold<i>`, or `<parent>/<model>-fold<i>` when the run trains several models."""
    return f"{parent_name}/{model}-fold{fold}" if len(set(models_in_run)) > 1 else f"{parent_name}/fold{fold}"


def log_fold_runs(model: str, records: Iterable[Mapping[str, Any]], fold_metrics: Iterable[Mapping[str, Any]]) -> list[str]:
    """One MLflow run per cross-validation fold, nested under the active run: its epoch history
    (one step per epoch), what its training decided, and its out-of-fold metrics, each run
    tagged with its model and fold. Logged when the folds have ended, from this process, so
    folds trained on Dask workers are logged the same way as folds trained here.

    Returns:
        The nested runs' ids (none outside a tracked run).
    """
    import time

    from mlflow.entities import Metric, Param, RunTag

    parent = mlflow.active_run()
    if parent is None:
        return []
    client = mlflow.MlflowClient()
    models = models_in_active_run()
    scores = {int(m["fold"]): m for m in fold_metrics}
    ids = []
    for record in records:
        fold = int(record["fold"])
        run = client.create_run(
            parent.info.experiment_id,
            run_name=fold_run_name(parent.info.run_name, model, fold, models),
            tags={"mlflow.parentRunId": parent.info.run_id, TAG_MODEL: model, TAG_FOLD: str(fold)},
        )
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, values in record["history"].items()
                   for step, value in enumerate(values)]
        metrics += [Metric(key, float(value), now, 0) for key, value in scores.get(fold, {}).items() if key != "fold"]
        params = [Param(key, redact_urls(str(value))[:6000]) for key, value in record["decided"].items()]
        params.append(Param("fold", str(fold)))
        for start in range(0, max(len(metrics), 1), 900):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(run.info.run_id, metrics=metrics[start:start + 900], params=params if start == 0 else [],
                             tags=[RunTag("medseg.fold_seconds", f"{float(record.get('seconds', 0)):.1f}")] if start == 0 else [])
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    return ids


def log_metrics(
    model: str, metrics: Mapping[str, float], step: int | None = None, models_in_run: tuple[str, ...] | None = None
) -> None:
    """Log `model`'s finite metrics to the active MLflow run, if any, named by
    `medseg.runs.tracking.metric_key` (NaN and inf are skipped: MLflow's UI cannot plot them,
    and the per-case CSV keeps them). `models_in_run`, when given, saves reading the run's tag
    again (the per-epoch callback reads it once)."""
    if mlflow.active_run() is None:
        return
    models = models_in_active_run() if models_in_run is None else models_in_run
    values = {
        metric_key(model, key, models): float(value)
        for key, value in metrics.items()
        if value is not None and math.isfinite(float(value))
    }
    if values:
        mlflow.log_metrics(values, step=step)


def log_params(params: Mapping[str, Any]) -> None:
    """Log parameters to the active MLflow run, if any, as text."""
    if mlflow.active_run() is not None:
        mlflow.log_params({key: redact_urls(str(value)) for key, value in params.items()})


# Where `select` keeps its choice's out-of-fold scores per case and class, in its MLflow run:
# the run of the registered version, so a later `select` compares with them case by case.
OOF_SCORES_ARTIFACT = "selection/oof_scores.csv"


def model_version(uri: str) -> tuple[str, str]:
    """(version, aliases) of a model URI, for an audit record: a registered model's version and
    its aliases now (`,`-separated), a run's id for `runs:/`, ("", "") where the registry cannot
    say (a local folder, no registry): never an error."""
    match = re.match(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>.+))$", uri)
    try:
        if match:
            client = mlflow.MlflowClient()
            if match["alias"]:
                found = client.get_model_version_by_alias(match["name"], match["alias"])
            else:
                found = client.get_model_version(match["name"], match["version"])
            return str(found.version), ",".join(sorted(found.aliases or []))
    except mlflow.exceptions.MlflowException:
        return "", ""
    run = re.match(r"^runs:/(?P<run>[^/]+)/", uri)
    return (run["run"], "") if run else ("", "")


def log_files(paths: Iterable[Any], artifact_path: str) -> None:
    """Log files to the active run under `artifact_path`; nothing outside a tracked run."""
    if mlflow.active_run() is None:
        return
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def champion_record(name: str, alias: str = "champion") -> Any:
    """The registered model `name`'s version under `alias` and the out-of-fold scores its run
    stored (`OOF_SCORES_ARTIFACT`), as a `medseg.evaluation.selection.ChampionRecord`; None
    when the registry has no such model or no version holds the alias. A version whose run has
    no scores (registered before they were kept, or its artifacts gone) has `scores` None.

    Raises:
        ConfigurationError: the registry cannot be read (the message names the tracking URI).
    """
    import tempfile

    import pandas as pd

    from medseg.errors import ConfigurationError
    from medseg.evaluation.selection import ChampionRecord

    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in str(exc):
            return None
        raise ConfigurationError(f"select: the model registry at {redact_urls(mlflow.get_tracking_uri())} cannot be read "
                                 f"({exc.error_code}: {str(exc)[:300]}). Check the tracking URI (conf/base/mlflow.yml).") from exc
    scores = None
    if version.run_id:
        with tempfile.TemporaryDirectory(prefix="medseg-champion-") as folder:
            try:
                path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=OOF_SCORES_ARTIFACT,
                                                           dst_path=folder)
                scores = pd.read_csv(path, dtype={"case_id": str})
            except Exception:  # no such artifact: a version from before the scores were kept
                scores = None
    return ChampionRecord(str(version.version), scores)
