"""notebooks/medseg_tour.ipynb, executed headless (nbclient) in a project copy with tiny trained models."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

from conftest import REPO_ROOT, copy_project, mlflow_runs

NOTEBOOK = REPO_ROOT / "notebooks" / "medseg_tour.ipynb"

FINAL_LINE = re.compile(r"unseen phantom: Dice (?P<dice>\d+\.\d+|nan), mask geometry matches the scan: (?P<match>True|False)")


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [], f"committed with outputs: {cell.source[:60]!r}"
        assert cell.execution_count is None, f"committed with an execution count: {cell.source[:60]!r}"
    assert nb.metadata["kernelspec"]["name"] == "python3"


def _stdout(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream" and out.get("name") == "stdout")


def test_notebook_runs_on_a_trained_project(trained_conv3d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    project = copy_project(trained_conv3d, tmp_path / "project")  # the tiny U-Net and 3D U-Net
    shutil.copy(NOTEBOOK, project / "notebooks" / NOTEBOOK.name)

    # The kernel inherits this environment: the venv's own `python3` kernelspec first, no telemetry,
    # no MLflow or serving settings of the caller, and temporary files under tmp_path.
    monkeypatch.setenv("JUPYTER_PATH", str(Path(sys.prefix) / "share" / "jupyter"))
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "_MLFLOW_")) or name.startswith("MEDSEG_SERVE_"):
            monkeypatch.delenv(name)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))

    nb = nbformat.read(project / "notebooks" / NOTEBOOK.name, as_version=4)
    n_cells = len(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(project / "notebooks")}})
    client.execute()  # a failing cell raises CellExecutionError

    code = [cell for cell in nb.cells[:n_cells] if cell.cell_type == "code"]
    stdout = "".join(_stdout(cell) for cell in code)
    assert Path(_stdout(nb.cells[-1]).strip()) == Path(sys.executable), "the kernel is not this environment's python"

    _, runs = mlflow_runs(project)
    unet_name = next(run.info.run_name for run in runs if run.info.run_name.startswith("UNet-"))
    conv3d_name = next(run.info.run_name for run in runs if run.info.run_name.startswith("UNet3D-"))
    assert unet_name in stdout and conv3d_name in stdout, stdout
    assert f"from {unet_name}" in stdout
    assert re.search(r"DICOM series [\d.]+: \d+ slices -> DICOM SEG [\d.]+ \(\d+ bytes\)", stdout), stdout
    assert "models with predictions: ['unet', 'conv3d']" in stdout
    assert f"tracking URI: sqlite:///{(project / 'mlflow.db').resolve()}" in stdout

    final = _stdout(code[-1]).strip().splitlines()[-1]
    match = FINAL_LINE.fullmatch(final)
    assert match, final
    assert match["match"] == "True"
    assert 0.0 <= float(match["dice"]) <= 1.0

    figures = sum("image/png" in out.get("data", {}) for cell in code for out in cell.outputs)
    assert figures == 3
    # The phantom and its mask went to a temporary folder, nothing into the project's notebooks/.
    written = re.search(r"written to (\S+)", stdout)
    assert written and Path(written[1]).parent == scratch
    assert sorted(p.name for p in Path(written[1]).iterdir()) == ["label.nii.gz", "mask.nii.gz", "scan.nii.gz"]
    assert [p.name for p in (project / "notebooks").iterdir()] == [NOTEBOOK.name]
