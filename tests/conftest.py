"""Shared fixtures: a throw-away copy of the Kedro project and a runner for its pipelines."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small enough for a 2-core CI machine, big enough for every split to hold a case.
TINY_DATA_PARAMS = {
    "data.synthetic.n_cases": 6,
    "data.synthetic.in_plane_size": 48,
    "data.synthetic.n_slices_range": [12, 16],
}

# One epoch of a few steps: models that run end to end in seconds, not models that learn.
TINY_UNET = {
    **TINY_DATA_PARAMS,
    "unet.model.input_size": 32,
    "unet.model.base_filters": 8,
    "unet.training.epochs": 1,
    "unet.training.batch_size": 4,
    "unet.training.steps_per_epoch": 3,
    "unet.training.validation_steps": 1,
    "unet.reporting.n_overlay_cases": 1,
}
TINY_CONV3D = {
    **TINY_DATA_PARAMS,
    "conv3d.sampling.patch_size": [16, 16, 16],
    "conv3d.sampling.queue_length": 8,
    "conv3d.model.base_filters": 4,
    "conv3d.training.epochs": 1,
    "conv3d.training.batch_size": 2,
    "conv3d.training.steps_per_epoch": 2,
    "conv3d.training.validation_steps": 1,
    "conv3d.evaluation.patches_per_case": 6,
    "conv3d.reporting.n_overlay_cases": 1,
}


def make_project_copy(root: Path) -> Path:
    """A copy of conf/ and pyproject.toml in `root`, with empty data folders."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO_ROOT / "conf", root / "conf", dirs_exist_ok=True)
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    (root / "conf" / "local").mkdir(exist_ok=True)
    (root / "src").mkdir(exist_ok=True)  # bootstrap_project wants it; medseg itself is installed
    (root / "notebooks").mkdir(exist_ok=True)
    # conf/base/mlflow.yml anchors `mlflow.db` at the project root, so each copy has its own store.
    for layer in ("01_raw", "02_intermediate", "03_primary", "05_model_input", "06_models", "07_model_output", "08_reporting"):
        (root / "data" / layer).mkdir(parents=True, exist_ok=True)
    return root


def nested(params: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}, as `kedro run --params a.b=1` does."""
    tree: dict = {}
    for dotted, value in params.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def run_pipeline(project: Path, pipeline: str | None, params: dict | None = None, cwd: Path | None = None) -> None:
    """Run a pipeline of the project copy through KedroSession, from `cwd` (default: the copy's
    root), as `kedro run` from that folder would.

    `params` use dotted keys, like `kedro run --params`."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    previous = Path.cwd()
    os.chdir(cwd or project)
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, runtime_params=nested(params or {})) as session:
            session.run(pipeline_names=[pipeline] if pipeline else None)
    finally:
        os.chdir(previous)


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    return make_project_copy(tmp_path / "project")


@pytest.fixture(scope="session")
def data_run(tmp_path_factory) -> Path:
    """The `data` pipeline, run once on a tiny synthetic set."""
    project = make_project_copy(tmp_path_factory.mktemp("data_run"))
    run_pipeline(project, "data", TINY_DATA_PARAMS)
    return project


def mlflow_runs(project: Path):
    """All runs of the project copy's `medseg` experiment, newest first."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medseg")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])


def surface_hd95_brute_force(reference, prediction, spacing) -> float:
    """HD95 written independently of medseg.evaluation: all surface-to-surface distances."""
    import numpy as np
    from scipy.ndimage import binary_erosion
    from scipy.spatial.distance import cdist

    def surface(mask):
        mask = mask.astype(bool)
        return np.argwhere(mask & ~binary_erosion(mask)) * np.asarray(spacing)

    a, b = surface(reference), surface(prediction)
    distances = cdist(a, b)
    return float(max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95)))


def hold_project_lock(project: Path, pipeline: str = "unet"):
    """A child process that holds the project's run lock (as a running `kedro run` does) until
    killed; returns once the lock is taken."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from medseg.run_lock import ProjectLock;"
         "lock = ProjectLock(sys.argv[1]); lock.acquire(sys.argv[2]); print('locked', flush=True); time.sleep(120)",
         str(project), pipeline],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def data_files_written(project: Path) -> list[str]:
    """The files under the project's data/02_intermediate and data/03_primary, relative paths."""
    return sorted(
        str(path.relative_to(project))
        for layer in ("02_intermediate", "03_primary")
        for path in (project / "data" / layer).rglob("*")
        if path.is_file()
    )
