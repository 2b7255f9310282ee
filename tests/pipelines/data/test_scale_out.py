"""The `data` pipeline on a Dask LocalCluster, and incremental reruns.

- `compute.scheduler=local:2` writes the same files, byte for byte, as `sync`.
- A bad case on a worker fails the run with the sequential path's error, writing nothing.
- A rerun on unchanged data reads and writes no case; a changed case is redone alone; a
  touched but unchanged file is not; a changed plan redoes every preprocessed case; and the
  result always equals a fresh run's, byte for byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import log_lines, data_files_written, make_project_copy, mlflow_runs, run_pipeline
from medseg.errors import InvalidIntensityError
from medseg.synthetic.phantoms import ensure_synthetic_dataset, synthesis_settings

PHANTOMS = {"n_cases": 6, "in_plane_size": 32, "n_slices_range": [8, 12]}
LAYERS = ("02_intermediate", "03_primary")


def _phantoms(root: Path) -> Path:
    """Six small phantoms in MSD layout, outside any project (read in place as `data.msd_dir`)."""
    data = {
        "seed": 5,
        "synthetic": {
            **PHANTOMS, "in_plane_spacing_range": [0.8, 1.2], "slice_spacing_range": [1.5, 3.0],
            "n_lesions_range": [1, 3], "n_classes": 1,
        },
    }
    ensure_synthetic_dataset(root, synthesis_settings(data))
    return root


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return _phantoms(tmp_path_factory.mktemp("msd") / "Task90_Phantoms")


def _params(msd: Path, scheduler: str = "sync", **extra) -> dict:
    return {"data.source": "msd", "data.msd_dir": str(msd), "compute.scheduler": scheduler, **extra}


def _outputs(project: Path) -> dict[str, Path]:
    """Every file of the data layers, by path relative to the project (keys files included)."""
    return {
        str(path.relative_to(project)): path
        for layer in LAYERS
        for path in sorted((project / "data" / layer).rglob("*"))
        if path.is_file()
    }


def _same_outputs(a: Path, b: Path) -> None:
    files_a, files_b = _outputs(a), _outputs(b)
    assert sorted(files_a) == sorted(files_b)
    for name, path in files_a.items():
        assert path.read_bytes() == files_b[name].read_bytes(), name
        if name.endswith(".nii.gz"):  # the data arrays too, not only the compressed bytes
            assert np.array_equal(np.asanyarray(nib.load(path).dataobj), np.asanyarray(nib.load(files_b[name]).dataobj))


def test_local_cluster_writes_what_sync_writes(tmp_path: Path, phantoms: Path):
    sync = make_project_copy(tmp_path / "sync")
    local = make_project_copy(tmp_path / "local")
    run_pipeline(sync, "data", _params(phantoms, "sync"))
    run_pipeline(local, "data", _params(phantoms, "local:2"))
    assert len([n for n in _outputs(sync) if n.endswith(".nii.gz")]) == 4 * PHANTOMS["n_cases"]
    _same_outputs(sync, local)
    _, runs = mlflow_runs(local)
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["compute.scheduler"] == "local:2"


def test_a_bad_case_on_a_worker_fails_as_sync_does(tmp_path: Path):
    msd = _phantoms(tmp_path / "Task91_Broken")
    path = msd / "imagesTr" / "case_002_0000.nii.gz"
    broken = nib.load(path)
    data = np.asanyarray(broken.dataobj).astype(np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, broken.affine), path)
    errors = {}
    for scheduler in ("sync", "local:2"):
        project = make_project_copy(tmp_path / scheduler.replace(":", ""))
        with pytest.raises(InvalidIntensityError, match=r"case_002_0000\.nii\.gz: the image holds 1 NaN") as error:
            run_pipeline(project, "data", _params(msd, scheduler))
        errors[scheduler] = str(error.value)
        assert data_files_written(project) == []
        _, runs = mlflow_runs(project)
        assert runs[0].info.status == "FAILED"
    assert errors["local:2"] == errors["sync"]


def _inodes(project: Path) -> dict[str, int]:
    return {name: path.stat().st_ino for name, path in _outputs(project).items() if name.endswith(".nii.gz")}


def test_reruns_redo_only_what_changed(tmp_path: Path):
    msd = _phantoms(tmp_path / "Task92_Incremental")
    project = make_project_copy(tmp_path / "project")
    run_pipeline(project, "data", _params(msd))
    first = _inodes(project)

    # 1. Unchanged: no case is read or written again, and the log says so.
    with log_lines("medseg.cases.validation", "medseg.datasets.staged") as lines:
        run_pipeline(project, "data", _params(msd))
    assert _inodes(project) == first
    log = lines.text
    assert "Validating: 6 of 6 cases unchanged since the last run" in log
    assert log.count("6 of 6 cases unchanged since the last run (same source files and plan), kept; 0 to make") == 4

    # 2. A file touched (new mtime, same bytes) is hashed, found unchanged, and not redone.
    label = msd / "labelsTr" / "case_004.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    run_pipeline(project, "data", _params(msd))
    assert _inodes(project) == first

    # 3. One case's image changes: that case alone is made again.
    image = msd / "imagesTr" / "case_001_0000.nii.gz"
    scan = nib.load(image)
    nib.save(nib.Nifti1Image(np.asanyarray(scan.dataobj) * 2.0 + 7.0, scan.affine), image)
    run_pipeline(project, "data", _params(msd))
    after = _inodes(project)
    changed = sorted(name for name in first if after[name] != first[name])
    assert changed == [
        "data/02_intermediate/images/case_001.nii.gz", "data/03_primary/images/case_001.nii.gz",
    ]
    fresh = make_project_copy(tmp_path / "fresh")
    run_pipeline(fresh, "data", _params(msd))
    _same_outputs(project, fresh)  # the incremental result is the full run's, byte for byte

    # 4. A changed plan (target spacing) redoes every preprocessed case; canonical files do
    # not depend on the plan and are kept.
    plan = {"data.preprocessing.target_spacing": [1.5, 1.5, 2.5]}
    run_pipeline(project, "data", _params(msd, **plan))
    replanned = _inodes(project)
    for name in first:
        assert (replanned[name] != after[name]) == name.startswith("data/03_primary/"), name
    geometry = json.loads((project / "data" / "03_primary" / "geometry.json").read_text())
    assert {tuple(g["target_spacing"]) for g in geometry.values()} == {(1.5, 1.5, 2.5)}
    fresh_plan = make_project_copy(tmp_path / "fresh_plan")
    run_pipeline(fresh_plan, "data", _params(msd, **plan))
    _same_outputs(project, fresh_plan)
