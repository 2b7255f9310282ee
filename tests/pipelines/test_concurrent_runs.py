"""Two `kedro run` in one project: the second is refused before it writes or tracks anything."""

import subprocess
import sys

import pytest

from conftest import TINY_DATA_PARAMS, make_project_copy, mlflow_runs, run_pipeline
from medseg.run_lock import ProjectBusyError


def test_a_second_kedro_run_is_refused_while_one_runs(tmp_path):
    project = make_project_copy(tmp_path / "project")
    before = sorted(p for p in project.rglob("*"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from medseg.run_lock import ProjectLock;"
         "lock = ProjectLock(sys.argv[1]); lock.acquire('unet'); print('locked', flush=True); time.sleep(60)", str(project)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ProjectBusyError, match="another kedro run is running in this project"):
            run_pipeline(project, "data", TINY_DATA_PARAMS)
    finally:
        holder.kill()
        holder.wait()
    written = sorted(str(p.relative_to(project)) for p in set(project.rglob("*")) - set(before))
    assert written == ["data/.medseg.lock", "mlflow.db"]  # no data written, no artifacts
    _, runs = mlflow_runs(project)
    assert runs == []  # and no MLflow run was opened
