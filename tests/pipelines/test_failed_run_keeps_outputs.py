"""A model run that fails midway leaves the previous model, masks and reports byte for byte."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import yaml
from conftest import SHARED_UNET, TINY_UNET, copy_project, make_project_copy, mlflow_runs, run_pipeline

TESTS_DIR = Path(__file__).resolve().parents[1]


def _outputs(project: Path) -> dict[str, bytes]:
    """The unet's published model, masks and reports; not the crash-recovery backups, which a
    training run writes in place (so that a killed one resumes)."""
    return {
        str(p.relative_to(project)): p.read_bytes()
        for layer in ("06_models", "07_model_output", "08_reporting")
        for p in sorted((project / "data" / layer / "unet").rglob("*"))
        if p.is_file() and "backup" not in p.relative_to(project / "data" / layer / "unet").parts
    }


def test_a_run_killed_while_it_writes_its_masks_leaves_the_last_good_outputs_in_place(trained_unet, tmp_path):
    """SIGKILL while the new masks are being written (each mask save made slow, so the kill
    lands there): the published model, masks and reports stay the last good run's, in place,
    byte for byte, the whole time; the next run deletes what the killed one wrote."""
    project = copy_project(trained_unet, tmp_path / "project")
    good = _outputs(project)
    code = (
        "import json, sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "import medseg.datasets.nifti as nifti; save = nifti.NiftiDataset.save;"
        "nifti.NiftiDataset.save = lambda self, data: (save(self, data), time.sleep(60));"
        "from conftest import run_pipeline; run_pipeline(Path(sys.argv[2]), 'unet', json.loads(sys.argv[3]))"
    )
    params = {**SHARED_UNET, "unet.training.learning_rate": 0.01}  # a new model, new masks
    child = subprocess.Popen([sys.executable, "-c", code, str(TESTS_DIR), str(project), json.dumps(params)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    masks = project / "data" / "07_model_output"
    deadline = time.monotonic() + 300
    try:
        while not list(masks.glob(".*/*.nii.gz")):
            assert child.poll() is None, f"the run ended (rc {child.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "the run never wrote a mask"
            assert _outputs(project) == good  # never moved away while the run works
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert _outputs(project) == good
    assert (project / "data/06_models/.unet.medseg-staging/model.keras").exists()  # the killed run's, beside
    run_pipeline(project, "data", {key: value for key, value in SHARED_UNET.items() if key.startswith("data.")})
    assert _outputs(project) == good
    assert not list(project.rglob("*.medseg-staging"))


def _move_every_layer(project: Path, elsewhere: Path) -> None:
    """conf/local/catalog.yml: every catalog entry of conf/base, its `data/...` path moved
    under `elsewhere` (a folder outside the project)."""
    moved = {}
    for path in sorted((project / "conf" / "base").glob("catalog*.yml")):
        for name, entry in yaml.safe_load(path.read_text()).items():
            text = yaml.safe_dump(entry)
            if "data/" in text:
                moved[name] = yaml.safe_load(text.replace("data/", f"{elsewhere}/"))
    (project / "conf" / "local" / "catalog.yml").write_text(yaml.safe_dump(moved))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_with_the_catalog_moved_a_run_writes_nothing_under_data_and_a_failed_one_restores_it(tmp_path, monkeypatch):
    """The catalog owns every file: with every data layer moved elsewhere, a unet run writes
    only the lock under data/, and a run that fails in its evaluation, after training a new
    model and writing new masks, puts the previous outputs back where the catalog points, byte
    for byte, and is recorded as failed, with its dataset."""
    import medseg.pipelines.evaluation as evaluation

    project, elsewhere = make_project_copy(tmp_path / "project"), tmp_path / "elsewhere"
    _move_every_layer(project, elsewhere)
    data_before = sorted(str(p.relative_to(project)) for p in (project / "data").rglob("*"))
    run_pipeline(project, "unet", TINY_UNET)
    data_after = sorted(str(p.relative_to(project)) for p in (project / "data").rglob("*"))
    assert sorted(set(data_after) - set(data_before)) == ["data/.medseg.lock"]
    good = _files(elsewhere)
    assert {"06_models/unet/model.keras", "05_model_input/unet/plan.json", "08_reporting/unet/metrics_summary.json",
            "01_raw/synthetic/dataset.json"} <= set(good)
    assert any(name.startswith("07_model_output/unet/") for name in good)

    def crash(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(evaluation, "summarize_per_class", crash)
    with pytest.raises(Exception, match="evaluation crashed"):
        run_pipeline(project, "unet", {**TINY_UNET, "unet.training.learning_rate": 0.01})  # a new model and masks
    assert _files(elsewhere) == good
    assert not list(elsewhere.rglob("*.medseg-staging"))
    assert sorted(str(p.relative_to(project)) for p in (project / "data").rglob("*")) == data_after
    _, runs = mlflow_runs(project)
    assert [run.info.status for run in runs] == ["FAILED", "FINISHED"]
    assert runs[0].data.tags["medseg.dataset"] == "medseg-synthetic"
    assert runs[0].data.tags["mlflow.note.content"].startswith("Dataset: medseg-synthetic (synthetic, ")
