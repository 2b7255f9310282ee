"""Crash recovery with a run that is really killed (SIGKILL) half-way through training."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import HOST_INDEPENDENT_UNET, TINY_DATA_PARAMS, copy_project, mlflow_runs, run_pipeline

EPOCHS = 5
PARAMS = {
    **TINY_DATA_PARAMS,
    **HOST_INDEPENDENT_UNET,
    "unet.model.input_size": 32,
    "unet.model.base_filters": 8,
    "unet.training.epochs": EPOCHS,
    "unet.training.batch_size": 4,
    "unet.training.steps_per_epoch": 2,  # 5 x (2 + 1) steps in all: few enough to run eagerly, without tracing
    "unet.training.validation_steps": 1,
    "unet.training.early_stopping_patience": 100,
    "unet.reporting.n_overlay_cases": 1,
}
TESTS_DIR = Path(__file__).resolve().parents[1]


def _backups(project: Path) -> list[Path]:
    return sorted((project / "data" / "06_models" / "unet" / "backup").glob("*/training_metadata.json"))


def _kill_during_training(project: Path, params: dict, after_epochs: int = 2) -> int:
    """Start the pipeline in a child process, SIGKILL it once `after_epochs` epochs are backed
    up, and return the epoch count that the backup holds."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from conftest import run_pipeline; run_pipeline(Path(sys.argv[2]), 'unet', json.loads(sys.argv[3]))"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(TESTS_DIR), str(project), json.dumps(params)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            done = [json.loads(p.read_text())["epoch"] for p in _backups(project) if p.stat().st_size]
            if done and done[0] >= after_epochs:
                os.kill(child.pid, signal.SIGKILL)
                break
            assert child.poll() is None, f"the run ended (rc {child.returncode}) before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("training never reached the epoch to kill at")
    finally:
        child.kill()
        child.wait()
    return json.loads(_backups(project)[0].read_text())["epoch"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory, prepared_data) -> tuple[Path, int]:
    """A project whose unet run was killed half-way through training (the prepared data: straight
    to training), as the kill left it: the backup, the staging folders and the RUNNING run."""
    project = copy_project(prepared_data, tmp_path_factory.mktemp("resume") / "project")
    return project, _kill_during_training(project, PARAMS)


@pytest.fixture(scope="module")
def killed_then_resumed(killed, tmp_path_factory):
    killed_project, killed_at = killed
    project = copy_project(killed_project, tmp_path_factory.mktemp("resumed") / "project")
    _, runs = mlflow_runs(project)
    dead = runs[0]
    run_pipeline(project, "unet", PARAMS)
    return project, killed_at, dead.info.run_id


def test_a_killed_run_is_resumed_and_linked(killed_then_resumed):
    project, killed_at, dead_id = killed_then_resumed
    assert 1 <= killed_at < EPOCHS
    client, runs = mlflow_runs(project)
    resumed = runs[0]
    assert resumed.info.run_id != dead_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["medseg.resumed"] == "true"
    assert resumed.data.tags["medseg.resumed_from_epoch"] == str(killed_at)
    assert resumed.data.tags["medseg.resumed_from_run_id"] == dead_id
    dead = client.get_run(dead_id)
    assert dead.info.status == "KILLED"
    assert dead.data.tags["medseg.resumed_by_run_id"] == resumed.info.run_id
    # The history goes on where the killed run stopped: epochs killed_at..EPOCHS-1.
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "loss")]
    assert sorted(steps) == list(range(killed_at, EPOCHS))
    assert _backups(project) == []  # cleaned up once training ended


def test_other_parameters_start_fresh_and_the_dead_run_is_marked_killed(killed, tmp_path, caplog):
    """The killed run's state, copied: what the killed run wrote is in the staging folders, which
    the next run deletes (that a kill leaves published outputs byte for byte in place is
    test_failed_run_keeps_outputs.py's), and a run with other parameters starts fresh."""
    project = copy_project(killed[0], tmp_path / "project")
    assert list((project / "data").glob("*/.unet.medseg-staging"))
    client, runs = mlflow_runs(project)
    dead_id = runs[0].info.run_id
    assert runs[0].info.status == "RUNNING"  # what SIGKILL leaves behind

    changed = {**PARAMS, "unet.training.learning_rate": 0.0005}
    with caplog.at_level(logging.INFO, logger="medseg"):
        run_pipeline(project, "unet", changed)
    assert "made with other parameters or data; training starts fresh" in caplog.text
    client, runs = mlflow_runs(project)
    fresh = runs[0]
    assert fresh.info.status == "FINISHED" and "medseg.resumed" not in fresh.data.tags
    assert sorted(m.step for m in client.get_metric_history(fresh.info.run_id, "loss")) == list(range(EPOCHS))
    dead = client.get_run(dead_id)
    assert dead.info.status == "KILLED"
    assert "killed" in dead.data.tags["medseg.end_reason"]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert not list((project / "data").glob("*/.unet.medseg-staging"))
