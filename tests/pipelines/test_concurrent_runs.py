"""Two `kedro run` in one project: the second is refused before it writes or tracks anything."""

import pytest

from conftest import TINY_DATA_PARAMS, hold_project_lock, make_project_copy, mlflow_runs, run_pipeline
from medseg.runs.lock import ProjectBusyError


def test_a_second_kedro_run_is_refused_while_one_runs(tmp_path):
    project = make_project_copy(tmp_path / "project", tracking_store=False)
    before = sorted(p for p in project.rglob("*"))
    holder = hold_project_lock(project)
    try:
        with pytest.raises(ProjectBusyError, match="another kedro run is running in this project"):
            run_pipeline(project, "data", TINY_DATA_PARAMS)
    finally:
        holder.kill()
        holder.wait()
    written = sorted(str(p.relative_to(project)) for p in set(project.rglob("*")) - set(before))
    assert written == ["data/.medseg.lock", "mlflow.db"]  # no data written, no artifacts
    _, runs = mlflow_runs(project)
    assert runs == []  # and no MLflow run was opened
